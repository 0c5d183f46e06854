"""The benchmarked operations, one module each; importing this package registers them."""
from fastattn.bench.ops import additive, decode, hard, sdpa, varlen  # noqa: F401  (each registers itself)
