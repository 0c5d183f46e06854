// fastattn: fp32 SIMD vectors (AVX-512, AVX2 or portable), chosen by the module's instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "convert.h"

namespace fastattn {
namespace FASTATTN_NS {

// Float vectors of W lanes: AVX-512 (16), AVX2 (8) or a portable 8-lane struct the compiler vectorises.
// Partial ("_n") loads/stores touch only the first n lanes' memory.
namespace simd {

// 2^f on f in [-0.5, 0.5]: minimax-fit polynomials (relative error 1.4e-7 for degree 5, 1.0e-4 for 3). Degree
// 3 (every bfloat16 forward: the bf16-dot path, which rounds p to bf16 for P V but sums l in fp32, and the path
// that widens bf16 to fp32; see kWidenedExpDegree in forward_softmax.h) is fit with c0 = 1, so 2^0 = 1
// exactly: a row's maximum key then has p = bf16(p) = 1 and a row with one visible key gives O = v and the
// lse the backward's P = 1 comes from. (An unconstrained fit has c0 = 0.99993: O = v / 0.99993, off the
// backward's algebra by ~2^-14, and gradients that are 0 in exact math would not come out 0.)
// exp2 returns exactly 0 below this: 2^-125 is the smallest power whose polynomial-scaled result
// (factor >= 0.7) stays a normal float, and probabilities < 2^-125 of the row maximum are below fp32 resolution.
constexpr float kExp2Min = -125.0f;
template <int DEG> struct Exp2Poly;
template <> struct Exp2Poly<5> {
  static constexpr float c[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022121727466583f,
                                 0.05550742521882057f, 0.009675459936261177f, 0.0013266970636323094f};
};
template <> struct Exp2Poly<3> {
  static constexpr float c[4] = {1.0f, 0.6932829022407532f, 0.24221095442771912f, 0.05500892922282219f};
};

#if defined(FASTATTN_HAVE_AVX512)
constexpr int W = 16;
using vf = __m512;
FASTATTN_INLINE vf zero() { return _mm512_setzero_ps(); }
FASTATTN_INLINE vf set1(float x) { return _mm512_set1_ps(x); }
FASTATTN_INLINE vf load(const float* p) { return _mm512_loadu_ps(p); }
FASTATTN_INLINE __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}
FASTATTN_INLINE vf load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
FASTATTN_INLINE void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
FASTATTN_INLINE void store_n(float* p, vf x, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), x); }
FASTATTN_INLINE vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
FASTATTN_INLINE vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
FASTATTN_INLINE vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
FASTATTN_INLINE vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a*b+c
FASTATTN_INLINE vf fmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }  // a*b-c
FASTATTN_INLINE vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
FASTATTN_INLINE float reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
FASTATTN_INLINE float reduce_max(vf a) { return _mm512_reduce_max_ps(a); }
// 2^x: x = n + f, 2^f by polynomial, scaled by 2^n with vscalefps. x < kExp2Min (masked keys: -inf) gives
// exactly 0 through the zeroing mask, never a denormal: an underflowing or denormal result costs a
// microcode assist of ~100+ cycles per instruction, which would make masked keys dearer than visible
// ones. NaN stays NaN (NaN compares "not less"). vreduceps gives f = x - round(x) in one instruction
// (0 for +-inf, whose lanes the mask zeroes or scalef keeps at +inf), so x needs no clamp: same bits as
// max + roundscale + sub, one vector op fewer.
template <int DEG = 5>
FASTATTN_INLINE vf exp2(vf x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExp2Min), _CMP_NLT_UQ);
  const vf f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf n = _mm512_sub_ps(x, f);
  vf p = _mm512_set1_ps(Exp2Poly<DEG>::c[DEG]);
  for (int d = DEG - 1; d >= 0; --d) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(Exp2Poly<DEG>::c[d]));
  return _mm512_maskz_scalef_ps(live, p, n);
}
// W elements of type T -> f32 lanes.
FASTATTN_INLINE vf load_cvt(const float* p) { return _mm512_loadu_ps(p); }
FASTATTN_INLINE vf load_cvt(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FASTATTN_INLINE vf load_cvt(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
FASTATTN_INLINE vf load_cvt_n(const float* p, int64_t n) { return load_n(p, n); }
FASTATTN_INLINE vf load_cvt_n(const bf16_t* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
FASTATTN_INLINE vf load_cvt_n(const f16_t* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes(n), p));
}
FASTATTN_INLINE vf load_cvt(const int16_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
FASTATTN_INLINE vf load_cvt_n(const int16_t* p, int64_t n) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p)));
}
// 2^e of each lane: its exponent bits alone (0 for 0 / subnormals, inf for inf / NaN).
FASTATTN_INLINE vf pow2_of(vf x) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7f800000)));
}
// f32 lanes -> bf16 bits, round to nearest even, NaN kept quiet (same as f32_to_bf16).
FASTATTN_INLINE __m256i cvt_bf16_int(vf x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i r = _mm512_add_epi32(
      u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i res = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(r, 16),
                                              _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(res);
}
// The same bits; with AVX512-BF16 one vcvtneps2bf16 (it rounds and quiets NaN alike) instead of ~9 integer
// ops, except for vectors holding a subnormal, which that instruction flushes to zero.
FASTATTN_INLINE __m256i cvt_bf16(vf x) {
#if defined(FASTATTN_HAVE_AVX512BF16)
  if (_mm512_fpclass_ps_mask(x, 0x20) == 0) return (__m256i)_mm512_cvtneps_pbh(x);
#endif
  return cvt_bf16_int(x);
}
FASTATTN_INLINE void store_cvt(float* p, vf x) { _mm512_storeu_ps(p, x); }
FASTATTN_INLINE void store_cvt(bf16_t* p, vf x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_bf16(x)); }
FASTATTN_INLINE void store_cvt(f16_t* p, vf x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
FASTATTN_INLINE void store_cvt_n(float* p, vf x, int64_t n) { store_n(p, x, n); }
FASTATTN_INLINE void store_cvt_n(bf16_t* p, vf x, int64_t n) { _mm256_mask_storeu_epi16(p, lanes(n), cvt_bf16(x)); }
FASTATTN_INLINE void store_cvt_n(f16_t* p, vf x, int64_t n) {
  _mm256_mask_storeu_epi16(p, lanes(n), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#elif defined(FASTATTN_HAVE_AVX2)
constexpr int W = 8;
using vf = __m256;
FASTATTN_INLINE vf zero() { return _mm256_setzero_ps(); }
FASTATTN_INLINE vf set1(float x) { return _mm256_set1_ps(x); }
FASTATTN_INLINE vf load(const float* p) { return _mm256_loadu_ps(p); }
FASTATTN_INLINE __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
FASTATTN_INLINE vf load_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes(n)); }
FASTATTN_INLINE void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
FASTATTN_INLINE void store_n(float* p, vf x, int64_t n) { _mm256_maskstore_ps(p, lanes(n), x); }
FASTATTN_INLINE vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
FASTATTN_INLINE vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
FASTATTN_INLINE vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
FASTATTN_INLINE vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
FASTATTN_INLINE vf fmsub(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
FASTATTN_INLINE vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
FASTATTN_INLINE float reduce_add(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
FASTATTN_INLINE float reduce_max(vf a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 2^x: x = n + f, 2^f by polynomial times 2^n built in the exponent bits; x < -126 (and -inf) gives 0,
// NaN stays NaN (min/max return their second operand when one is NaN).
template <int DEG = 5>
FASTATTN_INLINE vf exp2(vf x) {
  const vf tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kExp2Min), _CMP_NLT_UQ);  // x < kExp2Min -> 0 (no denormals)
  x = _mm256_max_ps(_mm256_set1_ps(kExp2Min), x);
  x = _mm256_min_ps(_mm256_set1_ps(127.0f), x);
  const vf n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = _mm256_sub_ps(x, n);
  vf p = _mm256_set1_ps(Exp2Poly<DEG>::c[DEG]);
  for (int d = DEG - 1; d >= 0; --d) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(Exp2Poly<DEG>::c[d]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), tiny);
}
FASTATTN_INLINE vf load_cvt(const float* p) { return _mm256_loadu_ps(p); }
FASTATTN_INLINE vf load_cvt(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
FASTATTN_INLINE vf load_cvt(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
FASTATTN_INLINE vf load_cvt(const int16_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 2^e of each lane: its exponent bits alone (0 for 0 / subnormals, inf for inf / NaN).
FASTATTN_INLINE vf pow2_of(vf x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7f800000))); }
template <typename T> FASTATTN_INLINE vf load_cvt_n(const T* p, int64_t n) {
  if (n >= W) return load_cvt(p);
  alignas(32) T tmp[W];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(T));
  return load_cvt(tmp);
}
FASTATTN_INLINE vf load_cvt_n(const float* p, int64_t n) { return load_n(p, n); }
FASTATTN_INLINE void store_cvt(float* p, vf x) { _mm256_storeu_ps(p, x); }
FASTATTN_INLINE void store_cvt(bf16_t* p, vf x) {
  alignas(32) float t[W];
  _mm256_store_ps(t, x);
  for (int l = 0; l < W; ++l) p[l].x = f32_to_bf16(t[l]);
}
FASTATTN_INLINE void store_cvt(f16_t* p, vf x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <typename T> FASTATTN_INLINE void store_cvt_n(T* p, vf x, int64_t n) {
  if (n >= W) return store_cvt(p, x);
  alignas(32) T tmp[W];
  store_cvt(tmp, x);
  std::memcpy(static_cast<void*>(p), tmp, static_cast<size_t>(std::max<int64_t>(n, 0)) * sizeof(T));
}
FASTATTN_INLINE void store_cvt_n(float* p, vf x, int64_t n) { store_n(p, x, n); }

#else
constexpr int W = 8;
#if defined(__GNUC__)
// GNU vector extension: 8 floats the compiler maps to whatever SIMD the target has (2x SSE2, NEON, ...).
typedef float v8f_t __attribute__((vector_size(32)));
struct vf { v8f_t v; };
#define FASTATTN_VOP(expr) { vf r; r.v = (expr); return r; }
#else
struct vf { float v[8]; };
#endif
#define FASTATTN_VLOOP for (int l = 0; l < 8; ++l)
FASTATTN_INLINE vf zero() { vf r; FASTATTN_VLOOP r.v[l] = 0.f; return r; }
FASTATTN_INLINE vf set1(float x) { vf r; FASTATTN_VLOOP r.v[l] = x; return r; }
FASTATTN_INLINE vf load(const float* p) { vf r; std::memcpy(&r.v, p, sizeof(r.v)); return r; }
FASTATTN_INLINE vf load_n(const float* p, int64_t n) { vf r; FASTATTN_VLOOP r.v[l] = l < n ? p[l] : 0.f; return r; }
FASTATTN_INLINE void store(float* p, vf x) { std::memcpy(p, &x.v, sizeof(x.v)); }
FASTATTN_INLINE void store_n(float* p, vf x, int64_t n) { for (int l = 0; l < 8 && l < n; ++l) p[l] = x.v[l]; }
#if defined(__GNUC__)
FASTATTN_INLINE vf add(vf a, vf b) FASTATTN_VOP(a.v + b.v)
FASTATTN_INLINE vf sub(vf a, vf b) FASTATTN_VOP(a.v - b.v)
FASTATTN_INLINE vf mul(vf a, vf b) FASTATTN_VOP(a.v * b.v)
FASTATTN_INLINE vf fmadd(vf a, vf b, vf c) FASTATTN_VOP(a.v * b.v + c.v)
FASTATTN_INLINE vf fmsub(vf a, vf b, vf c) FASTATTN_VOP(a.v * b.v - c.v)
FASTATTN_INLINE vf max(vf a, vf b) FASTATTN_VOP(a.v > b.v ? a.v : b.v)
#undef FASTATTN_VOP
#else
FASTATTN_INLINE vf add(vf a, vf b) { FASTATTN_VLOOP a.v[l] += b.v[l]; return a; }
FASTATTN_INLINE vf sub(vf a, vf b) { FASTATTN_VLOOP a.v[l] -= b.v[l]; return a; }
FASTATTN_INLINE vf mul(vf a, vf b) { FASTATTN_VLOOP a.v[l] *= b.v[l]; return a; }
FASTATTN_INLINE vf fmadd(vf a, vf b, vf c) { FASTATTN_VLOOP c.v[l] += a.v[l] * b.v[l]; return c; }
FASTATTN_INLINE vf fmsub(vf a, vf b, vf c) { FASTATTN_VLOOP c.v[l] = a.v[l] * b.v[l] - c.v[l]; return c; }
FASTATTN_INLINE vf max(vf a, vf b) { FASTATTN_VLOOP a.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l]; return a; }
#endif
FASTATTN_INLINE float reduce_add(vf a) { float s = 0.f; FASTATTN_VLOOP s += a.v[l]; return s; }
FASTATTN_INLINE float reduce_max(vf a) { float s = a.v[0]; FASTATTN_VLOOP s = s > a.v[l] ? s : a.v[l]; return s; }
// 2^x: x = n + f, 2^f by polynomial times 2^n built in the exponent bits; x < -126 (and -inf) gives 0,
// NaN stays NaN.
#if defined(__GNUC__)
template <int DEG = 5>
FASTATTN_INLINE vf exp2(vf x) {
  typedef int32_t v8i_t __attribute__((vector_size(32)));
  const v8f_t lo = x.v < kExp2Min ? kExp2Min : x.v;  // NaN compares false: stays NaN
  const v8f_t y = lo > 127.f ? 127.f : lo;
  const v8f_t n = (y + 12582912.f) - 12582912.f;  // round to nearest even (|y| < 2^22)
  const v8f_t f = y - n;
  v8f_t p = f * 0.f + Exp2Poly<DEG>::c[DEG];
  for (int d = DEG - 1; d >= 0; --d) p = p * f + Exp2Poly<DEG>::c[d];
  const v8i_t ni = __builtin_convertvector(n == n ? n : 0.f, v8i_t);
  const v8i_t e = (ni + 127) << 23;
  v8f_t s;
  std::memcpy(&s, &e, sizeof(s));
  vf r;
  r.v = x.v < kExp2Min ? 0.f : p * s;
  return r;
}
#else
template <int DEG = 5>
FASTATTN_INLINE vf exp2(vf x) {
  vf r;
  FASTATTN_VLOOP {
    if (x.v[l] != x.v[l]) {
      r.v[l] = x.v[l];
      continue;
    }
    if (x.v[l] < kExp2Min) {
      r.v[l] = 0.f;
      continue;
    }
    float y = x.v[l] > 127.f ? 127.f : x.v[l];
    const float n = std::nearbyint(y);
    const float f = y - n;
    float p = Exp2Poly<DEG>::c[DEG];
    for (int d = DEG - 1; d >= 0; --d) p = p * f + Exp2Poly<DEG>::c[d];
    const uint32_t e = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float s;
    std::memcpy(&s, &e, 4);
    r.v[l] = p * s;
  }
  return r;
}
#endif
template <typename T> FASTATTN_INLINE vf load_cvt(const T* p) { vf r; FASTATTN_VLOOP r.v[l] = to_f32(p[l]); return r; }
template <typename T> FASTATTN_INLINE vf load_cvt_n(const T* p, int64_t n) {
  vf r;
  FASTATTN_VLOOP r.v[l] = l < n ? to_f32(p[l]) : 0.f;
  return r;
}
// 2^e of each lane: its exponent bits alone (0 for 0 / subnormals, inf for inf / NaN).
FASTATTN_INLINE vf pow2_of(vf x) {
  vf r;
  FASTATTN_VLOOP {
    float f = x.v[l];
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u &= 0x7f800000u;
    std::memcpy(&f, &u, 4);
    r.v[l] = f;
  }
  return r;
}
template <typename T> FASTATTN_INLINE void store_cvt(T* p, vf x) { FASTATTN_VLOOP p[l] = from_f32<T>(x.v[l]); }
template <typename T> FASTATTN_INLINE void store_cvt_n(T* p, vf x, int64_t n) {
  for (int l = 0; l < 8 && l < n; ++l) p[l] = from_f32<T>(x.v[l]);
}
#undef FASTATTN_VLOOP
#endif

// tanh x = sign(x) (1 - u) / (1 + u) with u = e^(-2|x|) = 2^(-2 log2(e) |x|) in (0, 1]: no overflow for any x
// (u underflows to 0 and the result to +-1), absolute error ~2e-7 (exp2's), NaN stays NaN.
FASTATTN_INLINE vf tanh(vf x) {
#if defined(FASTATTN_HAVE_AVX512)
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const vf ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
  const vf u = exp2<5>(_mm512_mul_ps(ax, _mm512_set1_ps(-2.8853900817779268f)));
  const vf one = _mm512_set1_ps(1.f);
  const vf t = _mm512_div_ps(_mm512_sub_ps(one, u), _mm512_add_ps(one, u));
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_castps_si512(t), _mm512_and_si512(_mm512_castps_si512(x), sign)));
#elif defined(FASTATTN_HAVE_AVX2)
  const vf sign = _mm256_set1_ps(-0.f);
  const vf u = exp2<5>(_mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(-2.8853900817779268f)));
  const vf one = _mm256_set1_ps(1.f);
  const vf t = _mm256_div_ps(_mm256_sub_ps(one, u), _mm256_add_ps(one, u));
  return _mm256_or_ps(t, _mm256_and_ps(x, sign));
#else
  for (int l = 0; l < W; ++l) x.v[l] = std::tanh(x.v[l]);
  return x;
#endif
}

}  // namespace simd

}  // namespace FASTATTN_NS
}  // namespace fastattn
