// layer_norm forward and backward: one body, compiled once per SIMD target.
#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// y = (x - mean) * rstd * w + b over one row. mean is split into a T-sized head and tail so
// that x - mean keeps its digits in float even when |mean| >> std.
template <class T, bool HasW, bool HasB>
void layer_norm_row(const T* x, const T* w, const T* b, T* y, std::int64_t n, double mean,
                    double rstd) {
  using V = vnative<T>;
  constexpr int L = kLanes<T>;
  const T head = T(mean), tail = T(mean - double(head)), r = T(rstd);
  const V vhead = splat<V>(head), vtail = splat<V>(tail), vr = splat<V>(r);
  std::int64_t j = 0;
  for (; j + L <= n; j += L) {
    const V d = (load<V>(x + j) - vhead) - vtail;
    V scale = vr;
    if constexpr (HasW) scale *= load<V>(w + j);
    V out = d * scale;
    if constexpr (HasB) out = d * scale + load<V>(b + j);
    store(y + j, out);
  }
  for (; j < n; ++j) {
    const T d = (x[j] - head) - tail;
    T scale = r;
    if constexpr (HasW) scale *= w[j];
    T out = d * scale;
    if constexpr (HasB) out = d * scale + b[j];
    y[j] = out;
  }
}

template <class T, bool HasW, bool HasB>
void layer_norm_rows(const LayerNormForward<T>& a, std::int64_t r0, std::int64_t r1) {
  for (std::int64_t i = r0; i < r1; ++i) {
    const T* x = a.x + i * a.cols;
    const Moments m = row_moments(x, a.cols);
    const double rstd = 1.0 / __builtin_sqrt(m.var + a.eps);
    if (a.mean) a.mean[i] = T(m.mean);
    if (a.rstd) a.rstd[i] = T(rstd);
    layer_norm_row<T, HasW, HasB>(x, a.weight, a.bias, a.y + i * a.cols, a.cols, m.mean, rstd);
  }
}

template <class T>
void layer_norm_forward(const LayerNormForward<T>& a, int nthreads) {
  auto rows = &layer_norm_rows<T, false, false>;
  if (a.weight && a.bias) rows = &layer_norm_rows<T, true, true>;
  else if (a.weight) rows = &layer_norm_rows<T, true, false>;
  else if (a.bias) rows = &layer_norm_rows<T, false, true>;
  parallel_ranges(a.rows, nthreads, [&](std::int64_t r0, std::int64_t r1) { rows(a, r0, r1); });
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (x - mean) * rstd;
// with weight, partial[0..n) += dy * xhat (dweight) and partial[n..2n) += dy (dbias).
template <class T, bool HasW>
void layer_norm_backward_row(const LayerNormBackward<T>& a, std::int64_t i, double* partial) {
  const std::int64_t n = a.cols;
  const T* x = a.x + i * n;
  const T* dy = a.dy + i * n;
  const T* w = a.weight;
  T* dx = a.dx + i * n;
  const double mean = double(a.mean[i]), r = double(a.rstd[i]);
  const vwide vmean = splat<vwide>(mean), vr = splat<vwide>(r);

  vwide sg{}, sgx{};
  std::int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    const vwide xh = (load_wide(x + j) - vmean) * vr;
    vwide g = load_wide(dy + j);
    if constexpr (HasW) g *= load_wide(w + j);
    sg += g;
    sgx += g * xh;
  }
  double tg = 0, tgx = 0;
  for (std::int64_t k = j; k < n; ++k) {
    const double xh = (double(x[k]) - mean) * r;
    double g = double(dy[k]);
    if constexpr (HasW) g *= double(w[k]);
    tg += g;
    tgx += g * xh;
  }
  const double c0 = (lane_sum(sg) + tg) / double(n), c1 = (lane_sum(sgx) + tgx) / double(n);

  const vwide vc0 = splat<vwide>(c0), vc1 = splat<vwide>(c1);
  j = 0;
  for (; j + kWide <= n; j += kWide) {
    const vwide xh = (load_wide(x + j) - vmean) * vr;
    const vwide d = load_wide(dy + j);
    vwide g = d;
    if constexpr (HasW) {
      g *= load_wide(w + j);
      store(partial + j, load<vwide>(partial + j) + d * xh);
      store(partial + n + j, load<vwide>(partial + n + j) + d);
    }
    store_narrow(dx + j, vr * ((g - vc0) - xh * vc1));
  }
  for (; j < n; ++j) {
    const double xh = (double(x[j]) - mean) * r;
    const double d = double(dy[j]);
    double g = d;
    if constexpr (HasW) {
      g *= double(w[j]);
      partial[j] += d * xh;
      partial[n + j] += d;
    }
    dx[j] = T(r * ((g - c0) - xh * c1));
  }
}

template <class T>
void layer_norm_backward(const LayerNormBackward<T>& a, int nthreads) {
  if (a.weight) {
    T* const outs[2] = {a.dweight, a.dbias};
    rows_with_column_sums<T>(a.rows, a.cols, 2, outs, nthreads, [&](std::int64_t i, double* p) {
      layer_norm_backward_row<T, true>(a, i, p);
    });
  } else {
    rows_with_column_sums<T>(a.rows, a.cols, 0, nullptr, nthreads, [&](std::int64_t i, double* p) {
      layer_norm_backward_row<T, false>(a, i, p);
    });
  }
}

}  // namespace

void register_layer_norm(KernelTable& t) {
  t.row_f32.layer_norm = &layer_norm_forward<float>;
  t.row_f64.layer_norm = &layer_norm_forward<double>;
  t.row_f32.layer_norm_backward = &layer_norm_backward<float>;
  t.row_f64.layer_norm_backward = &layer_norm_backward<double>;
}

}  // namespace NL_TARGET
}  // namespace normlab
