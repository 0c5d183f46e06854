"""One block of attention (a query shard against a key/value shard) and the exact merge of partial results.

A block runs the fused kernel (``fastattn::attention_fwd`` / ``attention_bwd``) when it can. The kernels
index their dropout stream with block-local (i, j), so a block whose dropout must follow the GLOBAL
(b, h, i, j) of the single-process computation, and ``backend="reference"``, run the same math here in
plain torch (fp32 accumulation, float64 for float64 inputs) with global coordinates: exact, but unfused
(it materialises ``B * H * row_chunk * S_block`` scores per step).

Shape legend: B batch, H query heads, Hk key/value heads, L block query length, S block key length,
E head dim, Ev value head dim. lse is the natural-log sum of exp over the block's visible keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastattn import _philox
from fastattn._ops import attention_bwd, attention_fwd
from fastattn.distributed._layout import Runs, positions

_ROW_CHUNK_ELEMS = 1 << 22  # scores held at once by the torch path (elements of B*H*rows*S)
_PHILOX_CHUNK = 1 << 15  # counters per numpy piece of the dropout mask (fits in cache)
_M32, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)
_PA, _PB = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox4x32 multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # Weyl key increments


@dataclass(frozen=True)
class Coords:
    """Global coordinates of a block: the query positions ``rows`` and key positions ``cols`` (runs of
    (start, length), ascending), and the global index of the block's query head 0 (non-zero under Ulysses)."""

    rows: Runs
    cols: Runs
    head0: int = 0


@dataclass(frozen=True)
class Params:
    scale: float
    is_causal: bool          # GLOBAL causality; a kernel block gets its own top-left flag
    dropout_p: float
    seed: Tensor             # int64 scalar on the CPU (unused when dropout_p == 0)
    backend: str             # "cpu" / "triton": the fused op; "reference": the torch path

    @property
    def fused(self) -> bool:
        return self.dropout_p == 0.0 and self.backend != "reference"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ forward
def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: Params, coords: Coords,
            block_causal: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of one block: out (B, H, L, Ev) in q's dtype from the kernel (the accumulation dtype
    from the torch path), lse (B, H, L) float32 (float64 for float64 inputs on the torch path)."""
    if p.fused and q.dtype != torch.float64:
        out, lse, _ = attention_fwd(q, k, v, mask, p.scale, block_causal, False, 0.0, p.seed, p.backend, False)
        return out, lse
    return _torch_forward(q, k, v, mask, p, coords)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
             p: Params, coords: Coords, block_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """This block's share of (dq, dk, dv) given the GLOBAL out and lse of its query rows (the
    flash-attention backward: P = exp(s - lse), so each block's gradient is exact on its own)."""
    if p.fused and q.dtype != torch.float64:
        # No out_lo (fastattn/_ops.py): out is the merge of every block's output, rounded to q's dtype once
        # (the ring keeps no residual of it), so delta sees that rounding; a single-process call does not.
        dq, dk, dv, _ = attention_bwd(dout, q, k, v, out, lse.float(), None, mask, p.scale, block_causal, False, 0.0,
                                      p.seed, p.backend, False)
        return dq, dk, dv
    return _torch_backward(dout, q, k, v, out, lse, mask, p, coords)


def merge_(out_acc: Tensor, lse_acc: Tensor, out_b: Tensor, lse_b: Tensor) -> None:
    """In place: (out_acc, lse_acc) <- the softmax-weighted union of two disjoint key sets.

    lse = log(e^lse_a + e^lse_b); out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b, in the
    accumulators' dtype. Rows with no visible key on either side (both -inf) stay (0, -inf)."""
    lse_b = lse_b.to(lse_acc.dtype)
    new = torch.logaddexp(lse_acc, lse_b)
    base = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # -inf - -inf would be NaN
    wa = torch.exp(lse_acc - base).unsqueeze(-1)
    wb = torch.exp(lse_b - base).unsqueeze(-1)
    out_acc.mul_(wa).add_(out_b.to(out_acc.dtype) * wb)
    lse_acc.copy_(new)


# --------------------------------------------------------------------------------------- torch path
def _expand_kv(t: Tensor, groups: int, dt: torch.dtype) -> Tensor:
    t = t.to(dt)
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def _row_chunks(B: int, H: int, L: int, S: int, p: Params, rpos: Tensor, cpos: Tensor):
    """(r0, r1, n): query rows [r0, r1) and the prefix of n keys they may see. Key positions ascend (the
    layouts' runs do), so under causal masking the visible keys of a row chunk are a prefix: the rest is
    skipped, as the kernels skip hidden blocks."""
    step = max(1, min(L, _ROW_CHUNK_ELEMS // max(1, B * H * S)))
    for r0 in range(0, L, step):
        r1 = min(L, r0 + step)
        n = S
        if p.is_causal and S:
            n = int(torch.searchsorted(cpos, rpos[r0:r1].max(), right=True))
        yield r0, r1, n


def _scores(qc: Tensor, kc: Tensor, mask: Tensor | None, r0: int, r1: int, n: int, p: Params,
            rpos: Tensor, cpos: Tensor) -> Tensor:
    """Masked scaled scores (B, H, r1-r0, n) of query rows [r0, r1) against the first n keys."""
    s = (qc @ kc.transpose(-2, -1)) * p.scale
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[:, :, r0:r1]
        m = m if m.shape[-1] == 1 else m[..., :n]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    if p.is_causal:
        s = s.masked_fill(cpos[:n].view(1, -1) > rpos[r0:r1].view(-1, 1), float("-inf"))
    return s


def _philox10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on numpy uint64 arrays holding uint32 values (the products fit, unsigned)."""
    for _ in range(10):
        p0, p2 = c0 * _PA, c2 * _PB
        c0, c1, c2, c3 = (p2 >> _S32) ^ c1 ^ k0, p2 & _M32, (p0 >> _S32) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
    return c0, c1, c2, c3


def keep_mask(seed: int, B: int, H: int, head0: int, rows: Tensor, cols: Tensor, dropout_p: float) -> Tensor:
    """The kernels' Philox keep-mask (spec: fastattn._philox) at global coordinates: element (b, h, i, j)
    uses counter (cols[j] >> 2, rows[i], head0 + h, b) and output word cols[j] & 3.

    numpy uint64 (32 x 32-bit products fit and wrap as unsigned), one Philox call per group of four
    columns (it yields the group's four words), in cache-sized pieces (a chain of element-wise numpy
    ops is memory-bound otherwise)."""
    u = np.uint64
    groups, inverse = torch.unique(cols.cpu() >> 2, return_inverse=True)
    R, G = rows.numel(), groups.numel()
    # One line per (b, h, i): its counter words c1 = i, c2 = head0 + h, c3 = b.
    c1 = np.tile(rows.cpu().numpy().astype(u), B * H)
    c2 = np.repeat(np.tile(head0 + np.arange(H, dtype=u), B), R)
    c3 = np.repeat(np.arange(B, dtype=u), H * R)
    g = groups.numpy().astype(u)[None, :]
    k0, k1 = u(seed & 0xFFFFFFFF), u((seed >> 32) & 0xFFFFFFFF)
    thr = u(_philox.threshold(dropout_p))
    keep = np.empty((B * H * R, G, 4), dtype=bool)
    step = max(1, _PHILOX_CHUNK // max(1, G))
    for f0 in range(0, B * H * R, step):
        f1 = min(B * H * R, f0 + step)
        shape = (f1 - f0, G)
        words = _philox10(np.broadcast_to(g, shape), np.broadcast_to(c1[f0:f1, None], shape),
                          np.broadcast_to(c2[f0:f1, None], shape), np.broadcast_to(c3[f0:f1, None], shape), k0, k1)
        for w in range(4):
            np.greater_equal(words[w], thr, out=keep[f0:f1, :, w])
    keep_t = torch.from_numpy(keep).view(B, H, R, 4 * G)
    return keep_t[..., inverse * 4 + (cols.cpu() & 3)].to(rows.device)


def _probs(s: Tensor, lse: Tensor) -> Tensor:
    pr = torch.exp(s - lse.unsqueeze(-1))
    return torch.where(torch.isneginf(lse).unsqueeze(-1), torch.zeros_like(pr), pr)


def _dropout_scale(p: Params, coords: Coords, B: int, H: int, rpos: Tensor, cpos: Tensor,
                   dt: torch.dtype) -> Tensor | None:
    if p.dropout_p == 0.0:
        return None
    keep = keep_mask(int(p.seed), B, H, coords.head0, rpos, cpos, p.dropout_p)
    return keep.to(dt) / (1.0 - p.dropout_p)


def _torch_forward(q, k, v, mask, p: Params, coords: Coords):
    B, H, L, _ = q.shape
    S, Ev = k.shape[-2], v.shape[-1]
    dt = acc_dtype(q.dtype)
    g = H // k.shape[1]
    kf, vf = _expand_kv(k, g, dt), _expand_kv(v, g, dt)
    rpos, cpos = positions(coords.rows, q.device), positions(coords.cols, q.device)
    out = torch.zeros(B, H, L, Ev, dtype=dt, device=q.device)
    lse = torch.full((B, H, L), float("-inf"), dtype=dt, device=q.device)
    for r0, r1, n in _row_chunks(B, H, L, S, p, rpos, cpos):
        if n == 0:
            continue  # no visible key: out 0, lse -inf
        s = _scores(q[:, :, r0:r1].to(dt), kf[:, :, :n], mask, r0, r1, n, p, rpos, cpos)
        lse_c = torch.logsumexp(s, dim=-1)
        pr = _probs(s, lse_c)
        z = _dropout_scale(p, coords, B, H, rpos[r0:r1], cpos[:n], dt)
        out[:, :, r0:r1] = (pr if z is None else pr * z) @ vf[:, :, :n]
        lse[:, :, r0:r1] = lse_c
    return out, lse


def _torch_backward(dout, q, k, v, out, lse, mask, p: Params, coords: Coords):
    B, H, L, E = q.shape
    Hk, S, Ev = k.shape[1], k.shape[-2], v.shape[-1]
    dt = acc_dtype(q.dtype)
    g = H // Hk
    kf, vf = _expand_kv(k, g, dt), _expand_kv(v, g, dt)
    rpos, cpos = positions(coords.rows, q.device), positions(coords.cols, q.device)
    dq = torch.zeros(B, H, L, E, dtype=dt, device=q.device)
    dk = torch.zeros(B, H, S, E, dtype=dt, device=q.device)
    dv = torch.zeros(B, H, S, Ev, dtype=dt, device=q.device)
    for r0, r1, n in _row_chunks(B, H, L, S, p, rpos, cpos):
        if n == 0:
            continue
        qc, do, oc = q[:, :, r0:r1].to(dt), dout[:, :, r0:r1].to(dt), out[:, :, r0:r1].to(dt)
        kc, vc = kf[:, :, :n], vf[:, :, :n]
        pr = _probs(_scores(qc, kc, mask, r0, r1, n, p, rpos, cpos), lse[:, :, r0:r1].to(dt))
        z = _dropout_scale(p, coords, B, H, rpos[r0:r1], cpos[:n], dt)
        dv[:, :, :n] += (pr if z is None else pr * z).transpose(-2, -1) @ do
        dp = do @ vc.transpose(-2, -1)
        if z is not None:
            dp = dp * z
        # delta_i = rowsum(dout_i * out_i) = sum_j P_ij dP_ij, with out the GLOBAL output of row i.
        ds = pr * (dp - (do * oc).sum(-1, keepdim=True))
        dq[:, :, r0:r1] = (ds @ kc) * p.scale
        dk[:, :, :n] += (ds.transpose(-2, -1) @ qc) * p.scale
    if g > 1:
        dk = dk.view(B, Hk, g, S, E).sum(2)
        dv = dv.view(B, Hk, g, S, Ev).sum(2)
    return dq, dk, dv
