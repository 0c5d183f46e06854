import importlib
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
    if not mod._interpreting():
        mod = importlib.reload(mod)
    return mod


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
