"""fastattn: fused attention kernels for PyTorch (Triton on GPU, C++ SIMD on CPU) behind one drop-in API."""
from fastattn import reference
from fastattn.functional import scaled_dot_product_attention
from fastattn.weights import attention_weights
from fastattn.varlen import varlen_attention, unpad, pad
from fastattn.additive import additive_attention
from fastattn.hard import hard_attention
from fastattn.kvcache import attention_with_kvcache
from fastattn.patch import patch
from fastattn import nn

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "attention_weights", "varlen_attention", "unpad", "pad",
           "additive_attention", "hard_attention", "attention_with_kvcache", "patch", "nn", "reference", "__version__"]
