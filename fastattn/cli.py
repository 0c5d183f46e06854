"""The ``fastattn`` command: ``info``, ``check``, ``kernels``, ``bench`` and ``explain``."""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch


def _info() -> int:
    from fastattn import __version__, _launchers

    print(f"fastattn {__version__}")
    print(f"python   {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "not installed"
    print(f"triton   {tv}  (TRITON_INTERPRET={'1' if _launchers.triton_interpreting() else '0'})")
    ok, why = _launchers.cpu_available()
    if ok:
        from fastattn import _C, _cpu
        feats = ", ".join(k for k, v in sorted(_C.cpu_features().items()) if v) or "none"
        print(f"cpu      backend available; ISA module: {_cpu.isa_name()}  (CPU reports: {feats})")
        pool = _cpu.module().pool()
        team = "torch's OpenMP team" if pool == "openmp" else "fastattn's own pool"
        print(f"         threads: {team} (FASTATTN_POOL=own forces the own pool)")
    else:
        print(f"cpu      unavailable: {why}")
    cuda = torch.cuda.is_available()
    tok, twhy = _launchers.triton_available()
    if cuda and tok:
        print(f"triton   backend available on {torch.cuda.get_device_name()}")
    elif tok and _launchers.triton_interpreting():
        print("triton   backend available through the interpreter (CPU tensors)")
    else:
        print(f"triton   backend unavailable: {twhy or 'no CUDA device (set TRITON_INTERPRET=1 to interpret)'}")
    print("backends " + ", ".join(available_backends()))
    return 0


def available_backends() -> list[str]:
    from fastattn import _launchers
    out = []
    if _launchers.cpu_available()[0]:
        out.append("cpu")
    if _launchers.triton_available()[0] and (torch.cuda.is_available() or _launchers.triton_interpreting()):
        out.append("triton")
    out.append("reference")
    return out


def _battery():
    """(name, kwargs-builder) cases: a fixed, small but awkward set."""
    def case(B, H, Hk, L, S, E, Ev, dtype, mask=None, causal=False, dropout=0.0):
        def build(device):
            g = torch.Generator().manual_seed(L * 131 + S * 7 + E)
            r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
            q, k, v = r(B, H, L, E), r(B, Hk, S, E), r(B, Hk, S, Ev)
            m = None
            if mask == "pad":
                lens = torch.randint(1, S + 1, (B,), generator=g)
                m = (torch.arange(S)[None] < lens[:, None]).view(B, 1, 1, S).to(device)
            elif mask == "float":
                m = r(1, H, L, S)
            return dict(query=q, key=k, value=v, attn_mask=m, is_causal=causal, dropout_p=dropout,
                        enable_gqa=Hk != H)
        dt = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
        name = f"B{B}-H{H}{'' if Hk == H else f'/{Hk}'}-L{L}-S{S}-E{E}{'' if Ev == E else f'/{Ev}'}-{dt}"
        name += ("-" + mask if mask else "") + ("-causal" if causal else "") + (f"-drop{dropout}" if dropout else "")
        return name, build
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases += [
            case(2, 4, 4, 64, 64, 64, 64, dtype),
            case(2, 3, 3, 97, 130, 40, 40, dtype, mask="pad"),
            case(1, 4, 2, 33, 33, 111, 80, dtype, causal=True),
            case(2, 2, 2, 17, 29, 96, 96, dtype, mask="float", causal=True),
            case(1, 2, 2, 7, 257, 128, 128, dtype),
        ]
    return cases


def _check(backends: list[str] | None) -> int:
    """Every available backend against the float64 reference on the battery; exit 1 on any failure."""
    import fastattn
    from fastattn import reference
    from fastattn.testing import compare

    backends = backends or [b for b in available_backends() if b != "reference"]
    rows, failed = [], 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend in backends:
        dev = "cpu" if backend == "cpu" else device
        for name, build in _battery():
            kw = build(dev)
            t0 = time.perf_counter()
            try:
                x = {k: (v.requires_grad_() if k in ("query", "key", "value") else v) for k, v in kw.items()}
                out = fastattn.scaled_dot_product_attention(**x, backend=backend)
                do = torch.randn_like(out)
                grads = torch.autograd.grad(out, (x["query"], x["key"], x["value"]), do)
                ref64 = reference.scaled_dot_product_attention(**x, upcast=True)
                g64 = torch.autograd.grad(ref64, (x["query"], x["key"], x["value"]), do.double())
                ref_lp = reference.scaled_dot_product_attention(**x, upcast=False)
                glp = torch.autograd.grad(ref_lp, (x["query"], x["key"], x["value"]), do)
                errs, ok = [], True
                for got, r64, rlp, bwd in [(out, ref64, ref_lp, False)] + [
                        (a, b, c, True) for a, b, c in zip(grads, g64, glp)]:
                    good, err, _, _ = compare(got, r64, rlp, backward=bwd)
                    ok &= good
                    errs.append(err)
                status = "PASS" if ok else "FAIL"
            except Exception as e:  # noqa: BLE001 - a crash is a failure of that case, reported
                status, errs = f"ERROR {type(e).__name__}: {e}", []
            failed += status != "PASS"
            rows.append((backend, name, status, errs, time.perf_counter() - t0))
    print(f"{'backend':8} {'case':42} {'result':6} {'err out':>9} {'err dq':>9} {'err dk':>9} {'err dv':>9} {'time':>7}")
    for backend, name, status, errs, dt in rows:
        e = " ".join(f"{x:9.2e}" for x in errs) if errs else ""
        print(f"{backend:8} {name:42} {status[:6]:6} {e:39} {dt * 1e3:6.0f}ms"
              + ("" if status in ("PASS", "FAIL") else f"  {status}"))
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends, chosen CPU ISA, threads, versions")
    c = sub.add_parser("check", help="every available backend against the reference; exit 1 on failure")
    c.add_argument("--backend", action="append", choices=["cpu", "triton"], help="check only these backends")
    k = sub.add_parser("kernels", help="compile every Triton kernel configuration for sm_80/sm_90 and report")
    k.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (default both)")
    from fastattn.bench import command as bench_command
    b = sub.add_parser("bench", help="speed table against torch (quick by default, --full for everything), "
                                     "JSON, plots, --compare")
    bench_command.add_arguments(b)
    from fastattn.explain import command as explain_command
    x = sub.add_parser("explain", help="attention heatmaps (PNG) and a head view (HTML) of a text through a "
                                       "transformers encoder; --bench: memory and time at 512 tokens")
    explain_command.add_arguments(x)
    a = p.parse_args(argv)
    if a.cmd == "info":
        return _info()
    if a.cmd == "check":
        return _check(a.backend)
    if a.cmd == "kernels":
        from fastattn.kernels import aot
        return aot.main(tuple(a.arch) if a.arch else (80, 90))
    if a.cmd == "bench":
        return bench_command.main(a)
    if a.cmd == "explain":
        return explain_command.main(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
