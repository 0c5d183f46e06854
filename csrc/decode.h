// fastattn: the CPU decode kernel's arguments (DecodeParams): a few new query rows per sequence against a
// KV cache. The math is fastattn/reference/decode.py's; the algorithm is stated at the top of decode.cpp.
#pragma once

#include <cstdint>

#include "params.h"

namespace fastattn {
namespace FASTATTN_NS {

// Tensor4 views (fastattn/_cpu.py fills them; strides in elements, (b, h, i, e) = the fields sb, sh, sl, se):
//   q   (B, L, H, E)    as (b, h, i, e)
//   k   (B or pages, S_max or page, Hk, E)  as (b or page, kv head, key or slot, e); v likewise with Ev
//   out (B, L, H, Ev)   as (b, h, i, e)          lse (B, H, L) float32 as (b, h, i)
//   mask (B, H, L, S_max) as (b, h, i, j), stride 0 along broadcast dims
struct DecodeParams {
  Tensor4 q, k, v, out, lse, mask;
  int dtype = kF32;        // q / k / v / out
  int mask_dtype = kNone;  // kNone, kBool or a float code
  int64_t B = 0, H = 0, Hk = 0, L = 0, E = 0, Ev = 0;
  uintptr_t seqlens = 0;   // int32 (B,), contiguous
  // Paged cache: int32 block_table (B, max_blocks), row stride table_sb, column stride table_sj; 0 = contiguous.
  uintptr_t block_table = 0;
  int64_t table_sb = 0, table_sj = 0, page_size = 1;
  uintptr_t alibi = 0;     // float32 slopes, slope of (b, h) at alibi_sb * b + alibi_sh * h; 0 = none
  int64_t alibi_sb = 0, alibi_sh = 0;
  uintptr_t sinks = 0;     // float32 (H,), contiguous; 0 = none
  double scale = 1.0, softcap = 0.0;
  bool causal = true;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
  int64_t num_splits = 1;
  int num_threads = 1;
};

// ValueError (std::invalid_argument) on what would make the kernel read or write outside its tensors' views.
void check_decode_params(const DecodeParams& p);
// Writes p.out and p.lse.
void decode(const DecodeParams& p);
// kv heads per work item: all Hk when the cache stores a key's heads side by side (a head stride below the key
// stride: the (B, S, Hk, E) and paged layouts), so that a thread reads whole runs of memory; else 1.
int64_t decode_heads_per_item(const DecodeParams& p);
// The call's work items before key splits: B x (Hk / decode_heads_per_item).
int64_t decode_items(const DecodeParams& p);
// Key splits for `items` work items of `heads` kv heads each over at most `keys` keys on `threads` threads: none
// while the items give every thread ~4 to take (dynamic scheduling evens out the rest), else enough splits for
// that, each reading at least kDecodeMinSplitRows key rows (keys x the item's kv heads), at most
// kDecodeMaxSplits. The one copy of the rule: the Python launcher (fastattn/_cpu.py) and the eager route
// (eager.cpp) both call it, through decode_auto_splits.
constexpr int64_t kDecodeMinSplitRows = 1024, kDecodeMaxSplits = 64;
int64_t decode_num_splits(int64_t items, int64_t keys, int64_t heads, int threads);
// The rule for call p (its items, heads per item and p.num_threads) over at most `keys` keys.
int64_t decode_auto_splits(const DecodeParams& p, int64_t keys);

}  // namespace FASTATTN_NS
}  // namespace fastattn
