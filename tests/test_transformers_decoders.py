"""HuggingFace decoders on attn_implementation="fastattn": small random-weight models built from configs
(offline), greedy ``generate()`` from a left-padded batch and one forward's logits against "eager"; one
training step's gradients (gpt-oss's sinks, Gemma 2's softcap); and the mask function's compact causal
rule (fastattn/integrations/transformers.py module doc) against transformers' own ``sdpa_mask``."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")

import fastattn  # noqa: E402
import fastattn.integrations.transformers as fastattn_hf  # noqa: E402
from fastattn.testing import ATOL, ATOL_BWD  # noqa: E402

transformers.utils.logging.set_verbosity_error()

WINDOW = 8          # every sliding window below: smaller than both prompts
PROMPTS = (13, 9)   # prompt lengths; the shorter one is left-padded
NEW_TOKENS = 10     # the sliding caches drop keys during generation
# Logits of a 2-layer fp32 model: the kernels' rounding differs from eager's matmul + softmax, and the
# difference passes through two layers and the LM head (logits of magnitude ~1).
LOGITS_ATOL = 10 * ATOL[torch.float32]
GRAD_ATOL = 10 * ATOL_BWD[torch.float32]  # relative to the largest gradient entry of each parameter


@pytest.fixture(scope="module")
def impl() -> str:
    """The "fastattn" attention implementation on the default backend."""
    return fastattn_hf.register()


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.2)


def _config(name: str):
    """Two layers, hidden 64, 4 query heads / 2 key-value heads, vocab 128; sliding window WINDOW."""
    if name == "llama":
        return transformers.LlamaConfig(**COMMON)
    if name == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=WINDOW)
    if name == "qwen3":
        return transformers.Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
    if name == "gemma2":
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                                         final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    if name == "gemma3":
        return transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention"])
    if name == "gpt_oss":  # MoE experts run in plain torch on the CPU (no MoE kernels needed)
        return transformers.GptOssConfig(**{**COMMON, "intermediate_size": 64}, head_dim=16, sliding_window=WINDOW,
                                         num_local_experts=4, num_experts_per_tok=2,
                                         layer_types=["sliding_attention", "full_attention"])
    if name == "phi3":
        return transformers.Phi3Config(**COMMON, sliding_window=WINDOW)
    raise KeyError(name)


MODELS = ["llama", "mistral", "qwen3", "gemma2", "gemma3", "gpt_oss", "phi3"]


def _pair(name: str, impl: str):
    """(eager model, fastattn model) with the same random weights, fp32."""
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager")
    fast = transformers.AutoModelForCausalLM.from_config(_config(name), attn_implementation=impl)
    fast.load_state_dict(eager.state_dict())
    assert fast.config._attn_implementation == impl
    return eager, fast


def _batch() -> dict:
    """Two prompts of lengths PROMPTS, left-padded to the longest."""
    g = torch.Generator().manual_seed(1)
    n = max(PROMPTS)
    ids = torch.randint(3, COMMON["vocab_size"], (len(PROMPTS), n), generator=g)
    mask = torch.ones_like(ids)
    for b, length in enumerate(PROMPTS):
        ids[b, :n - length] = COMMON["pad_token_id"]
        mask[b, :n - length] = 0
    assert (mask == 0).any()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", MODELS)
def test_generate_and_logits_match_eager(name, impl):
    eager, fast = _pair(name, impl)
    eager.eval(), fast.eval()
    batch = _batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = eager(**batch).logits, fast(**batch).logits
        err = (got - want)[real].abs().max().item()
        assert err < LOGITS_ATOL, f"{name}: logits max abs error {err:.2e} on real tokens (atol {LOGITS_ATOL:.0e})"
        gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=COMMON["pad_token_id"])
        want_ids = eager.generate(**batch, **gen)
        got_ids = fast.generate(**batch, **gen)
    assert want_ids.shape[1] == max(PROMPTS) + NEW_TOKENS
    diff = (got_ids != want_ids).nonzero()
    assert diff.numel() == 0, f"{name}: greedy tokens differ from eager at (row, position) {diff[:5].tolist()}"


def _train_grads(model, batch: dict) -> dict[str, torch.Tensor]:
    """Gradients of one training step: next-token cross-entropy on the real tokens predicted from real tokens.
    A padded row's first real token would be predicted from a padding position, whose query row sees no key:
    fastattn gives it zeros, eager a uniform average (its additive mask is finite), so it is not a label."""
    model.train()
    model.zero_grad()
    mask = batch["attention_mask"]
    after_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = batch["input_ids"].masked_fill((mask == 0) | after_padding, -100)
    model(**batch, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["gpt_oss", "gemma2"])
def test_training_gradients_match_eager(name, impl):
    eager, fast = _pair(name, impl)
    batch = _batch()
    want, got = _train_grads(eager, batch), _train_grads(fast, batch)
    assert want.keys() == got.keys()
    if name == "gpt_oss":
        sinks = [n for n in want if n.endswith("self_attn.sinks")]
        assert len(sinks) == 2 and all(got[n].abs().max() > 0 for n in sinks), "no gradient reached the sinks"
    for n in want:
        bound = GRAD_ATOL * max(1.0, want[n].abs().max().item())
        err = (got[n] - want[n]).abs().max().item()
        assert err < bound, f"{name}: gradient of {n}: max abs error {err:.2e} (bound {bound:.1e})"


# ------------------------------------------------------------------------------ the mask function
def _padding(B: int, total: int, left_pad: int | None) -> torch.Tensor | None:
    if left_pad is None:
        return None
    m = torch.ones(B, total, dtype=torch.bool)
    m[1, :left_pad] = False
    return m


# (id, q_length, kv_length, q_offset, kv_offset): the caches' mask sizes (transformers.cache_utils)
CACHE_CASES = [
    ("prefill", 11, 11, 0, 0),                      # no cache / empty dynamic cache
    ("decode", 1, 12, 11, 0),                       # dynamic cache, one new token
    ("chunk", 3, 14, 11, 0),                        # dynamic cache, a 3-token continuation
    ("sliding-dropped", 1, 8, 13, 6),               # sliding cache that dropped keys 0..5 (window 8)
    ("sliding-dropped-chunk", 3, 10, 13, 6),
    ("static-prefill", 11, 32, 0, 0),               # static cache: empty slots after the prompt (top-left)
]


@pytest.mark.parametrize("window", [None, WINDOW], ids=["causal", f"sliding{WINDOW}"])
@pytest.mark.parametrize("left_pad", [None, 0, 3], ids=["nomask", "nopad", "leftpad3"])
@pytest.mark.parametrize("case", CACHE_CASES, ids=[c[0] for c in CACHE_CASES])
def test_mask_function_returns_no_dense_mask_for_causal_patterns(case, left_pad, window):
    _, L, S, q_off, kv_off = case
    B = 2
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    args = dict(batch_size=B, q_length=L, kv_length=S, q_offset=q_off, kv_offset=kv_off, mask_function=fn,
                attention_mask=_padding(B, q_off + L, left_pad), local_size=window)
    got = fastattn_hf.attention_mask(**args)
    want = mu.sdpa_mask(**args)
    if want is None:  # sdpa_mask's own skip: the attention function then behaves as transformers' sdpa
        assert got is None
        return
    assert got is not None
    pattern = getattr(got, fastattn_hf._PATTERN_ATTR)
    assert got.shape == (B, 1, L, S) and got.dtype == torch.bool
    assert got.stride()[1:3] == (0, 0), f"a dense mask came back: strides {got.stride()}"
    assert pattern.lower_right == (q_off - kv_off == S - L and S != L)
    assert pattern.window_left == (-1 if window is None else window - 1)
    dense = fastattn_hf._pattern_dense(got, pattern)
    assert torch.equal(dense, want.expand_as(dense)), f"pattern {pattern} differs from sdpa_mask"
    padded = mu.prepare_padding_mask(args["attention_mask"], S, kv_off)  # False beyond the 2-D mask's end
    assert pattern.padding == (padded is not None and not bool(padded[:, kv_off:kv_off + S].all()))


def _chunk_fn(q, kv, b=None, h=None):
    return (kv // 4) == (q // 4)


@pytest.mark.parametrize("kind", ["or-overlay", "packed", "offset", "local-size-mismatch"])
def test_mask_function_falls_back_to_sdpa_mask(kind):
    """Patterns the compact rule does not cover come back exactly as sdpa_mask builds them (untagged)."""
    B, L, S = 2, 6, 9
    args = dict(batch_size=B, q_length=L, kv_length=S, q_offset=3, kv_offset=0,
                mask_function=mu.causal_mask_function, attention_mask=_padding(B, 9, 2))
    if kind == "or-overlay":
        args["mask_function"] = mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: _chunk_fn(q, kv))
    elif kind == "packed":
        pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * B)
        args.update(q_length=S, q_offset=0, attention_mask=None, allow_is_causal_skip=False,  # as transformers
                    mask_function=mu.and_masks(mu.causal_mask_function,
                                               mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(pos))))
    elif kind == "offset":  # d = q_offset - kv_offset is neither 0 nor S - L
        args["q_offset"] = 1
    elif kind == "local-size-mismatch":
        args.update(mask_function=mu.sliding_window_causal_mask_function(4), local_size=5)
    got, want = fastattn_hf.attention_mask(**args), mu.sdpa_mask(**args)
    assert getattr(got, fastattn_hf._PATTERN_ATTR, None) is None
    assert torch.equal(got, want)


def test_untagged_compact_mask_is_refused():
    B, H, L, S, E = 2, 4, 5, 5, 8
    q = torch.randn(B, H, L, E)
    args = dict(batch_size=B, q_length=L, kv_length=S, attention_mask=_padding(B, S, 2))
    tagged = fastattn_hf.attention_mask(**args)
    assert getattr(tagged, fastattn_hf._PATTERN_ATTR).padding
    module = torch.nn.Module()
    fastattn_hf.attention_forward(module, q, q, q, tagged)  # accepted
    with pytest.raises(RuntimeError, match="lost|derived"):
        fastattn_hf.attention_forward(module, q, q, q, tagged[:, :, :, :])  # a new tensor: the tag is gone


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_output_attentions_match_eager(name, impl):
    """output_attentions=True with a compact causal mask: the weights come from the dense pattern it stands for."""
    eager, fast = _pair(name, impl)
    eager.eval(), fast.eval()
    batch = _batch()
    real = batch["attention_mask"].bool()[:, None, :, None]  # real query rows (padded rows: eager's are uniform)
    with torch.no_grad():
        want = eager(**batch, output_attentions=True).attentions
        got = fast(**batch, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        err = ((a - b) * real).abs().max().item()
        assert err < ATOL[torch.float32], f"{name} layer {i} attention weights: max abs error {err:.2e}"
