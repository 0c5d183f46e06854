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
