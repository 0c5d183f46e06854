"""fastattn.distributed (ring and all-to-all attention) in 2 and 4 gloo processes against one process.

Each world size spawns its processes once (torch.multiprocessing, file:// rendezvous, 60 s collective
timeouts, a hard deadline on the join) and runs every case there; each case becomes one test here.
Every rank builds the same global tensors, attends over its shard, backpropagates its shard of a fixed
output gradient, and checks its shard of the output and of dq/dk/dv against the float64 reference of the
gathered sequence (fastattn.testing's tolerance policy), and, for the fused backend in fp32, against
single-process ``fastattn.scaled_dot_product_attention`` as well.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta

import pytest
import torch

from fastattn import _launchers, reference
from fastattn.distributed import _layout, shard_sequence, unshard_sequence
from fastattn.distributed.ulysses import kv_head_repeat
from fastattn.testing import assert_close

WORLDS = [2, 4]
DEADLINE_S = 420  # whole spawn, every case; a hang fails the tests instead of blocking CI
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64}


@dataclass(frozen=True)
class Case:
    strategy: str            # "ring" | "a2a"
    dtype: str = "f32"
    B: int = 2
    H: int = 4
    Hk: int = 4
    C: int = 5               # chunk length: the global length is N = 2 * world * C
    E: int = 24
    Ev: int = 16
    causal: bool = True
    mask: str = "none"       # none | pad (bool (B,1,1,N), fully masked rows under causal) | float (1,H,N,N)
    dropout: float = 0.0
    zigzag: bool = True
    bshd: bool = False       # shards are (B, L, H, E) buffers viewed as (B, H, L, E)
    backend: str = "cpu"

    @property
    def id(self) -> str:
        s = f"{self.strategy}-{self.dtype}-B{self.B}-H{self.H}"
        s += f"-Hk{self.Hk}" if self.Hk != self.H else ""
        s += f"-C{self.C}-E{self.E}-Ev{self.Ev}-{'causal' if self.causal else 'full'}"
        s += f"-{self.mask}" if self.mask != "none" else ""
        s += f"-drop{self.dropout}" if self.dropout else ""
        s += "" if self.zigzag else "-contig"
        s += "-bshd" if self.bshd else ""
        s += f"-{self.backend}" if self.backend != "cpu" else ""
        return s


def _cases() -> list[Case]:
    cases = []
    for strategy in ("ring", "a2a"):
        for dtype in ("f32", "bf16"):
            for causal in (True, False):
                cases.append(Case(strategy, dtype, causal=causal))
        cases += [
            Case(strategy, Hk=2),                                   # GQA (a2a at W=4: repeats kv heads)
            Case(strategy, "bf16", H=4, Hk=1),                      # MQA
            Case(strategy, zigzag=False),                           # contiguous shards, causal
            Case(strategy, mask="pad"),
            Case(strategy, causal=False, mask="float"),
            Case(strategy, "bf16", mask="pad"),
            Case(strategy, C=1, E=8, Ev=8),                         # one position per chunk
            Case(strategy, C=37, E=40, Ev=40),                      # blocks longer than a kernel tile
            Case(strategy, "bf16", C=37, E=64, Ev=64, B=1),
            Case(strategy, dropout=0.25),                           # global-coordinate Philox (torch path)
            Case(strategy, dropout=0.25, causal=False, mask="pad", Hk=2),
            Case(strategy, "f64", mask="pad", backend="reference"),  # exact merge: float64 tolerance
            Case(strategy, "f64", Hk=2, zigzag=False, backend="reference"),
            Case(strategy, backend="reference", mask="float"),
            Case(strategy, bshd=True),
        ]
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------- one case
def _inputs(case: Case, N: int):
    g = torch.Generator().manual_seed(1234)
    dt = DTYPES[case.dtype]
    q = torch.randn(case.B, case.H, N, case.E, generator=g).to(dt)
    k = torch.randn(case.B, case.Hk, N, case.E, generator=g).to(dt)
    v = torch.randn(case.B, case.Hk, N, case.Ev, generator=g).to(dt)
    do = torch.randn(case.B, case.H, N, case.Ev, generator=g).to(dt)
    mask = None
    if case.mask == "pad":  # keys padded at both ends; batch 1 hides its first keys: empty causal rows
        mask = torch.ones(case.B, 1, 1, N, dtype=torch.bool)
        mask[0, ..., N - N // 3:] = False
        mask[-1, ..., : max(1, N // 5)] = False
    elif case.mask == "float":
        mask = torch.randn(1, case.H, N, N, generator=g).to(dt)
        mask = mask.masked_fill(torch.rand(1, case.H, N, N, generator=g) > 0.7, float("-inf"))
        mask[0, 0, 1] = float("-inf")  # a row the float mask hides entirely
    return q, k, v, do, mask


def _local(x: torch.Tensor, rank: int, world: int, case: Case) -> torch.Tensor:
    s = shard_sequence(x, rank, world, zigzag=case.zigzag)
    if case.bshd:
        s = s.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, E) memory, (B, H, L, E) view
    return s.detach().requires_grad_()


def _run_case(case: Case, rank: int, world: int):
    """The distributed computation (every collective of the case); returns a function that checks it."""
    from fastattn.distributed import all_to_all_attention, gather_sequence, ring_attention

    N = 2 * world * case.C
    q, k, v, do, mask = _inputs(case, N)
    gqa = case.Hk != case.H
    shard = lambda x: shard_sequence(x, rank, world, zigzag=case.zigzag)  # noqa: E731
    ql, kl, vl = (_local(x, rank, world, case) for x in (q, k, v))

    torch.manual_seed(7)  # dropout draws its seed from torch's generator, as the single-process op does
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if case.dropout else None
    # Only rank 0's generator matters (its seed is broadcast): the other ranks start elsewhere.
    torch.manual_seed(7 if rank == 0 else 1000 + rank)
    kw = dict(is_causal=case.causal, attn_mask=mask, dropout_p=case.dropout, enable_gqa=gqa,
              zigzag=case.zigzag, backend=case.backend)
    lse = None
    if case.strategy == "ring":
        out, lse = ring_attention(ql, kl, vl, return_lse=True, **kw)
    else:
        out = all_to_all_attention(ql, kl, vl, **kw)
    grads = torch.autograd.grad(out, (ql, kl, vl), shard(do))
    gathered = gather_sequence(out, zigzag=case.zigzag)
    return lambda: _check_case(case, rank, world, q, k, v, do, mask, seed, out, lse, grads, gathered, ql)


def _check_case(case: Case, rank, world, q, k, v, do, mask, seed, out, lse, grads, gathered, ql) -> None:
    """Local only (no collective), so a failed check leaves the ranks in step for the next case."""
    import fastattn

    gqa = case.Hk != case.H
    shard = lambda x: shard_sequence(x, rank, world, zigzag=case.zigzag)  # noqa: E731
    ref_args = (mask, case.dropout, case.causal, None, gqa)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    ref64, lse64 = reference.scaled_dot_product_attention(qg, kg, vg, *ref_args, upcast=True, dropout_seed=seed,
                                                          return_lse=True)
    g64 = torch.autograd.grad(ref64, (qg, kg, vg), do.double())
    reflp = reference.scaled_dot_product_attention(qg, kg, vg, *ref_args, upcast=False, dropout_seed=seed)
    glp = torch.autograd.grad(reflp, (qg, kg, vg), do)

    assert out.shape == ql.shape[:-1] + (case.Ev,) and out.dtype == ql.dtype
    assert_close(f"rank {rank} out", out, shard(ref64), shard(reflp))
    assert_close("gathered out", gathered, ref64, reflp)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), grads, g64, glp):
        assert_close(f"rank {rank} {name}", got, shard(r64), shard(rlp), backward=True)
    if lse is not None:
        ref_lse = shard(lse64.unsqueeze(-1)).squeeze(-1)
        assert lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), f"rank {rank}: -inf lse rows differ"
        fin = torch.isfinite(ref_lse)
        err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
        assert err <= 2e-5 * max(1.0, ref_lse[fin].abs().max().item()) * (50 if case.dtype == "bf16" else 1), \
            f"rank {rank} lse: max error {err:.3e}"

    if case.backend != "reference" and case.dtype == "f32":
        # The acceptance test of the issue: the same numbers as one process on the gathered sequence.
        torch.manual_seed(7)
        sp = fastattn.scaled_dot_product_attention(qg, kg, vg, mask, case.dropout, case.causal, None, gqa,
                                                   backend=case.backend)
        gsp = torch.autograd.grad(sp, (qg, kg, vg), do)
        assert_close(f"rank {rank} out vs single process", out, shard(sp.detach()))
        for name, got, ref in zip(("dq", "dk", "dv"), grads, gsp):
            assert_close(f"rank {rank} {name} vs single process", got, shard(ref), backward=True)


def _dump(results: dict, out_dir: str, rank: int) -> None:
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _worker(rank: int, world: int, init_file: str, cases: list[dict], out_dir: str, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    try:
        for d in cases:
            case = Case(**d)
            t0 = time.perf_counter()
            try:
                check = _run_case(case, rank, world)
            except Exception:  # noqa: BLE001
                # Failed inside the collectives: pending messages may be unmatched, so the group cannot be
                # trusted for the next case. Stop here; our exit makes the peers fail fast too.
                results[case.id] = ["failed during the distributed calls (later cases not run):\n"
                                    + traceback.format_exc(limit=8), time.perf_counter() - t0]
                _dump(results, out_dir, rank)
                return
            try:
                check()
                results[case.id] = ["ok", time.perf_counter() - t0]
            except Exception:  # noqa: BLE001 - report every failure to the parent
                results[case.id] = [traceback.format_exc(limit=6), time.perf_counter() - t0]
            _dump(results, out_dir, rank)
        dist.barrier()  # nobody tears the transport down while a peer still uses it
    finally:
        dist.destroy_process_group()


def spawn(world: int, cases: list[Case], *, threads: int = 1, deadline_s: float = DEADLINE_S):
    """Run ``cases`` in ``world`` gloo processes; {case id: [(status, seconds) per rank]}, exit codes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, [asdict(c) for c in cases], tmp, threads),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        codes = []
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
            codes.append(p.exitcode)
        per_rank = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.json")
            per_rank.append(json.load(open(path)) if os.path.exists(path) else {})
    results = {c.id: [pr.get(c.id, ["not run (an earlier case failed, or the rank died or timed out)", 0.0])
                      for pr in per_rank] for c in cases}
    return results, codes


_RESULTS: dict[int, tuple[dict, list]] = {}


def _needs(case: Case) -> str | None:
    if case.backend == "cpu":
        ok, why = _launchers.cpu_available()
        if not ok:
            return why
    return None


def _results(world: int):
    if world not in _RESULTS:
        _RESULTS[world] = spawn(world, [c for c in CASES if _needs(c) is None])
    return _RESULTS[world]


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.slow  # spawns process groups of every size in WORLDS, each running every case
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"W{w}")
def test_matches_single_process(world, case):
    why = _needs(case)
    if why:
        pytest.skip(why)
    results, codes = _results(world)
    per_rank = results[case.id]
    bad = [f"rank {r}: {status}" for r, (status, _) in enumerate(per_rank) if status != "ok"]
    assert not bad, "\n".join(bad)
    assert codes == [0] * world, f"exit codes {codes}"


# ------------------------------------------------------------------------------ layout (no processes)
@pytest.mark.parametrize("zigzag", [True, False], ids=["zigzag", "contig"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_roundtrip(world, zigzag):
    x = torch.arange(2 * 3 * 24 * 2).view(2, 3, 24, 2)
    shards = [shard_sequence(x, r, world, zigzag=zigzag) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, zigzag=zigzag), x)
    for r, s in enumerate(shards):
        pos = _layout.positions(_layout.runs(r, world, 24 // world, zigzag))
        assert torch.equal(s, x[:, :, pos])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zigzag_plan_balances_causal_work(world):
    """Every rank computes the same number of (query, key) pairs, and exactly the causal ones."""
    C = 3
    L = 2 * C
    n = 2 * world * C
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    work = []
    for rank in range(world):
        seen = torch.zeros(n, n, dtype=torch.bool)
        pairs = 0
        rows_all = _layout.positions(_layout.runs(rank, world, L, True))
        for src in range(world):
            blk = _layout.block_plan(rank, src, world, L, True, True)
            if blk is None:
                continue
            rows = rows_all[blk.rows]
            cols = _layout.positions(_layout.runs(src, world, L, True))[blk.cols]
            vis = torch.ones(len(rows), len(cols), dtype=torch.bool)
            if blk.causal:  # top-left causal inside the block
                vis = vis.tril()
            assert not (seen[rows.view(-1, 1), cols.view(1, -1)] & vis).any(), "a pair computed twice"
            seen[rows.view(-1, 1), cols.view(1, -1)] |= vis
            pairs += int(vis.sum())
        assert torch.equal(seen[rows_all], causal[rows_all]), f"rank {rank} misses or adds pairs"
        work.append(pairs)
    assert len(set(work)) == 1 or world == 1, work


def test_kv_head_repeat():
    assert kv_head_repeat(8, 8, 4) == 1
    assert kv_head_repeat(8, 2, 4) == 2
    assert kv_head_repeat(8, 1, 4) == 4
    assert kv_head_repeat(12, 6, 4) == 2


def test_errors_without_process_group():
    from fastattn.distributed import ring_attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)


# ------------------------------------------------------------------ one-rank group, in this process
@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    init = tmp_path_factory.mktemp("dist") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ring", "a2a"])
def test_one_rank_is_the_single_process_op(one_rank_group, strategy):
    """World 1: no communication, one block, the reference backend's torch path vs float64."""
    from fastattn.distributed import all_to_all_attention, ring_attention

    fn = ring_attention if strategy == "ring" else all_to_all_attention
    q, k, v, do, mask = _inputs(Case(strategy, mask="pad"), 10)
    ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(ql, kl, vl, is_causal=True, attn_mask=mask, backend="reference")
    grads = torch.autograd.grad(out, (ql, kl, vl), do)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    ref = reference.scaled_dot_product_attention(qg, kg, vg, mask, 0.0, True, upcast=True)
    for name, got, r in zip(("out", "dq", "dk", "dv"), (out, *grads),
                            (ref, *torch.autograd.grad(ref, (qg, kg, vg), do.double()))):
        assert_close(name, got, r, backward=name != "out")


@pytest.mark.parametrize("strategy", ["ring", "a2a"])
def test_empty_and_degenerate_shapes(one_rank_group, strategy):
    from fastattn.distributed import all_to_all_attention, ring_attention

    fn = ring_attention if strategy == "ring" else all_to_all_attention
    for shape in [(2, 3, 0, 8), (0, 3, 4, 8)]:
        q = torch.randn(*shape, requires_grad=True)
        out = fn(q, q, q, is_causal=True, backend="reference")
        assert out.shape == shape
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.equal(g, torch.zeros_like(q))


def test_argument_errors(one_rank_group):
    from fastattn.distributed import all_to_all_attention, ring_attention

    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="4-D local shards"):
        ring_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="even"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5])
    ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], zigzag=False, backend="reference")  # contiguous: fine
    with pytest.raises(ValueError, match="same positions"):
        ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="enable_gqa"):
        all_to_all_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="does not broadcast"):
        ring_attention(q, q, q, attn_mask=torch.ones(1, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        ring_attention(q, q, q, attn_mask=torch.zeros(1, 1, 1, 6, requires_grad=True))
    with pytest.raises(ValueError, match="dropout_p"):
        ring_attention(q, q, q, dropout_p=1.5)


def test_global_coordinate_dropout_mask_is_a_window_of_the_single_process_one():
    from fastattn import _philox
    from fastattn.distributed._blocks import keep_mask

    B, H, L, S, p, seed = 2, 6, 19, 23, 0.3, 2**40 + 12345
    full = _philox.dropout_keep_mask(seed, B, H, L, S, p)
    rows = _layout.positions(((3, 5), (14, 4)))
    cols = _layout.positions(((1, 7), (17, 6)))
    got = keep_mask(seed, B, 2, 3, rows, cols, p)  # query heads 3, 4
    assert torch.equal(got, full[:, 3:5][:, :, rows][:, :, :, cols])
