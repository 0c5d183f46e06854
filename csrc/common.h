// fastattn: shared pieces of the CPU kernels (forward and backward).
//
// No torch headers: tensors arrive as raw addresses plus element strides (Params / Tensor4).
// The same sources are compiled once per instruction set (setup.py); the FASTATTN_HAVE_* macros,
// never the build machine's -march, select the SIMD code. Everything lives in
// fastattn::<isa namespace> so the three modules' symbols stay distinct.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(FASTATTN_HAVE_AVX512) || defined(FASTATTN_HAVE_AVX2)
#include <immintrin.h>
#endif

#ifndef FASTATTN_ISA_NAME
#define FASTATTN_ISA_NAME "portable"
#endif

#if defined(FASTATTN_NS)
// set by the build (an A/B benchmark variant of a module)
#elif defined(FASTATTN_HAVE_AVX512)
#define FASTATTN_NS isa_avx512
#elif defined(FASTATTN_HAVE_AVX2)
#define FASTATTN_NS isa_avx2
#else
#define FASTATTN_NS isa_portable
#endif

#if defined(__GNUC__)
#define FASTATTN_INLINE inline __attribute__((always_inline))
#define FASTATTN_RESTRICT __restrict__
#else
#define FASTATTN_INLINE inline
#define FASTATTN_RESTRICT
#endif

#include "parallel.h"  // parallel_for and the threads that run it

namespace pybind11 {
class module_;
}

namespace fastattn {
namespace FASTATTN_NS {

// ============================================================================================ types

// Element dtype codes shared with fastattn/_cpu.py (DTYPE_CODES there).
enum DType : int { kNone = 0, kBool = 1, kF32 = 2, kF16 = 3, kBF16 = 4, kF64 = 5 };

// 16-bit storage types (bit patterns only; arithmetic is done in fp32).
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

// A 4-D strided view: element (b, h, i, e) lives at ptr + b*sb + h*sh + i*sl + e*se elements.
// (lse uses sb/sh/sl; a broadcast mask dim has stride 0.)
struct Tensor4 {
  uintptr_t ptr = 0;
  int64_t sb = 0, sh = 0, sl = 0, se = 0;
  template <typename T> T* at(int64_t b, int64_t h, int64_t i) const {
    return reinterpret_cast<T*>(ptr) + b * sb + h * sh + i * sl;
  }
};

// Everything a kernel call needs. Forward fills q,k,v,out,lse,mask; backward also dout,dq,dk,dv,dmask.
struct Params {
  Tensor4 q, k, v, out, lse, mask;        // q (B,H,L,E) k (B,Hk,S,E) v (B,Hk,S,Ev) out (B,H,L,Ev) lse (B,H,L)
                                          // (the forward's lse is optional: ptr 0 = not wanted)
  Tensor4 dout, dq, dk, dv, dmask;        // backward only
  // fp16 / bf16 only, optional (ptr 0 = none): int16 (B,H,L,Ev), the output's rounding residual coded
  // relative to out (encode_lo). The forward writes it; the backward's delta reads O back from out and
  // out_lo to ~2^-23 relative (see encode_lo).
  Tensor4 out_lo;
  int dtype = kF32;                       // element type of q/k/v/out (and dout/dq/dk/dv)
  int mask_dtype = kNone;                 // kNone, kBool, kF32, or dtype
  int dmask_dtype = kNone;                // kNone when no mask gradient is wanted
  int64_t B = 0, H = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;
  double scale = 1.0;
  bool is_causal = false;
  // With is_causal, key j is visible to query i iff j <= i + causal_offset (0: top-left, torch's is_causal;
  // S - L: lower-right, the query block at the end of the keys, torch's causal_lower_right). It may be
  // negative (L > S lower-right: the first L - S rows see no key) or larger than needed.
  int64_t causal_offset = 0;
  double dropout_p = 0.0;                 // 0: no RNG at all
  uint32_t thr = 0;                       // keep iff philox word >= thr (brief)
  uint64_t seed = 0;
  int num_threads = 1;
  // Varlen (packed) batch: addresses of int32 cumulative lengths (B + 1 entries), 0 for a regular batch.
  // Item b is then query rows cu_q[b]..cu_q[b+1] of q/out/dout/dq/lse and key rows cu_k[b]..cu_k[b+1]
  // of k/v/dk/dv (their sb is unused); L and S are the maxima. See item_params().
  uintptr_t cu_q = 0, cu_k = 0;
  // key/value head used by query head h (GQA).
  int64_t kv_head(int64_t h) const { return h / (H / Hk); }
  // multiplier of kept probabilities: 1 / (1 - p).
  double dropout_scale() const { return dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0; }
};

// Batch item b as a call of its own: for a varlen batch, the pointers moved to the item's first query /
// key row and L, S its lengths; b still indexes the mask (top-left corner) and the dropout counters, and
// i, j stay local to the item. A regular batch's Params are returned unchanged.
inline Params item_params(const Params& p, int64_t b) {
  if (p.cu_q == 0) return p;
  Params s = p;
  const int32_t* cq = reinterpret_cast<const int32_t*>(p.cu_q);
  const int32_t* ck = reinterpret_cast<const int32_t*>(p.cu_k);
  const int64_t q0 = cq[b], k0 = ck[b];
  s.L = cq[b + 1] - q0;
  s.S = ck[b + 1] - k0;
  const int64_t es = p.dtype == kF32 ? 4 : p.dtype == kF64 ? 8 : 2;
  auto shift = [](Tensor4& t, int64_t row, int64_t bytes) {
    if (t.ptr == 0) return;
    t.ptr = static_cast<uintptr_t>(static_cast<int64_t>(t.ptr) + row * t.sl * bytes);
    t.sb = 0;
  };
  for (Tensor4* t : {&s.q, &s.out, &s.out_lo, &s.dout, &s.dq}) shift(*t, q0, es);  // out_lo: int16, es = 2
  for (Tensor4* t : {&s.k, &s.v, &s.dk, &s.dv}) shift(*t, k0, es);
  shift(s.lse, q0, 4);
  return s;
}

// p with causal_offset limited to [-L, S]: the same visible keys (an offset >= S - 1 shows every query every
// key, one <= -L shows no query any), and i + causal_offset stays small (no int64 overflow, exact as a float).
// Varlen: L and S are the maxima, so the limits hold for every item too.
inline bool causal_offset_in_range(const Params& p) { return p.causal_offset >= -p.L && p.causal_offset <= p.S; }
inline Params with_causal_offset_in_range(const Params& p) {
  Params c = p;
  c.causal_offset = std::min(std::max(p.causal_offset, -p.L), p.S);
  return c;
}

// The backward kernel's bindings (csrc/backward.cpp); bindings.cpp calls it from PYBIND11_MODULE.
void register_backward(pybind11::module_& m);
void register_additive(pybind11::module_& m);  // additive.cpp
void register_hard(pybind11::module_& m);      // hard.cpp
void register_eager(pybind11::module_& m);     // eager.cpp

// ============================================================================================ bf16 dot

#if defined(FASTATTN_HAVE_AVX512BF16)
// Whether vdpbf16ps (2 bf16 products per fp32 lane) outruns widening to fp32 and vfmadd231ps on this CPU.
// It varies by model: one machine of this project ran bf16 dots at twice the fp32 FMA rate, another at
// half of it (there widening bf16 to fp32 made the bf16 forward 1.6x faster). Decided once per process
// by timing both instruction streams (~0.1 ms); FASTATTN_BF16_DOT=1 / 0 forces the choice (read per call).
inline double time_dot_stream(bool bf16) {
  constexpr int kChains = 12, kIters = 4096;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(static_cast<float>(c));
  const __m512 a = _mm512_set1_ps(1e-7f), b = _mm512_set1_ps(1.f);
  const __m512i ai = _mm512_set1_epi32(0x3f803f80), bi = _mm512_set1_epi32(0x33d633d6);
  const auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < kIters; ++it) {
    if (bf16) {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)ai, (__m512bh)bi);
    } else {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(a, b, acc[c]);
    }
  }
  for (int c = 0; c < kChains; ++c) asm volatile("" : : "v"(acc[c]));  // the chains must be computed
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

inline bool bf16_dot_pays() {
  if (const char* e = std::getenv("FASTATTN_BF16_DOT")) {
    if (e[0] == '0') return false;
    if (e[0] == '1') return true;
  }
  static const bool pays = [] {
    double best_dp = 1e9, best_fma = 1e9;
    for (int r = 0; r < 5; ++r) {  // best of 5: robust to a preempted round
      best_dp = std::min(best_dp, time_dot_stream(true));
      best_fma = std::min(best_fma, time_dot_stream(false));
    }
    // Same instruction count; a dot instruction does twice the products. The fp32 path also widens the
    // K / V tiles and packs Q as fp32 (~10%): the dots must be clearly faster per product to pay.
    return best_dp < 1.6 * best_fma;
  }();
  return pays;
}
#endif

// ============================================================================================ scratch

// 64-byte aligned scratch, grown (never shrunk) once per call per thread.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch(Scratch&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  ~Scratch() { std::free(p_); }
  void* get(size_t bytes) {
    if (bytes > n_) {
      std::free(p_);
      n_ = (bytes + 63) / 64 * 64;
      p_ = std::aligned_alloc(64, n_);
      if (p_ == nullptr) throw std::bad_alloc();
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// This OS thread's scratch, kept across calls (pool workers and each Python thread own theirs), so
// back-to-back calls pay no allocation and no fresh page faults. Never shrunk; freed at thread exit.
inline Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// Carves 64-byte aligned sub-buffers out of one allocation: plan with take<T>(n) on a null base to size it.
struct Arena {
  char* base = nullptr;
  size_t off = 0;
  template <typename T> T* take(size_t n) {
    off = (off + 63) / 64 * 64;
    T* p = reinterpret_cast<T*>(base + off);
    off += n * sizeof(T);
    return base ? p : nullptr;
  }
};

// ============================================================================================ scalars

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

// ------------------------------------------------------------------------- output residual (Params::out_lo)
// The backward's delta_i = sum_e dO_ie O_ie is subtracted from dP_ij, which the kernels compute in fp32 from
// the un-rounded algebra; with O rounded to fp16 / bf16 the two disagree by ~2^-9 |dO| |O| (bf16), which is
// all of dS where it is 0 in exact math (one visible key, with dropout). So a training forward also writes
// out_lo = round((O - out) * 2^(K - e)) in int16, O the fp32 result, out = T(O) and 2^e <= |out| < 2^(e+1)
// (e from out's float32 exponent bits; out_lo = 0 where out is 0, subnormal, inf / NaN or >= 2^127).
// |O - out| < one ulp of out, 2^(e-7) (bf16: 7 stored bits) or 2^(e-10) (fp16, normal out: 10), whatever
// the rounding (the Triton interpreter truncates to bf16), so K = 22 / 25 keeps |out_lo| < 2^15 and
// out + out_lo * 2^(e-K) is O to ~2^-23 relative: about what a float32 copy of O would give, in half its
// bytes (a bf16 residual, T(O - out), would leave ~2^-17). An fp16 subnormal out is clamped: no worse than
// out alone. Powers of two, not a division by out: exact, and cheap enough for the Triton forward's
// registers (kernels/attention.py, _encode_lo, is the same code).
template <typename T> struct LoCode;
template <> struct LoCode<bf16_t> { static constexpr float kScale = 4194304.f; };   // 2^22
template <> struct LoCode<f16_t> { static constexpr float kScale = 33554432.f; };   // 2^25

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
  float m = (o - out) * inv * LoCode<T>::kScale;
  m = std::min(32767.f, std::max(-32767.f, m));
  m = (m + 12582912.f) - 12582912.f;  // round to nearest even (|m| < 2^22)
  return ok ? static_cast<int16_t>(m) : int16_t{0};
}

// ============================================================================================ philox

constexpr uint32_t kPhiloxA = 0xD2511F53u, kPhiloxB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10 (brief): 10 rounds of (c0..c3) <- (hi(B c2)^c1^k0, lo(B c2), hi(A c0)^c3^k1, lo(A c0)).
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

// ============================================================================================ simd f32

// Float vectors of W lanes: AVX-512 (16), AVX2 (8) or a portable 8-lane struct the compiler vectorises.
// Partial ("_n") loads/stores touch only the first n lanes' memory.
namespace simd {

// 2^f on f in [-0.5, 0.5]: minimax-fit polynomials (relative error 1.4e-7 for degree 5, 1.0e-4 for 3). Degree
// 3 (every bfloat16 forward: the bf16-dot path, which rounds p to bf16 for P V but sums l in fp32, and the path
// that widens bf16 to fp32; see kExpDeg in forward.cpp) is fit with c0 = 1, so 2^0 = 1
// exactly: a row's maximum key then has p = bf16(p) = 1 and a row with one visible key gives O = v and the
// lse the backward's P = 1 comes from. (The unconstrained fit, c0 = 0.99993 and error 7.7e-5, made that O
// v / 0.99993, off the backward's algebra by ~2^-14: dq / dk that are 0 in exact math came out ~1e-4..2e-3.)
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
// microcode assist of ~100+ cycles per instruction, which made masked keys several times dearer than
// visible ones. NaN stays NaN (NaN compares "not less"). vreduceps gives f = x - round(x) in one
// instruction (0 for +-inf, whose lanes the mask zeroes or scalef keeps at +inf), so x needs no clamp:
// same bits as max + roundscale + sub, one vector op fewer and ~20% faster in an exp pass on this CPU.
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

}  // namespace simd

// ============================================================================================ masks

// The mask of one (b, h): element (i, j) at ptr + i*sl + j*ss (either stride may be 0 = broadcast).
struct MaskView {
  const void* ptr = nullptr;
  int dtype = kNone;
  int64_t sl = 0, ss = 0;
};

inline MaskView mask_view(const Params& p, int64_t b, int64_t h) {
  MaskView m;
  if (p.mask_dtype == kNone) return m;
  const int64_t esize = p.mask_dtype == kBool ? 1 : p.mask_dtype == kF32 ? 4 : p.mask_dtype == kF64 ? 8 : 2;
  m.ptr = reinterpret_cast<const char*>(p.mask.ptr) + (b * p.mask.sb + h * p.mask.sh) * esize;
  m.dtype = p.mask_dtype;
  m.sl = p.mask.sl;
  m.ss = p.mask.se;
  return m;
}

// Additive value of mask element (i, j) times mul: bool -> 0 / -inf; float -> value * mul.
template <typename Acc>
FASTATTN_INLINE Acc mask_value(const MaskView& m, int64_t i, int64_t j, Acc mul) {
  const int64_t o = i * m.sl + j * m.ss;
  switch (m.dtype) {
    case kBool: return static_cast<const uint8_t*>(m.ptr)[o] ? Acc(0) : -std::numeric_limits<Acc>::infinity();
    case kF32: return static_cast<Acc>(static_cast<const float*>(m.ptr)[o]) * mul;
    case kF64: return static_cast<Acc>(static_cast<const double*>(m.ptr)[o]) * mul;
    case kF16: return static_cast<Acc>(f16_to_f32(static_cast<const uint16_t*>(m.ptr)[o])) * mul;
    case kBF16: return static_cast<Acc>(bf16_to_f32(static_cast<const uint16_t*>(m.ptr)[o])) * mul;
    default: return Acc(0);
  }
}

struct MaskTileInfo {
  bool all_hidden = false;   // every element is -inf: the tile can be skipped
  bool all_zero = true;      // every element is 0: nothing to add
  bool rows_shared = false;  // only row 0 was written (mask row stride 0): use it for every row
};

// out[(i-i0)*osi + (j-j0)*osj] = mask(i, j) * mul (bool: 0 / -inf) for i in [i0,i1), j in [j0,j1).
// With allow_row_broadcast and a mask whose row stride is 0, writes only the first row (rows_shared).
template <typename Acc>
MaskTileInfo load_mask_tile(const MaskView& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1, Acc* out,
                            int64_t osi, int64_t osj, Acc mul, bool allow_row_broadcast) {
  MaskTileInfo info;
  if (m.dtype == kNone) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) out[(i - i0) * osi + (j - j0) * osj] = Acc(0);
    return info;
  }
  const bool shared = allow_row_broadcast && m.sl == 0;
  if (shared) i1 = std::min(i1, i0 + 1);
  info.rows_shared = shared;
  bool hidden = true, zero = true;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  if (m.dtype == kBool) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint8_t* row = static_cast<const uint8_t*>(m.ptr) + i * m.sl;
      Acc* o = out + (i - i0) * osi - j0 * osj;
      for (int64_t j = j0; j < j1; ++j) {
        const bool keep = row[j * m.ss] != 0;
        o[j * osj] = keep ? Acc(0) : ninf;
        hidden &= !keep;
        zero &= keep;
      }
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      Acc* o = out + (i - i0) * osi - j0 * osj;
      for (int64_t j = j0; j < j1; ++j) {
        const Acc x = mask_value<Acc>(m, i, j, mul);
        o[j * osj] = x;
        hidden &= (x == ninf);
        zero &= (x == Acc(0));
      }
    }
  }
  info.all_hidden = hidden && i1 > i0 && j1 > j0;
  info.all_zero = zero;
  return info;
}

// [lo, hi): the keys of [0, kend) that a query-broadcast mask row (sl == 0) leaves visible, trimmed at
// both ends (interior hidden keys stay inside). Masks that vary per query give [0, kend). lo == hi: none.
inline std::pair<int64_t, int64_t> visible_key_range(const MaskView& m, int64_t kend) {
  if (m.dtype == kNone || m.sl != 0 || kend <= 0) return {0, kend};
  auto visible = [&](int64_t j) {
    if (m.dtype == kBool) return static_cast<const uint8_t*>(m.ptr)[j * m.ss] != 0;
    return mask_value<double>(m, 0, j, 1.0) != -std::numeric_limits<double>::infinity();
  };
  if (m.ss == 0) return visible(0) ? std::make_pair(int64_t(0), kend) : std::make_pair(int64_t(0), int64_t(0));
  int64_t lo = 0, hi = kend;
  if (m.dtype == kBool && m.ss == 1) {
    const uint8_t* row = static_cast<const uint8_t*>(m.ptr);
    while (lo < hi && row[lo] == 0) ++lo;
    while (hi > lo && row[hi - 1] == 0) --hi;
    return {lo, hi};
  }
  while (lo < hi && !visible(lo)) ++lo;
  while (hi > lo && !visible(hi - 1)) --hi;
  return {lo, hi};
}

// True iff mask(i, j) hides every element of rows [i0,i1) x cols [j0,j1) (reads until one is visible).
inline bool mask_tile_hidden(const MaskView& m, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  if (m.dtype == kNone) return false;
  if (m.sl == 0) i1 = std::min(i1, i0 + 1);
  if (m.ss == 0) j1 = std::min(j1, j0 + 1);
  for (int64_t i = i0; i < i1; ++i) {
    if (m.dtype == kBool) {
      const uint8_t* row = static_cast<const uint8_t*>(m.ptr) + i * m.sl;
      for (int64_t j = j0; j < j1; ++j)
        if (row[j * m.ss]) return false;
    } else {
      for (int64_t j = j0; j < j1; ++j)
        if (mask_value<double>(m, i, j, 1.0) != -std::numeric_limits<double>::infinity()) return false;
    }
  }
  return i1 > i0 && j1 > j0;
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
