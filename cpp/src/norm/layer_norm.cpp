// layer_norm forward and backward: one body, compiled once per SIMD target.
#include <type_traits>

#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// y = (x - mean) * rstd * w + b over one row. mean is split into a T-sized head and tail so
// that x - mean keeps its digits in float even when |mean| >> std.
template <class T, bool HasW, bool HasB>
void layer_norm_row(const T* x, const T* w, const T* b, T* y, std::int64_t n, double mean,
                    double rstd, bool stream) {
  using V = vnative<T>;
  const T head = T(mean), tail = T(mean - double(head));
  const V vhead = splat<V>(head), vtail = splat<V>(tail), vr = splat<V>(T(rstd));
  map_row(y, n, stream, [&](std::int64_t j, int count) {
    const V d = (load_n(x + j, count) - vhead) - vtail;
    V scale = vr;
    if constexpr (HasW) scale *= load_n(w + j, count);
    if constexpr (HasB) return fmadd(d, scale, load_n(b + j, count));
    return V(d * scale);
  });
}

template <class T, bool HasW, bool HasB>
void layer_norm_rows(const LayerNormForward<T>& a, std::int64_t r0, std::int64_t r1, bool stream) {
  const std::int64_t n = a.cols;
  auto rows = [&](auto group, std::int64_t i) {
    constexpr int G = decltype(group)::value;
    Moments m[G];
    double var[G], rstd[G];
    row_moments<G>(a.x + i * n, n, n, m);
    for (int g = 0; g < G; ++g) var[g] = m[g].var;
    inverse_sqrt<G>(var, a.eps, rstd);
    for (int g = 0; g < G; ++g) {
      if (a.mean) a.mean[i + g] = T(m[g].mean);
      if (a.rstd) a.rstd[i + g] = T(rstd[g]);
      layer_norm_row<T, HasW, HasB>(a.x + (i + g) * n, a.weight, a.bias, a.y + (i + g) * n, n, m[g].mean,
                                    rstd[g], stream);
    }
  };
  std::int64_t i = r0;
  if (group_rows<T>(n))
    for (; i + kRowGroup <= r1; i += kRowGroup) rows(std::integral_constant<int, kRowGroup>(), i);
  for (; i < r1; ++i) rows(std::integral_constant<int, 1>(), i);
  if (stream) stream_fence();
}

template <class T>
void layer_norm_forward(const LayerNormForward<T>& a, int nthreads) {
  auto rows = &layer_norm_rows<T, false, false>;
  if (a.weight && a.bias) rows = &layer_norm_rows<T, true, true>;
  else if (a.weight) rows = &layer_norm_rows<T, true, false>;
  else if (a.bias) rows = &layer_norm_rows<T, false, true>;
  // Threads get whole row groups, so grouping never depends on the thread count.
  const std::int64_t units = (a.rows + kRowGroup - 1) / kRowGroup;
  const bool stream = a.rows * a.cols * std::int64_t(sizeof(T)) >= stream_min_bytes();
  parallel_ranges(units, nthreads, [&](std::int64_t u0, std::int64_t u1) {
    rows(a, u0 * kRowGroup, u1 * kRowGroup < a.rows ? u1 * kRowGroup : a.rows, stream);
  });
}

template <class T>
void layer_norm_backward(const LayerNormBackward<T>& a, int nthreads) {
  if (a.weight) {
    T* const outs[2] = {a.dweight, a.dbias};
    rows_with_column_sums<T>(a.rows, a.cols, 2, outs, nthreads, [&](std::int64_t r0, std::int64_t r1, double* p) {
      row_norm_backward_rows<true, true>(a.dy, a.x, a.mean, a.rstd, a.weight, a.dx, a.cols, r0, r1, p);
    });
  } else {
    rows_with_column_sums<T>(a.rows, a.cols, 0, nullptr, nthreads, [&](std::int64_t r0, std::int64_t r1, double* p) {
      row_norm_backward_rows<true, false>(a.dy, a.x, a.mean, a.rstd, a.weight, a.dx, a.cols, r0, r1, p);
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
