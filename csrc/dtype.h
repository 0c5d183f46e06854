// fastattn: element dtype codes and the 16-bit storage types.
#pragma once

#include <cstdint>

#include "isa.h"

namespace fastattn {
namespace FASTATTN_NS {

// Element dtype codes shared with fastattn/_cpu.py (DTYPE_CODES there).
enum DType : int { kNone = 0, kBool = 1, kF32 = 2, kF16 = 3, kBF16 = 4, kF64 = 5 };

// Bytes per element of a dtype code (kNone: 2, never read).
inline int64_t dtype_bytes(int dt) { return dt == kBool ? 1 : dt == kF32 ? 4 : dt == kF64 ? 8 : 2; }

// 16-bit storage types (bit patterns only; arithmetic is done in fp32).
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

}  // namespace FASTATTN_NS
}  // namespace fastattn
