// layer_norm forward and backward: one body, compiled once per SIMD target.
#include "dispatch/kernel_table.hpp"
#include "norm/row_norm.hpp"
#include "norm/split_rows.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// y = (x - mean) * rstd * w + b for the vector v of a row's elements [j, j + count), in
// C = compute_t<T>. mean is split into a C-sized head and tail so that x - mean keeps its digits
// in float even when |mean| >> std.
template <bool HasW, bool HasB, class C>
struct LayerNormMap {
  using V = vnative<C>;
  V head, tail, rstd;
  LayerNormMap(double mean, double r) {
    const C h = C(mean);
    head = splat<V>(h);
    tail = splat<V>(C(mean - double(h)));
    rstd = splat<V>(C(r));
  }
  __attribute__((always_inline)) V operator()(V v, const C* w, const C* b, std::int64_t j, int count) const {
    return (*this)(v, HasW ? load_n(w + j, count) : V{}, HasB ? load_n(b + j, count) : V{});
  }
  // The same with the weight and bias vectors given (ignored without weight or bias).
  __attribute__((always_inline)) V operator()(V v, V wv, V bv) const {
    const V d = (v - head) - tail;
    V scale = rstd;
    if constexpr (HasW) scale *= wv;
    if constexpr (HasB) return fmadd(d, scale, bv);
    return V(d * scale);
  }
};

// layer_norm over one row. NV > 0: a narrow row (with_narrow_rows). tick(j) at each vector j
// (next_row_tick).
template <class T, bool HasW, bool HasB, int NV, class Tick, class C = compute_t<T>>
void layer_norm_row(const T* x, const C* w, const C* b, T* y, std::int64_t n, double mean, double rstd, bool stream,
                    const Tick& tick) {
  const LayerNormMap<HasW, HasB, C> norm(mean, rstd);
  map_row<NV>(y, n, stream, [&](std::int64_t j, int count) {
    tick(j);
    return norm(load_n(x + j, count), w, b, j, count);
  });
}

// layer_norm_row of s = x + r, computed here and written to s beside y (recompute_sum: the
// rows start at the same distance from a line): bitwise the results of writing s first.
template <class T, bool HasW, bool HasB, class Tick, class C = compute_t<T>>
void add_layer_norm_row(const T* x, const T* r, const C* w, const C* b, T* s, T* y, std::int64_t n, double mean,
                        double rstd, bool stream, const Tick& tick) {
  using V = vnative<C>;
  const LayerNormMap<HasW, HasB, C> norm(mean, rstd);
  map_row_pair(s, y, n, stream, [&](std::int64_t j, int count, V& sum, V& out) {
    tick(j);
    sum = load_n(x + j, count) + load_n(r + j, count);
    out = norm(sum, w, b, j, count);
  });
}

// layer_norm_row for rows x0 and x1 (outputs y0 and y1, starting at the same distance from a
// line), one pass over w and b for both: bitwise the results of layer_norm_row.
template <class T, bool HasW, bool HasB, class Tick, class C = compute_t<T>>
void layer_norm_row_pair(const T* x0, const T* x1, const C* w, const C* b, T* y0, T* y1, std::int64_t n,
                         double mean0, double rstd0, double mean1, double rstd1, bool stream, const Tick& tick) {
  using V = vnative<C>;
  const LayerNormMap<HasW, HasB, C> norm0(mean0, rstd0), norm1(mean1, rstd1);
  map_row_pair(y0, y1, n, stream, [&](std::int64_t j, int count, V& out0, V& out1) {
    tick(j);
    out0 = norm0(load_n(x0 + j, count), w, b, j, count);
    out1 = norm1(load_n(x1 + j, count), w, b, j, count);
  });
}

// Rows whose weight (or bias) row holds this many bytes or more go in pairs, one read of the
// weight and bias for both: with weight and bias, float32 (64, 65536) took 0.90-0.93x the
// time, (512, 8192) 0.95x, (2048, 8192) 0.96-0.97x, (256, 65536) 0.96-0.98x (bfloat16 0.96-0.99x).
// Rows of 4096 floats, whose weight and bias fit L1 beside one row but not two, took 1.02x
// (bfloat16 1.07x) in pairs. Pipelined half and float64 rows go one at a time (in pairs, each
// vector normalized steps the sums of two next rows): float16 and bfloat16 (256, 65536) and
// (1024, 16384) took 0.91-0.99x the time of unpipelined pairs, pipelined pairs 0.98-1.00x;
// float64 rows of 4096-65536 0.84-0.93x, pipelined pairs 0.80-1.04x.
constexpr std::int64_t kPairedRowParamBytes = std::int64_t(32) << 10;

// Rows [r0, r1) of y = layer_norm(x), or with a residual of y = layer_norm(s), s = x + residual
// written to a.sum first (the row is then normalized from cache) or, where recompute_sum(),
// computed again and written beside y.
template <class T, bool HasW, bool HasB, int NV>
void layer_norm_rows(const LayerNormForward<T>& a, const T* residual, T* sum, std::int64_t r0, std::int64_t r1,
                     bool stream) {
  const std::int64_t n = a.cols;
  const T* rows = residual ? sum : a.x;  // what is normalized
  const std::int64_t data_bytes = a.rows * n * std::int64_t(sizeof(T));
  auto stats = [&](std::int64_t i, double mean, double rstd) {
    if (a.mean) a.mean[i] = compute_t<T>(mean);
    if (a.rstd) a.rstd[i] = compute_t<T>(rstd);
  };
  const RowPass pass = row_pass(a.x, residual, sum, a.y, n, stream);
  using C = compute_t<T>;
  using V = vnative<C>;
  constexpr bool kHeld = held_param_vectors<T>(NV, HasW || HasB);
  V wv[kHeld ? NV : 1]{}, bv[kHeld ? NV : 1]{};
  if constexpr (kHeld) {
    load_vectors(a.weight, wv);
    load_vectors(a.bias, bv);
  }
  auto apply = [&](std::int64_t i, double mean, double rstd, auto* next) {
    stats(i, mean, rstd);
    if constexpr (kHeld) {  // no tick: rows this narrow are neither pipelined nor prefetched
      const LayerNormMap<HasW, HasB, C> norm(mean, rstd);
      const T* const x = rows + i * n;
      map_row<NV>(a.y + i * n, n, stream, [&](std::int64_t j, int count) __attribute__((always_inline)) {
        return norm(load_n(x + j, count), wv[j / kLanes<C>], bv[j / kLanes<C>]);
      });
      return;
    }
    const std::int64_t after = next_row(i, a.rows) * n;
    const auto tick = next_row_tick(next, stream, n, a.x + after, residual ? residual + after : nullptr);
    if constexpr (NV == 0) {
      if (pass.recompute_sum) {
        add_layer_norm_row<T, HasW, HasB>(a.x + i * n, residual + i * n, a.weight, a.bias, sum + i * n,
                                          a.y + i * n, n, mean, rstd, stream, tick);
        return;
      }
    }
    layer_norm_row<T, HasW, HasB, NV>(rows + i * n, a.weight, a.bias, a.y + i * n, n, mean, rstd, stream, tick);
  };
  if constexpr (NV == 0 && (HasW || HasB)) {
    if (!residual && n * std::int64_t(sizeof(compute_t<T>)) >= kPairedRowParamBytes &&
        !rows_in_blocks<T>(n, data_bytes) && !(!std::is_same<T, float>::value && pass.pipeline)) {
      auto pair = [&](std::int64_t i, double mean0, double rstd0, double mean1, double rstd1, auto* next0,
                      auto* next1) {
        T* const y0 = a.y + i * n;
        T* const y1 = y0 + n;
        if (stream_head(y0, n) != stream_head(y1, n)) {
          apply(i, mean0, rstd0, next0);
          apply(i + 1, mean1, rstd1, next1);
          return;
        }
        stats(i, mean0, rstd0);
        stats(i + 1, mean1, rstd1);
        const auto tick0 = next_row_tick(next0, stream, n, a.x + next_row(i + 1, a.rows) * n, static_cast<T*>(nullptr));
        const auto tick1 = next_row_tick(next1, stream, n, a.x + next_row(i + 2, a.rows) * n, static_cast<T*>(nullptr));
        layer_norm_row_pair<T, HasW, HasB>(a.x + i * n, a.x + (i + 1) * n, a.weight, a.bias, y0, y1, n, mean0,
                                           rstd0, mean1, rstd1, stream, [&](std::int64_t j) {
                                             tick0(j);
                                             tick1(j);
                                           });
      };
      normalize_rows<true, NV>(a.x, residual, sum, pass, r0, r1, n, data_bytes, a.eps, apply, pair);
      if (stream) stream_fence();
      return;
    }
  }
  normalize_rows<true, NV>(a.x, residual, sum, pass, r0, r1, n, data_bytes, a.eps, apply);
  if (stream) stream_fence();
}

// Long rows of y = layer_norm(x), or of y = layer_norm(s) with s = x + residual written to sum,
// split across the threads (split_rows); with weights, in pairs of rows where their outputs
// start at the same distance from a line.
template <class T, bool HasW, bool HasB>
void layer_norm_split(const LayerNormForward<T>& a, const T* residual, T* sum, bool stream, int nthreads) {
  using C = compute_t<T>;
  const std::int64_t n = a.cols;
  const T* const rows = residual ? sum : a.x;  // what is normalized
  const auto no_tick = [](std::int64_t) __attribute__((always_inline)) {};
  auto stats = [&](std::int64_t i, double mean, double rstd) {
    if (a.mean) a.mean[i] = C(mean);
    if (a.rstd) a.rstd[i] = C(rstd);
  };
  auto one = [&](std::int64_t i, double mean, double rstd, std::int64_t j0, std::int64_t j1) {
    if (j0 == 0) stats(i, mean, rstd);
    const std::int64_t at = i * n + j0;
    layer_norm_row<T, HasW, HasB, 0>(rows + at, HasW ? a.weight + j0 : nullptr, HasB ? a.bias + j0 : nullptr,
                                     a.y + at, j1 - j0, mean, rstd, stream, no_tick);
  };
  auto pair = [&](std::int64_t i, double mean0, double rstd0, double mean1, double rstd1, std::int64_t j0,
                  std::int64_t j1) {
    const std::int64_t at = i * n + j0;
    if (stream_head(a.y + at, j1 - j0) != stream_head(a.y + at + n, j1 - j0)) {
      one(i, mean0, rstd0, j0, j1);
      one(i + 1, mean1, rstd1, j0, j1);
      return;
    }
    if (j0 == 0) {
      stats(i, mean0, rstd0);
      stats(i + 1, mean1, rstd1);
    }
    layer_norm_row_pair<T, HasW, HasB>(rows + at, rows + at + n, HasW ? a.weight + j0 : nullptr,
                                       HasB ? a.bias + j0 : nullptr, a.y + at, a.y + at + n, j1 - j0, mean0, rstd0,
                                       mean1, rstd1, stream, no_tick);
  };
  if constexpr (HasW || HasB) split_rows_forward<true>(a.x, residual, sum, a.rows, n, a.eps, nthreads, one, pair);
  else split_rows_forward<true>(a.x, residual, sum, a.rows, n, a.eps, nthreads, one);
}

template <class T>
void layer_norm_any(const LayerNormForward<T>& a, const T* residual, T* sum, int nthreads) {
  const std::int64_t bytes = a.rows * a.cols * std::int64_t(sizeof(T));
  // x, y, and residual and sum rows; the weight and bias.
  const bool stream =
      stream_forward_rows<T>(row_traffic_bytes<T>(a.cols, residual ? 4 : 2, (a.weight ? 1 : 0) + (a.bias ? 1 : 0)), bytes);
  if (split_rows<T>(a.rows, a.cols)) {
    auto split = &layer_norm_split<T, false, false>;
    if (a.weight && a.bias) split = &layer_norm_split<T, true, true>;
    else if (a.weight) split = &layer_norm_split<T, true, false>;
    else if (a.bias) split = &layer_norm_split<T, false, true>;
    return split(a, residual, sum, stream, nthreads);
  }
  with_narrow_rows<T, 16>(a.cols, narrow_forward_rows<T>(a.cols, bytes, residual, stream), [&](auto nv) {
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
  if (split_rows_backward_for<T>(a.rows, a.cols, a.weight != nullptr)) {
    if (a.weight)
      split_rows_backward<true, true>(a.dy, a.x, a.mean, a.rstd, a.weight, a.ds, a.dx, a.dweight, a.dbias, a.rows,
                                      a.cols, nthreads);
    else
      split_rows_backward<true, false>(a.dy, a.x, a.mean, a.rstd, a.weight, a.ds, a.dx, a.dweight, a.dbias, a.rows,
                                       a.cols, nthreads);
    return;
  }
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
