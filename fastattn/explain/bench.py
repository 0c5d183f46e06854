"""``fastattn explain --bench``: peak memory and time of :func:`fastattn.explain.explain` on one long input,
against the eager model's ``output_attentions=True``, in one process.

Model: all-MiniLM-L6-v2 (6 layers, 12 heads) with a sequence-classification head (seeded random head:
the relevance target is class 1's logit), one copy loaded with ``attn_implementation="eager"`` and one
on fastattn, same weights. Input: a fixed English text truncated to ``length`` tokens.

Memory: :func:`fastattn.bench.peak_memory` (glibc ``malloc_trim(0)``, then the resident-set high-water
mark reset through ``/proc/self/clear_refs``; peak = ``VmHWM`` after the call - ``VmRSS`` before it), so
what a call returns and keeps counts, and freed memory that an earlier variant left cached does not hide
growth. Each variant runs once before it is measured. Time: median over ``rounds`` rounds, the variants
interleaved within each round so machine load hits them alike.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

TEXT = ("The museum reopened last spring after three years of repairs, and the new wing is the reason to go: "
        "the rooms are bright, the labels are short and clear, and the old maps finally have space to breathe. "
        "Our guide was patient with questions, although the audio tour kept skipping and the cafe was crowded "
        "and slow. Tickets cost more than they used to, which annoyed a few visitors in the queue, but most of "
        "them left smiling. ")


def _long_inputs(tokenizer, length: int) -> tuple[str, dict]:
    text = TEXT * (1 + length // 60)
    enc = tokenizer(text, truncation=True, max_length=length, return_tensors="pt")
    if enc["input_ids"].shape[1] != length:
        raise ValueError(f"could not build a {length}-token input (got {enc['input_ids'].shape[1]}); "
                         f"the tokenizer's limit is {tokenizer.model_max_length}")
    return text, dict(enc)


def _load(path: str | None):
    import transformers

    from fastattn.explain import core
    transformers.utils.logging.set_verbosity_error()
    path = path or core.default_model_path()
    if path is None:
        raise ValueError("the packaged all-MiniLM-L6-v2 is not installed: pass --model PATH")
    core.register()
    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    torch.manual_seed(0)
    eager = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                            attn_implementation="eager").eval()
    fast = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                           attn_implementation="fastattn").eval()
    fast.load_state_dict(eager.state_dict())
    return eager, fast, transformers.AutoTokenizer.from_pretrained(path)


def measure(model_path: str | None = None, length: int = 512, rounds: int = 7) -> dict:
    from fastattn import bench as fbench
    from fastattn.explain import core, naive

    eager, fast, tok = _load(model_path)
    text, inputs = _long_inputs(tok, length)
    max_length = length
    cls1 = lambda out, inp: out.logits[0, 1]  # noqa: E731

    def forward_fast():
        with torch.no_grad():
            return fast(**inputs).logits

    def forward_eager_attentions():
        with torch.no_grad():
            return tuple(eager(**inputs, output_attentions=True).attentions)

    def naive_relevance():
        w, g, _ = naive.eager_attentions(eager, inputs, cls1)
        return naive.relevance([x[0] for x in w], [x[0] for x in g])

    def explain_rollout():
        return core.explain(fast, tok, text, target="none", keep_weights=False, max_length=max_length).rollout

    def explain_rollout_keep():
        return core.explain(fast, tok, text, target="none", keep_weights=True, max_length=max_length).weights

    def explain_rollout_keep_f16():
        return core.explain(fast, tok, text, target="none", keep_weights=torch.float16, max_length=max_length).weights

    def explain_relevance():
        e = core.explain(fast, tok, text, target=1, keep_weights=False, max_length=max_length)
        return e.rollout, e.relevance

    variants = {
        "forward (fastattn, no weights)": forward_fast,
        "eager forward, output_attentions=True": forward_eager_attentions,
        "explain: weights + rollout (weights streamed)": explain_rollout,
        "explain: weights + rollout (all weights kept, f32)": explain_rollout_keep,
        "explain: weights + rollout (all weights kept, f16)": explain_rollout_keep_f16,
        "explain: weights + rollout + relevance (class 1)": explain_relevance,
        "naive eager relevance (output_attentions + retain_grad)": naive_relevance,
    }
    load = [open("/proc/loadavg").read().split()[:3]] if os.path.exists("/proc/loadavg") else []
    why = fbench.cpu_memory_supported()
    mem = {}
    for name, fn in variants.items():
        fn()  # one-time work (thread pools, allocator growth) outside the measurement
        peak, kept = fbench.peak_memory(fn)
        mem[name] = {"peak_bytes": peak, "kept_bytes": kept}
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if os.path.exists("/proc/loadavg"):
        load.append(open("/proc/loadavg").read().split()[:3])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward (fastattn, no weights)"]
    rows = [{"variant": k, "median_s": med[k], "min_s": min(times[k]), "max_s": max(times[k]),
             "x_forward": med[k] / base, **mem[k]} for k in variants]
    return {"length": length, "layers": fast.config.num_hidden_layers, "heads": fast.config.num_attention_heads,
            "threads": torch.get_num_threads(), "rounds": rounds, "torch": torch.__version__,
            "memory_method": "VmHWM - VmRSS (malloc_trim + clear_refs)" if why is None else f"unavailable: {why}",
            "loadavg_start_end": load, "when_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}


def format_report(r: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    out = [f"fastattn explain --bench: all-MiniLM-L6-v2 + classification head, {r['length']} tokens, "
           f"{r['layers']} layers x {r['heads']} heads, float32, {r['threads']} threads, torch {r['torch']}, "
           f"{r['when_utc']}",
           f"memory: {r['memory_method']}; time: median of {r['rounds']} interleaved rounds; "
           f"load average (1/5/15 min) at start / end: "
           + " / ".join(" ".join(x) for x in r["loadavg_start_end"]), "",
           "| variant | median | min-max | x forward | peak MiB | kept MiB |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        out.append(f"| {row['variant']} | {row['median_s'] * 1e3:.0f} ms | {row['min_s'] * 1e3:.0f}-"
                   f"{row['max_s'] * 1e3:.0f} ms | {row['x_forward']:.2f}x | {mib(row['peak_bytes'])} | "
                   f"{mib(row['kept_bytes'])} |")
    by = {row["variant"]: row for row in r["rows"]}
    eager = by["eager forward, output_attentions=True"]["peak_bytes"]
    roll = by["explain: weights + rollout (weights streamed)"]
    rel = by["explain: weights + rollout + relevance (class 1)"]
    if eager and roll["peak_bytes"] is not None:
        out += ["", f"peak memory, explain (weights + rollout) / eager output_attentions: "
                    f"{roll['peak_bytes'] / eager:.2f}; with relevance: {rel['peak_bytes'] / eager:.2f}; "
                    f"keeping every layer's weights: "
                    f"{by['explain: weights + rollout (all weights kept, f32)']['peak_bytes'] / eager:.2f} (f32), "
                    f"{by['explain: weights + rollout (all weights kept, f16)']['peak_bytes'] / eager:.2f} (f16)"]
    out.append(f"time / one forward pass: weights + rollout {roll['x_forward']:.2f}x (target 2x), "
               f"+ relevance {rel['x_forward']:.2f}x (target 4x)")
    return "\n".join(out)


def main(model_path: str | None = None, length: int = 512, rounds: int = 7, json_path: str | None = None) -> int:
    r = measure(model_path, length, rounds)
    print(format_report(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {json_path}")
    return 0
