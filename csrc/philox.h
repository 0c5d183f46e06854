// fastattn: dropout's Philox4x32-10 words, scalar and over SIMD lanes (spec: fastattn/_philox.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace fastattn {
namespace FASTATTN_NS {

constexpr uint32_t kPhiloxA = 0xD2511F53u, kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10: 10 rounds of (c0..c3) <- (hi(B c2)^c1^k0, lo(B c2), hi(A c0)^c3^k1, lo(A c0)).
FASTATTN_INLINE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxA) * c[0];
    const uint64_t p2 = static_cast<uint64_t>(kPhiloxB) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c[1] ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(p2);
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(p0);
    c[0] = n0; c[1] = n1; c[2] = n2; c[3] = n3;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The uint32 word of element (b, h, i, j): counter (j>>2, i, h, b), key (seed lo, seed hi), word j&3.
FASTATTN_INLINE uint32_t dropout_word(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j) {
  uint32_t c[4] = {static_cast<uint32_t>(j >> 2), static_cast<uint32_t>(i), static_cast<uint32_t>(h),
                   static_cast<uint32_t>(b)};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return c[j & 3];
}
// keep(b,h,i,j) = word >= thr.
FASTATTN_INLINE bool dropout_keep(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j, uint32_t thr) {
  return dropout_word(seed, b, h, i, j) >= thr;
}

namespace simd {
#if defined(FASTATTN_HAVE_AVX512)
constexpr int kPhiloxLanes = 16;
using vu32 = __m512i;
// (hi, lo) of a * c per 32-bit lane: even lanes from one vpmuludq, odd lanes from a shifted one.
FASTATTN_INLINE void mulhilo(__m512i a, __m512i c, __m512i& hi, __m512i& lo) {
  const __m512i ev = _mm512_mul_epu32(a, c);
  const __m512i od = _mm512_mul_epu32(a, _mm512_srli_epi64(c, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(ev, 32), od);
  lo = _mm512_mask_blend_epi32(0xAAAA, ev, _mm512_slli_epi64(od, 32));
}
// Philox4x32-10 on 16 independent counters (one per lane).
FASTATTN_INLINE void philox(__m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, uint32_t k0, uint32_t k1) {
  const __m512i A = _mm512_set1_epi32(static_cast<int>(kPhiloxA));
  const __m512i B = _mm512_set1_epi32(static_cast<int>(kPhiloxB));
  for (int r = 0; r < 10; ++r) {
    __m512i hi0, lo0, hi2, lo2;
    mulhilo(A, c0, hi0, lo0);
    mulhilo(B, c2, hi2, lo2);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi2, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c0 = n0; c1 = lo2; c2 = n2; c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}
FASTATTN_INLINE __m512i u32_iota(uint32_t base) {
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(base)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
FASTATTN_INLINE __m512i u32_set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
FASTATTN_INLINE void u32_store(uint32_t* p, __m512i x) { _mm512_storeu_si512(p, x); }
#elif defined(FASTATTN_HAVE_AVX2)
constexpr int kPhiloxLanes = 8;
using vu32 = __m256i;
FASTATTN_INLINE void mulhilo(__m256i a, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i ev = _mm256_mul_epu32(a, c);
  const __m256i od = _mm256_mul_epu32(a, _mm256_srli_epi64(c, 32));
  hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
  lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
}
FASTATTN_INLINE void philox(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, uint32_t k0, uint32_t k1) {
  const __m256i A = _mm256_set1_epi32(static_cast<int>(kPhiloxA));
  const __m256i B = _mm256_set1_epi32(static_cast<int>(kPhiloxB));
  for (int r = 0; r < 10; ++r) {
    __m256i hi0, lo0, hi2, lo2;
    mulhilo(A, c0, hi0, lo0);
    mulhilo(B, c2, hi2, lo2);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi2, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0; c1 = lo2; c2 = n2; c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}
FASTATTN_INLINE __m256i u32_iota(uint32_t base) {
  return _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(base)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTATTN_INLINE __m256i u32_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
FASTATTN_INLINE void u32_store(uint32_t* p, __m256i x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
#else
constexpr int kPhiloxLanes = 8;
struct vu32 { uint32_t v[8]; };
FASTATTN_INLINE void philox(vu32& c0, vu32& c1, vu32& c2, vu32& c3, uint32_t k0, uint32_t k1) {
  for (int l = 0; l < 8; ++l) {
    uint32_t c[4] = {c0.v[l], c1.v[l], c2.v[l], c3.v[l]};
    philox4x32_10(c, k0, k1);
    c0.v[l] = c[0]; c1.v[l] = c[1]; c2.v[l] = c[2]; c3.v[l] = c[3];
  }
}
FASTATTN_INLINE vu32 u32_iota(uint32_t base) {
  vu32 r;
  for (int l = 0; l < 8; ++l) r.v[l] = base + static_cast<uint32_t>(l);
  return r;
}
FASTATTN_INLINE vu32 u32_set1(uint32_t x) {
  vu32 r;
  for (int l = 0; l < 8; ++l) r.v[l] = x;
  return r;
}
FASTATTN_INLINE void u32_store(uint32_t* p, vu32 x) { std::memcpy(p, x.v, sizeof(x.v)); }
#endif
}  // namespace simd

// words[t] = dropout_word(seed, b, h, i, j0 + t) for t in [0, n): one Philox per 4 j's, lanes over counters.
inline void dropout_words_row(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n,
                              uint32_t* words) {
  constexpr int W = simd::kPhiloxLanes;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  int64_t c = j0 >> 2;
  const int64_t c_end = (j0 + n + 3) >> 2;
  alignas(64) uint32_t buf[4][W];
  while (c < c_end) {
    simd::vu32 c0 = simd::u32_iota(static_cast<uint32_t>(c)), c1 = simd::u32_set1(static_cast<uint32_t>(i)),
               c2 = simd::u32_set1(static_cast<uint32_t>(h)), c3 = simd::u32_set1(static_cast<uint32_t>(b));
    simd::philox(c0, c1, c2, c3, k0, k1);
    simd::u32_store(buf[0], c0);
    simd::u32_store(buf[1], c1);
    simd::u32_store(buf[2], c2);
    simd::u32_store(buf[3], c3);
    for (int l = 0; l < W && c + l < c_end; ++l) {
      for (int r = 0; r < 4; ++r) {
        const int64_t j = 4 * (c + l) + r;
        if (j >= j0 && j < j0 + n) words[j - j0] = buf[r][l];
      }
    }
    c += W;
  }
}

// keep[t] = (word(b, h, i, j0 + t) >= thr) for t in [0, n).
inline void dropout_keep_row(uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, uint32_t thr,
                             uint8_t* keep) {
  uint32_t words[64];
  for (int64_t t0 = 0; t0 < n; t0 += 64) {
    const int64_t m = std::min<int64_t>(64, n - t0);
    dropout_words_row(seed, b, h, i, j0 + t0, m, words);
    for (int64_t t = 0; t < m; ++t) keep[t0 + t] = words[t] >= thr;
  }
}

// words[r * n + t] = word(b, h, i0 + t, 4*c0 + r): the four keys of counter c0 for n queries (lanes over i).
inline void dropout_words_quad_col(uint64_t seed, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t c0,
                                   uint32_t* words) {
  constexpr int W = simd::kPhiloxLanes;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) uint32_t buf[4][W];
  for (int64_t t0 = 0; t0 < n; t0 += W) {
    simd::vu32 a = simd::u32_set1(static_cast<uint32_t>(c0)), c = simd::u32_iota(static_cast<uint32_t>(i0 + t0)),
               d = simd::u32_set1(static_cast<uint32_t>(h)), e = simd::u32_set1(static_cast<uint32_t>(b));
    simd::philox(a, c, d, e, k0, k1);
    simd::u32_store(buf[0], a);
    simd::u32_store(buf[1], c);
    simd::u32_store(buf[2], d);
    simd::u32_store(buf[3], e);
    const int64_t m = std::min<int64_t>(W, n - t0);
    for (int r = 0; r < 4; ++r)
      for (int64_t l = 0; l < m; ++l) words[r * n + t0 + l] = buf[r][l];
  }
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
