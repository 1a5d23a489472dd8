// Adapprox's element-wise passes on CPU (memopt/kernels/cpu_adapprox.py builds and calls this file;
// memopt/adapprox.py is the one caller). The GEMMs of a step (the products with V, Q U^T) stay
// in torch (MKL): only the passes between them are fused here, so Q U^T is bit for bit the torch
// path's and each kernel replaces a chain of torch ops over the m x n matrix:
//   square_sum:   S = G*G and sum(S)                                    (2 ops -> 1 pass)
//   uhat_sumsq:   Uhat = G / (sqrt(max(Q U^T, c G*G)) + eps), sum Uhat^2 (7 ops -> 1 pass)
//   apply_update: M = b1*M + a*Uhat, W = d*W - lr*M                     (4 ops -> 1 pass)
// Every per-element expression follows the order of memopt/adapprox_ops.py (uhat_, apply_update),
// and the file is built with -ffp-contract=off so no multiply-add is fused behind our back
// (-fno-math-errno only lets sqrt vectorise: a negative argument still gives nan); the
// explicit std::fma stand for torch's add_(x, alpha=a), whose vectorized CPU kernel is one fused
// multiply-add (ATen's ufunc add). M and W come out bit for bit as the torch path's for the same
// Uhat; Uhat itself can differ by one ulp (measured: ~1% of elements, <= 2e-7 relative) because
// this sqrt is correctly rounded and torch's vectorized (Sleef) sqrt is not always. Sums are
// accumulated in double (torch sums in float): within float round-off of the torch path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace {

using idx = int64_t;

// Elements per task: enough work per thread that the fork/join cost is noise.
constexpr idx kGrain = 1 << 15;

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              "memopt adapprox kernel: ", name, " must be a contiguous fp32 CPU tensor");
}

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  check_f32(b, name);
  TORCH_CHECK(a.numel() == b.numel(), "memopt adapprox kernel: ", name, " must have ", a.numel(), " elements");
}

// The loops are plain functions of pointers and values, called per block of kBlock elements: the
// inner loops keep full float vector width (a double accumulator would halve it), a float sum
// over 1024 elements loses no more than float round-off, and the block sums are added in double.
// (Written as lambdas capturing the scalars by reference they ran 3x slower: a float store
// through the output pointer may alias a captured float, which then is reloaded every element.)
constexpr idx kBlock = 1024;

float square_block(const float* __restrict g, float* __restrict out, idx n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (idx j = 0; j < n; ++j) {
    const float x = g[j] * g[j];
    out[j] = x;
    s += x;
  }
  return s;
}

// floor_c >= 0 ("grad"): Vhat = (v - c*g*g)^+ + c*g*g, as adapprox_ops.uhat_ writes it
// (addcmul_(g, g, value=-c) is self + value*t1*t2; clamp_(min=tiny) keeps a nan a nan).
float uhat_block(float* __restrict v, const float* __restrict g, idx n, float c, float eps) {
  const float tiny = FLT_MIN, neg_c = -c;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (idx j = 0; j < n; ++j) {
    const float gj = g[j];
    float x = v[j] + neg_c * gj * gj;
    x = x < tiny ? tiny : x;
    x = x + c * gj * gj;
    const float u = gj / (std::sqrt(x) + eps);
    v[j] = u;
    s += u * u;
  }
  return s;
}

// vhat_floor "zero": Vhat = v^+ (clamped to the smallest normal float).
float uhat_zero_floor_block(float* __restrict v, const float* __restrict g, idx n, float eps) {
  const float tiny = FLT_MIN;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (idx j = 0; j < n; ++j) {
    float x = v[j];
    x = x < tiny ? tiny : x;
    const float u = g[j] / (std::sqrt(x) + eps);
    v[j] = u;
    s += u * u;
  }
  return s;
}

// W = W*d (when decays), M = M*b1 + ms*U, W = W + ws*M; without M (m == nullptr) W = W + ws*U.
void apply_block(float* __restrict w, const float* __restrict u, float* __restrict m, idx n, bool decays, float d,
                 float b1, float ms, float ws) {
  if (m) {
#pragma omp simd
    for (idx j = 0; j < n; ++j) {
      const float mj = std::fma(ms, u[j], m[j] * b1);
      m[j] = mj;
      const float wj = decays ? w[j] * d : w[j];
      w[j] = std::fma(ws, mj, wj);
    }
  } else {
#pragma omp simd
    for (idx j = 0; j < n; ++j) {
      const float wj = decays ? w[j] * d : w[j];
      w[j] = std::fma(ws, u[j], wj);
    }
  }
}

// sum over [0, numel) of block(lo, hi) -> float, in blocks of kBlock, one double per thread,
// added in thread order.
template <class F>
double parallel_block_sum(idx numel, F block) {
  std::vector<double> part(at::get_num_threads(), 0.0);
  at::parallel_for(0, numel, kGrain, [&](idx b, idx e) {
    double t = 0.0;
    for (idx lo = b; lo < e; lo += kBlock) t += (double)block(lo, std::min(lo + kBlock, e));
    part[at::get_thread_num()] += t;
  });
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

}  // namespace

// out = g*g; returns sum(out) in double (inf/nan when g holds one, or when a square overflows).
double square_sum(torch::Tensor g, torch::Tensor out) {
  check_f32(g, "g");
  check_same(g, out, "out");
  const float* gp = g.data_ptr<float>();
  float* op = out.data_ptr<float>();
  return parallel_block_sum(g.numel(), [=](idx lo, idx hi) { return square_block(gp + lo, op + lo, hi - lo); });
}

// vhat (holding Q U^T) becomes Uhat = g / (sqrt(Vhat) + eps) in place; returns sum Uhat^2 (double).
// floor_c >= 0: the "grad" floor with c = 1 - beta2; floor_c < 0: the "zero" floor.
double uhat_sumsq(torch::Tensor vhat, torch::Tensor g, double floor_c, double eps) {
  check_f32(vhat, "vhat");
  check_same(vhat, g, "g");
  float* vp = vhat.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float c = (float)floor_c, fe = (float)eps;
  if (floor_c >= 0.0)
    return parallel_block_sum(vhat.numel(), [=](idx lo, idx hi) { return uhat_block(vp + lo, gp + lo, hi - lo, c, fe); });
  return parallel_block_sum(vhat.numel(),
                            [=](idx lo, idx hi) { return uhat_zero_floor_block(vp + lo, gp + lo, hi - lo, fe); });
}

// adapprox_ops.apply_update in one pass: w *= decay (when decay != 1); with exp_avg
// M = M*beta1 + m_scale*Uhat, W = W + w_scale*M; without it W = W + w_scale*Uhat.
void apply_update(torch::Tensor w, torch::Tensor uhat, torch::Tensor exp_avg, bool has_m, double decay,
                  double beta1, double m_scale, double w_scale) {
  check_f32(w, "w");
  check_same(w, uhat, "uhat");
  if (has_m) check_same(w, exp_avg, "exp_avg");
  float* wp = w.data_ptr<float>();
  const float* up = uhat.data_ptr<float>();
  float* mp = has_m ? exp_avg.data_ptr<float>() : nullptr;
  const float d = (float)decay, b1 = (float)beta1, ms = (float)m_scale, ws = (float)w_scale;
  const bool decays = d != 1.0f;
  at::parallel_for(0, w.numel(), kGrain, [=](idx b, idx e) {
    apply_block(wp + b, up + b, mp ? mp + b : nullptr, e - b, decays, d, b1, ms, ws);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("square_sum", &square_sum, "out = g*g; sum(out) in double");
  mod.def("uhat_sumsq", &uhat_sumsq, "Uhat in place over Q U^T; sum Uhat^2 in double");
  mod.def("apply_update", &apply_update, "first moment, weight decay and the step in one pass");
}
