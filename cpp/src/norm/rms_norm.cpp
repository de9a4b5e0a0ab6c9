// rms_norm forward and backward: one body, compiled once per SIMD target.
#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"
#include "norm/split_rows.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// Rows [r0, r1) of y = rms_norm(x), or with a residual of y = rms_norm(s), s = x + residual
// written to sum first (the row is then normalized from cache), or where recompute_sum()
// computed again here and written beside y.
template <class T, bool HasW, int NV>
void rms_norm_rows(const RmsNormForward<T>& a, const T* residual, T* sum, std::int64_t r0, std::int64_t r1,
                   bool stream) {
  using C = compute_t<T>;
  using V = vnative<C>;
  const std::int64_t n = a.cols;
  const T* rows = residual ? sum : a.x;  // what is normalized
  const RowPass pass = row_pass(a.x, residual, sum, a.y, n, stream);
  constexpr bool kHeld = held_param_vectors<T>(NV, HasW);
  V wv[kHeld ? NV : 1]{};
  if constexpr (kHeld) load_vectors(a.weight, wv);
  normalize_rows<false, NV>(
      a.x, residual, sum, pass, r0, r1, n, a.rows * n * std::int64_t(sizeof(T)), a.eps,
      [&](std::int64_t i, double, double rstd, auto* next) {
        if (a.rstd) a.rstd[i] = C(rstd);
        const V vr = splat<V>(C(rstd));
        const std::int64_t after = next_row(i, a.rows) * n;
        const auto tick = next_row_tick(next, stream, n, a.x + after, residual ? residual + after : nullptr);
        auto scaled = [&](V v, std::int64_t j, int count) {
          tick(j);
          V scale = vr;
          if constexpr (kHeld) scale *= wv[j / kLanes<C>];
          else if constexpr (HasW) scale *= load_n(a.weight + j, count);
          return V(v * scale);
        };
        if constexpr (NV == 0) {
          if (pass.recompute_sum) {
            const T *x = a.x + i * n, *r = residual + i * n;
            map_row_pair(sum + i * n, a.y + i * n, n, stream, [&](std::int64_t j, int count, V& s, V& out) {
              s = load_n(x + j, count) + load_n(r + j, count);
              out = scaled(s, j, count);
            });
            return;
          }
        }
        const T* x = rows + i * n;
        map_row<NV>(a.y + i * n, n, stream, [&](std::int64_t j, int count) { return scaled(load_n(x + j, count), j, count); });
      });
  if (stream) stream_fence();
}

// Long rows of y = rms_norm(x), or of y = rms_norm(s) with s = x + residual written to sum, split
// across the threads (split_rows).
template <class T, bool HasW>
void rms_norm_split(const RmsNormForward<T>& a, const T* residual, T* sum, bool stream, int nthreads) {
  using C = compute_t<T>;
  using V = vnative<C>;
  const std::int64_t n = a.cols;
  const T* const rows = residual ? sum : a.x;  // what is normalized
  split_rows_forward<false>(a.x, residual, sum, a.rows, n, a.eps, nthreads,
                            [&](std::int64_t i, double, double rstd, std::int64_t j0, std::int64_t j1) {
                              if (j0 == 0 && a.rstd) a.rstd[i] = C(rstd);
                              const V vr = splat<V>(C(rstd));
                              const T* const x = rows + i * n + j0;
                              const C* const w = HasW ? a.weight + j0 : nullptr;
                              map_row(a.y + i * n + j0, j1 - j0, stream, [&](std::int64_t j, int count) {
                                V scale = vr;
                                if constexpr (HasW) scale *= load_n(w + j, count);
                                return V(load_n(x + j, count) * scale);
                              });
                            });
}

template <class T>
void rms_norm_any(const RmsNormForward<T>& a, const T* residual, T* sum, int nthreads) {
  const std::int64_t bytes = a.rows * a.cols * std::int64_t(sizeof(T));
  // x, y, and residual and sum rows; the weight.
  const bool stream = stream_forward_rows<T>(row_traffic_bytes<T>(a.cols, residual ? 4 : 2, a.weight ? 1 : 0), bytes);
  if (split_rows<T>(a.rows, a.cols))
    return (a.weight ? &rms_norm_split<T, true> : &rms_norm_split<T, false>)(a, residual, sum, stream, nthreads);
  with_narrow_rows<T, 16>(a.cols, narrow_forward_rows<T>(a.cols, bytes, residual, stream), [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    const auto rows = a.weight ? &rms_norm_rows<T, true, NV> : &rms_norm_rows<T, false, NV>;
    parallel_ranges(a.rows, nthreads, [&](std::int64_t r0, std::int64_t r1) { rows(a, residual, sum, r0, r1, stream); });
  });
}

template <class T>
void rms_norm_forward(const RmsNormForward<T>& a, int nthreads) {
  rms_norm_any<T>(a, nullptr, nullptr, nthreads);
}

template <class T>
void add_rms_norm_forward(const AddRmsNormForward<T>& a, int nthreads) {
  rms_norm_any<T>(a.norm, a.residual, a.sum, nthreads);
}

template <class T>
void rms_norm_backward(const RmsNormBackward<T>& a, int nthreads) {
  using C = compute_t<T>;
  if (split_rows_backward_for<T>(a.rows, a.cols, a.weight != nullptr)) {
    const C* const none = nullptr;
    if (a.weight)
      split_rows_backward<false, true>(a.dy, a.x, none, a.rstd, a.weight, a.ds, a.dx, a.dweight,
                                       static_cast<C*>(nullptr), a.rows, a.cols, nthreads);
    else
      split_rows_backward<false, false>(a.dy, a.x, none, a.rstd, a.weight, a.ds, a.dx, a.dweight,
                                        static_cast<C*>(nullptr), a.rows, a.cols, nthreads);
    return;
  }
  row_norm_backward<false>(a.dy, a.x, static_cast<const C*>(nullptr), a.rstd, a.weight, a.ds, a.dx, a.dweight,
                           static_cast<C*>(nullptr), a.rows, a.cols, nthreads);
}

template <class T>
void fill(RowNormKernels<T>& k) {
  k.rms_norm = &rms_norm_forward<T>;
  k.rms_norm_backward = &rms_norm_backward<T>;
  k.add_rms_norm = &add_rms_norm_forward<T>;
}

}  // namespace

void register_rms_norm(KernelTable& t) {
  for_each_row_dtype(t, [](auto& kernels) { fill(kernels); });
}

}  // namespace NL_TARGET
}  // namespace normlab
