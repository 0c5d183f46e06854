"""Interpretability pictures from the fused kernels: per-layer attention weights, attention rollout and
gradient-weighted relevance of a HuggingFace encoder, one layer at a time (:func:`explain`), as
matplotlib heatmaps (:func:`heatmap`) and as one self-contained HTML page (:func:`to_html`).

    from fastattn.explain import explain, heatmap, to_html, load_model
    model, tokenizer = load_model()                     # the packaged all-MiniLM-L6-v2 (or a path)
    e = explain(model, tokenizer, "The film was a delight.", "I loved it.", target="similarity")
    heatmap(e, kind="rollout", path="rollout.png")
    to_html(e, "explain.html")

Command line: ``fastattn explain "some text" [--pair "other text"] [--model PATH] --out DIR``;
``fastattn explain --bench`` measures memory and time on a 512-token input.
"""
from fastattn.explain.core import NAME, Explanation, default_model_path, explain, load_model, register
from fastattn.explain.html import to_html
from fastattn.explain.plot import heatmap

__all__ = ["explain", "Explanation", "heatmap", "to_html", "load_model", "default_model_path", "register", "NAME"]
