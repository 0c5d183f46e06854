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
// views, scale, threads and key splits (decode_auto_splits), so the results are bit-identical. The other calls
// run the attention kernel, as the attention op would.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
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
  PyObject* int32 = nullptr;        // torch.int32, torch.int64: kvcache_fwd's lengths and block table
  PyObject* int64 = nullptr;
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

// Codes of the integer dtypes kvcache_fwd reads (beyond DType's).
constexpr int kI32 = 16, kI64 = 17;

// What eager_fwd reads of one tensor. nd <= 4; size / stride hold the last nd dims.
struct View {
  int nd = 0;
  int64_t size[4] = {}, stride[4] = {};
  uintptr_t ptr = 0;
  int dtype = kNone;
};

// Reads t if it is a plain strided CPU torch.Tensor of at most 4 dims (and no gradient is wanted of it) of a
// DType (or, with ints, int32 / int64).
bool read_tensor(PyObject* t, bool grad, View& v, bool ints = false) {
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
  if (ints && dtype.ptr() == T.int32) v.dtype = kI32;
  if (ints && dtype.ptr() == T.int64) v.dtype = kI64;
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

// True when no tracing, dispatch mode or functorch transform is active (what functional._plain_eager_inference
// checks); grad = torch.is_grad_enabled().
bool plain_dispatch(int& grad) {
  const TorchRefs* T = g_torch;
  grad = call_bool(T->grad_enabled);
  if (grad < 0 || call_bool(T->tracing) != 0 || call_bool(T->functorch_active) != 0) return false;
  py::object n = steal(PyObject_CallNoArgs(T->dispatch_modes));
  if (!n || !PyLong_Check(n.ptr()) || PyLong_AsLong(n.ptr()) != 0) {
    PyErr_Clear();
    return false;
  }
  return true;
}

int get_num_threads() {
  py::object n = steal(PyObject_CallNoArgs(g_torch->num_threads));
  if (!n) throw py::error_already_set();
  return static_cast<int>(PyLong_AsLong(n.ptr()));
}

// o is exactly the str s (not a subclass).
bool is_str(py::handle o, const char* s) {
  return PyUnicode_CheckExact(o.ptr()) && PyUnicode_CompareWithASCIIString(o.ptr(), s) == 0;
}

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
  if (!backend.is_none() && !is_str(backend, "cpu")) return py::none();
  int grad = 0;
  if (!plain_dispatch(grad)) return py::none();
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
  p.num_threads = get_num_threads();
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

// An exact Python int (not a bool) that fits int64.
bool exact_int(PyObject* o, int64_t& x) {
  if (!PyLong_CheckExact(o)) return false;
  bool ok = true;
  x = as_int(o, ok);
  return ok;
}

// An exact float, or an exact int, as a double (Python's float(x) of the values the Python path accepts).
bool exact_real(PyObject* o, double& x) {
  if (PyFloat_CheckExact(o)) {
    x = PyFloat_AS_DOUBLE(o);
    return true;
  }
  int64_t i = 0;
  if (!exact_int(o, i) || i > (int64_t{1} << 53) || i < -(int64_t{1} << 53)) return false;
  x = static_cast<double>(i);
  return true;
}

// The view with dims 1 and 2 swapped.
View swap12(View v) {
  std::swap(v.size[1], v.size[2]);
  std::swap(v.stride[1], v.stride[2]);
  return v;
}

// [first, last + 1) byte range of a view's elements (torch strides are >= 0); empty for an empty view.
std::pair<uintptr_t, uintptr_t> byte_range(const View& v, int64_t elem) {
  int64_t far = 0;
  for (int d = 0; d < v.nd; ++d) {
    if (v.size[d] == 0) return {v.ptr, v.ptr};
    far += (v.size[d] - 1) * v.stride[d];
  }
  return {v.ptr, v.ptr + static_cast<uintptr_t>((far + 1) * elem)};
}

bool overlap(const View& a, const View& b, int64_t elem) {
  const auto x = byte_range(a, elem), y = byte_range(b, elem);
  return x.first < x.second && y.first < y.second && x.first < y.second && y.first < x.second;
}

// fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table, scale, causal, window,
// softcap, sinks, alibi_slopes, layout, return_lse, num_splits, backend) for plain eager CPU calls: the same
// checks, append and decode call as the Python path (fastattn/kvcache.py: views in (B, L, H, E) order, the
// launcher's DecodeParams as fastattn/_cpu.py _decode_fwd fills them, the same key splits), so the results
// are bit-identical. None for anything else, invalid arguments included: every check runs before the first
// write, and the Python path then raises with its message. Takes sinks / alibi_slopes only as float32 (the
// kernel's type; the Python path converts others).
py::object kvcache_fwd(py::handle q_, py::handle kc_, py::handle vc_, py::handle seqlens_, py::handle kn_,
                       py::handle vn_, py::handle table_, py::handle scale_, py::handle causal_, py::handle window_,
                       py::handle softcap_, py::handle sinks_, py::handle alibi_, py::handle layout_,
                       py::handle return_lse_, py::handle num_splits_, py::handle backend_) {
  const TorchRefs* T = g_torch;
  if (T == nullptr) return py::none();
  // Scalars, as fastattn/_validation.py accepts them.
  const bool bhsd = is_str(layout_, "bhsd");
  if (!bhsd && !is_str(layout_, "bshd")) return py::none();
  if (!is_bool(causal_.ptr()) || !is_bool(return_lse_.ptr())) return py::none();
  if (!backend_.is_none() && !is_str(backend_, "cpu")) return py::none();
  double scale = 0.0, softcap = 0.0;
  if (!scale_.is_none() && !(exact_real(scale_.ptr(), scale) && std::isfinite(scale))) return py::none();
  if (!exact_real(softcap_.ptr(), softcap) || !std::isfinite(softcap) || softcap < 0.0) return py::none();
  int64_t window[2] = {-1, -1};
  {
    PyObject* w = window_.ptr();
    const bool seq = PyTuple_CheckExact(w) || PyList_CheckExact(w);
    if (!seq || PySequence_Fast_GET_SIZE(w) != 2) return py::none();
    for (int i = 0; i < 2; ++i) {
      // Bounds far past any cache, so that window_left + L below cannot overflow.
      if (!exact_int(PySequence_Fast_GET_ITEM(w, i), window[i]) || window[i] < -1 || window[i] > (int64_t{1} << 60))
        return py::none();
    }
  }
  int64_t num_splits = 0;
  if (!num_splits_.is_none() && !(exact_int(num_splits_.ptr(), num_splits) && num_splits >= 1)) return py::none();
  int grad = 0;
  if (!plain_dispatch(grad)) return py::none();

  // Tensors: plain CPU tensors, and nothing that needs a gradient while grad mode is on.
  View q, kc, vc, kn, vn, table, lens_t, sinks, alibi;
  if (!read_tensor(q_.ptr(), grad, q) || !read_tensor(kc_.ptr(), grad, kc) || !read_tensor(vc_.ptr(), grad, vc))
    return py::none();
  if (q.nd != 4 || kc.nd != 4 || vc.nd != 4) return py::none();
  if (q.dtype != kF32 && q.dtype != kF16 && q.dtype != kBF16) return py::none();
  if (kc.dtype != q.dtype || vc.dtype != q.dtype) return py::none();
  const bool append = !kn_.is_none();
  if (append != !vn_.is_none()) return py::none();
  if (append) {
    if (!read_tensor(kn_.ptr(), grad, kn) || !read_tensor(vn_.ptr(), grad, vn)) return py::none();
    if (kn.nd != 4 || vn.nd != 4 || kn.dtype != q.dtype || vn.dtype != q.dtype) return py::none();
  }
  const bool paged = !table_.is_none();
  if (paged && (!read_tensor(table_.ptr(), grad, table, true) || table.nd != 2 || table.dtype != kI32))
    return py::none();
  // Everything below works on (B, L, H, E)-ordered views.
  if (bhsd) {
    q = swap12(q);
    if (!paged) kc = swap12(kc), vc = swap12(vc);
    if (append) kn = swap12(kn), vn = swap12(vn);
  }
  const int64_t B = q.size[0], L = q.size[1], H = q.size[2], E = q.size[3];
  const int64_t Hk = kc.size[2], Ev = vc.size[3];
  if (B == 0 || L == 0 || H == 0) return py::none();
  if (kc.size[0] != vc.size[0] || kc.size[1] != vc.size[1] || kc.size[2] != vc.size[2] || kc.size[3] != E)
    return py::none();
  if (Hk == 0 || H % Hk != 0 || E < 1 || E > 256 || Ev < 1 || Ev > 256) return py::none();
  int64_t page = 0, num_blocks = 0, capacity = 0;
  if (paged) {
    if (table.size[0] != B || kc.size[1] < 1) return py::none();
    page = kc.size[1];
    num_blocks = kc.size[0];
    if (__builtin_mul_overflow(table.size[1], page, &capacity)) return py::none();
  } else {
    if (kc.size[0] != B) return py::none();
    capacity = kc.size[1];
  }
  int64_t L_new = 0;
  if (append) {
    L_new = kn.size[1];
    if (kn.size[0] != B || kn.size[2] != Hk || kn.size[3] != E) return py::none();
    if (vn.size[0] != B || vn.size[1] != L_new || vn.size[2] != Hk || vn.size[3] != Ev) return py::none();
  }
  const int64_t elem = q.dtype == kF32 ? 4 : 2;
  if (!sinks_.is_none()) {  // float32 (H,): the kernel reads sinks[h]
    if (!read_tensor(sinks_.ptr(), grad, sinks) || sinks.nd != 1 || sinks.dtype != kF32 || sinks.size[0] != H ||
        (H > 1 && sinks.stride[0] != 1))
      return py::none();
  }
  if (!alibi_.is_none()) {  // float32 (H,) or (B, H)
    if (!read_tensor(alibi_.ptr(), grad, alibi) || alibi.dtype != kF32) return py::none();
    if (!(alibi.nd == 1 && alibi.size[0] == H) && !(alibi.nd == 2 && alibi.size[0] == B && alibi.size[1] == H))
      return py::none();
  }

  // The lengths before appending: each >= 0 with room for L_new more keys, and the block-table entries of the
  // pages each sequence uses after appending inside the pool.
  std::vector<int32_t> seqlens(static_cast<size_t>(B));
  std::vector<int64_t> before(static_cast<size_t>(B));
  {
    int64_t n_all = 0;
    const bool one = exact_int(seqlens_.ptr(), n_all);
    if (!one) {
      if (!read_tensor(seqlens_.ptr(), grad, lens_t, true) || lens_t.nd != 1 || lens_t.size[0] != B ||
          (lens_t.dtype != kI32 && lens_t.dtype != kI64))
        return py::none();
    }
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = n_all;
      if (!one) {
        const uintptr_t at = lens_t.ptr + static_cast<uintptr_t>(b * lens_t.stride[0] * (lens_t.dtype == kI32 ? 4 : 8));
        n = lens_t.dtype == kI32 ? *reinterpret_cast<const int32_t*>(at) : *reinterpret_cast<const int64_t*>(at);
      }
      if (n < 0 || n > capacity - L_new || n + L_new > std::numeric_limits<int32_t>::max()) return py::none();
      before[static_cast<size_t>(b)] = n;
      seqlens[static_cast<size_t>(b)] = static_cast<int32_t>(n + L_new);
    }
  }
  const int32_t* tab = paged ? reinterpret_cast<const int32_t*>(table.ptr) : nullptr;
  if (paged) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t used = (seqlens[static_cast<size_t>(b)] + page - 1) / page;
      for (int64_t j = 0; j < used; ++j) {
        const int32_t e = tab[b * table.stride[0] + j * table.stride[1]];
        if (e < 0 || e >= num_blocks) return py::none();
      }
    }
  }
  if (append) {
    // Caches whose elements share memory (a size > 1 dim of stride 0, an expanded tensor): torch's indexed write
    // warns there; the Python path decides.
    for (const View* c : {&kc, &vc})
      for (int d = 0; d < 4; ++d)
        if (c->size[d] > 1 && c->stride[d] == 0) return py::none();
    // The new rows must not share memory with the caches they are written into (the Python path's index_put
    // decides what that means; this entry leaves it to it).
    if (overlap(kn, kc, elem) || overlap(kn, vc, elem) || overlap(vn, kc, elem) || overlap(vn, vc, elem))
      return py::none();
  }

  // Append: cache[b, n_b + t] = new[b, t] (through the block table when paged), k first, then v.
  if (append && L_new > 0) {
    auto write = [&](const View& cache, const View& nw, int64_t D) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < L_new; ++t) {
          const int64_t pos = before[static_cast<size_t>(b)] + t;
          const int64_t first = paged ? static_cast<int64_t>(tab[b * table.stride[0] + (pos / page) * table.stride[1]]) : b;
          const int64_t slot = paged ? pos % page : pos;
          for (int64_t h = 0; h < Hk; ++h) {
            char* dst = reinterpret_cast<char*>(cache.ptr) + (first * cache.stride[0] + slot * cache.stride[1] + h * cache.stride[2]) * elem;
            const char* src = reinterpret_cast<const char*>(nw.ptr) + (b * nw.stride[0] + t * nw.stride[1] + h * nw.stride[2]) * elem;
            if (cache.stride[3] == 1 && nw.stride[3] == 1) {
              std::memcpy(dst, src, static_cast<size_t>(D * elem));
            } else {
              for (int64_t e = 0; e < D; ++e) std::memcpy(dst + e * cache.stride[3] * elem, src + e * nw.stride[3] * elem, static_cast<size_t>(elem));
            }
          }
        }
      }
    };
    write(kc, kn, E);
    write(vc, vn, Ev);
  }

  // The launcher's call (fastattn/_cpu.py _decode_fwd): out "bshd" (B, L, H, Ev) or "bhsd" (B, H, L, Ev)
  // contiguous, lse (B, H, L) float32; (b, h, i, e) views.
  auto bhie = [](const View& v) {
    Tensor4 t;
    t.ptr = v.ptr;
    t.sb = v.stride[0]; t.sh = v.stride[2]; t.sl = v.stride[1]; t.se = v.stride[3];
    return t;
  };
  DecodeParams d;
  d.q = bhie(q); d.k = bhie(kc); d.v = bhie(vc);
  py::object out = steal(PyObject_CallMethodObjArgs(
      q_.ptr(), T->s_new_empty, (bhsd ? py::make_tuple(B, H, L, Ev) : py::make_tuple(B, L, H, Ev)).ptr(), nullptr));
  if (!out) throw py::error_already_set();
  d.out.ptr = data_ptr(out.ptr());
  d.out.sb = H * L * Ev; d.out.se = 1;
  if (bhsd) d.out.sh = L * Ev, d.out.sl = Ev;
  else d.out.sh = Ev, d.out.sl = H * Ev;
  py::object lse;
  std::vector<float> lse_scratch;
  if (return_lse_.ptr() == Py_True) {
    py::object fn = steal(PyObject_GetAttr(q_.ptr(), T->s_new_empty));
    if (!fn) throw py::error_already_set();
    lse = steal(PyObject_Call(fn.ptr(), py::make_tuple(py::make_tuple(B, H, L)).ptr(), T->lse_kwargs));
    if (!lse) throw py::error_already_set();
    d.lse.ptr = data_ptr(lse.ptr());
  } else {
    lse_scratch.resize(static_cast<size_t>(B * H * L));
    d.lse.ptr = reinterpret_cast<uintptr_t>(lse_scratch.data());
  }
  d.lse.sb = H * L; d.lse.sh = L; d.lse.sl = 1;
  d.dtype = q.dtype;
  d.B = B; d.H = H; d.Hk = Hk; d.L = L; d.E = E; d.Ev = Ev;
  d.seqlens = reinterpret_cast<uintptr_t>(seqlens.data());
  if (paged) {
    d.block_table = table.ptr;
    d.table_sb = table.stride[0]; d.table_sj = table.stride[1];
    d.page_size = page;
  }
  if (!alibi_.is_none()) {
    d.alibi = alibi.ptr;
    d.alibi_sb = alibi.nd == 2 ? alibi.stride[0] : 0;
    d.alibi_sh = alibi.stride[alibi.nd - 1];
  }
  if (!sinks_.is_none()) d.sinks = sinks.ptr;
  d.scale = scale_.is_none() ? 1.0 / std::sqrt(static_cast<double>(E)) : scale;
  d.softcap = softcap;
  d.causal = causal_.ptr() == Py_True;
  d.window_left = window[0]; d.window_right = window[1];
  d.num_threads = get_num_threads();
  d.num_splits = num_splits_.is_none()
                     ? decode_auto_splits(d, window[0] >= 0 ? std::min(capacity, window[0] + L) : capacity)
                     : num_splits;
  check_decode_params(d);  // the checks above imply it: a failure here is an internal error
  {
    py::gil_scoped_release nogil;
    decode(d);
  }
  if (lse) return py::make_tuple(out, lse);
  return out;
}

void eager_init(py::handle tensor_type, py::tuple dtypes, py::tuple int_dtypes, py::handle strided,
                py::handle grad_enabled, py::handle tracing, py::handle dispatch_modes, py::handle functorch_active,
                py::handle num_threads) {
  if (dtypes.size() != 5) throw std::invalid_argument("eager_init: dtypes must be (bool, f32, f16, bf16, f64)");
  if (int_dtypes.size() != 2) throw std::invalid_argument("eager_init: int_dtypes must be (int32, int64)");
  auto keep = [](py::handle h) {
    h.inc_ref();
    return h.ptr();
  };
  auto* t = new TorchRefs();  // never freed: the references live as long as the module
  t->tensor_type = keep(tensor_type);
  const int codes[5] = {kBool, kF32, kF16, kBF16, kF64};
  for (int i = 0; i < 5; ++i) t->dtypes[codes[i]] = keep(dtypes[static_cast<size_t>(i)]);
  t->int32 = keep(int_dtypes[0]);
  t->int64 = keep(int_dtypes[1]);
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
  m.def("kvcache_fwd", &kvcache_fwd,
        "fastattn.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table, scale, causal,\n"
        "window, softcap, sinks, alibi_slopes, layout, return_lse, num_splits, backend) for plain eager CPU calls;\n"
        "None for any other case, invalid ones included (nothing is then written).");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
