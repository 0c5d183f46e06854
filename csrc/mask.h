// fastattn: reading attention masks (bool or additive float, broadcast through stride 0).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "convert.h"
#include "params.h"

namespace fastattn {
namespace FASTATTN_NS {

// The mask of one (b, h): element (i, j) at ptr + i*sl + j*ss (either stride may be 0 = broadcast); ss is
// the mask Tensor4's last-dim stride (se).
struct MaskView {
  const void* ptr = nullptr;
  int dtype = kNone;
  int64_t sl = 0, ss = 0;
};

inline MaskView mask_view(const Params& p, int64_t b, int64_t h) {
  MaskView m;
  if (p.mask_dtype == kNone) return m;
  m.ptr = reinterpret_cast<const char*>(p.mask.ptr) + (b * p.mask.sb + h * p.mask.sh) * dtype_bytes(p.mask_dtype);
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

// [first, end): the keys of [0, kend) that a query-broadcast mask row (sl == 0) leaves visible, trimmed at
// both ends (interior hidden keys stay inside). Masks that vary per query give [0, kend). first == end: none.
inline std::pair<int64_t, int64_t> visible_key_range(const MaskView& m, int64_t kend) {
  if (m.dtype == kNone || m.sl != 0 || kend <= 0) return {0, kend};
  auto visible = [&](int64_t j) {
    if (m.dtype == kBool) return static_cast<const uint8_t*>(m.ptr)[j * m.ss] != 0;
    return mask_value<double>(m, 0, j, 1.0) != -std::numeric_limits<double>::infinity();
  };
  if (m.ss == 0) return visible(0) ? std::make_pair(int64_t(0), kend) : std::make_pair(int64_t(0), int64_t(0));
  int64_t first = 0, end = kend;
  if (m.dtype == kBool && m.ss == 1) {
    const uint8_t* row = static_cast<const uint8_t*>(m.ptr);
    while (first < end && row[first] == 0) ++first;
    while (end > first && row[end - 1] == 0) --end;
    return {first, end};
  }
  while (first < end && !visible(first)) ++first;
  while (end > first && !visible(end - 1)) --end;
  return {first, end};
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
