// Long rows shared by the threads: the row-norm forwards of rows too long for one thread each.
// Per-target, like row_norm.hpp.
#pragma once

#include <cstdint>
#include <vector>

#include "norm/row_norm.hpp"
#include "parallel/openmp.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// Tensors of fewer than kSplitMaxRows rows of kSplitRowMinBytes of data or more split each row
// across the threads, in chunks of kSplitChunkBytes: each thread sums its chunks of a row, the
// chunks' double sums are added in chunk order, and each thread normalizes the same chunks
// again, from its own cache. Taken one per thread, such rows leave threads idle. Against that
// (2 threads, AMD Zen 4 VM, in-process A/B): one row of 2**22 or 2**26 elements took 0.51-0.58x
// the time (float32, float64, float16; layer_norm and rms_norm), 2 and 3 such rows 0.76-1.00x,
// 1 and 3 rows of 512 KiB 0.61-0.83x (float16 0.88-0.99x); on one thread 0.98-1.07x. With 4 or
// more rows, split rows ran slower than rows one per thread (layer_norm (64, 2**20) 1.23x), whose
// next row's sums are taken while this row is written. The choice and the chunks depend only on
// the shape, so results do not depend on the thread count.
constexpr std::int64_t kSplitMaxRows = 4;
constexpr std::int64_t kSplitRowMinBytes = std::int64_t(512) << 10;
constexpr std::int64_t kSplitChunkBytes = std::int64_t(64) << 10;

template <class T>
bool split_rows(std::int64_t rows, std::int64_t n) {
  return rows < kSplitMaxRows && n * std::int64_t(sizeof(T)) >= kSplitRowMinBytes;
}

struct ShiftedSums {
  double s = 0;  // sum of x - shift (Centered only)
  double q = 0;  // sum of (x - shift)^2
};

// The sums of x[0..n) - shift (Centered; else of squares of x) in double: of float partial sums
// of at most kRowFlushEvery vectors per lane where the data is computed in float on a SIMD
// target and not Wide (shift must then be a float), else of doubles.
template <bool Centered, bool Wide, class T>
ShiftedSums chunk_sums(const T* x, std::int64_t n, double shift) {
  std::int64_t j = 0;
  ShiftedSums out;
#if NL_VEC_BYTES
  if constexpr (!Wide && std::is_same<compute_t<T>, float>::value) {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    const V k = splat<V>(float(shift));
    V s[2] = {}, q[2] = {};
    vwide ds{}, dq{};
    auto flush = [&] {
      if constexpr (Centered) ds += widen_sum(s[0] + s[1]);
      dq += widen_sum(q[0] + q[1]);
      s[0] = s[1] = q[0] = q[1] = V{};
    };
    constexpr std::int64_t kStep = 2 * L * kRowFlushEvery;
    for (; j + kStep <= n; j += kStep) {
      for (int t = 0; t < kRowFlushEvery; ++t) {
        __builtin_prefetch(x + j + 2 * t * L + kPrefetchFloats);
        add_float_sums<Centered>(load<V>(x + j + 2 * t * L), k, s[0], q[0]);
        add_float_sums<Centered>(load<V>(x + j + (2 * t + 1) * L), k, s[1], q[1]);
      }
      flush();
    }
    for (; j + L <= n; j += L) add_float_sums<Centered>(load<V>(x + j), k, s[0], q[0]);
    flush();
    out.s = lane_sum(ds);
    out.q = lane_sum(dq);
  } else
#endif
  {
    const vwide k = splat<vwide>(Centered ? shift : 0.0);
    vwide s0{}, s1{}, q0{}, q1{};
    for (; j + 2 * kWide <= n; j += 2 * kWide) {
      const vwide a = load_wide(x + j) - k, b = load_wide(x + j + kWide) - k;
      if constexpr (Centered) {
        s0 += a;
        s1 += b;
      }
      q0 = fmadd(a, a, q0);
      q1 = fmadd(b, b, q1);
    }
    out.s = lane_sum(s0 + s1);
    out.q = lane_sum(q0 + q1);
  }
  for (; j < n; ++j) {
    const double d = double(to_c(x[j])) - (Centered ? shift : 0.0);
    out.s += d;
    out.q = fmadd(d, d, out.q);
  }
  return out;
}

// The rows [0, rows) of n elements of x, split across nthreads (split_rows): their moments
// (Centered: mean and variance, else mean 0 and the mean square as var), summed by chunks, then
// normalize(i, mean, rstd, j0, j1) for each chunk [j0, j1) of row i, on the thread that summed
// it; rstd = 1 / sqrt(var + eps). Rows go in pairs where normalize_pair(i, mean0, rstd0, mean1,
// rstd1, j0, j1) is given, normalizing rows i and i + 1 together (one read of the weights for
// both), else one at a time. A row's sums about its first element are redone in double where
// its float squares may have lost digits, and about its mean where that lies far from the first
// element (kRecenterRatio). One parallel region for all rows, a barrier after each sum of the
// chunks; their sums alternate between two buffers, so a thread summing the next rows never
// overwrites sums another thread is still adding up. Streamed stores are fenced on each thread.
template <bool Centered, class T, class Normalize, class NormalizePair = std::nullptr_t>
void split_rows_forward(const T* x, std::int64_t rows, std::int64_t n, double eps, int nthreads,
                        const Normalize& normalize, const NormalizePair& normalize_pair = nullptr) {
  constexpr bool kPaired = !std::is_same<NormalizePair, std::nullptr_t>::value;
  constexpr int kRows = kPaired ? 2 : 1;
  const std::int64_t chunk = kSplitChunkBytes / std::int64_t(sizeof(T));
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<ShiftedSums> sums(std::size_t(2 * kRows * chunks));
  auto run = [&](std::int64_t t, std::int64_t nt) {
    const std::int64_t c0 = chunks * t / nt, c1 = chunks * (t + 1) / nt;
    int phase = 0;
    // The sums about shift[b] of rows i .. i + count - 1, each added up in chunk order (on every
    // thread).
    auto row_sums = [&](std::int64_t i, int count, const double* shift, auto wide, ShiftedSums* total) {
      ShiftedSums* const part = sums.data() + (phase ^= 1) * kRows * chunks;
      for (int b = 0; b < count; ++b)
        for (std::int64_t c = c0; c < c1; ++c) {
          const std::int64_t j0 = c * chunk, len = n - j0 < chunk ? n - j0 : chunk;
          part[b * chunks + c] = chunk_sums<Centered, decltype(wide)::value>(x + (i + b) * n + j0, len, shift[b]);
        }
      if (nt > 1) {  // not run(0, 1) in a caller's own parallel region: that barrier is theirs
#pragma omp barrier
      }
      for (int b = 0; b < count; ++b) {
        total[b] = ShiftedSums();
        for (std::int64_t c = 0; c < chunks; ++c) {
          total[b].s += part[b * chunks + c].s;
          total[b].q += part[b * chunks + c].q;
        }
      }
    };
    for (std::int64_t i = 0; i < rows; i += kRows) {
      const int count = rows - i < kRows ? int(rows - i) : kRows;
      double first[kRows], mean[kRows], rstd[kRows];
      ShiftedSums total[kRows];
      for (int b = 0; b < count; ++b) first[b] = Centered ? double(to_c(x[(i + b) * n])) : 0.0;
      row_sums(i, count, first, std::false_type(), total);
      for (int b = 0; b < count; ++b) {
#if NL_VEC_BYTES
        if constexpr (std::is_same<compute_t<T>, float>::value) {
          const double mean_square = total[b].q / double(n);
          if (!(mean_square >= kFloatSquaresMin && mean_square <= kFloatSquaresMax))
            row_sums(i + b, 1, first + b, std::true_type(), total + b);
        }
#endif
        Moments m{0.0, total[b].q / double(n)};
        if constexpr (Centered) {
          m = moments_from_shifted(first[b], total[b].s, total[b].q, n);
          const double d = m.mean - first[b];
          if (d * d > kRecenterRatio * m.var) {
            const double about = m.mean;
            row_sums(i + b, 1, &about, std::true_type(), total + b);
            m = moments_from_shifted(about, total[b].s, total[b].q, n);
          }
        }
        mean[b] = m.mean;
        rstd[b] = 1.0 / __builtin_sqrt(m.var + eps);
      }
      for (std::int64_t c = c0; c < c1; ++c) {
        const std::int64_t j0 = c * chunk, j1 = n - j0 < chunk ? n : j0 + chunk;
        if constexpr (kPaired) {
          if (count == 2) {
            normalize_pair(i, mean[0], rstd[0], mean[1], rstd[1], j0, j1);
            continue;
          }
        }
        normalize(i, mean[0], rstd[0], j0, j1);
      }
    }
    stream_fence();
  };
  if (nthreads <= 1 || chunks <= 1) {
    run(0, 1);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  run(omp_get_thread_num(), omp_get_num_threads());
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
