// fastattn CPU forward: tile sizes, the blocking of one call into work items, and each thread's buffers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "params.h"
#include "scratch.h"
#include "simd.h"

namespace fastattn {
namespace FASTATTN_NS {
namespace {  // forward.cpp's own: this header is included there only

using simd::vf;
using simd::W;

// Scores are kept in base 2 (exp2 in the loop): s = scale * log2(e) * <q, k> + log2(e) * mask.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A work item is one (b, h) and BM query rows, processed in groups of QG = QV vectors of queries; a key
// block is BN keys, scored kNR keys at a time (forward_microkernels.h).
constexpr int QV = 2;           // query vectors per group
constexpr int QG = QV * W;      // queries per group
constexpr int kMaxBM = 8 * QG;  // most query rows per work item
#if defined(FASTATTN_HAVE_AVX512)
constexpr int kNR = 12;         // keys per score micro-tile (kNR x QV accumulators)
constexpr int kAccBudget = 24;  // accumulators of the PV micro-tile
#elif defined(FASTATTN_HAVE_AVX2)
constexpr int kNR = 6;
constexpr int kAccBudget = 8;
#else
constexpr int kNR = 4;
constexpr int kAccBudget = 8;
#endif

struct Blocking {
  int64_t BM = 0;   // query rows per work item (multiple of QG)
  int64_t BN = 0;   // keys per key block (multiple of kNR, even)
  int64_t nqb = 0;  // query blocks per (b, h)
  int64_t Evp = 0;  // Ev rounded up to W
  int64_t E2 = 0;   // ceil(E / 2) (bf16 pairs)
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

Blocking choose_blocking(const Params& p) {
  Blocking c;
  // Large query blocks amortise the per-key-block work (V packing, mask tiles); small enough to keep
  // every thread busy: at least ~4 items per thread when the heads alone do not provide them.
  int64_t bm = std::min<int64_t>(round_up(p.L, QG), kMaxBM);
  const int64_t want = 4 * static_cast<int64_t>(std::max(1, p.num_threads));
  while (bm > QG && p.B * p.H * ((p.L + bm - 1) / bm) < want) bm -= QG;
  c.BM = bm;
  c.nqb = (p.L + bm - 1) / bm;
  // Sequences up to 11 tiles of keys run as one key block (then PV can store the output rows itself, see
  // OutRows); longer ones in blocks of 8 tiles.
  c.BN = p.S <= 11 * kNR ? std::max<int64_t>(kNR, round_up(p.S, kNR)) : 8 * kNR;
  c.Evp = round_up(p.Ev, W);
  c.E2 = (p.E + 1) / 2;
  return c;
}

// One thread's buffers for the work items of a call (carved from its thread_scratch by plan_item_buffers).
struct ItemBuffers {
  float* qt = nullptr;     // fp32 Q^T: [BM/QG][E][QG]          (bf16 path: uint32 pairs [BM/QG][E2][QG])
  float* kc = nullptr;     // converted K tile [BN][E]           (bf16 path: uint16 [BN][2*E2])
  float* vc = nullptr;     // converted V tile [BN][Evp]         (bf16 path: uint32 pairs [BN/2][Evp])
  float* st = nullptr;     // scores / probabilities S^T [BN][QG]
  uint32_t* pp = nullptr;  // bf16 path: P^T pairs [BN/2][QG]
  float* mt = nullptr;     // mask tile, transposed [BN][BM]
  float* o = nullptr;      // output accumulators [BM][Evp]
  float* m = nullptr;      // running max (base 2) [BM]
  float* l = nullptr;      // running sum [BM]
  float* alpha = nullptr;  // rescale factors of the current key block [BM]
  uint32_t* words = nullptr;  // dropout words [4][QG]
};

// Lays the buffers out in a (a null base only sizes them); returns the bytes needed.
size_t plan_item_buffers(const Params& p, const Blocking& c, Arena& a, ItemBuffers& b) {
  b.qt = a.take<float>(static_cast<size_t>(c.BM * std::max(p.E, 2 * c.E2)));
  b.kc = a.take<float>(static_cast<size_t>(c.BN * (p.E + 2)));
  b.vc = a.take<float>(static_cast<size_t>(c.BN * c.Evp));
  b.st = a.take<float>(static_cast<size_t>(c.BN * QG));
  b.pp = a.take<uint32_t>(static_cast<size_t>(c.BN / 2 * QG));
  b.mt = a.take<float>(static_cast<size_t>(c.BN * c.BM));
  b.o = a.take<float>(static_cast<size_t>(c.BM * c.Evp));
  b.m = a.take<float>(static_cast<size_t>(c.BM));
  b.l = a.take<float>(static_cast<size_t>(c.BM));
  b.alpha = a.take<float>(static_cast<size_t>(c.BM));
  b.words = a.take<uint32_t>(static_cast<size_t>(4 * QG));
  return a.off + 64;
}

}  // namespace
}  // namespace FASTATTN_NS
}  // namespace fastattn
