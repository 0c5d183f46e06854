// fastattn CPU forward: operands laid out for the micro-kernels: Q^T packed per group of queries, K / V
// widened to fp32 (or paired as bf16 for vdpbf16ps), mask tiles transposed, P^T paired as bf16.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "forward_microkernels.h"
#include "mask.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {  // forward.cpp's own: this header is included there only

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
// float32, unit key stride) is loaded 16 x 16 at a time and transposed in registers: element by element,
// such a mask ((B, 1, L, S), HF-style 4-D masks) would cost about as much as the block's QK^T and PV.
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
#if defined(FASTATTN_HAVE_AVX512)
  if (p.q.se == 1) {  // 16 rows at a time, transposed in registers (eo implies a unit column stride)
    const vf cv = simd::set1(c);
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

#if defined(FASTATTN_HAVE_AVX512BF16)
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
#endif  // FASTATTN_HAVE_AVX512BF16

}  // namespace
}  // namespace FASTATTN_NS
}  // namespace fastattn
