// fastattn CPU backward: flash-attention-2 gradients recomputed tile by tile from (q, k, v, out, lse).
//
//   delta_i = sum_e dout_ie * out_ie
//   P_ij    = exp(s_ij - lse_i),  s_ij = scale <q_i, k_j> + mask_ij   (0 where lse_i = -inf or j hidden)
//   dV_j   += sum_i (P o Z)_ij dout_i          (Z: Philox dropout multiplier, 0 or 1/(1-p))
//   dP_ij   = Z_ij <dout_i, v_j>
//   dS_ij   = P_ij (dP_ij - delta_i)           (= d loss / d s_ij, also the additive mask's gradient)
//   dQ_i    = scale sum_j dS_ij k_j ;  dK_j = scale sum_i dS_ij q_i
//
// Deterministic without atomics: every output element has one owner that sums its contributions in
// a fixed order, and the order does not depend on the thread count or on the schedule:
//   * fused  (many heads): one task per (b, kv head) owns dK/dV of that head and dQ of its query heads;
//     loops query head h (of the GQA group) > query block > key block.
//   * split  (few heads, to use every thread): task (b, kv head, key block) owns that dK/dV block
//     (loops h > query block), task (b, h, query block) owns that dQ block (loops key block).
// Both run the same tile code in the same order, so they give bit-identical results.
// The gradient of a broadcast float mask (a size-1 dim summed over) has its own pass whose tasks own
// dmask tiles and loop over the broadcast (b, h, i, j) in a fixed order, recomputing P and dP; an
// unbroadcast mask's gradient (dS itself) is written by whichever task computes that tile.
//
// Tiles are kBr x kBc; inputs are converted once per tile into zero-padded fp32 (float64: double)
// buffers so the GEMM micro-kernels need no tails. bf16 inputs on AVX512-BF16 builds compute S = QK^T
// and dP = dO V^T with vdpbf16ps (exact bf16 products, fp32 sums); the other three GEMMs take fp32
// P / dS. float64 recomputes lse in double (the float32 lse would cap gradcheck's accuracy at ~1e-7).
// Causal: key j is visible to query i iff j <= i + causal_offset (params.h). Masked or causally hidden tiles
// are skipped, as in the forward; hidden keys of a partly visible tile get exactly P = dS = 0.
// Decoder variants (params.h): a window moves / adds the per-row key bounds (KeyBounds; tiles wholly outside
// are skipped); ALiBi adds slope (j - i') to s; a soft-cap s = c tanh(s_raw / c) keeps t = tanh(s_raw / c)
// per tile and multiplies dS by dS/ds_raw = 1 - t^2 for dQ / dK (the mask, added after the cap, gets dS).
// Sinks need nothing: the forward's lse includes them, so P = exp(s - lse) is already the sink softmax.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "convert.h"
#include "mask.h"
#include "out_lo.h"
#include "parallel.h"
#include "params.h"
#include "philox.h"
#include "register.h"
#include "scratch.h"
#include "simd.h"

namespace py = pybind11;

namespace fastattn {
namespace FASTATTN_NS {
namespace {

constexpr int64_t kBr = 64;  // query rows per tile
constexpr int64_t kBc = 64;  // key columns per tile
constexpr int kMR = 4;       // GEMM micro-tile rows (kBr and kBc are multiples)

// Mode of the dQ/dK/dV passes (the `mode` argument of bwd; tests force each one).
enum Mode : int { kAuto = 0, kFused = 1, kSplit = 2 };

FASTATTN_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FASTATTN_INLINE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// ============================================================================ vectors over Acc

// Vec<Acc>: the SIMD vocabulary the tile code needs, over the accumulation type, so that one tile code serves
// float and float64 (gradcheck). Vec<float> is simd:: itself on AVX2 / AVX-512; the portable build uses raw
// GNU vector types instead of simd::vf, and float64 has its own lane loops.
template <typename Acc> struct Vec;

#if defined(FASTATTN_HAVE_AVX2)
template <> struct Vec<float> {
  using V = simd::vf;
  static constexpr int N = simd::W;
#if defined(FASTATTN_HAVE_AVX512)
  static constexpr int NVMAX = 4;  // 4 x 4 accumulators of 32 zmm
#else
  static constexpr int NVMAX = 2;  // 4 x 2 accumulators of 16 ymm
#endif
  static FASTATTN_INLINE V zero() { return simd::zero(); }
  static FASTATTN_INLINE V set1(float x) { return simd::set1(x); }
  static FASTATTN_INLINE V load(const float* p) { return simd::load(p); }
  static FASTATTN_INLINE void store(float* p, V x) { simd::store(p, x); }
  static FASTATTN_INLINE V add(V a, V b) { return simd::add(a, b); }
  static FASTATTN_INLINE V sub(V a, V b) { return simd::sub(a, b); }
  static FASTATTN_INLINE V mul(V a, V b) { return simd::mul(a, b); }
  static FASTATTN_INLINE V fmadd(V a, V b, V c) { return simd::fmadd(a, b, c); }
  // e^x = 2^(x log2 e); -inf -> 0.
  static FASTATTN_INLINE V exp(V x) { return simd::exp2<5>(simd::mul(x, simd::set1(1.4426950408889634f))); }
  static FASTATTN_INLINE V tanh(V x) { return simd::tanh(x); }
};
#else
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call boundary here
#endif
// Portable: GNU vector extensions (SSE2 on x86-64, NEON on AArch64, scalar elsewhere). A lane-loop struct
// (simd::vf) makes the compiler keep the GEMM accumulators in memory; vector types stay in registers.
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int N = 8;
  static_assert(N == simd::W, "row padding assumes the simd:: width");
  static constexpr int NVMAX = 1;
  static FASTATTN_INLINE V zero() { return V{}; }
  static FASTATTN_INLINE V set1(float x) { return V{} + x; }
  static FASTATTN_INLINE V load(const float* p) { V r; std::memcpy(&r, p, sizeof(r)); return r; }
  static FASTATTN_INLINE void store(float* p, V x) { std::memcpy(p, &x, sizeof(x)); }
  static FASTATTN_INLINE V add(V a, V b) { return a + b; }
  static FASTATTN_INLINE V sub(V a, V b) { return a - b; }
  static FASTATTN_INLINE V mul(V a, V b) { return a * b; }
  static FASTATTN_INLINE V fmadd(V a, V b, V c) { return a * b + c; }
  static FASTATTN_INLINE V exp(V x) {
    simd::vf t;
    std::memcpy(&t, &x, sizeof(x));
    t = simd::exp2<5>(simd::mul(t, simd::set1(1.4426950408889634f)));
    std::memcpy(&x, &t, sizeof(x));
    return x;
  }
  static FASTATTN_INLINE V tanh(V x) {
    simd::vf t;
    std::memcpy(&t, &x, sizeof(x));
    t = simd::tanh(t);
    std::memcpy(&x, &t, sizeof(x));
    return x;
  }
};
#endif

// float64 (gradcheck): plain lane loops the compiler vectorises; std::exp per lane.
template <> struct Vec<double> {
  static constexpr int N = 8;
  static constexpr int NVMAX = 1;
  struct V { double v[8]; };
#define FA_LANES for (int l = 0; l < N; ++l)
  static FASTATTN_INLINE V zero() { V r; FA_LANES r.v[l] = 0.0; return r; }
  static FASTATTN_INLINE V set1(double x) { V r; FA_LANES r.v[l] = x; return r; }
  static FASTATTN_INLINE V load(const double* p) { V r; FA_LANES r.v[l] = p[l]; return r; }
  static FASTATTN_INLINE void store(double* p, V x) { FA_LANES p[l] = x.v[l]; }
  static FASTATTN_INLINE V add(V a, V b) { FA_LANES a.v[l] += b.v[l]; return a; }
  static FASTATTN_INLINE V sub(V a, V b) { FA_LANES a.v[l] -= b.v[l]; return a; }
  static FASTATTN_INLINE V mul(V a, V b) { FA_LANES a.v[l] *= b.v[l]; return a; }
  static FASTATTN_INLINE V fmadd(V a, V b, V c) { FA_LANES c.v[l] = std::fma(a.v[l], b.v[l], c.v[l]); return c; }
  static FASTATTN_INLINE V exp(V x) { FA_LANES x.v[l] = std::exp(x.v[l]); return x; }
  static FASTATTN_INLINE V tanh(V x) { FA_LANES x.v[l] = std::tanh(x.v[l]); return x; }
#undef FA_LANES
};

// Stores x into element `off` of a tensor of dtype `dt` (the mask gradient's dtype may differ from q's).
template <typename Acc> FASTATTN_INLINE void store_any(int dt, void* base, int64_t off, Acc x) {
  switch (dt) {
    case kF32: static_cast<float*>(base)[off] = static_cast<float>(x); break;
    case kF64: static_cast<double*>(base)[off] = static_cast<double>(x); break;
    case kF16: static_cast<uint16_t*>(base)[off] = f32_to_f16(static_cast<float>(x)); break;
    case kBF16: static_cast<uint16_t*>(base)[off] = f32_to_bf16(static_cast<float>(x)); break;
    default: break;
  }
}

// ============================================================================ GEMM micro-kernels

// C[m, n] (= or +=) sum_{k<K} A[m*sam + k*sak] * B[k*ldb + n] for m < MR, n < NV*N: the MR x NV
// accumulators stay in registers over the whole K loop, then are stored (or added) once.
template <typename Acc, int MR, int NV>
FASTATTN_INLINE void gemm_block(int64_t K, const Acc* FASTATTN_RESTRICT A, int64_t sam, int64_t sak,
                                const Acc* FASTATTN_RESTRICT Bm, int64_t ldb, Acc* FASTATTN_RESTRICT C,
                                int64_t ldc, bool accumulate) {
  using VT = Vec<Acc>;
  using V = typename VT::V;
  constexpr int N = VT::N;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = VT::zero();
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = VT::load(Bm + k * ldb + v * N);
    const Acc* a = A + k * sak;
    for (int m = 0; m < MR; ++m) {
      const V am = VT::set1(a[m * sam]);
      for (int v = 0; v < NV; ++v) acc[m][v] = VT::fmadd(am, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      Acc* c = C + m * ldc + v * N;
      VT::store(c, accumulate ? VT::add(VT::load(c), acc[m][v]) : acc[m][v]);
    }
}

// The same for M rows (a multiple of kMR) and nv vectors of columns.
template <typename Acc>
void gemm(int64_t M, int64_t nv, int64_t K, const Acc* A, int64_t sam, int64_t sak, const Acc* Bm, int64_t ldb,
          Acc* C, int64_t ldc, bool accumulate) {
  constexpr int N = Vec<Acc>::N;
  constexpr int NVM = Vec<Acc>::NVMAX;
  for (int64_t m0 = 0; m0 < M; m0 += kMR) {
    const Acc* a = A + m0 * sam;
    Acc* c = C + m0 * ldc;
    int64_t v0 = 0;
    for (; v0 + NVM <= nv; v0 += NVM) gemm_block<Acc, kMR, NVM>(K, a, sam, sak, Bm + v0 * N, ldb, c + v0 * N, ldc, accumulate);
    switch (nv - v0) {
      case 3: gemm_block<Acc, kMR, 3>(K, a, sam, sak, Bm + v0 * N, ldb, c + v0 * N, ldc, accumulate); break;
      case 2: gemm_block<Acc, kMR, 2>(K, a, sam, sak, Bm + v0 * N, ldb, c + v0 * N, ldc, accumulate); break;
      case 1: gemm_block<Acc, kMR, 1>(K, a, sam, sak, Bm + v0 * N, ldb, c + v0 * N, ldc, accumulate); break;
      default: break;
    }
  }
}

#if defined(FASTATTN_HAVE_AVX512BF16)
constexpr bool kHaveBf16Dot = true;
// bf16 inputs, fp32 accumulation (vdpbf16ps: two exact bf16 products per fp32 lane and step):
// C[m, n] = sum_{p<K2} A[m*lda + 2p] * B2[(p*ldb + n)*2] + A[m*lda + 2p+1] * B2[(p*ldb + n)*2 + 1]
// A: bf16 rows (pairs along k); B2: k pairs interleaved per column, 16 columns per zmm.
template <int MR, int NV>
FASTATTN_INLINE void gemm_bf16_block(int64_t K2, const uint16_t* FASTATTN_RESTRICT A, int64_t lda,
                                     const uint16_t* FASTATTN_RESTRICT B2, int64_t ldb, float* FASTATTN_RESTRICT C,
                                     int64_t ldc) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B2 + (k * ldb + v * 16) * 2);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * k, 4);
      const __m512i a = _mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + m * ldc + v * 16, acc[m][v]);
}

// The same for M rows (a multiple of kMR) and nv vectors of 16 columns.
inline void gemm_bf16(int64_t M, int64_t nv, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B2,
                      int64_t ldb, float* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += kMR) {
    const uint16_t* a = A + m0 * lda;
    float* c = C + m0 * ldc;
    int64_t v0 = 0;
    for (; v0 + 4 <= nv; v0 += 4) gemm_bf16_block<kMR, 4>(K2, a, lda, B2 + v0 * 32, ldb, c + v0 * 16, ldc);
    switch (nv - v0) {
      case 3: gemm_bf16_block<kMR, 3>(K2, a, lda, B2 + v0 * 32, ldb, c + v0 * 16, ldc); break;
      case 2: gemm_bf16_block<kMR, 2>(K2, a, lda, B2 + v0 * 32, ldb, c + v0 * 16, ldc); break;
      case 1: gemm_bf16_block<kMR, 1>(K2, a, lda, B2 + v0 * 32, ldb, c + v0 * 16, ldc); break;
      default: break;
    }
  }
}
#else
constexpr bool kHaveBf16Dot = false;
inline void gemm_bf16(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t) {}
#endif

// ============================================================================ loads and stores

// dst[r*ld + d] = t(b, h, i0 + r, d) for r < nr, d < D; zeros in d in [D, ld) and rows [nr, nr_pad).
template <typename T, typename Acc>
void load_rows(const Tensor4& t, int64_t b, int64_t h, int64_t i0, int64_t nr, int64_t D, Acc* dst, int64_t ld,
               int64_t nr_pad) {
  for (int64_t r = 0; r < nr; ++r) {
    const T* src = t.at<const T>(b, h, i0 + r);
    Acc* o = dst + r * ld;
    if constexpr (std::is_same<Acc, float>::value) {
      if (t.se == 1) {
        int64_t d = 0;
        for (; d + simd::W <= D; d += simd::W) simd::store(o + d, simd::load_cvt(src + d));
        if (d < ld) simd::store(o + d, simd::load_cvt_n(src + d, D - d));  // zero-fills lanes >= D
        for (d += simd::W; d < ld; ++d) o[d] = 0.f;
        continue;
      }
    }
    for (int64_t d = 0; d < D; ++d) o[d] = to_acc<Acc>(src[d * t.se]);
    for (int64_t d = D; d < ld; ++d) o[d] = Acc(0);
  }
  for (int64_t r = nr; r < nr_pad; ++r) std::memset(static_cast<void*>(dst + r * ld), 0, ld * sizeof(Acc));
}

// Transposed: dst[d*ld + c] = t(b, h, j0 + c, d) for c < nc, d < D; zeros for c in [nc, ld) and d in [D, Dp).
template <typename T, typename Acc>
void load_cols(const Tensor4& t, int64_t b, int64_t h, int64_t j0, int64_t nc, int64_t D, int64_t Dp, Acc* dst,
               int64_t ld) {
  for (int64_t d = 0; d < Dp; ++d) std::memset(static_cast<void*>(dst + d * ld + nc), 0, (ld - nc) * sizeof(Acc));
  for (int64_t d = D; d < Dp; ++d) std::memset(static_cast<void*>(dst + d * ld), 0, nc * sizeof(Acc));
  for (int64_t c = 0; c < nc; ++c) {
    const T* src = t.at<const T>(b, h, j0 + c);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + c] = to_acc<Acc>(src[d * t.se]);
  }
}

// bf16 bits: dst[r*ld + d] = t(b, h, i0 + r, d) for r < nr, d < D; zeros up to ld and for rows [nr, nr_pad).
inline void load_rows_bf16(const Tensor4& t, int64_t b, int64_t h, int64_t i0, int64_t nr, int64_t D, uint16_t* dst,
                           int64_t ld, int64_t nr_pad) {
  for (int64_t r = 0; r < nr; ++r) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(t.at<const bf16_t>(b, h, i0 + r));
    uint16_t* o = dst + r * ld;
    if (t.se == 1) {
      std::memcpy(o, src, D * 2);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = src[d * t.se];
    }
    for (int64_t d = D; d < ld; ++d) o[d] = 0;
  }
  for (int64_t r = nr; r < nr_pad; ++r) std::memset(dst + r * ld, 0, ld * 2);
}

// bf16 bits, k pairs interleaved per column: dst[((d/2)*ld + c)*2 + d%2] = t(b, h, j0 + c, d) for c < nc,
// d < D; zeros for c in [nc, ld) and d in [D, Dp2) (Dp2 even).
inline void load_cols_bf16(const Tensor4& t, int64_t b, int64_t h, int64_t j0, int64_t nc, int64_t D, int64_t Dp2,
                           uint16_t* dst, int64_t ld) {
  for (int64_t p = 0; p < Dp2 / 2; ++p) std::memset(dst + (p * ld + nc) * 2, 0, (ld - nc) * 4);
  for (int64_t c = 0; c < nc; ++c) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(t.at<const bf16_t>(b, h, j0 + c));
    for (int64_t d = 0; d < D; ++d) dst[((d >> 1) * ld + c) * 2 + (d & 1)] = src[d * t.se];
    for (int64_t d = D; d < Dp2; ++d) dst[((d >> 1) * ld + c) * 2 + (d & 1)] = 0;
  }
}

// t(b, h, i0 + r, d) = mul * src[r*ld + d] for r < nr, d < D, in t's element type.
template <typename T, typename Acc>
void store_rows(const Tensor4& t, int64_t b, int64_t h, int64_t i0, int64_t nr, int64_t D, const Acc* src,
                int64_t ld, Acc mul) {
  for (int64_t r = 0; r < nr; ++r) {
    T* dst = t.at<T>(b, h, i0 + r);
    const Acc* s = src + r * ld;
    if constexpr (std::is_same<Acc, float>::value) {
      if (t.se == 1) {
        const simd::vf vm = simd::set1(mul);
        int64_t d = 0;
        for (; d + simd::W <= D; d += simd::W) simd::store_cvt(dst + d, simd::mul(simd::load(s + d), vm));
        if (d < D) simd::store_cvt_n(dst + d, simd::mul(simd::load(s + d), vm), D - d);
        continue;
      }
    }
    for (int64_t d = 0; d < D; ++d) dst[d * t.se] = from_acc<T>(s[d] * mul);
  }
}

// ============================================================================ per-call context

template <typename Acc>
struct Ctx {
  const Params* p = nullptr;
  int64_t Ep = 0, Evp = 0;        // head dims padded to whole vectors
  int64_t nqb = 0, nkb = 0;       // query / key blocks
  int64_t G = 1;                  // query heads per kv head
  Acc scale = 1;
  bool dropout = false;
  Acc drop_mul = 1;               // 1 / (1 - p)
  const Acc* delta = nullptr;     // (B, H, L) rowsum(dout o out)
  const Acc* lse_acc = nullptr;   // (B, H, L) lse recomputed in Acc (float64 only), else null
  int64_t Lrow = 0;               // L of the delta / lse_acc rows: the call's L (varlen: max_seqlen_q)
  bool dmask_direct = false;      // mask gradient written straight from the dQ pass (unbroadcast mask)
  bool bf16dot = false;           // S and dP from bf16 copies with AVX512-BF16 dot products
  int64_t Ep2 = 0, Evp2 = 0;      // head dims rounded up to even (bf16 pairs)
  KeyBounds kb;                   // the keys causality and the window leave each row (params.h)
  bool variants = false;          // soft-cap / ALiBi / left window: tile_grads' variant row code
  Acc softcap = 0;                // > 0: s = softcap tanh(scale <q, k> / softcap)
  bool want_dmask = false;        // a mask gradient is computed (with a soft-cap: kept apart in TileBuf::dSm)
};

// The context of batch item b alone: its Params (item_params: varlen rows and lengths) and block counts.
template <typename Acc>
Ctx<Acc> item_ctx(const Ctx<Acc>& cx, const Params& pb) {
  Ctx<Acc> c = cx;
  c.p = &pb;
  c.nqb = ceil_div(pb.L, kBr);
  c.nkb = ceil_div(pb.S, kBc);
  c.kb = key_bounds(pb);
  return c;
}

// One tile's scratch (kBr x kBc matrices).
template <typename Acc>
struct TileBuf {
  Acc* S;            // scores, then P
  Acc* dP;           // dP, then dS
  Acc* PZ;           // P o Z (dropout only)
  Acc* mask;         // additive mask tile
  uint32_t* words;   // Philox words of one row
  Acc* th;           // soft-cap: tanh(scale <q, k> / softcap) of the tile
  Acc* dSm;          // soft-cap with a mask gradient: dS before the cap's derivative (the mask's gradient)
  Acc* iota;         // 0, 1, ..., kBc - 1 (ALiBi's key offsets)
};

// A query block of one head: Q (kBr x Ep), dO (kBr x Evp), per-row lse (+inf where P must be 0) and delta.
template <typename Acc>
struct QBlock {
  Acc* Q;
  Acc* dO;
  uint16_t* Qh = nullptr;   // bf16dot: bf16 rows (kBr x Ep2), (kBr x Evp2)
  uint16_t* dOh = nullptr;
  Acc* lse;
  Acc* delta;
  int64_t i0 = 0, nr = 0;
};

// A key block of one kv head: K^T (Ep x kBc), V^T (Evp x kBc), optional K (kBc x Ep).
template <typename Acc>
struct KBlock {
  Acc* KT;
  Acc* VT;
  Acc* K;
  uint16_t* KT2 = nullptr;  // bf16dot: pair-interleaved K^T / V^T (see load_cols_bf16)
  uint16_t* VT2 = nullptr;
  int64_t j0 = 0, nc = 0;
};

template <typename T, typename Acc>
void load_qblock(const Ctx<Acc>& cx, int64_t b, int64_t h, int64_t ib, QBlock<Acc>& qb) {
  const Params& p = *cx.p;
  qb.i0 = ib * kBr;
  qb.nr = std::min(kBr, p.L - qb.i0);
  load_rows<T, Acc>(p.q, b, h, qb.i0, qb.nr, p.E, qb.Q, cx.Ep, round_up(qb.nr, kMR));
  load_rows<T, Acc>(p.dout, b, h, qb.i0, qb.nr, p.Ev, qb.dO, cx.Evp, round_up(qb.nr, kMR));
  if (std::is_same<T, bf16_t>::value && cx.bf16dot) {
    load_rows_bf16(p.q, b, h, qb.i0, qb.nr, p.E, qb.Qh, cx.Ep2, round_up(qb.nr, kMR));
    load_rows_bf16(p.dout, b, h, qb.i0, qb.nr, p.Ev, qb.dOh, cx.Evp2, round_up(qb.nr, kMR));
  }
  const int64_t row = (b * p.H + h) * cx.Lrow + qb.i0;
  for (int64_t r = 0; r < kBr; ++r) {
    Acc l = std::numeric_limits<Acc>::infinity(), dl = 0;
    if (r < qb.nr) {
      l = cx.lse_acc ? cx.lse_acc[row + r] : static_cast<Acc>(*p.lse.at<const float>(b, h, qb.i0 + r));
      // A row with no visible key (lse = -inf) has P = 0: exp(s - (+inf)) = 0 for every s < +inf.
      if (l == -std::numeric_limits<Acc>::infinity()) l = std::numeric_limits<Acc>::infinity();
      dl = cx.delta[row + r];
    }
    qb.lse[r] = l;
    qb.delta[r] = dl;
  }
}

template <typename T, typename Acc>
void load_kblock(const Ctx<Acc>& cx, int64_t b, int64_t hk, int64_t jb, KBlock<Acc>& kb, bool with_k) {
  const Params& p = *cx.p;
  kb.j0 = jb * kBc;
  kb.nc = std::min(kBc, p.S - kb.j0);
  if (std::is_same<T, bf16_t>::value && cx.bf16dot) {
    load_cols_bf16(p.k, b, hk, kb.j0, kb.nc, p.E, cx.Ep2, kb.KT2, kBc);
    load_cols_bf16(p.v, b, hk, kb.j0, kb.nc, p.Ev, cx.Evp2, kb.VT2, kBc);
  } else {
    load_cols<T, Acc>(p.k, b, hk, kb.j0, kb.nc, p.E, cx.Ep, kb.KT, kBc);
    load_cols<T, Acc>(p.v, b, hk, kb.j0, kb.nc, p.Ev, cx.Evp, kb.VT, kBc);
  }
  if (with_k) load_rows<T, Acc>(p.k, b, hk, kb.j0, kb.nc, p.E, kb.K, cx.Ep, kBc);
}

// Whether causality / a right window bound hides the whole tile (query rows [i0, i0 + nr), key block starting at
// j0): its first key lies past the last row's last visible key (then so do all later blocks).
FASTATTN_INLINE bool causal_hidden(const KeyBounds& kb, int64_t i0, int64_t nr, int64_t j0) {
  return kb.upper && j0 > i0 + nr - 1 + kb.hi;
}
// Whether a left window bound hides the whole tile: its last key lies before the first row's first visible key
// (then so do all earlier blocks).
FASTATTN_INLINE bool window_hidden(const KeyBounds& kb, int64_t i0, int64_t j0, int64_t nc) {
  return kb.lower && j0 + nc - 1 < i0 + kb.lo;
}

// The tile's P (in t.S), dS (in t.dP) and P o Z (t.PZ, dropout only) for query head h.
// Returns false (nothing written) when the mask/causal structure hides the whole tile.
// On return *kc = the number of leading key columns that can be nonzero, *r0 = the first row that can be.
template <typename Acc>
bool tile_grads(const Ctx<Acc>& cx, int64_t b, int64_t h, const QBlock<Acc>& qb, const KBlock<Acc>& kb,
                const TileBuf<Acc>& t, int64_t* kc_out, int64_t* r0_out) {
  using VT = Vec<Acc>;
  using V = typename VT::V;
  constexpr int N = VT::N;
  const Params& p = *cx.p;
  const int64_t i0 = qb.i0, nr = qb.nr, j0 = kb.j0, nc = kb.nc;
  const KeyBounds& kbd = cx.kb;
  if (causal_hidden(kbd, i0, nr, j0) || window_hidden(kbd, i0, j0, nc)) return false;
  const Acc* mrow0 = nullptr;
  int64_t mstride = 0;
  if (p.mask_dtype != kNone) {
    const MaskView mv = mask_view(p, b, h);
    const MaskTileInfo mi = load_mask_tile<Acc>(mv, i0, i0 + nr, j0, j0 + nc, t.mask, kBc, 1, Acc(1), true);
    if (mi.all_hidden) return false;
    if (!mi.all_zero) {
      mrow0 = t.mask;
      mstride = mi.rows_shared ? 0 : kBc;
    }
  }
  // Causal / right window: row r sees columns c < i0 + r + hi - j0 + 1; rows before r0 see none (r0 < nr and
  // kc > 0: the tile is not hidden). Left window: row r sees columns c >= i0 + r + lo - j0.
  const int64_t hi = kbd.hi;
  const int64_t r0 = kbd.upper ? std::max<int64_t>(0, j0 - i0 - hi) : 0;
  const int64_t kc = kbd.upper ? std::min(nc, i0 + nr + hi - j0) : nc;
  const int64_t ncv = round_up(kc, N);  // computed columns
  const int64_t rb = r0 / kMR * kMR, re = round_up(nr, kMR);
  if constexpr (std::is_same<Acc, float>::value) {
    if (cx.bf16dot) {
      gemm_bf16(re - rb, ncv / N, cx.Ep2 / 2, qb.Qh + rb * cx.Ep2, cx.Ep2, kb.KT2, kBc, t.S + rb * kBc, kBc);
      gemm_bf16(re - rb, ncv / N, cx.Evp2 / 2, qb.dOh + rb * cx.Evp2, cx.Evp2, kb.VT2, kBc, t.dP + rb * kBc, kBc);
    }
  }
  if (!cx.bf16dot) {
    gemm<Acc>(re - rb, ncv / N, cx.Ep, qb.Q + rb * cx.Ep, cx.Ep, 1, kb.KT, kBc, t.S + rb * kBc, kBc, false);
    gemm<Acc>(re - rb, ncv / N, cx.Evp, qb.dO + rb * cx.Evp, cx.Evp, 1, kb.VT, kBc, t.dP + rb * kBc, kBc, false);
  }
  const V vscale = VT::set1(cx.scale);
  Acc zrow[kBc];
  for (int64_t r = 0; r < re; ++r) {
    Acc* s = t.S + r * kBc;
    Acc* dp = t.dP + r * kBc;
    const int64_t lim = r < nr ? (kbd.upper ? std::min(kc, i0 + r + hi - j0 + 1) : kc) : 0;
    // Columns [0, first) lie before the row's left window bound.
    const int64_t first = kbd.lower ? std::min(std::max<int64_t>(0, i0 + r + kbd.lo - j0), nc) : 0;
    if (lim <= first) {
      std::memset(static_cast<void*>(s), 0, ncv * sizeof(Acc));
      std::memset(static_cast<void*>(dp), 0, ncv * sizeof(Acc));
      if (cx.dropout) std::memset(static_cast<void*>(t.PZ + r * kBc), 0, ncv * sizeof(Acc));
      if (cx.softcap > 0 && cx.want_dmask) std::memset(static_cast<void*>(t.dSm + r * kBc), 0, ncv * sizeof(Acc));
      continue;
    }
    // P = exp(scale * qk + mask - lse)
    const V vlse = VT::set1(qb.lse[r]);
    const Acc* m = mrow0 ? mrow0 + r * mstride : nullptr;
    const int64_t limv = round_up(lim, N);
    if (!cx.variants) {
      for (int64_t c = 0; c < limv; c += N) {
        V x = VT::mul(VT::load(s + c), vscale);
        if (m) x = VT::add(x, VT::load(m + c));
        VT::store(s + c, VT::exp(VT::sub(x, vlse)));
      }
    } else {
      // s = softcap tanh(scale qk / softcap) (tanh kept for dS) + slope (j - i') + mask
      const bool cap = cx.softcap > 0;
      const V vcap = VT::set1(cx.softcap), vinv = VT::set1(cap ? Acc(1) / cx.softcap : Acc(0));
      const Acc slope = static_cast<Acc>(p.alibi_slope(b, h));
      const V vslope = VT::set1(slope);
      const V vrel = VT::set1(static_cast<Acc>(j0 - (i0 + r)) - static_cast<Acc>(p.causal_offset));  // j0 - i'
      Acc* th = t.th + r * kBc;
      for (int64_t c = 0; c < limv; c += N) {
        V x = VT::mul(VT::load(s + c), vscale);
        if (cap) {
          const V tt = VT::tanh(VT::mul(x, vinv));
          VT::store(th + c, tt);
          x = VT::mul(vcap, tt);
        }
        if (p.alibi != 0) x = VT::fmadd(vslope, VT::add(vrel, VT::load(t.iota + c)), x);
        if (m) x = VT::add(x, VT::load(m + c));
        VT::store(s + c, VT::exp(VT::sub(x, vlse)));
      }
      for (int64_t c = 0; c < first; ++c) s[c] = Acc(0);
    }
    if (m) {  // P = 0 where the mask is -inf, even for a NaN score (NaN + -inf is NaN)
      for (int64_t c = 0; c < lim; ++c)
        if (m[c] == -std::numeric_limits<Acc>::infinity()) s[c] = Acc(0);
    }
    for (int64_t c = lim; c < ncv; ++c) s[c] = Acc(0);
    if (cx.dropout) {
      // Z = keep ? 1/(1-p) : 0;  PZ = P o Z;  dP <- dP o Z
      dropout_words_row(p.seed, b, h, i0 + r, j0, lim, t.words);
      Acc* pz = t.PZ + r * kBc;
      for (int64_t c = 0; c < lim; ++c) zrow[c] = t.words[c] >= p.thr ? cx.drop_mul : Acc(0);
      for (int64_t c = lim; c < ncv; ++c) zrow[c] = Acc(0);
      for (int64_t c = 0; c < ncv; c += N) {
        const V z = VT::load(zrow + c);
        VT::store(pz + c, VT::mul(VT::load(s + c), z));
        VT::store(dp + c, VT::mul(VT::load(dp + c), z));
      }
    }
    // dS = P o (dP - delta) on the row's visible columns, exactly 0 past them (P = 0 there, but the dP of a
    // hidden key may be inf / NaN).
    const V vdelta = VT::set1(qb.delta[r]);
    for (int64_t c = 0; c < limv; c += N)
      VT::store(dp + c, VT::mul(VT::load(s + c), VT::sub(VT::load(dp + c), vdelta)));
    for (int64_t c = 0; c < first; ++c) dp[c] = Acc(0);
    for (int64_t c = lim; c < ncv; ++c) dp[c] = Acc(0);
    if (cx.variants && cx.softcap > 0) {
      // The mask is added after the cap: its gradient is dS; q and k see dS (1 - tanh^2).
      if (cx.want_dmask) std::memcpy(static_cast<void*>(t.dSm + r * kBc), dp, ncv * sizeof(Acc));
      const Acc* th = t.th + r * kBc;
      const V one = VT::set1(Acc(1));
      for (int64_t c = 0; c < limv; c += N) {
        const V tt = VT::load(th + c);
        VT::store(dp + c, VT::mul(VT::load(dp + c), VT::sub(one, VT::mul(tt, tt))));
      }
      for (int64_t c = 0; c < first; ++c) dp[c] = Acc(0);
      for (int64_t c = lim; c < ncv; ++c) dp[c] = Acc(0);
    }
  }
  *kc_out = kc;
  *r0_out = r0;
  return true;
}

// dV_j += (P o Z)^T dO ; dK_j += dS^T Q   (dK scaled at the store). dKj/dVj: kBc rows of the key block.
template <typename Acc>
FASTATTN_INLINE void accumulate_dkdv(const Ctx<Acc>& cx, const QBlock<Acc>& qb, const TileBuf<Acc>& t, int64_t kc,
                                     int64_t r0, Acc* dKj, Acc* dVj) {
  constexpr int N = Vec<Acc>::N;
  const int64_t M = round_up(kc, kMR), K = qb.nr - r0;
  const Acc* pz = cx.dropout ? t.PZ : t.S;
  gemm<Acc>(M, cx.Evp / N, K, pz + r0 * kBc, 1, kBc, qb.dO + r0 * cx.Evp, cx.Evp, dVj, cx.Evp, true);
  gemm<Acc>(M, cx.Ep / N, K, t.dP + r0 * kBc, 1, kBc, qb.Q + r0 * cx.Ep, cx.Ep, dKj, cx.Ep, true);
}

// dQ_i += dS K_j   (scaled at the store).
template <typename Acc>
FASTATTN_INLINE void accumulate_dq(const Ctx<Acc>& cx, const QBlock<Acc>& qb, const TileBuf<Acc>& t, int64_t kc,
                                   const Acc* Kj, Acc* dQ) {
  constexpr int N = Vec<Acc>::N;
  gemm<Acc>(round_up(qb.nr, kMR), cx.Ep / N, kc, t.dP, kBc, 1, Kj, cx.Ep, dQ, cx.Ep, true);
}

// dmask(b, h, i, j) = dS_ij for an unbroadcast mask (each element has exactly one writer).
template <typename Acc>
void write_dmask_tile(const Ctx<Acc>& cx, int64_t b, int64_t h, const QBlock<Acc>& qb, const KBlock<Acc>& kb,
                      const TileBuf<Acc>& t, int64_t kc) {
  const Params& p = *cx.p;
  const Tensor4& dm = p.dmask;
  char* base = reinterpret_cast<char*>(dm.ptr);
  const int64_t es = dtype_bytes(p.dmask_dtype);
  for (int64_t r = 0; r < qb.nr; ++r) {
    const int64_t row = b * dm.sb + h * dm.sh + (qb.i0 + r) * dm.sl + kb.j0 * dm.se;
    const Acc* ds = (cx.softcap > 0 ? t.dSm : t.dP) + r * kBc;
    // Columns >= kc stay 0 (causally hidden).
    if (dm.se == 1 && dtype_bytes(p.dmask_dtype) == static_cast<int64_t>(sizeof(Acc)) &&
        p.dmask_dtype == (sizeof(Acc) == 4 ? kF32 : kF64)) {
      std::memcpy(base + row * es, ds, kc * sizeof(Acc));
      continue;
    }
    for (int64_t c = 0; c < kc; ++c) store_any<Acc>(p.dmask_dtype, base + (row + c * dm.se) * es, 0, ds[c]);
  }
}

// ============================================================================ scratch

// Per-thread scratch: one 64-byte aligned allocation carved with Arena.
struct ThreadScratch {
  std::vector<Scratch> s;
  explicit ThreadScratch(int nt) : s(static_cast<size_t>(std::max(nt, 1))) {}
};

// One thread's buffers for a backward pass (carved from its Scratch by carve_pass_buffers).
template <typename Acc>
struct PassBuffers {
  TileBuf<Acc> t;
  QBlock<Acc> qb;
  Acc* dQ = nullptr;                 // kBr x Ep
  KBlock<Acc> kb;                    // one key block (split / dmask passes) or unused
  Acc* Kall = nullptr;               // fused: K (S_pad x Ep), KT blocks, VT blocks
  Acc* KTall = nullptr;
  Acc* VTall = nullptr;
  uint16_t* KT2all = nullptr;        // fused + bf16dot
  uint16_t* VT2all = nullptr;
  Acc* dK = nullptr;                 // fused: S_pad x Ep; split: kBc x Ep
  Acc* dV = nullptr;
  Acc* red = nullptr;                // dmask pass: kBr x kBc reduction tile
};

// Lays out PassBuffers in one allocation (a null base only sizes them); kv_rows = rows of K/dK/dV buffers
// (S_pad for fused, kBc otherwise).
template <typename Acc>
PassBuffers<Acc> carve_pass_buffers(const Ctx<Acc>& cx, Arena& a, int64_t kv_rows, bool fused) {
  PassBuffers<Acc> u;
  const size_t tile = kBr * kBc;
  u.t.S = a.take<Acc>(tile);
  u.t.dP = a.take<Acc>(tile);
  u.t.PZ = a.take<Acc>(tile);
  u.t.mask = a.take<Acc>(tile);
  u.t.words = a.take<uint32_t>(kBc);
  u.t.th = a.take<Acc>(tile);
  u.t.dSm = a.take<Acc>(tile);
  u.t.iota = a.take<Acc>(kBc);
  u.qb.Q = a.take<Acc>(kBr * cx.Ep);
  u.qb.dO = a.take<Acc>(kBr * cx.Evp);
  u.qb.lse = a.take<Acc>(kBr);
  u.qb.delta = a.take<Acc>(kBr);
  u.dQ = a.take<Acc>(kBr * cx.Ep);
  u.kb.KT = a.take<Acc>(cx.Ep * kBc);
  u.kb.VT = a.take<Acc>(cx.Evp * kBc);
  u.kb.K = a.take<Acc>(kBc * cx.Ep);
  if (cx.bf16dot) {
    u.qb.Qh = a.take<uint16_t>(kBr * cx.Ep2);
    u.qb.dOh = a.take<uint16_t>(kBr * cx.Evp2);
    u.kb.KT2 = a.take<uint16_t>(cx.Ep2 * kBc);
    u.kb.VT2 = a.take<uint16_t>(cx.Evp2 * kBc);
  }
  if (fused) {
    u.Kall = a.take<Acc>(kv_rows * cx.Ep);
    if (!cx.bf16dot) {
      u.KTall = a.take<Acc>(kv_rows * cx.Ep);
      u.VTall = a.take<Acc>(kv_rows * cx.Evp);
    } else {
      u.KT2all = a.take<uint16_t>(kv_rows * cx.Ep2);
      u.VT2all = a.take<uint16_t>(kv_rows * cx.Evp2);
    }
  }
  u.dK = a.take<Acc>(kv_rows * cx.Ep);
  u.dV = a.take<Acc>(kv_rows * cx.Evp);
  u.red = a.take<Acc>(tile);
  return u;
}

template <typename Acc>
PassBuffers<Acc> thread_pass_buffers(const Ctx<Acc>& cx, Scratch& s, int64_t kv_rows, bool fused) {
  Arena plan;
  carve_pass_buffers(cx, plan, kv_rows, fused);
  const size_t bytes = plan.off + 64;
  Arena a;
  a.base = static_cast<char*>(s.get(bytes));
  // No zeroing needed: every element the tile code reads is written first (padding included).
  PassBuffers<Acc> u = carve_pass_buffers(cx, a, kv_rows, fused);
  for (int64_t c = 0; c < kBc; ++c) u.t.iota[c] = static_cast<Acc>(c);
  return u;
}

// ============================================================================ passes

// delta[b, h, i] = sum_e dout * out, in Acc. With p.out_lo (fp16 / bf16), out is read back as the forward's
// fp32 result, out + out_lo * 2^(e-K) (out_lo.h): delta += 2^-K sum_e dout * 2^e * out_lo. A non-finite
// correction (out inf / NaN: an fp16 overflow) is dropped, leaving what the rounded out gives.
template <typename T, typename Acc>
void compute_delta(const Params& p, Acc* delta) {
  const bool with_out_lo = p.out_lo.ptr != 0;
  float out_lo_unit = 1.f;  // 2^-K
  if constexpr (std::is_same<T, bf16_t>::value || std::is_same<T, f16_t>::value)
    out_lo_unit = 1.f / OutLoCode<T>::kScale;
  parallel_for(p.B * p.H, p.num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const Params pb = item_params(p, b);
      for (int64_t i = 0; i < pb.L; ++i) {
        const T* d = pb.dout.at<const T>(b, h, i);
        const T* o = pb.out.at<const T>(b, h, i);
        Acc s = 0;
        bool done = false;
        const int16_t* m = with_out_lo ? pb.out_lo.at<const int16_t>(b, h, i) : nullptr;
        float c = 0.f;  // sum_e dout * 2^e(out) * out_lo
        if constexpr (std::is_same<Acc, float>::value) {
          if (p.dout.se == 1 && p.out.se == 1 && (!with_out_lo || p.out_lo.se == 1)) {
            simd::vf acc = simd::zero(), accl = simd::zero();
            int64_t e = 0;
            for (; e + simd::W <= p.Ev; e += simd::W) {
              const simd::vf dv = simd::load_cvt(d + e), ov = simd::load_cvt(o + e);
              acc = simd::fmadd(dv, ov, acc);
              if (with_out_lo) accl = simd::fmadd(dv, simd::mul(simd::pow2_of(ov), simd::load_cvt(m + e)), accl);
            }
            if (e < p.Ev) {
              const int64_t n = p.Ev - e;
              const simd::vf dv = simd::load_cvt_n(d + e, n), ov = simd::load_cvt_n(o + e, n);
              acc = simd::fmadd(dv, ov, acc);
              if (with_out_lo) accl = simd::fmadd(dv, simd::mul(simd::pow2_of(ov), simd::load_cvt_n(m + e, n)), accl);
            }
            s = simd::reduce_add(acc);
            if (with_out_lo) c = simd::reduce_add(accl);
            done = true;
          }
        }
        if (!done) {
          for (int64_t e = 0; e < p.Ev; ++e) s += to_acc<Acc>(d[e * p.dout.se]) * to_acc<Acc>(o[e * p.out.se]);
          if (with_out_lo)
            for (int64_t e = 0; e < p.Ev; ++e)
              c += to_f32(d[e * p.dout.se]) *
                   (pow2_of(to_f32(o[e * p.out.se])) * static_cast<float>(m[e * p.out_lo.se]));
        }
        if (with_out_lo) {
          c *= out_lo_unit;
          if (std::isfinite(c)) s += c;
        }
        delta[bh * p.L + i] = s;
      }
    }
  }, 1);
}

// float64: lse recomputed in double (the float32 lse of the forward would cap the gradients' accuracy
// at ~1e-7 relative). lse[b, h, i] = log sum_j exp(s_ij) over visible j, -inf if none.
template <typename T, typename Acc>
void recompute_lse(const Ctx<Acc>& call, ThreadScratch& ts, Acc* lse) {
  parallel_for(call.p->B * call.p->H * call.nqb, call.p->num_threads, [&](int64_t begin, int64_t end, int tid) {
    PassBuffers<Acc> u = thread_pass_buffers(call, ts.s[tid], kBc, false);
    Acc mx[kBr], sum[kBr];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t ib = w % call.nqb, bh = w / call.nqb, b = bh / call.p->H, h = bh % call.p->H;
      const Params pb = item_params(*call.p, b);
      const Ctx<Acc> cx = item_ctx(call, pb);
      const Params& p = pb;
      const int64_t hk = p.kv_head(h);
      if (ib >= cx.nqb) continue;
      const int64_t i0 = ib * kBr, nr = std::min(kBr, p.L - i0), nrp = round_up(nr, kMR);
      load_rows<T, Acc>(p.q, b, h, i0, nr, p.E, u.qb.Q, cx.Ep, nrp);
      for (int64_t r = 0; r < kBr; ++r) mx[r] = -std::numeric_limits<Acc>::infinity(), sum[r] = 0;
      const MaskView mv = mask_view(p, b, h);
      const Acc cap = static_cast<Acc>(p.softcap), slope = static_cast<Acc>(p.alibi_slope(b, h));
      for (int64_t jb = 0; jb < cx.nkb; ++jb) {
        const int64_t j0 = jb * kBc, nc = std::min(kBc, p.S - j0);
        if (causal_hidden(cx.kb, i0, nr, j0)) break;
        if (window_hidden(cx.kb, i0, j0, nc)) continue;
        MaskTileInfo mi;
        if (p.mask_dtype != kNone) {
          mi = load_mask_tile<Acc>(mv, i0, i0 + nr, j0, j0 + nc, u.t.mask, kBc, 1, Acc(1), true);
          if (mi.all_hidden) continue;
        }
        load_cols<T, Acc>(p.k, b, hk, j0, nc, p.E, cx.Ep, u.kb.KT, kBc);
        gemm<Acc>(nrp, kBc / Vec<Acc>::N, cx.Ep, u.qb.Q, cx.Ep, 1, u.kb.KT, kBc, u.t.S, kBc, false);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t lim = cx.kb.upper ? std::min(nc, i0 + r + cx.kb.hi - j0 + 1) : nc;
          const int64_t first = cx.kb.lower ? std::max<int64_t>(0, i0 + r + cx.kb.lo - j0) : 0;
          const Acc* m = (p.mask_dtype != kNone && !mi.all_zero) ? u.t.mask + (mi.rows_shared ? 0 : r * kBc) : nullptr;
          for (int64_t c = first; c < lim; ++c) {
            // A -inf mask hides the key even when its score is NaN (NaN + -inf would be NaN).
            if (m && m[c] == -std::numeric_limits<Acc>::infinity()) continue;
            Acc d = u.t.S[r * kBc + c] * cx.scale;
            if (cap > 0) d = cap * std::tanh(d / cap);
            if (p.alibi != 0) d += slope * (static_cast<Acc>(j0 + c) - static_cast<Acc>(i0 + r + p.causal_offset));
            const Acc x = d + (m ? m[c] : Acc(0));
            if (x == -std::numeric_limits<Acc>::infinity()) continue;
            if (x > mx[r]) {
              sum[r] = sum[r] * std::exp(mx[r] - x) + 1;
              mx[r] = x;
            } else {
              sum[r] += std::exp(x - mx[r]);
            }
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        Acc x = sum[r] > 0 ? mx[r] + std::log(sum[r]) : -std::numeric_limits<Acc>::infinity();
        if (p.sinks != 0) {
          // The forward's denominator also held exp(sink): x = log(e^x + e^sink).
          const Acc sk = static_cast<Acc>(reinterpret_cast<const float*>(p.sinks)[h]);
          const Acc hi = std::max(x, sk);
          if (hi != -std::numeric_limits<Acc>::infinity()) x = hi + std::log(std::exp(x - hi) + std::exp(sk - hi));
        } else if (p.lse.ptr != 0) {
          // Sinks the caller did not pass show as a forward lse above the keys' own by more than its float32
          // rounding (2^-24 relative): such a row takes the forward's lse, as the float32 backward does.
          const Acc fwd = static_cast<Acc>(*p.lse.at<const float>(b, h, i0 + r));
          if (fwd > x + Acc(4e-7) * (1 + std::abs(fwd))) x = fwd;
        }
        lse[bh * cx.Lrow + i0 + r] = x;
      }
    }
  }, 1);
}

// Fused: task (b, hk) owns dK/dV of kv head hk and dQ of its G query heads.
template <typename T, typename Acc>
void pass_fused(const Ctx<Acc>& call_cx, ThreadScratch& ts) {
  const Params& call = *call_cx.p;
  const int64_t Sp = call_cx.nkb * kBc;
  parallel_for(call.B * call.Hk, call.num_threads, [&](int64_t begin, int64_t end, int tid) {
    PassBuffers<Acc> u = thread_pass_buffers(call_cx, ts.s[tid], Sp, true);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / call.Hk, hk = w % call.Hk;
      const Params p = item_params(call, b);
      const Ctx<Acc> cx = item_ctx(call_cx, p);
      std::vector<KBlock<Acc>> kbs(static_cast<size_t>(cx.nkb));
      for (int64_t jb = 0; jb < cx.nkb; ++jb) {
        KBlock<Acc>& kb = kbs[jb];
        kb.K = u.Kall + jb * kBc * cx.Ep;
        if (cx.bf16dot) {
          kb.KT2 = u.KT2all + jb * kBc * cx.Ep2;
          kb.VT2 = u.VT2all + jb * kBc * cx.Evp2;
        } else {
          kb.KT = u.KTall + jb * kBc * cx.Ep;
          kb.VT = u.VTall + jb * kBc * cx.Evp;
        }
        load_kblock<T, Acc>(cx, b, hk, jb, kb, true);
      }
      std::memset(static_cast<void*>(u.dK), 0, cx.nkb * kBc * cx.Ep * sizeof(Acc));
      std::memset(static_cast<void*>(u.dV), 0, cx.nkb * kBc * cx.Evp * sizeof(Acc));
      for (int64_t h = hk * cx.G; h < (hk + 1) * cx.G; ++h) {
        for (int64_t ib = 0; ib < cx.nqb; ++ib) {
          load_qblock<T, Acc>(cx, b, h, ib, u.qb);
          std::memset(static_cast<void*>(u.dQ), 0, kBr * cx.Ep * sizeof(Acc));
          for (int64_t jb = 0; jb < cx.nkb; ++jb) {
            const KBlock<Acc>& kb = kbs[jb];
            int64_t kc, r0;
            if (!tile_grads(cx, b, h, u.qb, kb, u.t, &kc, &r0)) continue;
            accumulate_dkdv(cx, u.qb, u.t, kc, r0, u.dK + kb.j0 * cx.Ep, u.dV + kb.j0 * cx.Evp);
            accumulate_dq(cx, u.qb, u.t, kc, kb.K, u.dQ);
            if (cx.dmask_direct) write_dmask_tile(cx, b, h, u.qb, kb, u.t, kc);
          }
          store_rows<T, Acc>(p.dq, b, h, u.qb.i0, u.qb.nr, p.E, u.dQ, cx.Ep, cx.scale);
        }
      }
      store_rows<T, Acc>(p.dk, b, hk, 0, p.S, p.E, u.dK, cx.Ep, cx.scale);
      store_rows<T, Acc>(p.dv, b, hk, 0, p.S, p.Ev, u.dV, cx.Evp, Acc(1));
    }
  }, 1);
}

// Split, dK/dV: task (b, hk, key block) loops its query heads > query blocks.
template <typename T, typename Acc>
void pass_dkdv(const Ctx<Acc>& call_cx, ThreadScratch& ts) {
  const Params& call = *call_cx.p;
  parallel_for(call.B * call.Hk * call_cx.nkb, call.num_threads, [&](int64_t begin, int64_t end, int tid) {
    PassBuffers<Acc> u = thread_pass_buffers(call_cx, ts.s[tid], kBc, false);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t jb = w % call_cx.nkb, bhk = w / call_cx.nkb, b = bhk / call.Hk, hk = bhk % call.Hk;
      const Params p = item_params(call, b);
      const Ctx<Acc> cx = item_ctx(call_cx, p);
      if (jb >= cx.nkb) continue;
      load_kblock<T, Acc>(cx, b, hk, jb, u.kb, false);
      std::memset(static_cast<void*>(u.dK), 0, kBc * cx.Ep * sizeof(Acc));
      std::memset(static_cast<void*>(u.dV), 0, kBc * cx.Evp * sizeof(Acc));
      // The first query block with a row that sees key j0: rows i >= j0 - hi; the last with a row that sees the
      // block's last key j1 (left window): rows i <= j1 - lo.
      const int64_t ib0 = cx.kb.upper ? std::max<int64_t>(0, u.kb.j0 - cx.kb.hi) / kBr : 0;
      const int64_t ilast = u.kb.j0 + u.kb.nc - 1 - cx.kb.lo;
      const int64_t ib1 = !cx.kb.lower ? cx.nqb : ilast < 0 ? 0 : std::min(cx.nqb, ilast / kBr + 1);
      for (int64_t h = hk * cx.G; h < (hk + 1) * cx.G; ++h) {
        for (int64_t ib = ib0; ib < ib1; ++ib) {
          load_qblock<T, Acc>(cx, b, h, ib, u.qb);
          int64_t kc, r0;
          if (!tile_grads(cx, b, h, u.qb, u.kb, u.t, &kc, &r0)) continue;
          accumulate_dkdv(cx, u.qb, u.t, kc, r0, u.dK, u.dV);
        }
      }
      store_rows<T, Acc>(p.dk, b, hk, u.kb.j0, u.kb.nc, p.E, u.dK, cx.Ep, cx.scale);
      store_rows<T, Acc>(p.dv, b, hk, u.kb.j0, u.kb.nc, p.Ev, u.dV, cx.Evp, Acc(1));
    }
  }, 1);
}

// Split, dQ (and an unbroadcast mask's gradient): task (b, h, query block) loops the key blocks.
template <typename T, typename Acc>
void pass_dq(const Ctx<Acc>& call_cx, ThreadScratch& ts) {
  const Params& call = *call_cx.p;
  parallel_for(call.B * call.H * call_cx.nqb, call.num_threads, [&](int64_t begin, int64_t end, int tid) {
    PassBuffers<Acc> u = thread_pass_buffers(call_cx, ts.s[tid], kBc, false);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t ib = w % call_cx.nqb, bh = w / call_cx.nqb, b = bh / call.H, h = bh % call.H;
      const Params p = item_params(call, b);
      const Ctx<Acc> cx = item_ctx(call_cx, p);
      const int64_t hk = p.kv_head(h);
      if (ib >= cx.nqb) continue;
      load_qblock<T, Acc>(cx, b, h, ib, u.qb);
      std::memset(static_cast<void*>(u.dQ), 0, kBr * cx.Ep * sizeof(Acc));
      for (int64_t jb = 0; jb < cx.nkb; ++jb) {
        if (causal_hidden(cx.kb, u.qb.i0, u.qb.nr, jb * kBc)) break;
        if (window_hidden(cx.kb, u.qb.i0, jb * kBc, std::min(kBc, p.S - jb * kBc))) continue;
        load_kblock<T, Acc>(cx, b, hk, jb, u.kb, true);
        int64_t kc, r0;
        if (!tile_grads(cx, b, h, u.qb, u.kb, u.t, &kc, &r0)) continue;
        accumulate_dq(cx, u.qb, u.t, kc, u.kb.K, u.dQ);
        if (cx.dmask_direct) write_dmask_tile(cx, b, h, u.qb, u.kb, u.t, kc);
      }
      store_rows<T, Acc>(p.dq, b, h, u.qb.i0, u.qb.nr, p.E, u.dQ, cx.Ep, cx.scale);
    }
  }, 1);
}

// Gradient of a broadcast mask: task = one tile of dmask (a size-1 dim is one "block"); it sums dS over
// the broadcast batch / head / query / key indices, in that nesting order.
template <typename T, typename Acc>
void pass_dmask_reduce(const Ctx<Acc>& cx, ThreadScratch& ts) {
  const Params& p = *cx.p;
  const Tensor4& dm = p.dmask;
  const bool rb = p.B > 1 && dm.sb == 0, rh = p.H > 1 && dm.sh == 0;
  const bool rl = p.L > 1 && dm.sl == 0, rs = p.S > 1 && dm.se == 0;
  const int64_t Bm = rb ? 1 : p.B, Hm = rh ? 1 : p.H, nib = rl ? 1 : cx.nqb, njb = rs ? 1 : cx.nkb;
  const int64_t es = dtype_bytes(p.dmask_dtype);
  parallel_for(Bm * Hm * nib * njb, p.num_threads, [&](int64_t begin, int64_t end, int tid) {
    PassBuffers<Acc> u = thread_pass_buffers(cx, ts.s[tid], kBc, false);
    for (int64_t w = begin; w < end; ++w) {
      int64_t x = w;
      const int64_t jbm = x % njb; x /= njb;
      const int64_t ibm = x % nib; x /= nib;
      const int64_t hm = x % Hm, bm = x / Hm;
      std::memset(static_cast<void*>(u.red), 0, kBr * kBc * sizeof(Acc));
      for (int64_t b = rb ? 0 : bm; b < (rb ? p.B : bm + 1); ++b) {
        const Params pb = item_params(p, b);  // varlen: item b's rows and lengths
        const Ctx<Acc> cb = item_ctx(cx, pb);
        for (int64_t h = rh ? 0 : hm; h < (rh ? p.H : hm + 1); ++h) {
          const int64_t hk = p.kv_head(h);
          for (int64_t ib = rl ? 0 : ibm; ib < (rl ? cb.nqb : std::min(ibm + 1, cb.nqb)); ++ib) {
            load_qblock<T, Acc>(cb, b, h, ib, u.qb);
            for (int64_t jb = rs ? 0 : jbm; jb < (rs ? cb.nkb : std::min(jbm + 1, cb.nkb)); ++jb) {
              if (causal_hidden(cb.kb, u.qb.i0, u.qb.nr, jb * kBc)) break;
              load_kblock<T, Acc>(cb, b, hk, jb, u.kb, false);
              int64_t kc, r0;
              if (!tile_grads(cb, b, h, u.qb, u.kb, u.t, &kc, &r0)) continue;
              for (int64_t r = 0; r < u.qb.nr; ++r) {
                const Acc* ds = (cb.softcap > 0 ? u.t.dSm : u.t.dP) + r * kBc;
                Acc* o = u.red + (rl ? 0 : r * kBc);
                if (rs) {
                  Acc s = o[0];
                  for (int64_t c = 0; c < kc; ++c) s += ds[c];
                  o[0] = s;
                } else {
                  using VT = Vec<Acc>;
                  for (int64_t c = 0; c < kc; c += VT::N) VT::store(o + c, VT::add(VT::load(o + c), VT::load(ds + c)));
                }
              }
            }
          }
        }
      }
      const int64_t i0 = ibm * kBr, nr = rl ? 1 : std::min(kBr, p.L - i0);
      const int64_t j0 = jbm * kBc, nc = rs ? 1 : std::min(kBc, p.S - j0);
      char* base = reinterpret_cast<char*>(dm.ptr);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c) {
          const int64_t off = bm * dm.sb + hm * dm.sh + (i0 + r) * dm.sl + (j0 + c) * dm.se;
          store_any<Acc>(p.dmask_dtype, base + off * es, 0, u.red[r * kBc + c]);
        }
    }
  }, 1);
}

template <typename T, typename Acc>
void backward_impl(const Params& p, int mode) {
  constexpr int N = Vec<Acc>::N;
  Ctx<Acc> cx;
  cx.p = &p;
  cx.Ep = round_up(p.E, N);
  cx.Evp = round_up(p.Ev, N);
  cx.nqb = ceil_div(p.L, kBr);
  cx.nkb = ceil_div(p.S, kBc);
  cx.G = p.H / p.Hk;
  cx.Lrow = p.L;
  cx.scale = static_cast<Acc>(p.scale);
  cx.bf16dot = kHaveBf16Dot && std::is_same<T, bf16_t>::value;
  cx.Ep2 = round_up(p.E, 2);
  cx.Evp2 = round_up(p.Ev, 2);
  cx.dropout = p.dropout_p > 0.0;
  cx.drop_mul = static_cast<Acc>(p.dropout_scale());
  const bool want_dmask = p.dmask_dtype != kNone && p.mask_dtype != kNone;
  const bool bcast = (p.B > 1 && p.dmask.sb == 0) || (p.H > 1 && p.dmask.sh == 0) || (p.L > 1 && p.dmask.sl == 0) ||
                     (p.S > 1 && p.dmask.se == 0);
  cx.dmask_direct = want_dmask && !bcast;
  cx.kb = key_bounds(p);
  cx.variants = p.score_variants();
  cx.softcap = static_cast<Acc>(p.softcap);
  cx.want_dmask = want_dmask;

  std::vector<Acc> delta(static_cast<size_t>(p.B * p.H * p.L));
  compute_delta<T, Acc>(p, delta.data());
  cx.delta = delta.data();
  ThreadScratch ts(p.num_threads);
  std::vector<Acc> lse;
  if (std::is_same<Acc, double>::value) {
    lse.resize(static_cast<size_t>(p.B * p.H * p.L));
    recompute_lse<T, Acc>(cx, ts, lse.data());
    cx.lse_acc = lse.data();
  }

  // Fused does 5 tile GEMMs, split 7 (QK^T and dO V^T twice) but has B*H*L/kBr + B*Hk*S/kBc tasks
  // instead of B*Hk: fused unless its rounds of tasks leave threads idle for more than that 1.4x
  // (e.g. 1 kv head on 2 threads). Fused also keeps S x (3E + 2Ev) of scratch per thread.
  const int64_t tasks = p.B * p.Hk, nt = std::max(1, p.num_threads);
  const double fused_bytes = static_cast<double>(cx.nkb * kBc) * (3 * cx.Ep + 2 * cx.Evp) * sizeof(Acc);
  bool fused = ceil_div(tasks, nt) * nt <= 1.5 * tasks && fused_bytes <= 256.0 * (1 << 20);
  if (mode == kFused) fused = true;
  if (mode == kSplit) fused = false;
  if (fused) {
    pass_fused<T, Acc>(cx, ts);
  } else {
    pass_dkdv<T, Acc>(cx, ts);
    pass_dq<T, Acc>(cx, ts);
  }
  if (want_dmask && !cx.dmask_direct) pass_dmask_reduce<T, Acc>(cx, ts);
}

void check_backward_params(const Params& p) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("fastattn backward: " + m); };
  if (p.B < 0 || p.H < 1 || p.Hk < 1 || p.L < 0 || p.S < 0 || p.E < 1 || p.Ev < 1)
    fail("bad sizes (need H, Hk, E, Ev >= 1 and B, L, S >= 0)");
  if (p.H % p.Hk != 0) fail("H must be a multiple of Hk");
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16 && p.dtype != kF64) fail("unsupported dtype");
  if (p.mask_dtype != kNone && p.mask_dtype != kBool && p.mask_dtype != kF32 && p.mask_dtype != p.dtype)
    fail("mask dtype must be bool, float32 or q's dtype");
  if (p.dmask_dtype != kNone && (p.mask_dtype == kNone || p.mask_dtype == kBool || p.dmask_dtype != p.mask_dtype))
    fail("a mask gradient needs a float mask and has the mask's dtype");
  if (!(p.dropout_p >= 0.0 && p.dropout_p < 1.0)) fail("dropout_p must be in [0, 1)");
  if (p.out_lo.ptr != 0 && p.dtype != kF16 && p.dtype != kBF16) fail("out_lo is for float16 / bfloat16 only");
  if (p.window_left < -1 || p.window_right < -1) fail("window bounds must be >= -1 (-1: unbounded)");
  if (!(p.softcap >= 0.0) || std::isinf(p.softcap)) fail("softcap must be finite and >= 0 (0: off)");
  if (p.cu_q != 0 && p.any_variant()) fail("window / softcap / alibi / sinks need a regular (not packed) batch");
}

void backward(const Params& p, int mode) {
  if (p.B == 0 || p.L == 0 || p.S == 0) return;  // the caller fills the empty / zero gradients
  if (!causal_offset_in_range(p)) return backward(with_causal_offset_in_range(p), mode);
  switch (p.dtype) {
    case kF32: backward_impl<float, float>(p, mode); break;
    case kBF16: backward_impl<bf16_t, float>(p, mode); break;
    case kF16: backward_impl<f16_t, float>(p, mode); break;
    case kF64: backward_impl<double, double>(p, mode); break;
    default: break;
  }
}

}  // namespace

void register_backward(py::module_& m) {
  m.def("bwd",
        [](const Params& p, int mode) {
          check_backward_params(p);
          py::gil_scoped_release nogil;
          backward(p, mode);
        },
        py::arg("params"), py::arg("mode") = 0,
        "Backward attention: writes p.dq (B,H,L,E), p.dk (B,Hk,S,E), p.dv (B,Hk,S,Ev) from p.dout, p.q, p.k, p.v,\n"
        "p.out, p.lse, p.mask; and p.dmask when p.dmask_dtype != 0 (dmask strides: 0 on the mask's size-1\n"
        "dims, which are summed; dmask must be zero-filled by the caller). mode: 0 auto, 1 fused, 2 split\n"
        "(same bits either way; for tests).");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
