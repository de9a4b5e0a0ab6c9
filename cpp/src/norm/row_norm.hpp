// Pieces shared by the row-wise norms (layer_norm, rms_norm): per-row moments and the
// deterministic column sums of the backward pass. Per-target, like simd/vec.hpp.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "parallel/parallel_for.hpp"

#ifndef NL_PREFETCH_BYTES
#define NL_PREFETCH_BYTES 2048
#endif
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

// m*m / var above which shifted sums lose digits the result needs (double carries ~16).
template <class T>
constexpr double kRecenterRatio = sizeof(T) == 4 ? 1e6 : 4.0;

// Mean and biased variance of x[0..n) from sums about `center` plus the usual correction.
template <class T>
Moments centered_moments(const T* x, std::int64_t n, double center) {
  const vwide k = splat<vwide>(center);
  vwide s0{}, q0{};
  std::int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    const vwide a = load_wide(x + j) - k;
    s0 += a;
    q0 = fmadd(a, a, q0);
  }
  double s = 0, q = 0;
  for (; j < n; ++j) {
    const double d = double(x[j]) - center;
    s += d;
    q = fmadd(d, d, q);
  }
  s += lane_sum(s0);
  q += lane_sum(q0);
  const double inv_n = 1.0 / double(n);
  const double m = s * inv_n;
  const double var = q * inv_n - m * m;
  return {center + m, var > 0 ? var : 0.0};
}

// Mean and variance of G rows x + g * stride, each of n elements, in double, from sums
// shifted by the row's first element: one pass, and no cancellation when |mean| >> std since
// the shifted values are of the order of std. The G rows are interleaved to hide the latency
// of short rows; each row's arithmetic is the same for every G, so results never depend on
// how rows were grouped.
template <int G, class T>
inline void row_moments_wide(const T* x, std::int64_t stride, std::int64_t n, Moments* out) {
  double shift[G];
  vwide k[G], s0[G], s1[G], q0[G], q1[G];
  for (int g = 0; g < G; ++g) {
    shift[g] = double(x[g * stride]);
    k[g] = splat<vwide>(shift[g]);
    s0[g] = s1[g] = q0[g] = q1[g] = vwide{};
  }
  std::int64_t j = 0;
  for (; j + 2 * kWide <= n; j += 2 * kWide) {
    for (int g = 0; g < G; ++g) {
      const vwide a = load_wide(x + g * stride + j) - k[g];
      const vwide b = load_wide(x + g * stride + j + kWide) - k[g];
      s0[g] += a;
      s1[g] += b;
      q0[g] = fmadd(a, a, q0[g]);
      q1[g] = fmadd(b, b, q1[g]);
    }
  }
  const double inv_n = 1.0 / double(n);
  for (int g = 0; g < G; ++g) {
    double s = 0, q = 0;
    for (std::int64_t t = j; t < n; ++t) {
      const double d = double(x[g * stride + t]) - shift[g];
      s += d;
      q = fmadd(d, d, q);
    }
    s += lane_sum(s0[g] + s1[g]);
    q += lane_sum(q0[g] + q1[g]);
    const double m = s * inv_n;
    const double var = q * inv_n - m * m;
    out[g] = {shift[g] + m, var > 0 ? var : 0.0};
    // q/n - m*m cancels when the shift x[0] lies far from the mean: then sum again about the
    // mean (the row is in cache). Rare for float, where double sums leave digits to spare.
    if (m * m > kRecenterRatio<T> * out[g].var) out[g] = centered_moments(x + g * stride, n, out[g].mean);
  }
}

// Rows are grouped this many at a time when short enough for the group to stay in L1: as many
// as keep their accumulators in registers (16 vector registers on AVX2 and NEON, 32 on AVX-512).
constexpr int kRowGroup = (NL_VEC_BYTES == 32 || NL_VEC_BYTES == 16) ? 2 : 4;
template <class T>
constexpr bool group_rows(std::int64_t cols) {
  return cols * std::int64_t(sizeof(T)) * kRowGroup <= 16 * 1024;
}

// Mean of squares of G rows x + g * stride, each of n elements, in double (interleaved like
// row_moments, with the same per-row arithmetic for every G).
template <int G, class T>
inline void row_mean_squares_wide(const T* x, std::int64_t stride, std::int64_t n, double* out) {
  vwide q0[G], q1[G];
  for (int g = 0; g < G; ++g) q0[g] = q1[g] = vwide{};
  std::int64_t j = 0;
  for (; j + 2 * kWide <= n; j += 2 * kWide) {
    for (int g = 0; g < G; ++g) {
      const vwide a = load_wide(x + g * stride + j), b = load_wide(x + g * stride + j + kWide);
      q0[g] = fmadd(a, a, q0[g]);
      q1[g] = fmadd(b, b, q1[g]);
    }
  }
  for (int g = 0; g < G; ++g) {
    double q = 0;
    for (std::int64_t t = j; t < n; ++t) q = fmadd(double(x[g * stride + t]), double(x[g * stride + t]), q);
    out[g] = (q + lane_sum(q0[g] + q1[g])) * (1.0 / double(n));
  }
}

#if NL_VEC_BYTES
// Float sums are flushed into double accumulators after this many vectors per lane, so each
// float partial sum has at most this many terms.
constexpr int kFlushEvery = 4;
// Mean squares outside this range may have overflowed or lost digits to underflow as float
// squares: such rows are summed again in double.
constexpr double kFloatSquaresMin = 1e-30, kFloatSquaresMax = 1e30;

// Reads of a row are prefetched this many elements ahead (rows are read once from memory,
// between stretches of arithmetic that let the hardware prefetcher fall behind).
template <class T>
constexpr std::int64_t kPrefetchAhead = NL_PREFETCH_BYTES / sizeof(T);

// row_moments for float data on SIMD targets: shifted values and their squares summed in float
// (twice the lanes of double) for kFlushEvery vectors, then added into double accumulators.
// Float sums leave fewer spare digits than double ones, so rows are re-summed about the mean as
// soon as the shift lies a couple of standard deviations away.
template <int G>
inline void row_moments_f32(const float* x, std::int64_t stride, std::int64_t n, Moments* out) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  V k[G], s[G], q[G];
  vwide ds[G], dq[G];
  for (int g = 0; g < G; ++g) {
    k[g] = splat<V>(x[g * stride]);
    s[g] = q[g] = V{};
    ds[g] = dq[g] = vwide{};
  }
  auto flush = [&] {
    for (int g = 0; g < G; ++g) {
      ds[g] += widen_low(s[g]) + widen_high(s[g]);
      dq[g] += widen_low(q[g]) + widen_high(q[g]);
      s[g] = q[g] = V{};
    }
  };
  std::int64_t j = 0;
  int iter = 0;
  for (; j + L <= n; j += L) {
    for (int g = 0; g < G; ++g) {
      __builtin_prefetch(x + g * stride + j + kPrefetchAhead<float>);
      const V d = load<V>(x + g * stride + j) - k[g];
      s[g] += d;
      q[g] = fmadd(d, d, q[g]);
    }
    if (++iter == kFlushEvery) {
      flush();
      iter = 0;
    }
  }
  flush();
  const double inv_n = 1.0 / double(n);
  for (int g = 0; g < G; ++g) {
    const double shift = double(x[g * stride]);
    double ts = 0, tq = 0;
    for (std::int64_t t = j; t < n; ++t) {
      const double d = double(x[g * stride + t]) - shift;
      ts += d;
      tq = fmadd(d, d, tq);
    }
    const double m = (lane_sum(ds[g]) + ts) * inv_n;
    const double mean_square = (lane_sum(dq[g]) + tq) * inv_n;
    const double var = mean_square - m * m;
    out[g] = {shift + m, var > 0 ? var : 0.0};
    if (!(mean_square >= kFloatSquaresMin && mean_square <= kFloatSquaresMax))
      row_moments_wide<1>(x + g * stride, stride, n, out + g);  // float squares over/underflowed
    else if (m * m > 4.0 * out[g].var)
      out[g] = centered_moments(x + g * stride, n, out[g].mean);
  }
}

// row_mean_squares for float data on SIMD targets, summed like row_moments above.
template <int G>
inline void row_mean_squares_f32(const float* x, std::int64_t stride, std::int64_t n, double* out) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  V q[G];
  vwide dq[G];
  for (int g = 0; g < G; ++g) {
    q[g] = V{};
    dq[g] = vwide{};
  }
  auto flush = [&] {
    for (int g = 0; g < G; ++g) {
      dq[g] += widen_low(q[g]) + widen_high(q[g]);
      q[g] = V{};
    }
  };
  std::int64_t j = 0;
  int iter = 0;
  for (; j + L <= n; j += L) {
    for (int g = 0; g < G; ++g) {
      __builtin_prefetch(x + g * stride + j + kPrefetchAhead<float>);
      const V v = load<V>(x + g * stride + j);
      q[g] = fmadd(v, v, q[g]);
    }
    if (++iter == kFlushEvery) {
      flush();
      iter = 0;
    }
  }
  flush();
  for (int g = 0; g < G; ++g) {
    double tq = 0;
    for (std::int64_t t = j; t < n; ++t) tq = fmadd(double(x[g * stride + t]), double(x[g * stride + t]), tq);
    out[g] = (lane_sum(dq[g]) + tq) * (1.0 / double(n));
    if (!(out[g] >= kFloatSquaresMin && out[g] <= kFloatSquaresMax))
      row_mean_squares_wide<1>(x + g * stride, stride, n, out + g);  // float squares over/underflowed
  }
}
#endif

// Dispatch: float sums where the target has them, double sums otherwise.
template <int G, class T>
inline void row_moments(const T* x, std::int64_t stride, std::int64_t n, Moments* out) {
#if NL_VEC_BYTES
  if constexpr (sizeof(T) == 4) return row_moments_f32<G>(x, stride, n, out);
#endif
  row_moments_wide<G>(x, stride, n, out);
}
template <int G, class T>
inline void row_mean_squares(const T* x, std::int64_t stride, std::int64_t n, double* out) {
#if NL_VEC_BYTES
  if constexpr (sizeof(T) == 4) return row_mean_squares_f32<G>(x, stride, n, out);
#endif
  row_mean_squares_wide<G>(x, stride, n, out);
}


// Row blocks for column sums: fixed by the shape alone, so sums come out the same for every
// thread count. Up to 64 blocks, fewer when their double partials would pass 2 MiB and a
// sixteenth of the input.
inline std::int64_t column_sum_blocks(std::int64_t rows, std::int64_t cols, int nsums) {
  const double partial_bytes = double(cols) * nsums * sizeof(double);
  double budget = double(rows) * double(cols) * 4.0 / 16.0;
  if (budget < 2.0 * 1024 * 1024) budget = 2.0 * 1024 * 1024;
  std::int64_t nb = rows < 64 ? rows : 64;
  const std::int64_t cap = std::int64_t(budget / partial_bytes);
  if (nb > cap) nb = cap;
  return nb < 1 ? 1 : nb;
}

// Runs rows(r0, r1, partial) over ranges covering [0, rows), where partial points at
// nsums * cols doubles the rows add their column contributions to (null when nsums == 0), then
// stores the column sums in outs[0..nsums). Ranges are fixed by the shape: blocks of rows
// (each with its own partial, rows added in order) with nsums, whole row groups without, so
// no result depends on the thread count. Blocks are added in order.
template <class T, class Rows>
void rows_with_column_sums(std::int64_t rows, std::int64_t cols, int nsums, T* const* outs,
                           int nthreads, const Rows& rows_fn) {
  if (nsums == 0 || rows == 0) {
    const std::int64_t units = (rows + kRowGroup - 1) / kRowGroup;
    parallel_ranges(units, nthreads, [&](std::int64_t u0, std::int64_t u1) {
      rows_fn(u0 * kRowGroup, u1 * kRowGroup < rows ? u1 * kRowGroup : rows, static_cast<double*>(nullptr));
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
    rows_fn(rows * b / nb, rows * (b + 1) / nb, partial);
  });
  // Column sums, blocks added in order; a chunk of columns at a time so every block's partial
  // is read sequentially.
  constexpr std::int64_t kChunk = 256;
  const int combine_threads = nb * stride * 8 >= (1 << 20) ? nthreads : 1;
  parallel_ranges((stride + kChunk - 1) / kChunk, combine_threads, [&](std::int64_t c0, std::int64_t c1) {
    double acc[kChunk];
    for (std::int64_t c = c0 * kChunk; c < c1 * kChunk && c < stride; c += kChunk) {
      const std::int64_t len = stride - c < kChunk ? stride - c : kChunk;
      for (std::int64_t j = 0; j < len; ++j) acc[j] = partials[c + j];
      for (std::int64_t b = 1; b < nb; ++b) {
        const double* p = partials + b * stride + c;
        for (std::int64_t j = 0; j < len; ++j) acc[j] += p[j];
      }
      for (std::int64_t j = 0; j < len; ++j) outs[(c + j) / cols][(c + j) % cols] = T(acc[j]);
    }
  });
  std::free(partials);
}

// Backward of G rows of layer_norm (Centered) or rms_norm, in double:
//   xhat = (x - mean) * rstd (mean = 0 for rms), g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (no mean(g) term for rms).
// With weight, partial[0..n) += dy * xhat and, for layer_norm, partial[n..2n) += dy, the G
// rows' contributions summed first, in row order. Rows are interleaved to hide the latency of
// short rows; w is loaded once per group.
// mean(g) (0 for rms) and mean(g * xhat) of G rows, in double (pass 1 of the backward).
template <bool Centered, bool HasW, int G, class T>
void backward_row_sums(const T* dy0, const T* x0, const T* mean, const T* rstd, const T* w, std::int64_t n,
                       double* c0, double* c1) {
  const T* x[G];
  const T* dy[G];
  double m[G], r[G];
  vwide vm[G], vr[G], sg[G], sgx[G];
  for (int g = 0; g < G; ++g) {
    x[g] = x0 + g * n;
    dy[g] = dy0 + g * n;
    m[g] = Centered ? double(mean[g]) : 0.0;
    r[g] = double(rstd[g]);
    vm[g] = splat<vwide>(m[g]);
    vr[g] = splat<vwide>(r[g]);
    sg[g] = sgx[g] = vwide{};
  }
  std::int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    vwide wv{};
    if constexpr (HasW) wv = load_wide(w + j);
    for (int g = 0; g < G; ++g) {
      vwide xh = load_wide(x[g] + j);
      if constexpr (Centered) xh -= vm[g];
      xh *= vr[g];
      vwide gv = load_wide(dy[g] + j);
      if constexpr (HasW) gv *= wv;
      if constexpr (Centered) sg[g] += gv;
      sgx[g] = fmadd(gv, xh, sgx[g]);
    }
  }
  const double inv_n = 1.0 / double(n);
  for (int g = 0; g < G; ++g) {
    double tg = 0, tgx = 0;
    for (std::int64_t k = j; k < n; ++k) {
      const double xh = (double(x[g][k]) - m[g]) * r[g];
      double gv = double(dy[g][k]);
      if constexpr (HasW) gv *= double(w[k]);
      tg += gv;
      tgx = fmadd(gv, xh, tgx);
    }
    c0[g] = Centered ? (lane_sum(sg[g]) + tg) * inv_n : 0.0;
    c1[g] = (lane_sum(sgx[g]) + tgx) * inv_n;
  }
}

template <bool Centered, bool HasW, int G, class T>
void row_norm_backward_group(const T* dy0, const T* x0, const T* mean, const T* rstd, const T* w,
                             T* dx0, std::int64_t n, double* partial) {
  const T* x[G];
  const T* dy[G];
  T* dx[G];
  double m[G], r[G], c0[G], c1[G];
  vwide vm[G], vr[G];
  for (int g = 0; g < G; ++g) {
    x[g] = x0 + g * n;
    dy[g] = dy0 + g * n;
    dx[g] = dx0 + g * n;
    m[g] = Centered ? double(mean[g]) : 0.0;
    r[g] = double(rstd[g]);
    vm[g] = splat<vwide>(m[g]);
    vr[g] = splat<vwide>(r[g]);
  }
  backward_row_sums<Centered, HasW, G>(dy0, x0, mean, rstd, w, n, c0, c1);
  std::int64_t j;

  vwide vc0[G], vc1[G];
  for (int g = 0; g < G; ++g) {
    vc0[g] = splat<vwide>(c0[g]);
    vc1[g] = splat<vwide>(c1[g]);
  }
  for (j = 0; j + kWide <= n; j += kWide) {
    vwide wv{}, pw{}, pb{};
    if constexpr (HasW) wv = load_wide(w + j);
    for (int g = 0; g < G; ++g) {
      vwide xh = load_wide(x[g] + j);
      if constexpr (Centered) xh -= vm[g];
      xh *= vr[g];
      const vwide d = load_wide(dy[g] + j);
      vwide gv = d;
      if constexpr (HasW) {
        gv *= wv;
        pw = fmadd(d, xh, pw);
        if constexpr (Centered) pb += d;
      }
      if constexpr (Centered) gv -= vc0[g];
      store_narrow(dx[g] + j, vr[g] * (gv - xh * vc1[g]));
    }
    if constexpr (HasW) {
      store(partial + j, load<vwide>(partial + j) + pw);
      if constexpr (Centered) store(partial + n + j, load<vwide>(partial + n + j) + pb);
    }
  }
  for (; j < n; ++j) {
    double wv = 0, pw = 0, pb = 0;
    if constexpr (HasW) wv = double(w[j]);
    for (int g = 0; g < G; ++g) {
      const double xh = (double(x[g][j]) - m[g]) * r[g];
      const double d = double(dy[g][j]);
      double gv = d;
      if constexpr (HasW) {
        gv *= wv;
        pw = fmadd(d, xh, pw);
        if constexpr (Centered) pb += d;
      }
      dx[g][j] = T(r[g] * ((gv - c0[g]) - xh * c1[g]));
    }
    if constexpr (HasW) {
      partial[j] += pw;
      if constexpr (Centered) partial[n + j] += pb;
    }
  }
}

#if NL_VEC_BYTES
// The same backward for float data on SIMD targets, with float elementwise math (twice the
// lanes of double). Row sums are kept in float for at most kFlushEvery vectors per lane, then
// added into double accumulators; the group's weight-gradient contributions are summed in
// float (at most kRowGroup terms) before joining the double partials. Lanes past the end of a
// row read zeros: they add nothing to any sum.

template <bool Centered, bool HasW, int G>
void row_norm_backward_group_f32(const float* dy0, const float* x0, const float* mean, const float* rstd,
                                 const float* w, float* dx0, std::int64_t n, double* partial) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  const float* x[G];
  const float* dy[G];
  float* dx[G];
  V vm[G], vr[G], sg[G], sgx[G];
  vwide dsg[G], dsgx[G];
  for (int g = 0; g < G; ++g) {
    x[g] = x0 + g * n;
    dy[g] = dy0 + g * n;
    dx[g] = dx0 + g * n;
    vm[g] = splat<V>(Centered ? mean[g] : 0.0f);
    vr[g] = splat<V>(rstd[g]);
    sg[g] = sgx[g] = V{};
    dsg[g] = dsgx[g] = vwide{};
  }
  auto flush = [&] {
    for (int g = 0; g < G; ++g) {
      if constexpr (Centered) dsg[g] += widen_low(sg[g]) + widen_high(sg[g]);
      dsgx[g] += widen_low(sgx[g]) + widen_high(sgx[g]);
      sg[g] = sgx[g] = V{};
    }
  };
  std::int64_t iter = 0;
  for (std::int64_t j = 0; j < n; j += L) {
    const int count = n - j < L ? int(n - j) : L;
    V wv{};
    if constexpr (HasW) wv = load_n(w + j, count);
    for (int g = 0; g < G; ++g) {
      V xh = load_n(x[g] + j, count);
      if constexpr (Centered) xh -= vm[g];
      xh *= vr[g];
      V gv = load_n(dy[g] + j, count);
      if constexpr (HasW) gv *= wv;
      if constexpr (Centered) sg[g] += gv;
      sgx[g] = fmadd(gv, xh, sgx[g]);
    }
    if (++iter % kFlushEvery == 0) flush();
  }
  flush();
  const double inv_n = 1.0 / double(n);
  V vc0[G], vk1[G];
  for (int g = 0; g < G; ++g) {
    const double c0 = Centered ? lane_sum(dsg[g]) * inv_n : 0.0;
    const double c1 = lane_sum(dsgx[g]) * inv_n;
    double c[2] = {c0, c1};
    if (!__builtin_isfinite(c0) || !__builtin_isfinite(c1))  // float products overflowed, or Inf/NaN
      backward_row_sums<Centered, HasW, 1>(dy[g], x[g], Centered ? mean + g : mean, rstd + g, w, n, c, c + 1);
    vc0[g] = splat<V>(float(c[0]));
    vk1[g] = splat<V>(float(c[1] * double(rstd[g])));
  }
  // dx = rstd * (g - c0) - (rstd * c1) * xhat
  for (std::int64_t j = 0; j < n; j += L) {
    const int count = n - j < L ? int(n - j) : L;
    V wv{}, pw{}, pb{};
    if constexpr (HasW) wv = load_n(w + j, count);
    for (int g = 0; g < G; ++g) {
      V xh = load_n(x[g] + j, count);
      if constexpr (Centered) xh -= vm[g];
      xh *= vr[g];
      const V d = load_n(dy[g] + j, count);
      V gv = d;
      if constexpr (HasW) {
        gv *= wv;
        pw = fmadd(d, xh, pw);
        if constexpr (Centered) pb += d;
      }
      if constexpr (Centered) gv -= vc0[g];
      const V out = vr[g] * gv - vk1[g] * xh;
      if (count == L) store(dx[g] + j, out);
      else store_partial(dx[g] + j, out, count);
    }
    if constexpr (HasW) {
      auto add_into = [&](double* p, V v) {
        const vwide lo = widen_low(v), hi = widen_high(v);
        if (count == L) {
          store(p, load<vwide>(p) + lo);
          store(p + kWide, load<vwide>(p + kWide) + hi);
        } else {
          double lanes[2 * kWide];
          store(lanes, lo);
          store(lanes + kWide, hi);
          for (int k = 0; k < count; ++k) p[k] += lanes[k];
        }
      };
      add_into(partial + j, pw);
      if constexpr (Centered) add_into(partial + n + j, pb);
    }
  }
}
#endif

// Short rows are grouped in the backward pass; longer rows are not, since a group's many
// streams at the same page offset (x, dy, dx of each row) would evict each other from L1.
template <class T>
constexpr bool group_backward_rows(std::int64_t cols) {
  return cols * std::int64_t(sizeof(T)) <= 1024;
}

// The backward of rows [r0, r1) in groups of kRowGroup from r0 (then singly).
template <bool Centered, bool HasW, class T>
void row_norm_backward_rows(const T* dy, const T* x, const T* mean, const T* rstd, const T* w, T* dx,
                            std::int64_t n, std::int64_t r0, std::int64_t r1, double* partial) {
  auto group = [&](auto size, std::int64_t i) {
    constexpr int G = decltype(size)::value;
    const T* m = Centered ? mean + i : mean;
#if NL_VEC_BYTES
    if constexpr (sizeof(T) == 4) {
      row_norm_backward_group_f32<Centered, HasW, G>(dy + i * n, x + i * n, m, rstd + i, w, dx + i * n, n,
                                                     partial);
      return;
    }
#endif
    row_norm_backward_group<Centered, HasW, G>(dy + i * n, x + i * n, m, rstd + i, w, dx + i * n, n, partial);
  };
  std::int64_t i = r0;
  if (group_backward_rows<T>(n))
    for (; i + kRowGroup <= r1; i += kRowGroup) group(std::integral_constant<int, kRowGroup>(), i);
  for (; i < r1; ++i) group(std::integral_constant<int, 1>(), i);
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
