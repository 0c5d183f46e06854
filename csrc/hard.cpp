// fastattn CPU hard (top-k) attention: fused forward (streaming top-k per query row) and backward.
//
// Forward, per query row i of (b, h):  s_ij = scale <q_i, k_j> + mask_ij (hidden / causal: -inf);
// the K best visible keys are kept in a sorted per-row list while key tiles stream by (no (L, S)
// scores in memory); ties go to the lowest key index because keys arrive in ascending order and a
// later key must beat a kept one strictly. p = softmax over the kept scores, out_i = sum_t p_t v_{j_t}.
// Writes idx (B, H, L, K) int32 (-1 for unused slots) and prob (B, H, L, K) float32 (float64 for float64
// inputs; 0 for unused slots).
//
// Backward (selection fixed by idx):  dp_t = <dO_i, v_{j_t}>,  ds_t = p_t (dp_t - sum_u p_u dp_u),
// dq_i = scale sum_t ds_t k_{j_t};  dv_j = sum_{(i,t): j_t = j} p_t dO_i,  dk_j = sum scale ds_t q_i.
// dk/dv are computed by their owner key from a counting-sort (CSR) of idx per (b, kv head): each key
// sums its (h, i, t) contributions in ascending order, so results are bit-identical run to run and for
// any thread count (no atomics). K = 1: ds = 0, so dq = dk = 0 and dv is the scatter of dO.
#include <pybind11/pybind11.h>

#include <stdexcept>
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

constexpr int64_t kMaxTopK = 64;  // fastattn/hard.py MAX_TOP_K
constexpr int64_t kBM = 64;       // query rows per forward task (amortises the K tile transpose)
constexpr int64_t kBN = 64;       // keys per score tile (a multiple of 2 * simd::W)

struct HardParams {
  Params base;      // q, k, v, out, mask, dout, dq, dk, dv, sizes, scale, is_causal, num_threads
  Tensor4 idx;      // int32 (B, H, L, K), contiguous
  Tensor4 prob;     // (B, H, L, K) contiguous, float32 (float64 for float64 inputs)
  Tensor4 ds;       // (B, H, L, K) contiguous, prob's dtype (backward output)
  int64_t top_k = 1;
};

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// dst[e] = src[e * se] * mul for e < n, converted to Acc.
template <typename T, typename Acc>
FASTATTN_INLINE void load_row(const T* src, int64_t se, int64_t n, Acc mul, Acc* dst) {
  if (se == 1) {
    for (int64_t e = 0; e < n; ++e) dst[e] = to_acc<Acc>(src[e]) * mul;
  } else {
    for (int64_t e = 0; e < n; ++e) dst[e] = to_acc<Acc>(src[e * se]) * mul;
  }
}

template <typename T, typename Acc>
FASTATTN_INLINE void store_row(T* dst, int64_t se, int64_t n, const Acc* src) {
  for (int64_t e = 0; e < n; ++e) dst[e * se] = from_acc<T, Acc>(src[e]);
}

// st[r * kBN + c] = sum_e qf[r * E + e] * kt[e * kBN + c] for r < nr, c < kBN (kt zero-padded to kBN).
FASTATTN_INLINE void score_tile(const float* qf, const float* kt, float* st, int64_t nr, int64_t E) {
  using namespace simd;
  constexpr int64_t RB = 4;
  for (int64_t r0 = 0; r0 < nr; r0 += RB) {
    const int64_t rb = std::min(RB, nr - r0);
    for (int64_t c0 = 0; c0 < kBN; c0 += 2 * W) {
      vf a00 = zero(), a01 = zero(), a10 = zero(), a11 = zero(), a20 = zero(), a21 = zero(), a30 = zero(),
         a31 = zero();
      const float* q0 = qf + r0 * E;
      const float* q1 = q0 + (rb > 1 ? E : 0);
      const float* q2 = q0 + (rb > 2 ? 2 * E : 0);
      const float* q3 = q0 + (rb > 3 ? 3 * E : 0);
      for (int64_t e = 0; e < E; ++e) {
        const vf k0 = load(kt + e * kBN + c0), k1 = load(kt + e * kBN + c0 + W);
        vf x = set1(q0[e]);
        a00 = fmadd(x, k0, a00); a01 = fmadd(x, k1, a01);
        x = set1(q1[e]);
        a10 = fmadd(x, k0, a10); a11 = fmadd(x, k1, a11);
        x = set1(q2[e]);
        a20 = fmadd(x, k0, a20); a21 = fmadd(x, k1, a21);
        x = set1(q3[e]);
        a30 = fmadd(x, k0, a30); a31 = fmadd(x, k1, a31);
      }
      float* s = st + r0 * kBN + c0;
      store(s, a00); store(s + W, a01);
      if (rb > 1) { store(s + kBN, a10); store(s + kBN + W, a11); }
      if (rb > 2) { store(s + 2 * kBN, a20); store(s + 2 * kBN + W, a21); }
      if (rb > 3) { store(s + 3 * kBN, a30); store(s + 3 * kBN + W, a31); }
    }
  }
}

FASTATTN_INLINE void score_tile(const double* qf, const double* kt, double* st, int64_t nr, int64_t E) {
  for (int64_t r = 0; r < nr; ++r) {
    double* s = st + r * kBN;
    for (int64_t c = 0; c < kBN; ++c) s[c] = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      const double x = qf[r * E + e];
      const double* k = kt + e * kBN;
      for (int64_t c = 0; c < kBN; ++c) s[c] += x * k[c];
    }
  }
}

// Offers key j with score x to a row's list (bs, bi) of cnt <= K entries sorted by descending score,
// equal scores in ascending key order (keys arrive in ascending order, so a newcomer goes after equals).
template <typename Acc>
FASTATTN_INLINE void offer(Acc x, int32_t j, Acc* bs, int32_t* bi, int64_t& cnt, int64_t K) {
  int64_t pos = cnt < K ? cnt : K - 1;
  while (pos > 0 && bs[pos - 1] < x) {
    bs[pos] = bs[pos - 1];
    bi[pos] = bi[pos - 1];
    --pos;
  }
  bs[pos] = x;
  bi[pos] = j;
  if (cnt < K) ++cnt;
}

template <typename T>
void hard_forward_t(const HardParams& hp) {
  using Acc = typename AccOf<T>::type;
  const Params& p = hp.base;
  const int64_t K = hp.top_k, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const int64_t nmb = (L + kBM - 1) / kBM;
  const int nt = std::max(1, p.num_threads);
  std::vector<Scratch> scratch(static_cast<size_t>(nt));
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const Acc scale = static_cast<Acc>(p.scale);

  parallel_for(p.B * p.H * nmb, nt, [&](int64_t begin, int64_t end, int tid) {
    Arena plan;
    plan.take<Acc>(kBM * E); plan.take<Acc>(E * kBN); plan.take<Acc>(kBM * kBN); plan.take<Acc>(kBM * kBN);
    plan.take<Acc>(kBM * K); plan.take<int32_t>(kBM * K); plan.take<Acc>(Ev); plan.take<Acc>(Ev);
    Arena ar{static_cast<char*>(scratch[tid].get(plan.off + 64))};
    Acc* qf = ar.take<Acc>(kBM * E);
    Acc* kt = ar.take<Acc>(E * kBN);
    Acc* st = ar.take<Acc>(kBM * kBN);
    Acc* mt = ar.take<Acc>(kBM * kBN);
    Acc* bs = ar.take<Acc>(kBM * K);
    int32_t* bi = ar.take<int32_t>(kBM * K);
    Acc* acc = ar.take<Acc>(Ev);
    Acc* vrow = ar.take<Acc>(Ev);
    int64_t cnt[kBM];

    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nmb, mb = item % nmb;
      const int64_t b = bh / p.H, h = bh % p.H, hk = p.kv_head(h);
      const int64_t i0 = mb * kBM, i1 = std::min(L, i0 + kBM), nr = i1 - i0;
      for (int64_t r = 0; r < nr; ++r)
        load_row(p.q.at<const T>(b, h, i0 + r), p.q.se, E, Acc(1), qf + r * E);
      for (int64_t r = 0; r < nr; ++r) cnt[r] = 0;
      const MaskView mv = mask_view(p, b, h);
      const int64_t jend = p.is_causal ? std::min(S, i1) : S;
      for (int64_t j0 = 0; j0 < jend; j0 += kBN) {
        const int64_t j1 = std::min(jend, j0 + kBN), nb = j1 - j0;
        if (mv.dtype != kNone) {
          const MaskTileInfo info = load_mask_tile<Acc>(mv, i0, i1, j0, j1, mt, kBN, 1, Acc(1), false);
          if (info.all_hidden) continue;
        }
        // kt[e][c] = k[j0 + c][e] (zero past nb).
        for (int64_t c = 0; c < kBN; ++c) {
          if (c < nb) {
            const T* kr = p.k.at<const T>(b, hk, j0 + c);
            for (int64_t e = 0; e < E; ++e) kt[e * kBN + c] = to_acc<Acc>(kr[e * p.k.se]);
          } else {
            for (int64_t e = 0; e < E; ++e) kt[e * kBN + c] = Acc(0);
          }
        }
        score_tile(qf, kt, st, nr, E);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          const Acc* s = st + r * kBN;
          const Acc* m = mt + r * kBN;
          Acc* rs = bs + r * K;
          int32_t* ri = bi + r * K;
          int64_t c_end = nb;
          if (p.is_causal) c_end = std::min(nb, i - j0 + 1);  // keys j <= i
          Acc thr = cnt[r] == K ? rs[K - 1] : ninf;
          for (int64_t c = 0; c < c_end; ++c) {
            // scale after the dot, as (q @ k^T) * scale: integer-valued dots stay exact, so exact ties stay ties.
            const Acc x = mv.dtype != kNone ? s[c] * scale + m[c] : s[c] * scale;
            if (x > thr) {  // also drops -inf (hidden) and NaN
              offer(x, static_cast<int32_t>(j0 + c), rs, ri, cnt[r], K);
              thr = cnt[r] == K ? rs[K - 1] : ninf;
            }
          }
        }
      }
      // Softmax over the kept scores, the weighted sum of their value rows, and the saved selection.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        const Acc* rs = bs + r * K;
        const int32_t* ri = bi + r * K;
        int32_t* oidx = hp.idx.at<int32_t>(b, h, i);
        Acc* oprob = hp.prob.at<Acc>(b, h, i);
        Acc sum = 0;
        Acc w[kMaxTopK];
        for (int64_t t = 0; t < cnt[r]; ++t) {
          w[t] = std::exp(rs[t] - rs[0]);
          sum += w[t];
        }
        for (int64_t e = 0; e < Ev; ++e) acc[e] = 0;
        for (int64_t t = 0; t < K; ++t) {
          if (t < cnt[r]) {
            const Acc pt = w[t] / sum;
            oidx[t] = ri[t];
            oprob[t] = pt;
            load_row(p.v.at<const T>(b, hk, ri[t]), p.v.se, Ev, Acc(1), vrow);
            for (int64_t e = 0; e < Ev; ++e) acc[e] += pt * vrow[e];
          } else {
            oidx[t] = -1;
            oprob[t] = Acc(0);
          }
        }
        store_row(p.out.at<T>(b, h, i), p.out.se, Ev, acc);
      }
    }
  });
}

template <typename T>
void hard_backward_t(const HardParams& hp) {
  using Acc = typename AccOf<T>::type;
  const Params& p = hp.base;
  const int64_t K = hp.top_k, E = p.E, Ev = p.Ev, L = p.L, S = p.S, H = p.H, Hk = p.Hk, G = H / Hk;
  const int nt = std::max(1, p.num_threads);
  const Acc scale = static_cast<Acc>(p.scale);
  const int32_t* idx = reinterpret_cast<const int32_t*>(hp.idx.ptr);
  const Acc* prob = reinterpret_cast<const Acc*>(hp.prob.ptr);
  Acc* ds = reinterpret_cast<Acc*>(hp.ds.ptr);
  std::vector<Scratch> scratch(static_cast<size_t>(nt));

  // Phase A (per query row): ds and dq.
  parallel_for(p.B * H * L, nt, [&](int64_t begin, int64_t end, int tid) {
    Arena plan;
    plan.take<Acc>(Ev); plan.take<Acc>(Ev); plan.take<Acc>(E); plan.take<Acc>(E);
    Arena ar{static_cast<char*>(scratch[tid].get(plan.off + 64))};
    Acc* dor = ar.take<Acc>(Ev);
    Acc* vr = ar.take<Acc>(Ev);
    Acc* kr = ar.take<Acc>(E);
    Acc* dq = ar.take<Acc>(E);
    Acc dp[kMaxTopK];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * L), h = (row / L) % H, i = row % L, hk = p.kv_head(h);
      const int32_t* ri = idx + row * K;
      const Acc* rp = prob + row * K;
      Acc* rds = ds + row * K;
      for (int64_t e = 0; e < E; ++e) dq[e] = 0;
      if (K > 1) {
        load_row(p.dout.at<const T>(b, h, i), p.dout.se, Ev, Acc(1), dor);
        Acc delta = 0;
        for (int64_t t = 0; t < K; ++t) {
          dp[t] = 0;
          if (ri[t] < 0) continue;
          load_row(p.v.at<const T>(b, hk, ri[t]), p.v.se, Ev, Acc(1), vr);
          Acc d = 0;
          for (int64_t e = 0; e < Ev; ++e) d += dor[e] * vr[e];
          dp[t] = d;
          delta += static_cast<Acc>(rp[t]) * d;
        }
        for (int64_t t = 0; t < K; ++t) {
          if (ri[t] < 0) {
            rds[t] = Acc(0);
            continue;
          }
          const Acc g = static_cast<Acc>(rp[t]) * (dp[t] - delta);
          rds[t] = g;
          load_row(p.k.at<const T>(b, hk, ri[t]), p.k.se, E, Acc(1), kr);
          for (int64_t e = 0; e < E; ++e) dq[e] += g * kr[e];
        }
        for (int64_t e = 0; e < E; ++e) dq[e] *= scale;
      } else {
        for (int64_t t = 0; t < K; ++t) rds[t] = Acc(0);
      }
      store_row(p.dq.at<T>(b, h, i), p.dq.se, E, dq);
    }
  });

  // Phase B (per (b, kv head)): CSR of the selections by key, entries in ascending (h, i, t) order.
  // The group's heads hk*G .. hk*G+G-1 are consecutive in idx, so its slots are one contiguous run.
  const int64_t run = G * L * K;
  std::vector<int64_t> off(static_cast<size_t>(p.B * Hk * (S + 1)));
  std::vector<int64_t> ent(static_cast<size_t>(p.B * H * L * K));
  parallel_for(p.B * Hk, nt, [&](int64_t begin, int64_t end, int) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t base = g * run;  // (b * H + hk * G) * L * K
      int64_t* o = off.data() + g * (S + 1);
      for (int64_t j = 0; j <= S; ++j) o[j] = 0;
      for (int64_t x = 0; x < run; ++x) {
        const int32_t j = idx[base + x];
        if (j >= 0) ++o[j + 1];
      }
      for (int64_t j = 0; j < S; ++j) o[j + 1] += o[j];
      std::vector<int64_t> fill(o, o + S);
      for (int64_t x = 0; x < run; ++x) {
        const int32_t j = idx[base + x];
        if (j >= 0) ent[base + fill[j]++] = base + x;
      }
    }
  }, 1);

  // Phase C (per key chunk): dv and dk by their owner key.
  constexpr int64_t kKeys = 16;
  const int64_t nkb = (S + kKeys - 1) / kKeys;
  parallel_for(p.B * Hk * nkb, nt, [&](int64_t begin, int64_t end, int tid) {
    Arena plan;
    plan.take<Acc>(Ev); plan.take<Acc>(E); plan.take<Acc>(Ev); plan.take<Acc>(E);
    Arena ar{static_cast<char*>(scratch[tid].get(plan.off + 64))};
    Acc* dv = ar.take<Acc>(Ev);
    Acc* dk = ar.take<Acc>(E);
    Acc* dor = ar.take<Acc>(Ev);
    Acc* qr = ar.take<Acc>(E);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / nkb, kb = item % nkb;
      const int64_t b = g / Hk, hk = g % Hk;
      const int64_t* o = off.data() + g * (S + 1);
      for (int64_t j = kb * kKeys; j < std::min(S, (kb + 1) * kKeys); ++j) {
        for (int64_t e = 0; e < Ev; ++e) dv[e] = 0;
        for (int64_t e = 0; e < E; ++e) dk[e] = 0;
        for (int64_t x = o[j]; x < o[j + 1]; ++x) {
          const int64_t flat = ent[g * run + x];
          const int64_t row = flat / K;
          const int64_t h = (row / L) % H, i = row % L;
          const Acc pt = static_cast<Acc>(prob[flat]);
          load_row(p.dout.at<const T>(b, h, i), p.dout.se, Ev, Acc(1), dor);
          for (int64_t e = 0; e < Ev; ++e) dv[e] += pt * dor[e];
          if (K > 1) {
            const Acc gs = scale * static_cast<Acc>(ds[flat]);
            load_row(p.q.at<const T>(b, h, i), p.q.se, E, Acc(1), qr);
            for (int64_t e = 0; e < E; ++e) dk[e] += gs * qr[e];
          }
        }
        store_row(p.dv.at<T>(b, hk, j), p.dv.se, Ev, dv);
        store_row(p.dk.at<T>(b, hk, j), p.dk.se, E, dk);
      }
    }
  });
}

void check_hard(const HardParams& hp, bool backward) {
  const Params& p = hp.base;
  auto fail = [&](const std::string& msg) {
    throw std::invalid_argument(std::string(backward ? "fastattn hard_bwd: " : "fastattn hard_fwd: ") + msg);
  };
  if (p.B < 0 || p.H < 1 || p.Hk < 1 || p.L < 0 || p.S < 0 || p.E < 1 || p.Ev < 1)
    fail("sizes must satisfy B, L, S >= 0 and H, Hk, E, Ev >= 1");
  if (p.H % p.Hk != 0) fail("H must be a multiple of Hk");
  if (hp.top_k < 1 || hp.top_k > kMaxTopK) fail("top_k must be in [1, " + std::to_string(kMaxTopK) + "]");
  if (p.S > std::numeric_limits<int32_t>::max()) fail("S must fit in int32 (indices are int32)");
  if (p.dtype != kF32 && p.dtype != kF16 && p.dtype != kBF16 && p.dtype != kF64) fail("unsupported dtype code");
  if (p.mask_dtype != kNone && p.mask_dtype != kBool && p.mask_dtype != kF32 && p.mask_dtype != p.dtype)
    fail("mask dtype must be bool, float32 or the dtype of q");
  if (p.mask_dtype != kNone && p.mask.ptr == 0) fail("null mask pointer");
  if (p.B * p.H * p.L > 0 && (hp.idx.ptr == 0 || hp.prob.ptr == 0)) fail("null idx/prob pointer");
  if (backward && p.B * p.H * p.L > 0 && (hp.ds.ptr == 0 || p.dq.ptr == 0 || p.dout.ptr == 0))
    fail("null ds/dq/dout pointer");
}

template <template <typename> class F>
void dispatch(const HardParams& hp) {
  switch (hp.base.dtype) {
    case kF32: return F<float>::run(hp);
    case kF64: return F<double>::run(hp);
    case kF16: return F<f16_t>::run(hp);
    case kBF16: return F<bf16_t>::run(hp);
    default: throw std::invalid_argument("fastattn hard: unsupported dtype");
  }
}
template <typename T> struct Fwd { static void run(const HardParams& hp) { hard_forward_t<T>(hp); } };
template <typename T> struct Bwd { static void run(const HardParams& hp) { hard_backward_t<T>(hp); } };

}  // namespace

void register_hard(pybind11::module_& m) {
  py::class_<HardParams>(m, "HardParams", "Arguments of a hard-attention call (csrc/hard.cpp).")
      .def(py::init<>())
      .def_readwrite("base", &HardParams::base)
      .def_readwrite("idx", &HardParams::idx)
      .def_readwrite("prob", &HardParams::prob)
      .def_readwrite("ds", &HardParams::ds)
      .def_readwrite("top_k", &HardParams::top_k);
  m.attr("HARD_MAX_TOP_K") = kMaxTopK;
  m.def("hard_fwd",
        [](const HardParams& hp) {
          check_hard(hp, false);
          py::gil_scoped_release nogil;
          if (hp.base.B * hp.base.H * hp.base.L == 0) return;
          dispatch<Fwd>(hp);
        },
        py::arg("params"),
        "Hard top-k attention forward: writes base.out (B,H,L,Ev), idx (B,H,L,K) int32 and prob (B,H,L,K)\n"
        "float32 (contiguous) from base.q, base.k, base.v, base.mask (S >= 1).");
  m.def("hard_bwd",
        [](const HardParams& hp) {
          check_hard(hp, true);
          py::gil_scoped_release nogil;
          if (hp.base.B * hp.base.H * hp.base.L == 0) return;
          dispatch<Bwd>(hp);
        },
        py::arg("params"),
        "Hard top-k attention backward: writes base.dq, base.dk, base.dv and ds (B,H,L,K) float32 from\n"
        "base.dout, base.q, base.k, base.v and the forward's idx / prob. Deterministic (owner-computes).");
}

}  // namespace FASTATTN_NS
}  // namespace fastattn
