// rms_norm forward and backward: one body, compiled once per SIMD target.
#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

template <class T, bool HasW>
void rms_norm_rows(const RmsNormForward<T>& a, std::int64_t r0, std::int64_t r1) {
  using V = vnative<T>;
  constexpr int L = kLanes<T>;
  const std::int64_t n = a.cols;
  for (std::int64_t i = r0; i < r1; ++i) {
    const T* x = a.x + i * n;
    T* y = a.y + i * n;
    const double rstd = 1.0 / __builtin_sqrt(row_mean_square(x, n) + a.eps);
    if (a.rstd) a.rstd[i] = T(rstd);
    const T r = T(rstd);
    const V vr = splat<V>(r);
    std::int64_t j = 0;
    for (; j + L <= n; j += L) {
      V scale = vr;
      if constexpr (HasW) scale *= load<V>(a.weight + j);
      store(y + j, load<V>(x + j) * scale);
    }
    for (; j < n; ++j) {
      T scale = r;
      if constexpr (HasW) scale *= a.weight[j];
      y[j] = x[j] * scale;
    }
  }
}

template <class T>
void rms_norm_forward(const RmsNormForward<T>& a, int nthreads) {
  const auto rows = a.weight ? &rms_norm_rows<T, true> : &rms_norm_rows<T, false>;
  parallel_ranges(a.rows, nthreads, [&](std::int64_t r0, std::int64_t r1) { rows(a, r0, r1); });
}

// dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd;
// with weight, partial[0..n) += dy * xhat (dweight).
template <class T, bool HasW>
void rms_norm_backward_row(const RmsNormBackward<T>& a, std::int64_t i, double* partial) {
  const std::int64_t n = a.cols;
  const T* x = a.x + i * n;
  const T* dy = a.dy + i * n;
  const T* w = a.weight;
  T* dx = a.dx + i * n;
  const double r = double(a.rstd[i]);
  const vwide vr = splat<vwide>(r);

  vwide sgx{};
  std::int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    vwide g = load_wide(dy + j);
    if constexpr (HasW) g *= load_wide(w + j);
    sgx += g * (load_wide(x + j) * vr);
  }
  double tgx = 0;
  for (std::int64_t k = j; k < n; ++k) {
    double g = double(dy[k]);
    if constexpr (HasW) g *= double(w[k]);
    tgx += g * (double(x[k]) * r);
  }
  const double c1 = (lane_sum(sgx) + tgx) / double(n);

  const vwide vc1 = splat<vwide>(c1);
  j = 0;
  for (; j + kWide <= n; j += kWide) {
    const vwide xh = load_wide(x + j) * vr;
    const vwide d = load_wide(dy + j);
    vwide g = d;
    if constexpr (HasW) {
      g *= load_wide(w + j);
      store(partial + j, load<vwide>(partial + j) + d * xh);
    }
    store_narrow(dx + j, vr * (g - xh * vc1));
  }
  for (; j < n; ++j) {
    const double xh = double(x[j]) * r;
    const double d = double(dy[j]);
    double g = d;
    if constexpr (HasW) {
      g *= double(w[j]);
      partial[j] += d * xh;
    }
    dx[j] = T(r * (g - xh * c1));
  }
}

template <class T>
void rms_norm_backward(const RmsNormBackward<T>& a, int nthreads) {
  if (a.weight) {
    T* const outs[1] = {a.dweight};
    rows_with_column_sums<T>(a.rows, a.cols, 1, outs, nthreads, [&](std::int64_t i, double* p) {
      rms_norm_backward_row<T, true>(a, i, p);
    });
  } else {
    rows_with_column_sums<T>(a.rows, a.cols, 0, nullptr, nthreads, [&](std::int64_t i, double* p) {
      rms_norm_backward_row<T, false>(a, i, p);
    });
  }
}

}  // namespace

void register_rms_norm(KernelTable& t) {
  t.row_f32.rms_norm = &rms_norm_forward<float>;
  t.row_f64.rms_norm = &rms_norm_forward<double>;
  t.row_f32.rms_norm_backward = &rms_norm_backward<float>;
  t.row_f64.rms_norm_backward = &rms_norm_backward<double>;
}

}  // namespace NL_TARGET
}  // namespace normlab
