// fastattn: per-thread scratch memory of the CPU kernels.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

#include "isa.h"

namespace fastattn {
namespace FASTATTN_NS {

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

}  // namespace FASTATTN_NS
}  // namespace fastattn
