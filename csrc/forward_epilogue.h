// fastattn CPU forward: the end of a work item: out = O / l (times the dropout scale), lse = ln 2 (m + log2 l),
// and the fp16 / bf16 output's residual code out_lo (out_lo.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "forward_tiling.h"
#include "out_lo.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {  // forward.cpp's own: this header is included there only

// log2 x for a positive normal float: exponent bits + atanh series of the mantissa folded into
// [sqrt(1/2), sqrt(2)) (|t| < 0.172, truncation < 1e-9). Branch-free, so the row loop vectorises (a libm
// call per row does not).
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
#endif

// One output row, out = T(x) for x = o * f, and its residual code out_lo = encode_lo(x, out) (training only).
// AVX-512: in registers. Otherwise in chunks: x and float(out) staged in two small buffers, then one
// branch-free loop the compiler vectorizes.
template <typename T>
void write_row_with_out_lo(const Params& p, T* out, int16_t* out_lo, const float* o, float f) {
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
// denormal sum) take the scalar std::log2 (a scalar loop per row would not vectorise).
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
// with p.out_lo (fp16 / bf16), also out_lo[i] (out_lo.h). Rows of groups g with written[g] already hold
// their output (OutRows): only their lse is written.
template <typename T>
void write_output(const Params& p, const Blocking& c, const ItemBuffers& bf, int64_t b, int64_t h, int64_t i0, int64_t nq,
                  const bool* written = nullptr) {
  constexpr bool kLow = !std::is_same<T, float>::value;
  const bool with_out_lo = kLow && p.out_lo.ptr != 0;
  const float dscale = static_cast<float>(p.dropout_scale());
  float* lse = p.lse.ptr == 0 ? nullptr : reinterpret_cast<float*>(p.lse.ptr) + b * p.lse.sb + h * p.lse.sh;
  alignas(64) float fac[kMaxBM];
  // lse straight into a unit-stride lse; else staged in bf.alpha (free after the last key block), then scattered.
  float* lg = lse == nullptr ? nullptr : p.lse.sl == 1 ? lse + i0 : bf.alpha;
  if (p.sinks == 0) {
    row_factors(bf.l, bf.m, nq, dscale, fac, lg);
  } else {
    // The sink s (base 2: s2 = log2(e) s) joins the denominator: M = max(m, s2), w = 2^(m - M),
    // l' = w l + 2^(s2 - M) in M's frame gives the lse; O is in m's frame, so out = O dscale / (l' / w)
    // (w = 0: out 0, O is negligible next to the sink). A row with no visible key: lse = s, out = 0.
    alignas(64) float lm[kMaxBM], mm[kMaxBM], lo[kMaxBM], junk[kMaxBM];
    const float s2 = reinterpret_cast<const float*>(p.sinks)[h] * kLog2e;
    for (int64_t r = 0; r < nq; ++r) {
      const float m = bf.m[r], M = m > s2 ? m : s2;  // a NaN m gives a NaN row
      if (M == kNegInf) {  // a -inf sink and no visible key
        lm[r] = 0.f, mm[r] = kNegInf, lo[r] = 0.f;
        continue;
      }
      const float w = m == kNegInf ? 0.f : std::exp2(m - M);
      lm[r] = w * bf.l[r] + std::exp2(s2 - M);
      mm[r] = M;
      lo[r] = w == 0.f ? std::numeric_limits<float>::infinity() : lm[r] / w;
    }
    row_factors(lo, nullptr, nq, dscale, fac, nullptr);
    if (lg != nullptr) row_factors(lm, mm, nq, dscale, junk, lg);
  }
  if (lse != nullptr && p.lse.sl != 1)
    for (int64_t r = 0; r < nq; ++r) lse[(i0 + r) * p.lse.sl] = lg[r];
  for (int64_t r = 0; r < nq; ++r) {
    if (written != nullptr && written[r / QG]) continue;
    const int64_t i = i0 + r;
    T* out = p.out.at<T>(b, h, i);
    const float* o = bf.o + r * c.Evp;
    if (with_out_lo) {
      if constexpr (kLow) write_row_with_out_lo(p, out, p.out_lo.at<int16_t>(b, h, i), o, fac[r]);
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

}  // namespace
}  // namespace FASTATTN_NS
}  // namespace fastattn
