// CPU kernels of zoo.models.sketch_rnn's FusedScan (one LSTM direction with a plain, layer- or
// RMS-normalized cell) and BatchNormScan (recurrent batch norm, further below): a whole sequence,
// forward and hand-written back-propagation through time.
//
// Why C++: at the sizes Sketch-RNN trains with, a step of the Python scan is ~10 element-wise torch
// ops per direction (forward and backward), and their dispatch and memory passes cost as much as the
// recurrent matmul. Here a step is the matmul, one fused loop per row (norm statistics, affine, cell
// update, norm backward, gain/shift gradients) and the vectorized sigmoid/tanh of ATen.
//
// Shapes (L steps, B batch, H hidden, gates in torch's order i, f, g, o):
//   xw (L, B, 4H) input projections; h0, c0 (B, H); w_hh (4H, H); g_gamma, g_beta (4H,);
//   c_gamma, c_beta (H,); keep (L, B, H) recurrent-dropout multipliers of the candidate g, or empty.
// The math is the Python scans' (zoo/models/sketch_rnn.py), which the tests compare these with.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kNone = 0, kLayer = 1;  // kind 2 is rms: no centering

// Mean (0 unless layer norm) and 1 / sqrt(variance + eps) of n values; two passes, stable in float32.
template <typename S>
inline void moments(const S* x, int64_t n, int64_t kind, double eps, S& mean, S& rstd) {
  S m = 0;
  if (kind == kLayer) {
    S s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += x[j];
    m = s / n;
  }
  S v = 0;
#pragma omp simd reduction(+ : v)
  for (int64_t j = 0; j < n; ++j) v += (x[j] - m) * (x[j] - m);
  mean = m;
  rstd = S(1) / std::sqrt(v / n + S(eps));
}

// y = (x - mean) * rstd * gamma + beta
template <typename S>
inline void normalize(const S* x, int64_t n, S mean, S rstd, const S* gamma, const S* beta, S* y) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd * gamma[j] + beta[j];
}

// Gradient of `normalize` w.r.t. x for dy = dL/dy, with G = dy * gamma and xhat = (x - mean) * rstd:
// dx = rstd * (G - mean(G) - xhat * mean(G * xhat)) (no mean(G) term without centering);
// accumulates dgamma += dy * xhat and dbeta += dy.
template <typename S>
inline void normalize_backward(const S* dy, const S* x, int64_t n, int64_t kind, S mean, S rstd, const S* gamma,
                               S* dx, S* dgamma, S* dbeta) {
  S sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
  for (int64_t j = 0; j < n; ++j) {
    const S xh = (x[j] - mean) * rstd, g = dy[j] * gamma[j];
    sg += g;
    sgx += g * xh;
    dgamma[j] += dy[j] * xh;
    dbeta[j] += dy[j];
  }
  const S a = kind == kLayer ? sg / n : S(0), b = sgx / n;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (dy[j] * gamma[j] - a - (x[j] - mean) * rstd * b);
}

// Rows per parallel task: enough work per task to be worth a thread.
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// Returns the hidden states h (L, B, H) and the last cell state (B, H), then what the backward pass
// reads: hs (L+1, B, H) (h0 and h), cs (L+1, B, H) (raw cell states), acts (L, B, 4H) (sigmoid i, f, o and
// tanh g before dropout), tcs (L, B, H) (tanh of the normalized cell), pre (L, B, 4H) (gate
// pre-activations before the norm; empty for kind none), g_mean, g_rstd (L, B, 4), c_mean, c_rstd (L, B)
// (empty for none).
std::vector<Tensor> lstm_scan_forward(int64_t kind, double eps, const Tensor& xw_, const Tensor& h0,
                                      const Tensor& c0, const Tensor& w_hh, const Tensor& g_gamma,
                                      const Tensor& g_beta, const Tensor& c_gamma, const Tensor& c_beta,
                                      const Tensor& keep_) {
  TORCH_CHECK(xw_.device().is_cpu(), "zoo::lstm_scan_forward is a CPU kernel, got ", xw_.device());
  const Tensor xw = xw_.contiguous(), keep = keep_.contiguous();
  const int64_t L = xw.size(0), B = xw.size(1), H4 = xw.size(2), H = H4 / 4;
  const bool norm = kind != kNone, drop = keep.numel() > 0;
  const auto opts = xw.options();
  const int64_t Ln = norm ? L : 0;
  Tensor hs = at::empty({L + 1, B, H}, opts), cs = at::empty({L + 1, B, H}, opts);
  Tensor acts = at::empty({L, B, H4}, opts), tcs = at::empty({L, B, H}, opts), pre = at::empty({Ln, B, H4}, opts);
  Tensor g_mean = at::empty({Ln, B, 4}, opts), g_rstd = at::empty({Ln, B, 4}, opts);
  Tensor c_mean = at::empty({Ln, B}, opts), c_rstd = at::empty({Ln, B}, opts);
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  const Tensor wt = w_hh.t();
  const Tensor gg_ = g_gamma.contiguous(), gb_ = g_beta.contiguous(), cg_ = c_gamma.contiguous(),
               cb_ = c_beta.contiguous();
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "lstm_scan_forward", [&] {
    using S = scalar_t;
    const S *gg = norm ? gg_.data_ptr<S>() : nullptr, *gb = norm ? gb_.data_ptr<S>() : nullptr;
    const S *cg = norm ? cg_.data_ptr<S>() : nullptr, *cb = norm ? cb_.data_ptr<S>() : nullptr;
    S* cp = cs.data_ptr<S>();
    S* ap = acts.data_ptr<S>();
    S* tp = tcs.data_ptr<S>();
    const S* kp = drop ? keep.data_ptr<S>() : nullptr;
    for (int64_t t = 0; t < L; ++t) {
      Tensor a = acts[t];
      S* at_ = ap + t * B * H4;
      if (norm) {
        Tensor p = pre[t];
        at::addmm_out(p, xw[t], hs[t], wt);
        const S* pp = p.data_ptr<S>();
        S* gm = g_mean.data_ptr<S>() + t * B * 4;
        S* gr = g_rstd.data_ptr<S>() + t * B * 4;
        at::parallel_for(0, B, grain(H4), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b)
            for (int64_t k = 0; k < 4; ++k) {
              const int64_t o = b * H4 + k * H;
              moments(pp + o, H, kind, eps, gm[b * 4 + k], gr[b * 4 + k]);
              normalize(pp + o, H, gm[b * 4 + k], gr[b * 4 + k], gg + k * H, gb + k * H, at_ + o);
            }
        });
      } else {
        at::addmm_out(a, xw[t], hs[t], wt);
      }
      a.narrow(1, 0, 2 * H).sigmoid_();
      a.narrow(1, 2 * H, H).tanh_();
      a.narrow(1, 3 * H, H).sigmoid_();
      S* cm = norm ? c_mean.data_ptr<S>() + t * B : nullptr;
      S* cr = norm ? c_rstd.data_ptr<S>() + t * B : nullptr;
      at::parallel_for(0, B, grain(H4), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const S *i = at_ + b * H4, *f = i + H, *g = i + 2 * H;
          const S* c_prev = cp + (t * B + b) * H;
          const S* k = drop ? kp + (t * B + b) * H : nullptr;
          S* c = cp + ((t + 1) * B + b) * H;
          S* tc = tp + (t * B + b) * H;
          if (drop) {
_Pragma("omp simd")
            for (int64_t j = 0; j < H; ++j) c[j] = f[j] * c_prev[j] + i[j] * g[j] * k[j];
          } else {
_Pragma("omp simd")
            for (int64_t j = 0; j < H; ++j) c[j] = f[j] * c_prev[j] + i[j] * g[j];
          }
          if (norm) {
            moments(c, H, kind, eps, cm[b], cr[b]);
            normalize(c, H, cm[b], cr[b], cg, cb, tc);
          } else {
            std::copy(c, c + H, tc);
          }
        }
      });
      Tensor tct = tcs[t].tanh_(), h = hs[t + 1];
      at::mul_out(h, a.narrow(1, 3 * H, H), tct);
    }
  });
  // h and the last cell state as copies: the outputs of a torch op must not share memory
  return {hs.narrow(0, 1, L).clone(), cs[L].clone(), hs, cs, acts, tcs, pre, g_mean, g_rstd, c_mean, c_rstd};
}

// Returns d_xw (L, B, 4H), d_h0, d_c0 (B, H), d_w_hh (4H, H) and, for the normalized kinds, d_g_gamma,
// d_g_beta (4H,), d_c_gamma, d_c_beta (H,) (empty for none). d_cT: gradient of the last cell state.
std::vector<Tensor> lstm_scan_backward(int64_t kind, const Tensor& d_out_, const Tensor& d_cT,
                                       const Tensor& w_hh, const Tensor& g_gamma, const Tensor& c_gamma,
                                       const Tensor& keep_, const Tensor& hs, const Tensor& cs,
                                       const Tensor& acts, const Tensor& tcs, const Tensor& pre,
                                       const Tensor& g_mean, const Tensor& g_rstd, const Tensor& c_mean,
                                       const Tensor& c_rstd) {
  const Tensor d_out = d_out_.contiguous(), keep = keep_.contiguous();
  const int64_t L = d_out.size(0), B = d_out.size(1), H = d_out.size(2), H4 = 4 * H;
  const bool norm = kind != kNone, drop = keep.numel() > 0;
  const auto opts = d_out.options();
  Tensor d_a = at::empty({L, B, H4}, opts);  // d loss / d gate pre-activations (before the norm)
  Tensor dh = at::empty({B, H}, opts);
  Tensor dc = d_cT.contiguous().clone();     // the cell-state gradient carried back through time
  // gain and shift gradients, one partial sum per thread: d_g_gamma | d_g_beta | d_c_gamma | d_c_beta
  const int64_t width = 2 * H4 + 2 * H;
  Tensor partial = at::zeros({norm ? at::get_num_threads() : 0, width}, opts);
  const Tensor gg_ = g_gamma.contiguous(), cg_ = c_gamma.contiguous();
  AT_DISPATCH_FLOATING_TYPES(d_out.scalar_type(), "lstm_scan_backward", [&] {
    using S = scalar_t;
    const S *gg = norm ? gg_.data_ptr<S>() : nullptr, *cg = norm ? cg_.data_ptr<S>() : nullptr;
    const S *ap = acts.data_ptr<S>(), *tp = tcs.data_ptr<S>(), *cp = cs.data_ptr<S>();
    const S* kp = drop ? keep.data_ptr<S>() : nullptr;
    const S* pp = norm ? pre.data_ptr<S>() : nullptr;
    S* dap = d_a.data_ptr<S>();
    S* dcp = dc.data_ptr<S>();
    for (int64_t t = L - 1; t >= 0; --t) {
      const S* dhp;
      if (t == L - 1) {
        dhp = d_out.data_ptr<S>() + t * B * H;
      } else {
        at::addmm_out(dh, d_out[t], d_a[t + 1], w_hh);
        dhp = dh.data_ptr<S>();
      }
      at::parallel_for(0, B, grain(H4), [&](int64_t b0, int64_t b1) {
        std::vector<S> scratch(norm ? H4 + 2 * H : 0);
        S* acc = norm ? partial.data_ptr<S>() + at::get_thread_num() * width : nullptr;
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = t * B + b;  // this step's row
          const S *i = ap + r * H4, *f = i + H, *g = i + 2 * H, *o = i + 3 * H;
          const S* f_next = t < L - 1 ? ap + (r + B) * H4 + H : nullptr;
          const S *tc = tp + r * H, *c_prev = cp + r * H, *c = cp + (r + B) * H, *dhr = dhp + b * H;
          const S* k = drop ? kp + r * H : nullptr;
          S* dcr = dcp + b * H;
          S* dar = dap + r * H4;
          // d loss / d normalized cell, then / d raw cell
          if (norm) {
            S *dcn = scratch.data() + H4, *dcraw = dcn + H;
_Pragma("omp simd")
            for (int64_t j = 0; j < H; ++j) dcn[j] = dhr[j] * o[j] * (S(1) - tc[j] * tc[j]);
            normalize_backward(dcn, c, H, kind, c_mean.data_ptr<S>()[r], c_rstd.data_ptr<S>()[r], cg, dcraw,
                               acc + 2 * H4, acc + 2 * H4 + H);
            // this step's cell gradient plus the next step's carried through its forget gate
            for (int64_t j = 0; j < H; ++j) dcr[j] = dcraw[j] + (f_next ? dcr[j] * f_next[j] : dcr[j]);
          } else {
            for (int64_t j = 0; j < H; ++j)
              dcr[j] = dhr[j] * o[j] * (S(1) - tc[j] * tc[j]) + (f_next ? dcr[j] * f_next[j] : dcr[j]);
          }
          // d loss / d gate pre-activations after the norm (before it, for kind none)
          S* dan = norm ? scratch.data() : dar;
_Pragma("omp simd")
          for (int64_t j = 0; j < H; ++j) {
            const S kj = drop ? k[j] : S(1);
            dan[j] = dcr[j] * g[j] * kj * i[j] * (S(1) - i[j]);
            dan[H + j] = dcr[j] * c_prev[j] * f[j] * (S(1) - f[j]);
            dan[2 * H + j] = dcr[j] * i[j] * kj * (S(1) - g[j] * g[j]);
            dan[3 * H + j] = dhr[j] * tc[j] * o[j] * (S(1) - o[j]);
          }
          if (norm) {
            const S *gm = g_mean.data_ptr<S>() + r * 4, *gr = g_rstd.data_ptr<S>() + r * 4;
            for (int64_t q = 0; q < 4; ++q)
              normalize_backward(dan + q * H, pp + r * H4 + q * H, H, kind, gm[q], gr[q], gg + q * H,
                                 dar + q * H, acc + q * H, acc + H4 + q * H);
          }
        }
      });
    }
  });
  Tensor d_h0 = d_a[0].mm(w_hh);
  Tensor d_c0 = dc * acts[0].narrow(1, H, H);
  Tensor d_w_hh = d_a.view({L * B, H4}).t().mm(hs.narrow(0, 0, L).reshape({L * B, H}));
  std::vector<Tensor> out{d_a, d_h0, d_c0, d_w_hh};
  if (norm) {  // each sum its own tensor: the outputs of a torch op must not share memory
    int64_t start = 0;
    for (const int64_t length : {H4, H4, H, H}) {
      out.push_back(partial.narrow(1, start, length).sum(0));
      start += length;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ //
// Recurrent batch norm (Cooijmans et al. 2016), zoo.models.sketch_rnn.BatchNormScan: statistics are per
// step and per column, over the real rows 0..n_t-1 of the step (the batch is sorted by decreasing
// length); steps with n_t = 0 reuse the last real step's statistics. Work is split over hidden units
// j (with their four gate columns), so every column reduction belongs to one task.
// ------------------------------------------------------------------------------------------------ //

// Mean and biased variance over rows 0..n-1 of columns c0..c1-1 of x (rows of width W); two passes.
template <typename S>
void column_moments(const S* x, int64_t W, int64_t n, int64_t c0, int64_t c1, S* mean, S* var) {
  std::fill(mean + c0, mean + c1, S(0));
  std::fill(var + c0, var + c1, S(0));
  for (int64_t b = 0; b < n; ++b) {
    const S* r = x + b * W;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) mean[c] += r[c];
  }
  for (int64_t c = c0; c < c1; ++c) mean[c] /= n;
  for (int64_t b = 0; b < n; ++b) {
    const S* r = x + b * W;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) var[c] += (r[c] - mean[c]) * (r[c] - mean[c]);
  }
  for (int64_t c = c0; c < c1; ++c) var[c] /= n;
}

// Hidden units per parallel task.
inline int64_t unit_grain(int64_t B) { return std::max<int64_t>(16, 8192 / std::max<int64_t>(B, 1)); }

// Step t's statistics of columns c0..c1-1 of x (B rows of width W), written at mean, var, rstd (step t's
// rows): in training (counts given) over rows 0..counts[t]-1, or the previous step's when counts[t] = 0;
// in eval they are given and only rstd is computed.
template <typename S>
void step_moments(const S* x, int64_t W, const int64_t* counts, int64_t t, double eps, int64_t c0, int64_t c1,
                  S* mean, S* var, S* rstd) {
  if (counts && counts[t] > 0) {
    column_moments(x, W, counts[t], c0, c1, mean, var);
  } else if (counts) {
    TORCH_CHECK(t > 0, "recurrent batch norm: no real row at step 0");
    std::copy(mean - W + c0, mean - W + c1, mean + c0);
    std::copy(var - W + c0, var - W + c1, var + c0);
  }
  for (int64_t c = c0; c < c1; ++c) rstd[c] = S(1) / std::sqrt(var[c] + S(eps));
}

// mean, var, rstd (L, W) of one normalized quantity; pointers to step t's rows.
struct Stat {
  Tensor mean, var, rstd;
  template <typename S>
  S* at(const Tensor& x, int64_t t) const { return x.data_ptr<S>() + t * x.size(1); }
};

template <typename S>
void bn_forward_steps(double eps, const Tensor& xw, const Tensor& w_hh, const Tensor& x_gamma, const Tensor& h_gamma,
                      const Tensor& bias, const Tensor& c_gamma, const Tensor& c_beta, const Tensor& keep,
                      const int64_t* counts, Tensor& hs, Tensor& cs, Tensor& acts, Tensor& tcs, Tensor& pre,
                      const Stat& sx, const Stat& sh, const Stat& sc) {
  const int64_t L = xw.size(0), B = xw.size(1), H4 = xw.size(2), H = H4 / 4;
  const bool drop = keep.numel() > 0;
  const Tensor wt = w_hh.t();
  const S *xg = x_gamma.data_ptr<S>(), *hg = h_gamma.data_ptr<S>(), *bi = bias.data_ptr<S>();
  const S *cg = c_gamma.data_ptr<S>(), *cb = c_beta.data_ptr<S>(), *kp = drop ? keep.data_ptr<S>() : nullptr;
  for (int64_t t = 0; t < L; ++t) {
    Tensor p = pre[t], a = acts[t];
    at::mm_out(p, hs[t], wt);
    const S *pp = p.data_ptr<S>(), *xp = xw.data_ptr<S>() + t * B * H4;
    S* ap = a.data_ptr<S>();
    S *mx = sx.at<S>(sx.mean, t), *vx = sx.at<S>(sx.var, t), *rx = sx.at<S>(sx.rstd, t);
    S *mh = sh.at<S>(sh.mean, t), *vh = sh.at<S>(sh.var, t), *rh = sh.at<S>(sh.rstd, t);
    at::parallel_for(0, H4, unit_grain(B), [&](int64_t c0, int64_t c1) {
      step_moments(xp, H4, counts, t, eps, c0, c1, mx, vx, rx);
      step_moments(pp, H4, counts, t, eps, c0, c1, mh, vh, rh);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * H4;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c)
          ap[o + c] = bi[c] + (xp[o + c] - mx[c]) * rx[c] * xg[c] + (pp[o + c] - mh[c]) * rh[c] * hg[c];
      }
    });
    a.narrow(1, 0, 2 * H).sigmoid_();
    a.narrow(1, 2 * H, H).tanh_();
    a.narrow(1, 3 * H, H).sigmoid_();
    const S* c_prev = cs.data_ptr<S>() + t * B * H;
    S *c = cs.data_ptr<S>() + (t + 1) * B * H, *tc = tcs.data_ptr<S>() + t * B * H;
    S *mc = sc.at<S>(sc.mean, t), *vc = sc.at<S>(sc.var, t), *rc = sc.at<S>(sc.rstd, t);
    at::parallel_for(0, H, unit_grain(B), [&](int64_t j0, int64_t j1) {
      for (int64_t b = 0; b < B; ++b) {
        const S *i = ap + b * H4, *f = i + H, *g = i + 2 * H, *k = drop ? kp + (t * B + b) * H : nullptr;
        const int64_t o = b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) c[o + j] = f[j] * c_prev[o + j] + i[j] * g[j] * (drop ? k[j] : S(1));
      }
      step_moments(c, H, counts, t, eps, j0, j1, mc, vc, rc);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) tc[o + j] = (c[o + j] - mc[j]) * rc[j] * cg[j] + cb[j];
      }
    });
    Tensor tct = tcs[t].tanh_(), h = hs[t + 1];
    at::mul_out(h, a.narrow(1, 3 * H, H), tct);
  }
}

// Training: counts (L,) int64, the statistics are computed; eval: counts empty and stats = the per-step
// mean_x, var_x, mean_h, var_h (L, 4H), mean_c, var_c (L, H). Returns h, the last cell state, mean_x,
// var_x, mean_h, var_h, mean_c, var_c (in eval copies of stats), then for the backward pass hs, cs, acts,
// tcs, pre (as lstm_scan_forward) and rstd_x, rstd_h, rstd_c.
std::vector<Tensor> bn_lstm_scan_forward(double eps, const Tensor& xw_, const Tensor& h0, const Tensor& c0,
                                         const Tensor& w_hh, const Tensor& x_gamma, const Tensor& h_gamma,
                                         const Tensor& bias, const Tensor& c_gamma, const Tensor& c_beta,
                                         const Tensor& keep_, const Tensor& counts_, at::TensorList stats) {
  TORCH_CHECK(xw_.device().is_cpu(), "zoo::bn_lstm_scan_forward is a CPU kernel, got ", xw_.device());
  const Tensor xw = xw_.contiguous(), keep = keep_.contiguous(), counts = counts_.to(at::kLong).contiguous();
  const bool train = counts.numel() > 0;
  TORCH_CHECK(train || stats.size() == 6, "bn_lstm_scan_forward: eval needs 6 statistics, got ", stats.size());
  const int64_t L = xw.size(0), B = xw.size(1), H4 = xw.size(2), H = H4 / 4;
  const auto opts = xw.options();
  Tensor hs = at::empty({L + 1, B, H}, opts), cs = at::empty({L + 1, B, H}, opts);
  Tensor acts = at::empty({L, B, H4}, opts), tcs = at::empty({L, B, H}, opts), pre = at::empty({L, B, H4}, opts);
  auto stat = [&](int64_t k, int64_t W) {
    return train ? Stat{at::empty({L, W}, opts), at::empty({L, W}, opts), at::empty({L, W}, opts)}
                 : Stat{stats[2 * k].contiguous(), stats[2 * k + 1].contiguous(), at::empty({L, W}, opts)};
  };
  const Stat sx = stat(0, H4), sh = stat(1, H4), sc = stat(2, H);
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "bn_lstm_scan_forward", [&] {
    bn_forward_steps<scalar_t>(eps, xw, w_hh, x_gamma.contiguous(), h_gamma.contiguous(), bias.contiguous(),
                               c_gamma.contiguous(), c_beta.contiguous(), keep,
                               train ? counts.data_ptr<int64_t>() : nullptr, hs, cs, acts, tcs, pre, sx, sh, sc);
  });
  // copies where outputs would share memory with inputs or other outputs, which a torch op must not
  auto own = [&](const Tensor& t) { return train ? t : t.clone(); };
  return {hs.narrow(0, 1, L).clone(), cs[L].clone(), own(sx.mean), own(sx.var), own(sh.mean), own(sh.var),
          own(sc.mean), own(sc.var), hs, cs, acts, tcs, pre, sx.rstd, sh.rstd, sc.rstd};
}

// Backward of the normalization y = (x - mean) * rstd * gamma (+ beta) of one step, columns c0..c1-1,
// in place on G (rows of width W; on entry dL/dy * gamma, on exit dL/dx). In training the rows 0..n-1
// were the statistics' rows: dx = rstd * G - [b < n] rstd / n * (sum G + xhat * sum G xhat), the sums over
// the rows of every step that used these statistics; a step with n = 0 only adds its sums to `carry`.
template <typename S>
void bn_backward_columns(S* G, const S* x, int64_t W, int64_t B, int64_t n, bool train, int64_t c0, int64_t c1,
                         const S* mean, const S* rstd, S* carry1, S* carry2) {
  if (train) {
    for (int64_t b = 0; b < B; ++b) {
      const S *g = G + b * W, *xr = x + b * W;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        carry1[c] += g[c];
        carry2[c] += g[c] * (xr[c] - mean[c]) * rstd[c];
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    S* g = G + b * W;
    const S* xr = x + b * W;
    if (b < n) {
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c)
        g[c] = rstd[c] * (g[c] - (carry1[c] + (xr[c] - mean[c]) * rstd[c] * carry2[c]) / n);
    } else {
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) g[c] *= rstd[c];
    }
  }
  if (n > 0) {  // these statistics are done with: the earlier steps have their own
    std::fill(carry1 + c0, carry1 + c1, S(0));
    std::fill(carry2 + c0, carry2 + c1, S(0));
  }
}

template <typename S>
void bn_backward_steps(const Tensor& d_out, Tensor& dc, const Tensor& w_hh, const Tensor& x_gamma,
                       const Tensor& h_gamma, const Tensor& c_gamma, const Tensor& keep, const int64_t* counts,
                       const Tensor& xw, const Tensor& cs, const Tensor& acts, const Tensor& tcs, const Tensor& pre,
                       const Stat& sx, const Stat& sh, const Stat& sc, Tensor& d_xw, Tensor& d_a, Tensor& d_xg,
                       Tensor& d_hg, Tensor& d_bias, Tensor& d_cg, Tensor& d_cb) {
  const int64_t L = d_out.size(0), B = d_out.size(1), H = d_out.size(2), H4 = 4 * H;
  const bool drop = keep.numel() > 0, train = counts != nullptr;
  const S *xg = x_gamma.data_ptr<S>(), *hg = h_gamma.data_ptr<S>(), *cg = c_gamma.data_ptr<S>();
  const S *ap = acts.data_ptr<S>(), *tp = tcs.data_ptr<S>(), *cp = cs.data_ptr<S>(), *pp = pre.data_ptr<S>();
  const S *xp = xw.data_ptr<S>(), *kp = drop ? keep.data_ptr<S>() : nullptr;
  S *dxp = d_xw.data_ptr<S>(), *dap = d_a.data_ptr<S>(), *dcp = dc.data_ptr<S>();
  S *acc_xg = d_xg.data_ptr<S>(), *acc_hg = d_hg.data_ptr<S>(), *acc_b = d_bias.data_ptr<S>();
  S *acc_cg = d_cg.data_ptr<S>(), *acc_cb = d_cb.data_ptr<S>();
  // the statistics' gradient sums (sum G, sum G xhat) carried to the step whose statistics were reused
  std::vector<S> carry(4 * H4 + 2 * H, S(0));
  S *carry_x = carry.data(), *carry_h = carry_x + 2 * H4, *carry_c = carry_h + 2 * H4;
  Tensor dh = at::empty({B, H}, d_out.options()), gc = at::empty({B, H}, d_out.options());
  Tensor dgates = at::empty({B, H4}, d_out.options());
  S *gcp = gc.data_ptr<S>(), *dgp = dgates.data_ptr<S>();
  for (int64_t t = L - 1; t >= 0; --t) {
    if (t < L - 1) at::addmm_out(dh, d_out[t], d_a[t + 1], w_hh);
    const S* dhp = t < L - 1 ? dh.data_ptr<S>() : d_out.data_ptr<S>() + t * B * H;
    const int64_t n = train ? counts[t] : 0;
    const S *a = ap + t * B * H4, *tc = tp + t * B * H, *c_prev = cp + t * B * H, *c = c_prev + B * H;
    const S *f_next = t < L - 1 ? a + B * H4 + H : nullptr, *k = drop ? kp + t * B * H : nullptr;
    const S *xr0 = xp + t * B * H4, *pr0 = pp + t * B * H4;
    const S *mx = sx.at<S>(sx.mean, t), *rx = sx.at<S>(sx.rstd, t), *mh = sh.at<S>(sh.mean, t);
    const S *rh = sh.at<S>(sh.rstd, t), *mc = sc.at<S>(sc.mean, t), *rc = sc.at<S>(sc.rstd, t);
    S *dx = dxp + t * B * H4, *da = dap + t * B * H4;
    at::parallel_for(0, H, unit_grain(B), [&](int64_t j0, int64_t j1) {
      // d loss / d normalized cell (its gain/shift gradients), then through the cell norm
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * H;
        const S* oo = a + b * H4 + 3 * H;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const S dcn = dhp[o + j] * oo[j] * (S(1) - tc[o + j] * tc[o + j]);
          acc_cb[j] += dcn;
          acc_cg[j] += dcn * (c[o + j] - mc[j]) * rc[j];
          gcp[o + j] = dcn * cg[j];
        }
      }
      bn_backward_columns(gcp, c, H, B, n, train, j0, j1, mc, rc, carry_c, carry_c + H);
      // cell carry, the gates' gradients, and those of the two normalized projections (times their gains)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * H;
        const S *i = a + b * H4, *f = i + H, *g = i + 2 * H, *oo = i + 3 * H, *fn = f_next ? f_next + b * H4 : nullptr;
        S* dgr = dgp + b * H4;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const S dcj = gcp[o + j] + dcp[o + j] * (fn ? fn[j] : S(1));
          const S kj = drop ? k[o + j] : S(1);
          dcp[o + j] = dcj;
          dgr[j] = dcj * g[j] * kj * i[j] * (S(1) - i[j]);
          dgr[H + j] = dcj * c_prev[o + j] * f[j] * (S(1) - f[j]);
          dgr[2 * H + j] = dcj * i[j] * kj * (S(1) - g[j] * g[j]);
          dgr[3 * H + j] = dhp[o + j] * tc[o + j] * oo[j] * (S(1) - oo[j]);
        }
        const S *xr = xr0 + b * H4, *pr = pr0 + b * H4;
        S *dxr = dx + b * H4, *dar = da + b * H4;
        for (int64_t q = 0; q < 4; ++q) {
#pragma omp simd
          for (int64_t j = q * H + j0; j < q * H + j1; ++j) {
            acc_b[j] += dgr[j];
            acc_xg[j] += dgr[j] * (xr[j] - mx[j]) * rx[j];
            acc_hg[j] += dgr[j] * (pr[j] - mh[j]) * rh[j];
            dxr[j] = dgr[j] * xg[j];
            dar[j] = dgr[j] * hg[j];
          }
        }
      }
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t c0 = q * H + j0, c1 = q * H + j1;
        bn_backward_columns(dx, xr0, H4, B, n, train, c0, c1, mx, rx, carry_x, carry_x + H4);
        bn_backward_columns(da, pr0, H4, B, n, train, c0, c1, mh, rh, carry_h, carry_h + H4);
      }
    });
  }
}

// Returns d_xw (L, B, 4H), d_h0, d_c0 (B, H), d_w_hh (4H, H), d_x_gamma, d_h_gamma, d_bias (4H,),
// d_c_gamma, d_c_beta (H,).
std::vector<Tensor> bn_lstm_scan_backward(const Tensor& d_out_, const Tensor& d_cT, const Tensor& w_hh,
                                          const Tensor& x_gamma, const Tensor& h_gamma, const Tensor& c_gamma,
                                          const Tensor& keep_, const Tensor& counts_, const Tensor& xw,
                                          const Tensor& hs, const Tensor& cs, const Tensor& acts, const Tensor& tcs,
                                          const Tensor& pre, const Tensor& mean_x, const Tensor& rstd_x,
                                          const Tensor& mean_h, const Tensor& rstd_h, const Tensor& mean_c,
                                          const Tensor& rstd_c) {
  const Tensor d_out = d_out_.contiguous(), keep = keep_.contiguous(), counts = counts_.to(at::kLong).contiguous();
  const int64_t L = d_out.size(0), B = d_out.size(1), H = d_out.size(2), H4 = 4 * H;
  const auto opts = d_out.options();
  Tensor d_xw = at::empty({L, B, H4}, opts), d_a = at::empty({L, B, H4}, opts), dc = d_cT.contiguous().clone();
  Tensor d_xg = at::zeros({H4}, opts), d_hg = at::zeros({H4}, opts), d_bias = at::zeros({H4}, opts);
  Tensor d_cg = at::zeros({H}, opts), d_cb = at::zeros({H}, opts);
  const Stat sx{mean_x, Tensor(), rstd_x}, sh{mean_h, Tensor(), rstd_h}, sc{mean_c, Tensor(), rstd_c};
  AT_DISPATCH_FLOATING_TYPES(d_out.scalar_type(), "bn_lstm_scan_backward", [&] {
    bn_backward_steps<scalar_t>(d_out, dc, w_hh, x_gamma.contiguous(), h_gamma.contiguous(), c_gamma.contiguous(),
                                keep, counts.numel() ? counts.data_ptr<int64_t>() : nullptr, xw.contiguous(), cs,
                                acts, tcs, pre, sx, sh, sc, d_xw, d_a, d_xg, d_hg, d_bias, d_cg, d_cb);
  });
  Tensor d_h0 = d_a[0].mm(w_hh);
  Tensor d_c0 = dc * acts[0].narrow(1, H, H);
  Tensor d_w_hh = d_a.view({L * B, H4}).t().mm(hs.narrow(0, 0, L).reshape({L * B, H}));
  return {d_xw, d_h0, d_c0, d_w_hh, d_xg, d_hg, d_bias, d_cg, d_cb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo, m) {
  m.def("lstm_scan_forward(int kind, float eps, Tensor xw, Tensor h0, Tensor c0, Tensor w_hh, Tensor g_gamma, "
        "Tensor g_beta, Tensor c_gamma, Tensor c_beta, Tensor keep) -> Tensor[]");
  m.def("lstm_scan_backward(int kind, Tensor d_out, Tensor d_cT, Tensor w_hh, Tensor g_gamma, Tensor c_gamma, "
        "Tensor keep, Tensor hs, Tensor cs, Tensor acts, Tensor tcs, Tensor pre, Tensor g_mean, Tensor g_rstd, "
        "Tensor c_mean, Tensor c_rstd) -> Tensor[]");
  m.def("bn_lstm_scan_forward(float eps, Tensor xw, Tensor h0, Tensor c0, Tensor w_hh, Tensor x_gamma, "
        "Tensor h_gamma, Tensor bias, Tensor c_gamma, Tensor c_beta, Tensor keep, Tensor counts, Tensor[] stats) "
        "-> Tensor[]");
  m.def("bn_lstm_scan_backward(Tensor d_out, Tensor d_cT, Tensor w_hh, Tensor x_gamma, Tensor h_gamma, "
        "Tensor c_gamma, Tensor keep, Tensor counts, Tensor xw, Tensor hs, Tensor cs, Tensor acts, Tensor tcs, "
        "Tensor pre, Tensor mean_x, Tensor rstd_x, Tensor mean_h, Tensor rstd_h, Tensor mean_c, Tensor rstd_c) "
        "-> Tensor[]");
}

// CPU kernels only: zoo/cpu_kernels.py registers the ops' fake implementations and autograd formulas
TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("lstm_scan_forward", &lstm_scan_forward);
  m.impl("lstm_scan_backward", &lstm_scan_backward);
  m.impl("bn_lstm_scan_forward", &bn_lstm_scan_forward);
  m.impl("bn_lstm_scan_backward", &bn_lstm_scan_backward);
}
