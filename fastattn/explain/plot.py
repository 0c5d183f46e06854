"""Matplotlib figures of an :class:`~fastattn.explain.core.Explanation`: one head, a grid of heads, the
rollout or the relevance as (n, n) heatmaps with tokens on both axes, and token scores as colored words.

Layout is fixed in inches (no tight_layout), so a PNG's size in pixels is ``figure.get_size_inches() *
dpi`` exactly (sizes are whole eighths of an inch) and grows with the number of tokens shown: a heatmap
gets 0.18 in (18 px at the default 100 dpi) per token, enough for 7-point labels up to 64 tokens. Longer
inputs show a window of ``max_tokens`` tokens, and the title says which.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from fastattn.explain.core import Explanation

__all__ = ["heatmap", "token_figure"]

CELL_IN = 0.18          # inches per token on a single heatmap axis
FONT_PT = 7
GRID_PANEL_MAX_IN = 3.2  # a grid panel's side never exceeds this
KINDS = ("head", "heads", "rollout", "relevance")


def _snap(inches: float) -> float:
    """Up to a multiple of 1/8 inch: exact in binary, so ``inches * dpi`` is a whole number of pixels."""
    return math.ceil(inches * 8) / 8


def _figure(w_in: float, h_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in))
    FigureCanvasAgg(fig)
    return fig


def _window(n: int, max_tokens: int, window: tuple[int, int] | None) -> tuple[int, int]:
    if window is not None:
        a, b = int(window[0]), int(window[1])
        if not 0 <= a < b <= n:
            raise ValueError(f"window {window} is not a range of the {n} tokens (0 <= start < stop <= {n})")
        return a, b
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return 0, min(n, max_tokens)


def _label_margin(tokens: list[str]) -> float:
    longest = max((len(t) for t in tokens), default=1)
    return 0.25 + 0.065 * min(longest, 16)


def _short(t: str) -> str:
    return t if len(t) <= 16 else t[:15] + "\u2026"


def _draw(ax, m: Tensor, tokens: list[str], labels_x: bool, labels_y: bool, cmap: str, fontsize: float,
          vmax: float | None = None):
    v = m.detach().float().numpy()
    im = ax.imshow(v, cmap=cmap, vmin=0.0, vmax=vmax if vmax is not None else max(float(v.max()), 1e-12),
                   interpolation="nearest", aspect="equal")
    n = len(tokens)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels([_short(t) for t in tokens] if labels_x else [], rotation=90, fontsize=fontsize)
    ax.set_yticklabels([_short(t) for t in tokens] if labels_y else [], fontsize=fontsize)
    ax.tick_params(length=0, pad=1.5)
    return im


def heatmap(explanation: Explanation, kind: str = "head", *, layer: int = -1, head: int = 0,
            sequence: int = 0, max_tokens: int = 64, window: tuple[int, int] | None = None,
            path: str | Path | None = None, dpi: int = 100):
    """A matplotlib Figure (and a PNG at ``path``) with tokens on both axes (row = query, column = key).

    kind: ``"head"`` (``layer``, ``head``), ``"heads"`` (every head of ``layer`` in a grid), ``"rollout"``
    or ``"relevance"``. sequence: 1 selects the similarity target's second text. Inputs longer than
    ``max_tokens`` show tokens [0, max_tokens) (or ``window=(start, stop)``) on both axes; the title says
    so. Pixel size: ``fig.get_size_inches() * dpi``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    e = explanation
    if sequence == 1:
        if e.other is None:
            raise ValueError("sequence=1 needs an explanation of two texts (the similarity target)")
        e = e.other
    elif sequence != 0:
        raise ValueError(f"sequence must be 0 or 1, got {sequence}")
    n = len(e.tokens)
    a, b = _window(n, max_tokens, window)
    tokens = e.tokens[a:b]
    note = "" if (a, b) == (0, n) else f"  [tokens {a}-{b - 1} of {n} shown]"

    if kind in ("head", "heads"):
        if not e.weights:
            raise ValueError("this explanation kept no weights (explain(..., keep_weights=True))")
        L, H = len(e.weights), e.weights[0].shape[0]
        if not -L <= layer < L:
            raise ValueError(f"layer {layer} out of range for {L} layers")
        layer %= L
        w = e.weights[layer][:, a:b, a:b]
        if kind == "head":
            if not -H <= head < H:
                raise ValueError(f"head {head} out of range for {H} heads")
            head %= H
            return _single(w[head], tokens, f"layer {layer}, head {head}: attention weights{note}",
                           "viridis", path, dpi, vmax=1.0)
        return _grid(w, tokens, f"layer {layer}, all {H} heads{note}", path, dpi)
    m = getattr(e, kind)
    if m is None:
        raise ValueError(f"this explanation has no {kind}"
                         + (" (it needs a target)" if kind == "relevance" else ""))
    title = ("attention rollout (residual-aware, Abnar & Zuidema 2020)" if kind == "rollout" else
             f"gradient-weighted relevance (Chefer et al. 2021), minus identity: {e.target}")
    if kind == "relevance":
        m = m - torch.eye(n, dtype=m.dtype)
        m = m.clamp(min=0)
    return _single(m[a:b, a:b], tokens, title + note, "magma" if kind == "relevance" else "viridis", path, dpi)


def _single(m: Tensor, tokens: list[str], title: str, cmap: str, path, dpi: int, vmax: float | None = None):
    k = len(tokens)
    margin = _label_margin(tokens)
    side = max(k * CELL_IN, 1.5)
    cbar, top, right = 0.9, 0.55, 0.2
    W, H = _snap(margin + side + cbar + right), _snap(margin + side + top)
    fig = _figure(W, H)
    ax = fig.add_axes((margin / W, margin / H, side / W, side / H))
    im = _draw(ax, m, tokens, True, True, cmap, FONT_PT, vmax)
    cax = fig.add_axes(((margin + side + 0.15) / W, margin / H, 0.15 / W, side / H))
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=FONT_PT)
    fig.text(0.5 * margin / W, 1 - 0.3 / H, title, fontsize=8, va="center", ha="left", wrap=True)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _grid(w: Tensor, tokens: list[str], title: str, path, dpi: int):
    H, k = w.shape[0], len(tokens)
    cols = min(H, 4)
    rows = -(-H // cols)
    side = min(max(k * 0.11, 1.2), GRID_PANEL_MAX_IN)
    labels = side / k >= 0.09  # room for 6-point labels
    fs = 6
    margin = _label_margin(tokens) if labels else 0.25
    gap, top, head_title = 0.15, 0.5, 0.22
    W = _snap(margin + cols * side + (cols - 1) * gap + 0.2)
    Ht = _snap(margin + rows * (side + head_title) + (rows - 1) * gap + top)
    fig = _figure(W, Ht)
    for h in range(H):
        r, c = divmod(h, cols)
        x = margin + c * (side + gap)
        y = margin + (rows - 1 - r) * (side + head_title + gap)
        ax = fig.add_axes((x / W, y / Ht, side / W, side / Ht))
        _draw(ax, w[h], tokens, labels and r == rows - 1, labels and c == 0, "viridis", fs, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=7, pad=2)
    suffix = "" if labels else "  (too many tokens for labels: see the single-head figure)"
    fig.text(0.02, 1 - 0.25 / Ht, title + suffix + "; color 0 to 1", fontsize=8, va="center", ha="left")
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def token_figure(explanations: list[Explanation], kind: str = "relevance", *, titles: list[str] | None = None,
                 path: str | Path | None = None, dpi: int = 100, width_in: float = 9.0):
    """Sentences drawn as words with a background whose strength is the word's score
    (:meth:`Explanation.token_scores`, normalised per sentence over its non-special tokens; special tokens
    are not drawn). One line per explanation, wrapped at ``width_in``; ``titles`` go above each."""
    from matplotlib.colors import to_rgba

    color = to_rgba("#d62728" if kind == "relevance" else "#1f77b4")
    lines = []
    for i, e in enumerate(explanations):
        s = e.token_scores(kind).clamp(min=0)
        real = [j for j, sp in enumerate(e.special) if not sp]
        top = max((float(s[j]) for j in real), default=0.0) or 1.0
        words = [(e.tokens[j], float(s[j]) / top) for j in real]
        lines.append((titles[i] if titles else (e.target or kind), words))
    char_in, line_in, title_in, pad = 0.085, 0.3, 0.26, 0.15
    # Wrap first: (kind, x, y, text, value) items in inches from the top, so the height is known.
    items, y = [], pad
    for title, words in lines:
        y += title_in
        items.append(("title", pad, y - 0.08, title, 0.0))
        x = pad
        for word, v in words:
            wd = char_in * (len(word) + 1.2)
            if x + wd > width_in - pad and x > pad:
                y += line_in
                x = pad
            items.append(("word", x, y + 0.2, word, v))
            x += wd + 0.04
        y += line_in + pad
    H = _snap(y + pad)
    width_in = _snap(width_in)
    fig = _figure(width_in, H)
    for what, x, yy, text, v in items:
        if what == "title":
            fig.text(x / width_in, 1 - yy / H, text, fontsize=8, color="0.3", va="bottom")
        else:
            fig.text(x / width_in, 1 - yy / H, text, fontsize=10, family="monospace", va="baseline",
                     bbox=dict(boxstyle="square,pad=0.12", lw=0, fc=(*color[:3], 0.05 + 0.85 * max(v, 0.0))))
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
