// fastattn CPU forward: the register-tiled products S^T = K Q^T and O += P V, fp32 and (AVX512-BF16)
// vdpbf16ps, their score epilogue (scale, mask, causal hiding, running max) and the row / column blocking
// around them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "forward_tiling.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {  // forward.cpp's own: this header is included there only

// ------------------------------------------------------------------------------------ lane helpers

#if defined(FASTATTN_HAVE_AVX512)
// s where j <= iq (lane-wise; iq = i + causal_offset, the last key query i sees), -inf past it (causal).
FASTATTN_INLINE vf causal_hide(vf s, vf iq, float j) {
  return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(iq, _mm512_set1_ps(j), _CMP_LT_OQ), _mm512_set1_ps(kNegInf));
}
// s where j >= ilo (lane-wise; ilo = the lane's first visible key, a left window bound), -inf before it.
FASTATTN_INLINE vf before_hide(vf s, vf ilo, float j) {
  return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(_mm512_set1_ps(j), ilo, _CMP_LT_OQ), _mm512_set1_ps(kNegInf));
}
// m, or 0 where m = -inf (the exponent base for rows that have seen no visible key).
FASTATTN_INLINE vf finite_base(vf m) {
  return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ), _mm512_setzero_ps());
}
FASTATTN_INLINE bool all_neg_inf(vf x) {
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(kNegInf), _CMP_NEQ_UQ) == 0;
}
// s, or -inf where the mask m is -inf: a hidden key stays hidden even if its score is NaN (NaN + -inf).
FASTATTN_INLINE vf mask_hide(vf s, vf m) {
  return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(m, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ), m);
}
FASTATTN_INLINE vf iota_f(float base) {
  return _mm512_add_ps(_mm512_set1_ps(base),
                       _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
#elif defined(FASTATTN_HAVE_AVX2)
FASTATTN_INLINE vf causal_hide(vf s, vf iq, float j) {
  return _mm256_blendv_ps(s, _mm256_set1_ps(kNegInf), _mm256_cmp_ps(iq, _mm256_set1_ps(j), _CMP_LT_OQ));
}
FASTATTN_INLINE vf before_hide(vf s, vf ilo, float j) {
  return _mm256_blendv_ps(s, _mm256_set1_ps(kNegInf), _mm256_cmp_ps(_mm256_set1_ps(j), ilo, _CMP_LT_OQ));
}
FASTATTN_INLINE vf finite_base(vf m) {
  return _mm256_blendv_ps(m, _mm256_setzero_ps(), _mm256_cmp_ps(m, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ));
}
FASTATTN_INLINE bool all_neg_inf(vf x) {
  return _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(kNegInf), _CMP_NEQ_UQ)) == 0;
}
FASTATTN_INLINE vf mask_hide(vf s, vf m) {
  return _mm256_blendv_ps(s, m, _mm256_cmp_ps(m, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ));
}
FASTATTN_INLINE vf iota_f(float base) {
  return _mm256_add_ps(_mm256_set1_ps(base), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
}
#else
FASTATTN_INLINE vf causal_hide(vf s, vf iq, float j) {
  for (int l = 0; l < W; ++l) s.v[l] = iq.v[l] < j ? kNegInf : s.v[l];
  return s;
}
FASTATTN_INLINE vf before_hide(vf s, vf ilo, float j) {
  for (int l = 0; l < W; ++l) s.v[l] = j < ilo.v[l] ? kNegInf : s.v[l];
  return s;
}
FASTATTN_INLINE vf finite_base(vf m) {
  for (int l = 0; l < W; ++l) m.v[l] = m.v[l] == kNegInf ? 0.f : m.v[l];
  return m;
}
FASTATTN_INLINE bool all_neg_inf(vf x) {
  for (int l = 0; l < W; ++l)
    if (!(x.v[l] == kNegInf)) return false;
  return true;
}
FASTATTN_INLINE vf mask_hide(vf s, vf m) {
  for (int l = 0; l < W; ++l) s.v[l] = m.v[l] == kNegInf ? kNegInf : s.v[l];
  return s;
}
FASTATTN_INLINE vf iota_f(float base) {
  vf r;
  for (int l = 0; l < W; ++l) r.v[l] = base + static_cast<float>(l);
  return r;
}
#endif

// ------------------------------------------------------------------------------------ score epilogue

// What turns raw dot products of one group into base-2 scores for one key block.
struct ScoreCtx {
  float c = 0.f;              // scale * log2(e) (the bf16-dot path; the fp32 path packs Q^T already scaled)
  const float* mt = nullptr;  // mask tile column base for this group (nullptr: no mask)
  int64_t mt_ld = 0;          // mask tile row (key) stride
  bool mt_shared = false;     // one value per key (mask row stride 0): broadcast it to every lane
  bool causal = false;        // some key of the block lies past some query's last visible key
  vf iq[QV];                  // each lane's last visible key i + hi (causal / right window, KeyBounds), as float
  int64_t j0 = 0;             // first key of the block
  // The variant path only (variant_scores):
  bool lower = false;         // some key of the block lies before some query's first visible key
  vf ilo[QV];                 // each lane's first visible key i + lo (left window)
  vf ipos[QV];                // each lane's position i' = i + causal_offset (ALiBi)
  float cap2 = 0.f;           // log2(e) * softcap (0: no soft-cap)
  float inv_cap2 = 0.f;       // 1 / cap2
  float slope2 = 0.f;         // log2(e) * the head's ALiBi slope (0: none)
};

// s = c * acc + mask (-inf where the mask is -inf, even for a NaN score), then causal -inf; stores S^T row n and
// folds it into the lane-wise max. kScaled: acc already holds c * <q, k> (Q^T packed times c), so no multiply.
template <bool kScaled>
FASTATTN_INLINE void score_store(const ScoreCtx& sc, int64_t n, vf* acc, float* st, vf* mx) {
  const vf cv = simd::set1(sc.c);
#pragma GCC unroll 4
  for (int v = 0; v < QV; ++v) {
    vf s;
    if (sc.mt == nullptr) {
      s = kScaled ? acc[v] : simd::mul(acc[v], cv);
    } else {
      const vf m = sc.mt_shared ? simd::set1(sc.mt[n * sc.mt_ld]) : simd::load(sc.mt + n * sc.mt_ld + v * W);
      s = mask_hide(kScaled ? simd::add(acc[v], m) : simd::fmadd(acc[v], cv, m), m);
    }
    if (sc.causal) s = causal_hide(s, sc.iq[v], static_cast<float>(sc.j0 + n));
    simd::store(st + n * QG + v * W, s);
    mx[v] = simd::max(mx[v], s);
  }
}

// The variant epilogue, a second pass over the block's S^T (nk rows of QG) that the micro-kernels stored as plain
// base-2 scores s = log2(e) scale <q, k> (no mask, no hiding): in base 2, with c2 = log2(e) softcap and
// a2 = log2(e) slope,
//   s = c2 tanh(s / c2);  s += a2 (j - i');  s += mask (-inf stays -inf);  -inf past i + hi and before i + lo,
// and the lane-wise max mx from scratch. Only calls with a soft-cap, ALiBi or a left window bound come here, so
// the micro-kernels of the plain call stay as they are.
FASTATTN_INLINE void variant_scores(const ScoreCtx& sc, int64_t nk, float* st, vf* mx) {
  const vf cap = simd::set1(sc.cap2), inv_cap = simd::set1(sc.inv_cap2), slope = simd::set1(sc.slope2);
  for (int v = 0; v < QV; ++v) mx[v] = simd::set1(kNegInf);
  for (int64_t n = 0; n < nk; ++n) {
    const float j = static_cast<float>(sc.j0 + n);
    const vf jv = simd::set1(j);
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) {
      vf s = simd::load(st + n * QG + v * W);
      if (sc.cap2 > 0.f) s = simd::mul(cap, simd::tanh(simd::mul(s, inv_cap)));
      if (sc.slope2 != 0.f) s = simd::fmadd(slope, simd::sub(jv, sc.ipos[v]), s);
      if (sc.mt != nullptr) {
        const vf m = sc.mt_shared ? simd::set1(sc.mt[n * sc.mt_ld]) : simd::load(sc.mt + n * sc.mt_ld + v * W);
        s = mask_hide(simd::add(s, m), m);
      }
      if (sc.causal) s = causal_hide(s, sc.iq[v], j);
      if (sc.lower) s = before_hide(s, sc.ilo[v], j);
      simd::store(st + n * QG + v * W, s);
      mx[v] = simd::max(mx[v], s);
    }
  }
}

// ------------------------------------------------------------------------------------ fp32 micro-kernels

// S^T[n][q] for NR keys: acc[r][v] = sum_e Q^T[e][v*W + lane] * K[n0 + r][e]  (K rows broadcast; Q^T holds c * q).
template <int NR>
FASTATTN_INLINE void qk_tile_f32(const float* FASTATTN_RESTRICT qt, const float* FASTATTN_RESTRICT k,
                                 int64_t ldk, int64_t E, int64_t n0, const ScoreCtx& sc, float* st, vf* mx) {
  vf acc[NR][QV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) acc[r][v] = simd::zero();
  const float* kr = k + n0 * ldk;
  for (int64_t e = 0; e < E; ++e) {
    vf a[QV];
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) a[v] = simd::load(qt + e * QG + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const vf kb = simd::set1(kr[r * ldk + e]);
#pragma GCC unroll 4
      for (int v = 0; v < QV; ++v) acc[r][v] = simd::fmadd(a[v], kb, acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) score_store<true>(sc, n0 + r, acc[r], st, mx);
}

// f(r, x) for each accumulator of a QR x EVV micro-tile, unrolled.
template <int QR, int EVV, typename F>
FASTATTN_INLINE void each_acc(F&& f) {
#pragma GCC unroll 16
  for (int r = 0; r < QR; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < EVV; ++x) f(r, x);
}

// Where a PV micro-tile's QR x EVV accumulators start and end; at(r, x) moves to row r, vector column x.
// OAcc: the O buffer of the online softmax: acc = alpha * O before the key block, O = acc after it.
struct OAcc {
  float* o;
  int64_t ldo;
  const float* alpha;
  OAcc at(int64_t r, int64_t x) const { return {o + r * ldo + x * W, ldo, alpha + r}; }
  template <int QR, int EVV>
  FASTATTN_INLINE void init(vf (&acc)[QR][EVV]) const {
    each_acc<QR, EVV>([&](int r, int x) { acc[r][x] = simd::mul(simd::load(o + r * ldo + x * W), simd::set1(alpha[r])); });
  }
  template <int QR, int EVV>
  FASTATTN_INLINE void finish(vf (&acc)[QR][EVV]) const {
    each_acc<QR, EVV>([&](int r, int x) { simd::store(o + r * ldo + x * W, acc[r][x]); });
  }
};

// The output rows themselves, when the item has a single key block (no rescaling ever needed): acc starts at
// 0 and ends as out[r][ev] = T(acc * fac[r]) (fac = dropout scale / l), skipping O and write_output's pass.
template <typename T>
struct OutRows {
  T* out;
  int64_t ld;
  const float* fac;
  int64_t ev0, Ev;  // first column of this tile, columns in all
  OutRows at(int64_t r, int64_t x) const { return {out + r * ld, ld, fac + r, ev0 + x * W, Ev}; }
  template <int QR, int EVV>
  FASTATTN_INLINE void init(vf (&acc)[QR][EVV]) const {
    each_acc<QR, EVV>([&](int r, int x) { acc[r][x] = simd::zero(); });
  }
  template <int QR, int EVV>
  FASTATTN_INLINE void finish(vf (&acc)[QR][EVV]) const {
    each_acc<QR, EVV>([&](int r, int x) {
      const int64_t col = ev0 + x * W;
      const vf y = simd::mul(acc[r][x], simd::set1(fac[r]));
      if (col + W <= Ev)
        simd::store_cvt(out + r * ld + col, y);
      else if (col < Ev)
        simd::store_cvt_n(out + r * ld + col, y, Ev - col);
    });
  }
};

// acc[r][x] (row q0 + r, columns ev0 + x*W + lane) += sum_n P^T[n][q0 + r] * V[n][ev0 + x*W + lane], between
// d.init and d.finish.
template <int QR, int EVV, typename Dst>
FASTATTN_INLINE void pv_tile_f32(const float* FASTATTN_RESTRICT st, int64_t nk, const float* FASTATTN_RESTRICT v,
                                 int64_t ldv, const Dst& d) {
  vf acc[QR][EVV];
  d.init(acc);
  for (int64_t n = 0; n < nk; ++n) {
    vf vv[EVV];
#pragma GCC unroll 4
    for (int x = 0; x < EVV; ++x) vv[x] = simd::load(v + n * ldv + x * W);
#pragma GCC unroll 16
    for (int r = 0; r < QR; ++r) {
      const vf pb = simd::set1(st[n * QG + r]);
#pragma GCC unroll 4
      for (int x = 0; x < EVV; ++x) acc[r][x] = simd::fmadd(pb, vv[x], acc[r][x]);
    }
  }
  d.finish(acc);
}

// ------------------------------------------------------------------------------------ blocking shells

// The row / column blocking around a micro-tile, shared by the fp32 and the bf16 (vdpbf16ps) kernels.
// Tile::qk<NR>(qt, k, ldk, depth, n0, sc, st, mx): scores of NR keys; Tile::pv<QR, EVV>(p, n, v, ldv, d):
// QR output rows x EVV vectors of Ev into destination d (OAcc or OutRows).

// All nk keys of a block for one group: kNR-key tiles, then one narrower tile for the rest.
template <typename Tile, int NR, typename QT, typename KT>
void qk_rest(const QT* qt, const KT* k, int64_t ldk, int64_t depth, int64_t n0, int64_t nr, const ScoreCtx& sc,
             float* st, vf* mx) {
  if constexpr (NR > 1) {
    if (nr < NR) return qk_rest<Tile, NR - 1>(qt, k, ldk, depth, n0, nr, sc, st, mx);
  }
  Tile::template qk<NR>(qt, k, ldk, depth, n0, sc, st, mx);
}

template <typename Tile, typename QT, typename KT>
void qk_group(const QT* qt, const KT* k, int64_t ldk, int64_t depth, int64_t nk, const ScoreCtx& sc, float* st,
              vf* mx) {
  int64_t n = 0;
  for (; n + kNR <= nk; n += kNR) Tile::template qk<kNR>(qt, k, ldk, depth, n, sc, st, mx);
  if (n < nk) qk_rest<Tile, kNR - 1>(qt, k, ldk, depth, n, nk - n, sc, st, mx);
}

// Query rows of a PV micro-tile with evv vectors of Ev: as many as the accumulator budget allows.
constexpr int qr_for(int evv) { return std::min(QG, std::max(1, kAccBudget / evv)); }

// The last 0 < rows < QR rows in one tile of that many rows: one-row tiles have too few independent
// accumulators to hide the FMA latency.
template <typename Tile, int EVV, int QR, typename PT, typename VT, typename Dst>
void pv_rest(const PT* pt, int64_t n, const VT* v, int64_t ldv, const Dst& d, int64_t rows) {
  if constexpr (QR > 1) {
    if (rows < QR) return pv_rest<Tile, EVV, QR - 1>(pt, n, v, ldv, d, rows);
  }
  Tile::template pv<QR, EVV>(pt, n, v, ldv, d);
}

template <typename Tile, int EVV, typename PT, typename VT, typename Dst>
void pv_cols(const PT* pt, int64_t n, const VT* v, int64_t ldv, const Dst& d, int64_t nrows) {
  constexpr int QR = qr_for(EVV);
  int64_t r = 0;
  for (; r + QR <= nrows; r += QR) Tile::template pv<QR, EVV>(pt + r, n, v, ldv, d.at(r, 0));
  if constexpr (QR > 1) {
    if (r < nrows) pv_rest<Tile, EVV, QR - 1>(pt + r, n, v, ldv, d.at(r, 0), nrows - r);
  }
}

// The whole group (rows [0, nrows) of the group, all Evp columns).
template <typename Tile, typename PT, typename VT, typename Dst>
void pv_group(const PT* pt, int64_t n, const VT* v, int64_t ldv, const Dst& d, int64_t nrows, int64_t Evp) {
  const int64_t nvec = Evp / W;
  int64_t x = 0;
  for (; x + 4 <= nvec; x += 4) pv_cols<Tile, 4>(pt, n, v + x * W, ldv, d.at(0, x), nrows);
  switch (nvec - x) {
    case 3: pv_cols<Tile, 3>(pt, n, v + x * W, ldv, d.at(0, x), nrows); break;
    case 2: pv_cols<Tile, 2>(pt, n, v + x * W, ldv, d.at(0, x), nrows); break;
    case 1: pv_cols<Tile, 1>(pt, n, v + x * W, ldv, d.at(0, x), nrows); break;
    default: break;
  }
}

struct TileF32 {
  template <int NR>
  static FASTATTN_INLINE void qk(const float* qt, const float* k, int64_t ldk, int64_t E, int64_t n0,
                                 const ScoreCtx& sc, float* st, vf* mx) {
    qk_tile_f32<NR>(qt, k, ldk, E, n0, sc, st, mx);
  }
  template <int QR, int EVV, typename Dst>
  static FASTATTN_INLINE void pv(const float* st, int64_t nk, const float* v, int64_t ldv, const Dst& d) {
    pv_tile_f32<QR, EVV>(st, nk, v, ldv, d);
  }
};

#if defined(FASTATTN_HAVE_AVX512BF16)
// ------------------------------------------------------------------------------------ bf16 dot micro-kernels

FASTATTN_INLINE uint32_t load_u32(const void* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// S^T for NR keys with vdpbf16ps: acc[r][v] += sum over e pairs of Q^T pair x K[n0 + r] pair (broadcast).
template <int NR>
FASTATTN_INLINE void qk_tile_bf16(const uint32_t* FASTATTN_RESTRICT qt, const uint16_t* FASTATTN_RESTRICT k,
                                  int64_t ldk, int64_t E2, int64_t n0, const ScoreCtx& sc, float* st, vf* mx) {
  vf acc[NR][QV];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) acc[r][v] = _mm512_setzero_ps();
  const uint16_t* kr = k + n0 * ldk;
  for (int64_t e2 = 0; e2 < E2; ++e2) {
    __m512bh a[QV];
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) a[v] = (__m512bh)_mm512_loadu_si512(qt + e2 * QG + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(load_u32(kr + r * ldk + 2 * e2)));
#pragma GCC unroll 4
      for (int v = 0; v < QV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a[v], kb);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) score_store<false>(sc, n0 + r, acc[r], st, mx);
}

// acc += sum over key pairs of P pair (broadcast) x V pair, between d.init and d.finish (as pv_tile_f32).
template <int QR, int EVV, typename Dst>
FASTATTN_INLINE void pv_tile_bf16(const uint32_t* FASTATTN_RESTRICT pp, int64_t nk2,
                                  const uint32_t* FASTATTN_RESTRICT vp, int64_t ldv, const Dst& d) {
  vf acc[QR][EVV];
  d.init(acc);
  for (int64_t n2 = 0; n2 < nk2; ++n2) {
    __m512bh vv[EVV];
#pragma GCC unroll 4
    for (int x = 0; x < EVV; ++x) vv[x] = (__m512bh)_mm512_loadu_si512(vp + n2 * ldv + x * W);
#pragma GCC unroll 16
    for (int r = 0; r < QR; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[n2 * QG + r]));
#pragma GCC unroll 4
      for (int x = 0; x < EVV; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], pb, vv[x]);
    }
  }
  d.finish(acc);
}

struct TileBF16 {  // depth = E2 (bf16 pairs); pv's n = key pairs
  template <int NR>
  static FASTATTN_INLINE void qk(const uint32_t* qt, const uint16_t* k, int64_t ldk, int64_t E2, int64_t n0,
                                 const ScoreCtx& sc, float* st, vf* mx) {
    qk_tile_bf16<NR>(qt, k, ldk, E2, n0, sc, st, mx);
  }
  template <int QR, int EVV, typename Dst>
  static FASTATTN_INLINE void pv(const uint32_t* pp, int64_t nk2, const uint32_t* vp, int64_t ldv, const Dst& d) {
    pv_tile_bf16<QR, EVV>(pp, nk2, vp, ldv, d);
  }
};
#endif  // FASTATTN_HAVE_AVX512BF16

}  // namespace
}  // namespace FASTATTN_NS
}  // namespace fastattn
