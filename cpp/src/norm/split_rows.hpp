// Long rows shared by the threads: the row norms, forward and backward, of rows too few for one
// thread each. Per-target, like row_norm.hpp.
#pragma once

#include <cstdint>

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
// 1 and 3 rows of 512 KiB 0.61-0.83x (float16 0.88-0.99x); on one thread 0.98-1.07x. The fused
// add + norm (s written as the sums read x + residual): 0.38-0.53x for one row, 0.49-1.05x for
// two or three, 0.86-1.01x on one thread. With 4 or more rows, split rows ran slower than rows
// one per thread (layer_norm (64, 2**20) 1.23x), whose next row's sums are taken while this row
// is written. The choice and the chunks depend only on the shape, so results do not depend on
// the thread count, and add_layer_norm(x, r) gives the bits of layer_norm(x + r).
constexpr std::int64_t kSplitMaxRows = 4;
constexpr std::int64_t kSplitRowMinBytes = std::int64_t(512) << 10;
constexpr std::int64_t kSplitChunkBytes = std::int64_t(64) << 10;

template <class T>
bool split_rows(std::int64_t rows, std::int64_t n) {
  return rows < kSplitMaxRows && n * std::int64_t(sizeof(T)) >= kSplitRowMinBytes;
}

// The backward splits rows in tensors of fewer than kSplitMaxRowsBackward, and with weight of
// fewer than kSplitMaxRowsWeighted rows of kSplitWeightedRowMinBytes or more: rows one per
// thread gather their dweight and dbias in a stage and a double partial of the whole row per
// block of rows, which rows of megabytes take from memory. Split, a thread's stage of a chunk
// stays in its cache for a group of rows (split_backward_group). Against rows one per thread
// (2 threads, AMD Zen 4 VM, in-process A/B, float32): layer_norm_backward with weight of 16-63
// rows of 2**18-2**20 took 0.54-0.95x the time (rms_norm_backward 0.72-0.99x; one thread
// 0.84-0.98x; float16, bfloat16, float64 0.69-0.91x), 96-256 rows of 2**18-349525 0.96-1.11x
// and 256 rows of 2**16 1.11-1.59x (not split); without weight 16-64 such rows took
// 0.84-1.13x, and are not split.
constexpr std::int64_t kSplitMaxRowsBackward = 16;
constexpr std::int64_t kSplitMaxRowsWeighted = 64;
constexpr std::int64_t kSplitWeightedRowMinBytes = std::int64_t(1) << 20;
// Where L2 holds kSplitLargeL2Bytes or more, more rows of kSplitRowMinBytes to
// kSplitLargeL2RowMaxBytes split: fewer than kSplitLargeL2MaxRows without weight, fewer than
// kSplitLargeL2MaxRowsWeighted with. Against rows one per thread (2 threads, Intel VM with 2 MiB
// L2, in-process A/B, float32): layer_norm_backward without weight of 16-255 rows of 2**17-2**19
// took 0.55-0.95x the time (one thread 0.70-0.92x); with weight, 16-100 rows of 2**17-2**18
// 0.61-0.91x (rms_norm 0.76-0.97x), 127 rows 0.99-1.03x, 255 rows 1.07-1.11x; rows of 2**21
// without weight 1.08x.
constexpr std::int64_t kSplitLargeL2Bytes = std::int64_t(2) << 20;
constexpr std::int64_t kSplitLargeL2RowMaxBytes = std::int64_t(2) << 20;
constexpr std::int64_t kSplitLargeL2MaxRows = 256;
constexpr std::int64_t kSplitLargeL2MaxRowsWeighted = 128;

template <class T>
bool split_rows_backward_for(std::int64_t rows, std::int64_t n, bool has_weight) {
  const std::int64_t bytes = n * std::int64_t(sizeof(T));
  if (bytes < kSplitRowMinBytes) return false;
  if (has_weight && rows < kSplitMaxRowsWeighted && bytes >= kSplitWeightedRowMinBytes) return true;
  if (rows < kSplitMaxRowsBackward) return true;
  return l2_cache_bytes() >= kSplitLargeL2Bytes && bytes <= kSplitLargeL2RowMaxBytes &&
         rows < (has_weight ? kSplitLargeL2MaxRowsWeighted : kSplitLargeL2MaxRows);
}

// run(t, nt) on each thread t of a team of nt, one region for the whole call; on the calling
// thread alone (run(0, 1)) for one thread or one chunk.
template <class Run>
void on_threads(int nthreads, std::int64_t chunks, const Run& run) {
  if (nthreads <= 1 || chunks <= 1) {
    run(0, 1);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  run(omp_get_thread_num(), omp_get_num_threads());
}

// The sums of x[0..n) - shift (Centered; else of squares of x) in double: of float partial sums
// of at most kRowFlushEvery vectors per lane where the data is computed in float on a SIMD
// target and not Wide (shift must then be a float), else of doubles. With Add, of
// s = x + r instead, written to sum as it is read (rounded to T; sum may be x or r itself).
template <bool Centered, bool Wide, bool Add = false, class T>
ShiftedSums chunk_sums(const T* x, std::int64_t n, double shift, const T* r = nullptr, T* sum = nullptr) {
#if NL_VEC_BYTES
  if constexpr (!Wide && std::is_same<compute_t<T>, float>::value) {
    std::int64_t j = 0;
    ShiftedSums out;
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    const RowReader<T, Add> row{x, r, sum};
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
        add_float_sums<Centered>(row.vector(j + 2 * t * L), k, s[0], q[0]);
        add_float_sums<Centered>(row.vector(j + (2 * t + 1) * L), k, s[1], q[1]);
      }
      flush();
    }
    for (; j + L <= n; j += L) add_float_sums<Centered>(row.vector(j), k, s[0], q[0]);
    flush();
    out.s = lane_sum(ds);
    out.q = lane_sum(dq);
    for (; j < n; ++j) {
      const double d = double(row.scalar(j)) - (Centered ? shift : 0.0);
      out.s += d;
      out.q = fmadd(d, d, out.q);
    }
    return out;
  }
#endif
  if constexpr (Add) {
    add_row(x, r, sum, n);
    x = sum;
  }
  return shifted_sums_wide<Centered>(x, n, Centered ? shift : 0.0);
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
// With a residual, the rows are s = x + residual, written to sum (which may be x or residual
// itself) as their first sums read it: the sums, and so the results, of layer_norm(s).
template <bool Centered, class T, class Normalize, class NormalizePair = std::nullptr_t>
void split_rows_forward(const T* x, const T* residual, T* sum, std::int64_t rows, std::int64_t n, double eps,
                        int nthreads, const Normalize& normalize, const NormalizePair& normalize_pair = nullptr) {
  constexpr bool kPaired = !std::is_same<NormalizePair, std::nullptr_t>::value;
  constexpr int kRows = kPaired ? 2 : 1;
  const std::int64_t chunk = kSplitChunkBytes / std::int64_t(sizeof(T));
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  if (nthreads > chunks) nthreads = int(chunks);  // no thread without a chunk
  // Scratch, not std::vector: its members would be compiled once per target and merged.
  ScratchBytes memory(sizeof(ShiftedSums) * std::size_t(2 * kRows * chunks));
  ShiftedSums* const sums = static_cast<ShiftedSums*>(memory.data());
  const T* const rows_of = residual ? sum : x;  // what is normalized
  auto run = [&](std::int64_t t, std::int64_t nt) {
    const std::int64_t c0 = chunks * t / nt, c1 = chunks * (t + 1) / nt;
    int phase = 0;
    // The sums about shift[b] of rows i .. i + count - 1, each added up in chunk order (on every
    // thread); with add (the rows' first sums), of s = x + residual, written to sum as it is read.
    auto row_sums = [&](std::int64_t i, int count, const double* shift, auto wide, ShiftedSums* total,
                        bool add = false) {
      ShiftedSums* const part = sums + (phase ^= 1) * kRows * chunks;
      for (int b = 0; b < count; ++b)
        for (std::int64_t c = c0; c < c1; ++c) {
          const std::int64_t j0 = c * chunk, len = n - j0 < chunk ? n - j0 : chunk, at = (i + b) * n + j0;
          constexpr bool kWide = decltype(wide)::value;
          part[b * chunks + c] = residual && add ? chunk_sums<Centered, kWide, true>(x + at, len, shift[b], residual + at, sum + at)
                                                 : chunk_sums<Centered, kWide>(rows_of + at, len, shift[b]);
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
      for (int b = 0; b < count; ++b) {
        const std::int64_t at = (i + b) * n;
        first[b] = !Centered ? 0.0 : residual ? double(to_c(narrow<T>(to_c(x[at]) + to_c(residual[at])))) : double(to_c(x[at]));
      }
      if (residual && nt > 1) {  // every thread has its shifts before sum, maybe x itself, is written
#pragma omp barrier
      }
      row_sums(i, count, first, std::false_type(), total, true);
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
  on_threads(nthreads, chunks, run);
}

// The sums of a RowBackward's row (a chunk of a split row), with the arithmetic of its own
// sums: float lanes flushed to double (SumsF32Of) where the data is computed in float on a SIMD
// target and not Wide, else double.
template <bool Wide, class Row>
BackwardSums backward_chunk_sums(const Row& r) {
#if NL_VEC_BYTES
  if constexpr (!Wide && std::is_same<typename Row::C, float>::value) {
    constexpr int L = kLanes<float>;
    typename Row::template SumsF32Of<true> sums(r);
    std::int64_t j = 0;
    for (; j + L <= r.n; j += L) sums.add(j);
    if (sums.run != 0) sums.flush();
    return r.with_tail(j, lane_sum(sums.dsg), lane_sum(sums.dsgx));
  }
#endif
  return r.wide_sums();
}

// Rows whose sums the split backward takes between two barriers. With weight, kStageRows: a
// chunk's stage, a group's column sums, stays in cache, the rows' dy and x read again from memory
// (against groups of one: 1-15 rows of 2**17-2**22 floats took 0.46-0.93x the time, 16-48
// rows of 2**20 0.53-0.66x). Without weight, as many as fit with a thread's part of dy and x
// in 512 KiB of L2, whence the dx pass reads them (groups of 16 took 1.40-1.48x the time for
// 8-15 rows of 2**17-2**18). Up to kStageRows; results do not depend on it.
inline std::int64_t split_backward_group(bool has_weight, std::int64_t n, std::int64_t bytes_per_element,
                                         int nthreads) {
  if (has_weight) return kStageRows;
  const std::int64_t part = 2 * n * bytes_per_element / (nthreads > 1 ? nthreads : 1);
  std::int64_t g = 1;
  while (g < kStageRows && 2 * g * part <= (std::int64_t(512) << 10)) g *= 2;
  return g;
}

// The backward of rows split across the threads (split_rows; as the forward): each thread sums
// its chunks of a group of rows (split_backward_group), the chunks' sums are added in chunk
// order, and the thread writes dx for the same chunks, chunk by chunk, the group's rows in
// order. Sums that overflow float lanes (or meet Inf/NaN) are taken again in double, as
// RowBackward does. With weight, dweight (and dbias) of a chunk's columns are summed over the
// rows in order by the thread that owns the chunk, as in rows_with_column_sums: a group's
// (kStageRows rows) in a stage of the chunk, then into a double partial where there are more.
template <bool Centered, bool HasW, class T, class C = compute_t<T>>
void split_rows_backward(const T* dy, const T* x, const C* mean, const C* rstd, const C* w, const T* ds, T* dx,
                         C* dweight, C* dbias, std::int64_t rows, std::int64_t n, int nthreads) {
  using Row = RowBackward<Centered, HasW, T>;
  const std::int64_t chunk = kSplitChunkBytes / std::int64_t(sizeof(T));
  const std::int64_t chunks = (n + chunk - 1) / chunk;
  if (nthreads > chunks) nthreads = int(chunks);  // no thread without a chunk
  constexpr int kSums = HasW ? (Centered ? 2 : 1) : 0;  // dweight (and dbias)
  const bool stream = stream_rows(row_traffic_bytes<T>(n, ds ? 4 : 3, HasW ? 1 + kSums : 0),
                                  rows * n * std::int64_t(sizeof(T)));
  const std::int64_t group = split_backward_group(HasW, n, std::int64_t(sizeof(T)), nthreads);
  const bool partials = HasW && rows > group;
  // The sums (two buffers of a group), each thread's stage of a chunk and the double partials,
  // allocated here (an exception must not leave the region); scratch, not std::vector, whose
  // members would be compiled once per target.
  const std::size_t sums_bytes = (sizeof(BackwardSums) * std::size_t(2 * group * chunks) + 63) / 64 * 64;
  const std::size_t stage_bytes = (sizeof(C) * std::size_t(kSums * chunk * (nthreads > 1 ? nthreads : 1)) + 63) / 64 * 64;
  ScratchBytes memory(sums_bytes + stage_bytes + (partials ? sizeof(double) * std::size_t(kSums * n) : 0));
  char* const base = static_cast<char*>(memory.data());
  BackwardSums* const sums = reinterpret_cast<BackwardSums*>(base);
  C* const stages = reinterpret_cast<C*>(base + sums_bytes);
  double* const partial = partials ? reinterpret_cast<double*>(base + sums_bytes + stage_bytes) : nullptr;
  C* const outs[2] = {dweight, dbias};
  auto run = [&](std::int64_t t, std::int64_t nt) {
    const std::int64_t c0 = chunks * t / nt, c1 = chunks * (t + 1) / nt;
    C* const st = stages + t * kSums * chunk;
    int phase = 0;
    auto span = [&](std::int64_t c, std::int64_t& j0) {
      j0 = c * chunk;
      return n - j0 < chunk ? n - j0 : chunk;
    };
    auto chunk_row = [&](std::int64_t i, std::int64_t c) {
      std::int64_t j0;
      const std::int64_t len = span(c, j0), at = i * n + j0;
      return Row{dy + at, x + at, HasW ? w + j0 : nullptr, dx + at, len, Centered ? double(mean[i]) : 0.0,
                 double(rstd[i]), ds ? ds + at : nullptr, 0};
    };
    // The sums of rows i .. i + count - 1, every chunk's added in chunk order (on every thread).
    auto row_sums = [&](std::int64_t i, std::int64_t count, auto wide, BackwardSums* total) {
      BackwardSums* const part = sums + (phase ^= 1) * group * chunks;
      for (std::int64_t b = 0; b < count; ++b)
        for (std::int64_t c = c0; c < c1; ++c)
          part[b * chunks + c] = backward_chunk_sums<decltype(wide)::value>(chunk_row(i + b, c));
      if (nt > 1) {  // not run(0, 1) in a caller's own parallel region: that barrier is theirs
#pragma omp barrier
      }
      for (std::int64_t b = 0; b < count; ++b) {
        total[b] = BackwardSums();
        for (std::int64_t c = 0; c < chunks; ++c) {
          total[b].g += part[b * chunks + c].g;
          total[b].gx += part[b * chunks + c].gx;
        }
      }
    };
    // A chunk's stage (with weight a group is a stage of rows) into the double partial (0.0 + s
    // at the first, as rows_with_column_sums) or, after the last rows, with it into the outputs.
    [[maybe_unused]] auto flush = [&](std::int64_t j0, std::int64_t len, bool first, bool last) {
      for (int k = 0; k < kSums; ++k) {
        const C* const s = st + k * len;
        C* const out = outs[k] + j0;
        double* const p = partial ? partial + k * n + j0 : nullptr;
        // Loops without branches, that the compiler vectorizes (a branch in one cost 10% on
        // 3 rows of 2**17).
        if (first && last) {
          for (std::int64_t j = 0; j < len; ++j) out[j] = C(0.0 + double(s[j]));
        } else if (first) {
          for (std::int64_t j = 0; j < len; ++j) p[j] = 0.0 + double(s[j]);
        } else if (last) {
          for (std::int64_t j = 0; j < len; ++j) out[j] = C(p[j] + double(s[j]));
        } else {
          for (std::int64_t j = 0; j < len; ++j) p[j] += double(s[j]);
        }
      }
    };
    for (std::int64_t i = 0; i < rows; i += group) {
      const std::int64_t count = rows - i < group ? rows - i : group;
      BackwardSums total[kStageRows];
      double k0[kStageRows], k1[kStageRows];
      row_sums(i, count, std::false_type(), total);
      for (std::int64_t b = 0; b < count; ++b) {
        backward_means<Centered>(total[b], n, k0[b], k1[b]);
        if (!__builtin_isfinite(k0[b]) || !__builtin_isfinite(k1[b])) {
          row_sums(i + b, 1, std::true_type(), total + b);
          backward_means<Centered>(total[b], n, k0[b], k1[b]);
        }
      }
      for (std::int64_t c = c0; c < c1; ++c) {
        std::int64_t j0;
        const std::int64_t len = span(c, j0);
        for (std::int64_t j = 0; j < kSums * len; ++j) st[j] = C(0);
        for (std::int64_t b = 0; b < count; ++b) {
          const Row row = chunk_row(i + b, c);
#if NL_VEC_BYTES
          if constexpr (std::is_same<C, float>::value) {
            const auto no_tick = [](std::int64_t) __attribute__((always_inline)) {};
            if (stream) row.template dx_pass<true>(st, k0[b], k1[b], no_tick);
            else row.template dx_pass<false>(st, k0[b], k1[b], no_tick);
          } else
#endif
          {
            row.dx_wide(st, k0[b], k1[b], stream);
          }
        }
        if constexpr (HasW) flush(j0, len, i == 0, i + count == rows);
      }
    }
    stream_fence();
  };
  on_threads(nthreads, chunks, run);
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
