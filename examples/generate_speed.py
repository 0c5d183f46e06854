"""Time per new token of HuggingFace ``generate()`` with attn_implementation "fastattn", "sdpa" and "eager".

    python examples/generate_speed.py [--threads 1] [--prompt 1024] [--new-tokens 32] [--batch 1 4]

Model: a random-weight Llama-style decoder built from a config (no downloads): 4 layers, hidden 256, 8 query
heads / 2 key-value heads (head dim 32), vocabulary 1024, fp32, eval mode. Prompt: ``--prompt`` random tokens;
in a batch, row b is ``64 * b`` tokens shorter and left-padded (as a tokenizer pads for generation), so the
prefill runs the padded causal pattern and the decode steps attend to a cache with padding.

Greedy decoding of exactly ``--new-tokens`` tokens (``min_new_tokens`` too: no early end of sequence). The
figures, timed inside each run by a logits processor that notes when each step's logits arrive: prefill =
start of ``generate()`` to the first token's logits (the prompt's forward), per new token = first to last
token's logits / (new tokens - 1) (the decode steps alone), total = the whole call. Each is the median of
``--repeats`` runs after one warm-up. All providers share the same weights and prompts and must produce
the same tokens (checked).

The functions are reused by bench/test_bench_generate.py.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

PROVIDERS = ("fastattn", "sdpa", "eager")
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model(provider: str, seed: int = 0):
    """The random Llama-style decoder of the module doc on ``provider``'s attention (fp32, eval mode); the same
    weights for every provider with the same ``seed``."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    if provider == "fastattn":
        import fastattn.integrations.transformers as fastattn_hf
        fastattn_hf.register()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    model.set_attn_implementation(provider)
    return model


def prompt_batch(batch: int, prompt: int, seed: int = 1) -> dict:
    """``batch`` prompts of ``prompt - 64 * b`` random tokens (b = 0, 1, ...), left-padded to ``prompt``."""
    if prompt - 64 * (batch - 1) < 1:
        raise ValueError(f"--prompt {prompt} is too short for batch {batch} (row b has prompt - 64 b tokens)")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, MODEL["vocab_size"], (batch, prompt), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        ids[b, :64 * b] = MODEL["pad_token_id"]
        mask[b, :64 * b] = 0
    return {"input_ids": ids, "attention_mask": mask}


class _StepClock:
    """A logits processor that records the time each step's logits arrive (after that step's forward)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate(model, inputs: dict, new_tokens: int, clock: _StepClock | None = None) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens; the (B, prompt + new_tokens) token ids."""
    from transformers import LogitsProcessorList
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=MODEL["pad_token_id"],
                              logits_processor=LogitsProcessorList([clock] if clock is not None else []))


def time_generate(model, inputs: dict, new_tokens: int, repeats: int = 3) -> dict:
    """Medians over ``repeats`` runs (after one warm-up) of: the prefill (start of ``generate()`` to the first
    token's logits: the prompt's forward), the time per new token (first to last token's logits over
    new_tokens - 1 steps: the decode steps alone, timed inside the same run), and the whole call."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to separate the decode steps from the prefill, "
                         f"got {new_tokens}")
    generate(model, inputs, new_tokens)  # warm-up
    prefill, per_token, total = [], [], []
    for _ in range(repeats):
        clock = _StepClock()
        t0 = time.perf_counter()
        ids = generate(model, inputs, new_tokens, clock)
        t1 = time.perf_counter()
        prefill.append(clock.times[0] - t0)
        per_token.append((clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
        total.append(t1 - t0)
    med = statistics.median
    return {"prefill_s": med(prefill), "per_token_s": med(per_token), "total_s": med(total), "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {p: build_model(p) for p in args.providers}
    print(f"Llama-style random model: {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
          f"{MODEL['num_attention_heads']} heads / {MODEL['num_key_value_heads']} kv heads, fp32; prompt "
          f"{args.prompt}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}, median of "
          f"{args.repeats}")
    print(f"{'batch':>5} {'provider':>9} {'prefill ms':>11} {'ms / new token':>15} {'total ms':>9}")
    for batch in args.batch:
        inputs = prompt_batch(batch, args.prompt)
        first = None
        for p in args.providers:
            r = time_generate(models[p], inputs, args.new_tokens, args.repeats)
            if first is None:
                first = (p, r["ids"])
            elif not torch.equal(first[1], r["ids"]):
                print(f"  warning: {p} generated other tokens than {first[0]}")
            print(f"{batch:>5} {p:>9} {1e3 * r['prefill_s']:>11.1f} {1e3 * r['per_token_s']:>15.2f} "
                  f"{1e3 * r['total_s']:>9.1f}")


if __name__ == "__main__":
    main()
