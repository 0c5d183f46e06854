import importlib
import math
import os
import sys

# The Triton kernels run on CPU tensors under the interpreter. Triton chooses interpreted or compiled
# functions when it decorates them (its own helpers at its first import, which torch may trigger), so the
# switch is set here, before any test module imports torch or fastattn. TRITON_INTERPRET=0 in the environment
# (a machine with a GPU) runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# Real sentences of mixed length, for the transformers tests (padded batches).
SENTENCES = [
    "The film was a delight from start to finish.",
    "Never again.",
    "Our waiter was rude and ignored us all evening, and the soup was lukewarm and watery.",
    "I expected to hate it, but it won me over.",
    "Setup took five minutes and everything just worked, which I did not expect from such a cheap device.",
    "Fine.",
]

DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


# ------------------------------------------------------------------------------------ shared input builders
# Plain functions (``from conftest import make_qkv``): each test module keeps its own seeds, shapes and mask
# kinds, and draws from these so that one layout convention and one padding convention serve every file.
def randn_heads(B: int, H: int, N: int, D: int, dtype: torch.dtype = torch.float32, *,
                gen: torch.Generator | None = None, bshd: bool = False,
                draw_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard-normal (B, H, N, D) tensor in ``dtype``, drawn in ``draw_dtype`` from ``gen`` (torch's global
    generator when None). ``bshd=True``: a transposed view of a (B, N, H, D) buffer, strided as a transformer's
    projections leave it (the values then follow that buffer's order)."""
    if bshd:
        return torch.randn(B, N, H, D, generator=gen, dtype=draw_dtype).to(dtype).transpose(1, 2)
    return torch.randn(B, H, N, D, generator=gen, dtype=draw_dtype).to(dtype)


def make_qkv(B: int, H: int, Hk: int, L: int, S: int, E: int, Ev: int, dtype: torch.dtype = torch.float32, *,
             gen: torch.Generator | None = None, bshd: bool = False, draw_dtype: torch.dtype = torch.float32,
             requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query (B, H, L, E), key (B, Hk, S, E), value (B, Hk, S, Ev), drawn in that order by :func:`randn_heads`."""
    return tuple(randn_heads(B, h, n, d, dtype, gen=gen, bshd=bshd, draw_dtype=draw_dtype).requires_grad_(requires_grad)
                 for h, n, d in ((H, L, E), (Hk, S, E), (Hk, S, Ev)))


def padding_mask(lengths, S: int) -> torch.Tensor:
    """Bool (B, 1, 1, S) key-padding mask, True = attend: batch element b sees its first ``lengths[b]`` keys."""
    lens = torch.as_tensor(lengths)
    return (torch.arange(S)[None, :] < lens[:, None]).view(len(lens), 1, 1, S)


def triton_kernels(name: str):
    """The Triton kernels module ``fastattn.kernels.<name>`` (``kernels.<name>`` in a source checkout that is
    not installed), decorated for the interpreter: a module imported earlier in the session without it is
    reloaded (Triton decorates a function for the interpreter or the compiler when it is defined). Skips
    the test when Triton is not installed."""
    pytest.importorskip("triton")
    try:
        mod = importlib.import_module(f"fastattn.kernels.{name}")
    except ImportError:  # source checkout that is not installed: kernels/ is the package directory
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        mod = importlib.import_module(f"kernels.{name}")
    if not mod._INTERPRETED:
        mod = importlib.reload(mod)
    return mod


def train_step_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, {parameter name: gradient}) of one training step of a transformers encoder on a tokenised
    ``batch``: the squared distance of the mean-pooled real tokens to a fixed ramp."""
    model.train()
    model.zero_grad()
    out = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out * m).sum(1) / m.sum(1)
    loss = ((pooled - torch.linspace(-1, 1, pooled.shape[-1])) ** 2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def isa_module(isa: str):
    """The C++ module ``fastattn._C_<isa>`` built for instruction set ``isa``."""
    return importlib.import_module(f"fastattn._C_{isa}")


def isa_params(needs: str | None = None) -> list:
    """The C++ instruction-set modules ("portable", "avx2", "avx512") as pytest params, each skipped (with the
    reason) where this CPU cannot run it; ``needs``: also skipped where the module lacks that function."""
    from fastattn import _cpu
    out = []
    for isa in ("portable", "avx2", "avx512"):
        why = _cpu._unusable_reason(isa)
        if needs is not None and why is None and not hasattr(isa_module(isa), needs):
            why = f"fastattn._C_{isa} was built without {needs} (rebuild)"
        out.append(pytest.param(isa, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


# --------------------------------------------------------------------------------- decode (key/value cache)
# Shared by the C++ and the Triton decode kernel tests and by the attention_with_kvcache tests. Caches are
# (B, S_max, Hk, D); rows past each sequence's length hold NaN, and a paged pool's unused pages too, so that a
# kernel that reads a key it must not read returns NaN.
DECODE_DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DECODE_HEADS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1), "mqa8": (8, 1), "gqa3": (6, 2),  # name: (H, Hk)
                "gqa8": (16, 8)}


def nan_past_lengths(cache: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """``cache`` (B, S_max, ...) with the rows past each batch element's length set to NaN, in place."""
    for b, n in enumerate(lens.tolist()):
        cache[b, n:] = float("nan")
    return cache


def paged_pools(k_cache: torch.Tensor, v_cache: torch.Tensor, page: int, gen: torch.Generator):
    """(k_pool, v_pool, block_table): the (B, cap, Hk, D) caches cut into pages of ``page`` keys and stored in a
    pool of B * cap / page + 2 pages in an order drawn from ``gen``; the two unused pages hold NaN."""
    B, cap, Hk = k_cache.shape[:3]
    nb = cap // page
    ids = torch.randperm(B * nb + 2, generator=gen)
    table = ids[:B * nb].reshape(B, nb).to(torch.int32)

    def pool(c):
        p = torch.full((B * nb + 2, page, Hk, c.shape[-1]), float("nan"), dtype=c.dtype)
        p[ids[:B * nb]] = c.reshape(B * nb, page, Hk, c.shape[-1])
        return p
    return pool(k_cache), pool(v_cache), table


def decode_problem(B=3, L=3, heads="gqa", E=24, Ev=40, S_max=45, seqlens=(37, 0, 2), dtype="f32", page=0,
                   strided=False, torch_layout=False):
    """q (B, L, H, E), k_cache / v_cache, cache_seqlens, block_table (None unless ``page``). The default lengths:
    one long, one empty (zeros), one shorter than L = 3 (its first rows see no key). ``page``: a paged pool
    (:func:`paged_pools`), capacity S_max rounded up to a page. ``strided``: q, k_cache and v_cache are
    non-contiguous views (head dim sliced out of a wider one). ``torch_layout``: caches are (B, Hk, S, E)
    tensors viewed as (B, S, Hk, E) (key stride E, head stride S * E)."""
    gen = torch.Generator().manual_seed(0)
    H, Hk = DECODE_HEADS[heads]
    dt = DECODE_DT[dtype]
    lens = torch.tensor(seqlens[:B], dtype=torch.int32)
    cap = math.ceil(S_max / page) * page if page else S_max

    def cache(d):
        if torch_layout:
            c = torch.randn(B, Hk, cap, d, generator=gen).to(dt).transpose(1, 2)
        else:
            c = torch.randn(B, cap, Hk, d + 8 if strided else d, generator=gen).to(dt)[..., :d]
        return nan_past_lengths(c, lens)
    if strided:
        q = torch.randn(B, H, L, E, generator=gen).to(dt).transpose(1, 2)
    else:
        q = torch.randn(B, L, H, E, generator=gen).to(dt)
    k, v = cache(E), cache(Ev)
    if not page:
        return q, k, v, lens, None
    k_pool, v_pool, table = paged_pools(k, v, page, gen)
    return q, k_pool, v_pool, lens, table


def check_decode(run, q, k, v, lens, table, **kw):
    """``run(q, k, v, lens, table, **kw)`` (a decode launcher) against the references; returns (out, lse).
    Tolerances of fastattn.testing; a sequence with no key must give zeros and an lse of -inf (the sink's
    logit with sinks)."""
    from fastattn.reference.decode import decode_attention
    from fastattn.testing import assert_close
    out, lse = run(q, k, v, lens, table, **kw)
    B, L, H, _ = q.shape
    assert out.shape == (B, L, H, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    ref_kw = {n: x for n, x in kw.items() if n not in ("num_splits", "out")}
    ref, ref_lse = decode_attention(q, k, v, lens, block_table=table, **ref_kw)
    lp = None
    if q.dtype != torch.float32:
        lp = decode_attention(q, k, v, lens, block_table=table, upcast=False, **ref_kw)[0]
    assert_close("out", out, ref, lp)
    assert_close("lse", lse, ref_lse)
    for b in (lens == 0).nonzero().flatten().tolist():
        assert (out[b] == 0).all()
        sinks = kw.get("sinks")
        want = torch.full((H, L), float("-inf")) if sinks is None else sinks.float()[:, None].expand(H, L)
        assert torch.equal(lse[b], want)
    return out, lse


def check_decode_splits(run, rerun, problem, dtype: str, counts, lse_atol: float) -> None:
    """Key splits of a decode launcher on ``problem`` (with sinks): each count in ``counts`` passes
    :func:`check_decode` through ``run``, agrees with 1 split to rounding (the merge regroups the sums), and
    repeats bit for bit when run again through ``rerun``."""
    sinks = torch.randn(DECODE_HEADS["gqa"][0])
    one = check_decode(run, *problem, sinks=sinks, num_splits=1)
    for n in counts:
        got = check_decode(run, *problem, sinks=sinks, num_splits=n)
        again = rerun(*problem, sinks=sinks, num_splits=n)
        assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
        tol = 1e-6 if dtype == "f32" else 1e-2
        torch.testing.assert_close(got[0].float(), one[0].float(), atol=tol, rtol=0)
        torch.testing.assert_close(got[1], one[1], atol=lse_atol, rtol=0)


_H4 = DECODE_HEADS["gqa"][0]
DECODE_VARIANT_CASES = [
    ("not-causal", dict(causal=False)),
    ("window-left7", dict(window=(7, -1))),
    ("window-left0", dict(window=(0, -1))),
    ("window-7-2-not-causal", dict(causal=False, window=(7, 2))),
    ("window-right1-not-causal", dict(causal=False, window=(-1, 1))),
    ("softcap", dict(softcap=1.5)),
    ("sinks", dict(sinks=torch.linspace(-1.0, 2.0, _H4))),
    ("alibi-h", dict(alibi_slopes=torch.linspace(0.05, 0.4, _H4))),
    ("alibi-bh", dict(alibi_slopes=torch.linspace(0.05, 0.6, 3 * _H4).reshape(3, _H4), causal=False)),
    ("scale", dict(scale=0.7)),
    ("all", dict(window=(11, -1), softcap=2.0, sinks=torch.linspace(-1.0, 2.0, _H4),
                 alibi_slopes=torch.linspace(0.05, 0.4, _H4), num_splits=2)),
]
# The combined variants run in fp16 / bf16 (with a paged cache and L = 1).
DECODE_COMBINED = dict(causal=False, window=(20, 3), softcap=3.0, sinks=torch.linspace(-1.0, 2.0, _H4),
                       alibi_slopes=torch.linspace(0.05, 0.4, _H4))

# (id, mask kind for decode_mask, decode_problem arguments plus num_splits / window for the call)
DECODE_MASK_CASES = [
    ("bool-B1LS", "bool", dict()),
    ("bool-B1LS-gqa3-split", "bool", dict(heads="gqa3", L=6, seqlens=(33, 0, 7), num_splits=2)),
    ("float-BHLS", "float", dict()),
    ("float32-1H1S-mqa8", "float1", dict(heads="mqa8")),
    ("float-BHLS-bf16", "float", dict(dtype="bf16")),
    ("bool-B1LS-f16-window", "bool", dict(dtype="f16", window=(9, -1))),
]


def decode_mask_case(run, kind: str, kw: dict):
    """One DECODE_MASK_CASES case through ``run`` (see :func:`check_decode`): bool (True = attend) and float
    (added) masks, read through broadcast strides; keys past each length stay hidden (NaN there) whatever the
    mask says. The "bool" masks hide every key of batch 0's first query row: that row must give zeros."""
    kw = dict(kw)
    call = {n: kw.pop(n) for n in ("num_splits", "window") if n in kw}
    q, k, v, lens, _ = decode_problem(**kw)
    B, L, H, _ = q.shape
    S_max = k.shape[1]
    gen = torch.Generator().manual_seed(1)
    if kind == "bool":  # random holes, and batch 0's first query row hides every key
        mask = torch.rand(B, 1, L, S_max, generator=gen) > 0.3
        mask[0, :, 0] = False
    elif kind == "bool_expanded":  # stride-0 dims that are not size 1
        mask = (torch.rand(1, 1, 1, S_max, generator=gen) > 0.3).expand(B, H, L, S_max)
    elif kind == "float":
        mask = torch.randn(B, H, L, S_max, generator=gen).to(q.dtype)
        mask[0, 1, 1, :20] = float("-inf")
    else:  # a float32 mask broadcast over batch and query rows
        mask = torch.randn(1, H, 1, S_max, generator=gen)
        mask[..., 5] = float("-inf")
    out, _ = check_decode(run, q, k, v, lens, None, mask=mask, **call)
    if kind == "bool":
        assert (out[0, 0] == 0).all()  # the row that sees no key


def decode_bad_args(**kw) -> tuple[dict, dict]:
    """(q / k_cache / v_cache / cache_seqlens of a valid B = 2 problem with those in ``kw`` swapped in, the rest
    of ``kw``): the arguments of a DECODE_ERROR_CASES call."""
    q, k, v, lens, _ = decode_problem(B=2)
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens)
    args.update({n: x for n, x in kw.items() if n in args})
    return args, {n: x for n, x in kw.items() if n not in args}


# (id, arguments for decode_bad_args, exception, message)
DECODE_ERROR_CASES = [
    ("q-3d", dict(q=torch.zeros(2, 3, 24)), ValueError, "q must be a 4-D tensor"),
    ("q-int", dict(q=torch.zeros(2, 3, 4, 24, dtype=torch.int32)), TypeError, "q must be float16"),
    ("cache-dtype", dict(k_cache=torch.zeros(2, 45, 2, 24, dtype=torch.float16)), TypeError, "q's dtype"),
    ("head-dim", dict(k_cache=torch.zeros(2, 45, 2, 16), v_cache=torch.zeros(2, 45, 2, 40)), ValueError,
     "head dim must be q's"),
    ("heads", dict(k_cache=torch.zeros(2, 45, 3, 24), v_cache=torch.zeros(2, 45, 3, 40)), ValueError,
     "multiple of the cache's"),
    ("seqlens-dtype", dict(cache_seqlens=torch.zeros(2, dtype=torch.int64)), ValueError, "cache_seqlens must be"),
    ("seqlens-shape", dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError, "shape (2,)"),
    ("batch", dict(k_cache=torch.zeros(3, 45, 2, 24), v_cache=torch.zeros(3, 45, 2, 40)), ValueError,
     "batch dim must be q's"),
    ("table", dict(block_table=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "block_table must be"),
    ("window", dict(window=(-2, 0)), ValueError, "window must be"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap must be"),
    ("sinks", dict(sinks=torch.zeros(3)), ValueError, "sinks must be"),
    ("alibi", dict(alibi_slopes=torch.zeros(2, 3)), ValueError, "alibi_slopes must be"),
    ("splits", dict(num_splits=0), ValueError, "num_splits must be"),
    ("mask-shape", dict(mask=torch.ones(2, 4, 3, 44, dtype=torch.bool)), ValueError, "mask must be a 4-D tensor"),
    ("mask-dtype", dict(mask=torch.ones(2, 4, 3, 45, dtype=torch.int32)), TypeError, "mask must be bool"),
    ("out-shape", dict(out=torch.empty(2, 3, 4, 24)), ValueError, "out must be a tensor of shape"),
    ("out-dtype", dict(out=torch.empty(2, 3, 4, 40, dtype=torch.float16)), TypeError, "out must have q's dtype"),
]


def decode_error_case(fn, kw: dict, exc: type, msg: str) -> None:
    """``fn(**args)`` on one DECODE_ERROR_CASES case raises ``exc`` with ``msg`` (matched literally)."""
    args, extra = decode_bad_args(**kw)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fn(**args, **extra)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def eager_took(monkeypatch):
    """Records, per call of fastattn.scaled_dot_product_attention, whether the C++ eager entry
    (csrc/eager.cpp) took it (True) or declined it to the Python path (False)."""
    from fastattn import _launchers
    took, real = [], _launchers.cpu_eager

    def spy():
        fn = real()

        def call(*args):
            res = fn(*args)
            took.append(res is not None)
            return res
        return call
    monkeypatch.setattr(_launchers, "cpu_eager", spy)
    return took


# ------------------------------------------------------------------------- CI: no test skipped for an import
# .ci/run sets FASTATTN_REQUIRE_IMPORTS=1: a test module or test skipped because a package could not be
# imported (transformers, the packaged model, triton, ...) then fails the run, so that a missing install step
# shows in CI instead of shrinking the suite.
_IMPORT_SKIPS: list[str] = []
_IMPORT_SKIP_WORDS = ("could not import", "cannot be imported", "is not importable")


def _note_import_skip(report) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(w in reason for w in _IMPORT_SKIP_WORDS):
            _IMPORT_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    _note_import_skip(report)


def pytest_runtest_logreport(report):
    _note_import_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FASTATTN_REQUIRE_IMPORTS") == "1" and _IMPORT_SKIPS:
        print("\nFASTATTN_REQUIRE_IMPORTS=1, but tests were skipped for a missing package:")
        for line in _IMPORT_SKIPS:
            print("  " + line)
        session.exitstatus = 1
