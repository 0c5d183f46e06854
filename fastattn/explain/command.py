"""``fastattn explain``: PNG heatmaps and one HTML page for a text (and a pair), or ``--bench``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to explain")
    p.add_argument("--pair", help="a second text: joined with the first into one sequence, or, for a bare "
                                  "encoder such as the default MiniLM, encoded separately to explain their "
                                  "cosine similarity")
    p.add_argument("--model", help="a local transformers model directory (default: the packaged "
                                   "all-MiniLM-L6-v2 when installed)")
    p.add_argument("--target", default="auto",
                   help="what the relevance explains: auto (default), none, a class index or label, "
                        "class:N, start[:i], end[:i], similarity")
    p.add_argument("--out", default="explain-out", help="output directory (default: explain-out)")
    p.add_argument("--layer", type=int, default=-1, help="layer of the single-head and head-grid figures "
                                                          "(default: the last)")
    p.add_argument("--head", type=int, default=0, help="head of the single-head figure (default 0)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens shown on a heatmap axis and in the head "
                                                              "view (longer inputs show a window; default 64)")
    p.add_argument("--dpi", type=int, default=100)
    p.add_argument("--bench", action="store_true", help="measure peak memory and time on a 512-token input "
                                                        "against the eager model's output_attentions=True")
    p.add_argument("--length", type=int, default=512, help="--bench: input length in tokens (default 512)")
    p.add_argument("--rounds", type=int, default=7, help="--bench: timing rounds (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="--bench: also write the figures to this JSON file")


def main(a: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.bench:
        from fastattn.explain import bench
        return bench.main(model_path=a.model, length=a.length, rounds=a.rounds, json_path=a.json)
    if not a.text:
        print("fastattn explain: give a text to explain (or --bench)", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from fastattn.explain import core, html, plot
    hf_logging.set_verbosity_error()
    try:
        model, tokenizer = core.load_model(a.model)
    except (ValueError, OSError) as e:
        print(f"fastattn explain: {e}", file=sys.stderr)
        return 2
    target = int(a.target) if a.target.lstrip("-").isdigit() else a.target
    t0 = time.perf_counter()
    try:
        e = core.explain(model, tokenizer, a.text, a.pair, target=target)
    except (ValueError, TypeError) as err:
        print(f"fastattn explain: {err}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    seqs = [e] + ([e.other] if e.other is not None else [])
    L, H = e.n_layers, e.n_heads
    layer, head = a.layer % L, a.head
    if not 0 <= head < H:
        print(f"fastattn explain: --head {head} out of range for {H} heads", file=sys.stderr)
        return 2
    for s, seq in enumerate(seqs):
        sfx = "" if len(seqs) == 1 else f"_text{s + 1}"
        figs = [(f"head_layer{layer}_head{head}{sfx}.png", dict(kind="head", layer=layer, head=head)),
                (f"heads_layer{layer}{sfx}.png", dict(kind="heads", layer=layer)),
                (f"rollout{sfx}.png", dict(kind="rollout"))]
        if seq.relevance is not None:
            figs.append((f"relevance{sfx}.png", dict(kind="relevance")))
        for name, kw in figs:
            plot.heatmap(e, sequence=s, max_tokens=a.max_tokens, path=out / name, dpi=a.dpi, **kw)
            written.append(out / name)
    kinds = ["rollout"] + (["relevance"] if e.relevance is not None else [])
    for kind in kinds:
        name = f"tokens_{kind}.png"
        titles = [f"{kind}{'' if len(seqs) == 1 else f', text {i + 1}'}"
                  + (f": {seq.target} = {seq.score:.4g}" if kind == "relevance" else "") for i, seq in enumerate(seqs)]
        plot.token_figure(seqs, kind, titles=titles, path=out / name, dpi=a.dpi)
        written.append(out / name)
    html.to_html(e, out / "explain.html", max_tokens=a.max_tokens, layer=layer)
    written.append(out / "explain.html")

    lens = " + ".join(str(len(s.tokens)) for s in seqs)
    print(f"explained {lens} tokens, {L} layers x {H} heads in {took:.2f} s"
          + (f"; relevance of {e.target} = {e.score:.4g}" if e.target else "; no relevance target"))
    for n, seq in enumerate(seqs):
        for kind in kinds:
            sc = seq.token_scores(kind)
            real = [i for i, sp in enumerate(seq.special) if not sp]
            top = sorted(real, key=lambda i: -float(sc[i]))[:5]
            label = "" if len(seqs) == 1 else f"text {n + 1} "
            print(f"  {label}top {kind}: " + ", ".join(f"{seq.tokens[i]} ({float(sc[i]):.3g})" for i in top))
    for p in written:
        print(f"wrote {p}")
    return 0
