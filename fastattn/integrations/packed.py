"""Padding-free encoders: a HuggingFace BERT-family model that computes on real tokens only.

    import fastattn.integrations.transformers as fa_hf
    model = fa_hf.packed(BertModel.from_pretrained(path))      # in place; returns the model
    out = model(**tokenizer(sentences, padding=True, return_tensors="pt"))   # as before

A padded batch (B, L) with ``attention_mask`` is packed into one sequence of its T real tokens before the
embeddings, every layer (projections, feed-forward, layer norms, attention) runs on (1, T), and the outputs
come back in the padded shape the caller expects. Attention receives the sequence boundaries as
transformers' ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keywords and runs :func:`fastattn.varlen_attention`,
so no (B, L, L) mask exists and no work is spent on padding: time follows T, not B * L.

What equals what (same weights, same inputs):

* position ids are those the padded model computes for each real token (BERT, DistilBERT, ELECTRA,
  ModernBERT: the padded position, so they restart at 0 for every right-padded sentence; RoBERTa,
  XLM-R, CamemBERT: fairseq's count of non-padding tokens) or, when given, the caller's; token type ids
  are gathered the same way;
* ``last_hidden_state`` and ``hidden_states`` are the padded model's on real tokens and zeros at padding;
* ``pooler_output`` is the model's pooler on the re-padded output (the first position of each row: the
  padded model's pooled output for right-padded batches, the usual layout of BERT tokenizers);
* ``attentions`` are (B, H, L, L), the padded model's weights for real query and key tokens and zeros in
  padding rows and columns;
* gradients flow through the packing to the parameters (and ``inputs_embeds``) as in the padded model.

The model's attention implementation is switched to ``"fastattn_packed"`` (registered on first use, with
no mask function: transformers then builds no mask at all); :func:`unpacked` restores the previous one. The
base model's ``forward`` is replaced by an instance attribute, so task heads (``...ForSequenceClassification``,
``...ForTokenClassification``, ...) call the packed base model and see padded outputs; the heads themselves
run on those padded outputs. Encoders only: decoders, cross-attention and caches raise.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from fastattn import varlen as _varlen

__all__ = ["packed", "unpacked", "is_packed", "SUPPORTED_MODEL_TYPES"]

# model_type -> how the padded model numbers positions when no position_ids are given:
#   "index": position = index in the padded row (0, 1, ..., L-1);
#   "fairseq": padding_idx + number of non-padding tokens up to and including this one (RoBERTa's rule).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bert": "index",
    "distilbert": "index",
    "electra": "index",
    "modernbert": "index",
    "roberta": "fairseq",
    "xlm-roberta": "fairseq",
    "camembert": "fairseq",
}

# Arguments of the base models' forward that packing cannot honour (decoder, cross-attention, cache) or
# that it computes itself.
_REFUSED = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values",
            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class _PackedForward:
    """The packed ``forward`` of one base model (stored on it as an instance attribute)."""

    def __init__(self, base: torch.nn.Module, previous_impl: str, position_rule: str):
        self.base = base
        self.previous_impl = previous_impl
        self.position_rule = position_rule

    def __call__(self, *args, **kwargs):
        base = self.base
        signature = inspect.signature(type(base).forward)
        bound = signature.bind(base, *args, **kwargs)
        a: dict = {}
        for name, value in bound.arguments.items():
            if name == "self":
                continue
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                a.update(value)
            else:
                a[name] = value
        for name in _REFUSED:
            if a.get(name) is not None:
                raise ValueError(f"a packed model takes padded batches of independent sequences; "
                                 f"{name} is not supported (call unpacked(model) first)")
            a.pop(name, None)
        a.pop("use_cache", None)  # an encoder keeps no cache (the padded encoder ignores the flag as well)
        return_dict = a.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(base.config, "return_dict", True)
        input_ids = a.pop("input_ids", None)
        inputs_embeds = a.pop("inputs_embeds", None)
        attention_mask = a.pop("attention_mask", None)
        token_type_ids = a.pop("token_type_ids", None)
        position_ids = a.pop("position_ids", None)

        batch = _pack(input_ids, inputs_embeds, attention_mask)
        B, L, indices, cu, max_len = batch
        if position_ids is None:
            position_ids = self._padded_positions(input_ids, inputs_embeds, B, L)
        call = dict(a)
        call["position_ids"] = _gather(position_ids, B, L, indices)
        if token_type_ids is not None:
            call["token_type_ids"] = _gather(token_type_ids, B, L, indices)
        if input_ids is not None:
            call["input_ids"] = input_ids.reshape(B * L).index_select(0, indices)[None]
        else:
            call["inputs_embeds"] = inputs_embeds.reshape(B * L, -1).index_select(0, indices)[None]
        call.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
                    max_length_k=max_len, return_dict=True)
        out = type(base).forward(base, **call)
        out = self._unpack_outputs(out, batch)
        return out if return_dict else out.to_tuple()

    def _padded_positions(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, B: int, L: int) -> Tensor:
        """The (B, L) position ids the padded model computes when none are given."""
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if self.position_rule == "fairseq":
            emb = self.base.embeddings
            if input_ids is not None:
                return emb.create_position_ids_from_input_ids(input_ids, emb.padding_idx)
            return emb.create_position_ids_from_inputs_embeds(inputs_embeds, emb.padding_idx)
        return torch.arange(L, device=device).expand(B, L)

    def _unpack_outputs(self, out, batch):
        B, L, indices, cu, max_len = batch

        def repad(x: Tensor) -> Tensor:
            return _varlen.pad(x[0], indices, B, L)

        last = out.get("last_hidden_state")
        if last is not None:
            out["last_hidden_state"] = last = repad(last)
        if out.get("hidden_states") is not None:
            out["hidden_states"] = tuple(repad(h) for h in out["hidden_states"])
        if out.get("attentions") is not None:
            out["attentions"] = tuple(_repad_weights(w, batch) for w in out["attentions"])
        pooler = getattr(self.base, "pooler", None)
        if out.get("pooler_output") is not None and pooler is not None and last is not None:
            out["pooler_output"] = pooler(last)
        return out


def _pack(input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Tensor | None):
    """(B, L, indices of the real tokens in the flattened (B*L) batch, cu_seqlens int32 (B+1,), max length)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    ref = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"a packed model takes input_ids of shape (batch, length), got {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"a packed model takes inputs_embeds of shape (batch, length, hidden), "
                         f"got {tuple(inputs_embeds.shape)}")
    B, L = ref.shape[:2]
    if attention_mask is None:
        keep = torch.ones(B, L, dtype=torch.bool, device=ref.device)
    else:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
            raise ValueError(f"a packed model takes the 2-D padding mask (batch, length), 1 = token, 0 = padding; "
                             f"got {shape}")
        if tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the batch "
                             f"({B}, {L})")
        if attention_mask.dtype.is_floating_point:
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("a packed model takes a 0/1 padding mask, got other float values")
        keep = attention_mask.to(device=ref.device, dtype=torch.bool)
    lens = keep.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=ref.device)
    torch.cumsum(lens, 0, dtype=torch.int32, out=cu[1:])
    indices = torch.nonzero(keep.reshape(-1)).reshape(-1)
    max_len = int(lens.max()) if B else 0
    return B, L, indices, cu, max_len


def _gather(ids: Tensor, B: int, L: int, indices: Tensor) -> Tensor:
    """(B, L) or broadcastable (1, L) / (L,) ids -> (1, T) at the real tokens."""
    return ids.expand(B, L).reshape(B * L).index_select(0, indices)[None]


def _repad_weights(w: Tensor, batch) -> Tensor:
    """Per-sequence weights (B, H, m, m) (local positions) -> (B, H, L, L) at the padded positions, zeros
    elsewhere. Sequence b's local position i sits at padded position indices[cu[b] + i] - b * L."""
    B, L, indices, cu, max_len = batch
    H = w.shape[1]
    lens = (cu[1:] - cu[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(B, device=w.device), lens)
    local = torch.arange(indices.numel(), device=w.device) - cu.long()[seq]
    # Padded position of (b, i); local slots past a sequence's end go to the extra row/column L.
    where = torch.full((B, max_len), L, dtype=torch.long, device=w.device)
    where[seq, local] = indices - seq * L
    out = w.new_zeros(B, L + 1, L + 1, H)
    b = torch.arange(B, device=w.device)[:, None, None]
    out = out.index_put((b, where[:, :, None], where[:, None, :]), w.permute(0, 2, 3, 1))
    return out[:, :L, :L].permute(0, 3, 1, 2)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def is_packed(model: torch.nn.Module) -> bool:
    """Whether :func:`packed` has been applied to ``model`` (or to the base model inside it)."""
    return isinstance(_base_model(model).__dict__.get("forward"), _PackedForward)


def packed(model: torch.nn.Module, *, backend: str | None = None) -> torch.nn.Module:
    """Make a HuggingFace BERT-family encoder (``model_type`` in ``SUPPORTED_MODEL_TYPES``: BERT and
    sentence-transformers / MiniLM checkpoints, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA, ModernBERT)
    run on the real tokens of each padded batch only. ``model`` is the base model or a model with a task
    head; it is changed in place and returned. ``backend`` goes to fastattn (None: the default per device).

    Calls keep their signature: padded ``input_ids`` (or ``inputs_embeds``), the 2-D ``attention_mask``
    (1 = token; None = no padding), optional ``token_type_ids`` / ``position_ids``, ``output_hidden_states``,
    ``output_attentions``, ``return_dict``. The outputs have the padded shapes (see the module docstring for
    what equals the padded model's). Raises ``ValueError`` for decoders, cross-attention and model types it
    does not know; calling it twice is a no-op."""
    from fastattn.integrations import transformers as fa_hf

    base = _base_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"packed() supports model types {sorted(SUPPORTED_MODEL_TYPES)}, got {model_type!r} "
                         f"({type(base).__name__})")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("packed() supports encoders only; this config has is_decoder / add_cross_attention set")
    if is_packed(model):
        return model
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"packed() takes a transformers PreTrainedModel, got {type(model).__name__}")
    name = fa_hf.PACKED_NAME if backend is None else f"{fa_hf.PACKED_NAME}_{backend}"
    fa_hf.register_packed(name, backend=backend)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} did not accept attn_implementation={name!r} (it does not "
                         f"route attention through transformers' AttentionInterface)")
    base.forward = _PackedForward(base, previous, SUPPORTED_MODEL_TYPES[model_type])
    return model


def unpacked(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`packed`: padded computation and the previous attention implementation. Returns ``model``."""
    base = _base_model(model)
    fwd = base.__dict__.get("forward")
    if isinstance(fwd, _PackedForward):
        del base.forward
        model.set_attn_implementation(fwd.previous_impl)
    return model
