"""One self-contained HTML page of an :class:`~fastattn.explain.core.Explanation`: a head view (tokens on
two sides, one line per (query, key) pair with opacity = weight, layer and head selectors, hovering a token
shows only its lines) and the rollout / relevance as colored tokens.

No network: the script and style are inline, the data is embedded (weights as base64 bytes, weight * 255
rounded), and a Content-Security-Policy meta tag forbids every other source. The page records what it drew
on the SVG (``data-layer``, ``data-head``, ``data-lines``, ``data-digest``), sets ``data-ready="1"`` on
``<html>`` once drawn and writes any script error into ``data-errors`` there; ``#layer=2&head=5`` in the
URL (or ``head=mean``) selects a view through the same selectors a reader uses. This is what a headless
browser test reads back.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch

from fastattn.explain.core import Explanation

__all__ = ["to_html", "page_data"]

MIN_BYTE = 3  # lines with weight < 3/255 are not drawn (invisible at that opacity anyway)


def _sequence_data(e: Explanation, max_tokens: int, layer: int) -> dict:
    n = len(e.tokens)
    k = min(n, max_tokens)
    d = {"text": e.text, "pair": e.pair, "tokens": e.tokens, "special": e.special, "n": n, "window": k,
         "target": e.target, "score": e.score, "layers": 0, "heads": 0, "weights": None, "scores": {}}
    if e.weights:
        w = torch.stack([x[:, :k, :k].float() for x in e.weights])  # (layers, H, k, k)
        q = (w.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        d.update(layers=w.shape[0], heads=w.shape[1], weights=base64.b64encode(q.numpy().tobytes()).decode("ascii"),
                 layer=layer % w.shape[0])
    for kind in ("rollout", "relevance"):
        if getattr(e, kind) is not None:
            d["scores"][kind] = [round(float(v), 6) for v in e.token_scores(kind)]
    return d


def page_data(explanation: Explanation, *, max_tokens: int = 64, layer: int = -1) -> dict:
    """The JSON the page embeds: one entry per text (two for the similarity target)."""
    seqs = [explanation] + ([explanation.other] if explanation.other is not None else [])
    return {"sequences": [_sequence_data(e, max_tokens, layer) for e in seqs], "min_byte": MIN_BYTE}


def to_html(explanation: Explanation, path: str | Path | None = None, *, max_tokens: int = 64,
            layer: int = -1, title: str | None = None) -> str:
    """The page as a string (written to ``path`` too when given). The head view shows the first
    ``max_tokens`` tokens (the page says so when it cuts); the colored tokens show all of them. ``layer``:
    the layer shown first (default the last)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    data = json.dumps(page_data(explanation, max_tokens=max_tokens, layer=layer), separators=(",", ":"))
    data = data.replace("</", "<\\/")  # the JSON sits in a <script> element
    title = title or f"fastattn explain: {explanation.text[:60]}"
    page = _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>__TITLE__</title>
<script>
window.addEventListener("error", function (ev) {
  var el = document.documentElement;
  el.setAttribute("data-errors", (el.getAttribute("data-errors") || "") + (ev.message || "error") + "\n");
});
</script>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.25em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
.seq { border-top: 1px solid #ddd; padding-top: .6em; margin-top: 1em; }
.controls label { margin-right: 1.2em; }
.note { color: #a15c00; font-size: .9em; }
.meta { color: #555; font-size: .9em; }
svg.headview text { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; cursor: default; }
svg.headview text.special { fill: #888; }
svg.headview text.hot { font-weight: bold; fill: #000; }
.tokens span { display: inline-block; padding: 1px 3px; margin: 2px 1px; border-radius: 3px;
               font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.tokens span.special { color: #999; font-size: .85em; }
.legend { font-size: .85em; color: #555; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<p class="meta">Attention weights computed by fastattn's fused kernels (<code>fastattn.attention_weights</code>),
one layer at a time. Head view: left = query token, right = key token, line opacity = attention weight;
hover a token to see only its lines.</p>
<div id="views"></div>
<script type="application/json" id="fa-data">__DATA__</script>
<script>
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("fa-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";  // a namespace name, never fetched
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];

  function el(tag, attrs, text) {
    var e = tag.indexOf("svg:") === 0 ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
    for (var k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function decode(b64) {
    var s = atob(b64), a = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }
  function selector(label, values, names, initial) {
    var wrap = el("label", {}, label + " "), sel = el("select");
    values.forEach(function (v, i) { sel.appendChild(el("option", {value: String(v)}, names[i])); });
    sel.value = String(initial);
    wrap.appendChild(sel);
    return [wrap, sel];
  }

  function headView(root, seq, si) {
    var k = seq.window, L = seq.layers, H = seq.heads, W = decode(seq.weights);
    var controls = el("div", {"class": "controls"});
    var layers = [], heads = [], i;
    for (i = 0; i < L; i++) layers.push(i);
    for (i = 0; i < H; i++) heads.push(i);
    var ls = selector("Layer", layers, layers.map(String), seq.layer);
    var hs = selector("Head", heads.concat(["mean"]), heads.map(String).concat(["mean of heads"]), 0);
    ls[1].id = "layer-" + si; hs[1].id = "head-" + si;
    controls.appendChild(ls[0]); controls.appendChild(hs[0]);
    root.appendChild(controls);
    if (seq.n > k) root.appendChild(el("p", {"class": "note"},
        "Long input: the head view shows tokens 0-" + (k - 1) + " of " + seq.n + "."));
    var rowH = 18, colW = 150, gap = 220, top = 10;
    var svg = el("svg:svg", {"class": "headview", id: "headview-" + si, width: 2 * colW + gap,
                             height: top + k * rowH + 10});
    var lines = el("svg:g"), left = [], right = [];
    svg.appendChild(lines);
    for (i = 0; i < k; i++) {
      var y = top + i * rowH + 12, cls = seq.special[i] ? "special" : "";
      var a = el("svg:text", {x: colW - 6, y: y, "text-anchor": "end", "class": cls, "data-i": i}, seq.tokens[i]);
      var b = el("svg:text", {x: colW + gap + 6, y: y, "class": cls, "data-j": i}, seq.tokens[i]);
      svg.appendChild(a); svg.appendChild(b); left.push(a); right.push(b);
    }
    root.appendChild(svg);

    function weight(l, h, q, key) {
      if (h !== "mean") return W[((l * H + h) * k + q) * k + key];
      var s = 0;
      for (var hh = 0; hh < H; hh++) s += W[((l * H + hh) * k + q) * k + key];
      return Math.round(s / H);
    }
    function draw() {
      var l = parseInt(ls[1].value, 10), hv = hs[1].value, h = hv === "mean" ? "mean" : parseInt(hv, 10);
      while (lines.firstChild) lines.removeChild(lines.firstChild);
      var color = h === "mean" ? "#444" : COLORS[h % COLORS.length], count = 0, digest = 2166136261;
      for (var q = 0; q < k; q++) {
        for (var key = 0; key < k; key++) {
          var v = weight(l, h, q, key);
          if (v < DATA.min_byte) continue;
          var y1 = top + q * rowH + 8, y2 = top + key * rowH + 8;
          lines.appendChild(el("svg:line", {x1: colW, y1: y1, x2: colW + gap, y2: y2, stroke: color,
            "stroke-width": 2, "stroke-opacity": (v / 255).toFixed(4), "data-i": q, "data-j": key,
            "data-w": v}));
          count++;
          digest = Math.imul(digest ^ (q * 65599 + key * 31 + v), 16777619) >>> 0;
        }
      }
      svg.setAttribute("data-layer", l); svg.setAttribute("data-head", hv);
      svg.setAttribute("data-lines", count); svg.setAttribute("data-digest", digest.toString(16));
    }
    function focus(attr, idx) {
      var all = lines.childNodes;
      for (var n = 0; n < all.length; n++)
        all[n].style.display = idx === null || all[n].getAttribute(attr) === String(idx) ? "" : "none";
      left.concat(right).forEach(function (t) { t.classList.remove("hot"); });
      if (idx !== null) (attr === "data-i" ? left : right)[idx].classList.add("hot");
    }
    left.forEach(function (t, n) {
      t.addEventListener("mouseenter", function () { focus("data-i", n); });
      t.addEventListener("mouseleave", function () { focus("data-i", null); });
    });
    right.forEach(function (t, n) {
      t.addEventListener("mouseenter", function () { focus("data-j", n); });
      t.addEventListener("mouseleave", function () { focus("data-j", null); });
    });
    ls[1].addEventListener("change", draw);
    hs[1].addEventListener("change", draw);
    draw();
    return {layer: ls[1], head: hs[1]};
  }

  function tokenScores(root, seq, kind, caption) {
    var s = seq.scores[kind];
    if (!s) return;
    root.appendChild(el("h2", {}, caption));
    var top = 0, i;
    for (i = 0; i < s.length; i++) if (!seq.special[i]) top = Math.max(top, s[i]);
    var box = el("div", {"class": "tokens", id: kind + "-" + document.querySelectorAll(".tokens").length});
    var rgb = kind === "relevance" ? "214,39,40" : "31,119,180";
    for (i = 0; i < s.length; i++) {
      var span = el("span", {title: kind + " " + s[i].toPrecision(4)}, seq.tokens[i]);
      if (seq.special[i]) span.className = "special";
      else span.style.background = "rgba(" + rgb + "," + (top > 0 ? Math.max(s[i], 0) / top : 0).toFixed(3) + ")";
      box.appendChild(span);
    }
    root.appendChild(box);
  }

  var views = document.getElementById("views"), selects = [];
  DATA.sequences.forEach(function (seq, si) {
    var root = el("div", {"class": "seq", id: "seq-" + si});
    var head = (DATA.sequences.length > 1 ? "Text " + (si + 1) + ": " : "") + seq.text +
               (seq.pair ? "  |  pair: " + seq.pair : "");
    root.appendChild(el("h2", {}, head));
    if (seq.target) root.appendChild(el("p", {"class": "meta"},
        "Relevance explains: " + seq.target + " = " + Number(seq.score).toPrecision(5)));
    views.appendChild(root);
    if (seq.weights) selects.push(headView(root, seq, si));
    tokenScores(root, seq, "rollout", "Attention rollout (residual-aware; Abnar & Zuidema, 2020)");
    tokenScores(root, seq, "relevance", "Gradient-weighted attention relevance (Chefer et al., 2021)");
    root.appendChild(el("p", {"class": "legend"},
        "Token color: the token's score divided by the largest among non-special tokens; special tokens in grey."));
  });

  function applyHash() {
    var p = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var t = kv.split("="); if (t[0]) p[t[0]] = decodeURIComponent(t[1] || "");
    });
    selects.forEach(function (s) {
      [["layer", s.layer], ["head", s.head]].forEach(function (pair) {
        if (p[pair[0]] !== undefined && p[pair[0]] !== pair[1].value) {
          pair[1].value = p[pair[0]];
          pair[1].dispatchEvent(new Event("change"));
        }
      });
    });
  }
  window.addEventListener("hashchange", applyHash);
  applyHash();
  document.documentElement.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""
