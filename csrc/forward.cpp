// fastattn CPU forward: flash-attention tiled online softmax with fp32 accumulators.
//
// For one (b, h) and a block of BM query rows, key blocks of BN keys are visited once:
//   s_ij  = c * <q_i, k_j> + log2(e) * mask_ij          c = scale * log2(e)  (base-2 scores)
//   m_i'  = max(m_i, max_j s_ij);  alpha_i = 2^(m_i - m_i')
//   p_ij  = 2^(s_ij - m_i');  l_i' = alpha_i l_i + sum_j p_ij      (l: no dropout)
//   o_i'  = alpha_i o_i + sum_j z_ij p_ij v_j                     (z: Philox keep bit)
// and at the end out_i = o_i / l_i / (1 - p_drop), lse_i = ln(2) (m_i + log2 l_i); l_i = 0 -> 0, -inf.
//
// Layout: the query block is packed transposed once (Q^T: E x QG per group of QG = 2 vectors of
// queries), so the score micro-kernel broadcasts K elements from their natural rows and keeps
// S^T (keys x queries) in registers: row max / row sum are lane-wise, no horizontal reductions,
// and dropout draws one Philox call per 4 keys x vector of queries. O stays (queries x Ev) and is
// updated by broadcasting P^T entries against V rows. With AVX512-BF16 (bf16 inputs) both products
// use vdpbf16ps on pair-interleaved operands: Q^T and P^T as (query, key/e pair) words, V packed once
// per key block as (key pair, ev) words.
// Causal: key j is visible to query i iff j <= i + causal_offset (params.h). Key blocks beyond that diagonal
// for every query of a group, or fully hidden by the mask, are skipped (no QK^T, no PV); keys past the last
// row's diagonal are never read.
// Decoder variants (params.h): a window bounds each row's keys to [i + lo, i + hi] (KeyBounds; the right bound
// is the causal diagonal's mechanism, the left one skips blocks and never reads keys before the first row's
// bound, as the diagonal does after the last row's); soft-cap, ALiBi and the left bound change every score, so
// calls with them take a second instantiation of forward_item whose micro-kernels store plain scores and
// variant_scores (forward_microkernels.h) applies them; sinks join the denominator in write_output.
//
// Files: forward_tiling.h (blocking, buffers), forward_microkernels.h (QK^T / PV register tiles and their
// row / column blocking), forward_packing.h (Q^T, K, V, mask and P^T layouts), forward_softmax.h (online
// softmax, dropout), forward_epilogue.h (out, lse, out_lo); this file: one work item's key-block loop
// (forward_item), the float64 path and the call. Map of all of csrc/: docs/design/cpu.md.
#include "forward.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16_dot_probe.h"
#include "forward_epilogue.h"
#include "forward_microkernels.h"
#include "forward_packing.h"
#include "forward_softmax.h"
#include "forward_tiling.h"
#include "mask.h"
#include "parallel.h"
#include "philox.h"
#include "scratch.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {

// ------------------------------------------------------------------------------------ key blocks

// Prepares the per-block score context of group g; returns false if the group sees none of the block.
// kVariants: also the left window bound and the positions the variant epilogue (variant_scores) reads.
template <bool kVariants>
FASTATTN_INLINE bool group_ctx(const Params& p, const KeyBounds& kb, const Blocking& c, const ItemBuffers& bf,
                               const MaskTileInfo& mi, bool has_mask, int64_t i0, int64_t g, int64_t nq, int64_t j0,
                               int64_t nk, ScoreCtx& sc) {
  const int64_t gi0 = i0 + g * QG;
  const int64_t glast = std::min(i0 + nq, gi0 + QG) - 1;
  // Query i sees keys j <= i + hi (KeyBounds): skip a block that starts past the group's last row's bound;
  // per-lane hiding is needed only where the block ends past its first row's.
  if (kb.upper && j0 > glast + kb.hi) return false;
  sc.causal = kb.upper && j0 + nk - 1 > gi0 + kb.hi;
  for (int v = 0; v < QV; ++v) sc.iq[v] = iota_f(static_cast<float>(gi0 + kb.hi + v * W));
  if constexpr (kVariants) {
    // And keys j >= i + lo: skip a block that ends before the group's first row's bound.
    if (kb.lower && j0 + nk - 1 < gi0 + kb.lo) return false;
    sc.lower = kb.lower && j0 < glast + kb.lo;
    for (int v = 0; v < QV; ++v) {
      sc.ilo[v] = iota_f(static_cast<float>(gi0 + kb.lo + v * W));
      sc.ipos[v] = iota_f(static_cast<float>(gi0 + p.causal_offset + v * W));
    }
  }
  sc.j0 = j0;
  if (has_mask && !mi.all_zero) {
    sc.mt_shared = mi.rows_shared;
    sc.mt = mi.rows_shared ? bf.mt : bf.mt + g * QG;
    sc.mt_ld = c.BM;
  } else {
    sc.mt = nullptr;
  }
  return true;
}

// The keys query rows [i_begin, i_end) may see: [0, S), cut to end at the last row's i + hi + 1 (causal / right
// window) and to start at the first row's i + lo (left window), both clamped to [0, S].
FASTATTN_INLINE int64_t key_end(const Params& p, const KeyBounds& kb, int64_t i_end) {
  return kb.upper ? std::min(p.S, std::max<int64_t>(0, i_end + kb.hi)) : p.S;
}
FASTATTN_INLINE int64_t key_begin(const Params& p, const KeyBounds& kb, int64_t i_begin) {
  return kb.lower ? std::min(p.S, std::max<int64_t>(0, i_begin + kb.lo)) : 0;
}

// The mask tile is never written for the padding lanes (queries past the end): keep them finite.
void zero_padded_lanes(const Blocking& c, int64_t nq, int64_t ngroups, float* mt) {
  if (nq == ngroups * QG) return;
  for (int64_t n = 0; n < c.BN; ++n) std::fill(mt + n * c.BM + nq, mt + n * c.BM + ngroups * QG, 0.f);
}

// ------------------------------------------------------------------------------------ operands

// The two ways a work item forms its products; forward_item is written once over them.
//
// WidenedOperands<T> (any T): Q^T packed as fp32 already scaled by scale * log2(e), K and V widened to fp32
// per key block (float32 K / V with unit column stride read in place), fp32 FMAs.
template <typename T>
struct WidenedOperands {
  using Elem = T;
  using Tile = TileF32;
  static constexpr bool kBf16Pairs = false;            // softmax_update leaves p in bf.st as fp32
  static constexpr int kExpDegree = kWidenedExpDegree<T>;
  static constexpr bool kCanStoreOutputRows = true;    // a single-block item may store out from PV (OutRows)

  const Params& p;
  ItemBuffers& bf;
  const T* kbase;
  const T* vbase;
  bool k_direct, v_direct;
  bool eo;  // bfloat16 with whole 32-element groups: K widened and Q^T packed in even-odd order (convert_rows_eo)
  float qscale;
  const float* kt = nullptr;  // K of the current key block, rows of E
  int64_t ldk = 0;
  const float* vt = nullptr;  // V of the current key block, rows of Evp
  int64_t ldv = 0;

  FASTATTN_INLINE WidenedOperands(const Params& p_, const Blocking&, ItemBuffers& bf_, int64_t b, int64_t hk)
      : p(p_), bf(bf_), kbase(p_.k.at<T>(b, hk, 0)), vbase(p_.v.at<T>(b, hk, 0)) {
    k_direct = std::is_same<T, float>::value && p.k.se == 1;
    v_direct = std::is_same<T, float>::value && p.v.se == 1 && p.Ev % W == 0;
#if defined(FASTATTN_HAVE_AVX512)
    eo = std::is_same<T, bf16_t>::value && p.E % 32 == 0 && p.q.se == 1 && p.k.se == 1;
#else
    eo = false;
#endif
    qscale = static_cast<float>(p.scale) * kLog2e;
  }
  FASTATTN_INLINE void set_score_scale(ScoreCtx&) const {}  // Q^T is packed already scaled
  FASTATTN_INLINE int64_t depth() const { return p.E; }
  // Q^T of query rows [i0, i0 + nq), zero-padded to `rows` rows, into bf.qt.
  FASTATTN_INLINE void pack_q(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t rows) {
    pack_qt_f32<T>(p, b, h, i0, nq, rows, qscale, bf.qt, eo);
  }
  FASTATTN_INLINE const float* q_group(int64_t g) const { return bf.qt + g * p.E * QG; }
  // K and V of keys [j0, j0 + nk).
  FASTATTN_INLINE void load_key_block(const Blocking& c, int64_t j0, int64_t nk) {
    if (k_direct) {
      kt = reinterpret_cast<const float*>(kbase) + j0 * p.k.sl;
      ldk = p.k.sl;
    } else {
#if defined(FASTATTN_HAVE_AVX512)
      if (eo)
        convert_rows_eo(reinterpret_cast<const uint16_t*>(kbase + j0 * p.k.sl), p.k.sl, nk, p.E, bf.kc, p.E);
      else
#endif
        convert_rows<T>(kbase + j0 * p.k.sl, p.k.sl, p.k.se, nk, p.E, bf.kc, p.E);
      kt = bf.kc;
      ldk = p.E;
    }
    if (v_direct) {
      vt = reinterpret_cast<const float*>(vbase) + j0 * p.v.sl;
      ldv = p.v.sl;
    } else {
      convert_rows<T>(vbase + j0 * p.v.sl, p.v.sl, p.v.se, nk, p.Ev, bf.vc, c.Evp);
      vt = bf.vc;
      ldv = c.Evp;
    }
  }
  // The P^T operand of PV after softmax_update, and its rows for nk keys.
  FASTATTN_INLINE const float* probs() const { return bf.st; }
  static FASTATTN_INLINE int64_t prob_rows(int64_t nk) { return nk; }
};

#if defined(FASTATTN_HAVE_AVX512BF16)
// Bf16DotOperands (bfloat16 inputs, AVX512-BF16): Q^T, K, P^T and V as pairs of bf16 in 32-bit words,
// vdpbf16ps products (exact bf16 products, fp32 sums); the scores are scaled in score_store.
struct Bf16DotOperands {
  using Elem = bf16_t;
  using Tile = TileBF16;
  static constexpr bool kBf16Pairs = true;             // softmax_update writes p to bf.pp as bf16 pairs
  static constexpr int kExpDegree = 3;
  static constexpr bool kCanStoreOutputRows = false;

  const Params& p;
  ItemBuffers& bf;
  const uint16_t* kbase;
  const uint16_t* vbase;
  int64_t E2;
  bool k_direct;
  uint32_t* qt;
  uint16_t* kc;
  uint32_t* vp;
  const uint16_t* kt = nullptr;  // K of the current key block, rows of 2 * E2 (pairs along e)
  int64_t ldk = 0;
  const uint32_t* vt = nullptr;  // V of the current key block as (key pair, ev) words
  int64_t ldv = 0;

  FASTATTN_INLINE Bf16DotOperands(const Params& p_, const Blocking& c, ItemBuffers& bf_, int64_t b, int64_t hk)
      : p(p_), bf(bf_), kbase(p_.k.at<uint16_t>(b, hk, 0)), vbase(p_.v.at<uint16_t>(b, hk, 0)), E2(c.E2),
        k_direct(p_.k.se == 1 && p_.E % 2 == 0), qt(reinterpret_cast<uint32_t*>(bf_.qt)),
        kc(reinterpret_cast<uint16_t*>(bf_.kc)), vp(reinterpret_cast<uint32_t*>(bf_.vc)), vt(vp), ldv(c.Evp) {}
  FASTATTN_INLINE void set_score_scale(ScoreCtx& sc) const { sc.c = static_cast<float>(p.scale) * kLog2e; }
  FASTATTN_INLINE int64_t depth() const { return E2; }
  FASTATTN_INLINE void pack_q(int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t rows) {
    pack_qt_bf16(p, b, h, i0, nq, rows, E2, qt);
  }
  FASTATTN_INLINE const uint32_t* q_group(int64_t g) const { return qt + g * E2 * QG; }
  FASTATTN_INLINE void load_key_block(const Blocking& c, int64_t j0, int64_t nk) {
    if (k_direct) {
      kt = kbase + j0 * p.k.sl;
      ldk = p.k.sl;
    } else {
      ldk = 2 * E2;
      for (int64_t n = 0; n < nk; ++n) {
        const uint16_t* row = kbase + (j0 + n) * p.k.sl;
        for (int64_t e = 0; e < ldk; ++e) kc[n * ldk + e] = e < p.E ? row[e * p.k.se] : uint16_t(0);
      }
      kt = kc;
    }
    pack_v_pairs(vbase + j0 * p.v.sl, p.v.sl, p.v.se, nk, p.Ev, c.Evp, vp);
  }
  FASTATTN_INLINE const uint32_t* probs() const { return bf.pp; }
  static FASTATTN_INLINE int64_t prob_rows(int64_t nk) { return (nk + 1) / 2; }  // key pairs
};
#endif  // FASTATTN_HAVE_AVX512BF16

// ------------------------------------------------------------------------------------ work item

// One work item: head (b, h), query block qb. Visits the key blocks the mask and causality leave visible once,
// updating each group's running max / sum and O (forward.cpp's header), then writes out and lse.
// kVariants: the call has a soft-cap, ALiBi or a left window bound (Params::score_variants): the micro-kernels
// store plain scores and variant_scores applies those, the mask and the hiding in a second pass.
template <typename Operands, bool kVariants>
void forward_item(const Params& p, const Blocking& c, ItemBuffers& bf, int64_t b, int64_t h, int64_t qb) {
  using T = typename Operands::Elem;
  using Tile = typename Operands::Tile;
  const int64_t i0 = qb * c.BM, nq = std::min(c.BM, p.L - i0);
  const int64_t ngroups = (nq + QG - 1) / QG;
  const KeyBounds kb = key_bounds(p);
  const int64_t kend = key_end(p, kb, i0 + nq);
  const MaskView mv = mask_view(p, b, h);
  const bool has_mask = mv.dtype != kNone;
  Operands ops(p, c, bf, b, p.kv_head(h));
  ScoreCtx sc;
  ops.set_score_scale(sc);
  if constexpr (kVariants) {
    sc.cap2 = p.softcap > 0.0 ? static_cast<float>(p.softcap) * kLog2e : 0.f;
    sc.inv_cap2 = p.softcap > 0.0 ? 1.f / sc.cap2 : 0.f;
    sc.slope2 = p.alibi_slope(b, h) * kLog2e;
  }
  // A padding mask (same for every query) trims the key loop to its visible span; a left window bound cuts its
  // start to the first row's.
  auto span = has_mask ? visible_key_range(mv, kend) : std::make_pair(int64_t(0), kend);
  if constexpr (kVariants) span.first = std::max(span.first, key_begin(p, kb, i0));
  // A single key block (short sequences) with dense output rows and no out_lo: PV stores the output rows
  // itself (OutRows); write_output then writes only lse and the rows of groups that saw no key. O is then
  // zeroed only for those groups, after the block, and each group's Q^T is packed just before its QK^T
  // into one slot that stays in L1. Sinks change the denominator after the last block: not with OutRows.
  const bool one_block = Operands::kCanStoreOutputRows && span.second - span.first <= c.BN && p.out_lo.ptr == 0 &&
                         p.out.se == 1 && p.sinks == 0;
  if (!one_block) {
    ops.pack_q(b, h, i0, nq, ngroups * QG);
    std::fill(bf.o, bf.o + ngroups * QG * c.Evp, 0.f);
  }
  std::fill(bf.m, bf.m + ngroups * QG, kNegInf);
  std::fill(bf.l, bf.l + ngroups * QG, 0.f);
  if (has_mask) zero_padded_lanes(c, nq, ngroups, bf.mt);
  const float dscale = static_cast<float>(p.dropout_scale());
  bool written[kMaxBM / QG] = {};
  for (int64_t j0 = span.first; j0 < span.second; j0 += c.BN) {
    const int64_t nk = std::min(c.BN, span.second - j0);
    MaskTileInfo mi;
    if (has_mask) {
      mi = mask_tile(mv, i0, nq, j0, nk, bf.mt, c.BM);
      if (mi.all_hidden) continue;
    }
    ops.load_key_block(c, j0, nk);
    for (int64_t g = 0; g < ngroups; ++g) {
      if (!group_ctx<kVariants>(p, kb, c, bf, mi, has_mask, i0, g, nq, j0, nk, sc)) continue;
      vf mx[QV];
      for (int v = 0; v < QV; ++v) mx[v] = simd::set1(kNegInf);
      auto qt = ops.q_group(g);
      if (one_block) {
        ops.pack_q(b, h, i0 + g * QG, std::min<int64_t>(QG, nq - g * QG), QG);
        qt = ops.q_group(0);
      }
      if constexpr (kVariants) {
        ScoreCtx plain = sc;  // plain base-2 scores first: no mask, no hiding
        plain.mt = nullptr;
        plain.causal = false;
        qk_group<Tile>(qt, ops.kt, ops.ldk, ops.depth(), nk, plain, bf.st, mx);
        variant_scores(sc, nk, bf.st, mx);
      } else {
        qk_group<Tile>(qt, ops.kt, ops.ldk, ops.depth(), nk, sc, bf.st, mx);
      }
      if (!softmax_update<Operands::kBf16Pairs, Operands::kExpDegree>(p, bf, b, h, i0 + g * QG, g * QG, j0, nk, mx))
        continue;
      const int64_t nrows = std::min<int64_t>(QG, nq - g * QG);
      if constexpr (Operands::kCanStoreOutputRows) {
        if (one_block) {
          alignas(64) float fac[QG];
          row_factors(bf.l + g * QG, nullptr, nrows, dscale, fac, nullptr);
          const OutRows<T> d{p.out.at<T>(b, h, i0 + g * QG), p.out.sl, fac, 0, p.Ev};
          pv_group<Tile>(ops.probs(), Operands::prob_rows(nk), ops.vt, ops.ldv, d, nrows, c.Evp);
          written[g] = true;
          continue;
        }
      }
      pv_group<Tile>(ops.probs(), Operands::prob_rows(nk), ops.vt, ops.ldv,
                     OAcc{bf.o + g * QG * c.Evp, c.Evp, bf.alpha + g * QG}, nrows, c.Evp);
    }
  }
  if (one_block) {
    for (int64_t g = 0; g < ngroups; ++g)
      if (!written[g]) std::fill(bf.o + g * QG * c.Evp, bf.o + (g + 1) * QG * c.Evp, 0.f);
  }
  write_output<T>(p, c, bf, b, h, i0, nq, Operands::kCanStoreOutputRows ? written : nullptr);
}

// ------------------------------------------------------------------------------------ float64

// Exact two-pass softmax per query row in double (for gradcheck): s_j, m = max s, l = sum e^(s-m) [+ e^(sink-m)].
void forward_f64(const Params& p) {
  const int64_t rows = p.B * p.H * p.L;
  std::vector<Scratch> scratch(static_cast<size_t>(std::max(1, p.num_threads)));
  const double ninf = -std::numeric_limits<double>::infinity();
  parallel_for(rows, p.num_threads, [&](int64_t r0, int64_t r1, int tid) {
    double* buf = static_cast<double*>(scratch[static_cast<size_t>(tid)].get(
        static_cast<size_t>(p.S + p.Ev) * sizeof(double)));
    double* s = buf;
    double* acc = buf + p.S;
    const Params& call = p;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (call.H * call.L), h = (r / call.L) % call.H, i = r % call.L;
      const Params pb = item_params(call, b);  // varlen: item b's rows and lengths
      const Params& p = pb;
      if (i >= p.L) continue;
      const int64_t hk = p.kv_head(h);
      const MaskView mv = mask_view(p, b, h);
      const double* q = p.q.at<double>(b, h, i);
      const KeyBounds kb = key_bounds(p);
      const int64_t kbeg = key_begin(p, kb, i), kend = key_end(p, kb, i + 1);
      const double cap = p.softcap, slope = p.alibi_slope(b, h);
      const double ipos = static_cast<double>(i) + static_cast<double>(p.causal_offset);
      double m = ninf;
      for (int64_t j = 0; j < kend; ++j) {
        double x = j < kbeg ? ninf : mv.dtype == kNone ? 0.0 : mask_value<double>(mv, i, j, 1.0);
        if (x != ninf) {
          const double* k = p.k.at<double>(b, hk, j);
          double d = 0.0;
          for (int64_t e = 0; e < p.E; ++e) d += q[e * p.q.se] * k[e * p.k.se];
          d *= p.scale;
          if (cap > 0.0) d = cap * std::tanh(d / cap);
          if (p.alibi != 0) d += slope * (static_cast<double>(j) - ipos);
          x += d;
        }
        s[j] = x;
        if (x > m || x != x) m = x;  // a NaN score makes the row NaN (as in torch), never "empty"
      }
      double* out = p.out.at<double>(b, h, i);
      float lse_dummy;  // p.lse may be absent (ptr 0)
      float* lse = p.lse.ptr == 0 ? &lse_dummy
                                  : reinterpret_cast<float*>(p.lse.ptr) + b * p.lse.sb + h * p.lse.sh + i * p.lse.sl;
      const double sink = p.sinks != 0 ? static_cast<double>(reinterpret_cast<const float*>(p.sinks)[h]) : ninf;
      if (sink > m) m = sink;  // the sink joins the denominator (a NaN m stays NaN)
      if (m == ninf) {
        for (int64_t e = 0; e < p.Ev; ++e) out[e * p.out.se] = 0.0;
        *lse = -std::numeric_limits<float>::infinity();
        continue;
      }
      double l = sink == ninf ? 0.0 : std::exp(sink - m);
      std::fill(acc, acc + p.Ev, 0.0);
      for (int64_t j = 0; j < kend; ++j) {
        if (s[j] == ninf) continue;
        const double pj = std::exp(s[j] - m);
        l += pj;
        if (p.dropout_p > 0.0 && !dropout_keep(p.seed, b, h, i, j, p.thr)) continue;
        const double* v = p.v.at<double>(b, hk, j);
        for (int64_t e = 0; e < p.Ev; ++e) acc[e] += pj * v[e * p.v.se];
      }
      const double f = p.dropout_scale() / l;
      for (int64_t e = 0; e < p.Ev; ++e) out[e * p.out.se] = acc[e] * f;
      *lse = static_cast<float>(m + std::log(l));
    }
  }, 16);
}

template <typename Item>
void run_items(const Params& p, Item item) {
  const Blocking c = choose_blocking(p);
  Arena plan;
  ItemBuffers sizing;
  const size_t bytes = plan_item_buffers(p, c, plan, sizing);
  std::vector<ItemBuffers> bufs(static_cast<size_t>(std::max(1, p.num_threads)));
  const int64_t n_items = p.B * p.H * c.nqb;
  parallel_for(n_items, p.num_threads, [&](int64_t t0, int64_t t1, int tid) {
    ItemBuffers& bf = bufs[static_cast<size_t>(tid)];
    if (bf.o == nullptr) {
      Arena a;
      a.base = static_cast<char*>(thread_scratch().get(bytes));
      plan_item_buffers(p, c, a, bf);
    }
    for (int64_t t = t0; t < t1; ++t) {
      // Items ordered (b, h, query block); a causal mask makes later blocks heavier (row i sees i + 1 +
      // causal_offset keys, clipped to [0, S]), so hand out the heavy ones first for a better dynamic balance.
      const int64_t qb = p.is_causal ? c.nqb - 1 - t % c.nqb : t % c.nqb;
      const int64_t bh = t / c.nqb, b = bh / p.H;
      if (p.cu_q == 0) {
        item(p, c, bf, b, bh % p.H, qb);
        continue;
      }
      const Params pb = item_params(p, b);  // varlen: item b's rows and lengths (c from the maxima)
      if (qb * c.BM < pb.L) item(pb, c, bf, b, bh % p.H, qb);
    }
  }, 1);
}

}  // namespace

const char* forward_params_error(const Params& p) {
  if (p.B < 0 || p.H < 1 || p.Hk < 1 || p.L < 0 || p.S < 0 || p.E < 1 || p.Ev < 1)
    return "sizes must satisfy B, L, S >= 0 and H, Hk, E, Ev >= 1";
  if (p.H % p.Hk != 0) return "H must be a multiple of Hk";
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16 && p.dtype != kF64) return "unsupported dtype code";
  if (p.mask_dtype != kNone && p.mask_dtype != kBool && p.mask_dtype != kF32 && p.mask_dtype != p.dtype)
    return "mask dtype must be bool, float32 or the dtype of q";
  if (!(p.dropout_p >= 0.0 && p.dropout_p < 1.0)) return "dropout_p must be in [0, 1)";
  if (p.B * p.H * p.L > 0 && (p.q.ptr == 0 || p.out.ptr == 0)) return "null q/out pointer";  // lse: optional
  if (p.B * p.L * p.S > 0 && (p.k.ptr == 0 || p.v.ptr == 0)) return "null k/v pointer";
  if (p.mask_dtype != kNone && p.mask.ptr == 0) return "null mask pointer";
  if (p.out_lo.ptr != 0 && p.dtype != kF16 && p.dtype != kBF16) return "out_lo is for float16 / bfloat16 only";
  if (p.window_left < -1 || p.window_right < -1) return "window bounds must be >= -1 (-1: unbounded)";
  if (!(p.softcap >= 0.0) || std::isinf(p.softcap)) return "softcap must be finite and >= 0 (0: off)";
  if (p.cu_q != 0 && p.any_variant()) return "window / softcap / alibi / sinks need a regular (not packed) batch";
  return nullptr;
}

void check_forward_params(const Params& p) {
  if (const char* why = forward_params_error(p)) throw std::invalid_argument(std::string("fastattn fwd: ") + why);
}

namespace {
template <bool kVariants>
void forward_typed(const Params& p) {
  switch (p.dtype) {
    case kF32: return run_items(p, forward_item<WidenedOperands<float>, kVariants>);
    case kF16: return run_items(p, forward_item<WidenedOperands<f16_t>, kVariants>);
    case kBF16:
#if defined(FASTATTN_HAVE_AVX512BF16)
      if (bf16_dot_pays()) return run_items(p, forward_item<Bf16DotOperands, kVariants>);
#endif
      return run_items(p, forward_item<WidenedOperands<bf16_t>, kVariants>);
    default: throw std::invalid_argument("fastattn fwd: unsupported dtype");
  }
}
}  // namespace

void forward(const Params& p) {
  if (p.B == 0 || p.L == 0) return;
  if (!causal_offset_in_range(p)) return forward(with_causal_offset_in_range(p));
  if (p.dtype == kF64) return forward_f64(p);
  if (p.score_variants()) return forward_typed<true>(p);
  return forward_typed<false>(p);
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
