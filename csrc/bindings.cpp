// fastattn._C_<isa>: the CPU kernels of one instruction set (see setup.py), driven by fastattn/_cpu.py.
// Python fills a Params (addresses from tensor.data_ptr(), strides in elements) and calls fwd / bwd;
// the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include <string>
#include <tuple>

#include "forward.h"
#include "parallel.h"
#include "params.h"
#include "philox.h"
#include "register.h"

namespace py = pybind11;
using namespace fastattn::FASTATTN_NS;

namespace {

void bind_params(py::module_& m) {
  py::class_<Tensor4>(m, "Tensor4", "A strided 4-D view: address and element strides (b, h, i, e).")
      .def(py::init([](uintptr_t ptr, int64_t sb, int64_t sh, int64_t sl, int64_t se) {
             Tensor4 t;
             t.ptr = ptr; t.sb = sb; t.sh = sh; t.sl = sl; t.se = se;
             return t;
           }),
           py::arg("ptr"), py::arg("sb"), py::arg("sh"), py::arg("sl"), py::arg("se"))
      .def_readwrite("ptr", &Tensor4::ptr)
      .def_readwrite("sb", &Tensor4::sb)
      .def_readwrite("sh", &Tensor4::sh)
      .def_readwrite("sl", &Tensor4::sl)
      .def_readwrite("se", &Tensor4::se);
  py::class_<Params>(m, "Params", "Arguments of one kernel call (see csrc/params.h).")
      .def(py::init<>())
      .def_readwrite("q", &Params::q)
      .def_readwrite("k", &Params::k)
      .def_readwrite("v", &Params::v)
      .def_readwrite("out", &Params::out)
      .def_readwrite("lse", &Params::lse)
      .def_readwrite("mask", &Params::mask)
      .def_readwrite("dout", &Params::dout)
      .def_readwrite("dq", &Params::dq)
      .def_readwrite("dk", &Params::dk)
      .def_readwrite("dv", &Params::dv)
      .def_readwrite("dmask", &Params::dmask)
      .def_readwrite("out_lo", &Params::out_lo)
      .def_readwrite("dtype", &Params::dtype)
      .def_readwrite("mask_dtype", &Params::mask_dtype)
      .def_readwrite("dmask_dtype", &Params::dmask_dtype)
      .def_readwrite("B", &Params::B)
      .def_readwrite("H", &Params::H)
      .def_readwrite("Hk", &Params::Hk)
      .def_readwrite("L", &Params::L)
      .def_readwrite("S", &Params::S)
      .def_readwrite("E", &Params::E)
      .def_readwrite("Ev", &Params::Ev)
      .def_readwrite("scale", &Params::scale)
      .def_readwrite("is_causal", &Params::is_causal)
      .def_readwrite("causal_offset", &Params::causal_offset)
      .def_readwrite("dropout_p", &Params::dropout_p)
      .def_readwrite("thr", &Params::thr)
      .def_readwrite("seed", &Params::seed)
      .def_readwrite("num_threads", &Params::num_threads)
      .def_readwrite("cu_q", &Params::cu_q)
      .def_readwrite("cu_k", &Params::cu_k)
      .def_readwrite("window_left", &Params::window_left)
      .def_readwrite("window_right", &Params::window_right)
      .def_readwrite("softcap", &Params::softcap)
      .def_readwrite("alibi", &Params::alibi)
      .def_readwrite("alibi_sb", &Params::alibi_sb)
      .def_readwrite("alibi_sh", &Params::alibi_sh)
      .def_readwrite("sinks", &Params::sinks);
}

bool has_bf16_dot() {
#if defined(FASTATTN_HAVE_AVX512BF16)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(FASTATTN_MODULE, m) {
  m.doc() = "fastattn CPU attention kernels (" FASTATTN_ISA_NAME ")";
  bind_params(m);
  m.def("fwd_params", [](const Params& p) {
          check_forward_params(p);
          py::gil_scoped_release nogil;
          forward(p);
        },
        py::arg("params"),
        "Forward attention: writes p.out (B,H,L,Ev) and p.lse (B,H,L) float32 from p.q, p.k, p.v, p.mask\n"
        "(and p.out_lo, fp16 / bf16, when its address is set).");
  // The forward in one call: the launcher's per-call path (positional arguments instead of a Params object
  // and ~25 attribute writes). Tensors as (address, sb, sh, sl, se), mask and out_lo
  // address 0 = none; ints = (dtype, mask_dtype, B, H, Hk, L, S, E, Ev, is_causal, dropout threshold,
  // num_threads, causal_offset).
  m.def("fwd_views",
        [](const std::array<int64_t, 5>& q, const std::array<int64_t, 5>& k, const std::array<int64_t, 5>& v,
           const std::array<int64_t, 5>& mask, const std::array<int64_t, 5>& out,
           const std::array<int64_t, 5>& out_lo, const std::array<int64_t, 5>& lse,
           const std::array<int64_t, 13>& ints, double scale, double dropout_p, uint64_t seed) {
          auto t4 = [](const std::array<int64_t, 5>& a) {
            Tensor4 t;
            t.ptr = static_cast<uintptr_t>(a[0]);
            t.sb = a[1]; t.sh = a[2]; t.sl = a[3]; t.se = a[4];
            return t;
          };
          Params p;
          p.q = t4(q); p.k = t4(k); p.v = t4(v); p.mask = t4(mask); p.out = t4(out); p.out_lo = t4(out_lo);
          p.lse = t4(lse);
          p.dtype = static_cast<int>(ints[0]);
          p.mask_dtype = static_cast<int>(ints[1]);
          p.B = ints[2]; p.H = ints[3]; p.Hk = ints[4]; p.L = ints[5]; p.S = ints[6]; p.E = ints[7]; p.Ev = ints[8];
          p.is_causal = ints[9] != 0;
          p.thr = static_cast<uint32_t>(ints[10]);
          p.num_threads = static_cast<int>(ints[11]);
          p.causal_offset = ints[12];
          p.scale = scale;
          p.dropout_p = dropout_p;
          p.seed = seed;
          check_forward_params(p);
          py::gil_scoped_release nogil;
          forward(p);
        },
        "fwd with the Params fields passed positionally (see fastattn/_cpu.py).");
  m.def("isa", [] { return std::make_tuple(std::string(FASTATTN_ISA_NAME), has_bf16_dot()); },
        "(instruction set name, whether AVX512-BF16 dot-product instructions are compiled in)");
  m.def("pool", [] { return std::string(pool_name()); },
        "Thread pool parallel work runs on now: \"openmp\" (torch's OpenMP threads) or \"own\".");
  m.def("pool_rescue_probe",
        [](int64_t items, int64_t stall_us, int64_t item_us) {
          // items items on the own pool with two threads (grain 1): item 0 sleeps stall_us (a thread that lost
          // its CPU for that long), the others spin item_us each.
          ThreadPool& pool = get_pool();
          std::vector<std::atomic<int>> ran(static_cast<size_t>(std::max<int64_t>(items, 0)));
          cpu_set_t before, after;
          if (sched_getaffinity(0, sizeof(before), &before) != 0) throw std::runtime_error("sched_getaffinity");
          const int64_t rescues0 = pool.rescues();
          {
            py::gil_scoped_release nogil;
            if (!pool.try_acquire()) throw std::runtime_error("pool_rescue_probe: the pool is busy");
            struct Release {
              ThreadPool& p;
              ~Release() { p.release(); }
            } release{pool};
            struct Ctx {
              std::vector<std::atomic<int>>* ran;
              int64_t stall_us, item_us;
            } ctx{&ran, stall_us, item_us};
            pool.run(items, 2, 1, &ctx, [](void* c, int64_t b, int64_t e, int) {
              const Ctx& x = *static_cast<Ctx*>(c);
              for (int64_t i = b; i < e; ++i) {
                if (i == 0) std::this_thread::sleep_for(std::chrono::microseconds(x.stall_us));
                else spin_until([] { return false; }, x.item_us);
                (*x.ran)[static_cast<size_t>(i)].fetch_add(1);
              }
            });
          }
          if (sched_getaffinity(0, sizeof(after), &after) != 0) throw std::runtime_error("sched_getaffinity");
          std::vector<int> counts;
          for (auto& r : ran) counts.push_back(r.load());
          return py::dict(py::arg("rescues") = pool.rescues() - rescues0, py::arg("ran") = counts,
                          py::arg("affinity_kept") = CPU_EQUAL(&before, &after) != 0);
        },
        py::arg("items"), py::arg("stall_us"), py::arg("item_us"),
        "Runs a loop on the own pool in which one item stalls (for tests of ThreadPool::rescue): returns the "
        "rescues it made, how often each item ran, and whether the caller's affinity is what it was before.");
  m.def("philox_words_row",
        [](uint64_t seed, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) {
          std::vector<uint32_t> w(static_cast<size_t>(std::max<int64_t>(n, 0)));
          dropout_words_row(seed, b, h, i, j0, n, w.data());
          return py::bytes(reinterpret_cast<const char*>(w.data()), w.size() * 4);
        },
        "The kernels' Philox words of (b, h, i, j0..j0+n) as little-endian uint32 bytes (for tests).");
  register_backward(m);
  register_additive(m);
  register_hard(m);
  register_eager(m);
  register_decode(m);
}
