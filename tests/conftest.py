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
