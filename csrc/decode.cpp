// fastattn CPU decode kernel: a few new query rows per sequence against a long KV cache (flash-decoding).
//
// Math (fastattn/reference/decode.py states it in full): sequence b has keys j < n = seqlens[b]; query row i
// sits at i' = n - L + i; s_ij = scale <q_i, k_j>, soft-capped, + ALiBi, + mask, -inf where hidden (causal
// j <= i', window i' - left <= j <= i' + right, a false bool mask); lse = log(sum_j exp(s_ij) [+ exp(sink)]),
// out_i = sum_j exp(s_ij - lse) v_j. Rows with no visible key: out = 0, lse = -inf (or the sink).
//
// Algorithm. A work item is (b, kv head, key split); when the cache stores a key's kv heads side by side
// ((B, S, Hk, E), paged) it is (b, every kv head, key split) instead, the heads taking each key block in turn
// (decode_heads_per_item). For each kv head, its R = L * G query rows (the L rows of every head of the GQA
// group, row r = i * G + g) are processed together, so each K / V row of the item's keys is read once for the
// whole group, in key order, and asked for ahead of use (prefetch_rows). Keys go by in blocks of kBlockN (fewer
// for an item that takes every kv head: block_keys):
//   1. scores: a tile of kRowTile query rows x kDotKeysFor keys of dot products is accumulated in registers over
//      E (K rows converted to fp32 chunk by chunk); scores are kept in log2 units (log2(e) folded into scale);
//   2. online softmax per row, vectorised over the block: m = running max, l = running sum of 2^(s - m);
//   3. acc[r] = acc[r] * 2^(m_old - m) + sum_j p_rj v_j, a group of kAccChunksFor Ev chunks at a time with the
//      accumulators of kRowTile rows in registers across the block (the block's V rows stay in L1 between
//      groups).
// The keys a window cannot show to any of the item's rows are never read. A split covers a run of whole key
// blocks and leaves (m, l, acc) per row; the merge combines the splits in split order, so the result depends
// on num_splits only through float rounding and never on which thread ran what. One split merges in place.
// Feature switches that touch every score (soft-cap, ALiBi, mask) are a template flag: the plain call has
// none of their code in its loop. Causal and window limits are per-row key bounds, checked only for blocks
// that straddle them.
#include "decode.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "convert.h"
#include "mask.h"
#include "parallel.h"
#include "register.h"
#include "scratch.h"
#include "simd.h"

namespace py = pybind11;

namespace fastattn {
namespace FASTATTN_NS {

namespace {

using simd::vf;
using simd::W;

constexpr int64_t kBlockN = 32;  // keys per block (at most): a multiple of every ISA's 2 * W and of 8
// An item that takes every kv head walks each block once per head, so each pass touches the block's whole span
// of memory (keys x the key stride), K and V. Its blocks are cut to keep that span within kBlockSpan bytes (at
// least kBlockMinN keys): a pass then stays within as many 4 KiB pages as the first-level TLB holds alongside the
// next pass's (f32 E128 with 8 kv heads: one page per key).
constexpr int64_t kBlockSpan = 32 * 1024, kBlockMinN = 8;
#if defined(FASTATTN_HAVE_AVX2)
constexpr int kRowTile = 4;  // query rows sharing each K / V chunk load (and its widening to fp32)
#else
constexpr int kRowTile = 2;  // the portable vectors are emulated: fewer live accumulators
#endif
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The K or V rows of one (b, kv head): key j's row, through the block table when the cache is paged.
template <typename T>
struct CacheRows {
  const T* base;              // moved to the kv head (and to b when contiguous)
  int64_t s_page, s_slot;     // page (or batch) stride, slot (key) stride
  const int32_t* table;       // sequence b's block-table row; null when contiguous
  int64_t table_sj, page;
  // Paged, optional: key j's page and slot for keys [from, from + n), found by page_lookup once per key block
  // and shared by every head and by K and V, so that a pass does no division per row.
  const int64_t *pages = nullptr, *slots = nullptr;
  int64_t from = 0, n = 0;
  FASTATTN_INLINE const T* row(int64_t j) const {
    if (table == nullptr) return base + j * s_slot;
    const int64_t i = j - from;
    if (static_cast<uint64_t>(i) < static_cast<uint64_t>(n)) return base + pages[i] * s_page + slots[i] * s_slot;
    return base + static_cast<int64_t>(table[(j / page) * table_sj]) * s_page + (j % page) * s_slot;
  }
};

// Block-table entry (page) and slot of keys [j0, j1) of a sequence: one division for the run.
FASTATTN_INLINE void page_lookup(const int32_t* table, int64_t table_sj, int64_t page, int64_t j0, int64_t j1,
                                 int64_t* pages, int64_t* slots) {
  int64_t q = j0 / page, slot = j0 % page;
  for (int64_t j = j0; j < j1; ++j) {
    pages[j - j0] = table[q * table_sj];
    slots[j - j0] = slot;
    if (++slot == page) slot = 0, ++q;
  }
}

template <typename T>
CacheRows<T> cache_rows(const DecodeParams& p, const Tensor4& t, int64_t b, int64_t hk) {
  CacheRows<T> c;
  c.base = reinterpret_cast<const T*>(t.ptr) + hk * t.sh;
  c.s_page = t.sb;
  c.s_slot = t.sl;
  c.table = nullptr;
  c.table_sj = p.table_sj;
  c.page = p.page_size;
  if (p.block_table != 0) c.table = reinterpret_cast<const int32_t*>(p.block_table) + b * p.table_sb;
  else c.base += b * t.sb;
  return c;
}

// rows[j] = key j0 + j's row of D elements, j < nb; with a head-dim stride other than 1 the rows are first
// copied to `stage` (nb x D, contiguous).
template <typename T>
FASTATTN_INLINE void block_rows(const CacheRows<T>& c, int64_t se, int64_t D, int64_t j0, int64_t nb,
                                T* stage, const T** rows) {
  for (int64_t j = 0; j < nb; ++j) {
    const T* r = c.row(j0 + j);
    if (se != 1) {
      T* dst = stage + j * D;
      for (int64_t e = 0; e < D; ++e) dst[e] = r[e * se];
      r = dst;
    }
    rows[j] = r;
  }
}

// Asks for the cache lines of rows [j0, j0 + nb) (D elements each, unit head-dim stride) ahead of their use.
// A thread streams two sequences of rows (K and V) and the hardware prefetcher alone keeps too few lines in
// flight for them, so the kernel asks for each line itself, a little at a time: every group of a few keys
// whose scores are computed first asks for those keys' V rows (read once the block's scores are known) and
// the K rows a block ahead. Asking for a whole block at once instead fills the core's miss buffers and stalls
// the loads behind them.
// (An asm statement on x86: GCC may judge a lambda that only prefetches to have no effect and drop its calls.)
FASTATTN_INLINE void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <typename T>
FASTATTN_INLINE void prefetch_rows(const CacheRows<T>& c, int64_t se, int64_t D, int64_t j0, int64_t nb) {
  if (se != 1) return;
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  if (c.table == nullptr && c.s_slot == D) {  // rows packed back to back: one run of lines
    const uintptr_t begin = reinterpret_cast<uintptr_t>(c.base + j0 * D);
    const uintptr_t end = begin + static_cast<uintptr_t>(nb * bytes);
    uintptr_t a = begin & ~uintptr_t{63};
    for (; a < end; a += 64) prefetch_line(reinterpret_cast<const char*>(a));
    return;
  }
  for (int64_t j = 0; j < nb; ++j) {
    const char* r = reinterpret_cast<const char*>(c.row(j0 + j));
    for (int64_t o = 0; o < bytes; o += 64) prefetch_line(r + o);
  }
}

// Tile sizes of the two microkernels, chosen so that their accumulators, operands and broadcasts fit the
// ISA's vector registers (32 with AVX-512, 16 otherwise):
//   dots: kRowTile rows x kDotKeysFor keys of accumulators; each q chunk load then feeds that many FMAs and each
//   K chunk load kRowTile FMAs (one load per FMA would leave the loads, not the FMAs, as the limit);
//   accumulate: kRowTile rows x kAccChunksFor Ev chunks of accumulators, each p broadcast feeding that many FMAs.
// With AVX2 (16 registers) a tile holds 8 accumulators whatever its row count: NR rows x 8 / NR chunks
// (accumulate) and NR rows x 8 / NR keys (dots), except that a one-row tile (MHA, or the last row of a group)
// takes its keys two at a time: it reads two cache rows per q row, so the limit is memory, and the keys of
// each group are also the unit of the prefetch (prefetch_rows), which wants small steps. 8 dot products are
// reduced together (reduce_add8).
#if defined(FASTATTN_HAVE_AVX512)
template <int NR> constexpr int kDotKeysFor = 4;
template <int NR> constexpr int kAccChunksFor = 4;
#elif defined(FASTATTN_HAVE_AVX2)
template <int NR> constexpr int kDotKeysFor = NR == 2 ? 4 : 2;
template <int NR> constexpr int kAccChunksFor = NR == 1 ? 8 : NR == 2 ? 4 : 2;
#else
template <int NR> constexpr int kDotKeysFor = 2;
template <int NR> constexpr int kAccChunksFor = 2;
#endif

#if defined(FASTATTN_HAVE_AVX512)
// (sum of a[0], ..., sum of a[3]): the four horizontal sums at once, in 13 instructions instead of 4 x 8.
// Within each 128-bit lane, unpack / shuffle pair up the vectors so that one add serves two of them; the four
// lanes are added at the end.
FASTATTN_INLINE __m128 reduce_add4(const __m512* a) {
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 z = _mm256_add_ps(_mm512_castps512_ps256(y), _mm512_extractf32x8_ps(y, 1));
  return _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1));
}
#endif

#if defined(FASTATTN_HAVE_AVX2) && !defined(FASTATTN_HAVE_AVX512)
// (sum of a[0], ..., sum of a[7]) in one vector: three rounds of hadd pair up the vectors within each 128-bit
// half, one add of the two halves finishes (9 instructions instead of 8 x 5).
FASTATTN_INLINE __m256 reduce_add8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  // h0123 = (a0..a3 over the low half | a0..a3 over the high half); likewise h4567 for a4..a7.
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}
#endif

// Paired bfloat16 rows (AVX2). Widening bf16 to fp32 lane by lane (zero-extend 8 halves, shift) costs two
// instructions per 8 values. Loaded 32 bits at a time instead, 16 bf16 values are two fp32 vectors for the
// price of one instruction each: the low halves shifted up are the even elements (0, 2, ..., 14), the high
// halves masked are the odd ones (1, 3, ..., 15). A dot product does not care about the order of its terms, so
// q is stored in the same "paired" order (each 16-column chunk: its 8 even columns, then its 8 odd ones) and
// the output accumulators too, which merge_rows puts back in column order. Taken for bfloat16 when E and Ev
// are multiples of 16 (a whole number of chunks); every other call runs the lane-by-lane path.
#if defined(FASTATTN_HAVE_AVX2) && !defined(FASTATTN_HAVE_AVX512)
constexpr bool kHavePairs = true;
FASTATTN_INLINE void load_pair(const bf16_t* p, __m256& even, __m256& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
constexpr bool kHavePairs = false;
template <typename T> FASTATTN_INLINE void load_pair(const T*, vf&, vf&) {}  // never called
#endif
// Where column e of a paired row is stored.
FASTATTN_INLINE int64_t paired(int64_t e) { return (e & ~int64_t{15}) | ((e & 1) << 3) | ((e & 15) >> 1); }

// s[t * kBlockN + j] = mul * <qf[t], k_j> for the NR rows of qf (stride Ep, zero-padded), keys j < nb, in
// groups of KG keys.
template <typename T, int NR, int KG, bool kPaired = false>
FASTATTN_INLINE void dots_group(const float* qf, int64_t Ep, int64_t E, const T* const* kr, float mul, float* s) {
  const int64_t full = E / W, tail = E - full * W;
  vf a[NR][KG];
  for (int t = 0; t < NR; ++t)
    for (int g = 0; g < KG; ++g) a[t][g] = simd::zero();
  if constexpr (kPaired) {  // E % 16 == 0; qf in paired order
    // The KG keys' chunks first, then each row's q chunk once for all of them: NR + KG loads per 2 * NR * KG
    // FMAs (q loaded per key instead would make the loads, not the FMAs, the limit).
    for (int64_t c = 0; c < E; c += 2 * W) {
      vf ke[KG], ko[KG];
      for (int g = 0; g < KG; ++g) load_pair(kr[g] + c, ke[g], ko[g]);
      for (int t = 0; t < NR; ++t) {
        const vf qe = simd::load(qf + t * Ep + c), qo = simd::load(qf + t * Ep + c + W);
        for (int g = 0; g < KG; ++g) a[t][g] = simd::fmadd(qe, ke[g], a[t][g]);
        for (int g = 0; g < KG; ++g) a[t][g] = simd::fmadd(qo, ko[g], a[t][g]);
      }
    }
  } else {
    for (int64_t c = 0; c < full; ++c) {
      vf kv[KG];
      for (int g = 0; g < KG; ++g) kv[g] = simd::load_cvt(kr[g] + c * W);
      for (int t = 0; t < NR; ++t) {
        const vf qv = simd::load(qf + t * Ep + c * W);
        for (int g = 0; g < KG; ++g) a[t][g] = simd::fmadd(qv, kv[g], a[t][g]);
      }
    }
    if (tail) {
      vf kv[KG];
      for (int g = 0; g < KG; ++g) kv[g] = simd::load_cvt_n(kr[g] + full * W, tail);
      for (int t = 0; t < NR; ++t) {
        const vf qv = simd::load(qf + t * Ep + full * W);
        for (int g = 0; g < KG; ++g) a[t][g] = simd::fmadd(qv, kv[g], a[t][g]);
      }
    }
  }
#if defined(FASTATTN_HAVE_AVX512)
  if constexpr (KG == 4) {
    for (int t = 0; t < NR; ++t) _mm_storeu_ps(s + t * kBlockN, _mm_mul_ps(reduce_add4(a[t]), _mm_set1_ps(mul)));
    return;
  }
#elif defined(FASTATTN_HAVE_AVX2)
  if constexpr (NR * KG == 8) {
    // a[t][g] is a[0][t * KG + g]: the 8 sums come out row-major, KG keys of each row in turn.
    alignas(32) float r[8];
    _mm256_store_ps(r, _mm256_mul_ps(reduce_add8(&a[0][0]), _mm256_set1_ps(mul)));
    for (int t = 0; t < NR; ++t)
      for (int g = 0; g < KG; ++g) s[t * kBlockN + g] = r[t * KG + g];
    return;
  }
#endif
  for (int t = 0; t < NR; ++t)
    for (int g = 0; g < KG; ++g) s[t * kBlockN + g] = simd::reduce_add(a[t][g]) * mul;
}

// The block's scores, a group of keys at a time; before_group(j, m) runs before the group of keys [j, j + m).
template <typename T, int NR, bool kPaired, typename F>
FASTATTN_INLINE void block_dots(const float* qf, int64_t Ep, int64_t E, const T* const* krows, int64_t nb,
                                float mul, float* s, F&& before_group) {
  constexpr int KG = kDotKeysFor<NR>;
  int64_t j = 0;
  for (; j + KG <= nb; j += KG) {
    before_group(j, int64_t{KG});
    dots_group<T, NR, KG, kPaired>(qf, Ep, E, krows + j, mul, s + j);
  }
  for (; j < nb; ++j) {
    before_group(j, int64_t{1});
    dots_group<T, NR, 1, kPaired>(qf, Ep, E, krows + j, mul, s + j);
  }
}

// acc[t] = acc[t] * alpha[t] + sum_{j < nb} p[t * kBlockN + j] v_j over CG chunks of W columns from column
// c0 for the NR rows of acc (row stride ast, rows padded to a multiple of W); the last chunk holds `last` <= W
// columns.
template <typename T, int NR, int CG, bool kPaired = false>
FASTATTN_INLINE void accumulate_group(float* acc, int64_t ast, int64_t c0, int64_t last, const float* p,
                                      const float* alpha, const T* const* vrows, int64_t nb) {
  vf a[NR][CG];
  for (int t = 0; t < NR; ++t) {
    const vf al = simd::set1(alpha[t]);
    for (int c = 0; c < CG; ++c) a[t][c] = simd::mul(simd::load(acc + t * ast + c0 + c * W), al);
  }
#pragma GCC unroll 2
  for (int64_t j = 0; j < nb; ++j) {
    vf vv[CG];
    if constexpr (kPaired) {  // CG even, whole chunks: chunk 2c holds the pair's even columns, 2c + 1 its odd
      for (int c = 0; c < CG; c += 2) load_pair(vrows[j] + c0 + c * W, vv[c], vv[c + 1]);
    } else {
      for (int c = 0; c < CG; ++c)
        vv[c] = (c == CG - 1 && last < W) ? simd::load_cvt_n(vrows[j] + c0 + c * W, last)
                                          : simd::load_cvt(vrows[j] + c0 + c * W);
    }
    for (int t = 0; t < NR; ++t) {
      const vf pv = simd::set1(p[t * kBlockN + j]);
      for (int c = 0; c < CG; ++c) a[t][c] = simd::fmadd(pv, vv[c], a[t][c]);
    }
  }
  for (int t = 0; t < NR; ++t)
    for (int c = 0; c < CG; ++c) simd::store(acc + t * ast + c0 + c * W, a[t][c]);
}

template <typename T, int NR, bool kPaired>
FASTATTN_INLINE void block_accumulate(float* acc, int64_t ast, int64_t Ev, const float* p, const float* alpha,
                                      const T* const* vrows, int64_t nb) {
  constexpr int CG = kAccChunksFor<NR>;
  const int64_t chunks = (Ev + W - 1) / W;
  int64_t c = 0;
  for (; c + CG <= chunks; c += CG) {
    const int64_t last = Ev - (c + CG - 1) * W;  // columns of the group's last chunk
    accumulate_group<T, NR, CG, kPaired>(acc, ast, c * W, last, p, alpha, vrows, nb);
  }
  if constexpr (kPaired) {  // chunks is even: the rest a pair at a time
    for (; c < chunks; c += 2) accumulate_group<T, NR, 2, true>(acc, ast, c * W, W, p, alpha, vrows, nb);
  } else {
    for (; c < chunks; ++c) accumulate_group<T, NR, 1>(acc, ast, c * W, Ev - c * W, p, alpha, vrows, nb);
  }
}

// The rows [r0, r0 + nr) in tiles of at most kRowTile, each tile by the NR-specialised f.
template <typename F>
FASTATTN_INLINE void for_row_tiles(int64_t R, F&& f) {
  for (int64_t r0 = 0; r0 < R; r0 += kRowTile) {
    switch (std::min<int64_t>(kRowTile, R - r0)) {
      case 4: if constexpr (kRowTile >= 4) f(r0, std::integral_constant<int, 4>()); break;
      case 3: if constexpr (kRowTile >= 3) f(r0, std::integral_constant<int, 3>()); break;
      case 2: f(r0, std::integral_constant<int, 2>()); break;
      default: f(r0, std::integral_constant<int, 1>()); break;
    }
  }
}

// One row's softmax state after a run of keys: running max m (log2 units), sum l of 2^(s - m), and the
// unnormalised output acc (Evp floats) follow it in memory: [m, l, acc...].
constexpr int64_t kStateHead = 2;

// Keys [lo, hi) that at least one of the item's rows may see: a left window cuts below the first row's
// reach; every other bound ends at n (the last row sits at n - 1).
FASTATTN_INLINE std::pair<int64_t, int64_t> item_keys(const DecodeParams& p, int64_t n) {
  int64_t lo = 0;
  if (p.window_left >= 0) lo = std::max<int64_t>(0, n - p.L - p.window_left);
  return {std::min(lo, n), n};
}

// The split's run of whole key blocks within [lo, hi).
FASTATTN_INLINE std::pair<int64_t, int64_t> split_keys(const DecodeParams& p, int64_t lo, int64_t hi, int64_t s) {
  const int64_t blocks = (hi - lo + kBlockN - 1) / kBlockN;
  const int64_t per = (blocks + p.num_splits - 1) / p.num_splits;
  const int64_t a = std::min(hi, lo + s * per * kBlockN);
  return {a, std::min(hi, a + per * kBlockN)};
}

// Keys per block for an item of nh kv heads (see kBlockSpan): a power of two dividing kBlockN.
int64_t block_keys(const DecodeParams& p, int64_t nh) {
  if (nh == 1) return kBlockN;
  const int64_t span = std::max(std::abs(p.k.sl), std::abs(p.v.sl)) * dtype_bytes(p.dtype);
  int64_t bn = kBlockN;
  while (bn > kBlockMinN && bn * span > kBlockSpan) bn /= 2;
  return bn;
}

// Runs item (b, kv heads [hk0, hk0 + nh), split) and leaves row r of kv head hk0 + hh's [m, l, acc] at
// state + (hh * R + r) * (kStateHead + Evp). The heads go through each key block in turn, so when the cache
// stores a key's heads side by side (decode_heads_per_item) the item reads each block's rows as one run of memory.
template <typename T, bool kVariants, bool kPaired>
void run_item(const DecodeParams& p, int64_t b, int64_t hk0, int64_t nh, int64_t split, float* state) {
  const int64_t G = p.H / p.Hk, L = p.L, R = G * L, E = p.E, Ev = p.Ev;
  const int64_t Ep = round_up(E, W), Evp = round_up(Ev, W), stride = kStateHead + Evp;
  const int64_t n = reinterpret_cast<const int32_t*>(p.seqlens)[b];
  const std::pair<int64_t, int64_t> keys = item_keys(p, n);
  const std::pair<int64_t, int64_t> run = split_keys(p, keys.first, keys.second, split);
  const int64_t k0 = run.first, k1 = run.second;
  // Keys per block, and the score columns the vector loops cover (whole vectors; those past the block are -inf).
  const int64_t bn = block_keys(p, nh), bw = round_up(bn, W);

  for (int64_t r = 0; r < nh * R; ++r) {
    float* st = state + r * stride;
    st[0] = kNegInf;
    st[1] = 0.f;
    std::fill(st + kStateHead, st + stride, 0.f);
  }
  if (k0 >= k1) return;

  // Per-thread scratch: fp32 queries, the block's scores / probabilities, row bounds, staged rows.
  const bool stage_k = p.k.se != 1, stage_v = p.v.se != 1, paged = p.block_table != 0;
  Arena plan;
  auto carve = [&](Arena& a) {
    struct {
      float *qf, *s, *alpha, *slope;
      int64_t *rlo, *rhi;
      T *kst, *vst;
      const T** krows;
      const T** vrows;
      int64_t *pages, *slots;
    } b;
    b.qf = a.take<float>(nh * R * Ep);
    b.s = a.take<float>(R * kBlockN);
    b.alpha = a.take<float>(R);
    b.slope = a.take<float>(nh * R);
    b.rlo = a.take<int64_t>(R);
    b.rhi = a.take<int64_t>(R);
    b.kst = a.take<T>(stage_k ? kBlockN * E : 0);
    b.vst = a.take<T>(stage_v ? kBlockN * Ev : 0);
    b.krows = a.take<const T*>(kBlockN);
    b.vrows = a.take<const T*>(kBlockN);
    b.pages = a.take<int64_t>(paged ? 2 * kBlockN : 0);
    b.slots = a.take<int64_t>(paged ? 2 * kBlockN : 0);
    return b;
  };
  carve(plan);
  Arena arena{static_cast<char*>(thread_scratch().get(plan.off + 64)), 0};
  const auto buf = carve(arena);

  const int64_t qbase = n - L;  // row i sits at i' = qbase + i
  for (int64_t r = 0; r < nh * R; ++r) {  // row r % R of kv head hk0 + r / R
    const int64_t i = (r % R) / G, h = (hk0 + r / R) * G + r % G;
    const T* qr = reinterpret_cast<const T*>(p.q.ptr) + b * p.q.sb + h * p.q.sh + i * p.q.sl;
    float* qf = buf.qf + r * Ep;
    for (int64_t e = 0; e < E; ++e) qf[kPaired ? paired(e) : e] = to_f32(qr[e * p.q.se]);
    std::fill(qf + E, qf + Ep, 0.f);
    buf.slope[r] = p.alibi ? reinterpret_cast<const float*>(p.alibi)[b * p.alibi_sb + h * p.alibi_sh] : 0.f;
    if (r >= R) continue;  // the key bounds depend on the row's position only
    const int64_t ip = qbase + i;
    const int64_t big = std::numeric_limits<int64_t>::max() / 4;
    buf.rlo[r] = p.window_left >= 0 ? ip - p.window_left : -big;
    int64_t rhi = big;
    if (p.causal) rhi = std::min(rhi, ip + 1);
    if (p.window_right >= 0) rhi = std::min(rhi, ip + p.window_right + 1);
    buf.rhi[r] = rhi;
  }

  const float dot_mul = kVariants ? static_cast<float>(p.scale) : static_cast<float>(p.scale) * kLog2e;
  const float cap = static_cast<float>(p.softcap);
  for (int64_t j0 = k0; j0 < k1; j0 += bn) {
    const int64_t nb = std::min(bn, k1 - j0);
    // The rows of head hk; paged: through the pages of this block's keys and the next block's (what a pass asks
    // for ahead), looked up at the start of the block for all its passes (each key twice: as the next block's,
    // then as this block's; a few table reads per key against a division per row and pass).
    const int64_t looked = paged ? std::min(k1, j0 + 2 * bn) - j0 : 0;
    if (paged) {
      const int32_t* table = reinterpret_cast<const int32_t*>(p.block_table) + b * p.table_sb;
      page_lookup(table, p.table_sj, p.page_size, j0, j0 + looked, buf.pages, buf.slots);
    }
    const auto rows_of = [&](const Tensor4& t, int64_t hk) {
      CacheRows<T> c = cache_rows<T>(p, t, b, hk);
      c.pages = buf.pages, c.slots = buf.slots, c.from = j0, c.n = looked;
      return c;
    };
    const CacheRows<T> k_first = rows_of(p.k, hk0);
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t hk = hk0 + hh;
      const CacheRows<T> kc = rows_of(p.k, hk), vc = rows_of(p.v, hk);
      const CacheRows<T> k_next = rows_of(p.k, std::min(hk + 1, hk0 + nh - 1));
      const float* qf = buf.qf + hh * R * Ep;
      const float* slope = buf.slope + hh * R;
      float* hstate = state + hh * R * stride;
      block_rows(kc, p.k.se, E, j0, nb, buf.kst, buf.krows);
      // While the first row tile's scores are computed: the V rows of each key group, and the same keys' K rows
      // for the next pass (the item's next head, else its first head a block ahead): every row is asked for
      // about one pass ahead, whatever the layout. (Asking as well for the next block's whole key spans, when
      // heads are taken together, evicts rows still in use from L1.)
      const auto ahead = [&](int64_t j, int64_t m) {
        prefetch_rows(vc, p.v.se, Ev, j0 + j, m);
        if (hh + 1 < nh) {
          prefetch_rows(k_next, p.k.se, E, j0 + j, m);
        } else {
          const int64_t jn = j0 + bn + j;
          if (jn < k1) prefetch_rows(k_first, p.k.se, E, jn, std::min(m, k1 - jn));
        }
      };
      const auto nothing = [](int64_t, int64_t) {};
      for_row_tiles(R, [&](int64_t r0, auto nr) {
        constexpr int NR = decltype(nr)::value;
        float* s = buf.s + r0 * kBlockN;
        if (r0 == 0) block_dots<T, NR, kPaired>(qf, Ep, E, buf.krows, nb, dot_mul, s, ahead);
        else block_dots<T, NR, kPaired>(qf + r0 * Ep, Ep, E, buf.krows, nb, dot_mul, s, nothing);
      });
      for (int64_t r = 0; r < R; ++r) {
        float* s = buf.s + r * kBlockN;
        const int64_t i = r / G, ip = qbase + i;
        if constexpr (kVariants) {
          MaskView mv;
          if (p.mask_dtype != kNone) {
            const int64_t h = hk * G + r % G;
            mv.ptr = reinterpret_cast<const char*>(p.mask.ptr) + (b * p.mask.sb + h * p.mask.sh) * dtype_bytes(p.mask_dtype);
            mv.dtype = p.mask_dtype;
            mv.sl = p.mask.sl;
            mv.ss = p.mask.se;
          }
          for (int64_t j = 0; j < nb; ++j) {
            float x = s[j];
            if (cap > 0.f) x = cap * std::tanh(x / cap);
            if (p.alibi) x += slope[r] * static_cast<float>(j0 + j - ip);
            if (p.mask_dtype != kNone) x += mask_value<float>(mv, i, j0 + j, 1.f);
            s[j] = x * kLog2e;
          }
        }
        if (j0 < buf.rlo[r] || j0 + nb > buf.rhi[r]) {
          for (int64_t j = 0; j < nb; ++j)
            if (j0 + j < buf.rlo[r] || j0 + j >= buf.rhi[r]) s[j] = kNegInf;
        }
        for (int64_t j = nb; j < bw; ++j) s[j] = kNegInf;
        // Online softmax over the block.
        vf mx = simd::load(s);
        for (int64_t c = W; c < bw; c += W) mx = simd::max(mx, simd::load(s + c));
        float* st = hstate + r * stride;
        const float bm = simd::reduce_max(mx), m_old = st[0];
        const float m_new = bm > m_old ? bm : m_old;
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const vf mv = simd::set1(m_use);
        vf sum = simd::zero();
        for (int64_t c = 0; c < bw; c += W) {
          const vf e = simd::exp2(simd::sub(simd::load(s + c), mv));
          simd::store(s + c, e);
          sum = simd::add(sum, e);
        }
        const float alpha = std::exp2(m_old - m_use);
        buf.alpha[r] = alpha;
        st[0] = m_new;
        st[1] = st[1] * alpha + simd::reduce_add(sum);
      }
      block_rows(vc, p.v.se, Ev, j0, nb, buf.vst, buf.vrows);
      for_row_tiles(R, [&](int64_t r0, auto nr) {
        block_accumulate<T, decltype(nr)::value, kPaired>(hstate + r0 * stride + kStateHead, stride, Ev,
                                                          buf.s + r0 * kBlockN, buf.alpha + r0, buf.vrows, nb);
      });
    }
  }
}

// Writes out / lse of the R rows of (b, hk) from the states of its splits (split s's row r at
// states + s * split_stride + r * stride): M = max_s m_s (and the sink), l = sum_s 2^(m_s - M) l_s
// [+ 2^(sink - M)], out = sum_s 2^(m_s - M) acc_s / l, lse = (M + log2 l) ln 2, splits taken in order.
template <typename T, bool kPaired>
void merge_rows(const DecodeParams& p, int64_t b, int64_t hk, int64_t splits, const float* states,
                int64_t split_stride, float* tmp) {
  const int64_t G = p.H / p.Hk, R = G * p.L, Ev = p.Ev, Evp = round_up(Ev, W), stride = kStateHead + Evp;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = r / G, h = hk * G + r % G;
    float M = kNegInf;
    for (int64_t s = 0; s < splits; ++s) {
      const float m = states[s * split_stride + r * stride];
      M = m > M ? m : M;
    }
    const float sink = p.sinks ? reinterpret_cast<const float*>(p.sinks)[h] * kLog2e : kNegInf;
    if (p.sinks) M = sink > M ? sink : M;
    const float M_use = M == kNegInf ? 0.f : M;
    float l = 0.f;
    std::fill(tmp, tmp + Ev, 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const float* st = states + s * split_stride + r * stride;
      if (st[1] == 0.f) continue;  // no visible key in this split
      const float w = std::exp2(st[0] - M_use);
      l += w * st[1];
      for (int64_t e = 0; e < Ev; ++e) tmp[e] += w * st[kStateHead + e];
    }
    if (p.sinks) l += std::exp2(sink - M_use);
    const float inv = l == 0.f ? 0.f : 1.f / l;
    T* o = reinterpret_cast<T*>(p.out.ptr) + b * p.out.sb + h * p.out.sh + i * p.out.sl;
    for (int64_t e = 0; e < Ev; ++e) o[e * p.out.se] = from_f32<T>(tmp[kPaired ? paired(e) : e] * inv);
    float* lse = reinterpret_cast<float*>(p.lse.ptr) + b * p.lse.sb + h * p.lse.sh + i * p.lse.sl;
    *lse = l == 0.f ? kNegInf : (M_use + std::log2(l)) * kLn2;
  }
}

template <typename T, bool kVariants, bool kPaired>
void decode_typed(const DecodeParams& p) {
  const int64_t G = p.H / p.Hk, R = G * p.L, Evp = round_up(p.Ev, W), stride = kStateHead + Evp;
  // A work item is (b, a group of nh kv heads, split): every head of b at once when the cache stores them
  // side by side, else one.
  const int64_t nh = decode_heads_per_item(p), groups = p.Hk / nh;
  const int64_t splits = p.num_splits, items = p.B * groups * splits;
  const int64_t item_floats = R * stride, group_floats = nh * item_floats;
  if (splits == 1) {
    // Each item merges its own states in its own scratch.
    parallel_for(items, p.num_threads, [&](int64_t begin, int64_t end, int) {
      std::unique_ptr<float[]> mine(new float[static_cast<size_t>(group_floats + Evp)]);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t b = it / groups, hk0 = it % groups * nh;
        run_item<T, kVariants, kPaired>(p, b, hk0, nh, 0, mine.get());
        for (int64_t hh = 0; hh < nh; ++hh)
          merge_rows<T, kPaired>(p, b, hk0 + hh, 1, mine.get() + hh * item_floats, 0, mine.get() + group_floats);
      }
    }, 1);
    return;
  }
  // Item (b, group g, split s) leaves its heads' states at ((b * groups + g) * splits + s) * group_floats, head
  // by head: head hk0 + hh's split s at that place + hh * item_floats.
  std::unique_ptr<float[]> states(new float[static_cast<size_t>(items * group_floats)]);
  parallel_for(items, p.num_threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it % splits, bg = it / splits;
      run_item<T, kVariants, kPaired>(p, bg / groups, bg % groups * nh, nh, s, states.get() + it * group_floats);
    }
  }, 1);
  parallel_for(p.B * p.Hk, p.num_threads, [&](int64_t begin, int64_t end, int) {
    std::unique_ptr<float[]> tmp(new float[Evp + 1]);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bg = bh / nh, hh = bh % nh;  // bh = b * Hk + hk, and hk = g * nh + hh
      merge_rows<T, kPaired>(p, bh / p.Hk, bh % p.Hk, splits, states.get() + bg * splits * group_floats + hh * item_floats,
                             group_floats, tmp.get());
    }
  });
}

template <typename T>
void decode_dtype(const DecodeParams& p) {
  const bool variants = p.softcap > 0.0 || p.alibi != 0 || p.mask_dtype != kNone;
  if constexpr (kHavePairs && std::is_same<T, bf16_t>::value) {
    if (p.E % 16 == 0 && p.Ev % 16 == 0) {
      if (variants) decode_typed<T, true, true>(p);
      else decode_typed<T, false, true>(p);
      return;
    }
  }
  if (variants) decode_typed<T, true, false>(p);
  else decode_typed<T, false, false>(p);
}

}  // namespace

void check_decode_params(const DecodeParams& p) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("decode: " + what); };
  if (p.B < 0 || p.L < 0 || p.H < 0 || p.Hk < 1 || p.E < 0 || p.Ev < 0)
    fail("sizes must be non-negative and Hk >= 1");
  if (p.H % p.Hk != 0) fail("H must be a multiple of Hk");
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16) fail("dtype must be float32, float16 or bfloat16");
  if (p.mask_dtype != kNone && p.mask_dtype != kBool && p.mask_dtype != kF32 && p.mask_dtype != kF16 &&
      p.mask_dtype != kBF16 && p.mask_dtype != kF64)
    fail("mask dtype must be bool or floating");
  if (p.num_splits < 1) fail("num_splits must be >= 1");
  if (p.block_table != 0 && p.page_size < 1) fail("page_size must be >= 1");
  if (p.block_table != 0 && p.mask_dtype != kNone) fail("mask is supported with a contiguous cache only");
  if (p.seqlens == 0 && p.B > 0) fail("cache_seqlens is missing");
}

int64_t decode_heads_per_item(const DecodeParams& p) {
  const bool side_by_side = std::abs(p.k.sh) < std::abs(p.k.sl) || std::abs(p.v.sh) < std::abs(p.v.sl);
  return p.Hk > 1 && side_by_side ? p.Hk : 1;
}

int64_t decode_items(const DecodeParams& p) { return p.B * (p.Hk / decode_heads_per_item(p)); }

int64_t decode_num_splits(int64_t items, int64_t keys, int64_t heads, int threads) {
  const int64_t want = 4 * std::max(1, threads);
  if (items >= want) return 1;
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t h = std::max<int64_t>(1, heads);
  const int64_t rows = keys > std::numeric_limits<int64_t>::max() / h ? std::numeric_limits<int64_t>::max() : keys * h;
  return std::max<int64_t>(1, std::min({cdiv(want, std::max<int64_t>(1, items)), cdiv(rows, kDecodeMinSplitRows),
                                        kDecodeMaxSplits}));
}

int64_t decode_auto_splits(const DecodeParams& p, int64_t keys) {
  return decode_num_splits(decode_items(p), keys, decode_heads_per_item(p), p.num_threads);
}

void decode(const DecodeParams& p) {
  if (p.B * p.H * p.L == 0) return;
  switch (p.dtype) {
    case kF32: decode_dtype<float>(p); break;
    case kF16: decode_dtype<f16_t>(p); break;
    default: decode_dtype<bf16_t>(p); break;
  }
}

void register_decode(py::module_& m) {
  py::class_<DecodeParams>(m, "DecodeParams", "Arguments of a decode call (csrc/decode.h).")
      .def(py::init<>())
      .def_readwrite("q", &DecodeParams::q)
      .def_readwrite("k", &DecodeParams::k)
      .def_readwrite("v", &DecodeParams::v)
      .def_readwrite("out", &DecodeParams::out)
      .def_readwrite("lse", &DecodeParams::lse)
      .def_readwrite("mask", &DecodeParams::mask)
      .def_readwrite("dtype", &DecodeParams::dtype)
      .def_readwrite("mask_dtype", &DecodeParams::mask_dtype)
      .def_readwrite("B", &DecodeParams::B)
      .def_readwrite("H", &DecodeParams::H)
      .def_readwrite("Hk", &DecodeParams::Hk)
      .def_readwrite("L", &DecodeParams::L)
      .def_readwrite("E", &DecodeParams::E)
      .def_readwrite("Ev", &DecodeParams::Ev)
      .def_readwrite("seqlens", &DecodeParams::seqlens)
      .def_readwrite("block_table", &DecodeParams::block_table)
      .def_readwrite("table_sb", &DecodeParams::table_sb)
      .def_readwrite("table_sj", &DecodeParams::table_sj)
      .def_readwrite("page_size", &DecodeParams::page_size)
      .def_readwrite("alibi", &DecodeParams::alibi)
      .def_readwrite("alibi_sb", &DecodeParams::alibi_sb)
      .def_readwrite("alibi_sh", &DecodeParams::alibi_sh)
      .def_readwrite("sinks", &DecodeParams::sinks)
      .def_readwrite("scale", &DecodeParams::scale)
      .def_readwrite("softcap", &DecodeParams::softcap)
      .def_readwrite("causal", &DecodeParams::causal)
      .def_readwrite("window_left", &DecodeParams::window_left)
      .def_readwrite("window_right", &DecodeParams::window_right)
      .def_readwrite("num_splits", &DecodeParams::num_splits)
      .def_readwrite("num_threads", &DecodeParams::num_threads);
  m.def("decode_items", &decode_items, py::arg("params"), "The (b, kv heads) work items of a decode call, before key splits (csrc/decode.h).");
  m.def("decode_block_keys", [](const DecodeParams& p) { return block_keys(p, decode_heads_per_item(p)); },
        py::arg("params"), "Keys per block of the work items of decode call `params` (csrc/decode.cpp block_keys).");
  m.def("decode_num_splits", &decode_num_splits, py::arg("items"), py::arg("keys"), py::arg("heads"), py::arg("threads"),
        "The key-split rule of decode calls (csrc/decode.h).");
  m.def("decode_auto_splits", &decode_auto_splits, py::arg("params"), py::arg("keys"),
        "The key splits of decode call `params` (its items, heads per item and num_threads) over at most `keys` keys:\n"
        "the rule the launcher and the eager route share (csrc/decode.h).");
  m.def("decode_fwd",
        [](const DecodeParams& p) {
          check_decode_params(p);
          py::gil_scoped_release nogil;
          decode(p);
        },
        py::arg("params"),
        "Decoder attention: writes p.out (B,L,H,Ev) and p.lse (B,H,L) float32 from p.q and the KV cache p.k / p.v\n"
        "(contiguous or paged through p.block_table), keys j < seqlens[b] (see csrc/decode.cpp).");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
