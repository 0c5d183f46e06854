"""fastattn's Triton kernels (installed as ``fastattn.kernels``).

``attention``: the fused attention forward/backward kernels, their launchers and the tile-config table.
``aot``: ahead-of-time compilation report for sm_80 / sm_90 (``fastattn kernels``); needs no GPU.
Nothing is imported here, so ``import fastattn.kernels`` does not import Triton.
"""
