"""Scaling benchmark of ring and all-to-all attention: world sizes 1, 2, 4 ... as local processes.

    python -m fastattn.distributed --bench                      # gloo processes on this machine
    python -m fastattn.distributed --bench --worlds 1,2 --seq 8192 --dtype bf16 --mode fwd
    python -m fastattn.distributed --bench --device cuda        # one GPU per rank, nccl

Strong scaling: one global problem (B, H, N, E), sharded over W ranks (zig-zag), so each rank holds N / W
positions. max(W) processes are spawned once (torch.multiprocessing, file:// rendezvous) and world W
runs on the sub-group of ranks 0..W-1. After ``warmup`` calls, every (strategy, world) takes one turn
per round, in rotating order (so background load on a shared machine hits them alike); in a turn the
ranks of that world run the call between barriers, each timing its own call, and the turn's time is
the slowest rank's (all_reduce MAX). We report the median round and the interquartile range, the
throughput of the GLOBAL problem (``fastattn.bench.attention_flops``: the visible pairs only, so causal
counts half) and the speedup over W = 1 (one process: the single-device kernel, no communication).
Each process runs ``threads`` intra-op threads: W * threads cores are busy, so on a machine with fewer
cores the larger worlds are oversubscribed (and the table says so).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@dataclass(frozen=True)
class Config:
    """Shape legend: B batch, H query heads, Hk key/value heads, N global sequence length, E head dim."""

    B: int = 1
    H: int = 8
    Hk: int = 8
    N: int = 4096
    E: int = 64
    dtype: str = "bf16"
    causal: bool = True
    dropout_p: float = 0.0                     # > 0: the exact, unfused global-coordinate dropout path
    mode: str = "fwd+bwd"                      # "fwd" | "fwd+bwd"
    strategies: tuple[str, ...] = ("ring", "a2a")
    threads: int = 1                           # intra-op threads per process
    warmup: int = 1
    rounds: int = 5
    device: str = "cpu"                        # "cpu" (gloo) | "cuda" (nccl, one GPU per rank)
    backend: str | None = None                 # fastattn backend (None: auto)
    timeout_s: float = 600.0

    def flops(self) -> float:
        try:
            from fastattn.bench import attention_flops
        except ImportError:  # the shared formula, inlined if fastattn.bench is unavailable
            def attention_flops(H, E, Ev, q_lens, k_lens, *, causal=False, mode="fwd"):
                pairs = sum(q * (q + 1) // 2 if causal else q * k for q, k in zip(q_lens, k_lens))
                return 2.0 * (E + Ev) * H * pairs * {"fwd": 1.0, "fwd+bwd": 3.5}[mode]
        return attention_flops(self.H, self.E, self.E, [self.N] * self.B, [self.N] * self.B,
                               causal=self.causal, mode=self.mode)


@dataclass
class Row:
    strategy: str
    world: int
    median_s: float
    iqr_s: float
    gflops: float
    speedup: float = float("nan")              # over world 1 of the same strategy
    oversubscribed: bool = False
    times_s: list[float] = field(default_factory=list)


def _worker(rank: int, nprocs: int, init_file: str, cfg: dict, worlds: list[int], out_file: str) -> None:
    import torch.distributed as dist

    from fastattn.distributed import all_to_all_attention, ring_attention

    c = Config(**{**cfg, "strategies": tuple(cfg["strategies"])})
    torch.set_num_threads(c.threads)
    dev = torch.device("cpu")
    if c.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if c.device == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=nprocs, timeout=timedelta(seconds=c.timeout_s))
    groups = {w: dist.new_group(list(range(w))) for w in worlds}  # every rank creates every group
    sync = (lambda: torch.cuda.synchronize()) if c.device == "cuda" else (lambda: None)  # noqa: E731
    dt = DTYPES[c.dtype]
    need = c.mode != "fwd"
    g = torch.Generator().manual_seed(rank)
    data = {}
    for w in worlds:
        if rank < w:
            mk = lambda h, L=c.N // w: torch.randn(c.B, h, L, c.E, generator=g).to(dev, dt)  # noqa: E731
            data[w] = [mk(c.H).requires_grad_(need), mk(c.Hk).requires_grad_(need), mk(c.Hk).requires_grad_(need),
                       mk(c.H)]
    fns = {"ring": ring_attention, "a2a": all_to_all_attention}

    def call(strategy, w):
        q, k, v, do = data[w]
        with torch.set_grad_enabled(need):
            out = fns[strategy](q, k, v, group=groups[w], is_causal=c.causal, enable_gqa=c.Hk != c.H,
                                backend=c.backend, dropout_p=c.dropout_p)
            if need:
                torch.autograd.grad(out, (q, k, v), do)
        sync()

    turns = [(s, w) for s in c.strategies for w in worlds]
    for _ in range(c.warmup):
        for s, w in turns:
            if rank < w:
                call(s, w)
    result = {s: {w: [] for w in worlds} for s in c.strategies}
    for r in range(c.rounds):
        # Every (strategy, world) takes one turn per round, in a rotating order, so background load on a
        # shared machine hits them alike; the ranks outside the turn's group wait at the barrier.
        for s, w in turns[r % len(turns):] + turns[: r % len(turns)]:
            dist.barrier()
            if rank < w:
                t0 = time.perf_counter()
                call(s, w)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=dev)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups[w])
                result[s][w].append(float(t))
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.barrier()  # nobody tears the transport down while a peer still uses it
    dist.destroy_process_group()


def run(cfg: Config, worlds=(1, 2, 4)) -> list[Row]:
    """One process per rank of the largest world; one Row per (strategy, world)."""
    import torch.multiprocessing as mp

    worlds = sorted(set(int(w) for w in worlds))
    for w in worlds:
        if cfg.N % (2 * w):
            raise ValueError(f"N={cfg.N} must be divisible by 2 * world = {2 * w} (zig-zag shards)")
        if "a2a" in cfg.strategies and cfg.H % w:
            raise ValueError(f"all-to-all needs H={cfg.H} divisible by world {w}")
    nprocs = max(worlds)
    ctx = mp.get_context("spawn")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        args = (nprocs, os.path.join(tmp, "rdzv"), asdict(cfg), worlds, out_file)
        procs = [ctx.Process(target=_worker, args=(r, *args), daemon=True) for r in range(nprocs)]
        for p in procs:
            p.start()
        end = time.monotonic() + cfg.timeout_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if any(p.exitcode != 0 for p in procs) or not os.path.exists(out_file):
            raise RuntimeError(f"benchmark processes failed: exit codes {[p.exitcode for p in procs]}")
        with open(out_file) as f:
            result = json.load(f)
    rows: list[Row] = []
    for strategy, per_world in result.items():
        for w in worlds:
            times = per_world[str(w)]
            q1, med, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
            rows.append(Row(strategy, w, med, q3 - q1, cfg.flops() / med / 1e9,
                            oversubscribed=cfg.device == "cpu" and w * cfg.threads > cores, times_s=times))
    for r in rows:
        base = next((b for b in rows if b.strategy == r.strategy and b.world == 1), None)
        if base is not None:
            r.speedup = base.median_s / r.median_s
    return rows


def table(cfg: Config, rows: list[Row]) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    drop = f" dropout {cfg.dropout_p}" if cfg.dropout_p else ""
    head = (f"{cfg.mode}, B={cfg.B} H={cfg.H} Hk={cfg.Hk} N={cfg.N} E={cfg.E} {cfg.dtype} "
            f"{'causal' if cfg.causal else 'full'}{drop}, {cfg.device} ({cores} cores), "
            f"{cfg.threads} thread(s)/rank, median of {cfg.rounds} (IQR)\n\n")
    lines = ["| strategy | world | time (ms) | IQR (ms) | GFLOP/s | speedup vs 1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        note = " (oversubscribed)" if r.oversubscribed else ""
        lines.append(f"| {r.strategy} | {r.world}{note} | {r.median_s * 1e3:.1f} | {r.iqr_s * 1e3:.1f} | "
                     f"{r.gflops:.1f} | {'-' if r.speedup != r.speedup else f'{r.speedup:.2f}x'} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastattn.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="run the scaling benchmark")
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default = heads)")
    p.add_argument("--seq", type=int, default=4096, help="GLOBAL sequence length N")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout_p (runs the unfused exact path)")
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--strategies", default="ring,a2a")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, choices=["cpu", "triton", "reference"])
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)
    if not a.bench:
        p.print_help()
        return 0
    cfg = Config(B=a.batch, H=a.heads, Hk=a.kv_heads or a.heads, N=a.seq, E=a.dim, dtype=a.dtype,
                 causal=not a.no_causal, dropout_p=a.dropout, mode=a.mode, strategies=tuple(a.strategies.split(",")),
                 threads=a.threads, warmup=a.warmup, rounds=a.rounds, device=a.device, backend=a.backend)
    rows = run(cfg, tuple(int(w) for w in a.worlds.split(",")))
    print(table(cfg, rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": asdict(cfg), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0
