"""The custom ops (``torch.library.custom_op``), one module per op family: attention, varlen, additive, hard,
weights, decode. Each module holds its ops' registrations, fake implementations (torch.compile / torch.export) and
autograd formula; the family's public function (fastattn/functional.py and weights.py for attention,
fastattn/<family>.py for the others) validates and calls them, and the launchers behind them come from
fastattn._launchers. The op names (``fastattn::...``) and schemas are the
stable interface that compiled and exported graphs record.

The attention ops are the core every dense call runs through (and the launchers lay out their output with
``empty_output``); those names are importable from here.
"""
from fastattn._ops.attention import LO_SHIFT, attention_bwd, attention_fwd, empty_output, out_fp32  # noqa: F401
