import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

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
