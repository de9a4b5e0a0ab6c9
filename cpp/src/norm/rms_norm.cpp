// rms_norm forward and backward: one body, compiled once per SIMD target.
#include <type_traits>

#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

template <class T, bool HasW>
void rms_norm_rows(const RmsNormForward<T>& a, std::int64_t r0, std::int64_t r1, bool stream) {
  using V = vnative<T>;
  const std::int64_t n = a.cols;
  auto rows = [&](auto group, std::int64_t i) {
    constexpr int G = decltype(group)::value;
    double mean_square[G], rstd[G];
    row_mean_squares<G>(a.x + i * n, n, n, mean_square);
    inverse_sqrt<G>(mean_square, a.eps, rstd);
    for (int g = 0; g < G; ++g) {
      if (a.rstd) a.rstd[i + g] = T(rstd[g]);
      const T* x = a.x + (i + g) * n;
      const V vr = splat<V>(T(rstd[g]));
      map_row(a.y + (i + g) * n, n, stream, [&](std::int64_t j, int count) {
        V scale = vr;
        if constexpr (HasW) scale *= load_n(a.weight + j, count);
        return V(load_n(x + j, count) * scale);
      });
    }
  };
  std::int64_t i = r0;
  if (group_rows<T>(n))
    for (; i + kRowGroup <= r1; i += kRowGroup) rows(std::integral_constant<int, kRowGroup>(), i);
  for (; i < r1; ++i) rows(std::integral_constant<int, 1>(), i);
  if (stream) stream_fence();
}

template <class T>
void rms_norm_forward(const RmsNormForward<T>& a, int nthreads) {
  const auto rows = a.weight ? &rms_norm_rows<T, true> : &rms_norm_rows<T, false>;
  // Threads get whole row groups, so grouping never depends on the thread count.
  const std::int64_t units = (a.rows + kRowGroup - 1) / kRowGroup;
  const bool stream = a.rows * a.cols * std::int64_t(sizeof(T)) >= stream_min_bytes();
  parallel_ranges(units, nthreads, [&](std::int64_t u0, std::int64_t u1) {
    rows(a, u0 * kRowGroup, u1 * kRowGroup < a.rows ? u1 * kRowGroup : a.rows, stream);
  });
}

template <class T>
void rms_norm_backward(const RmsNormBackward<T>& a, int nthreads) {
  if (a.weight) {
    T* const outs[1] = {a.dweight};
    rows_with_column_sums<T>(a.rows, a.cols, 1, outs, nthreads, [&](std::int64_t r0, std::int64_t r1, double* p) {
      row_norm_backward_rows<false, true>(a.dy, a.x, static_cast<const T*>(nullptr), a.rstd, a.weight, a.dx,
                                          a.cols, r0, r1, p);
    });
  } else {
    rows_with_column_sums<T>(a.rows, a.cols, 0, nullptr, nthreads, [&](std::int64_t r0, std::int64_t r1, double* p) {
      row_norm_backward_rows<false, false>(a.dy, a.x, static_cast<const T*>(nullptr), a.rstd, a.weight, a.dx,
                                           a.cols, r0, r1, p);
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
