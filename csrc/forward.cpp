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
// Causal: key j is visible to query i iff j <= i + causal_offset (common.h). Key blocks beyond that diagonal
// for every query of a group, or fully hidden by the mask, are skipped (no QK^T, no PV); keys past the last
// row's diagonal are never read.
#include "forward.h"

#include <stdexcept>
#include <string>

namespace fastattn {
namespace FASTATTN_NS {
namespace {

using simd::vf;
using simd::W;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int QV = 2;           // query vectors per group
constexpr int QG = QV * W;      // queries per group
constexpr int kMaxBM = 8 * QG;  // most query rows per work item
#if defined(FASTATTN_HAVE_AVX512)
constexpr int kNR = 12;         // keys per score micro-tile (kNR x QV accumulators)
constexpr int kAccBudget = 24;  // accumulators of the PV micro-tile
#elif defined(FASTATTN_HAVE_AVX2)
constexpr int kNR = 6;
constexpr int kAccBudget = 8;
#else
constexpr int kNR = 4;
constexpr int kAccBudget = 8;
#endif

// ------------------------------------------------------------------------------------ lane helpers

#if defined(FASTATTN_HAVE_AVX512)
// s where j <= iq (lane-wise; iq = i + causal_offset, the last key query i sees), -inf past it (causal).
FASTATTN_INLINE vf causal_hide(vf s, vf iq, float j) {
  return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(iq, _mm512_set1_ps(j), _CMP_LT_OQ), _mm512_set1_ps(kNegInf));
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

// ------------------------------------------------------------------------------------ blocking

struct Blocking {
  int64_t BM = 0;   // query rows per work item (multiple of QG)
  int64_t BN = 0;   // keys per key block (multiple of kNR, even)
  int64_t nqb = 0;  // query blocks per (b, h)
  int64_t Evp = 0;  // Ev rounded up to W
  int64_t E2 = 0;   // ceil(E / 2) (bf16 pairs)
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

Blocking choose_blocking(const Params& p) {
  Blocking c;
  // Large query blocks amortise the per-key-block work (V packing, mask tiles); small enough to keep
  // every thread busy: at least ~4 items per thread when the heads alone do not provide them.
  int64_t bm = std::min<int64_t>(round_up(p.L, QG), kMaxBM);
  const int64_t want = 4 * static_cast<int64_t>(std::max(1, p.num_threads));
  while (bm > QG && p.B * p.H * ((p.L + bm - 1) / bm) < want) bm -= QG;
  c.BM = bm;
  c.nqb = (p.L + bm - 1) / bm;
  // Sequences up to 11 tiles of keys run as one key block (B8 H12 L128: 3-4% faster than 96 + 32 keys, with
  // the output stored by PV itself, see OutRows); longer ones in blocks of 8 tiles.
  c.BN = p.S <= 11 * kNR ? std::max<int64_t>(kNR, round_up(p.S, kNR)) : 8 * kNR;
  c.Evp = round_up(p.Ev, W);
  c.E2 = (p.E + 1) / 2;
  return c;
}

// Per-thread buffers of one call.
struct Bufs {
  float* qt = nullptr;     // fp32 Q^T: [BM/QG][E][QG]          (bf16 path: uint32 pairs [BM/QG][E2][QG])
  float* kc = nullptr;     // converted K tile [BN][E]           (bf16 path: uint16 [BN][2*E2])
  float* vc = nullptr;     // converted V tile [BN][Evp]         (bf16 path: uint32 pairs [BN/2][Evp])
  float* st = nullptr;     // scores / probabilities S^T [BN][QG]
  uint32_t* pp = nullptr;  // bf16 path: P^T pairs [BN/2][QG]
  float* mt = nullptr;     // mask tile, transposed [BN][BM]
  float* o = nullptr;      // output accumulators [BM][Evp]
  float* m = nullptr;      // running max (base 2) [BM]
  float* l = nullptr;      // running sum [BM]
  float* alpha = nullptr;  // rescale factors of the current key block [BM]
  uint32_t* words = nullptr;  // dropout words [4][QG]
};

size_t plan_bufs(const Params& p, const Blocking& c, Arena& a, Bufs& b) {
  b.qt = a.take<float>(static_cast<size_t>(c.BM * std::max(p.E, 2 * c.E2)));
  b.kc = a.take<float>(static_cast<size_t>(c.BN * (p.E + 2)));
  b.vc = a.take<float>(static_cast<size_t>(c.BN * c.Evp));
  b.st = a.take<float>(static_cast<size_t>(c.BN * QG));
  b.pp = a.take<uint32_t>(static_cast<size_t>(c.BN / 2 * QG));
  b.mt = a.take<float>(static_cast<size_t>(c.BN * c.BM));
  b.o = a.take<float>(static_cast<size_t>(c.BM * c.Evp));
  b.m = a.take<float>(static_cast<size_t>(c.BM));
  b.l = a.take<float>(static_cast<size_t>(c.BM));
  b.alpha = a.take<float>(static_cast<size_t>(c.BM));
  b.words = a.take<uint32_t>(static_cast<size_t>(4 * QG));
  return a.off + 64;
}

// ------------------------------------------------------------------------------------ score epilogue

// What turns raw dot products of one group into base-2 scores for one key block.
struct ScoreCtx {
  float c = 0.f;              // scale * log2(e) (the bf16-dot path; the fp32 path packs Q^T already scaled)
  const float* mt = nullptr;  // mask tile column base for this group (nullptr: no mask)
  int64_t mt_ld = 0;          // mask tile row (key) stride
  bool mt_shared = false;     // one value per key (mask row stride 0): broadcast it to every lane
  bool causal = false;        // some key of the block lies past some query's diagonal
  vf iq[QV];                  // each lane's query index plus causal_offset: its last visible key (as float)
  int64_t j0 = 0;             // first key of the block
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
// accumulators to hide the FMA latency (E=32: 8 of 32 rows ran at a quarter of the FMA rate).
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

// ------------------------------------------------------------------------------------ softmax pass

// p = 2^(s - m_base) in place for nk keys of a group; adds the row sums (before dropout) to lsum.
template <int DEG>
FASTATTN_INLINE void exp_pass(float* st, int64_t nk, const vf* base, vf* lsum) {
  for (int64_t n = 0; n < nk; ++n) {
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) {
      const vf p = simd::exp2<DEG>(simd::sub(simd::load(st + n * QG + v * W), base[v]));
      lsum[v] = simd::add(lsum[v], p);
      simd::store(st + n * QG + v * W, p);
    }
  }
}

// Zeroes the probabilities of S^T[0..nk) x queries [gi0, gi0+QG) that dropout drops (keys j0..j0+nk).
void dropout_pass(const Params& p, int64_t b, int64_t h, int64_t gi0, int64_t j0, int64_t nk, float* st,
                  uint32_t* words) {
#if defined(FASTATTN_HAVE_AVX512)
  // One Philox call gives the words of 4 keys x 16 queries (lanes = query index i = counter c1).
  (void)words;
  const uint32_t k0 = static_cast<uint32_t>(p.seed), k1 = static_cast<uint32_t>(p.seed >> 32);
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(p.thr));
  for (int64_t c = j0 >> 2; 4 * c < j0 + nk; ++c) {
    for (int v = 0; v < QV; ++v) {
      __m512i w[4] = {simd::u32_set1(static_cast<uint32_t>(c)), simd::u32_iota(static_cast<uint32_t>(gi0 + v * W)),
                      simd::u32_set1(static_cast<uint32_t>(h)), simd::u32_set1(static_cast<uint32_t>(b))};
      simd::philox(w[0], w[1], w[2], w[3], k0, k1);
      for (int r = 0; r < 4; ++r) {
        const int64_t j = 4 * c + r;
        if (j < j0 || j >= j0 + nk) continue;
        float* row = st + (j - j0) * QG + v * W;
        const __mmask16 keep = _mm512_cmp_epu32_mask(w[r], thr, _MM_CMPINT_NLT);
        _mm512_storeu_ps(row, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(row)));
      }
    }
  }
  return;
#endif
  for (int64_t c = j0 >> 2; 4 * c < j0 + nk; ++c) {
    dropout_words_quad_col(p.seed, b, h, gi0, QG, c, words);
    for (int r = 0; r < 4; ++r) {
      const int64_t j = 4 * c + r;
      if (j < j0 || j >= j0 + nk) continue;
      float* row = st + (j - j0) * QG;
      const uint32_t* w = words + r * QG;
      for (int q = 0; q < QG; ++q) row[q] = w[q] >= p.thr ? row[q] : 0.f;
    }
  }
}

// ------------------------------------------------------------------------------------ packing

#if defined(FASTATTN_HAVE_AVX512)
// In-register 16x16 transpose: r[j] (row j) -> r[c] (column c). 32-bit lanes, no arithmetic.
FASTATTN_INLINE void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // u[4i + c]: 128-bit lane k holds column 4k + c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), b = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 a2 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE), b2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(a, b, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(a, b, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(a2, b2, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(a2, b2, 0xDD);
  }
}

// r[c] = column c of 16 rows of 32-bit words (fp32 after conversion, or bf16 pairs) loaded by load(j, ncols);
// rows j >= nrows read as 0.
template <typename Load>
FASTATTN_INLINE void load_transposed(Load load, int64_t nrows, int64_t ncols, __m512 r[16]) {
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) r[j] = j < nrows ? load(j, ncols) : _mm512_setzero_ps();
  transpose16(r);
}

// dst[c * ldd + j] = rows[j][c] for j < 16 (rows j >= nrows read as 0), c < ncols <= 16.
template <typename Load>
FASTATTN_INLINE void transpose_block(Load load, int64_t nrows, int64_t ncols, float* dst, int64_t ldd) {
  __m512 r[16];
  load_transposed(load, nrows, ncols, r);
  for (int c = 0; c < ncols; ++c) _mm512_storeu_ps(dst + c * ldd, r[c]);
}
#endif

// The mask tile of queries [i0, i0+nq) x keys [j0, j0+nk), transposed (mt[key][query], row stride ld) and
// scaled by log2(e) (bool: 0 / -inf), with its all-hidden / all-zero flags. A per-query mask (bool or
// float32, unit key stride) is loaded 16 x 16 at a time and transposed in registers: the scalar loop
// cost about as much as the block's QK^T and PV for (B, 1, L, S) masks (HF-style 4-D masks).
MaskTileInfo mask_tile(const MaskView& m, int64_t i0, int64_t nq, int64_t j0, int64_t nk, float* mt, int64_t ld) {
#if defined(FASTATTN_HAVE_AVX512)
  if (m.sl != 0 && m.ss == 1 && (m.dtype == kBool || m.dtype == kF32)) {
    const __m512 ninf = _mm512_set1_ps(kNegInf), l2e = _mm512_set1_ps(kLog2e), zero = _mm512_setzero_ps();
    bool hidden = true, allzero = true;
    for (int64_t ib = 0; ib < nq; ib += 16) {
      const int64_t nr = std::min<int64_t>(16, nq - ib);
      for (int64_t jb = 0; jb < nk; jb += 16) {
        const int64_t nc = std::min<int64_t>(16, nk - jb);
        const __mmask16 cols = simd::lanes(nc);
        __m512 r[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          if (j >= nr) {
            r[j] = zero;
            continue;
          }
          const int64_t off = (i0 + ib + j) * m.sl + j0 + jb;
          __mmask16 vis, nz;
          if (m.dtype == kBool) {
            const __m128i bytes = _mm_maskz_loadu_epi8(cols, static_cast<const uint8_t*>(m.ptr) + off);
            vis = _mm_test_epi8_mask(bytes, bytes);
            r[j] = _mm512_mask_mov_ps(ninf, vis, zero);
            nz = static_cast<__mmask16>(~vis);
          } else {
            r[j] = _mm512_mul_ps(_mm512_maskz_loadu_ps(cols, static_cast<const float*>(m.ptr) + off), l2e);
            vis = _mm512_cmp_ps_mask(r[j], ninf, _CMP_NEQ_UQ);
            nz = _mm512_cmp_ps_mask(r[j], zero, _CMP_NEQ_UQ);
          }
          hidden &= (vis & cols) == 0;
          allzero &= (nz & cols) == 0;
        }
        transpose16(r);
        for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(mt + (jb + c) * ld + ib, r[c]);
      }
    }
    MaskTileInfo info;
    info.all_hidden = hidden && nq > 0 && nk > 0;
    info.all_zero = allzero;
    return info;
  }
#endif
  return load_mask_tile<float>(m, i0, i0 + nq, j0, j0 + nk, mt, 1, ld, kLog2e, true);
}

// c * Q^T for query rows [i0, i0 + nq), groups of QG, zero-padded to BM rows: qt[g][e][lane]. Scaling here,
// once per query element, spares score_store a multiply per score (as torch's math path scales q).
// eo (bfloat16, E % 32 == 0, AVX-512; see convert_rows_eo): each 32-e group of Q^T in K's even-odd order, from
// a 16 x 16 transpose of the 32-bit bf16 pairs, split by a shift and an and (half the shuffles of widening
// first and transposing two 16 x 16 fp32 blocks).
template <typename T>
void pack_qt_f32(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t BM, float c, float* qt,
                 bool eo = false) {
  const int64_t E = p.E;
  const vf cv = simd::set1(c);
#if defined(FASTATTN_HAVE_AVX512)
  if (p.q.se == 1) {  // 16 rows at a time, transposed in registers (eo implies a unit column stride)
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const int64_t sl = p.q.sl;
    for (int64_t g = 0; g < BM / QG; ++g) {
      for (int64_t r0 = 0; r0 < QG; r0 += 16) {
        const int64_t nrows = std::max<int64_t>(0, std::min<int64_t>(16, nq - g * QG - r0));
        const T* row0 = nrows > 0 ? p.q.at<T>(b, h, i0 + g * QG + r0) : nullptr;
        float* dst = qt + g * E * QG + r0;
        if (!eo) {
          for (int64_t e0 = 0; e0 < E; e0 += 16) {
            transpose_block([&](int j, int64_t n) { return simd::mul(simd::load_cvt_n(row0 + j * sl + e0, n), cv); },
                            nrows, std::min<int64_t>(16, E - e0), dst + e0 * QG, QG);
          }
          continue;
        }
        for (int64_t e0 = 0; e0 < E; e0 += 32) {
          __m512 r[16];
          load_transposed([&](int j, int64_t) { return _mm512_loadu_ps(row0 + j * sl + e0); }, nrows, 16, r);
#pragma GCC unroll 16
          for (int k = 0; k < 16; ++k) {
            const __m512i w = _mm512_castps_si512(r[k]);
            simd::store(dst + (e0 + k) * QG, simd::mul(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), cv));
            simd::store(dst + (e0 + 16 + k) * QG, simd::mul(_mm512_castsi512_ps(_mm512_and_si512(w, hi)), cv));
          }
        }
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < BM / QG; ++g) {
    float* dst = qt + g * E * QG;
    for (int64_t r = 0; r < QG; ++r) {
      const int64_t i = g * QG + r;
      if (i < nq) {
        const T* row = p.q.at<T>(b, h, i0 + i);
        const int64_t se = p.q.se;
        for (int64_t e = 0; e < E; ++e) dst[e * QG + r] = to_f32(row[e * se]) * c;
      } else {
        for (int64_t e = 0; e < E; ++e) dst[e * QG + r] = 0.f;
      }
    }
  }
}

#if defined(FASTATTN_HAVE_AVX512)
// bfloat16 K rows (unit column stride, ncols % 32 == 0) widened in "even-odd" order: in each group of 32
// elements, the 16 even ones, then the 16 odd ones (dst[e0 + k] = src[e0 + 2k], dst[e0 + 16 + k] = src[e0 + 2k
// + 1]). A bf16 pair read as a 32-bit word gives the even element by a shift and the odd one by an and: two
// ALU operations per 32 elements, where widening in order costs a shuffle and a shift per 16. Q^T is packed
// in the same order (pack_qt_f32 with eo), so the dot products are unchanged up to fp32 summation order.
void convert_rows_eo(const uint16_t* src, int64_t s_row, int64_t nrows, int64_t ncols, float* dst, int64_t ld) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto group = [&](const uint16_t* s, float* d) {
    const __m512i w = _mm512_loadu_si512(s);
    _mm512_storeu_si512(d, _mm512_slli_epi32(w, 16));
    _mm512_storeu_si512(d + 16, _mm512_and_si512(w, hi));
  };
  if (s_row == ncols && ld == ncols) {  // a dense head: one flat sweep (groups never straddle rows)
    const int64_t n = nrows * ncols;
    for (int64_t e = 0; e < n; e += 32) group(src + e, dst + e);
    return;
  }
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t e = 0; e < ncols; e += 32) group(src + r * s_row + e, dst + r * ld + e);
}
#endif

// dst[n][0..n_cols) = f32(src row n), rows padded with zeros to ld.
template <typename T>
void convert_rows(const T* src, int64_t s_row, int64_t s_col, int64_t nrows, int64_t ncols, float* dst,
                  int64_t ld) {
  if (s_col == 1 && s_row == ncols && ld == ncols) {
    // Dense rows without padding (a contiguous K / V head): one flat sweep, 4 vectors per step, instead of a
    // loop per (often 32-element) row with its tail and padding checks.
    const int64_t n = nrows * ncols;
    int64_t e = 0;
    for (; e + 4 * W <= n; e += 4 * W) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) simd::store(dst + e + u * W, simd::load_cvt(src + e + u * W));
    }
    for (; e + W <= n; e += W) simd::store(dst + e, simd::load_cvt(src + e));
    if (e < n) simd::store_n(dst + e, simd::load_cvt_n(src + e, n - e), n - e);
    return;
  }
  for (int64_t n = 0; n < nrows; ++n) {
    const T* row = src + n * s_row;
    float* d = dst + n * ld;
    if (s_col == 1) {
      int64_t e = 0;
      for (; e + W <= ncols; e += W) simd::store(d + e, simd::load_cvt(row + e));
      if (e < ncols) simd::store_n(d + e, simd::load_cvt_n(row + e, ncols - e), ncols - e);
    } else {
      for (int64_t e = 0; e < ncols; ++e) d[e] = to_f32(row[e * s_col]);
    }
    for (int64_t e = ncols; e < ld; ++e) d[e] = 0.f;
  }
}

// ------------------------------------------------------------------------------------ output

// log2 x for a positive normal float: exponent bits + atanh series of the mantissa folded into
// [sqrt(1/2), sqrt(2)) (|t| < 0.172, truncation < 1e-9). Branch-free, so the row loop vectorises (the
// libm call per row cost ~4% of a B16 H12 L64 E32 forward).
FASTATTN_INLINE float log2_normal(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  int32_t e = static_cast<int32_t>(u >> 23) - 127;
  u = (u & 0x7fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &u, 4);
  const bool hi = m > 1.41421356f;
  m = hi ? 0.5f * m : m;
  e += hi ? 1 : 0;
  const float t = (m - 1.f) / (m + 1.f), t2 = t * t;
  const float s = t * (2.88539008f + t2 * (0.961796694f + t2 * (0.577078016f + t2 * (0.412198587f + t2 * 0.320598898f))));
  return static_cast<float>(e) + s;
}

#if defined(FASTATTN_HAVE_AVX512)
// log2_normal of 16 lanes: exponent and mantissa in [0.75, 1.5) (|t| < 0.2, truncation < 1e-8).
FASTATTN_INLINE vf log2_normal(vf x) {
  const vf m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
  vf e = _mm512_getexp_ps(x);  // floor(log2 x); one more where the mantissa came out below 1
  e = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, simd::set1(1.f), _CMP_LT_OQ), e, simd::set1(1.f));
  const vf t = _mm512_div_ps(simd::sub(m, simd::set1(1.f)), simd::add(m, simd::set1(1.f)));
  const vf t2 = simd::mul(t, t);
  vf s = simd::set1(0.320598898f);
  s = simd::fmadd(s, t2, simd::set1(0.412198587f));
  s = simd::fmadd(s, t2, simd::set1(0.577078016f));
  s = simd::fmadd(s, t2, simd::set1(0.961796694f));
  s = simd::fmadd(s, t2, simd::set1(2.88539008f));
  return simd::fmadd(t, s, e);
}

// T(x) as 16-bit patterns (as store_cvt rounds) and those patterns' value, in registers: reading the stored
// output back would be a masked load of a just-stored vector, which stalls store forwarding.
FASTATTN_INLINE __m256i bits16(vf x, const bf16_t*) { return simd::cvt_bf16(x); }
FASTATTN_INLINE __m256i bits16(vf x, const f16_t*) {
  return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
FASTATTN_INLINE vf value16(__m256i b, const bf16_t*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
FASTATTN_INLINE vf value16(__m256i b, const f16_t*) { return _mm512_cvtph_ps(b); }

// encode_lo of the first n lanes (x the fp32 output, h = float(T(x))), stored as int16: the same code in
// registers (cvtps rounds to nearest even, as the magic-number add of encode_lo).
template <typename T>
FASTATTN_INLINE void encode_lo_store(int16_t* p, vf x, vf h, int64_t n) {
  const __m512i ex = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(h), 23), _mm512_set1_epi32(0xff));
  const __mmask16 ok =
      _mm512_cmpge_epu32_mask(ex, _mm512_set1_epi32(1)) & _mm512_cmple_epu32_mask(ex, _mm512_set1_epi32(253));
  const vf inv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(254), ex), 23));
  vf m = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(x, h), inv), _mm512_set1_ps(LoCode<T>::kScale));
  m = _mm512_min_ps(_mm512_set1_ps(32767.f), _mm512_max_ps(_mm512_set1_ps(-32767.f), m));
  _mm512_mask_cvtepi32_storeu_epi16(p, simd::lanes(n), _mm512_maskz_cvtps_epi32(ok, m));
}
#endif

// One output row, out = T(x) for x = o * f, and its residual code out_lo = encode_lo(x, out) (training only).
// AVX-512: in registers. Otherwise in chunks: x and float(out) staged in two small buffers, then one
// branch-free loop the compiler vectorizes.
template <typename T>
void write_row_lo(const Params& p, T* out, int16_t* out_lo, const float* o, float f) {
#if defined(FASTATTN_HAVE_AVX512)
  if (p.out.se == 1 && p.out_lo.se == 1) {
    const vf fv = simd::set1(f);
    for (int64_t e = 0; e < p.Ev; e += W) {
      const int64_t n = std::min<int64_t>(W, p.Ev - e);
      const vf x = simd::mul(simd::load(o + e), fv);  // o is padded to a whole vector (Evp)
      const __m256i bits = bits16(x, static_cast<const T*>(nullptr));
      _mm256_mask_storeu_epi16(out + e, simd::lanes(n), bits);
      encode_lo_store<T>(out_lo + e, x, value16(bits, static_cast<const T*>(nullptr)), n);
    }
    return;
  }
#endif
  constexpr int64_t kChunk = 256;
  alignas(64) float xs[kChunk], hs[kChunk];
  const vf fv = simd::set1(f);
  for (int64_t e0 = 0; e0 < p.Ev; e0 += kChunk) {
    const int64_t n = std::min(kChunk, p.Ev - e0);
    T* ob = out + e0 * p.out.se;
    if (p.out.se == 1) {
      int64_t e = 0;
      for (; e + W <= n; e += W) {
        const vf x = simd::mul(simd::load(o + e0 + e), fv);
        simd::store(xs + e, x);
        simd::store_cvt(ob + e, x);
        simd::store(hs + e, simd::load_cvt(static_cast<const T*>(ob + e)));
      }
      if (e < n) {
        const vf x = simd::mul(simd::load(o + e0 + e), fv);  // o is padded to a whole vector (Evp)
        simd::store_n(xs + e, x, n - e);
        simd::store_cvt_n(ob + e, x, n - e);
        simd::store_n(hs + e, simd::load_cvt_n(static_cast<const T*>(ob + e), n - e), n - e);
      }
    } else {
      for (int64_t e = 0; e < n; ++e) {
        xs[e] = o[e0 + e] * f;
        ob[e * p.out.se] = from_f32<T>(xs[e]);
        hs[e] = to_f32(ob[e * p.out.se]);
      }
    }
    int16_t* lb = out_lo + e0 * p.out_lo.se;
    if (p.out_lo.se == 1) {
      for (int64_t e = 0; e < n; ++e) lb[e] = encode_lo<T>(xs[e], hs[e]);
    } else {
      for (int64_t e = 0; e < n; ++e) lb[e * p.out_lo.se] = encode_lo<T>(xs[e], hs[e]);
    }
  }
}

// The factor from a row's accumulated O to its output: dropout_scale / l, 0 for a row that saw no visible key
// (l == 0; a NaN l is not empty: NaN propagates as in torch).
FASTATTN_INLINE float out_factor(float l, float dscale) { return l == 0.f ? 0.f : dscale / l; }

// fac[r] = out_factor(l[r]) and, with lg, lg[r] = lse of the row = ln2 (m[r] + log2 l[r]) (-inf where l = 0),
// for r < n. AVX-512: 16 rows per vector division; only lanes whose l is not a normal float (a NaN / inf /
// denormal sum) take the scalar std::log2 (the per-row scalar loops cost ~4% of a B16 H12 L64 E32 forward).
FASTATTN_INLINE void row_factors(const float* l, const float* m, int64_t n, float dscale, float* fac, float* lg) {
  auto lse_row = [](float lr, float mr) {  // one row's lse, any l
    const bool normal = lr >= std::numeric_limits<float>::min() && lr <= std::numeric_limits<float>::max();
    return lr == 0.f ? kNegInf : kLn2 * (mr + (normal ? log2_normal(lr) : std::log2(lr)));
  };
  int64_t r0 = 0;
#if defined(FASTATTN_HAVE_AVX512)
  for (; r0 < n; r0 += W) {
    const __mmask16 in = simd::lanes(n - r0);
    const vf lv = _mm512_maskz_loadu_ps(in, l + r0);
    const __mmask16 empty = _mm512_cmp_ps_mask(lv, _mm512_setzero_ps(), _CMP_EQ_OQ);
    _mm512_mask_storeu_ps(fac + r0, in, _mm512_maskz_div_ps(static_cast<__mmask16>(~empty), simd::set1(dscale), lv));
    if (lg == nullptr) continue;
    const vf mv = _mm512_maskz_loadu_ps(in, m + r0);
    const vf lse_r = simd::mul(simd::set1(kLn2), simd::add(mv, log2_normal(lv)));
    _mm512_mask_storeu_ps(lg + r0, in, _mm512_mask_mov_ps(lse_r, empty, simd::set1(kNegInf)));
    const __mmask16 normal = _mm512_cmp_ps_mask(lv, simd::set1(std::numeric_limits<float>::min()), _CMP_GE_OQ) &
                             _mm512_cmp_ps_mask(lv, simd::set1(std::numeric_limits<float>::max()), _CMP_LE_OQ);
    for (uint32_t odd = in & ~(normal | empty); odd != 0; odd &= odd - 1) {
      const int64_t r = r0 + __builtin_ctz(odd);
      lg[r] = lse_row(l[r], m[r]);
    }
  }
#endif
  for (int64_t r = r0; r < n; ++r) {
    fac[r] = out_factor(l[r], dscale);
    if (lg != nullptr) lg[r] = lse_row(l[r], m[r]);
  }
}

// out[i] = o[i] * (1 / l_i) * dropout_scale (0 when l_i == 0); lse[i] = ln2 * (m_i + log2 l_i);
// with p.out_lo (fp16 / bf16), also out_lo[i] (see encode_lo). Rows of groups g with written[g] already hold
// their output (OutRows): only their lse is written.
template <typename T>
void write_output(const Params& p, const Blocking& c, const Bufs& bf, int64_t b, int64_t h, int64_t i0, int64_t nq,
                  const bool* written = nullptr) {
  constexpr bool kLow = !std::is_same<T, float>::value;
  const bool lo = kLow && p.out_lo.ptr != 0;
  const float dscale = static_cast<float>(p.dropout_scale());
  float* lse = p.lse.ptr == 0 ? nullptr : reinterpret_cast<float*>(p.lse.ptr) + b * p.lse.sb + h * p.lse.sh;
  alignas(64) float fac[kMaxBM];
  // lse straight into a unit-stride lse; else staged in bf.alpha (free after the last key block), then scattered.
  float* lg = lse == nullptr ? nullptr : p.lse.sl == 1 ? lse + i0 : bf.alpha;
  row_factors(bf.l, bf.m, nq, dscale, fac, lg);
  if (lse != nullptr && p.lse.sl != 1)
    for (int64_t r = 0; r < nq; ++r) lse[(i0 + r) * p.lse.sl] = lg[r];
  for (int64_t r = 0; r < nq; ++r) {
    if (written != nullptr && written[r / QG]) continue;
    const int64_t i = i0 + r;
    T* out = p.out.at<T>(b, h, i);
    const float* o = bf.o + r * c.Evp;
    if (lo) {
      if constexpr (kLow) write_row_lo(p, out, p.out_lo.at<int16_t>(b, h, i), o, fac[r]);
    } else if (p.out.se == 1) {
      const vf f = simd::set1(fac[r]);
      const int64_t Ev = p.Ev;
      int64_t e = 0;
      for (; e + W <= Ev; e += W) simd::store_cvt(out + e, simd::mul(simd::load(o + e), f));
      if (e < Ev) simd::store_cvt_n(out + e, simd::mul(simd::load(o + e), f), Ev - e);
    } else {
      for (int64_t e = 0; e < p.Ev; ++e) out[e * p.out.se] = from_f32<T>(o[e] * fac[r]);
    }
  }
}

// ------------------------------------------------------------------------------------ driver (fp32 / bf16 dot)

#if defined(FASTATTN_HAVE_AVX512BF16)
// bf16 pair (x, y) of two fp32 vectors, lane-wise: word = bf16(x) | bf16(y) << 16 (round to nearest even).
FASTATTN_INLINE __m512i bf16_pairs(__m512 x, __m512 y) {
  alignas(64) static constexpr uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(y, x));
}

// P^T pairs: pp[n2][q] = (bf16 p[2 n2][q], bf16 p[2 n2 + 1][q]); an odd last key pairs with 0.
void pack_p_pairs(const float* st, int64_t nk, uint32_t* pp) {
  for (int64_t n2 = 0; 2 * n2 < nk; ++n2) {
    const bool two = 2 * n2 + 1 < nk;
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) {
      const __m512 lo = _mm512_loadu_ps(st + 2 * n2 * QG + v * W);
      const __m512 hi = two ? _mm512_loadu_ps(st + (2 * n2 + 1) * QG + v * W) : _mm512_setzero_ps();
      _mm512_storeu_si512(pp + n2 * QG + v * W, bf16_pairs(lo, hi));
    }
  }
}

// exp_pass<3> and pack_p_pairs in one sweep (no dropout): p = 2^(s - base) straight into bf16 pairs.
FASTATTN_INLINE void exp_pack_pass(const float* st, int64_t nk, const vf* base, vf* lsum, uint32_t* pp) {
  int64_t n2 = 0;
  for (; 2 * n2 + 1 < nk; ++n2) {
#pragma GCC unroll 4
    for (int v = 0; v < QV; ++v) {
      const vf p0 = simd::exp2<3>(simd::sub(simd::load(st + 2 * n2 * QG + v * W), base[v]));
      const vf p1 = simd::exp2<3>(simd::sub(simd::load(st + (2 * n2 + 1) * QG + v * W), base[v]));
      lsum[v] = simd::add(lsum[v], simd::add(p0, p1));
      _mm512_storeu_si512(pp + n2 * QG + v * W, bf16_pairs(p0, p1));
    }
  }
  if (2 * n2 < nk) {
    for (int v = 0; v < QV; ++v) {
      const vf p0 = simd::exp2<3>(simd::sub(simd::load(st + 2 * n2 * QG + v * W), base[v]));
      lsum[v] = simd::add(lsum[v], p0);
      _mm512_storeu_si512(pp + n2 * QG + v * W, bf16_pairs(p0, _mm512_setzero_ps()));
    }
  }
}
#endif

// Degree of the exp2 polynomial for p in the fp32-accumulating forward of inputs of type T. bfloat16 inputs
// use degree 3 (relative error 1.0e-4, 2^0 = 1 exactly), as the vdpbf16ps path does: its error is 1/40 of
// a bfloat16 output's half ulp (2^-9), and it saves 2 FMAs per 16 scores.
// float32 and float16 (half ulp 2^-12) keep degree 5 (1.4e-7).
template <typename T>
constexpr int kExpDeg = std::is_same<T, bf16_t>::value ? 3 : 5;

// Online-softmax update of one group for one key block (scores in bf.st): m, l, alpha, and p in place
// (dropout applied after the row sums); with BF16 (the vdpbf16ps path), p goes to bf.pp as bf16 pairs
// instead. DEG: the exp2 polynomial of the fp32 path (kExpDeg). Returns false if every score is -inf.
template <bool BF16, int DEG = 5>
FASTATTN_INLINE bool softmax_update(const Params& p, Bufs& bf, int64_t b, int64_t h, int64_t gi0, int64_t grow,
                                    int64_t j0, int64_t nk, const vf* mx) {
  float* m = bf.m + grow;
  float* l = bf.l + grow;
  float* alpha = bf.alpha + grow;
  bool none = true;
  for (int v = 0; v < QV; ++v) none &= all_neg_inf(mx[v]);
  if (none) return false;  // every score of the block is -inf: p = 0, m and l unchanged
  vf base[QV], lsum[QV];
  for (int v = 0; v < QV; ++v) {
    const vf mo = simd::load(m + v * W);
    const vf mn = simd::max(mo, mx[v]);
    base[v] = finite_base(mn);
    simd::store(alpha + v * W, simd::exp2<5>(simd::sub(mo, base[v])));  // 2^(-inf) = 0 on first visit
    simd::store(m + v * W, mn);
    lsum[v] = simd::zero();
  }
  const bool dropout = p.dropout_p > 0.0;
#if defined(FASTATTN_HAVE_AVX512BF16)
  if constexpr (BF16) {
    if (dropout)
      exp_pass<3>(bf.st, nk, base, lsum);
    else
      exp_pack_pass(bf.st, nk, base, lsum, bf.pp);
  } else {
    exp_pass<DEG>(bf.st, nk, base, lsum);
  }
#else
  exp_pass<DEG>(bf.st, nk, base, lsum);
#endif
  for (int v = 0; v < QV; ++v)
    simd::store(l + v * W, simd::fmadd(simd::load(l + v * W), simd::load(alpha + v * W), lsum[v]));
  if (dropout) {
    dropout_pass(p, b, h, gi0, j0, nk, bf.st, bf.words);
#if defined(FASTATTN_HAVE_AVX512BF16)
    if constexpr (BF16) pack_p_pairs(bf.st, nk, bf.pp);
#endif
  }
  return true;
}

// Prepares the per-block score context of group g; returns false if the group sees none of the block.
FASTATTN_INLINE bool group_ctx(const Params& p, const Blocking& c, const Bufs& bf, const MaskTileInfo& mi,
                               bool has_mask, int64_t i0, int64_t g, int64_t nq, int64_t j0, int64_t nk,
                               ScoreCtx& sc) {
  const int64_t gi0 = i0 + g * QG;
  const int64_t glast = std::min(i0 + nq, gi0 + QG) - 1;
  // Query i sees keys j <= i + off: skip a block that starts past the group's last diagonal; per-lane hiding is
  // needed only where the block ends past its first.
  const int64_t off = p.causal_offset;
  if (p.is_causal && j0 > glast + off) return false;
  sc.causal = p.is_causal && j0 + nk - 1 > gi0 + off;
  for (int v = 0; v < QV; ++v) sc.iq[v] = iota_f(static_cast<float>(gi0 + off + v * W));
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

// End of the keys query rows [.., i_end) may see: S, or with is_causal the last row's diagonal plus one
// (i_end + causal_offset, at least 0: 0 when no row sees a key).
FASTATTN_INLINE int64_t key_end(const Params& p, int64_t i_end) {
  return p.is_causal ? std::min(p.S, std::max<int64_t>(0, i_end + p.causal_offset)) : p.S;
}

// The mask tile is never written for the padding lanes (queries past the end): keep them finite.
void zero_padded_lanes(const Blocking& c, int64_t nq, int64_t ngroups, float* mt) {
  if (nq == ngroups * QG) return;
  for (int64_t n = 0; n < c.BN; ++n) std::fill(mt + n * c.BM + nq, mt + n * c.BM + ngroups * QG, 0.f);
}

template <typename T>
void item_f32(const Params& p, const Blocking& c, Bufs& bf, int64_t b, int64_t h, int64_t qb) {
  const int64_t i0 = qb * c.BM, nq = std::min(c.BM, p.L - i0);
  const int64_t ngroups = (nq + QG - 1) / QG;
  const int64_t hk = p.kv_head(h);
  const int64_t kend = key_end(p, i0 + nq);
  const bool k_direct = std::is_same<T, float>::value && p.k.se == 1;
  const bool v_direct = std::is_same<T, float>::value && p.v.se == 1 && p.Ev % W == 0;
  const MaskView mv = mask_view(p, b, h);
  const bool has_mask = mv.dtype != kNone;

#if defined(FASTATTN_HAVE_AVX512)
  // bfloat16 with whole 32-element groups: K widened and Q^T packed in even-odd order (convert_rows_eo).
  const bool eo = std::is_same<T, bf16_t>::value && p.E % 32 == 0 && p.q.se == 1 && p.k.se == 1;
#else
  const bool eo = false;
#endif
  const float qscale = static_cast<float>(p.scale) * kLog2e;
  ScoreCtx sc;  // sc.c unused here: Q^T is packed already scaled
  const T* kbase = p.k.at<T>(b, hk, 0);
  const T* vbase = p.v.at<T>(b, hk, 0);
  // A padding mask (same for every query) trims the key loop to its visible span.
  const auto span = has_mask ? visible_key_range(mv, kend) : std::make_pair(int64_t(0), kend);
  // A single key block (short sequences) with dense output rows and no out_lo: PV stores the output rows
  // itself (OutRows); write_output then writes only lse and the rows of groups that saw no key. O is then
  // zeroed only for those groups, after the block (filling all of it cost 2-4% at L = S <= 128), and each
  // group's Q^T is packed just before its QK^T into one slot that stays in L1.
  const bool one_block = span.second - span.first <= c.BN && p.out_lo.ptr == 0 && p.out.se == 1;
  if (!one_block) {
    pack_qt_f32<T>(p, b, h, i0, nq, ngroups * QG, qscale, bf.qt, eo);
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
    const float* kt;
    int64_t ldk;
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
    const float* vt;
    int64_t ldv;
    if (v_direct) {
      vt = reinterpret_cast<const float*>(vbase) + j0 * p.v.sl;
      ldv = p.v.sl;
    } else {
      convert_rows<T>(vbase + j0 * p.v.sl, p.v.sl, p.v.se, nk, p.Ev, bf.vc, c.Evp);
      vt = bf.vc;
      ldv = c.Evp;
    }
    for (int64_t g = 0; g < ngroups; ++g) {
      if (!group_ctx(p, c, bf, mi, has_mask, i0, g, nq, j0, nk, sc)) continue;
      vf mx[QV];
      for (int v = 0; v < QV; ++v) mx[v] = simd::set1(kNegInf);
      const float* qt = bf.qt + g * p.E * QG;
      if (one_block) {
        pack_qt_f32<T>(p, b, h, i0 + g * QG, std::min<int64_t>(QG, nq - g * QG), QG, qscale, bf.qt, eo);
        qt = bf.qt;
      }
      qk_group<TileF32>(qt, kt, ldk, p.E, nk, sc, bf.st, mx);
      if (!softmax_update<false, kExpDeg<T>>(p, bf, b, h, i0 + g * QG, g * QG, j0, nk, mx)) continue;
      const int64_t nrows = std::min<int64_t>(QG, nq - g * QG);
      if (one_block) {
        alignas(64) float fac[QG];
        row_factors(bf.l + g * QG, nullptr, nrows, dscale, fac, nullptr);
        const OutRows<T> d{p.out.at<T>(b, h, i0 + g * QG), p.out.sl, fac, 0, p.Ev};
        pv_group<TileF32>(bf.st, nk, vt, ldv, d, nrows, c.Evp);
        written[g] = true;
      } else {
        pv_group<TileF32>(bf.st, nk, vt, ldv, OAcc{bf.o + g * QG * c.Evp, c.Evp, bf.alpha + g * QG}, nrows, c.Evp);
      }
    }
  }
  if (one_block) {
    for (int64_t g = 0; g < ngroups; ++g)
      if (!written[g]) std::fill(bf.o + g * QG * c.Evp, bf.o + (g + 1) * QG * c.Evp, 0.f);
  }
  write_output<T>(p, c, bf, b, h, i0, nq, written);
}

#if defined(FASTATTN_HAVE_AVX512BF16)
// ------------------------------------------------------------------------------------ bf16 dot path

FASTATTN_INLINE uint32_t load_u32(const void* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// Q^T pairs: qt[g][e2][lane] = (q[i][2 e2], q[i][2 e2 + 1]) as one 32-bit word (low half first).
void pack_qt_bf16(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t BM, int64_t E2,
                  uint32_t* qt) {
  const int64_t E = p.E, se = p.q.se;
  for (int64_t g = 0; g < BM / QG; ++g) {
    uint32_t* dst = qt + g * E2 * QG;
    for (int64_t r = 0; r < QG; ++r) {
      const int64_t i = g * QG + r;
      if (i >= nq) {
        for (int64_t e2 = 0; e2 < E2; ++e2) dst[e2 * QG + r] = 0;
        continue;
      }
      const uint16_t* row = p.q.at<uint16_t>(b, h, i0 + i);
      if (se == 1 && E % 2 == 0 && r % 16 == 0) {
        // 16 rows at once: the rows viewed as 32-bit pairs, transposed in registers.
        const int64_t nrows = std::min<int64_t>(16, nq - i);
        const int64_t sl = p.q.sl;
        for (int64_t e2 = 0; e2 < E2; e2 += 16) {
          transpose_block(
              [&](int j, int64_t n) {
                return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(simd::lanes(n), row + j * sl + 2 * e2));
              },
              nrows, std::min<int64_t>(16, E2 - e2), reinterpret_cast<float*>(dst + e2 * QG + r), QG);
        }
        r += 15;
        continue;
      }
      if (se == 1 && E % 2 == 0) {
        for (int64_t e2 = 0; e2 < E2; ++e2) dst[e2 * QG + r] = load_u32(row + 2 * e2);
      } else {
        for (int64_t e2 = 0; e2 < E2; ++e2) {
          const uint32_t lo = row[2 * e2 * se];
          const uint32_t hi = 2 * e2 + 1 < E ? row[(2 * e2 + 1) * se] : 0u;
          dst[e2 * QG + r] = lo | (hi << 16);
        }
      }
    }
  }
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



// V pairs for a key block: vp[n2][ev] = (v[2 n2][ev], v[2 n2 + 1][ev]), zero-padded to Evp columns and
// to an even number of keys.
void pack_v_pairs(const uint16_t* v, int64_t s_row, int64_t s_col, int64_t nk, int64_t Ev, int64_t Evp,
                  uint32_t* vp) {
  for (int64_t n2 = 0; 2 * n2 < nk; ++n2) {
    const uint16_t* r0 = v + 2 * n2 * s_row;
    const bool two = 2 * n2 + 1 < nk;
    const uint16_t* r1 = r0 + s_row;
    uint32_t* d = vp + n2 * Evp;
    if (s_col == 1) {
      for (int64_t e = 0; e < Evp; e += 16) {
        const __mmask16 m = simd::lanes(Ev - e);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + e));
        const __m512i hi = two ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + e)) : _mm512_setzero_si512();
        _mm512_storeu_si512(d + e, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    } else {
      for (int64_t e = 0; e < Evp; ++e) {
        const uint32_t lo = e < Ev ? r0[e * s_col] : 0u;
        const uint32_t hi = (e < Ev && two) ? r1[e * s_col] : 0u;
        d[e] = lo | (hi << 16);
      }
    }
  }
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

void item_bf16(const Params& p, const Blocking& c, Bufs& bf, int64_t b, int64_t h, int64_t qb) {
  const int64_t i0 = qb * c.BM, nq = std::min(c.BM, p.L - i0);
  const int64_t ngroups = (nq + QG - 1) / QG;
  const int64_t hk = p.kv_head(h);
  const int64_t kend = key_end(p, i0 + nq);
  const int64_t E2 = c.E2;
  const bool k_direct = p.k.se == 1 && p.E % 2 == 0;
  const MaskView mv = mask_view(p, b, h);
  const bool has_mask = mv.dtype != kNone;
  uint32_t* qt = reinterpret_cast<uint32_t*>(bf.qt);
  uint16_t* kc = reinterpret_cast<uint16_t*>(bf.kc);
  uint32_t* vp = reinterpret_cast<uint32_t*>(bf.vc);

  pack_qt_bf16(p, b, h, i0, nq, ngroups * QG, E2, qt);
  std::fill(bf.o, bf.o + ngroups * QG * c.Evp, 0.f);
  std::fill(bf.m, bf.m + ngroups * QG, kNegInf);
  std::fill(bf.l, bf.l + ngroups * QG, 0.f);
  if (has_mask) zero_padded_lanes(c, nq, ngroups, bf.mt);

  ScoreCtx sc;
  sc.c = static_cast<float>(p.scale) * kLog2e;
  const uint16_t* kbase = p.k.at<uint16_t>(b, hk, 0);
  const uint16_t* vbase = p.v.at<uint16_t>(b, hk, 0);
  // A padding mask (same for every query) trims the key loop to its visible span.
  const auto span = has_mask ? visible_key_range(mv, kend) : std::make_pair(int64_t(0), kend);
  for (int64_t j0 = span.first; j0 < span.second; j0 += c.BN) {
    const int64_t nk = std::min(c.BN, span.second - j0);
    MaskTileInfo mi;
    if (has_mask) {
      mi = mask_tile(mv, i0, nq, j0, nk, bf.mt, c.BM);
      if (mi.all_hidden) continue;
    }
    const uint16_t* kt;
    int64_t ldk;
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
    const int64_t nk2 = (nk + 1) / 2;
    for (int64_t g = 0; g < ngroups; ++g) {
      if (!group_ctx(p, c, bf, mi, has_mask, i0, g, nq, j0, nk, sc)) continue;
      vf mx[QV];
      for (int v = 0; v < QV; ++v) mx[v] = simd::set1(kNegInf);
      qk_group<TileBF16>(qt + g * E2 * QG, kt, ldk, E2, nk, sc, bf.st, mx);
      if (!softmax_update<true>(p, bf, b, h, i0 + g * QG, g * QG, j0, nk, mx)) continue;
      const int64_t nrows = std::min<int64_t>(QG, nq - g * QG);
      pv_group<TileBF16>(bf.pp, nk2, vp, c.Evp, OAcc{bf.o + g * QG * c.Evp, c.Evp, bf.alpha + g * QG}, nrows, c.Evp);
    }
  }
  write_output<bf16_t>(p, c, bf, b, h, i0, nq);
}
#endif  // FASTATTN_HAVE_AVX512BF16

// ------------------------------------------------------------------------------------ float64

// Exact two-pass softmax per query row in double (for gradcheck): s_j, m = max s, l = sum e^(s-m).
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
      const int64_t kend = key_end(p, i + 1);
      double m = ninf;
      for (int64_t j = 0; j < kend; ++j) {
        double x = mv.dtype == kNone ? 0.0 : mask_value<double>(mv, i, j, 1.0);
        if (x != ninf) {
          const double* k = p.k.at<double>(b, hk, j);
          double d = 0.0;
          for (int64_t e = 0; e < p.E; ++e) d += q[e * p.q.se] * k[e * p.k.se];
          x += p.scale * d;
        }
        s[j] = x;
        if (x > m || x != x) m = x;  // a NaN score makes the row NaN (as in torch), never "empty"
      }
      double* out = p.out.at<double>(b, h, i);
      float lse_dummy;  // p.lse may be absent (ptr 0)
      float* lse = p.lse.ptr == 0 ? &lse_dummy
                                  : reinterpret_cast<float*>(p.lse.ptr) + b * p.lse.sb + h * p.lse.sh + i * p.lse.sl;
      if (m == ninf) {
        for (int64_t e = 0; e < p.Ev; ++e) out[e * p.out.se] = 0.0;
        *lse = -std::numeric_limits<float>::infinity();
        continue;
      }
      double l = 0.0;
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
  Bufs dummy;
  const size_t bytes = plan_bufs(p, c, plan, dummy);
  std::vector<Bufs> bufs(static_cast<size_t>(std::max(1, p.num_threads)));
  const int64_t n_items = p.B * p.H * c.nqb;
  parallel_for(n_items, p.num_threads, [&](int64_t t0, int64_t t1, int tid) {
    Bufs& bf = bufs[static_cast<size_t>(tid)];
    if (bf.o == nullptr) {
      Arena a;
      a.base = static_cast<char*>(thread_scratch().get(bytes));
      plan_bufs(p, c, a, bf);
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

void check_forward_params(const Params& p) {
  auto fail = [](const std::string& msg) { throw std::invalid_argument("fastattn fwd: " + msg); };
  if (p.B < 0 || p.H < 1 || p.Hk < 1 || p.L < 0 || p.S < 0 || p.E < 1 || p.Ev < 1)
    fail("sizes must satisfy B, L, S >= 0 and H, Hk, E, Ev >= 1");
  if (p.H % p.Hk != 0) fail("H must be a multiple of Hk");
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16 && p.dtype != kF64) fail("unsupported dtype code");
  if (p.mask_dtype != kNone && p.mask_dtype != kBool && p.mask_dtype != kF32 && p.mask_dtype != p.dtype)
    fail("mask dtype must be bool, float32 or the dtype of q");
  if (!(p.dropout_p >= 0.0 && p.dropout_p < 1.0)) fail("dropout_p must be in [0, 1)");
  if (p.B * p.H * p.L > 0 && (p.q.ptr == 0 || p.out.ptr == 0)) fail("null q/out pointer");  // lse: optional
  if (p.B * p.L * p.S > 0 && (p.k.ptr == 0 || p.v.ptr == 0)) fail("null k/v pointer");
  if (p.mask_dtype != kNone && p.mask.ptr == 0) fail("null mask pointer");
  if (p.out_lo.ptr != 0 && p.dtype != kF16 && p.dtype != kBF16) fail("out_lo is for float16 / bfloat16 only");
}

void forward(const Params& p) {
  if (p.B == 0 || p.L == 0) return;
  if (!causal_offset_in_range(p)) return forward(with_causal_offset_in_range(p));
  switch (p.dtype) {
    case kF64: return forward_f64(p);
    case kF32: return run_items(p, item_f32<float>);
    case kF16: return run_items(p, item_f32<f16_t>);
    case kBF16:
#if defined(FASTATTN_HAVE_AVX512BF16)
      if (bf16_dot_pays()) return run_items(p, item_bf16);
      return run_items(p, item_f32<bf16_t>);
#else
      return run_items(p, item_f32<bf16_t>);
#endif
    default: throw std::invalid_argument("fastattn fwd: unsupported dtype");
  }
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
