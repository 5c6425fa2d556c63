// CPU kernel of zoo.models.ssm.selective_scan for B, C of layout (batch, N, L) (Mamba's and MambaVision's),
// with everything around the recurrence fused in: delta bias and softplus, the D skip and the silu(z)
// gate; forward and the hand-written backward (the adjoint recurrence in reverse time).
//
//   delta = softplus(delta + delta_bias);  h[t] = exp(delta[t] A) h[t-1] + delta[t] u[t] B[t]  (h[-1] = 0)
//   y[t] = (sum_n C[t, n] h[t, n] + D u[t]) * silu(z[t])
//
// Shapes as mamba_ssm: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,);
// D, z, delta_bias may be empty (absent). Each batch row is one task: its inputs are transposed into
// time-major (L, dim) buffers that stay in cache, and one fused loop per step and state index updates the
// (N, dim) state and the output. Time runs in blocks of kBlock steps: only the state at each block's
// start is kept, and the backward recomputes a block's states from it. The tests compare this with
// zoo.models.ssm.selective_scan_ref.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kBlock = 16;  // time steps per block (zoo/cpu_kernels.py sizes `starts` with it too)

// exp: std::exp for double; for float a polynomial the compiler can vectorize inside the
// scan loops (std::exp calls cannot be): exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 split
// in two parts (Cody-Waite), exp(r) by Cephes' expf polynomial (about 1 ulp). x is clamped to
// [-87.3, 88.7]: below, the result is 1e-38 instead of a denormal or 0, which no result here notices
// (decays exp(delta A) <= 1 multiply states; softplus and sigmoid add it to 1 or 2).
template <typename S>
inline S exp_(S x) {
  return std::exp(x);
}

template <>
inline float exp_(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const float k = shifted - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (std::bit_cast<int32_t>(shifted) - 0x4B400000 + 127) << 23;  // 2^k
  return e * std::bit_cast<float>(bits);
}

// softplus and sigmoid from exp_ so that they vectorize too (ATen's float softplus runs ~4x slower than
// its exp). softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(y) = 2 atanh(y / (2 + y)) summed as
// its series (y <= 1, so s = y / (2 + y) <= 1/3 and nine terms leave < 1e-9); torch's threshold 20 is
// implied (log1p(exp(-20)) is below float32's resolution at 20).
template <typename S>
inline S softplus_(S x) {
  return x > S(20) ? x : std::log1p(std::exp(x));
}

template <>
inline float softplus_(float x) {
  const float y = exp_(-std::fabs(x)), s = y / (2.0f + y), s2 = s * s;
  float p = 1.0f / 17;
  p = p * s2 + 1.0f / 15;
  p = p * s2 + 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
}

template <typename S>
inline S sigmoid_(S x) {
  const S e = exp_(-std::fabs(x)), r = S(1) / (S(1) + e);
  return x >= S(0) ? r : e * r;
}

// dst (cols, rows) = src (rows, cols) transposed
template <typename S>
void transpose(const S* src, int64_t rows, int64_t cols, S* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// One batch row's time-major inputs: u, raw = delta + delta_bias, delta (after the softplus), B, C.
// `done`: delta as the forward pass computed it (time-major), which the backward pass reuses.
template <typename S>
struct Row {
  std::vector<S> u, delta, raw, B, C;
  Row(int64_t L, int64_t dim, int64_t N) : u(L * dim), delta(L * dim), raw(L * dim), B(L * N), C(L * N) {}

  void load(const S* u_, const S* delta_, const S* bias, bool softplus, const S* B_, const S* C_, const S* done,
            int64_t L, int64_t dim, int64_t N) {
    transpose(u_, dim, L, u.data());
    transpose(delta_, dim, L, raw.data());
    if (bias)
      for (int64_t t = 0; t < L; ++t)
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) raw[t * dim + d] += bias[d];
    if (done) {
      std::copy(done, done + L * dim, delta.begin());
    } else if (softplus) {
      S *dl = delta.data(), *rw = raw.data();
#pragma omp simd
      for (int64_t i = 0; i < L * dim; ++i) dl[i] = softplus_(rw[i]);
    } else {
      delta = raw;
    }
    transpose(B_, N, L, B.data());
    transpose(C_, N, L, C.data());
  }
};

struct Args {  // the inputs, contiguous; D, z, delta_bias undefined when absent
  Tensor u, delta, A, B, C, D, z, delta_bias;
  bool softplus;
  int64_t batch, dim, L, N;
};

template <typename S>
void forward_rows(const Args& a, Tensor& y, Tensor& last, Tensor& starts, Tensor& delta_tm) {
  const int64_t L = a.L, dim = a.dim, N = a.N, state = N * dim;
  const S* A = a.A.data_ptr<S>();  // (N, dim) here
  const S* D = a.D.defined() ? a.D.data_ptr<S>() : nullptr;
  const S* bias = a.delta_bias.defined() ? a.delta_bias.data_ptr<S>() : nullptr;
  at::parallel_for(0, a.batch, 1, [&](int64_t b0, int64_t b1) {
    Row<S> row(L, dim, N);
    std::vector<S> h(state), yt(L * dim), gate(a.z.defined() ? L * dim : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ob = b * dim * L;
      row.load(a.u.data_ptr<S>() + ob, a.delta.data_ptr<S>() + ob, bias, a.softplus, a.B.data_ptr<S>() + b * N * L,
               a.C.data_ptr<S>() + b * N * L, nullptr, L, dim, N);
      std::copy(row.delta.begin(), row.delta.end(), delta_tm.data_ptr<S>() + ob);
      std::fill(h.begin(), h.end(), S(0));
      for (int64_t t = 0; t < L; ++t) {
        if (t % kBlock == 0) std::copy(h.begin(), h.end(), starts.data_ptr<S>() + ((t / kBlock) * a.batch + b) * state);
        const S *dl = row.delta.data() + t * dim, *uu = row.u.data() + t * dim;
        S* yy = yt.data() + t * dim;
        for (int64_t d = 0; d < dim; ++d) yy[d] = D ? D[d] * uu[d] : S(0);
        for (int64_t n = 0; n < N; ++n) {
          const S bn = row.B[t * N + n], cn = row.C[t * N + n], *An = A + n * dim;
          S* hn = h.data() + n * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            hn[d] = exp_(dl[d] * An[d]) * hn[d] + dl[d] * uu[d] * bn;
            yy[d] += cn * hn[d];
          }
        }
      }
      if (a.z.defined()) {
        transpose(a.z.data_ptr<S>() + ob, dim, L, gate.data());
        S *zz = gate.data(), *yy = yt.data();
#pragma omp simd
        for (int64_t i = 0; i < L * dim; ++i) yy[i] *= zz[i] * sigmoid_(zz[i]);  // silu(z)
      }
      transpose(yt.data(), L, dim, y.data_ptr<S>() + ob);
      std::copy(h.begin(), h.end(), last.data_ptr<S>() + b * state);
    }
  });
}

Args make_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C, const Tensor& D,
               const Tensor& z, const Tensor& delta_bias, bool softplus) {
  TORCH_CHECK(u.device().is_cpu(), "zoo::selective_scan is a CPU kernel, got ", u.device());
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1);
  TORCH_CHECK(delta.sizes() == u.sizes() && A.size(0) == dim && B.sizes() == at::IntArrayRef({batch, N, L}) &&
                  C.sizes() == B.sizes(),
              "zoo::selective_scan: expected u, delta (batch, dim, L), A (dim, N), B, C (batch, N, L); got u ",
              u.sizes(), ", delta ", delta.sizes(), ", A ", A.sizes(), ", B ", B.sizes(), ", C ", C.sizes());
  auto opt = [](const Tensor& t) { return t.numel() ? t.contiguous() : Tensor(); };
  return Args{u.contiguous(), delta.contiguous(), A.t().contiguous(), B.contiguous(), C.contiguous(),
              opt(D), opt(z), opt(delta_bias), softplus, batch, dim, L, N};
}

// Returns y (batch, dim, L), the last state (batch, N, dim), and for the backward the state before each
// block (blocks, batch, N, dim) and delta after the softplus (batch, L, dim).
std::vector<Tensor> selective_scan_forward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                           const Tensor& C, const Tensor& D, const Tensor& z,
                                           const Tensor& delta_bias, bool softplus) {
  const Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus);
  Tensor y = at::empty_like(a.u), last = at::empty({a.batch, a.N, a.dim}, a.u.options());
  Tensor starts = at::empty({(a.L + kBlock - 1) / kBlock, a.batch, a.N, a.dim}, a.u.options());
  Tensor delta_tm = at::empty({a.batch, a.L, a.dim}, a.u.options());
  AT_DISPATCH_FLOATING_TYPES(a.u.scalar_type(), "selective_scan_forward",
                             [&] { forward_rows<scalar_t>(a, y, last, starts, delta_tm); });
  return {y, last, starts, delta_tm};
}

template <typename S>
void backward_rows(const Args& a, const Tensor& gy, const Tensor& g_last, const Tensor& starts,
                   const Tensor& delta_tm, Tensor& g_u,
                   Tensor& g_delta, Tensor& g_B, Tensor& g_C, Tensor& g_z, Tensor& partial) {
  const int64_t L = a.L, dim = a.dim, N = a.N, state = N * dim;
  const S* A = a.A.data_ptr<S>();
  const S* D = a.D.defined() ? a.D.data_ptr<S>() : nullptr;
  const S* bias = a.delta_bias.defined() ? a.delta_bias.data_ptr<S>() : nullptr;
  const bool gated = a.z.defined();
  at::parallel_for(0, a.batch, 1, [&](int64_t b0, int64_t b1) {
    // per-thread sums: d A (N, dim) | d D (dim) | d delta_bias (dim)
    S* gA = partial.data_ptr<S>() + at::get_thread_num() * (state + 2 * dim);
    S *gD = gA + state, *gbias = gD + dim;
    Row<S> row(L, dim, N);
    // lam: d loss / d h[t] carried back through the decays; hs / dec: one block's states (hs[0] the
    // state before it) and decays; g: d loss / d (scan output + D u); silu, dsilu: the gate and its slope
    std::vector<S> lam(state), hs((kBlock + 1) * state), dec(kBlock * state), gdu(dim), gdl(dim), yacc(dim);
    std::vector<S> g(L * dim), silu(gated ? L * dim : 0), dsilu(gated ? L * dim : 0), sig(a.softplus ? L * dim : 0);
    std::vector<S> gut(L * dim), gdt(L * dim), gzt(gated ? L * dim : 0), gBt(L * N), gCt(L * N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ob = b * dim * L;
      row.load(a.u.data_ptr<S>() + ob, a.delta.data_ptr<S>() + ob, bias, a.softplus, a.B.data_ptr<S>() + b * N * L,
               a.C.data_ptr<S>() + b * N * L, delta_tm.data_ptr<S>() + ob, L, dim, N);
      if (a.softplus) {  // softplus' = sigmoid
        S *sg = sig.data(), *rw = row.raw.data();
#pragma omp simd
        for (int64_t i = 0; i < L * dim; ++i) sg[i] = sigmoid_(rw[i]);
      }
      transpose(gy.data_ptr<S>() + ob, dim, L, g.data());
      if (gated) {  // silu(z) = z s, s = sigmoid(z); silu'(z) = s (1 + z (1 - s))
        transpose(a.z.data_ptr<S>() + ob, dim, L, dsilu.data());  // z for now
        S *sl = silu.data(), *ds = dsilu.data(), *gz = gzt.data(), *gg = g.data();
#pragma omp simd
        for (int64_t i = 0; i < L * dim; ++i) {
          const S zi = ds[i], s = sigmoid_(zi);
          sl[i] = zi * s;
          ds[i] = s * (S(1) + zi * (S(1) - s));
          gz[i] = gg[i];  // d loss / d y, until the step's output is known
          gg[i] *= sl[i];
        }
      }
      std::copy(g_last.data_ptr<S>() + b * state, g_last.data_ptr<S>() + (b + 1) * state, lam.begin());
      for (int64_t t0 = (L - 1) / kBlock * kBlock; t0 >= 0; t0 -= kBlock) {
        const int64_t steps = std::min(kBlock, L - t0);
        const S* start = starts.data_ptr<S>() + ((t0 / kBlock) * a.batch + b) * state;
        std::copy(start, start + state, hs.begin());
        for (int64_t s = 0; s < steps; ++s) {  // recompute the block's decays and states
          const int64_t t = t0 + s;
          const S *dl = row.delta.data() + t * dim, *uu = row.u.data() + t * dim;
          for (int64_t n = 0; n < N; ++n) {
            const S bn = row.B[t * N + n], *An = A + n * dim, *hp = hs.data() + s * state + n * dim;
            S *an = dec.data() + (s * N + n) * dim, *hn = hs.data() + (s + 1) * state + n * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) {
              an[d] = exp_(dl[d] * An[d]);
              hn[d] = an[d] * hp[d] + dl[d] * uu[d] * bn;
            }
          }
        }
        for (int64_t s = steps - 1; s >= 0; --s) {
          const int64_t t = t0 + s;
          const S *dl = row.delta.data() + t * dim, *uu = row.u.data() + t * dim, *gt = g.data() + t * dim;
          std::fill(gdu.begin(), gdu.end(), S(0));
          std::fill(gdl.begin(), gdl.end(), S(0));
          std::fill(yacc.begin(), yacc.end(), S(0));
          for (int64_t n = 0; n < N; ++n) {
            const S bn = row.B[t * N + n], cn = row.C[t * N + n], *An = A + n * dim;
            const S *an = dec.data() + (s * N + n) * dim, *hn = hs.data() + (s + 1) * state + n * dim,
                    *hp = hs.data() + s * state + n * dim;
            S *ln = lam.data() + n * dim, *gAn = gA + n * dim, *gdu_ = gdu.data(), *gdl_ = gdl.data(),
              *ya = yacc.data();
            S gc = 0, gb = 0;
#pragma omp simd reduction(+ : gc, gb)
            for (int64_t d = 0; d < dim; ++d) {
              const S l = ln[d] + gt[d] * cn;  // d loss / d h[t]
              const S gda = l * an[d] * hp[d];  // d loss / d (delta[t] A)
              gc += gt[d] * hn[d];
              gb += dl[d] * uu[d] * l;
              gdu_[d] += l * bn;  // d loss / d (delta[t] u[t])
              gdl_[d] += gda * An[d];
              gAn[d] += gda * dl[d];
              ya[d] += cn * hn[d];
              ln[d] = an[d] * l;  // carried to step t - 1
            }
            gCt[t * N + n] = gc;
            gBt[t * N + n] = gb;
          }
          S *gu = gut.data() + t * dim, *gd = gdt.data() + t * dim;
          const S *sg = a.softplus ? sig.data() + t * dim : nullptr, *ds = gated ? dsilu.data() + t * dim : nullptr;
          S* gz = gated ? gzt.data() + t * dim : nullptr;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            const S dd = D ? D[d] : S(0);
            gu[d] = gdu[d] * dl[d] + gt[d] * dd;
            gd[d] = (gdl[d] + gdu[d] * uu[d]) * (sg ? sg[d] : S(1));  // through the softplus
            gD[d] += gt[d] * uu[d];
            gbias[d] += gd[d];
            if (gated) gz[d] *= (yacc[d] + dd * uu[d]) * ds[d];
          }
        }
      }
      transpose(gut.data(), L, dim, g_u.data_ptr<S>() + ob);
      transpose(gdt.data(), L, dim, g_delta.data_ptr<S>() + ob);
      if (gated) transpose(gzt.data(), L, dim, g_z.data_ptr<S>() + ob);
      transpose(gBt.data(), L, N, g_B.data_ptr<S>() + b * N * L);
      transpose(gCt.data(), L, N, g_C.data_ptr<S>() + b * N * L);
    }
  });
}

// Returns d u, d delta, d A, d B, d C, d D, d z, d delta_bias (empty for the absent ones).
std::vector<Tensor> selective_scan_backward(const Tensor& gy_, const Tensor& g_last_, const Tensor& u,
                                            const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                                            const Tensor& D, const Tensor& z, const Tensor& delta_bias, bool softplus,
                                            const Tensor& starts, const Tensor& delta_tm) {
  const Args a = make_args(u, delta, A, B, C, D, z, delta_bias, softplus);
  const Tensor gy = gy_.contiguous(), g_last = g_last_.contiguous();
  Tensor g_u = at::empty_like(a.u), g_delta = at::empty_like(a.u), g_B = at::empty_like(a.B),
         g_C = at::empty_like(a.C), g_z = a.z.defined() ? at::empty_like(a.u) : at::empty({0}, a.u.options());
  Tensor partial = at::zeros({at::get_num_threads(), a.N * a.dim + 2 * a.dim}, a.u.options());
  AT_DISPATCH_FLOATING_TYPES(a.u.scalar_type(), "selective_scan_backward", [&] {
    backward_rows<scalar_t>(a, gy, g_last, starts, delta_tm, g_u, g_delta, g_B, g_C, g_z, partial);
  });
  // each sum its own tensor: the outputs of a torch op must not share memory
  auto sum = [&](int64_t start, int64_t length) { return partial.narrow(1, start, length).sum(0); };
  return {g_u, g_delta, sum(0, a.N * a.dim).view({a.N, a.dim}).t().contiguous(), g_B, g_C,
          a.D.defined() ? sum(a.N * a.dim, a.dim) : at::empty({0}, a.u.options()), g_z,
          a.delta_bias.defined() ? sum(a.N * a.dim + a.dim, a.dim) : at::empty({0}, a.u.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo, m) {
  m.def("selective_scan_forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, "
        "Tensor delta_bias, bool softplus) -> Tensor[]");
  m.def("selective_scan_backward(Tensor gy, Tensor g_last, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, "
        "Tensor D, Tensor z, Tensor delta_bias, bool softplus, Tensor starts, Tensor delta_tm) -> Tensor[]");
}

// CPU kernels only: zoo/cpu_kernels.py registers the ops' fake implementations and autograd formulas
TORCH_LIBRARY_IMPL(zoo, CPU, m) {
  m.impl("selective_scan_forward", &selective_scan_forward);
  m.impl("selective_scan_backward", &selective_scan_backward);
}
