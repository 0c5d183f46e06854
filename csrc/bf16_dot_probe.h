// fastattn: whether the bf16 forward uses vdpbf16ps (AVX512-BF16) or widens bf16 to fp32, decided by timing.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "isa.h"

namespace fastattn {
namespace FASTATTN_NS {

#if defined(FASTATTN_HAVE_AVX512BF16)
// Whether vdpbf16ps (2 bf16 products per fp32 lane) outruns widening to fp32 and vfmadd231ps on this CPU.
// The ratio of the two throughputs differs between CPU models (either can win), so it is decided once per
// process by timing both instruction streams; FASTATTN_BF16_DOT=1 / 0 forces the choice (read per call).
// Seconds for kIters steps of kChains independent accumulators of one instruction (dot or fma).
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
    // K / V tiles and packs Q as fp32: the dots must be clearly faster per product to pay.
    return best_dp < 1.6 * best_fma;
  }();
  return pays;
}
#endif

}  // namespace FASTATTN_NS
}  // namespace fastattn
