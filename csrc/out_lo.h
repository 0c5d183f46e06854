// fastattn: out_lo, the int16 code of a 16-bit output's rounding residual (Params::out_lo).
//
// Why it exists and how the code is chosen: docs/design/out_lo.md. In short, a training fp16 / bf16 forward
// writes, besides out = T(O) (O the fp32 result),
//   out_lo = round((O - out) * 2^(K - e)),   2^e <= |out| < 2^(e+1),   K = 22 (bf16) / 25 (fp16),
// and the backward's delta = rowsum(dO * O) reads O back as out + out_lo * 2^(e - K) (~2^-23 relative).
// out_lo = 0 where out is 0, subnormal, inf / NaN or >= 2^127. The Triton forward (kernels/attention.py,
// _encode_lo) computes the same code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "dtype.h"
#include "simd.h"

namespace fastattn {
namespace FASTATTN_NS {

// 2^K of out_lo's code for storage type T.
template <typename T> struct OutLoCode;
template <> struct OutLoCode<bf16_t> { static constexpr float kScale = 4194304.f; };   // 2^22
template <> struct OutLoCode<f16_t> { static constexpr float kScale = 33554432.f; };   // 2^25

// 2^e of a float (its exponent bits alone): 0 for 0 and subnormals, inf for inf / NaN.
FASTATTN_INLINE float pow2_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0x7f800000u;
  std::memcpy(&x, &u, 4);
  return x;
}

// out_lo of the fp32 result o and its rounding out = float(T(o)), rounded to nearest even. Branch-free, so
// that a loop over a row vectorizes.
template <typename T> FASTATTN_INLINE int16_t encode_lo(float o, float out) {
  uint32_t u;
  std::memcpy(&u, &out, 4);
  const uint32_t ex = (u >> 23) & 0xffu;
  const bool ok = ex >= 1u && ex <= 253u;
  const uint32_t iu = (254u - ex) << 23;  // 2^-e where ok
  float inv;
  std::memcpy(&inv, &iu, 4);
  float m = (o - out) * inv * OutLoCode<T>::kScale;
  m = std::min(32767.f, std::max(-32767.f, m));
  m = (m + 12582912.f) - 12582912.f;  // round to nearest even (|m| < 2^22)
  return ok ? static_cast<int16_t>(m) : int16_t{0};
}

#if defined(FASTATTN_HAVE_AVX512)
// encode_lo of the first n lanes (x the fp32 output, h = float(T(x))), stored as int16: the same code in
// registers (cvtps rounds to nearest even, as the magic-number add of encode_lo).
template <typename T>
FASTATTN_INLINE void encode_lo_store(int16_t* p, simd::vf x, simd::vf h, int64_t n) {
  const __m512i ex = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(h), 23), _mm512_set1_epi32(0xff));
  const __mmask16 ok =
      _mm512_cmpge_epu32_mask(ex, _mm512_set1_epi32(1)) & _mm512_cmple_epu32_mask(ex, _mm512_set1_epi32(253));
  const simd::vf inv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(254), ex), 23));
  simd::vf m = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(x, h), inv), _mm512_set1_ps(OutLoCode<T>::kScale));
  m = _mm512_min_ps(_mm512_set1_ps(32767.f), _mm512_max_ps(_mm512_set1_ps(-32767.f), m));
  _mm512_mask_cvtepi32_storeu_epi16(p, simd::lanes(n), _mm512_maskz_cvtps_epi32(ok, m));
}
#endif

}  // namespace FASTATTN_NS
}  // namespace fastattn
