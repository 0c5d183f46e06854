// fastattn CPU additive (Bahdanau) attention kernels, driven by fastattn/additive.py.
//
//   s_ij = sum_d w[h,d] * tanh(q[b,h,i,d] + k[b,h,j,d]) + mask_ij     (no scale; causal: j <= i)
//   p_ij = softmax_j(s_ij)   (rows with no visible key: p = 0, lse = -inf)      out_i = sum_j p_ij v_j
//
// Backward (t_ijd = tanh(q_id + k_jd), Delta_i = dout_i . out_i):
//   dP_ij = dout_i . v_j    dS_ij = p_ij (dP_ij - Delta_i)
//   dq_id = w_d sum_j dS_ij (1 - t_ijd^2)    dk_jd = w_d sum_i dS_ij (1 - t_ijd^2)
//   dv_j  = sum_i p_ij dout_i                dw_d  = sum_ij dS_ij t_ijd
//
// Memory grows with L + S, never L x S: each query row (forward, dq pass) or key column (dk/dv pass)
// recomputes its scores in a per-thread buffer of S (or L) scores and D x S (or D x L) tanh values.
// Inputs are first copied into fp32 (fp64 for float64 inputs) buffers in the layout the vector loops
// want (K^T, Q^T, V, V^T, dout, dout^T), padded by one vector so tails need no masked loads.
// The backward is deterministic: dq and the per-row weight-gradient partials come from a pass over
// query rows, dk and dv from a pass over key columns (no shared accumulators), and dw is the sum of
// the row partials in a fixed order (b, then i) in double. Same inputs give the same bits for any
// thread count. Float64 inputs compute in double throughout, with each row's lse recomputed exactly.
#include <pybind11/pybind11.h>

#include <string>

#include "convert.h"
#include "mask.h"
#include "parallel.h"
#include "params.h"
#include "register.h"
#include "scratch.h"
#include "simd.h"

namespace py = pybind11;

namespace fastattn {
namespace FASTATTN_NS {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------- vector tanh
// tanh on fp32 lanes, max relative error ~2e-7 (Cephes tanhf): |x| < 0.625: x + x^3 P(x^2) (minimax);
// else sign(x) (1 - 2 / (e^{2|x|} + 1)), with |x| clamped to 9 (tanh(9) rounds to 1 in fp32).
#if defined(FASTATTN_HAVE_AVX512)
FASTATTN_INLINE simd::vf v_abs(simd::vf x) { return _mm512_abs_ps(x); }
FASTATTN_INLINE simd::vf v_min(simd::vf a, simd::vf b) { return _mm512_min_ps(a, b); }
// a / b by the 14-bit reciprocal estimate and one Newton step (relative error ~1e-8; b >= 2 here).
FASTATTN_INLINE simd::vf v_div(simd::vf a, simd::vf b) {
  const __m512 r = _mm512_rcp14_ps(b);
  return _mm512_mul_ps(a, _mm512_fmadd_ps(_mm512_fnmadd_ps(b, r, _mm512_set1_ps(1.0f)), r, r));
}
FASTATTN_INLINE simd::vf v_copysign(simd::vf mag, simd::vf sgn) {
  return _mm512_or_ps(mag, _mm512_and_ps(sgn, _mm512_set1_ps(-0.0f)));
}
// a < b ? x : y
FASTATTN_INLINE simd::vf v_select_lt(simd::vf a, simd::vf b, simd::vf x, simd::vf y) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}
#elif defined(FASTATTN_HAVE_AVX2)
FASTATTN_INLINE simd::vf v_abs(simd::vf x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
FASTATTN_INLINE simd::vf v_min(simd::vf a, simd::vf b) { return _mm256_min_ps(a, b); }
// a / b by the 12-bit reciprocal estimate and one Newton step (relative error ~1e-7; b >= 2 here).
FASTATTN_INLINE simd::vf v_div(simd::vf a, simd::vf b) {
  const __m256 r = _mm256_rcp_ps(b);
  return _mm256_mul_ps(a, _mm256_fmadd_ps(_mm256_fnmadd_ps(b, r, _mm256_set1_ps(1.0f)), r, r));
}
FASTATTN_INLINE simd::vf v_copysign(simd::vf mag, simd::vf sgn) {
  return _mm256_or_ps(mag, _mm256_and_ps(sgn, _mm256_set1_ps(-0.0f)));
}
FASTATTN_INLINE simd::vf v_select_lt(simd::vf a, simd::vf b, simd::vf x, simd::vf y) {
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}
#elif defined(__GNUC__)
FASTATTN_INLINE simd::vf v_abs(simd::vf x) { simd::vf r; r.v = x.v < 0.f ? -x.v : x.v; return r; }
FASTATTN_INLINE simd::vf v_min(simd::vf a, simd::vf b) { simd::vf r; r.v = a.v < b.v ? a.v : b.v; return r; }
FASTATTN_INLINE simd::vf v_div(simd::vf a, simd::vf b) { simd::vf r; r.v = a.v / b.v; return r; }
FASTATTN_INLINE simd::vf v_copysign(simd::vf mag, simd::vf sgn) {
  simd::vf r; r.v = sgn.v < 0.f ? -mag.v : mag.v; return r;
}
FASTATTN_INLINE simd::vf v_select_lt(simd::vf a, simd::vf b, simd::vf x, simd::vf y) {
  simd::vf r; r.v = a.v < b.v ? x.v : y.v; return r;
}
#else
#define FASTATTN_SCALAR_TANH 1
#endif

#if defined(FASTATTN_SCALAR_TANH)
FASTATTN_INLINE simd::vf v_tanh(simd::vf x) {
  for (int l = 0; l < simd::W; ++l) x.v[l] = std::tanh(x.v[l]);
  return x;
}
#else
FASTATTN_INLINE simd::vf v_tanh(simd::vf x) {
  using namespace simd;
  const vf ax = v_min(v_abs(x), set1(9.0f));
  // small |x|
  const vf z = mul(x, x);
  vf p = set1(-5.70498872745e-3f);
  p = fmadd(p, z, set1(2.06390887954e-2f));
  p = fmadd(p, z, set1(-5.37397155531e-2f));
  p = fmadd(p, z, set1(1.33314422036e-1f));
  p = fmadd(p, z, set1(-3.33332819422e-1f));
  const vf small = fmadd(mul(p, z), x, x);
  // large |x|
  const vf e = exp2<5>(mul(ax, set1(2.0f * kLog2e)));
  const vf big = sub(set1(1.0f), v_div(set1(2.0f), add(e, set1(1.0f))));
  return v_select_lt(ax, set1(0.625f), small, v_copysign(big, x));
}
#endif

// ------------------------------------------------------------------------------ compute precisions
// One algorithm, two lane types: fp32 SIMD vectors (float/bf16/f16 inputs) and scalar double
// (float64 inputs: exact math, for gradcheck).
struct OpsF {
  using Sc = float;
  using V = simd::vf;
  static constexpr int W = simd::W;
  static FASTATTN_INLINE V zero() { return simd::zero(); }
  static FASTATTN_INLINE V set1(float x) { return simd::set1(x); }
  static FASTATTN_INLINE V load(const float* p) { return simd::load(p); }
  static FASTATTN_INLINE void store(float* p, V x) { simd::store(p, x); }
  static FASTATTN_INLINE V add(V a, V b) { return simd::add(a, b); }
  static FASTATTN_INLINE V sub(V a, V b) { return simd::sub(a, b); }
  static FASTATTN_INLINE V mul(V a, V b) { return simd::mul(a, b); }
  static FASTATTN_INLINE V fmadd(V a, V b, V c) { return simd::fmadd(a, b, c); }
  static FASTATTN_INLINE V tanh(V x) { return v_tanh(x); }
  // e^x (x <= 0 here; -inf gives 0)
  static FASTATTN_INLINE V exp(V x) { return simd::exp2<5>(simd::mul(x, simd::set1(kLog2e))); }
  static FASTATTN_INLINE float reduce_add(V a) { return simd::reduce_add(a); }
};

struct OpsD {
  using Sc = double;
  using V = double;
  static constexpr int W = 1;
  static FASTATTN_INLINE V zero() { return 0.0; }
  static FASTATTN_INLINE V set1(double x) { return x; }
  static FASTATTN_INLINE V load(const double* p) { return *p; }
  static FASTATTN_INLINE void store(double* p, V x) { *p = x; }
  static FASTATTN_INLINE V add(V a, V b) { return a + b; }
  static FASTATTN_INLINE V sub(V a, V b) { return a - b; }
  static FASTATTN_INLINE V mul(V a, V b) { return a * b; }
  static FASTATTN_INLINE V fmadd(V a, V b, V c) { return a * b + c; }
  static FASTATTN_INLINE V tanh(V x) { return std::tanh(x); }
  static FASTATTN_INLINE V exp(V x) { return std::exp(x); }
  static FASTATTN_INLINE double reduce_add(V a) { return a; }
};

FASTATTN_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The inputs in the layouts the loops read (per (b, h): offsets bh * size).
template <typename Sc>
struct Prepared {
  int64_t Lp = 0, Sp = 0, Evp = 0;    // padded lengths
  std::vector<Sc> kT, v;              // K^T (D, Sp), V (S, Evp)
  std::vector<Sc> qT, vT, dout, doT;  // backward: Q^T (D, Lp), V^T (Ev, Sp), dout (L, Evp), dout^T (Ev, Lp)
  std::vector<Sc> lse, delta;         // backward: (Lp): lse (dead / padded rows +inf), Delta_i
};

// s[j] = sum_d w_d tanh(x_d + yT[d, j]) for j in [j0, j1) (vector steps from j0; yT padded by W), and
// t[d * ts + j] = tanh(...) when t != nullptr.
template <typename O>
FASTATTN_INLINE void scores_vec(const typename O::Sc* x, const typename O::Sc* yT, int64_t ys, const typename O::Sc* w,
                                int64_t D, int64_t j0, int64_t j1, typename O::Sc* s, typename O::Sc* t, int64_t ts) {
  using V = typename O::V;
  for (int64_t j = j0; j < j1; j += O::W) {
    V acc = O::zero();
    for (int64_t d = 0; d < D; ++d) {
      const V th = O::tanh(O::add(O::set1(x[d]), O::load(yT + d * ys + j)));
      if (t != nullptr) O::store(t + d * ts + j, th);
      acc = O::fmadd(O::set1(w[d]), th, acc);
    }
    O::store(s + j, acc);
  }
}

// sum_e x[e] * cols[e * cs + (0, W)]: W dot products against one vector x, four independent FMA chains.
template <typename O>
FASTATTN_INLINE typename O::V dot_cols(const typename O::Sc* x, const typename O::Sc* cols, int64_t cs, int64_t n) {
  using V = typename O::V;
  V a0 = O::zero(), a1 = O::zero(), a2 = O::zero(), a3 = O::zero();
  int64_t e = 0;
  for (; e + 3 < n; e += 4) {
    a0 = O::fmadd(O::set1(x[e]), O::load(cols + e * cs), a0);
    a1 = O::fmadd(O::set1(x[e + 1]), O::load(cols + (e + 1) * cs), a1);
    a2 = O::fmadd(O::set1(x[e + 2]), O::load(cols + (e + 2) * cs), a2);
    a3 = O::fmadd(O::set1(x[e + 3]), O::load(cols + (e + 3) * cs), a3);
  }
  for (; e < n; ++e) a0 = O::fmadd(O::set1(x[e]), O::load(cols + e * cs), a0);
  return O::add(O::add(a0, a1), O::add(a2, a3));
}

// acc[0, Evp) += sum_{u < n} p[u] * rows[u * Evp + (0, Evp)]  (Evp a multiple of W). Register accumulators,
// two rows per step (independent FMA chains), Ev in chunks of up to four vectors.
template <typename O, int NV>
FASTATTN_INLINE void pv_chunk(const typename O::Sc* p, const typename O::Sc* rows, int64_t n, int64_t Evp,
                              typename O::Sc* acc) {
  using V = typename O::V;
  V a0[NV], a1[NV];
  for (int c = 0; c < NV; ++c) a0[c] = a1[c] = O::zero();
  int64_t u = 0;
  for (; u + 1 < n; u += 2) {
    const V p0 = O::set1(p[u]), p1 = O::set1(p[u + 1]);
    const typename O::Sc* r0 = rows + u * Evp;
    for (int c = 0; c < NV; ++c) {
      a0[c] = O::fmadd(p0, O::load(r0 + c * O::W), a0[c]);
      a1[c] = O::fmadd(p1, O::load(r0 + Evp + c * O::W), a1[c]);
    }
  }
  if (u < n) {
    const V p0 = O::set1(p[u]);
    for (int c = 0; c < NV; ++c) a0[c] = O::fmadd(p0, O::load(rows + u * Evp + c * O::W), a0[c]);
  }
  for (int c = 0; c < NV; ++c) O::store(acc + c * O::W, O::add(O::load(acc + c * O::W), O::add(a0[c], a1[c])));
}

template <typename O>
void pv_accumulate(const typename O::Sc* p, const typename O::Sc* rows, int64_t n, int64_t Evp,
                   typename O::Sc* acc) {
  for (int64_t e0 = 0; e0 < Evp; e0 += 4 * O::W) {
    switch (std::min<int64_t>(4, (Evp - e0) / O::W)) {
      case 4: pv_chunk<O, 4>(p, rows + e0, n, Evp, acc + e0); break;
      case 3: pv_chunk<O, 3>(p, rows + e0, n, Evp, acc + e0); break;
      case 2: pv_chunk<O, 2>(p, rows + e0, n, Evp, acc + e0); break;
      default: pv_chunk<O, 1>(p, rows + e0, n, Evp, acc + e0); break;
    }
  }
}

// ------------------------------------------------------------------------------------------ forward
template <typename T, typename O>
void forward_impl(const Params& p, const typename O::Sc* w) {
  using Sc = typename O::Sc;
  using V = typename O::V;
  constexpr int W = O::W;
  const int64_t B = p.B, H = p.H, L = p.L, S = p.S, D = p.E, Ev = p.Ev;
  const int64_t Sp = round_up(S, W) + W, Evp = round_up(Ev, W);
  const int nt = std::max(1, p.num_threads);
  std::vector<Sc> kT(static_cast<size_t>(B * H * D * Sp), Sc(0)), vb(static_cast<size_t>(B * H * S * Evp), Sc(0));
  parallel_for(B * H, nt, [&](int64_t b0, int64_t b1, int) {
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Sc* kt = kT.data() + bh * D * Sp;
      Sc* vv = vb.data() + bh * S * Evp;
      for (int64_t j = 0; j < S; ++j) {
        const T* kr = p.k.at<T>(b, h, j);
        for (int64_t d = 0; d < D; ++d) kt[d * Sp + j] = to_acc<Sc>(kr[d * p.k.se]);
        const T* vr = p.v.at<T>(b, h, j);
        for (int64_t e = 0; e < Ev; ++e) vv[j * Evp + e] = to_acc<Sc>(vr[e * p.v.se]);
      }
    }
  }, 1);

  std::vector<Scratch> scratch(static_cast<size_t>(nt));
  const Sc ninf = -std::numeric_limits<Sc>::infinity();
  parallel_for(B * H * L, nt, [&](int64_t r0, int64_t r1, int tid) {
    Sc* buf = static_cast<Sc*>(scratch[static_cast<size_t>(tid)].get(static_cast<size_t>(Sp + Evp + D) * sizeof(Sc)));
    Sc* s = buf;
    Sc* acc = buf + Sp;
    Sc* qr = acc + Evp;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / L, i = r % L, b = bh / H, h = bh % H;
      const Sc* kt = kT.data() + bh * D * Sp;
      const Sc* vv = vb.data() + bh * S * Evp;
      const T* qp = p.q.at<T>(b, h, i);
      for (int64_t d = 0; d < D; ++d) qr[d] = to_acc<Sc>(qp[d * p.q.se]);
      const int64_t jend = p.is_causal ? std::min(S, i + 1) : S;
      float* lse = p.lse.at<float>(b, h, i);
      T* out = p.out.at<T>(b, h, i);
      Sc m = ninf;
      if (jend > 0) {
        scores_vec<O>(qr, kt, Sp, w + h * D, D, 0, jend, s, nullptr, 0);
        const MaskView mv = mask_view(p, b, h);
        if (mv.dtype != kNone)
          for (int64_t j = 0; j < jend; ++j) s[j] += mask_value<Sc>(mv, i, j, Sc(1));
        for (int64_t j = 0; j < jend; ++j) m = std::max(m, s[j]);
      }
      if (m == ninf) {  // no visible key
        for (int64_t e = 0; e < Ev; ++e) out[e * p.out.se] = from_acc<T>(Sc(0));
        *lse = -std::numeric_limits<float>::infinity();
        continue;
      }
      const int64_t jv = round_up(jend, W);
      for (int64_t j = jend; j < jv; ++j) s[j] = ninf;
      V vl = O::zero();
      const V vm = O::set1(m);
      for (int64_t j = 0; j < jv; j += W) {
        const V e = O::exp(O::sub(O::load(s + j), vm));
        O::store(s + j, e);
        vl = O::add(vl, e);
      }
      const Sc l = O::reduce_add(vl);
      for (int64_t e = 0; e < Evp; e += W) O::store(acc + e, O::zero());
      pv_accumulate<O>(s, vv, jend, Evp, acc);
      const Sc inv = Sc(1) / l;
      for (int64_t e = 0; e < Ev; ++e) out[e * p.out.se] = from_acc<T>(acc[e] * inv);
      *lse = static_cast<float>(m + std::log(l));
    }
  });
}

// ----------------------------------------------------------------------------------------- backward
template <typename T, typename O>
void backward_impl(const Params& p, const typename O::Sc* w, typename O::Sc* dw) {
  using Sc = typename O::Sc;
  using V = typename O::V;
  constexpr int W = O::W;
  const int64_t B = p.B, H = p.H, L = p.L, S = p.S, D = p.E, Ev = p.Ev;
  const int64_t Sp = round_up(S, W) + W, Lp = round_up(L, W) + W, Evp = round_up(Ev, W);
  const int nt = std::max(1, p.num_threads);
  const Sc inf = std::numeric_limits<Sc>::infinity();
  auto alloc = [](int64_t n, Sc fill) { return std::vector<Sc>(static_cast<size_t>(n), fill); };
  std::vector<Sc> kT = alloc(B * H * D * Sp, 0), qT = alloc(B * H * D * Lp, 0), vb = alloc(B * H * S * Evp, 0),
                  vT = alloc(B * H * Ev * Sp, 0), dob = alloc(B * H * L * Evp, 0), doT = alloc(B * H * Ev * Lp, 0),
                  lse = alloc(B * H * Lp, inf), delta = alloc(B * H * Lp, 0), dwp = alloc(B * H * L * D, 0);
  // Lse rows of -inf (no visible key) become +inf: e^(s - lse) is then 0 for every key, padding too.
  parallel_for(B * H, nt, [&](int64_t b0, int64_t b1, int) {
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      Sc* kt = kT.data() + bh * D * Sp;
      Sc* vv = vb.data() + bh * S * Evp;
      Sc* vt = vT.data() + bh * Ev * Sp;
      for (int64_t j = 0; j < S; ++j) {
        const T* kr = p.k.at<T>(b, h, j);
        for (int64_t d = 0; d < D; ++d) kt[d * Sp + j] = to_acc<Sc>(kr[d * p.k.se]);
        const T* vr = p.v.at<T>(b, h, j);
        for (int64_t e = 0; e < Ev; ++e) vt[e * Sp + j] = vv[j * Evp + e] = to_acc<Sc>(vr[e * p.v.se]);
      }
      Sc* qt = qT.data() + bh * D * Lp;
      Sc* dd = dob.data() + bh * L * Evp;
      Sc* dt = doT.data() + bh * Ev * Lp;
      Sc* ls = lse.data() + bh * Lp;
      Sc* dl = delta.data() + bh * Lp;
      for (int64_t i = 0; i < L; ++i) {
        const T* qr = p.q.at<T>(b, h, i);
        for (int64_t d = 0; d < D; ++d) qt[d * Lp + i] = to_acc<Sc>(qr[d * p.q.se]);
        const T* dr = p.dout.at<T>(b, h, i);
        const T* orow = p.out.at<T>(b, h, i);
        Sc delt = 0;
        for (int64_t e = 0; e < Ev; ++e) {
          const Sc g = to_acc<Sc>(dr[e * p.dout.se]);
          dt[e * Lp + i] = dd[i * Evp + e] = g;
          delt += g * to_acc<Sc>(orow[e * p.out.se]);
        }
        dl[i] = delt;
        const float x = *p.lse.at<float>(b, h, i);
        ls[i] = x == -std::numeric_limits<float>::infinity() ? inf : static_cast<Sc>(x);
      }
    }
  }, 1);

  std::vector<Scratch> scratch(static_cast<size_t>(nt));
  // Pass 1, query rows: dq and the weight-gradient partial of each row.
  parallel_for(B * H * L, nt, [&](int64_t r0, int64_t r1, int tid) {
    Sc* buf = static_cast<Sc*>(scratch[static_cast<size_t>(tid)].get(
        static_cast<size_t>(Sp * (D + 1) + D) * sizeof(Sc)));
    Sc* s = buf;
    Sc* t = s + Sp;
    Sc* qr = t + D * Sp;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bh = r / L, i = r % L, b = bh / H, h = bh % H;
      T* dq = p.dq.at<T>(b, h, i);
      Sc* dwr = dwp.data() + r * D;
      Sc& li = lse[static_cast<size_t>(bh * Lp + i)];
      const int64_t jend = p.is_causal ? std::min(S, i + 1) : S;
      if (li == inf || jend == 0) {
        for (int64_t d = 0; d < D; ++d) dq[d * p.dq.se] = from_acc<T>(Sc(0));
        continue;
      }
      const Sc* kt = kT.data() + bh * D * Sp;
      const Sc* vt = vT.data() + bh * Ev * Sp;
      const Sc* wh = w + h * D;
      const T* qp = p.q.at<T>(b, h, i);
      for (int64_t d = 0; d < D; ++d) qr[d] = to_acc<Sc>(qp[d * p.q.se]);
      const Sc* g = dob.data() + (bh * L + i) * Evp;
      scores_vec<O>(qr, kt, Sp, wh, D, 0, jend, s, t, Sp);
      const MaskView mv = mask_view(p, b, h);
      if (mv.dtype != kNone)
        for (int64_t j = 0; j < jend; ++j) s[j] += mask_value<Sc>(mv, i, j, Sc(1));
      const int64_t jv = round_up(jend, W);
      for (int64_t j = jend; j < jv; ++j) s[j] = -inf;
      if constexpr (std::is_same_v<Sc, double>) {
        // float64: recompute the row's lse exactly (the forward's is float32); pass 2 reads it.
        Sc m = -inf, l = 0;
        for (int64_t j = 0; j < jend; ++j) m = std::max(m, s[j]);
        if (m == -inf) {
          for (int64_t d = 0; d < D; ++d) dq[d * p.dq.se] = from_acc<T>(Sc(0));
          li = inf;
          continue;
        }
        for (int64_t j = 0; j < jend; ++j) l += std::exp(s[j] - m);
        li = m + std::log(l);
      }
      const V vli = O::set1(li), vdl = O::set1(delta[static_cast<size_t>(bh * Lp + i)]);
      for (int64_t j = 0; j < jv; j += W) {
        const V pj = O::exp(O::sub(O::load(s + j), vli));
        const V dp = dot_cols<O>(g, vt + j, Sp, Ev);
        O::store(s + j, O::mul(pj, O::sub(dp, vdl)));  // dS
      }
      for (int64_t d = 0; d < D; ++d) {
        V a = O::zero(), c = O::zero();
        const Sc* td = t + d * Sp;
        for (int64_t j = 0; j < jv; j += W) {
          const V ds = O::load(s + j), th = O::load(td + j);
          a = O::fmadd(ds, O::sub(O::set1(Sc(1)), O::mul(th, th)), a);
          c = O::fmadd(ds, th, c);
        }
        dq[d * p.dq.se] = from_acc<T>(wh[d] * O::reduce_add(a));
        dwr[d] = O::reduce_add(c);
      }
    }
  });

  // Pass 2, key columns: dk and dv.
  parallel_for(B * H * S, nt, [&](int64_t c0, int64_t c1, int tid) {
    Sc* buf = static_cast<Sc*>(scratch[static_cast<size_t>(tid)].get(
        static_cast<size_t>(Lp * (D + 2) + D + 2 * Evp) * sizeof(Sc)));
    Sc* s = buf;
    Sc* pb = s + Lp;
    Sc* t = pb + Lp;
    Sc* kr = t + D * Lp;
    Sc* acc = kr + D;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t bh = c / S, j = c % S, b = bh / H, h = bh % H;
      T* dk = p.dk.at<T>(b, h, j);
      T* dv = p.dv.at<T>(b, h, j);
      const int64_t i0 = p.is_causal ? j : 0;
      if (i0 >= L) {
        for (int64_t d = 0; d < D; ++d) dk[d * p.dk.se] = from_acc<T>(Sc(0));
        for (int64_t e = 0; e < Ev; ++e) dv[e * p.dv.se] = from_acc<T>(Sc(0));
        continue;
      }
      const Sc* qt = qT.data() + bh * D * Lp;
      const Sc* dt = doT.data() + bh * Ev * Lp;
      const Sc* dd = dob.data() + bh * L * Evp;
      const Sc* ls = lse.data() + bh * Lp;
      const Sc* dl = delta.data() + bh * Lp;
      const Sc* vr = vb.data() + (bh * S + j) * Evp;
      const Sc* wh = w + h * D;
      for (int64_t d = 0; d < D; ++d) kr[d] = kT[static_cast<size_t>(bh * D * Sp + d * Sp + j)];
      // Buffers indexed by i - i0 so vector loads start at i0 (inputs are padded by W past L).
      const int64_t n = L - i0, nv = round_up(n, W);
      scores_vec<O>(kr, qt + i0, Lp, wh, D, 0, n, s, t, Lp);
      const MaskView mv = mask_view(p, b, h);
      if (mv.dtype != kNone)
        for (int64_t i = i0; i < L; ++i) s[i - i0] += mask_value<Sc>(mv, i, j, Sc(1));
      for (int64_t u = n; u < nv; ++u) s[u] = -inf;
      for (int64_t u = 0; u < nv; u += W) {
        const V pj = O::exp(O::sub(O::load(s + u), O::load(ls + i0 + u)));
        const V dp = dot_cols<O>(vr, dt + i0 + u, Lp, Ev);
        O::store(pb + u, pj);
        O::store(s + u, O::mul(pj, O::sub(dp, O::load(dl + i0 + u))));  // dS
      }
      for (int64_t d = 0; d < D; ++d) {
        V a = O::zero();
        const Sc* td = t + d * Lp;
        for (int64_t u = 0; u < nv; u += W) {
          const V th = O::load(td + u);
          a = O::fmadd(O::load(s + u), O::sub(O::set1(Sc(1)), O::mul(th, th)), a);
        }
        dk[d * p.dk.se] = from_acc<T>(wh[d] * O::reduce_add(a));
      }
      for (int64_t e = 0; e < Evp; e += W) O::store(acc + e, O::zero());
      pv_accumulate<O>(pb, dd + i0 * Evp, n, Evp, acc);
      for (int64_t e = 0; e < Ev; ++e) dv[e * p.dv.se] = from_acc<T>(acc[e]);
    }
  });

  // dw[h, d] = sum over b, then i (fixed order), in double.
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) {
      double a = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const Sc* base = dwp.data() + ((b * H + h) * L) * D + d;
        for (int64_t i = 0; i < L; ++i) a += static_cast<double>(base[i * D]);
      }
      dw[h * D + d] = static_cast<Sc>(a);
    }
}

void check(const Params& p) {
  if (p.B < 0 || p.H < 1 || p.L < 0 || p.S < 0 || p.E < 1 || p.Ev < 0)
    throw std::invalid_argument("additive attention: bad sizes");
  if (p.Hk != p.H) throw std::invalid_argument("additive attention: key/value heads must equal query heads");
  if (p.dtype != kF32 && p.dtype != kF64 && p.dtype != kBF16 && p.dtype != kF16)
    throw std::invalid_argument("additive attention: unsupported dtype");
}

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}, OpsF{}); break;
    case kBF16: f(bf16_t{}, OpsF{}); break;
    case kF16: f(f16_t{}, OpsF{}); break;
    case kF64: f(double{}, OpsD{}); break;
    default: throw std::invalid_argument("additive attention: unsupported dtype");
  }
}

}  // namespace

void register_additive(py::module_& m) {
  m.def("additive_fwd",
        [](const Params& p, uintptr_t w) {
          check(p);
          py::gil_scoped_release nogil;
          dispatch(p.dtype, [&](auto t, auto o) {
            using T = decltype(t);
            using O = decltype(o);
            forward_impl<T, O>(p, reinterpret_cast<const typename O::Sc*>(w));
          });
        },
        py::arg("params"), py::arg("weight"),
        "Additive attention forward: writes p.out (B,H,L,Ev) and p.lse (B,H,L) float32 from p.q, p.k (B,H,*,D = "
        "p.E), p.v, p.mask; weight: address of a contiguous (H, D) float32 (float64 for float64 inputs) array.");
  m.def("additive_bwd",
        [](const Params& p, uintptr_t w, uintptr_t dw) {
          check(p);
          py::gil_scoped_release nogil;
          dispatch(p.dtype, [&](auto t, auto o) {
            using T = decltype(t);
            using O = decltype(o);
            using Sc = typename O::Sc;
            backward_impl<T, O>(p, reinterpret_cast<const Sc*>(w), reinterpret_cast<Sc*>(dw));
          });
        },
        py::arg("params"), py::arg("weight"), py::arg("dweight"),
        "Additive attention backward: writes p.dq, p.dk, p.dv and dweight (contiguous (H, D), weight's type) "
        "from p.dout, p.q, p.k, p.v, p.out, p.lse, p.mask. Deterministic.");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
