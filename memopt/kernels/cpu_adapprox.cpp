// Adapprox's element-wise passes on CPU (memopt/kernels/cpu_adapprox.py builds and calls this file;
// memopt/adapprox.py is the one caller). On a sketch step the GEMMs (the products with V, Q U^T)
// stay in torch (MKL): only the passes between them are fused here, so Q U^T is bit for bit the
// torch path's and each kernel replaces a chain of torch ops over the m x n matrix:
//   square_sum:   S = G*G and sum(S)                                    (2 ops -> 1 pass)
//   uhat_sumsq:   Uhat = G / (sqrt(max(Q U^T, c G*G)) + eps), sum Uhat^2 (7 ops -> 1 pass)
//   apply_update: M = b1*M + a*Uhat, W = d*W - lr*M                     (4 ops -> 1 pass)
// A projection step (resketch_every > 1, between sketches) needs neither G*G nor a GEMM through
// the buffer: with Q kept, U_t^T = (1-beta2) Q^T (G*G) + beta2 (Q^T Q) U_{t-1}^T, and Vhat = Q U_t^T
// is a dot product of length k per element, formed where Uhat is written (the lowrank_* kernels):
//   lowrank_gram:        Z = Q^T (G*G) and sum G*G, G read once        (square + GEMM -> 1 pass)
//   lowrank_uhat_sumsq:  Uhat and sum Uhat^2, Vhat formed in registers (GEMM + 7 ops -> 1 pass)
// then apply_update as on a sketch step: about 32 bytes per parameter instead of ~48 plus two
// GEMMs through the buffer. Their sums of k products run in another order than MKL's, so a
// projection step agrees with the torch path to float round-off, not bit for bit.
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
#include <tuple>
#include <vector>

#include "vec16.h"

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


// -- projection steps: Vhat = Q U^T formed per row block in registers --------------------------
// The products of k terms per element are written with GCC/Clang vector types: the
// auto-vectoriser did not keep the accumulators of the loop over k in registers (0.6 G elements
// per second per core; these run 2-3x that), and multiply-adds are fused here (fp-contract=fast
// for these functions only: a projection step is not bit for bit the torch path's anyway).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// Rows handled together: a block of rows shares every vector of U^T (or of Z) it loads, which
// comes from L2 (k x n floats: 48 KiB at k = 16, n = 768): per row, that traffic alone cost more
// than the arithmetic. 8 rows x 16 columns keep 8 accumulators (or 8 squared rows) in registers
// and ran at about the multiply-add peak in a one-core microbenchmark (2.2-2.6 G elements/s at
// k = 16, against 1.3 for 4 rows x 32 columns).
constexpr idx kBlockRows = 8;
// Z is accumulated in float over this many rows, then added to a double total.
constexpr idx kGramFlush = 64;
static_assert(kGramFlush % kBlockRows == 0, "a flush falls on a block boundary");

// The product kernels read U^T (and accumulate Z) in panels: the columns in groups of 16, each
// group's k rows contiguous (k * 16 floats), then the last n % 16 columns as one k x (n % 16)
// block. In the row-major k x n layout the k vectors of one group sit n floats apart; at n = 3072
// (12 KiB) they all fall in one L1 set and evict each other (gram: 0.7 vs 2.6 G elements/s per core).
inline idx panel_offset(idx kk, idx j, idx k, idx n) {
  const idx whole = n - n % 16;
  return j < whole ? (j / 16) * k * 16 + kk * 16 + j % 16 : whole * k + kk * (n - whole) + (j - whole);
}

// vh[r * ld + j0 + l] = sum_kk qv[r * k + kk] * panel[kk * 16 + l] for the block's nr rows and the
// 16 columns of one panel (qv is 0 for rows past nr, which are not stored).
void vhat_block16(const float* __restrict qv, const float* __restrict panel, idx k, idx nr, float* __restrict vh,
                  idx ld) {
  vf16 a[kBlockRows] = {};
  for (idx kk = 0; kk < k; ++kk) {
    const vf16 u = load16(panel + kk * 16);
    for (idx r = 0; r < kBlockRows; ++r) a[r] += qv[r * k + kk] * u;
  }
  for (idx r = 0; r < nr; ++r) store16(vh + r * ld, a[r]);
}

// panel[kk * 16 ..) += sum_r qv[r * k + kk] * g[r][..]^2 over the block's rows (q = 0 for rows
// past nr), for the 16 columns of g from g[0]; returns their sum of g^2.
float gram16(const float* __restrict g, idx n, idx nr, const float* __restrict qv, idx k, float* __restrict panel) {
  vf16 sq[kBlockRows];
  vf16 t = {};
  for (idx r = 0; r < kBlockRows; ++r) {
    const vf16 x = load16(g + (r < nr ? r : 0) * n);
    sq[r] = r < nr ? x * x : (vf16){};
    t += sq[r];
  }
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += t[l];
  for (idx kk = 0; kk < k; ++kk) {
    vf16 acc = load16(panel + kk * 16);
    for (idx r = 0; r < kBlockRows; ++r) acc += qv[r * k + kk] * sq[r];
    store16(panel + kk * 16, acc);
  }
  return total;
}
// out[r][l] = sum_j g[r][j]^2 * xp[j][l] for the block's nr <= R rows, l < 16 * RV (xp: X
// padded to 16 * RV columns, n rows). Each row of X is loaded once for the R rows.
template <int R, int RV>
void sx_rows(const float* __restrict g, const float* __restrict xp, idx nr, idx n, float* __restrict out) {
  vf16 acc[R][RV] = {};
  for (idx j = 0; j < n; ++j) {
    vf16 xv[RV];
    for (int v = 0; v < RV; ++v) xv[v] = load16(xp + j * 16 * RV + 16 * v);
    for (idx r = 0; r < R; ++r) {
      const float gj = r < nr ? g[r * n + j] : 0.0f;
      const float sq = gj * gj;
      for (int v = 0; v < RV; ++v) acc[r][v] += sq * xv[v];
    }
  }
  for (idx r = 0; r < nr; ++r)
    for (int v = 0; v < RV; ++v) store16(out + r * 16 * RV + 16 * v, acc[r][v]);
}
#pragma GCC pop_options

// The block's q rows (k <= 64 entries each), zero past the nr rows it has.
void block_q(const float* __restrict q, idx nr, idx k, float* __restrict qv) {
  for (idx r = 0; r < kBlockRows; ++r)
    for (idx kk = 0; kk < k; ++kk) qv[r * k + kk] = r < nr ? q[r * k + kk] : 0.0f;
}

// Z[kk][j] += sum_r q[r][kk] * g[r][j]^2 over one block of nr <= kBlockRows rows, Z in the panel
// layout (zp); returns the block's sum of g^2.
float gram_block(const float* __restrict g, const float* __restrict q, float* __restrict zp, idx nr, idx n, idx k) {
  float qv[kBlockRows * 64];
  block_q(q, nr, k, qv);
  float total = 0.0f;
  const idx whole = n - n % 16;
  for (idx j0 = 0; j0 < whole; j0 += 16) total += gram16(g + j0, n, nr, qv, k, zp + j0 * k);
  for (idx j = whole; j < n; ++j)  // the last n % 16 columns
    for (idx r = 0; r < nr; ++r) {
      const float x = g[r * n + j] * g[r * n + j];
      total += x;
      for (idx kk = 0; kk < k; ++kk) zp[panel_offset(kk, j, k, n)] += qv[r * k + kk] * x;
    }
  return total;
}

// U^T (k x n, row-major) in the panel layout of the product kernels.
std::vector<float> to_panels(const float* ut, idx k, idx n) {
  std::vector<float> p((size_t)k * n);
  for (idx kk = 0; kk < k; ++kk)
    for (idx j = 0; j < n; ++j) p[panel_offset(kk, j, k, n)] = ut[kk * n + j];
  return p;
}

// out[r * n + j] = sum_kk q[r * k + kk] * ut[kk][j] for a block's nr <= kBlockRows rows (q: their
// rows of Q, k <= 64; utp = U^T in the panel layout).
void product_rows(const float* q, const float* utp, idx nr, idx n, idx k, float* out) {
  float qv[kBlockRows * 64];
  block_q(q, nr, k, qv);
  const idx whole = n - n % 16;
  for (idx j0 = 0; j0 < whole; j0 += 16) vhat_block16(qv, utp + j0 * k, k, nr, out + j0, n);
  for (idx r = 0; r < nr; ++r)  // the last n % 16 columns
    for (idx j = whole; j < n; ++j) {
      float a = 0.0f;
      for (idx kk = 0; kk < k; ++kk) a += qv[r * k + kk] * utp[panel_offset(kk, j, k, n)];
      out[r * n + j] = a;
    }
}

// Vhat (in u) -> Uhat in place for nr rows, floored as uhat_block / uhat_zero_floor_block (the
// same element-wise code); returns sum Uhat^2, each row's float sum added in double.
double uhat_rows(float* u, const float* g, idx nr, idx n, float c, float eps, bool zero_floor) {
  double s = 0.0;
  for (idx r = 0; r < nr; ++r)
    s += zero_floor ? uhat_zero_floor_block(u + r * n, g + r * n, n, eps) : uhat_block(u + r * n, g + r * n, n, c, eps);
  return s;
}

// One row's squared norms of V / scale and of (V - Vhat) / scale, V = (1-beta2) G*G + beta2 vp
// (vp: the row of Q_prev U_prev^T), as lowrank.residual_norms_ forms them.
void residual_row(const float* __restrict vh, const float* __restrict vp, const float* __restrict g, idx n, float omb,
                  float b2, float inv_s, double& v2, double& r2) {
  for (idx lo = 0; lo < n; lo += kBlock) {
    const idx hi = std::min(lo + kBlock, n);
    float sv = 0.0f, sr = 0.0f;
#pragma omp simd reduction(+ : sv, sr)
    for (idx j = lo; j < hi; ++j) {
      const float x = (g[j] * g[j] * omb + vp[j] * b2) * inv_s;
      const float y = x - vh[j] * inv_s;
      sv += x * x;
      sr += y * y;
    }
    v2 += (double)sv;
    r2 += (double)sr;
  }
}

struct LowRank {
  idx B, m, n, k;
};

// g (B, m, n) with q (B, m, k) and ut (B, k, n): the shapes, checked.
LowRank lowrank_shapes(const torch::Tensor& g, const torch::Tensor& q, const torch::Tensor* ut) {
  check_f32(g, "g");
  check_f32(q, "q");
  TORCH_CHECK(g.dim() == 3 && q.dim() == 3 && q.size(0) == g.size(0) && q.size(1) == g.size(1),
              "memopt adapprox kernel: g must be (B, m, n) and q (B, m, k)");
  const LowRank s{g.size(0), g.size(1), g.size(2), q.size(2)};
  TORCH_CHECK(s.k >= 1 && s.k <= 64, "memopt adapprox kernel: the rank must be in [1, 64], got ", s.k);
  if (ut) {
    check_f32(*ut, "ut");
    TORCH_CHECK(ut->dim() == 3 && ut->size(0) == s.B && ut->size(1) == s.k && ut->size(2) == s.n,
                "memopt adapprox kernel: ut must be (B, k, n)");
  }
  return s;
}

// Rows per task: enough work per thread that the fork/join cost is noise.
idx row_grain(idx n) { return std::max<idx>(1, kGrain / std::max<idx>(n, 1)); }


// acc += part (double), part = 0.
void flush_part(double* __restrict acc, float* __restrict part, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) {
    acc[j] += (double)part[j];
    part[j] = 0.0f;
  }
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

// (sum G*G in double, Z = Q^T (G*G) as (B, k, n)): the G*G products of a projection step, G read once.
std::tuple<double, torch::Tensor> lowrank_gram(torch::Tensor g, torch::Tensor q) {
  const LowRank s = lowrank_shapes(g, q, nullptr);
  const int nt = at::get_num_threads();
  auto z = torch::empty({s.B, s.k, s.n}, g.options());
  std::vector<double> zacc((size_t)nt * s.k * s.n), tot(nt);
  const float* gp = g.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  for (idx b = 0; b < s.B; ++b) {
    std::fill(zacc.begin(), zacc.end(), 0.0);
    const float* gb = gp + b * s.m * s.n;
    const float* qb = qp + b * s.m * s.k;
    at::parallel_for(0, s.m, row_grain(s.n), [&](idx lo, idx hi) {
      const int tid = at::get_thread_num();
      double* za = zacc.data() + (size_t)tid * s.k * s.n;
      std::vector<float> part((size_t)s.k * s.n, 0.0f);
      double t = 0.0;
      for (idx i = lo; i < hi; i += kBlockRows) {
        const idx nr = std::min(kBlockRows, hi - i);
        t += (double)gram_block(gb + i * s.n, qb + i * s.k, part.data(), nr, s.n, s.k);
        if ((i - lo) % kGramFlush == kGramFlush - kBlockRows || i + nr >= hi) flush_part(za, part.data(), s.k * s.n);
      }
      tot[tid] += t;
    });
    float* zb = zp + b * s.k * s.n;
    for (idx kk = 0; kk < s.k; ++kk)
      for (idx j = 0; j < s.n; ++j) {
        const idx x = panel_offset(kk, j, s.k, s.n);
        double acc = 0.0;
        for (int t = 0; t < nt; ++t) acc += zacc[(size_t)t * s.k * s.n + x];
        zb[kk * s.n + j] = (float)acc;
      }
  }
  double total = 0.0;
  for (double x : tot) total += x;
  return {total, z};
}

// out = Uhat for Vhat = Q U^T (ut = U^T, (B, k, n)), floored as uhat_sumsq; returns sum Uhat^2
// (double). Vhat is formed 8 rows x 16 columns at a time and never stored: out is written once.
double lowrank_uhat_sumsq(torch::Tensor g, torch::Tensor q, torch::Tensor ut, torch::Tensor out, double floor_c,
                          double eps) {
  const LowRank s = lowrank_shapes(g, q, &ut);
  check_same(g, out, "out");
  const float* gp = g.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* up = ut.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float c = (float)floor_c, fe = (float)eps;
  const bool zero = floor_c < 0.0;
  std::vector<double> part(at::get_num_threads(), 0.0);
  for (idx b = 0; b < s.B; ++b) {  // a block of rows shares one matrix's U^T
    const idx first = b * s.m;
    const std::vector<float> ub = to_panels(up + b * s.k * s.n, s.k, s.n);
    at::parallel_for(0, s.m, std::max<idx>(kBlockRows, row_grain(s.n)), [&](idx lo, idx hi) {
      double t = 0.0;
      for (idx i = lo; i < hi; i += kBlockRows) {
        const idx r = first + i;
        const idx nr = std::min(kBlockRows, hi - i);
        product_rows(qp + r * s.k, ub.data(), nr, s.n, s.k, op + r * s.n);
        t += uhat_rows(op + r * s.n, gp + r * s.n, nr, s.n, c, fe, zero);
      }
      part[at::get_thread_num()] += t;
    });
  }
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

// A sketch step's passes after S-RSI in one: out = Uhat for Vhat = Q U^T (floored as uhat_sumsq)
// and, for AS-RSI's error, each matrix's squared norms of V / scale and (V - Vhat) / scale with
// V = (1-beta2) G*G + beta2 Q_prev U_prev^T (lowrank.residual_norms_), V formed per row block and
// never stored. q_prev may have 0 columns (no history). Returns (sum Uhat^2, [|V|^2], [|R|^2]).
std::tuple<double, std::vector<double>, std::vector<double>> lowrank_sketch_uhat(
    torch::Tensor g, torch::Tensor q, torch::Tensor ut, torch::Tensor q_prev, torch::Tensor ut_prev, torch::Tensor out,
    double beta2, double scale, double floor_c, double eps) {
  const LowRank s = lowrank_shapes(g, q, &ut);
  check_same(g, out, "out");
  check_f32(q_prev, "q_prev");
  const idx kp = q_prev.dim() == 3 ? q_prev.size(2) : -1;
  TORCH_CHECK(kp >= 0 && kp <= 64 && q_prev.size(0) == s.B && q_prev.size(1) == s.m,
              "memopt adapprox kernel: q_prev must be (B, m, k') with k' <= 64");
  const bool history = kp > 0 && beta2 != 0.0;
  if (history) {
    check_f32(ut_prev, "ut_prev");
    TORCH_CHECK(ut_prev.dim() == 3 && ut_prev.size(0) == s.B && ut_prev.size(1) == kp && ut_prev.size(2) == s.n,
                "memopt adapprox kernel: ut_prev must be (B, k', n)");
  }
  const float* gp = g.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* up = ut.data_ptr<float>();
  const float* qpp = history ? q_prev.data_ptr<float>() : nullptr;
  const float* upp = history ? ut_prev.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float c = (float)floor_c, fe = (float)eps, omb = (float)(1.0 - beta2), b2 = (float)beta2,
              inv_s = (float)(1.0 / scale);
  const bool zero = floor_c < 0.0;
  const int nt = at::get_num_threads();
  std::vector<double> part(nt, 0.0), v2s(s.B), r2s(s.B);
  for (idx b = 0; b < s.B; ++b) {
    const idx first = b * s.m;
    const std::vector<float> ub = to_panels(up + b * s.k * s.n, s.k, s.n);
    const std::vector<float> upb = history ? to_panels(upp + b * kp * s.n, kp, s.n) : std::vector<float>();
    std::vector<double> v2(nt, 0.0), r2(nt, 0.0);
    at::parallel_for(0, s.m, std::max<idx>(kBlockRows, row_grain(s.n)), [&](idx lo, idx hi) {
      const int tid = at::get_thread_num();
      std::vector<float> vp((size_t)kBlockRows * s.n, 0.0f);
      double t = 0.0;
      for (idx i = lo; i < hi; i += kBlockRows) {
        const idx r = first + i, nr = std::min(kBlockRows, hi - i);
        float* u = op + r * s.n;
        const float* gr = gp + r * s.n;
        product_rows(qp + r * s.k, ub.data(), nr, s.n, s.k, u);
        if (history) product_rows(qpp + r * kp, upb.data(), nr, s.n, kp, vp.data());
        for (idx rr = 0; rr < nr; ++rr)
          residual_row(u + rr * s.n, vp.data() + rr * s.n, gr + rr * s.n, s.n, omb, b2, inv_s, v2[tid], r2[tid]);
        t += uhat_rows(u, gr, nr, s.n, c, fe, zero);
      }
      part[tid] += t;
    });
    for (int t = 0; t < nt; ++t) {
      v2s[b] += v2[t];
      r2s[b] += r2[t];
    }
  }
  double total = 0.0;
  for (double x : part) total += x;
  return {total, v2s, r2s};
}

// sum G*G in double (inf/nan when G holds one, or when a square overflows): a sketch step's
// finiteness check and scale, when its products form G*G themselves (lowrank_sx, lowrank_gram).
double sum_squares(torch::Tensor g) {
  check_f32(g, "g");
  const float* gp = g.data_ptr<float>();
  // sum_sq's two vector accumulators: the `omp simd` loop this replaces kept one, read at 1.6 G
  // elements/s (2 threads) where the memory stream allows 10.
  return parallel_block_sum(g.numel(), [=](idx lo, idx hi) { return sum_sq(gp + lo, hi - lo); });
}

// Rows [lo, hi) of (G*G) X, R rows at a time (one matrix: g (m, n), xp (n, 16 * RV)).
template <int R, int RV>
void sx_panel(const float* g, const float* xp, idx lo, idx hi, idx n, float* out) {
  for (idx i = lo; i < hi; i += R) sx_rows<R, RV>(g + i * n, xp, std::min<idx>(R, hi - i), n, out + i * 16 * RV);
}

// (G*G) X for g (B, m, n) and xp (B, n, 16 * RV) (X zero-padded to a multiple of 16 columns, at
// most 64): (B, m, 16 * RV), the padding columns zero. G*G is formed in registers, never stored.
torch::Tensor lowrank_sx(torch::Tensor g, torch::Tensor xp) {
  check_f32(g, "g");
  check_f32(xp, "xp");
  TORCH_CHECK(g.dim() == 3 && xp.dim() == 3 && xp.size(0) == g.size(0) && xp.size(1) == g.size(2),
              "memopt adapprox kernel: g must be (B, m, n) and xp (B, n, r)");
  const idx B = g.size(0), m = g.size(1), n = g.size(2), w = xp.size(2);
  TORCH_CHECK(w % 16 == 0 && w >= 16 && w <= 64, "memopt adapprox kernel: xp needs 16, 32, 48 or 64 columns");
  auto out = torch::empty({B, m, w}, g.options());
  const float* gp = g.data_ptr<float>();
  const float* xpp = xp.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (idx b = 0; b < B; ++b) {
    const float* gb = gp + b * m * n;
    const float* xb = xpp + b * n * w;
    float* ob = op + b * m * w;
    at::parallel_for(0, m, std::max<idx>(kBlockRows, row_grain(n)), [&](idx lo, idx hi) {
      switch (w / 16) {
        case 1: sx_panel<8, 1>(gb, xb, lo, hi, n, ob); break;
        case 2: sx_panel<8, 2>(gb, xb, lo, hi, n, ob); break;
        case 3: sx_panel<8, 3>(gb, xb, lo, hi, n, ob); break;
        default: sx_panel<6, 4>(gb, xb, lo, hi, n, ob); break;  // 8 x 4 accumulators would spill
      }
    });
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("sum_squares", &sum_squares, "sum G*G in double");
  mod.def("lowrank_sx", &lowrank_sx, "(G*G) X with G*G formed in registers");
  mod.def("lowrank_sketch_uhat", &lowrank_sketch_uhat, "Uhat, sum Uhat^2 and the residual norms of a sketch step");
  mod.def("lowrank_gram", &lowrank_gram, "(sum G*G, Q^T (G*G)) of a projection step, G read once");
  mod.def("lowrank_uhat_sumsq", &lowrank_uhat_sumsq, "Uhat (and sum Uhat^2) with Vhat = Q U^T formed per row block");
  mod.def("square_sum", &square_sum, "out = g*g; sum(out) in double");
  mod.def("uhat_sumsq", &uhat_sumsq, "Uhat in place over Q U^T; sum Uhat^2 in double");
  mod.def("apply_update", &apply_update, "first moment, weight decay and the step in one pass");
}
