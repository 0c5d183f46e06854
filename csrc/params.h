// fastattn: the arguments of one CPU kernel call (Params), as raw addresses and element strides.
//
// No torch headers: Python (fastattn/_cpu.py) fills a Params from tensor.data_ptr() and tensor.stride().
#pragma once

#include <algorithm>
#include <cstdint>

#include "dtype.h"

namespace fastattn {
namespace FASTATTN_NS {

// A 4-D strided view: element (b, h, i, x) lives at ptr + b*sb + h*sh + i*sl + x*se elements. The last dim
// x is the head dim e for q / k / v / out and their gradients, the key j for a mask (MaskView calls that
// stride ss), unused for lse (B, H, L). A broadcast dim has stride 0. The field names are the Python ones
// (fastattn/_cpu.py fills them).
struct Tensor4 {
  uintptr_t ptr = 0;
  int64_t sb = 0, sh = 0, sl = 0, se = 0;
  template <typename T> T* at(int64_t b, int64_t h, int64_t i) const {
    return reinterpret_cast<T*>(ptr) + b * sb + h * sh + i * sl;
  }
};

// Everything a kernel call needs. Forward fills q,k,v,out,lse,mask; backward also dout,dq,dk,dv,dmask.
struct Params {
  Tensor4 q, k, v, out, lse, mask;        // q (B,H,L,E) k (B,Hk,S,E) v (B,Hk,S,Ev) out (B,H,L,Ev) lse (B,H,L)
                                          // (the forward's lse is optional: ptr 0 = not wanted)
  Tensor4 dout, dq, dk, dv, dmask;        // backward only
  // fp16 / bf16 only, optional (ptr 0 = none): int16 (B,H,L,Ev), the code of the output's rounding residual
  // (out_lo.h, docs/design/out_lo.md). A training forward writes it; the backward's delta reads it.
  Tensor4 out_lo;
  int dtype = kF32;                       // element type of q/k/v/out (and dout/dq/dk/dv)
  int mask_dtype = kNone;                 // kNone, kBool, kF32, or dtype
  int dmask_dtype = kNone;                // kNone when no mask gradient is wanted
  int64_t B = 0, H = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;
  double scale = 1.0;
  bool is_causal = false;
  // With is_causal, key j is visible to query i iff j <= i + causal_offset (0: top-left, torch's is_causal;
  // S - L: lower-right, the query block at the end of the keys, torch's causal_lower_right). It may be
  // negative (L > S lower-right: the first L - S rows see no key) or larger than needed.
  int64_t causal_offset = 0;
  double dropout_p = 0.0;                 // 0: no RNG at all
  uint32_t thr = 0;                       // dropout keeps (b,h,i,j) iff its Philox word >= thr
  uint64_t seed = 0;
  int num_threads = 1;
  // Varlen (packed) batch: addresses of int32 cumulative lengths (B + 1 entries), 0 for a regular batch.
  // Item b is then query rows cu_q[b]..cu_q[b+1] of q/out/dout/dq/lse and key rows cu_k[b]..cu_k[b+1]
  // of k/v/dk/dv (their sb is unused); L and S are the maxima. See item_params().
  uintptr_t cu_q = 0, cu_k = 0;
  // The decoder variants (regular batches only; fastattn.reference.scaled_dot_product_attention states them: on
  // the score of query row i at position i' = i + causal_offset, causal or not, and key j, in this order):
  //   softcap > 0: s = softcap * tanh(s / softcap);  alibi: s += slope(b, h) * (j - i');  the mask; causal;
  //   window: hidden unless i' - window_left <= j <= i' + window_right (-1: that side unbounded);
  //   sinks (forward only): the softmax denominator also holds exp(sink[h]), and the lse includes it.
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  uintptr_t alibi = 0;                    // float32 slopes: slope(b, h) at alibi + b*alibi_sb + h*alibi_sh; 0 = none
  int64_t alibi_sb = 0, alibi_sh = 0;
  uintptr_t sinks = 0;                    // float32 (H,), contiguous; 0 = none
  // key/value head used by query head h (GQA).
  int64_t kv_head(int64_t h) const { return h / (H / Hk); }
  // multiplier of kept probabilities: 1 / (1 - p).
  double dropout_scale() const { return dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0; }
  // Whether any variant changes the scores themselves (soft-cap, ALiBi, a left window bound): the kernels take
  // their templated variant path. A right window bound only moves the causal diagonal; sinks touch the
  // epilogue only.
  bool score_variants() const { return softcap > 0.0 || alibi != 0 || window_left >= 0; }
  bool any_variant() const { return score_variants() || window_right >= 0 || sinks != 0; }
  float alibi_slope(int64_t b, int64_t h) const {
    return alibi == 0 ? 0.f : reinterpret_cast<const float*>(alibi)[b * alibi_sb + h * alibi_sh];
  }
};

// The keys query row i sees through causality and the window, as offsets from i:
//   j <= i + hi  (when `upper`: is_causal and / or window_right >= 0)
//   j >= i + lo  (when `lower`: window_left >= 0).
// Both are clamped to [-L, S], which keeps the same visible keys (hi >= S - 1 shows every key to every row,
// hi <= -L none; likewise for lo) and keeps i + hi exact as a float.
struct KeyBounds {
  bool upper = false, lower = false;
  int64_t hi = 0, lo = 0;
};
inline KeyBounds key_bounds(const Params& p) {
  KeyBounds kb;
  const int64_t big = p.L + p.S + 2;
  auto clamp = [&](int64_t x, int64_t a, int64_t b) { return std::min(std::max(x, a), b); };
  const int64_t off = clamp(p.causal_offset, -2 * big, 2 * big);
  int64_t hi = 2 * big;
  if (p.is_causal) hi = off;
  if (p.window_right >= 0) hi = std::min(hi, off + std::min(p.window_right, big));
  kb.upper = p.is_causal || p.window_right >= 0;
  kb.hi = clamp(hi, -p.L, p.S);
  kb.lower = p.window_left >= 0;
  kb.lo = kb.lower ? clamp(off - std::min(p.window_left, big), -p.L, p.S) : 0;
  return kb;
}

// Batch item b as a call of its own: for a varlen batch, the pointers moved to the item's first query /
// key row and L, S its lengths; b still indexes the mask (top-left corner) and the dropout counters, and
// i, j stay local to the item. A regular batch's Params are returned unchanged.
inline Params item_params(const Params& p, int64_t b) {
  if (p.cu_q == 0) return p;
  Params s = p;
  const int32_t* cq = reinterpret_cast<const int32_t*>(p.cu_q);
  const int32_t* ck = reinterpret_cast<const int32_t*>(p.cu_k);
  const int64_t q0 = cq[b], k0 = ck[b];
  s.L = cq[b + 1] - q0;
  s.S = ck[b + 1] - k0;
  const int64_t es = p.dtype == kF32 ? 4 : p.dtype == kF64 ? 8 : 2;
  auto shift = [](Tensor4& t, int64_t row, int64_t bytes) {
    if (t.ptr == 0) return;
    t.ptr = static_cast<uintptr_t>(static_cast<int64_t>(t.ptr) + row * t.sl * bytes);
    t.sb = 0;
  };
  for (Tensor4* t : {&s.q, &s.out, &s.out_lo, &s.dout, &s.dq}) shift(*t, q0, es);  // out_lo: int16, es = 2
  for (Tensor4* t : {&s.k, &s.v, &s.dk, &s.dv}) shift(*t, k0, es);
  shift(s.lse, q0, 4);
  return s;
}

// p with causal_offset limited to [-L, S]: the same visible keys (an offset >= S - 1 shows every query every
// key, one <= -L shows no query any), and i + causal_offset stays small (no int64 overflow, exact as a float).
// Varlen: L and S are the maxima, so the limits hold for every item too.
// The window and ALiBi read causal_offset itself (key_bounds clamps the window's bounds, ALiBi's bias depends
// on the exact position): such calls keep it as it is.
inline bool causal_offset_in_range(const Params& p) {
  return (p.causal_offset >= -p.L && p.causal_offset <= p.S) || p.alibi != 0 || p.window_left >= 0 ||
         p.window_right >= 0;
}
inline Params with_causal_offset_in_range(const Params& p) {
  Params c = p;
  c.causal_offset = std::min(std::max(p.causal_offset, -p.L), p.S);
  return c;
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
