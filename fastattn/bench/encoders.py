"""Model level: a whole HuggingFace encoder on a padded batch of sentences of mixed length.

transformers' SDPA on the padded batch, fastattn on the padded batch, and fastattn's packed model
(fastattn.integrations.packed: every layer on the real tokens only). Used by bench/test_bench_packed.py and
examples/sentence_embeddings.py.
"""
from __future__ import annotations

from typing import Sequence

import torch

ENCODER_PROVIDERS = ("sdpa", "fastattn", "fastattn-packed")


def mixed_length_texts(corpus: Sequence[str], tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` texts whose token counts (special tokens included) are spread evenly over ``lo..hi``, in a seeded
    random order: each is the longest run of whole words of ``corpus`` (read as one circular word stream, from
    the start of a seeded random corpus entry) that the tokenizer turns into at most its target count.
    Deterministic for a given corpus, tokenizer and seed; a count falls short of its target only when one word
    splits into several tokens at the cut."""
    import random

    words, starts = [], []
    for text in corpus:
        starts.append(len(words))
        words += text.split()
    if len(words) < hi:
        raise ValueError(f"the corpus has {len(words)} words; lengths up to {hi} tokens need at least {hi}")
    rng = random.Random(seed)
    targets = [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
    rng.shuffle(targets)

    def tokens(ws: list[str]) -> int:
        return len(tokenizer(" ".join(ws))["input_ids"])

    texts = []
    for target in targets:
        start = starts[rng.randrange(len(starts))]
        stream = (words[start:] + words[:start])[:target]  # every word is at least one token
        k_lo, k_hi = 1, len(stream)  # largest k with tokens(stream[:k]) <= target
        while k_lo < k_hi:
            mid = (k_lo + k_hi + 1) // 2
            if tokens(stream[:mid]) <= target:
                k_lo = mid
            else:
                k_hi = mid - 1
        texts.append(" ".join(stream[:k_lo]))
    return texts


def load_encoders(path: str, dtype: torch.dtype = torch.float32,
                  providers: Sequence[str] = ENCODER_PROVIDERS) -> dict[str, torch.nn.Module]:
    """One eval-mode copy of the HuggingFace model at ``path`` per provider: ``"sdpa"`` (transformers' SDPA,
    padded), ``"fastattn"`` (``attn_implementation="fastattn"``, padded), ``"fastattn-packed"``
    (``fastattn.integrations.transformers.packed``)."""
    import transformers

    import fastattn.integrations.transformers as fa_hf

    fa_hf.register()
    models = {}
    for p in providers:
        if p not in ENCODER_PROVIDERS:
            raise ValueError(f"provider must be one of {ENCODER_PROVIDERS}, got {p!r}")
        impl = "fastattn" if p == "fastattn" else "sdpa"
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, dtype=dtype).eval()
        models[p] = fa_hf.packed(model) if p == "fastattn-packed" else model
    return models


def mean_pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the mean of
    ``last_hidden_state`` over each sentence's real tokens, L2-normalised; float32 (B, hidden)."""
    out = model(**batch).last_hidden_state.float()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
