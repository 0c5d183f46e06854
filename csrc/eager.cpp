// fastattn._C_<isa>.eager_fwd: fastattn.scaled_dot_product_attention's plain eager inference call, read
// straight from the Python objects.
//
// The Python path (checks, 4-D views, backend choice, two allocations, a tuple per tensor) costs more than
// a small kernel call, most of all right after a kernel has evicted the interpreter from the caches. This
// entry does the same work through the CPython API. It never raises for bad input: it returns None for every
// case it does not take, invalid ones included, so that the Python path runs and fastattn/functional.py's
// checks, the one source of error messages, raise them. It raises only for internal errors (a torch call
// that fails, an allocation). No torch headers: the torch objects it compares against arrive once, through
// eager_init (fastattn/_cpu.py).
//
// Decode-shaped calls (fastattn/functional.py decode_route: L <= 16 query rows against S >= 4 L keys, fp16 /
// bf16 / fp32, E, Ev <= 256) run the decode kernel (decode.cpp) exactly as the Python decode route has the
// launcher run it (fastattn/functional.py _decode, fastattn/_cpu.py _decode_fwd): every sequence of length
// n = L for top-left is_causal (the keys past L, which no row sees, are never read) and S otherwise, the same
// views, scale, threads and key splits (decode_num_splits), so the results are bit-identical. The other calls
// run the attention kernel, as the attention op would.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "decode.h"
#include "forward.h"
#include "params.h"
#include "register.h"

namespace py = pybind11;

namespace fastattn {
namespace FASTATTN_NS {
namespace {

// The torch objects eager_fwd needs (new references, kept for the life of the process).
struct TorchRefs {
  PyObject* tensor_type = nullptr;  // torch.Tensor: subclasses (and fake / functional tensors) take the Python path
  PyObject* dtypes[6] = {};         // indexed by DType: torch.bool, float32, float16, bfloat16, float64
  PyObject* strided = nullptr;      // torch.strided
  PyObject* grad_enabled = nullptr;       // torch.is_grad_enabled
  PyObject* tracing = nullptr;            // torch._C._is_tracing
  PyObject* dispatch_modes = nullptr;     // torch._C._len_torch_dispatch_stack
  PyObject* functorch_active = nullptr;   // torch._C._are_functorch_transforms_active
  PyObject* num_threads = nullptr;        // torch.get_num_threads
  PyObject* lse_kwargs = nullptr;         // {"dtype": torch.float32}
  PyObject *s_shape, *s_stride, *s_data_ptr, *s_dtype, *s_layout, *s_is_cpu, *s_requires_grad, *s_new_empty,
      *s_new_empty_strided;
};
TorchRefs* g_torch = nullptr;

// A new reference as a py::object (null stays null: the Python error is then pending).
py::object steal(PyObject* o) { return py::reinterpret_steal<py::object>(o); }

// 1 / 0 for f() True / False; -1 (error cleared) for anything else.
int call_bool(PyObject* f) {
  py::object r = steal(PyObject_CallNoArgs(f));
  if (!r) {
    PyErr_Clear();
    return -1;
  }
  return r.ptr() == Py_True ? 1 : r.ptr() == Py_False ? 0 : -1;
}

int64_t as_int(PyObject* o, bool& ok) {
  const long long x = PyLong_AsLongLong(o);
  if (x == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    ok = false;
  }
  return x;
}

// What eager_fwd reads of one tensor. nd <= 4; size / stride hold the last nd dims.
struct View {
  int nd = 0;
  int64_t size[4] = {}, stride[4] = {};
  uintptr_t ptr = 0;
  int dtype = kNone;
};

// Reads t if it is a plain strided CPU torch.Tensor of at most 4 dims (and no gradient is wanted of it).
bool read_tensor(PyObject* t, bool grad, View& v) {
  const TorchRefs& T = *g_torch;
  if (Py_TYPE(t) != reinterpret_cast<PyTypeObject*>(T.tensor_type)) return false;
  py::object is_cpu = steal(PyObject_GetAttr(t, T.s_is_cpu));
  py::object layout = steal(PyObject_GetAttr(t, T.s_layout));
  py::object dtype = steal(PyObject_GetAttr(t, T.s_dtype));
  if (!is_cpu || !layout || !dtype) {
    PyErr_Clear();
    return false;
  }
  if (is_cpu.ptr() != Py_True || layout.ptr() != T.strided) return false;
  v.dtype = kNone;
  for (int c = kBool; c <= kF64; ++c)
    if (dtype.ptr() == T.dtypes[c]) v.dtype = c;
  if (v.dtype == kNone) return false;
  if (grad) {
    py::object rg = steal(PyObject_GetAttr(t, T.s_requires_grad));
    if (!rg) PyErr_Clear();
    if (rg.ptr() != Py_False) return false;
  }
  py::object shape = steal(PyObject_GetAttr(t, T.s_shape));
  py::object stride = steal(PyObject_CallMethodNoArgs(t, T.s_stride));
  py::object ptr = steal(PyObject_CallMethodNoArgs(t, T.s_data_ptr));
  if (!shape || !stride || !ptr || !PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr())) {
    PyErr_Clear();
    return false;
  }
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
  if (nd > 4 || PyTuple_GET_SIZE(stride.ptr()) != nd) return false;
  bool ok = true;
  v.nd = static_cast<int>(nd);
  for (Py_ssize_t d = 0; d < nd; ++d) {
    v.size[d] = as_int(PyTuple_GET_ITEM(shape.ptr(), d), ok);
    v.stride[d] = as_int(PyTuple_GET_ITEM(stride.ptr(), d), ok);
  }
  v.ptr = static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(ptr.ptr()));
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return ok;
}

// torch's is_non_overlapping_and_dense for a 4-D view: taken in increasing stride order, every dim of size > 1
// has as stride the product of the sizes before it (the elements tile one block of memory exactly).
bool non_overlapping_and_dense(const View& v) {
  int perm[4] = {0, 1, 2, 3};
  std::stable_sort(perm, perm + 4, [&](int a, int b) { return v.stride[a] < v.stride[b]; });
  int64_t expect = 1;
  for (int d : perm) {
    if (v.size[d] < 2) continue;
    if (v.stride[d] != expect) return false;
    expect *= v.size[d];
  }
  return true;
}

// t.data_ptr() of a tensor this entry allocated.
uintptr_t data_ptr(PyObject* t) {
  py::object ptr = steal(PyObject_CallMethodNoArgs(t, g_torch->s_data_ptr));
  if (!ptr) throw py::error_already_set();
  const unsigned long long x = PyLong_AsUnsignedLongLong(ptr.ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  return static_cast<uintptr_t>(x);
}

Tensor4 t4(const View& v) {
  Tensor4 t;
  t.ptr = v.ptr;
  t.sb = v.stride[0]; t.sh = v.stride[1]; t.sl = v.stride[2]; t.se = v.stride[3];
  return t;
}

bool is_bool(PyObject* o) { return o == Py_True || o == Py_False; }

// The arguments of fastattn.scaled_dot_product_attention; None unless every one of them is of the plain
// kind this entry takes: 4-D q / k / v of one float dtype, no dropout, nothing empty, no autograd, tracing,
// dispatch mode or functorch transform, backend None or "cpu".
py::object eager_fwd(py::handle query, py::handle key, py::handle value, py::handle attn_mask, py::handle dropout_p,
                     py::handle is_causal, py::handle scale, py::handle enable_gqa, py::handle backend,
                     py::handle return_lse) {
  const TorchRefs* T = g_torch;
  if (T == nullptr) return py::none();
  // Scalars: the exact types the Python path's fast check accepts (anything else: its checks and errors).
  if (!PyFloat_CheckExact(dropout_p.ptr()) || PyFloat_AS_DOUBLE(dropout_p.ptr()) != 0.0) return py::none();
  if (!is_bool(is_causal.ptr()) || !is_bool(enable_gqa.ptr()) || !is_bool(return_lse.ptr())) return py::none();
  double sc = 0.0;
  if (!scale.is_none()) {
    if (!PyFloat_CheckExact(scale.ptr())) return py::none();
    sc = PyFloat_AS_DOUBLE(scale.ptr());
    if (!std::isfinite(sc)) return py::none();
  }
  if (!backend.is_none() &&
      !(PyUnicode_CheckExact(backend.ptr()) && PyUnicode_CompareWithASCIIString(backend.ptr(), "cpu") == 0))
    return py::none();
  // What functional._plain_eager_inference checks.
  const int grad = call_bool(T->grad_enabled);
  if (grad < 0 || call_bool(T->tracing) != 0 || call_bool(T->functorch_active) != 0) return py::none();
  {
    py::object n = steal(PyObject_CallNoArgs(T->dispatch_modes));
    if (!n || !PyLong_Check(n.ptr()) || PyLong_AsLong(n.ptr()) != 0) {
      PyErr_Clear();
      return py::none();
    }
  }
  View q, k, v, m;
  if (!read_tensor(query.ptr(), grad, q) || !read_tensor(key.ptr(), grad, k) || !read_tensor(value.ptr(), grad, v))
    return py::none();
  if (q.nd != 4 || k.nd != 4 || v.nd != 4 || q.dtype == kBool || k.dtype != q.dtype || v.dtype != q.dtype)
    return py::none();
  const int64_t B = q.size[0], H = q.size[1], L = q.size[2], E = q.size[3];
  const int64_t Hk = k.size[1], S = k.size[2], Ev = v.size[3];
  if (k.size[0] != B || v.size[0] != B || v.size[1] != Hk || v.size[2] != S || k.size[3] != E) return py::none();
  if (B == 0 || H == 0 || Hk == 0 || L == 0 || S == 0 || E == 0 || Ev == 0) return py::none();
  if (enable_gqa.ptr() == Py_True ? H % Hk != 0 : H != Hk) return py::none();
  Params p;
  p.q = t4(q); p.k = t4(k); p.v = t4(v);
  p.dtype = q.dtype;
  if (!attn_mask.is_none()) {
    if (!read_tensor(attn_mask.ptr(), grad, m)) return py::none();
    if (m.dtype != kBool && m.dtype != kF32 && m.dtype != q.dtype) return py::none();
    // Broadcast to (B, H, L, S): dims right-aligned, a size-1 or missing dim read with stride 0.
    const int64_t full[4] = {B, H, L, S};
    int64_t st[4] = {0, 0, 0, 0};
    for (int d = 0; d < m.nd; ++d) {
      const int fd = 4 - m.nd + d;
      if (m.size[d] != full[fd] && m.size[d] != 1) return py::none();
      st[fd] = m.size[d] == 1 ? 0 : m.stride[d];
    }
    p.mask.ptr = m.ptr;
    p.mask.sb = st[0]; p.mask.sh = st[1]; p.mask.sl = st[2]; p.mask.se = st[3];
    p.mask_dtype = m.dtype;
  }
  // decode_route's shape and dtype rule (the grad, dropout, tracing and backend parts are checked above).
  const bool decode_shaped = L <= 16 && S >= 4 * L && E <= 256 && Ev <= 256 &&
                             (q.dtype == kF32 || q.dtype == kF16 || q.dtype == kBF16);
  p.B = B; p.H = H; p.Hk = Hk; p.L = L; p.S = S; p.E = E; p.Ev = Ev;
  p.scale = scale.is_none() ? 1.0 / std::sqrt(static_cast<double>(E)) : sc;
  p.is_causal = is_causal.ptr() == Py_True;
  {
    py::object n = steal(PyObject_CallNoArgs(T->num_threads));
    if (!n) throw py::error_already_set();
    p.num_threads = static_cast<int>(PyLong_AsLong(n.ptr()));
  }
  // out (B, H, L, Ev) laid out as fastattn._ops.empty_output lays it out: with q's strides (torch.empty_like of a
  // dense q) when Ev == E and q's head dim has unit stride, else contiguous. A q that is not dense would need
  // torch's stride inference: the Python path does that.
  int64_t ost[4] = {H * L * Ev, L * Ev, Ev, 1};
  if (Ev == E && q.stride[3] == 1) {
    if (!non_overlapping_and_dense(q)) return py::none();
    for (int d = 0; d < 4; ++d) ost[d] = q.stride[d];
  }
  py::object out = steal(PyObject_CallMethodObjArgs(query.ptr(), T->s_new_empty_strided,
                                                    py::make_tuple(B, H, L, Ev).ptr(),
                                                    py::make_tuple(ost[0], ost[1], ost[2], ost[3]).ptr(), nullptr));
  if (!out) throw py::error_already_set();
  p.out.ptr = data_ptr(out.ptr());
  p.out.sb = ost[0]; p.out.sh = ost[1]; p.out.sl = ost[2]; p.out.se = ost[3];
  py::object lse;
  if (return_lse.ptr() == Py_True) {
    py::object fn = steal(PyObject_GetAttr(query.ptr(), T->s_new_empty));
    if (!fn) throw py::error_already_set();
    lse = steal(PyObject_Call(fn.ptr(), py::make_tuple(py::make_tuple(B, H, L)).ptr(), T->lse_kwargs));
    if (!lse) throw py::error_already_set();
    p.lse.ptr = data_ptr(lse.ptr());  // contiguous (B, H, L)
    p.lse.sb = H * L; p.lse.sh = L; p.lse.sl = 1;
  }  // else p.lse.ptr = 0: the kernel skips the lse
  if (decode_shaped) {
    DecodeParams d;
    d.q = p.q; d.k = p.k; d.v = p.v; d.out = p.out;
    d.mask = p.mask;
    d.mask_dtype = p.mask_dtype;
    d.dtype = p.dtype;
    d.B = B; d.H = H; d.Hk = Hk; d.L = L; d.E = E; d.Ev = Ev;
    // Lower-right causal over the first n keys places row i at n - L + i: n = L is is_causal's top-left row i.
    const std::vector<int32_t> seqlens(static_cast<size_t>(B), static_cast<int32_t>(p.is_causal ? L : S));
    d.seqlens = reinterpret_cast<uintptr_t>(seqlens.data());
    std::vector<float> lse_scratch;  // the kernel always writes the lse
    if (lse) {
      d.lse = p.lse;
    } else {
      lse_scratch.resize(static_cast<size_t>(B * H * L));
      d.lse.ptr = reinterpret_cast<uintptr_t>(lse_scratch.data());
      d.lse.sb = H * L; d.lse.sh = L; d.lse.sl = 1;
    }
    d.scale = p.scale;
    d.causal = p.is_causal;
    d.num_threads = p.num_threads;
    d.num_splits = decode_auto_splits(d, S);  // the launcher's keys: the cache's S
    try {
      check_decode_params(d);
    } catch (const std::invalid_argument&) {
      return py::none();
    }
    {
      py::gil_scoped_release nogil;
      decode(d);
    }
    if (lse) return py::make_tuple(out, lse);
    return out;
  }
  if (forward_params_error(p) != nullptr) return py::none();  // declined, never raised: Python names the problem
  {
    py::gil_scoped_release nogil;
    forward(p);
  }
  if (lse) return py::make_tuple(out, lse);
  return out;
}

void eager_init(py::handle tensor_type, py::tuple dtypes, py::handle strided, py::handle grad_enabled,
                py::handle tracing, py::handle dispatch_modes, py::handle functorch_active, py::handle num_threads) {
  if (dtypes.size() != 5) throw std::invalid_argument("eager_init: dtypes must be (bool, f32, f16, bf16, f64)");
  auto keep = [](py::handle h) {
    h.inc_ref();
    return h.ptr();
  };
  auto* t = new TorchRefs();  // never freed: the references live as long as the module
  t->tensor_type = keep(tensor_type);
  const int codes[5] = {kBool, kF32, kF16, kBF16, kF64};
  for (int i = 0; i < 5; ++i) t->dtypes[codes[i]] = keep(dtypes[static_cast<size_t>(i)]);
  t->strided = keep(strided);
  t->grad_enabled = keep(grad_enabled);
  t->tracing = keep(tracing);
  t->dispatch_modes = keep(dispatch_modes);
  t->functorch_active = keep(functorch_active);
  t->num_threads = keep(num_threads);
  py::dict kw;
  kw["dtype"] = dtypes[1];
  t->lse_kwargs = keep(kw);
  auto name = [](const char* s) { return PyUnicode_InternFromString(s); };
  t->s_shape = name("shape");
  t->s_stride = name("stride");
  t->s_data_ptr = name("data_ptr");
  t->s_dtype = name("dtype");
  t->s_layout = name("layout");
  t->s_is_cpu = name("is_cpu");
  t->s_requires_grad = name("requires_grad");
  t->s_new_empty = name("new_empty");
  t->s_new_empty_strided = name("new_empty_strided");
  g_torch = t;
}

}  // namespace

void register_eager(py::module_& m) {
  m.def("eager_init", &eager_init, "Hands eager_fwd the torch objects it compares against (fastattn/_cpu.py).");
  m.def("eager_fwd", &eager_fwd,
        "fastattn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,\n"
        "enable_gqa, backend, return_lse) for plain eager CPU inference calls; None for any other case.");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
