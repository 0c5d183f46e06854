// fastattn: scalar conversions between the storage dtypes (bf16, f16, f32, f64) and fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtype.h"

namespace fastattn {
namespace FASTATTN_NS {

// bf16 -> f32: the bf16 bits are the top half of the f32.
FASTATTN_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
FASTATTN_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// f16 -> f32 (exact): rebias the exponent, normalise subnormals, map inf/NaN.
FASTATTN_INLINE float f16_to_f32(uint16_t h) {
#if defined(FASTATTN_HAVE_AVX2)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: value = man * 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
// f32 -> f16, round to nearest even (overflow -> inf, NaN -> NaN, subnormals rounded exactly).
FASTATTN_INLINE uint16_t f32_to_f16(float f) {
#if defined(FASTATTN_HAVE_AVX2)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;              // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;             // >= 65520 rounds to inf
  if (u >= 0x38800000u) {                                  // normal f16
    uint32_t r = u - 0x38000000u;                          // rebias exponent (127 -> 15)
    r += 0xfffu + ((r >> 13) & 1u);
    return sign | static_cast<uint16_t>(r >> 13);
  }
  // subnormal or zero: value / 2^-24 rounded to nearest even by the FPU (exact for these magnitudes)
  float g;
  std::memcpy(&g, &u, 4);
  return sign | static_cast<uint16_t>(std::nearbyint(g * 16777216.0f));
#endif
}

// Element <-> f32 / f64 conversions by storage type.
FASTATTN_INLINE float to_f32(float x) { return x; }
FASTATTN_INLINE float to_f32(double x) { return static_cast<float>(x); }
FASTATTN_INLINE float to_f32(bf16_t x) { return bf16_to_f32(x.x); }
FASTATTN_INLINE float to_f32(f16_t x) { return f16_to_f32(x.x); }
FASTATTN_INLINE float to_f32(int16_t x) { return static_cast<float>(x); }  // out_lo codes
FASTATTN_INLINE double to_f64(double x) { return x; }
FASTATTN_INLINE double to_f64(float x) { return x; }
FASTATTN_INLINE double to_f64(bf16_t x) { return bf16_to_f32(x.x); }
FASTATTN_INLINE double to_f64(f16_t x) { return f16_to_f32(x.x); }
template <typename T> FASTATTN_INLINE T from_f32(float x);
template <> FASTATTN_INLINE float from_f32<float>(float x) { return x; }
template <> FASTATTN_INLINE double from_f32<double>(float x) { return x; }
template <> FASTATTN_INLINE bf16_t from_f32<bf16_t>(float x) { return bf16_t{f32_to_bf16(x)}; }
template <> FASTATTN_INLINE f16_t from_f32<f16_t>(float x) { return f16_t{f32_to_f16(x)}; }

// Element x in the accumulation type Acc (float, or double for float64 inputs).
template <typename Acc, typename T> FASTATTN_INLINE Acc to_acc(T x) {
  if constexpr (std::is_same<Acc, double>::value) return to_f64(x);
  else return to_f32(x);
}
// Accumulator x stored as element type T: a double stays double, anything else goes through float.
template <typename T, typename Acc> FASTATTN_INLINE T from_acc(Acc x) {
  if constexpr (std::is_same<T, double>::value) return static_cast<double>(x);
  else return from_f32<T>(static_cast<float>(x));
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
