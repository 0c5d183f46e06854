"""How much three short SDPA calls slow down when other processes spin on the cores: fastattn calls only, no
torch op in between, so that one pool setting can be compared with another in separate runs.

    FASTATTN_POOL=own python examples/contend_rounds.py [--spinners 1] [--rounds 15] [--threads 2]
    FASTATTN_POOL=own FASTATTN_RESCUE=0 python examples/contend_rounds.py

Cases (B, H, L=S, E): 16 12 64 32 f32, 16 12 64 32 bf16, 8 12 128 64 f32. A round is the mean time per call over
``--ms`` milliseconds of back-to-back calls; the rounds go through the cases in turn, first quietly, then while
``--spinners`` processes spin. Printed per case: the median quiet and contended round and their ratio. The
environment picks what is measured (``FASTATTN_POOL``, ``FASTATTN_RESCUE``); alternate runs (ABBA) to compare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import _common
import fastattn
from fastattn.bench.contend import spinners

CASES = ((16, 12, 64, 32, torch.float32), (16, 12, 64, 32, torch.bfloat16), (8, 12, 128, 64, torch.float32))


def round_ms(args: tuple, ms: float) -> float:
    """Mean milliseconds per call over ``ms`` milliseconds of back-to-back calls."""
    n, start = 0, time.perf_counter()
    end = start + ms / 1e3
    while time.perf_counter() < end:
        fastattn.scaled_dot_product_attention(*args)
        n += 1
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spinners", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ms", type=float, default=40.0, help="length of a round")
    args = _common.parse_args(ap)
    inputs = [tuple(torch.randn(b, h, n, e, dtype=dt) for _ in range(3)) for b, h, n, e, dt in CASES]
    for x in inputs:
        fastattn.scaled_dot_product_attention(*x)  # warm-up
    times: dict[tuple[str, int], list[float]] = {}
    for phase, n in (("quiet", 0), ("busy", args.spinners)):
        with spinners(n):
            for _ in range(args.rounds):
                for i, x in enumerate(inputs):
                    times.setdefault((phase, i), []).append(round_ms(x, args.ms))
    setting = ", ".join(f"{k}={os.environ[k]}" for k in ("FASTATTN_POOL", "FASTATTN_RESCUE") if k in os.environ)
    print(f"{args.spinners} spinner(s), {torch.get_num_threads()} threads{', ' + setting if setting else ''}")
    for i, (b, h, n, e, dt) in enumerate(CASES):
        quiet = statistics.median(times[("quiet", i)])
        busy = statistics.median(times[("busy", i)])
        print(f"B{b} H{h} L{n} E{e} {str(dt)[6:]:8s}  quiet {quiet:.2f} ms  busy {busy:.2f} ms  {busy / quiet:.2f}x")


if __name__ == "__main__":
    main()
