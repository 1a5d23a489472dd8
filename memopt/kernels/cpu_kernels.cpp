// memopt's fused CPU kernels (memopt/kernels/__init__.py is the contract; memopt/kernels/cpu.py
// builds and calls this file). One call is the whole update of one parameter, in as few passes
// over memory as the algorithm allows:
//   Adafactor/AdaLomo (>= 2-D): pass 1 reads G (and W for RMS(W), unless speculated: see
//     factored_step) for the row sums, column sums and t_j = sum_i G_ij^2 / r_i, 4 rows at a time
//     (their sums first, then one update of the column accumulators for the 4); pass 2 reads G,
//     reads and writes W.  16 bytes/param (20 when W is read in pass 1).
//   CAME (>= 2-D): pass 1 as above; pass 2 reads G, updates M and sums the instability;
//     pass 3 reads M, updates W.  About 28 bytes/param.
//   LOMO: a finiteness pass over G, then one update pass.  16 bytes/param.
// Nothing is written before the gradient is known to be finite, so a skipped step leaves W and
// the state bit for bit unchanged. Every per-element expression follows the order of the torch
// reference path (memopt/factored.py, adafactor.py, came.py, lomo.py); sums over many elements
// are accumulated in double across rows (a row, or 16 updates of a column, in float; the reference
// sums in float), which keeps them within float round-off of the reference. Loops are written
// for the auto-vectoriser (`omp simd`) and rows are split across threads with at::parallel_for
// (torch's own OpenMP pool).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "vec16.h"

namespace {

using idx = int64_t;

// Rows per task: enough work per thread that the fork/join cost is noise.
idx grain_rows(idx n) { return std::max<idx>(1, (idx)32768 / std::max<idx>(n, 1)); }

// Python's max(1.0, x) / max(lo, x): x only when it is larger (a nan gives the bound).
double py_max(double lo, double x) { return x > lo ? x : lo; }

// The hot loops, one row (or one block) each. They are functions of restrict pointers and scalars
// passed by value, not loops in the at::parallel_for lambdas: there every pointer and scalar is
// read through the closure, which GCC cannot prove the stores leave alone, and the loops ran
// 2.5x slower (LOMO, 1 thread: 26 vs 10.7 ms on 19M elements).
// Vectors and sum_sq: vec16.h.

// One pass over a W row that updates it and measures it: w_j <- op(j, w_j) (vop on 16 lanes at
// j, sop on one element in the tail), returning sum_sq of the row before and after, in sum_sq's
// order. Pass 2 of Adafactor/AdaLomo reads the row once for all three.
template <class VOp, class SOp>
inline void update_row_measured(float* __restrict w, idx n, VOp vop, SOp sop, float& before, float& after) {
  vf16 b0 = {}, b1 = {}, a0 = {}, a1 = {};
  idx j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    vf16 w0 = load16(w + j), w1 = load16(w + j + kLanes);
    b0 += w0 * w0;
    b1 += w1 * w1;
    w0 = vop(j, w0);
    w1 = vop(j + kLanes, w1);
    store16(w + j, w0);
    store16(w + j + kLanes, w1);
    a0 += w0 * w0;
    a1 += w1 * w1;
  }
  float bt = 0.0f, at = 0.0f;
  for (; j < n; ++j) {
    float x = w[j];
    bt += x * x;
    x = sop(j, x);
    w[j] = x;
    at += x * x;
  }
  before = lanes_sum(b0 + b1) + bt;
  after = lanes_sum(a0 + a1) + at;
}

// col_j += G_j^2, t_j += G_j^2 / r_i over one row, in float (see kFlushUpdates).
void accumulate_cols(const float* __restrict g, float* __restrict col, float* __restrict t, float inv_r, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) {
    const float x = g[j] * g[j];
    col[j] += x;
    t[j] += x * inv_r;
  }
}

// accumulate_cols for 4 rows at once: col and t are loaded and stored once per 4 rows.
void accumulate_cols4(const float* __restrict g0, const float* __restrict g1, const float* __restrict g2,
                      const float* __restrict g3, float* __restrict col, float* __restrict t, const float* ir, idx n) {
  const float i0 = ir[0], i1 = ir[1], i2 = ir[2], i3 = ir[3];
#pragma omp simd
  for (idx j = 0; j < n; ++j) {
    const float x0 = g0[j] * g0[j], x1 = g1[j] * g1[j], x2 = g2[j] * g2[j], x3 = g3[j] * g3[j];
    col[j] += (x0 + x1) + (x2 + x3);
    t[j] += (x0 * i0 + x1 * i1) + (x2 * i2 + x3 * i3);
  }
}

// acc_j += part_j (double), part_j = 0.
void flush_cols(double* __restrict acc, float* __restrict part, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) {
    acc[j] += (double)part[j];
    part[j] = 0.0f;
  }
}

// Column sums are accumulated in float over this many updates, then added to a double total (a
// float sum of 16 terms is within a few ulps). Pass 1 adds 4 rows in registers per update, so it
// flushes once per 64 rows: flushing (a read-modify-write of two n-double arrays, what
// accumulating in double costs) every 16 rows took a fifth of pass 1 (28.2 vs 22.9 ms on the
// GPT-2 124M matrices, 2 threads). CAME's pass 2 updates once per row: 16 rows.
constexpr idx kFlushUpdates = 16;

// w = w * f (lomo_optim's decay) or w = w + f * w (transformers').
void scale_row(float* __restrict w, float f, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] * f;
}

void add_scaled_self(float* __restrict w, float f, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] + f * w[j];
}

// w += (g * coef) * s_j
void factored_row(float* __restrict w, const float* __restrict g, const float* __restrict s, float coef, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] + (g[j] * coef) * s[j];
}

// M = b1*M + (g * coef) * s_j; w += neg_lr * M
void factored_row_momentum(float* __restrict w, float* __restrict mo, const float* __restrict g,
                           const float* __restrict s, float coef, float b1, float neg_lr, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) {
    mo[j] = mo[j] * b1 + (g[j] * coef) * s[j];
    w[j] = w[j] + neg_lr * mo[j];
  }
}

// CAME pass 2 of one row: U = (g*coef)*s_j, M = b1*M + ob1*U, col_j += (U-M)^2; returns the row's sum.
// (The row sum in two vector accumulators, as sum_sq: one `omp simd` accumulator made this
// pass compute-bound on one thread.)
float came_moment_row(const float* __restrict g, float* __restrict mo, const float* __restrict s,
                      float* __restrict col, float coef, float b1, float ob1, idx n) {
  auto lanes = [&](idx j) {
    const vf16 u = (load16(g + j) * coef) * load16(s + j);
    const vf16 mn = load16(mo + j) * b1 + ob1 * u;
    store16(mo + j, mn);
    const vf16 d = u - mn;
    const vf16 r2 = d * d;
    store16(col + j, load16(col + j) + r2);
    return r2;
  };
  vf16 a0 = {}, a1 = {};
  idx j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    a0 += lanes(j);
    a1 += lanes(j + kLanes);
  }
  float tail = 0.0f;
  for (; j < n; ++j) {
    const float u = (g[j] * coef) * s[j];
    const float mn = mo[j] * b1 + ob1 * u;
    mo[j] = mn;
    const float d = u - mn;
    const float r2 = d * d;
    tail += r2;
    col[j] += r2;
  }
  return lanes_sum(a0 + a1) + tail;
}

// w += (M * ra) * rs_j
void came_apply_row(float* __restrict w, const float* __restrict mo, const float* __restrict rs, float ra, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] + (mo[j] * ra) * rs[j];
}

// w = w + a * g, or w = w * f + a * g
void axpy(float* __restrict w, const float* __restrict g, float a, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] + a * g[j];
}

void scale_axpy(float* __restrict w, const float* __restrict g, float f, float a, idx n) {
#pragma omp simd
  for (idx j = 0; j < n; ++j) w[j] = w[j] * f + a * g[j];
}

float* fptr(const torch::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              "memopt cpu kernel: ", name, " must be a contiguous fp32 CPU tensor");
}

// The parameter and its gradient: fp32, contiguous, CPU, same shape. Returns the element count.
idx check_pair(const torch::Tensor& w, const torch::Tensor& g) {
  check_f32(w, "w");
  check_f32(g, "g");
  TORCH_CHECK(w.sizes() == g.sizes(), "memopt cpu kernel: w and g must have the same shape");
  return w.numel();
}

// Pass 1 of one (m, n) matrix: the new row factor r_new, column sums of G^2 and t (double, summed
// over threads), the total of the row sums (finiteness), and sum W^2 when w is given.
struct Stats {
  std::vector<float> r_new;
  std::vector<float> w_rows;  // each row's sum of W^2 (when W is read)
  std::vector<double> col, t;
  double row_total = 0.0;
};

void factored_pass1(const float* g, const float* w, const float* r_old, idx m, idx n, float beta,
                    float ob_over_n, float eps1_n, Stats& s) {
  const int nt = at::get_num_threads();
  s.r_new.assign(m, 0.0f);
  s.w_rows.assign(w ? m : 0, 0.0f);
  std::vector<double> col_acc((size_t)nt * n, 0.0), t_acc((size_t)nt * n, 0.0);
  std::vector<double> row_tot(nt, 0.0);
  float* r_new = s.r_new.data();
  at::parallel_for(0, m, grain_rows(n), [&](idx b, idx e) {
    const int tid = at::get_thread_num();
    double* cl = col_acc.data() + (size_t)tid * n;
    double* tl = t_acc.data() + (size_t)tid * n;
    double rt = 0.0;
    std::vector<float> col_part(n, 0.0f), t_part(n, 0.0f);
    for (idx i = b; i < e; i += 4) {
      const idx nr = std::min<idx>(4, e - i);
      float ir[4];
      for (idx q = 0; q < nr; ++q) {
        const float rs = sum_sq(g + (i + q) * n, n);
        // factored_stats: (row_sq + eps1*n) * ((1-beta)/n) + beta * r_old
        const float rn = (rs + eps1_n) * ob_over_n + beta * r_old[i + q];
        r_new[i + q] = rn;
        rt += rs;
        ir[q] = 1.0f / rn;
        if (w) s.w_rows[i + q] = sum_sq(w + (i + q) * n, n);
      }
      const float* gi = g + i * n;
      if (nr == 4)
        accumulate_cols4(gi, gi + n, gi + 2 * n, gi + 3 * n, col_part.data(), t_part.data(), ir, n);
      else
        for (idx q = 0; q < nr; ++q) accumulate_cols(gi + q * n, col_part.data(), t_part.data(), ir[q], n);
      if ((i - b) % (4 * kFlushUpdates) == 4 * kFlushUpdates - 4 || i + nr >= e) {
        flush_cols(cl, col_part.data(), n);
        flush_cols(tl, t_part.data(), n);
      }
    }
    row_tot[tid] += rt;
  });
  s.col.assign(n, 0.0);
  s.t.assign(n, 0.0);
  for (int k = 0; k < nt; ++k) {
    const double* cl = col_acc.data() + (size_t)k * n;
    const double* tl = t_acc.data() + (size_t)k * n;
    for (idx j = 0; j < n; ++j) {
      s.col[j] += cl[j];
      s.t[j] += tl[j];
    }
    s.row_total += row_tot[k];
  }
}

// commit_factors: r <- r_new, c <- beta*c + (1-beta)*(col/m + eps1); a = rsqrt(r/mean r),
// s = sqrt(1/c). Returns sum U^2 = mean(r) * sum_j t_j / c_j.
double commit_factors(const Stats& st, float* r, float* c, idx m, idx n, float beta, float omb, float eps1,
                      std::vector<float>& a, std::vector<float>& s) {
  double rsum = 0.0;
  for (idx i = 0; i < m; ++i) {
    r[i] = st.r_new[i];
    rsum += r[i];
  }
  const float r_mean = (float)(rsum / (double)m);
  a.resize(m);
  for (idx i = 0; i < m; ++i) a[i] = 1.0f / std::sqrt(r[i] / r_mean);
  s.resize(n);
  double dot = 0.0;
  for (idx j = 0; j < n; ++j) {
    const float cm = (float)st.col[j] / (float)m + eps1;
    c[j] = c[j] * beta + omb * cm;
    const float inv_c = 1.0f / c[j];
    s[j] = std::sqrt(inv_c);
    dot += st.t[j] * (double)inv_c;
  }
  return (double)r_mean * dot;
}

void apply_decay(float* w, idx n, float decay, bool multiplicative) {
  if (multiplicative)
    scale_row(w, 1.0f - decay, n);  // lomo_optim: w *= 1 - d
  else
    add_scaled_self(w, -decay, n);  // transformers: w += -d * w
}

// The dense (1-D / 0-D) second moment: small tensors (biases, norms), one thread.
std::tuple<bool, double> dense_adafactor(float* w, const float* g, float* v, float* mom, idx numel, float beta,
                                         float omb, float eps1, double eps2, double rho, double clip, double wd,
                                         bool mult, bool scale_param, double beta1) {
  float g2s = 0.0f;
  double w_sq = 0.0;
  for (idx j = 0; j < numel; ++j) {
    g2s += g[j] * g[j];
    w_sq += (double)(w[j] * w[j]);
  }
  if (!std::isfinite(g2s)) return {false, 1.0};
  double u2 = 0.0;
  for (idx j = 0; j < numel; ++j) {
    v[j] = v[j] * beta + omb * (g[j] * g[j] + eps1);
    const float u = g[j] * (1.0f / std::sqrt(v[j]));
    u2 += (double)(u * u);
  }
  const double div = py_max(1.0, std::sqrt((double)(float)u2 / (double)std::max<idx>(numel, 1)) / clip);
  double scale = 1.0;
  if (scale_param) scale = py_max(eps2, std::sqrt(w_sq) / std::sqrt((double)std::max<idx>(numel, 1)));
  const double lr_t = rho * scale;
  if (wd != 0.0) apply_decay(w, numel, (float)(lr_t * wd), mult);
  const float fdiv = (float)div, neg_lr = (float)(-lr_t), b1 = (float)beta1, ob1 = (float)(1.0 - beta1);
  for (idx j = 0; j < numel; ++j) {
    float u = g[j] * (1.0f / std::sqrt(v[j])) / fdiv;
    if (mom) {
      mom[j] = mom[j] * b1 + ob1 * u;
      u = mom[j];
    }
    w[j] = w[j] + neg_lr * u;
  }
  return {true, scale};
}

// Pass 2 of one row: decay, then w += (g*coef)*s_j, or M = b1*M + (g*coef)*s_j and w += neg_lr*M.
void factored_update_row(float* wi, const float* gi, float* mi, const float* s, float coef, float decay, bool wd,
                         bool mult, float b1, float neg_lr, idx n) {
  if (wd) apply_decay(wi, n, decay, mult);
  if (!mi)
    factored_row(wi, gi, s, coef, n);
  else
    factored_row_momentum(wi, mi, gi, s, coef, b1, neg_lr, n);
}

// The inverse of factored_update_row given the same scalars (M already updated): W before the
// update, up to one rounding per element (the repair below, after a wrong speculation).
void undo_update_row(float* __restrict wi, const float* __restrict gi, const float* __restrict mi,
                     const float* __restrict s, float coef, float decay, bool wd, bool mult, float neg_lr, idx n) {
  if (!mi) {
#pragma omp simd
    for (idx j = 0; j < n; ++j) wi[j] = wi[j] - (gi[j] * coef) * s[j];
  } else {
#pragma omp simd
    for (idx j = 0; j < n; ++j) wi[j] = wi[j] - neg_lr * mi[j];
  }
  if (wd) {
    const float f = mult ? 1.0f - decay : 1.0f + (-decay);
#pragma omp simd
    for (idx j = 0; j < n; ++j) wi[j] = wi[j] / f;
  }
}

}  // namespace

// Adafactor / AdaLomo. Returns (ok, scale, repaired) with scale = max(eps2, RMS(W)) or 1.
//
// RMS(W) (scale_parameter) needs sum W^2 before the first element of W may change, which is a
// read of W in pass 1: a quarter of the step's reads. With ``w_row_sq`` (one float per row of
// every matrix) the kernel keeps the rows' sums of squares of the W it wrote, and with
// ``cache_valid`` it *speculates* that W is still what it wrote: lr_t comes from those sums and
// pass 1 reads G only. Pass 2 reads every row of W anyway, so it checks the speculation there:
// it recomputes each row's sum of squares (the same function on the same floats, so equal bit
// for bit when the row is unchanged). Anything that wrote W in between (a checkpoint load
// through .data, weight averaging, a user's edit) makes some row differ; then lr_t is recomputed
// from the sums just measured and every row is repaired (the update undone and redone with the
// right scalars; one extra rounding per element, ~1e-7 relative) and ``repaired`` is true. The
// speculation is not made when the decay factor 1 - lr_t*wd is below 0.5 (the undo divides by it).
std::tuple<bool, double, bool> factored_step(torch::Tensor w, torch::Tensor g, torch::Tensor sq_row,
                                             torch::Tensor sq_col, torch::Tensor sq, torch::Tensor exp_avg,
                                             double beta2, double eps1, double eps2, double step_size, double clip,
                                             double wd, bool mult, bool scale_param, double beta1, bool has_beta1,
                                             torch::Tensor w_row_sq, bool cache_valid) {
  const idx numel = check_pair(w, g);
  if (numel == 0) return {true, scale_param ? eps2 : 1.0, false};
  float* wp = w.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = has_beta1 ? fptr(exp_avg) : nullptr;
  const float beta = (float)beta2, omb = (float)(1.0 - beta2);
  if (w.dim() < 2) {
    check_f32(sq, "sq");
    auto [ok, scale] = dense_adafactor(wp, gp, sq.data_ptr<float>(), mp, numel, beta, omb, (float)eps1, eps2,
                                       step_size, clip, wd, mult, scale_param, beta1);
    return {ok, scale, false};
  }
  check_f32(sq_row, "sq_row");
  check_f32(sq_col, "sq_col");
  const idx n = w.size(-1), m = w.size(-2), batch = numel / (m * n);
  // The row-sum cache: used only with scale_parameter and the right size.
  float* cache = nullptr;
  if (scale_param && w_row_sq.defined() && w_row_sq.numel() == batch * m) {
    check_f32(w_row_sq, "w_row_sq");
    cache = w_row_sq.data_ptr<float>();
  }
  bool speculate = cache != nullptr && cache_valid;
  double w_sq = 0.0;
  if (speculate) {
    for (idx r = 0; r < batch * m; ++r) w_sq += (double)cache[r];
    const double lr_s = step_size * py_max(eps2, std::sqrt(w_sq / (double)numel));
    if (!std::isfinite(w_sq) || (wd != 0.0 && !(1.0 - lr_s * wd >= 0.5))) {
      speculate = false;
      w_sq = 0.0;
    }
  }
  std::vector<Stats> stats(batch);
  double row_total = 0.0;
  float* rp = sq_row.data_ptr<float>();
  float* cp = sq_col.data_ptr<float>();
  const bool read_w = scale_param && !speculate;
  for (idx k = 0; k < batch; ++k) {
    factored_pass1(gp + k * m * n, read_w ? wp + k * m * n : nullptr, rp + k * m, m, n, beta,
                   (float)((1.0 - beta2) / (double)n), (float)(eps1 * (double)n), stats[k]);
    row_total += stats[k].row_total;
  }
  // sum W^2 = the rows' float sums added in row order in double: the order the speculation
  // above adds its cached sums in, so both give the same bits for the same W (and any thread count).
  if (read_w)
    for (idx k = 0; k < batch; ++k)
      for (float x : stats[k].w_rows) w_sq += (double)x;
  if (!std::isfinite((float)row_total)) return {false, 1.0, false};
  double scale = 1.0;
  if (scale_param) scale = py_max(eps2, std::sqrt(w_sq / (double)numel));
  std::vector<std::vector<float>> as(batch), ss(batch);
  double sum_u2 = 0.0;
  for (idx k = 0; k < batch; ++k)
    sum_u2 += commit_factors(stats[k], rp + k * m, cp + k * n, m, n, beta, omb, (float)eps1, as[k], ss[k]);
  const double div = py_max(1.0, std::sqrt((double)(float)sum_u2 / (double)numel) / clip);
  // The per-step scalars of pass 2, from a scale (the speculated one, or the measured one).
  struct Scalars {
    float decay, coef_scale, neg_lr;
  };
  auto scalars_for = [&](double sc) {
    const double lr_t = step_size * sc;
    // Without a first moment: w += (g * a_i*(-lr_t/div)) * s_j; with one: M = b1*M + U(1-b1)/div.
    return Scalars{(float)(lr_t * wd), has_beta1 ? (float)((1.0 - beta1) / div) : (float)(-lr_t / div),
                   (float)(-lr_t)};
  };
  const Scalars sc = scalars_for(scale);
  const float b1 = (float)beta1;
  const bool decays = wd != 0.0;
  const int nt = at::get_num_threads();
  std::vector<float> old_sq(speculate ? batch * m : 0);
  std::vector<char> differs(nt, 0);
  // Every row of every matrix, rows split over threads: fn(row index, a_i, s, W row, G row, M row, thread).
  auto for_each_row = [&](auto&& fn) {
    for (idx k = 0; k < batch; ++k) {
      const float* a = as[k].data();
      const float* s = ss[k].data();
      at::parallel_for(0, m, grain_rows(n), [&](idx b, idx e) {
        const int tid = at::get_thread_num();
        for (idx i = b; i < e; ++i) {
          const idx r = k * m + i;
          fn(r, a[i], s, wp + r * n, gp + r * n, mp ? mp + r * n : nullptr, tid);
        }
      });
    }
  };
  for_each_row([&](idx r, float ai, const float* s, float* wi, const float* gi, float* mi, int tid) {
    const float coef = ai * sc.coef_scale;
    if (cache && !decays) {  // the default: the row read once for its old sum, update and new sum
      float before, after;
      if (!mi) {
        update_row_measured(
            wi, n, [&](idx j, vf16 x) { return x + (load16(gi + j) * coef) * load16(s + j); },
            [&](idx j, float x) { return x + (gi[j] * coef) * s[j]; }, before, after);
      } else {
        const float neg_lr = sc.neg_lr;
        update_row_measured(
            wi, n,
            [&](idx j, vf16 x) {
              const vf16 mn = load16(mi + j) * b1 + (load16(gi + j) * coef) * load16(s + j);
              store16(mi + j, mn);
              return x + neg_lr * mn;
            },
            [&](idx j, float x) {
              mi[j] = mi[j] * b1 + (gi[j] * coef) * s[j];
              return x + neg_lr * mi[j];
            },
            before, after);
      }
      if (speculate) {
        old_sq[r] = before;
        if (!(before == cache[r])) differs[tid] = 1;
      }
      cache[r] = after;
      return;
    }
    if (speculate) {
      const float before = sum_sq(wi, n);  // brings the row into L1 for the update
      old_sq[r] = before;
      if (!(before == cache[r])) differs[tid] = 1;
    }
    factored_update_row(wi, gi, mi, s, coef, sc.decay, decays, mult, b1, sc.neg_lr, n);
    if (cache) cache[r] = sum_sq(wi, n);  // still in L1
  });
  bool repaired = false;
  if (speculate && std::any_of(differs.begin(), differs.end(), [](char c) { return c != 0; })) {
    double measured = 0.0;
    for (float x : old_sq) measured += (double)x;
    const double true_scale = py_max(eps2, std::sqrt(measured / (double)numel));
    const Scalars tc = scalars_for(true_scale);
    scale = true_scale;
    if (tc.decay != sc.decay || tc.coef_scale != sc.coef_scale || tc.neg_lr != sc.neg_lr) {
      repaired = true;
      for_each_row([&](idx r, float ai, const float* s, float* wi, const float* gi, float* mi, int) {
        undo_update_row(wi, gi, mi, s, ai * sc.coef_scale, sc.decay, decays, mult, sc.neg_lr, n);
        // M is already this step's: the redo only writes W.
        if (decays) apply_decay(wi, n, tc.decay, mult);
        if (!mi)
          factored_row(wi, gi, s, ai * tc.coef_scale, n);
        else
          axpy(wi, mi, tc.neg_lr, n);
        cache[r] = sum_sq(wi, n);
      });
    }
  }
  return {true, scale, repaired};
}

// CAME. Returns ok.
bool came_step(torch::Tensor w, torch::Tensor g, torch::Tensor exp_avg, torch::Tensor sq_row, torch::Tensor sq_col,
               torch::Tensor res_row, torch::Tensor res_col, torch::Tensor sq, double lr, double beta1, double beta2,
               double beta3, double eps1, double eps2, double clip, double wd) {
  const idx numel = check_pair(w, g);
  check_f32(exp_avg, "exp_avg");
  if (numel == 0) return true;
  float* wp = w.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* mp = exp_avg.data_ptr<float>();
  const float beta = (float)beta2, omb = (float)(1.0 - beta2);
  const float b1 = (float)beta1, ob1 = (float)(1.0 - beta1);
  const float neg_lr_wd = (float)(-(lr * wd));
  if (w.dim() < 2) {
    check_f32(sq, "sq");
    float* v = sq.data_ptr<float>();
    float g2s = 0.0f;
    for (idx j = 0; j < numel; ++j) g2s += gp[j] * gp[j];
    if (!std::isfinite(g2s)) return false;
    double u2 = 0.0;
    for (idx j = 0; j < numel; ++j) {
      v[j] = v[j] * beta + omb * (gp[j] * gp[j] + (float)eps1);
      const float u = gp[j] * (1.0f / std::sqrt(v[j]));
      u2 += (double)(u * u);
    }
    const float fdiv = (float)py_max(1.0, std::sqrt((double)(float)u2 / (double)numel) / clip);
    const float neg_lr = (float)(-lr);
    for (idx j = 0; j < numel; ++j) {
      const float u = gp[j] * (1.0f / std::sqrt(v[j])) / fdiv;
      mp[j] = mp[j] * b1 + ob1 * u;
      if (wd != 0.0) wp[j] = wp[j] + neg_lr_wd * wp[j];
      wp[j] = wp[j] + neg_lr * mp[j];
    }
    return true;
  }
  for (const auto* t : {&sq_row, &sq_col, &res_row, &res_col}) check_f32(*t, "a CAME factor");
  const idx n = w.size(-1), m = w.size(-2), batch = numel / (m * n);
  std::vector<Stats> stats(batch);
  double row_total = 0.0;
  float* rp = sq_row.data_ptr<float>();
  float* cp = sq_col.data_ptr<float>();
  for (idx k = 0; k < batch; ++k) {
    factored_pass1(gp + k * m * n, nullptr, rp + k * m, m, n, beta, (float)((1.0 - beta2) / (double)n),
                   (float)(eps1 * (double)n), stats[k]);
    row_total += stats[k].row_total;
  }
  if (!std::isfinite((float)row_total)) return false;
  std::vector<std::vector<float>> as(batch), ss(batch);
  double sum_u2 = 0.0;
  for (idx k = 0; k < batch; ++k)
    sum_u2 += commit_factors(stats[k], rp + k * m, cp + k * n, m, n, beta, omb, (float)eps1, as[k], ss[k]);
  const float fdiv = (float)py_max(1.0, std::sqrt((double)(float)sum_u2 / (double)numel) / clip);
  const int nt = at::get_num_threads();
  const float b3 = (float)beta3, ob3 = (float)(1.0 - beta3), e2 = (float)eps2, neg_lr = (float)(-lr);
  float* rr_all = res_row.data_ptr<float>();
  float* rc_all = res_col.data_ptr<float>();
  std::vector<float> res_rows(m), ra(m), rs(n);
  std::vector<double> col_acc;
  for (idx k = 0; k < batch; ++k) {
    const float* a = as[k].data();
    const float* s = ss[k].data();
    const float* gk = gp + k * m * n;
    float* mk = mp + k * m * n;
    float* wk = wp + k * m * n;
    col_acc.assign((size_t)nt * n, 0.0);
    // Pass 2: U (clipped), M = b1*M + (1-b1)*U, row and column sums of (U - M)^2.
    at::parallel_for(0, m, grain_rows(n), [&](idx b, idx e) {
      double* cl = col_acc.data() + (size_t)at::get_thread_num() * n;
      std::vector<float> col_part(n, 0.0f);
      for (idx i = b; i < e; ++i) {
        res_rows[i] = came_moment_row(gk + i * n, mk + i * n, s, col_part.data(), a[i] / fdiv, b1, ob1, n);
        if ((i - b) % kFlushUpdates == kFlushUpdates - 1 || i == e - 1) flush_cols(cl, col_part.data(), n);
      }
    });
    // The instability EMA (beta3) and its factors ra = -lr * rsqrt(R / mean R), rs = rsqrt(C).
    float* rr = rr_all + k * m;
    float* rc = rc_all + k * n;
    double rr_sum = 0.0;
    for (idx i = 0; i < m; ++i) {
      rr[i] = rr[i] * b3 + ob3 * (res_rows[i] / (float)n + e2);
      rr_sum += rr[i];
    }
    const float rr_mean = (float)(rr_sum / (double)m);
    for (idx i = 0; i < m; ++i) ra[i] = (1.0f / std::sqrt(rr[i] / rr_mean)) * neg_lr;
    for (idx j = 0; j < n; ++j) {
      double cs = 0.0;
      for (int t = 0; t < nt; ++t) cs += col_acc[(size_t)t * n + j];
      rc[j] = rc[j] * b3 + ob3 * ((float)cs / (float)m + e2);
      rs[j] = 1.0f / std::sqrt(rc[j]);
    }
    // Pass 3: W += -lr*wd*W; W += (M * ra_i) * rs_j.
    at::parallel_for(0, m, grain_rows(n), [&](idx b, idx e) {
      for (idx i = b; i < e; ++i) {
        float* wi = wk + i * n;
        if (wd != 0.0) add_scaled_self(wi, neg_lr_wd, n);
        came_apply_row(wi, mk + i * n, rs.data(), ra[i], n);
      }
    });
  }
  return true;
}

// LOMO: W *= 1 - lr*wd; W -= lr*G, after checking that sum G^2 is finite. Returns ok.
bool lomo_step(torch::Tensor w, torch::Tensor g, double lr, double wd) {
  const idx numel = check_pair(w, g);
  if (numel == 0) return true;
  float* wp = w.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const idx grain = 1 << 16;
  const int nt = at::get_num_threads();
  std::vector<float> part(nt, 0.0f);
  at::parallel_for(0, numel, grain, [&](idx b, idx e) { part[at::get_thread_num()] += sum_sq(gp + b, e - b); });
  float total = 0.0f;
  for (float x : part) total += x;
  if (!std::isfinite(total)) return false;
  const float f = (float)(1.0 - lr * wd), neg_lr = (float)(-lr);
  const bool decay = wd != 0.0;
  at::parallel_for(0, numel, grain, [&](idx b, idx e) {
    if (decay)
      scale_axpy(wp + b, gp + b, f, neg_lr, e - b);
    else
      axpy(wp + b, gp + b, neg_lr, e - b);
  });
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("factored_step", &factored_step, "Adafactor/AdaLomo fused update of one parameter");
  mod.def("came_step", &came_step, "CAME fused update of one parameter");
  mod.def("lomo_step", &lomo_step, "LOMO fused update of one parameter");
}
