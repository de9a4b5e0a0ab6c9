// Pieces shared by the row-wise norms (layer_norm, rms_norm): per-row moments and the
// deterministic column sums of the backward pass. Per-target, like simd/vec.hpp.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

#include "parallel/parallel_for.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// Sum of a vector's lanes by halving: a fixed order, log-depth.
template <class V>
inline double lane_sum(V v) {
  constexpr int n = int(sizeof(V) / sizeof(v[0]));
  double a[n];
  for (int i = 0; i < n; ++i) a[i] = v[i];
  for (int w = n / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

struct Moments {
  double mean;
  double var;  // biased
};

// Mean and variance of x[0..n) in double from sums shifted by x[0]: one pass, and no
// cancellation when |mean| >> std because the shifted values are of the order of std.
template <class T>
inline Moments row_moments(const T* x, std::int64_t n) {
  const double shift = double(x[0]);
  const vwide k = splat<vwide>(shift);
  vwide s0{}, s1{}, q0{}, q1{};
  std::int64_t j = 0;
  for (; j + 2 * kWide <= n; j += 2 * kWide) {
    const vwide a = load_wide(x + j) - k, b = load_wide(x + j + kWide) - k;
    s0 += a;
    s1 += b;
    q0 += a * a;
    q1 += b * b;
  }
  double s = 0, q = 0;
  for (; j < n; ++j) {
    const double d = double(x[j]) - shift;
    s += d;
    q += d * d;
  }
  s += lane_sum(s0 + s1);
  q += lane_sum(q0 + q1);
  const double m = s / double(n);
  const double var = q / double(n) - m * m;
  return {shift + m, var > 0 ? var : 0.0};
}

// Mean of squares of x[0..n) in double.
template <class T>
inline double row_mean_square(const T* x, std::int64_t n) {
  vwide q0{}, q1{};
  std::int64_t j = 0;
  for (; j + 2 * kWide <= n; j += 2 * kWide) {
    const vwide a = load_wide(x + j), b = load_wide(x + j + kWide);
    q0 += a * a;
    q1 += b * b;
  }
  double q = 0;
  for (; j < n; ++j) q += double(x[j]) * double(x[j]);
  return (q + lane_sum(q0 + q1)) / double(n);
}

// Row blocks for column sums: fixed by the shape alone, so sums come out the same for every
// thread count. Up to 64 blocks, fewer when their double partials would get large.
inline std::int64_t column_sum_blocks(std::int64_t rows, std::int64_t cols, int nsums) {
  const double partial_bytes = double(cols) * nsums * sizeof(double);
  double budget = double(rows) * double(cols) * 4.0 / 8.0;
  if (budget < 4.0 * 1024 * 1024) budget = 4.0 * 1024 * 1024;
  std::int64_t nb = rows < 64 ? rows : 64;
  const std::int64_t cap = std::int64_t(budget / partial_bytes);
  if (nb > cap) nb = cap;
  return nb < 1 ? 1 : nb;
}

// Runs row(i, partial) for every row i, where partial points at nsums * cols doubles that
// row adds its column contributions to (null when nsums == 0), then stores the column sums
// in outs[0..nsums). Rows in a block go in order into the block's partial; blocks are added
// in order.
template <class T, class Row>
void rows_with_column_sums(std::int64_t rows, std::int64_t cols, int nsums, T* const* outs,
                           int nthreads, const Row& row) {
  if (nsums == 0 || rows == 0) {
    parallel_ranges(rows, nthreads, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t i = r0; i < r1; ++i) row(i, static_cast<double*>(nullptr));
    });
    for (int k = 0; k < nsums; ++k)
      for (std::int64_t j = 0; j < cols; ++j) outs[k][j] = T(0);
    return;
  }
  const std::int64_t nb = column_sum_blocks(rows, cols, nsums);
  const std::int64_t stride = std::int64_t(nsums) * cols;
  double* partials = static_cast<double*>(std::malloc(sizeof(double) * std::size_t(nb * stride)));
  if (!partials) throw std::bad_alloc();
  parallel_blocks(nb, nthreads, [&](std::int64_t b) {
    double* partial = partials + b * stride;
    for (std::int64_t j = 0; j < stride; ++j) partial[j] = 0.0;
    const std::int64_t r0 = rows * b / nb, r1 = rows * (b + 1) / nb;
    for (std::int64_t i = r0; i < r1; ++i) row(i, partial);
  });
  const int combine_threads = nb * stride * 8 >= (1 << 20) ? nthreads : 1;
  parallel_ranges(cols, combine_threads, [&](std::int64_t c0, std::int64_t c1) {
    for (int k = 0; k < nsums; ++k)
      for (std::int64_t j = c0; j < c1; ++j) {
        double s = partials[k * cols + j];
        for (std::int64_t b = 1; b < nb; ++b) s += partials[b * stride + k * cols + j];
        outs[k][j] = T(s);
      }
  });
  std::free(partials);
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
