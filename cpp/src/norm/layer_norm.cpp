// layer_norm forward and backward: one body, compiled once per SIMD target.
#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// y = (x - mean) * rstd * w + b over one row, in C = compute_t<T>. mean is split into a C-sized
// head and tail so that x - mean keeps its digits in float even when |mean| >> std. NV > 0: a
// narrow row (with_narrow_rows). Streamed, the next row's inputs next0 and next1 (or null) are
// prefetched meanwhile.
template <class T, bool HasW, bool HasB, int NV, class C = compute_t<T>>
void layer_norm_row(const T* x, const C* w, const C* b, T* y, std::int64_t n, double mean,
                    double rstd, bool stream, const T* next0, const T* next1) {
  using V = vnative<C>;
  const C head = C(mean), tail = C(mean - double(head));
  const V vhead = splat<V>(head), vtail = splat<V>(tail), vr = splat<V>(C(rstd));
  map_row<NV>(y, n, stream, [&](std::int64_t j, int count) {
    if (stream) {
      prefetch_next_row(next0 + j);
      if (next1) prefetch_next_row(next1 + j);
    }
    const V d = (load_n(x + j, count) - vhead) - vtail;
    V scale = vr;
    if constexpr (HasW) scale *= load_n(w + j, count);
    if constexpr (HasB) return fmadd(d, scale, load_n(b + j, count));
    return V(d * scale);
  });
}

// layer_norm_row for rows x0 and x1 (outputs y0 and y1, starting at the same distance from a
// line), one pass over w and b for both: bitwise the results of layer_norm_row. Streamed, the
// rows after them, next0 and next1, are prefetched meanwhile.
template <class T, bool HasW, bool HasB, class C = compute_t<T>>
void layer_norm_row_pair(const T* x0, const T* x1, const C* w, const C* b, T* y0, T* y1, std::int64_t n,
                         double mean0, double rstd0, double mean1, double rstd1, bool stream, const T* next0,
                         const T* next1) {
  using V = vnative<C>;
  const C head0 = C(mean0), tail0 = C(mean0 - double(head0));
  const C head1 = C(mean1), tail1 = C(mean1 - double(head1));
  const V vhead0 = splat<V>(head0), vtail0 = splat<V>(tail0), vr0 = splat<V>(C(rstd0));
  const V vhead1 = splat<V>(head1), vtail1 = splat<V>(tail1), vr1 = splat<V>(C(rstd1));
  map_row_pair(y0, y1, n, stream, [&](std::int64_t j, int count, V& out0, V& out1) {
    if (stream) {
      prefetch_next_row(next0 + j);
      prefetch_next_row(next1 + j);
    }
    const V d0 = (load_n(x0 + j, count) - vhead0) - vtail0;
    const V d1 = (load_n(x1 + j, count) - vhead1) - vtail1;
    V scale0 = vr0, scale1 = vr1;
    if constexpr (HasW) {
      const V wv = load_n(w + j, count);
      scale0 *= wv;
      scale1 *= wv;
    }
    if constexpr (HasB) {
      const V bv = load_n(b + j, count);
      out0 = fmadd(d0, scale0, bv);
      out1 = fmadd(d1, scale1, bv);
    } else {
      out0 = d0 * scale0;
      out1 = d1 * scale1;
    }
  });
}

// Rows whose weight (or bias) row holds this many bytes or more go in pairs, one read of the
// weight and bias for both: with weight and bias, float32 (64, 65536) took 0.90-0.93x the
// time, (512, 8192) 0.95x, (2048, 8192) 0.96-0.97x, (256, 65536) 0.96-0.98x (bfloat16 0.96-0.99x).
// Rows of 4096 floats, whose weight and bias fit L1 beside one row but not two, took 1.02x
// (bfloat16 1.07x) in pairs.
constexpr std::int64_t kPairedRowParamBytes = std::int64_t(32) << 10;

// Rows [r0, r1) of y = layer_norm(x), or with a residual of y = layer_norm(s), s = x + residual
// written to a.sum first (the row is then normalized from cache).
template <class T, bool HasW, bool HasB, int NV>
void layer_norm_rows(const LayerNormForward<T>& a, const T* residual, T* sum, std::int64_t r0, std::int64_t r1,
                     bool stream) {
  const std::int64_t n = a.cols;
  const T* rows = residual ? sum : a.x;  // what is normalized
  const std::int64_t data_bytes = a.rows * n * std::int64_t(sizeof(T));
  auto apply = [&](std::int64_t i, double mean, double rstd) {
    if (a.mean) a.mean[i] = compute_t<T>(mean);
    if (a.rstd) a.rstd[i] = compute_t<T>(rstd);
    layer_norm_row<T, HasW, HasB, NV>(rows + i * n, a.weight, a.bias, a.y + i * n, n, mean, rstd, stream,
                                      a.x + next_row(i, a.rows) * n,
                                      residual ? residual + next_row(i, a.rows) * n : nullptr);
  };
  if constexpr (NV == 0 && (HasW || HasB)) {
    if (!residual && n * std::int64_t(sizeof(compute_t<T>)) >= kPairedRowParamBytes &&
        !rows_in_blocks<T>(n, data_bytes)) {
      normalize_rows<true, NV>(a.x, residual, sum, r0, r1, n, data_bytes, a.eps, apply,
                               [&](std::int64_t i, double mean0, double rstd0, double mean1, double rstd1) {
                                 T* const y0 = a.y + i * n;
                                 T* const y1 = y0 + n;
                                 if (stream_head(y0, n) != stream_head(y1, n)) {
                                   apply(i, mean0, rstd0);
                                   apply(i + 1, mean1, rstd1);
                                   return;
                                 }
                                 for (int k = 0; k < 2; ++k) {
                                   if (a.mean) a.mean[i + k] = compute_t<T>(k ? mean1 : mean0);
                                   if (a.rstd) a.rstd[i + k] = compute_t<T>(k ? rstd1 : rstd0);
                                 }
                                 layer_norm_row_pair<T, HasW, HasB>(a.x + i * n, a.x + (i + 1) * n, a.weight, a.bias,
                                                                    y0, y1, n, mean0, rstd0, mean1, rstd1, stream,
                                                                    a.x + next_row(i + 1, a.rows) * n,
                                                                    a.x + next_row(i + 2, a.rows) * n);
                               });
      if (stream) stream_fence();
      return;
    }
  }
  normalize_rows<true, NV>(a.x, residual, sum, r0, r1, n, data_bytes, a.eps, apply);
  if (stream) stream_fence();
}

template <class T>
void layer_norm_any(const LayerNormForward<T>& a, const T* residual, T* sum, int nthreads) {
  const std::int64_t bytes = a.rows * a.cols * std::int64_t(sizeof(T));
  // x, y, and residual and sum rows; the weight and bias.
  const bool stream =
      stream_forward_rows<T>(row_traffic_bytes<T>(a.cols, residual ? 4 : 2, (a.weight ? 1 : 0) + (a.bias ? 1 : 0)), bytes);
  with_narrow_rows<T>(a.cols, rows_in_blocks<T>(a.cols, bytes), [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    auto rows = &layer_norm_rows<T, false, false, NV>;
    if (a.weight && a.bias) rows = &layer_norm_rows<T, true, true, NV>;
    else if (a.weight) rows = &layer_norm_rows<T, true, false, NV>;
    else if (a.bias) rows = &layer_norm_rows<T, false, true, NV>;
    parallel_ranges(a.rows, nthreads, [&](std::int64_t r0, std::int64_t r1) { rows(a, residual, sum, r0, r1, stream); });
  });
}

template <class T>
void layer_norm_forward(const LayerNormForward<T>& a, int nthreads) {
  layer_norm_any<T>(a, nullptr, nullptr, nthreads);
}

template <class T>
void add_layer_norm_forward(const AddLayerNormForward<T>& a, int nthreads) {
  layer_norm_any<T>(a.norm, a.residual, a.sum, nthreads);
}

template <class T>
void layer_norm_backward(const LayerNormBackward<T>& a, int nthreads) {
  row_norm_backward<true>(a.dy, a.x, a.mean, a.rstd, a.weight, a.ds, a.dx, a.dweight, a.dbias, a.rows,
                          a.cols, nthreads);
}

template <class T>
void fill(RowNormKernels<T>& k) {
  k.layer_norm = &layer_norm_forward<T>;
  k.layer_norm_backward = &layer_norm_backward<T>;
  k.add_layer_norm = &add_layer_norm_forward<T>;
}

}  // namespace

void register_layer_norm(KernelTable& t) {
  for_each_row_dtype(t, [](auto& kernels) { fill(kernels); });
}

}  // namespace NL_TARGET
}  // namespace normlab
