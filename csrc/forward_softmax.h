// fastattn CPU forward: the online-softmax update of one group of queries for one key block (running max
// and sum, exp2, dropout).
#pragma once

#include <cstdint>

#include "forward_packing.h"
#include "philox.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {  // forward.cpp's own: this header is included there only

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

#if defined(FASTATTN_HAVE_AVX512BF16)
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

// Degree of the exp2 polynomial for p in the widened (fp32-product) forward of inputs of type T. bfloat16 inputs
// use degree 3 (relative error 1.0e-4, 2^0 = 1 exactly), as the vdpbf16ps path does: its error is 1/40 of
// a bfloat16 output's half ulp (2^-9), and it saves 2 FMAs per 16 scores.
// float32 and float16 (half ulp 2^-12) keep degree 5 (1.4e-7).
template <typename T>
constexpr int kWidenedExpDegree = std::is_same<T, bf16_t>::value ? 3 : 5;

// Online-softmax update of one group for one key block (scores in bf.st): m, l, alpha, and p in place
// (dropout applied after the row sums); with kBf16Pairs (the vdpbf16ps path), p goes to bf.pp as bf16
// pairs instead. DEG: the exp2 polynomial of the fp32 path (kWidenedExpDegree). Returns false if every score
// is -inf.
template <bool kBf16Pairs, int DEG = 5>
FASTATTN_INLINE bool softmax_update(const Params& p, ItemBuffers& bf, int64_t b, int64_t h, int64_t gi0, int64_t grow,
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
  if constexpr (kBf16Pairs) {
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
    if constexpr (kBf16Pairs) pack_p_pairs(bf.st, nk, bf.pp);
#endif
  }
  return true;
}

}  // namespace
}  // namespace FASTATTN_NS
}  // namespace fastattn
