"""Ahead-of-time compile report: every Triton attention kernel, in every tile configuration the
autotuner can pick (``CONFIGS``, kernels/configs.py), for sm_80 and sm_90, without a GPU.

For each (kernel, head-dim bucket, dtype, feature variant, config, arch) it runs
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` on the exact arguments the
launcher would pass for a representative problem, and reads back:

* registers per thread, stack frame and local memory from ``cuobjdump -res-usage`` on the cubin (the
  compiled metadata has no register count without a GPU); when the stack or local memory is not empty,
  the spill bytes from ``ptxas -v`` run with Triton's own flags;
* shared memory from the compiled kernel's metadata, against the limit (sm_80: 163 KiB, sm_90: 227 KiB);
* whether tensor-core instructions are in the PTX (``mma.sync``; ``wgmma`` on sm_90). fp32 is compiled
  with tf32 dots (``allow_tf32``); with ieee dots fp32 runs on the FMA units.

Each config is compiled in the feature variants it can run with, which bracket its register use:
``plain`` (no mask, no dropout, not causal: the hot path), ``causal-bool`` (causal with a full
(B, H, L, S) bool mask: the heaviest call without dropout or float masks) and, for rows usable with
every feature (``TileConfig.features == "all"``), ``full`` (causal, dropout and a float mask that needs
a gradient: full-shaped for the dQ kernel, which then stores dS, broadcast for the dmask kernel). The
causal offset (``causal_offset``: lower-right and shifted diagonals) is a runtime i32 the JIT never
specialises, so the causal variants, compiled with offset 0, are the code every offset runs.
fp16 / bf16 forward and preprocess kernels are compiled as training calls, storing / reading ``out_lo`` (the
output's rounding residual, kernels/attention_fwd.py): a few more registers in the epilogue than inference. The
first config of each bucket is also compiled as ``pad`` (causal with a (B, 1, 1, S) bool padding
mask: the key-range path that skips padded key blocks). ``decoder`` is ``causal-bool`` with every decoder
variant on (sliding window, soft-capping, ALiBi, sinks: kernels/_variants.py), compiled for every row;
``decoder-full`` is ``full`` with them, for the "all" rows and the dmask kernel. On request (``VARLEN_VARIANTS``) the first config
of each bucket is compiled as ``varlen`` (a packed batch read through cu_seqlens, causal with a full bool
mask) or ``varlen-full`` (plus dropout and a broadcast float mask that needs a gradient); some of those
cells still spill (kernels/README.md lists them).

Compilation runs in one worker process per core, spawned with TRITON_INTERPRET=0 so the report also
works from an interpreted test session; Triton's on-disk cache makes reruns faster.

``compile_kernel`` and ``resources`` are the compile-and-measure steps the additive and hard-attention
reports (``additive.compile_check``, ``hard.aot_report``) share with this one.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
VARIANTS = ("plain", "causal-bool", "full", "pad", "decoder", "decoder-full")
# Packed (varlen) batches, compiled on request (variants=VARIANTS + VARLEN_VARIANTS): not yet spill-free in
# every cell (kernels/README.md), so they are kept out of the default report until they are.
VARLEN_VARIANTS = ("varlen", "varlen-full")


def _attention():
    # Imported lazily: the kernels must be decorated with TRITON_INTERPRET unset (see _init_worker).
    return importlib.import_module(f"{__package__ or 'fastattn.kernels'}.attention")


def _variants(kernel: str, cfg, index: int, variants) -> list[str]:
    if kernel == "bwd_preprocess":
        want = ["plain"] + (["varlen"] if index == 0 else [])  # no features
    elif kernel == "bwd_dmask":
        want = ["full", "decoder-full"] + (["varlen-full"] if index == 0 else [])  # float masks that need a gradient
    else:
        want = ["plain", "causal-bool", "decoder"] + (["full", "decoder-full"] if cfg.features == "all" else [])
        if index == 0:
            want.append("pad")  # the key-range (padding mask) path, compiled once per bucket
            want.append("varlen-full" if cfg.features == "all" else "varlen")  # packed batches
    if not cfg.decoder:  # a row the autotuner never picks for the decoder variants
        want = [v for v in want if not v.startswith("decoder")]
    return [v for v in want if v in variants]


def jobs(archs=(80, 90), dtypes=("fp16", "bf16"), *, kernels=None, buckets=None, variants=VARIANTS,
         max_configs: int | None = None) -> list[tuple]:
    """The (kernel, bucket, dtype, variant, config index, arch) tuples of a report, from the config table."""
    A = _attention()  # reading the table works even where the kernels were decorated for the interpreter
    out = []
    for dtype in dtypes:
        dclass = "32" if dtype == "fp32" else "16"
        for bucket in buckets or A.HEAD_BUCKETS:
            for kernel in kernels or A.KERNELS:
                rows = A.CONFIGS[kernel][(bucket, dclass)]
                for i, cfg in enumerate(rows[:max_configs] if max_configs else rows):
                    for variant in _variants(kernel, cfg, i, variants):
                        for arch in archs:
                            out.append((kernel, bucket, dtype, variant, i, arch))
    return out


def _representative_plan(A, bucket: int, dtype: str, variant: str) -> dict:
    """The launcher's own launch plan (kernel arguments) for a small problem with head dim ``bucket``:
    BSHD-strided q/k/v/out (what a transformer passes), GQA 4 -> 2 heads, contiguous gradients."""
    import torch
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    B, H, Hk, L, S, E = 2, 4, 2, 128, 128, bucket

    def bshd(h, n, e):
        return torch.empty(B, n, h, e, dtype=dt).transpose(1, 2)

    def lo_like(out):  # training: fp16 / bf16 forwards also store out_lo (in out's strides)
        return None if dt == torch.float32 else torch.empty_strided(out.shape, out.stride(), dtype=torch.int16)

    def plan(mask, mask_grad, sinks=None, **kw):
        q, k, v, dout, out = bshd(H, L, E), bshd(Hk, S, E), bshd(Hk, S, E), bshd(H, L, E), bshd(H, L, E)
        lse = torch.empty(B, H, L, dtype=torch.float32)
        kw = dict(scale=E ** -0.5, seed=1234, out_lo=lo_like(out), **kw)
        dmask = torch.zeros_like(mask) if mask_grad else None
        launches = A._fwd_plan(q, k, v, mask, out, lse, sinks=sinks, **kw)
        launches += A._bwd_plan(dout, q, k, v, out, lse, mask, torch.empty_like(q), torch.empty_like(k),
                                torch.empty_like(v), dmask, torch.empty_like(lse), **kw)
        return {launch.name: launch for launch in launches}

    # Every decoder variant on (what a gpt-oss / Gemma 2 layer passes): per-head ALiBi slopes as the op passes
    # them (a stride-0 expand over the batch).
    decoder = dict(window=(64, 0), softcap=30.0, alibi_slopes=torch.zeros(H).expand(B, H), sinks=torch.zeros(H))

    if variant in ("varlen", "varlen-full"):
        # Packed (total, H, E) tensors, B sequences of at most L / S tokens read through cu_seqlens.
        vl = A._Varlen(torch.zeros(B + 1, dtype=torch.int32), torch.zeros(B + 1, dtype=torch.int32), B, L, S)

        def packed(h, e):
            return torch.empty(B * L, h, e, dtype=dt)
        q, k, v, dout, out = packed(H, E), packed(Hk, E), packed(Hk, E), packed(H, E), packed(H, E)
        lse = torch.empty(H, B * L, dtype=torch.float32)
        heavy = variant == "varlen-full"
        kw = dict(scale=E ** -0.5, seed=1234, is_causal=True, dropout_p=0.1 if heavy else 0.0, vl=vl,
                  out_lo=lo_like(out))
        mask = torch.zeros(1 if heavy else B, H, L, S, dtype=dt if heavy else torch.bool)
        dmask = torch.zeros_like(mask) if heavy else None
        launches = A._fwd_plan(q, k, v, mask, out, lse, **kw)
        launches += A._bwd_plan(dout, q, k, v, out, lse, mask, torch.empty_like(q), torch.empty_like(k),
                                torch.empty_like(v), dmask, torch.empty_like(lse), **kw)
        return {launch.name: launch for launch in launches}
    if variant == "plain":
        return plan(None, False, is_causal=False, dropout_p=0.0)
    if variant == "causal-bool":
        return plan(torch.ones(B, H, L, S, dtype=torch.bool), False, is_causal=True, dropout_p=0.0)
    if variant == "pad":
        return plan(torch.ones(B, 1, 1, S, dtype=torch.bool), False, is_causal=True, dropout_p=0.0)
    if variant == "full":
        full = plan(torch.zeros(B, H, L, S, dtype=dt), True, is_causal=True, dropout_p=0.1)
        bias = plan(torch.zeros(1, H, L, S, dtype=dt), True, is_causal=True, dropout_p=0.1)
        return {**full, "bwd_dmask": bias["bwd_dmask"]}
    if variant == "decoder":
        return plan(torch.ones(B, H, L, S, dtype=torch.bool), False, is_causal=True, dropout_p=0.0, **decoder)
    if variant == "decoder-full":
        full = plan(torch.zeros(B, H, L, S, dtype=dt), True, is_causal=True, dropout_p=0.1, **decoder)
        bias = plan(torch.zeros(1, H, L, S, dtype=dt), True, is_causal=True, dropout_p=0.1, **decoder)
        return {**full, "bwd_dmask": bias["bwd_dmask"]}
    raise ValueError(f"unknown variant {variant!r}")


def _signature(fn, args: dict):
    """(signature, constexprs, attrs) exactly as the JIT would specialise ``fn`` for ``args``."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = args[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        if ty == "constexpr":  # ints equal to 1, None
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        signature[p.name] = ty
        if spec and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, stack bytes) of the cubin's kernel, from cuobjdump -res-usage. Spilled
    registers show up as a stack frame (or local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        txt = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", txt)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{txt}")
    return int(m.group(1)), int(m.group(3)), int(m.group(2))


def _ptxas_spills(ptx: str, arch: int) -> int:
    """Spill store + load bytes that ptxas -v reports, assembling the PTX with the flags Triton uses
    (run only when the cubin has a stack frame or local memory)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    if r.returncode or not found:
        raise RuntimeError(f"ptxas -v failed or printed no spill line:\n{r.stderr[-2000:]}")
    return sum(int(a) + int(b) for a, b in found)


def compile_kernel(fn, args: dict, arch: int, num_warps: int, num_stages: int):
    """``triton.compile`` of the jit function ``fn`` for sm_``arch``, specialised for ``args`` (every parameter,
    constexprs included) exactly as the JIT would specialise that launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    signature, constexprs, attrs = _signature(fn, args)
    return triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled, arch: int) -> dict:
    """registers (per thread), local_bytes (stack frame + local memory), spill_bytes (0 unless local_bytes) and
    shared (bytes) of a compiled kernel."""
    regs, local, stack = _resource_usage(compiled.asm["cubin"])
    return dict(registers=regs, local_bytes=local + stack, shared=int(compiled.metadata.shared),
                spill_bytes=_ptxas_spills(compiled.asm["ptx"], arch) if local + stack else 0)


def _init_worker() -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@contextlib.contextmanager
def _compiled_env():
    """TRITON_INTERPRET=0 in this process's environment while the pool spawns its workers: a worker imports
    fastattn (to unpickle its job) before its initializer runs, and that import can already import Triton
    (torch's dynamo does), which fixes the interpreter mode for the worker's lifetime."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def compile_one(kernel: str, bucket: int, dtype: str, variant: str, config_index: int, arch: int) -> dict:
    """Compile one kernel configuration for ``arch`` and measure it (runs in a worker process)."""
    A = _attention()
    dclass = "32" if dtype == "fp32" else "16"
    cfg = A.CONFIGS[kernel][(bucket, dclass)][config_index]
    row = dict(kernel=kernel, head_dim=bucket, dtype=dtype, variant=variant, config=str(cfg),
               config_index=config_index, features=cfg.features, arch=arch,
               registers=None, spill_bytes=None, local_bytes=None, shared=None,
               shared_limit=SMEM_LIMIT.get(arch), tensor_cores=None, compile_s=None, error=None)
    t0 = time.perf_counter()
    try:
        plan = _representative_plan(A, bucket, dtype, variant)
        args = dict(plan[kernel].args)
        if dtype == "fp32" and "DOT_PRECISION" in args:
            args["DOT_PRECISION"] = "tf32"  # the tensor-core path (allow_tf32); ieee runs on FMA units
        args.update(cfg.kwargs())
        ck = compile_kernel(A.KERNELS[kernel], args, arch, cfg.num_warps, cfg.num_stages)
        ptx = ck.asm["ptx"]
        if "wgmma.mma_async" in ptx:
            tc = "wgmma"
        elif re.search(r"\bmma\.sync", ptx):
            tc = "mma"
        else:
            tc = "none"
        row.update(**resources(ck, arch), tensor_cores=tc)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["problems"] = _problems(row)
    row["ok"] = not row["problems"]
    return row


def _problems(row: dict) -> list[str]:
    if row["error"]:
        return [row["error"]]
    out = []
    if row["spill_bytes"] or row["local_bytes"]:
        out.append(f"spills {row['spill_bytes']} B (stack/local {row['local_bytes']} B)")
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B > {row['shared_limit']} B")
    if row["tensor_cores"] == "none" and row["kernel"] != "bwd_preprocess":
        out.append("no tensor-core instructions")
    return out


def compile_report(archs=(80, 90), dtypes=("fp16", "bf16"), *, kernels=None, buckets=None,
                   variants=VARIANTS, max_configs: int | None = None, workers: int | None = None,
                   progress=None) -> list[dict]:
    """Compile every kernel in every configuration the autotuner can pick (each head-dim bucket,
    dtype and feature variant) for each arch. One dict per compile: kernel, head_dim, dtype, variant,
    config, config_index, features, arch, registers, spill_bytes, local_bytes (stack frame + local
    memory), shared, shared_limit, tensor_cores ("mma" / "wgmma" / "none"), compile_s, error,
    problems (list of str), ok. ``kernels`` / ``buckets`` / ``variants`` / ``max_configs`` select a
    subset (tests); ``progress(row, done, total)`` is called as rows arrive."""
    todo = jobs(archs, dtypes, kernels=kernels, buckets=buckets, variants=variants, max_configs=max_configs)
    if not todo:
        return []
    workers = workers or max(1, min(os.cpu_count() or 1, len(todo)))
    rows = []
    with _compiled_env(), cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                                 initializer=_init_worker) as pool:
        for f in cf.as_completed([pool.submit(compile_one, *j) for j in todo]):
            rows.append(f.result())
            if progress:
                progress(rows[-1], len(rows), len(todo))
    order = {j: i for i, j in enumerate(todo)}
    rows.sort(key=lambda r: order[(r["kernel"], r["head_dim"], r["dtype"], r["variant"], r["config_index"],
                                   r["arch"])])
    return rows


def format_table(rows: list[dict]) -> str:
    """The report as a text table (one line per compile)."""
    head = (f"{'kernel':14} {'E':>3} {'dtype':5} {'config':13} {'rows':4} {'variant':12} {'arch':5} "
            f"{'regs':>4} {'spill':>5} {'smem KiB':>10} {'tensor':>6} {'time':>6}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        smem = f"{r['shared'] / 1024:.1f}/{r['shared_limit'] // 1024}" if r["shared"] is not None else "-"
        na = lambda x: "-" if x is None else x  # noqa: E731
        lines.append(f"{r['kernel']:14} {r['head_dim']:>3} {r['dtype']:5} {r['config']:13} {r['features']:4} "
                     f"{r['variant']:12} sm_{r['arch']:<2} {na(r['registers']):>4} {na(r['spill_bytes']):>5} "
                     f"{smem:>10} {na(r['tensor_cores']):>6} {r['compile_s']:>5.1f}s  "
                     f"{'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['problems'])}")
    return "\n".join(lines)


def main(archs=(80, 90), dtypes=DTYPES) -> int:
    """Print the report for every kernel, config, head-dim bucket, dtype and feature variant (the
    `fastattn kernels` command); exit status 1 if any configuration fails to compile, spills
    registers, overflows shared memory or misses the tensor cores."""
    t0 = time.perf_counter()
    total = len(jobs(archs, dtypes)) + len(decode_jobs(archs, dtypes))
    print(f"compiling {total} kernel configurations for {', '.join(f'sm_{a}' for a in archs)} "
          f"({', '.join(dtypes)}) in {os.cpu_count()} processes; Triton's cache makes reruns fast ...",
          file=sys.stderr, flush=True)

    def progress(row, done, total):
        if done % 25 == 0 or done == total:
            print(f"  {done}/{total}", file=sys.stderr, flush=True)

    rows = compile_report(archs, dtypes, progress=progress) + decode_report(archs, dtypes, progress=progress)
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} ok, {len(bad)} failed ({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------
# Decode kernels (kernels/decode.py): each (kernel, head bucket, dtype, variant, row block) case its launcher
# can pick (``decode.aot_cases``), compiled from the launcher's own plan (``decode.aot_launch``).
# ----------------------------------------------------------------------------------------------------
def decode_jobs(archs=(80, 90), dtypes=DTYPES) -> list[tuple]:
    D = importlib.import_module(f"{__package__ or 'fastattn.kernels'}.decode")
    return [(*case, arch) for case in D.aot_cases(dtypes) for arch in archs]


def compile_decode_one(kernel: str, bucket: int, dtype: str, variant: str, block_m: int, arch: int) -> dict:
    """Compile one decode case for ``arch`` and measure it (runs in a worker process): a row of the report,
    ``features`` naming the row block. The merge kernel has no dot, so no tensor cores are expected of it."""
    D = importlib.import_module(f"{__package__ or 'fastattn.kernels'}.decode")
    row = dict(kernel=kernel, head_dim=bucket, dtype=dtype, variant=variant, config="-", config_index=0,
               features=f"m{block_m}", arch=arch, registers=None, spill_bytes=None, local_bytes=None, shared=None,
               shared_limit=SMEM_LIMIT.get(arch), tensor_cores=None, compile_s=None, error=None)
    t0 = time.perf_counter()
    try:
        fn, args, cfg = D.aot_launch(kernel, bucket, dtype, variant, block_m)
        row["config"] = str(cfg)
        ck = compile_kernel(fn, args, arch, cfg.num_warps, cfg.num_stages)
        ptx = ck.asm["ptx"]
        tc = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
        row.update(**resources(ck, arch), tensor_cores=tc)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    row["problems"] = [p for p in _problems(row) if not (kernel == "decode_merge" and p.startswith("no tensor"))]
    row["ok"] = not row["problems"]
    return row


def decode_report(archs=(80, 90), dtypes=DTYPES, *, workers: int | None = None, progress=None) -> list[dict]:
    """Rows (as ``compile_report``'s) of every decode case, in ``decode_jobs`` order."""
    todo = decode_jobs(archs, dtypes)
    workers = workers or max(1, min(os.cpu_count() or 1, len(todo)))
    with _compiled_env(), cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                                 initializer=_init_worker) as pool:
        futures = [pool.submit(compile_decode_one, *j) for j in todo]
        for done, f in enumerate(cf.as_completed(futures), 1):
            if progress:
                progress(f.result(), done, len(todo))
        return [f.result() for f in futures]


if __name__ == "__main__":
    sys.exit(main())
