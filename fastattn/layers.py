"""Attention layers beyond multi-head attention, on fastattn's fused operations.

* :class:`MultiplicativeAttention`: Luong et al. (2015) "general" score ``q^T W k``.
* :class:`HierarchicalAttention`: the attention of Yang et al. (2016) hierarchical attention networks,
  words -> sentences -> documents, on packed variable-length input (:func:`fastattn.varlen_attention`).
* :class:`CoAttention`: two sequences attending to each other through one affinity matrix (Xiong et al.
  2017 dynamic co-attention, Seo et al. 2017 BiDAF).

None of them forms an attention matrix unless weights are asked for: the outputs come from the fused
kernels (:func:`fastattn.scaled_dot_product_attention`, :func:`fastattn.varlen_attention`) and the weights
from the kernels' log-sum-exp (:func:`fastattn.attention_weights`).

Shape legend: B batch, L query length, S key length, E feature dims; packed: T total words,
n sentences, N documents.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastattn.functional import scaled_dot_product_attention
from fastattn.varlen import pad, unpad, varlen_attention
from fastattn.weights import attention_weights

__all__ = ["MultiplicativeAttention", "HierarchicalAttention", "CoAttention", "CoAttentionOutput"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------ checks
def _check_input(name: str, t, dims: int, last: int | None, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{name} must be {what} with last dim {last} (the layer's size), got shape "
                         f"{tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match the layer's dtype {dtype} "
                        f"(convert the layer with .to(dtype) or the input)")


def _check_bool_mask(name: str, m, shape: tuple[int, ...], device: torch.device) -> Tensor | None:
    """A padding mask (True / 1 = real token) as bool, or None."""
    if m is None:
        return None
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
    if m.dtype.is_floating_point or m.is_complex():
        raise TypeError(f"{name} must be bool (True = real token) or 0/1 integers, got {m.dtype}")
    if tuple(m.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but the input is on {device}")
    return m.bool()


def _merge_masks(attn_mask: Tensor | None, key_padding_mask: Tensor | None, B: int, L: int, S: int,
                 dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """attn_mask (broadcastable to (B, L, S)) and key_padding_mask (B, S) -> one mask broadcastable to
    (B, 1, L, S) in fastattn's convention, size-1 dims kept (never expanded unless both are given)."""
    m4 = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (dtype, torch.float32):
            raise TypeError(f"attn_mask must be bool (True = attend) or a float mask of the input dtype {dtype} "
                            f"(or float32), got {attn_mask.dtype}")
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but the input is on {device}")
        ok = attn_mask.dim() <= 3 and all(m in (1, t) for m, t in zip(reversed(attn_mask.shape), (S, L, B)))
        if not ok:
            raise ValueError(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to the scores "
                             f"(B, L, S) = {(B, L, S)} (pass a (B, S) key padding mask as key_padding_mask)")
        m4 = attn_mask.reshape((1,) * (3 - attn_mask.dim()) + tuple(attn_mask.shape)).unsqueeze(1)
    kpm = _check_bool_mask("key_padding_mask", key_padding_mask, (B, S), device)
    if kpm is None:
        return m4
    kpm = kpm.view(B, 1, 1, S)
    if m4 is None:
        return kpm
    if m4.dtype == torch.bool:
        return m4 & kpm
    return m4.masked_fill(~kpm, float("-inf"))


def _weights(q4: Tensor, k4: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`fastattn.attention_weights` at scale 1, (B, 1, L, S) -> (B, L, S) (for float16 / bfloat16 it
    forms the scores in float32 and rounds the probabilities once: these layers' scores are unscaled)."""
    return attention_weights(q4, k4, mask, scale=1.0).squeeze(1)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------ multiplicative
class MultiplicativeAttention(nn.Module):
    """Luong's multiplicative ("general") attention: ``score(q, k) = q^T W k``, unscaled.

    Args:
        query_dim: Eq, the query feature size.
        key_dim: Ek, the key feature size. ``weight`` has shape (Eq, Ek).
        bias: add a learnt vector ``bias`` (Ek,) to the projected query, i.e. ``score = q^T W k + bias^T k``
            (a query-independent prior over keys; a scalar bias would cancel in the softmax). Default False,
            as in Luong et al.

    forward(query (B, L, Eq), key (B, S, Ek), value (B, S, Ev), attn_mask=None, key_padding_mask=None,
    need_weights=False) -> out (B, L, Ev), or (out, weights (B, L, S)) when ``need_weights``.

    * ``attn_mask``: broadcastable to (B, L, S) (so (L, S) or (S,) apply to every batch item): bool True =
      the key takes part, or float (input dtype or float32) added to the scores (-inf hides a key).
    * ``key_padding_mask``: (B, S) bool (or 0/1 integers), True = real key, False = padding. It is a
      separate argument because a 2-D ``attn_mask`` already means (L, S). Both masks may be given.

    The output is ``softmax(q W k^T + mask) v``, computed as ``q' = q W (+ bias)`` followed by one fused
    single-head attention with scale 1 (:func:`fastattn.scaled_dot_product_attention`); the weights come
    from :func:`fastattn.attention_weights`. Query rows with no visible key give zeros (and zero weights).
    """

    def __init__(self, query_dim: int, key_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, v in (("query_dim", query_dim), ("key_dim", key_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.query_dim, self.key_dim = query_dim, key_dim
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(query_dim, key_dim, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(key_dim, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, bias={self.bias is not None}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool = False):
        dt = self.weight.dtype
        _check_input("query", query, 3, self.query_dim, dt, "(B, L, query_dim)")
        _check_input("key", key, 3, self.key_dim, dt, "(B, S, key_dim)")
        _check_input("value", value, 3, None, dt, "(B, S, Ev)")
        B, L, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B or value.shape[0] != B:
            raise ValueError(f"batch sizes differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)}")
        if value.shape[1] != S:
            raise ValueError(f"key length {S} does not match value length {value.shape[1]} "
                             f"(key {tuple(key.shape)}, value {tuple(value.shape)})")
        mask = _merge_masks(attn_mask, key_padding_mask, B, L, S, dt, query.device)
        q = query @ self.weight
        if self.bias is not None:
            q = q + self.bias
        q4, k4 = q.unsqueeze(1), key.unsqueeze(1)  # one head: (B, 1, n, E) views
        out = scaled_dot_product_attention(q4, k4, value.unsqueeze(1), mask, scale=1.0).squeeze(1)
        if not need_weights:
            return out
        return out, _weights(q4, k4, mask)


# -------------------------------------------------------------------------------------- hierarchical
def _check_cu(name: str, cu, device: torch.device) -> Tensor:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64) cumulative lengths, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D with at least one entry (0), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but words are on {device}")
    return cu.to(torch.int32)


def _check_cu_values(name: str, cu: Tensor, total: int, unit: str, max_seqlen: int | None) -> int:
    """Values of cumulative lengths (one host sync): 0 first, ``total`` last, non-decreasing.
    Returns the longest segment (``max_seqlen`` if given, after checking it)."""
    d = cu.diff()
    first, last, neg, longest = torch.stack([
        cu[0].long(), cu[-1].long(),
        (d < 0).any().long() if d.numel() else cu.new_zeros((), dtype=torch.int64),
        d.max().long() if d.numel() else cu.new_zeros((), dtype=torch.int64)]).tolist()
    if first != 0 or last != total or neg:
        got = cu.tolist() if cu.numel() <= 16 else f"first {first}, last {last}, decreasing: {bool(neg)}"
        raise ValueError(f"{name} must be non-decreasing cumulative lengths from 0 to the number of {unit} "
                         f"({total}), got {got}")
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen} but the longest segment has {longest} {unit}")
    return max_seqlen


class HierarchicalAttention(nn.Module):
    """The attention of a hierarchical attention network (Yang et al. 2016): words -> sentence vectors ->
    document vectors, on packed variable-length input.

    Word level, for the words h_it (D) of sentence i:  u_it = tanh(W_w h_it + b_w) (word_hidden),
    alpha_it = softmax_t(u_it . u_w),  s_i = sum_t alpha_it h_it.  Optionally (``sentence_dim``) each
    sentence vector is projected, s_i <- tanh(W_p s_i + b_p) (sentence_dim): a minimal stand-in for the
    paper's sentence encoder; an encoder of your own belongs outside this layer (run the word level with
    :meth:`pool_words`, encode, then :meth:`pool_sentences`). Sentence level, for the sentences of
    document d: u_i = tanh(W_s s_i + b_s) (sentence_hidden), beta_i = softmax_i(u_i . u_s),
    v_d = sum_i beta_i s_i.

    Args:
        input_dim: D, the word feature size (e.g. the output size of a word encoder).
        word_hidden: size of u_it and of the word context vector u_w (default D).
        sentence_hidden: size of u_i and of the sentence context vector u_s (default D').
        sentence_dim: D' of the optional projection between the levels (default None: no projection, D' = D).
        bias: biases b_w, b_s (and b_p) (default True, as in the paper).

    Parameters: ``word_proj`` (W_w, b_w), ``word_context`` (u_w), ``sentence_proj`` (W_p, b_p; only with
    ``sentence_dim``), ``sentence_attn_proj`` (W_s, b_s), ``sentence_context`` (u_s).

    forward(words (T, D), cu_seqlens_words (n + 1,), cu_seqlens_sentences (N + 1,), max_seqlen_words=None,
    max_seqlen_sentences=None) -> (docs (N, D'), word_weights (T,), sentence_weights (n,)).

    Packed layout: sentence i holds ``words[cu_seqlens_words[i]:cu_seqlens_words[i+1]]`` and document d
    holds sentences ``cu_seqlens_sentences[d]:cu_seqlens_sentences[d+1]`` (cumulative counts, int32,
    starting at 0). Empty sentences and documents are allowed: their vectors are zeros (an empty sentence
    still counts as one sentence of its document, and the optional projection maps its zeros to tanh(b_p)). The ``max_seqlen_*`` (longest sentence in words,
    longest document in sentences) are computed from the cumulative lengths when not given; pass them to
    save the host synchronisation (e.g. under ``torch.compile``).

    Each level is one :func:`fastattn.varlen_attention` call with one query per segment (the context
    vector), keys u, values h and scale 1. The weights come from its log-sum-exp, alpha = exp(u . u_w - lse),
    followed by a division by their per-segment sum (1 up to the rounding of the float32 lse): that costs
    one segment sum over T values, gives float64 accuracy for float64 inputs and makes the weights
    differentiable (the kernels' lse carries no gradient). For padded input see :meth:`forward_padded`.
    """

    def __init__(self, input_dim: int, word_hidden: int | None = None, sentence_hidden: int | None = None,
                 sentence_dim: int | None = None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v, opt in (("input_dim", input_dim, False), ("word_hidden", word_hidden, True),
                             ("sentence_hidden", sentence_hidden, True), ("sentence_dim", sentence_dim, True)):
            if opt and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int{' or None' if opt else ''}, got {v!r}")
        kw = {"device": device, "dtype": dtype}
        self.input_dim = input_dim
        self.output_dim = sentence_dim or input_dim
        word_hidden = word_hidden or input_dim
        sentence_hidden = sentence_hidden or self.output_dim
        self.word_proj = nn.Linear(input_dim, word_hidden, bias=bias, **kw)
        self.word_context = nn.Parameter(torch.empty(word_hidden, **kw))
        self.sentence_proj = nn.Linear(input_dim, sentence_dim, bias=bias, **kw) if sentence_dim else None
        self.sentence_attn_proj = nn.Linear(self.output_dim, sentence_hidden, bias=bias, **kw)
        self.sentence_context = nn.Parameter(torch.empty(sentence_hidden, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in (self.word_proj, self.sentence_proj, self.sentence_attn_proj):
            if m is not None:
                m.reset_parameters()
        # scores u . u_w with |u| <= 1 per entry: O(1) at initialisation
        nn.init.normal_(self.word_context, std=1.0 / math.sqrt(self.word_context.numel()))
        nn.init.normal_(self.sentence_context, std=1.0 / math.sqrt(self.sentence_context.numel()))

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, output_dim={self.output_dim}"

    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _attend(h: Tensor, cu: Tensor, max_seqlen: int, proj: nn.Linear, context: Tensor) -> tuple[Tensor, Tensor]:
        """One level: segments ``cu`` of h (T, D) -> (pooled (n, D), weights (T,))."""
        T = h.shape[0]
        n = cu.numel() - 1
        u = torch.tanh(proj(h))  # (T, Hh)
        q = context.view(1, 1, -1).expand(n, 1, -1)  # one query per segment: the context vector
        cu_q = torch.arange(n + 1, dtype=torch.int32, device=h.device)
        out, lse = varlen_attention(q, u.unsqueeze(1), h.unsqueeze(1), cu_q, cu, 1, max_seqlen, scale=1.0,
                                    return_lse=True)
        # alpha_t = exp(u_t . u - lse_seg(t)) in fp32 (float64 for float64), then renormalised per segment
        # through autograd: exact softmax gradients, and float64 accuracy from the float32 lse.
        wdt = torch.float64 if h.dtype == torch.float64 else torch.float32
        seg = torch.repeat_interleave(torch.arange(n, device=h.device), cu.diff(), output_size=T)
        s = u.to(wdt) @ context.to(wdt)
        a = torch.exp(s - lse.detach()[0].to(wdt).index_select(0, seg))
        z = a.new_zeros(n).index_add(0, seg, a)
        a = a / z.index_select(0, seg)
        return out.squeeze(1), a.to(h.dtype)

    def _validate(self, words, cu_w, cu_s, max_w, max_s):
        dt = self.word_context.dtype
        _check_input("words", words, 2, self.input_dim, dt, "(total_words, input_dim)")
        cu_w = _check_cu("cu_seqlens_words", cu_w, words.device)
        cu_s = _check_cu("cu_seqlens_sentences", cu_s, words.device)
        for name, v in (("max_seqlen_words", max_w), ("max_seqlen_sentences", max_s)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        if _compiling():  # data-dependent checks would break the graph: trust the caller there
            if max_w is None or max_s is None:
                raise ValueError("under torch.compile pass max_seqlen_words and max_seqlen_sentences")
            return cu_w, cu_s, max_w, max_s
        max_w = _check_cu_values("cu_seqlens_words", cu_w, words.shape[0], "words", max_w)
        max_s = _check_cu_values("cu_seqlens_sentences", cu_s, cu_w.numel() - 1, "sentences", max_s)
        return cu_w, cu_s, max_w, max_s

    def pool_words(self, words: Tensor, cu_seqlens_words: Tensor, max_seqlen_words: int) -> tuple[Tensor, Tensor]:
        """Word level only (no checks): (sentence vectors (n, D), word_weights (T,))."""
        return self._attend(words, cu_seqlens_words, max_seqlen_words, self.word_proj, self.word_context)

    def pool_sentences(self, sentences: Tensor, cu_seqlens_sentences: Tensor,
                       max_seqlen_sentences: int) -> tuple[Tensor, Tensor]:
        """Sentence level only (no checks): (document vectors (N, D'), sentence_weights (n,))."""
        return self._attend(sentences, cu_seqlens_sentences, max_seqlen_sentences, self.sentence_attn_proj,
                            self.sentence_context)

    def forward(self, words: Tensor, cu_seqlens_words: Tensor, cu_seqlens_sentences: Tensor,
                max_seqlen_words: int | None = None, max_seqlen_sentences: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        cu_w, cu_s, max_w, max_s = self._validate(words, cu_seqlens_words, cu_seqlens_sentences,
                                                  max_seqlen_words, max_seqlen_sentences)
        sent, word_weights = self.pool_words(words, cu_w, max_w)
        if self.sentence_proj is not None:
            sent = torch.tanh(self.sentence_proj(sent))
        docs, sentence_weights = self.pool_sentences(sent, cu_s, max_s)
        return docs, word_weights, sentence_weights

    def forward_padded(self, words: Tensor, word_mask: Tensor, sentence_mask: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """Padded input: words (N, S, W, D) (N documents of up to S sentences of up to W words), word_mask
        (N, S, W) bool or 0/1 (True = real word), sentence_mask (N, S) (True = real sentence; default: the
        sentences with at least one word). Packs with :func:`fastattn.unpad`, runs :meth:`forward`, and
        returns (docs (N, D'), word_weights (N, S, W), sentence_weights (N, S)) with zeros at padding."""
        dt = self.word_context.dtype
        _check_input("words", words, 4, self.input_dim, dt, "(documents, sentences, words, input_dim)")
        N, S, W, _ = words.shape
        word_mask = _check_bool_mask("word_mask", word_mask, (N, S, W), words.device)
        if sentence_mask is None:
            sentence_mask = word_mask.any(dim=-1)
        else:
            sentence_mask = _check_bool_mask("sentence_mask", sentence_mask, (N, S), words.device)
        sent_words, sent_idx, cu_s, max_s = unpad(words, sentence_mask)  # (n, W, D)
        sent_wmask, _, _, _ = unpad(word_mask, sentence_mask)  # (n, W)
        packed, word_idx, cu_w, max_w = unpad(sent_words, sent_wmask)  # (T, D)
        n = sent_words.shape[0]
        docs, ww, sw = self.forward(packed, cu_w, cu_s, max_w, max_s)
        ww = pad(pad(ww, word_idx, n, W), sent_idx, N, S)
        return docs, ww, pad(sw, sent_idx, N, S)


# ---------------------------------------------------------------------------------------- coattention
class CoAttentionOutput(NamedTuple):
    """What :class:`CoAttention` returns; the weights are None unless ``need_weights``."""
    a_attended: Tensor  # (B, La, Db): each position of a, a weighted sum of b
    b_attended: Tensor  # (B, Lb, Da): each position of b, a weighted sum of a
    a_weights: Tensor | None  # (B, La, Lb): softmax over b of the affinity (rows of A)
    b_weights: Tensor | None  # (B, Lb, La): softmax over a of the affinity (rows of A^T)


class CoAttention(nn.Module):
    """Co-attention between two sequences a and b (e.g. question and passage) through one affinity matrix,
    as in the dynamic co-attention network (Xiong et al. 2017) and BiDAF (Seo et al. 2017).

    Affinity ``A = a W b^T`` (B, La, Lb), unscaled, with a learnt ``weight`` W (Da, Db) (``bilinear=True``,
    the default) or ``A = a b^T`` (``bilinear=False``: needs Da == Db, no parameters; project the inputs
    yourself if you want DCN's tanh(W q + b) question projection). Then

    * a_attended = softmax over b of A, applied to b: (B, La, Db) (BiDAF's context-to-query attention);
    * b_attended = softmax over a of A^T, applied to a: (B, Lb, Da) (DCN's attention contexts of b).

    forward(a (B, La, Da), b (B, Lb, Db), mask_a=None, mask_b=None, need_weights=False) ->
    :class:`CoAttentionOutput` (a_attended, b_attended, a_weights, b_weights): a named 4-tuple whose weights
    are the two softmax matrices (B, La, Lb) and (B, Lb, La) when ``need_weights``, else None. The
    affinity itself is :meth:`affinity`. Masks: (B, La) / (B, Lb) bool or 0/1, True = real token; a
    masked token is never attended to. Rows of padding tokens are computed like any other row (ignore
    them); a row with no real token on the other side gives zeros.

    Both directions are fused attentions (:func:`fastattn.scaled_dot_product_attention`, one head,
    scale 1, masks as broadcast (B, 1, 1, L) views); ``a W`` is computed once and serves as the query of
    one direction and the key of the other. Weights come from :func:`fastattn.attention_weights`.
    """

    def __init__(self, dim_a: int, dim_b: int, bilinear: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("dim_a", dim_a), ("dim_b", dim_b)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not bilinear and dim_a != dim_b:
            raise ValueError(f"bilinear=False (A = a b^T) needs dim_a == dim_b, got {dim_a} and {dim_b}")
        self.dim_a, self.dim_b = dim_a, dim_b
        if bilinear:
            self.weight = nn.Parameter(torch.empty(dim_a, dim_b, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return f"dim_a={self.dim_a}, dim_b={self.dim_b}, bilinear={self.weight is not None}"

    def _check(self, a, b):
        dt = self.weight.dtype if self.weight is not None else a.dtype if isinstance(a, Tensor) else None
        if dt is not None and dt not in _FLOAT:
            raise TypeError(f"a must be float16, bfloat16, float32 or float64, got {dt}")
        _check_input("a", a, 3, self.dim_a, dt, "(B, La, dim_a)")
        _check_input("b", b, 3, self.dim_b, dt, "(B, Lb, dim_b)")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"batch sizes differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
        if a.device != b.device:
            raise ValueError(f"b is on {b.device} but a is on {a.device}")

    def _project(self, a: Tensor) -> Tensor:
        return a if self.weight is None else a @ self.weight

    def affinity(self, a: Tensor, b: Tensor) -> Tensor:
        """The affinity matrix ``A = a W b^T`` (B, La, Lb) (materialised; for inspection)."""
        self._check(a, b)
        return self._project(a) @ b.transpose(1, 2)

    def forward(self, a: Tensor, b: Tensor, mask_a: Tensor | None = None, mask_b: Tensor | None = None,
                need_weights: bool = False) -> CoAttentionOutput:
        self._check(a, b)
        B, La, _ = a.shape
        Lb = b.shape[1]
        ma = _check_bool_mask("mask_a", mask_a, (B, La), a.device)
        mb = _check_bool_mask("mask_b", mask_b, (B, Lb), a.device)
        ma = None if ma is None else ma.view(B, 1, 1, La)
        mb = None if mb is None else mb.view(B, 1, 1, Lb)
        aw = self._project(a).unsqueeze(1)  # (B, 1, La, Db)
        a4, b4 = a.unsqueeze(1), b.unsqueeze(1)
        a_att = scaled_dot_product_attention(aw, b4, b4, mb, scale=1.0).squeeze(1)
        b_att = scaled_dot_product_attention(b4, aw, a4, ma, scale=1.0).squeeze(1)
        wa = wb = None
        if need_weights:
            wa = _weights(aw, b4, mb)
            wb = _weights(b4, aw, ma)
        return CoAttentionOutput(a_att, b_att, wa, wb)
