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
  // key/value head used by query head h (GQA).
  int64_t kv_head(int64_t h) const { return h / (H / Hk); }
  // multiplier of kept probabilities: 1 / (1 - p).
  double dropout_scale() const { return dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0; }
};

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
inline bool causal_offset_in_range(const Params& p) { return p.causal_offset >= -p.L && p.causal_offset <= p.S; }
inline Params with_causal_offset_in_range(const Params& p) {
  Params c = p;
  c.causal_offset = std::min(std::max(p.causal_offset, -p.L), p.S);
  return c;
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
