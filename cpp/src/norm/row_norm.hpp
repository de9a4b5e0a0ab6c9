// Pieces shared by the row-wise norms (layer_norm, rms_norm): per-row statistics, the backward
// row body, and the deterministic column sums of the backward pass. Per-target, like
// simd/vec.hpp.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "memory/mappings.hpp"
#include "parallel/parallel.hpp"
#include "parallel/parallel_for.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

struct Moments {
  double mean;
  double var;  // biased
};

// Row reads (and the channel norms' channels-last reads) are prefetched this many elements
// ahead: a row is read once from memory between stretches of arithmetic that let the hardware
// prefetcher fall behind. Row forwards read long float rows and half rows further (read_ahead).
constexpr std::int64_t kPrefetchFloats = 512;

// Short rows go in blocks of kRowBlock; float rows in tensors over kBlockedFloatBytes do not
// (normalize_rows).
constexpr std::int64_t kRowBlock = 8;
constexpr std::int64_t kBlockedFloatBytes = std::int64_t(16) << 20;

// Moments from sums of d = x - shift: sum d = s, sum d^2 = q over n values.
inline Moments moments_from_shifted(double shift, double s, double q, std::int64_t n) {
  const double inv_n = 1.0 / double(n);
  const double m = s * inv_n;
  const double var = q * inv_n - m * m;
  return {shift + m, var > 0 ? var : 0.0};
}

struct ShiftedSums {
  double s = 0;  // sum of x - shift (Centered only)
  double q = 0;  // sum of (x - shift)^2
};

// The two vectors at x + j into shifted_sums_wide's two chains (s0, q0 and s1, q1), shifted
// by k.
template <bool Centered, class T>
__attribute__((always_inline)) inline void add_shifted_pair(const T* x, std::int64_t j, vwide k, vwide& s0,
                                                            vwide& s1, vwide& q0, vwide& q1) {
  vwide a = load_wide(x + j), b = load_wide(x + j + kWide);
  if constexpr (Centered) {
    a -= k;
    b -= k;
    s0 += a;
    s1 += b;
  }
  q0 = fmadd(a, a, q0);
  q1 = fmadd(b, b, q1);
}

// The sums of d = x - shift over x[j..n) (Centered; else of x^2 alone), in double, added to
// the two chains s0, q0 and s1, q1 of x[0..j).
template <bool Centered, class T>
ShiftedSums shifted_sums_from(const T* x, std::int64_t j, std::int64_t n, double shift, vwide s0, vwide s1,
                              vwide q0, vwide q1) {
  const vwide k = splat<vwide>(shift);
  for (; j + 2 * kWide <= n; j += 2 * kWide) add_shifted_pair<Centered>(x, j, k, s0, s1, q0, q1);
  double s = 0, q = 0;
  for (; j < n; ++j) {
    const double d = double(to_c(x[j])) - (Centered ? shift : 0.0);
    s += d;
    q = fmadd(d, d, q);
  }
  return {Centered ? s + lane_sum(s0 + s1) : 0.0, q + lane_sum(q0 + q1)};
}

// The sums of d = x - shift over x[0..n) (Centered; else of x^2 alone), in double.
template <bool Centered, class T>
ShiftedSums shifted_sums_wide(const T* x, std::int64_t n, double shift) {
  return shifted_sums_from<Centered>(x, 0, n, shift, vwide{}, vwide{}, vwide{}, vwide{});
}

// Mean and biased variance of x[0..n) from double sums shifted by `shift`.
template <class T>
Moments shifted_moments(const T* x, std::int64_t n, double shift) {
  const ShiftedSums t = shifted_sums_wide<true>(x, n, shift);
  return moments_from_shifted(shift, t.s, t.q, n);
}

// Shifted sums cancel when the shift lies far from the mean: q/n - m*m with m*m / var above
// this ratio is summed again about the mean (the row is in cache by then).
constexpr double kRecenterRatio = 4.0;

// m, the moments of a row of n from sums shifted by shift; where the shift lay that far from
// the mean, the row's (values()) summed again about m.mean.
template <class Values>
__attribute__((always_inline)) inline Moments recentered(const Values& values, std::int64_t n, double shift,
                                                         const Moments& m) {
  const double d = m.mean - shift;
  return d * d > kRecenterRatio * m.var ? shifted_moments(values(), n, m.mean) : m;
}

// The shift of a row's sums, given value(j) of its elements: the median of the first three, an
// element of the row (constant rows stay exact). It lies far enough from the mean for the row to
// be summed again (kRecenterRatio: over 2 std) for about 0.3% of normal rows, against 4.6% for
// the first element alone: float32 layer_norm of (4096, 64) took 0.96-0.98x the time, float64
// rows of 768 0.96-0.99x. Float rows summed one at a time from memory (row_moments_f32) keep the
// first element: there the median's loads and compares delay every row's sums, and
// (65536, 128) took 1.06-1.09x the time.
template <class F>
__attribute__((always_inline)) inline auto row_shift(std::int64_t n, const F& value) {
  if (n < 3) return value(0);
  const auto a = value(0), b = value(1), c = value(2);
  const auto lo = a < b ? a : b, hi = a < b ? b : a;
  const auto mid = hi < c ? hi : c;
  return lo < mid ? mid : lo;
}

// Mean and variance of x[0..n) in double, shifted by row_shift: one pass, and no cancellation
// when |mean| >> std since the shifted values are of the order of std.
template <class T>
Moments row_moments_wide(const T* x, std::int64_t n) {
  const double shift = row_shift(n, [&](std::int64_t j) { return double(to_c(x[j])); });
  return recentered([&] { return x; }, n, shift, shifted_moments(x, n, shift));
}

// Mean of squares of x[0..n) in double.
template <class T>
double row_mean_square_wide(const T* x, std::int64_t n) {
  return shifted_sums_wide<false>(x, n, 0.0).q * (1.0 / double(n));
}

// s[0..n) = x + r, elementwise in compute_t<T>, rounded to T (s may be x or r itself).
template <class T>
void add_row(const T* x, const T* r, T* s, std::int64_t n) {
  using V = vnative<compute_t<T>>;
  constexpr int L = kLanes<compute_t<T>>;
  std::int64_t j = 0;
  for (; j + L <= n; j += L) store(s + j, V(load<V>(x + j) + load<V>(r + j)));
  for (; j < n; ++j) s[j] = narrow<T>(to_c(x[j]) + to_c(r[j]));
}

#if NL_VEC_BYTES
// float data on SIMD targets: elementwise math in float (twice the lanes of double), sums kept
// in float for at most kFlushEvery vectors per lane, or kRowFlushEvery for a row's moments or
// mean square (at 4, widening both took as long as the sums; 8 made layer_norm of in-cache half
// rows 8-13% faster, with the same float32 error, 5-8e-7 of the 2e-6 allowed; half rows take
// twice that in four chains, HalfRowSums), then added into double accumulators. A backward's
// sums flush every kBackwardFlushEvery vectors: at 8 rather than 4, float16/bfloat16 backwards
// took 0.94-0.96x the time, float32 0.96-1.03x, with the same error in dx.
constexpr int kFlushEvery = 4;
constexpr int kRowFlushEvery = 8;
constexpr int kBackwardFlushEvery = 8;
// Mean squares outside this range may have overflowed, or lost digits to underflow, as float
// squares: such rows are summed again in double.
constexpr double kFloatSquaresMin = 1e-30, kFloatSquaresMax = 1e30;

inline vwide widen_sum(vnative<float> v) { return widen_low(v) + widen_high(v); }

// Reads a row of float or half data S as floats: x, or with Add s = x + r (rounded to S),
// written to sum as it is read (the fused add + norm). The row must be read in order, each
// element once. Prefetch: read `ahead` elements ahead (for rows coming from memory). Keep false
// (float rows whose s is recomputed where the row is normalized): s is not written as it is
// read, only by values().
template <class S, bool Add, bool Prefetch = true, bool Keep = true>
struct RowReader {
  static_assert(Keep || (Add && !kHalf<S>), "only float sums are recomputed");
  const S* x;
  const S* r;
  S* sum;
  std::int64_t ahead = kPrefetchFloats;

  vnative<float> vector(std::int64_t j) const {
    if constexpr (Prefetch) __builtin_prefetch(x + j + ahead);
    vnative<float> v = load<vnative<float>>(x + j);
    if constexpr (Add) {
      if constexpr (Prefetch) {
        __builtin_prefetch(r + j + ahead);
        if constexpr (Keep) prefetch_for_write(sum + j);
      }
      v += load<vnative<float>>(r + j);
      if constexpr (!Keep) return v;
      store(sum + j, v);
      if constexpr (kHalf<S>) v = load<vnative<float>>(sum + j);  // the rounded sum
    }
    return v;
  }
  // Element j, read before the pass (not scalar(): sum may be x itself).
  float peek(std::int64_t j) const { return Add ? to_c(narrow<S>(to_c(x[j]) + to_c(r[j]))) : to_c(x[j]); }
  float scalar(std::int64_t j) const {
    if constexpr (!Add) return to_c(x[j]);
    if constexpr (!Keep) return to_c(x[j]) + to_c(r[j]);
    sum[j] = narrow<S>(to_c(x[j]) + to_c(r[j]));
    return to_c(sum[j]);
  }
  // The whole row of n, once read.
  const S* values(std::int64_t n) const {
    if constexpr (!Keep) add_row(x, r, sum, n);
    return Add ? sum : x;
  }
};

// The moments of a row of n values from its sums shifted by `shift`, in double (of float sums
// on SIMD targets): rows whose mean square may have lost digits as float squares, or whose
// shift lies far from the mean, are summed again.
// values() gives the row, read only for those.
template <class Values>
__attribute__((always_inline)) inline Moments finish_row_moments(const Values& values, std::int64_t n, double shift,
                                                                 double sum_s, double sum_q) {
  const double mean_square = sum_q / double(n);
  if (!(mean_square >= kFloatSquaresMin && mean_square <= kFloatSquaresMax)) return row_moments_wide(values(), n);
  return recentered(values, n, shift, moments_from_shifted(shift, sum_s, sum_q, n));
}

// The mean square of a row of n values from its sum of squares, likewise.
template <class Values>
__attribute__((always_inline)) inline double finish_mean_square(const Values& values, std::int64_t n, double sum_q) {
  const double mean_square = sum_q * (1.0 / double(n));
  if (!(mean_square >= kFloatSquaresMin && mean_square <= kFloatSquaresMax)) return row_mean_square_wide(values(), n);
  return mean_square;
}

// Elements read ahead in a row's first pass (FloatRowSums, half_row_vectors). On AMD Zen 4, 2048 against 512
// took 0.85-0.97x the time for float rows of 4096 and 65536 (8 KiB ahead), 1.0-1.2x for float
// rows of 768-2048; 0.88-1.04x for half rows (4 KiB) of 768-65536; 1.0-1.13x for the fused add
// (two rows read).
template <class S, bool Add>
inline std::int64_t read_ahead(std::int64_t n) {
  if (!Add && (kHalf<S> || n >= 4096)) return 2048;
  return kPrefetchFloats;
}

// A vector v of a row into its float sums: Centered, s += v - k and q += (v - k)^2, else
// q += v^2.
template <bool Centered, class V>
__attribute__((always_inline)) inline void add_float_sums(V v, V k, V& s, V& q) {
  if constexpr (Centered) {
    const V d = minus_on_fma(v, k);
    s += d;
    q = fmadd(d, d, q);
  } else {
    q = fmadd(v, v, q);
  }
}

// The end of a float or half row's sums ds, dq (FloatRowSums, HalfRowSums): its elements from j
// on one at a time (scalar(i), shifted by shift where Centered), then its moments (Centered:
// finish_row_moments, else mean 0 and finish_mean_square as var).
template <bool Centered, class Scalar, class Values>
__attribute__((always_inline)) inline Moments finish_row_sums(const Scalar& scalar, const Values& values,
                                                              std::int64_t j, std::int64_t n, float shift,
                                                              const vwide& ds, const vwide& dq) {
  double ts = 0, tq = 0;
  for (; j < n; ++j) {
    const double d = double(scalar(j)) - double(Centered ? shift : 0.0f);
    ts += d;
    tq = fmadd(d, d, tq);
  }
  if constexpr (Centered) return finish_row_moments(values, n, double(shift), lane_sum(ds) + ts, lane_sum(dq) + tq);
  return Moments{0.0, finish_mean_square(values, n, lane_sum(dq) + tq)};
}

// The sums of a float32 row as RowReader gives it (Centered: shifted sums and squares, else
// squares), a vector at a time: step() adds the row's next whole vector (none once all are in),
// finish() the rest and gives the row's moments (Centered: mean and variance, else mean 0 and
// the mean square as var). Stepped alone (row_moments_f32) or while the previous row is
// normalized (normalize_rows' pipelined rows), the arithmetic is the same.
template <bool Centered, bool Add, bool Keep = true>
struct FloatRowSums {
  using V = vnative<float>;
  static constexpr int L = kLanes<float>;
  static constexpr int kChunk = Centered ? kRowFlushEvery : kFlushEvery;
  RowReader<float, Add, true, Keep> row;
  std::int64_t n, j = 0;
  int run = 0;
  float shift;  // not row_shift(): see there
  V k, s{}, q{};
  vwide ds{}, dq{};

  FloatRowSums(const float* x, const float* r, float* sum, std::int64_t n_)
      : row{x, r, sum, read_ahead<float, Add>(n_)}, n(n_), shift(Centered ? row.peek(0) : 0.0f),
        k(splat<V>(shift)) {}
  // Vector v into the sums s, q (flushed into ds, dq after kChunk of them).
  __attribute__((always_inline)) static void add(V v, V k, V& s, V& q, vwide& ds, vwide& dq, int& run) {
    add_float_sums<Centered>(v, k, s, q);
    if (++run == kChunk) flush(s, q, ds, dq, run);
  }
  __attribute__((always_inline)) static void flush(V& s, V& q, vwide& ds, vwide& dq, int& run) {
    if constexpr (Centered) ds += widen_sum(s);
    dq += widen_sum(q);
    s = q = V{};
    run = 0;
  }
  __attribute__((always_inline)) void step() {
    if (j + L > n) return;
    add(row.vector(j), k, s, q, ds, dq, run);
    j += L;
  }
  Moments finish() {
    {  // the state in locals: stores into sum may alias this object
      const RowReader<float, Add, true, Keep> row_ = row;
      const V k_ = k;
      const std::int64_t n_ = n;
      V s_ = s, q_ = q;
      vwide ds_ = ds, dq_ = dq;
      int run_ = run;
      std::int64_t j_ = j;
      for (; j_ + L <= n_; j_ += L) add(row_.vector(j_), k_, s_, q_, ds_, dq_, run_);
      if (run_) flush(s_, q_, ds_, dq_, run_);
      ds = ds_;
      dq = dq_;
      j = j_;
    }
    return finish_row_sums<Centered>([&](std::int64_t i) { return row.scalar(i); }, [&] { return row.values(n); },
                                     j, n, shift, ds, dq);
  }
};

// The sums of a half row as RowReader gives it, as FloatRowSums: its float vectors go in
// unrolled chunks of 2 * kRowFlushEvery, summed in four chains (a chunk's vectors in turn, or
// for bfloat16 rows without a residual its even and odd elements, widen_bf16_pairs, two chains
// a pair; the vectors after the last whole chunk in one chain), so four vectors a chain and
// lane, and flushed into double after each chunk and after the last vector. Against chunks of
// kRowFlushEvery in two chains, whose flushes cost up to a third of the sums, float16 and
// bfloat16 layer_norm of in-cache rows of 768-4096 took 0.94-0.97x the time, rms_norm
// 0.93-0.97x; against one chain a vector at a time, rms_norm of in-cache float16 rows took
// 0.83-0.87x the time, bfloat16 layer_norm (2048, 4096) 0.92x (float rows, chunked, took
// 1.04-1.07x as long from memory). finish() takes the rest of the row. step(), for
// normalize_rows' pipelined rows, takes the next whole chunk at every kChunk-th call, out of
// line: a chunk's sums stay in registers (with a vector per call, layer_norm took 1.03-1.45x
// the time of rows not pipelined), and the code of the four-vector groups of bfloat16 stores
// stays small (inlined there, layer_norm with weight took 1.17-1.22x as long). Either way the
// arithmetic is the same.
template <class S, bool Centered, bool Add>
struct HalfRowSums {
  static_assert(kHalf<S>, "float rows go through FloatRowSums");
  using V = vnative<float>;
  static constexpr int L = kLanes<float>;
  static constexpr int kChunk = 2 * kRowFlushEvery;
  RowReader<S, Add, false> row;
  std::int64_t n, ahead, j = 0;
  int calls = 0;
  float shift;  // not row_shift(): see there
  vwide ds{}, dq{};

  HalfRowSums(const S* x, const S* r, S* sum, std::int64_t n_)
      : row{x, r, sum}, n(n_), ahead(read_ahead<S, Add>(n_)), shift(Centered ? row.peek(0) : 0.0f) {}
  // The chunk of vectors at j into ds and dq, prefetching `ahead` once per line.
  __attribute__((always_inline)) static void add_chunk(const RowReader<S, Add, false>& row, std::int64_t ahead,
                                                       float shift, std::int64_t j, vwide& ds, vwide& dq) {
    constexpr std::int64_t kLineElements = 64 / std::int64_t(sizeof(S));
    const V k = splat<V>(shift);
    V s[4] = {}, q[4] = {};
#if defined(NL_HAVE_BF16_PAIRS)
    if constexpr (std::is_same<S, bfloat16>::value && !Add) {
#pragma GCC unroll 8
      for (int t = 0; t < kChunk; t += 2) {
        const std::int64_t e = j + std::int64_t(t) * L;
        if ((std::int64_t(t) * L) % kLineElements == 0) __builtin_prefetch(row.x + e + ahead);
        V even, odd;
        widen_bf16_pairs(row.x + e, even, odd);
        add_float_sums<Centered>(even, k, s[t & 2], q[t & 2]);
        add_float_sums<Centered>(odd, k, s[(t & 2) + 1], q[(t & 2) + 1]);
      }
      if constexpr (Centered) ds += widen_sum((s[0] + s[1]) + (s[2] + s[3]));
      dq += widen_sum((q[0] + q[1]) + (q[2] + q[3]));
      return;
    }
#endif
#pragma GCC unroll 16
    for (int t = 0; t < kChunk; ++t) {
      const std::int64_t e = j + std::int64_t(t) * L;
      if ((std::int64_t(t) * L) % kLineElements == 0) {
        __builtin_prefetch(row.x + e + ahead);
        if constexpr (Add) {
          __builtin_prefetch(row.r + e + ahead);
          prefetch_for_write(row.sum + e);
        }
      }
      add_float_sums<Centered>(row.vector(e), k, s[t & 3], q[t & 3]);
    }
    if constexpr (Centered) ds += widen_sum((s[0] + s[1]) + (s[2] + s[3]));
    dq += widen_sum((q[0] + q[1]) + (q[2] + q[3]));
  }
  __attribute__((always_inline)) void step() {
    if (++calls < kChunk) return;
    calls = 0;
    next_chunk();
  }
  __attribute__((noinline)) void next_chunk() {
    if (j + kChunk * L > n) return;
    add_chunk(row, ahead, shift, j, ds, dq);
    j += kChunk * L;
  }
  Moments finish() {
    {  // the state in locals: stores into sum may alias this object
      const RowReader<S, Add, false> row_ = row;
      const std::int64_t n_ = n, ahead_ = ahead;
      const float shift_ = shift;
      vwide ds_ = ds, dq_ = dq;
      std::int64_t j_ = j;
      for (; j_ + kChunk * L <= n_; j_ += kChunk * L) add_chunk(row_, ahead_, shift_, j_, ds_, dq_);
      if (j_ + L <= n_) {
        const V k = splat<V>(shift_);
        V s{}, q{};
        for (; j_ + L <= n_; j_ += L) add_float_sums<Centered>(row_.vector(j_), k, s, q);
        if constexpr (Centered) ds_ += widen_sum(s + V{});
        dq_ += widen_sum(q + V{});
      }
      ds = ds_;
      dq = dq_;
      j = j_;
    }
    const RowReader<S, Add> row_ = {row.x, row.r, row.sum};
    return finish_row_sums<Centered>([&](std::int64_t i) { return row_.scalar(i); }, [&] { return row_.values(n); },
                                     j, n, shift, ds, dq);
  }
};

// The sums of a float64 row as row_moments_wide (Centered) and row_mean_square_wide take them
// (shifted_sums_wide: two chains, a pair of vectors at a time), for normalize_rows' pipelined
// rows: step() adds the next kPairs pairs at every 2 * kPairs-th call, out of line; finish()
// the rest, then the moments (Centered: mean and variance, else mean 0 and the mean square as
// var) as those functions give them, bitwise.
template <bool Centered>
struct WideRowSums {
  static constexpr int kPairs = 4;
  static constexpr std::int64_t kAhead = 1024;  // elements prefetched ahead
  const double* x;
  std::int64_t n, j = 0;
  int calls = 0;
  double shift;
  vwide s0{}, s1{}, q0{}, q1{};

  WideRowSums(const double* x_, const double*, double*, std::int64_t n_)
      : x(x_), n(n_), shift(Centered ? row_shift(n_, [&](std::int64_t k) { return x_[k]; }) : 0.0) {}
  __attribute__((always_inline)) void step() {
    if (++calls < 2 * kPairs) return;
    calls = 0;
    next_pairs();
  }
  __attribute__((noinline)) void next_pairs() {
    if (j + kPairs * 2 * kWide > n) return;
    const double* const x_ = x;
    const vwide k = splat<vwide>(shift);
    vwide a0 = s0, a1 = s1, b0 = q0, b1 = q1;
#pragma GCC unroll 4
    for (int t = 0; t < kPairs; ++t) {
      const std::int64_t e = j + std::int64_t(t) * 2 * kWide;
      __builtin_prefetch(x_ + e + kAhead);
      __builtin_prefetch(x_ + e + kWide + kAhead);
      add_shifted_pair<Centered>(x_, e, k, a0, a1, b0, b1);
    }
    s0 = a0;
    s1 = a1;
    q0 = b0;
    q1 = b1;
    j += kPairs * 2 * kWide;
  }
  Moments finish() {
    const ShiftedSums t = shifted_sums_from<Centered>(x, j, n, shift, s0, s1, q0, q1);
    if constexpr (!Centered) return Moments{0.0, t.q * (1.0 / double(n))};
    return recentered([&] { return x; }, n, shift, moments_from_shifted(shift, t.s, t.q, n));
  }
};

// Mean and variance of a float or half row, as RowReader gives it.
template <class S, bool Add>
Moments row_moments_f32(const S* x, std::int64_t n, const S* r = nullptr, S* sum = nullptr) {
  if constexpr (!kHalf<S>) {
    FloatRowSums<true, Add> sums(x, r, sum, n);
    return sums.finish();
  } else {
    HalfRowSums<S, true, Add> sums(x, r, sum, n);
    return sums.finish();
  }
}

template <class S, bool Add>
double row_mean_square_f32(const S* x, std::int64_t n, const S* r = nullptr, S* sum = nullptr) {
  if constexpr (!kHalf<S>) {
    FloatRowSums<false, Add> sums(x, r, sum, n);
    return sums.finish().var;
  } else {
    HalfRowSums<S, false, Add> sums(x, r, sum, n);
    return sums.finish().var;
  }
}

// The moments (Centered: mean and variance, else mean 0 and the mean square as var) of rows
// i < nb <= kRowBlock of a float tensor from x (with Add, of x + r, written to sum), rows of
// NV whole vectors (n == NV * lanes) in cache: the sums of row_moments_f32 and
// row_mean_square_f32, in registers, and the rows side by side so that their chains of
// dependent operations (the sums, a reduction across lanes, a division) overlap.
template <bool Centered, int NV, bool Add, class S>
__attribute__((always_inline)) inline void narrow_block_moments(const S* x, const S* r, S* sum, std::int64_t n,
                                                                std::int64_t nb, double (&mean)[kRowBlock],
                                                                double (&var)[kRowBlock]) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  // Flushed into double every kChunk vectors, as FloatRowSums.
  constexpr int kChunk = Centered ? kRowFlushEvery : kFlushEvery;
  static_assert(NV <= 2 * kRowFlushEvery, "narrow rows of up to 2 * kRowFlushEvery vectors");
  vwide ds[kRowBlock], dq[kRowBlock];
  float shifts[kRowBlock];
#pragma GCC unroll 8
  for (int b = 0; b < kRowBlock; ++b) {
    if (b >= nb) {
      ds[b] = dq[b] = vwide{};
      shifts[b] = 0.0f;
      continue;
    }
    const std::int64_t o = b * n;
    const RowReader<S, Add, false> row{x + o, Add ? r + o : r, Add ? sum + o : sum};
    shifts[b] = row_shift(n, [&](std::int64_t j) { return row.peek(j); });
    const V k = splat<V>(shifts[b]);
    V s{}, q{};
    ds[b] = dq[b] = vwide{};
    for (int t = 0; t < NV; ++t) {
      add_float_sums<Centered>(row.vector(std::int64_t(t) * L), k, s, q);
      if (t % kChunk == kChunk - 1 || t == NV - 1) {
        if constexpr (Centered) ds[b] += widen_sum(s);
        dq[b] += widen_sum(q);
        s = q = V{};
      }
    }
  }
  // finish_row_moments (finish_mean_square) for kWide rows at a time; the rows it would sum
  // again follow one by one. + 0.0: the row functions' empty scalar tails, which turn a -0 sum
  // into +0.
  constexpr int kSumVectors = kRowBlock / kWide;
  vwide sum_s[kSumVectors], sum_q[kSumVectors];
  if constexpr (Centered) lane_sums_inline(ds, sum_s);
  lane_sums_inline(dq, sum_q);
  const vwide count = splat<vwide>(double(n)), inv_n = splat<vwide>(1.0 / double(n));
  using Mask = decltype(count < count);
  Mask again[kSumVectors];
  bool any_again = false;
  for (int p = 0; p < kSumVectors; ++p) {
    const vwide q = sum_q[p] + 0.0;
    if constexpr (Centered) {
      const vwide mean_square = q / count, shift = load_wide(shifts + p * kWide);
      const vwide m = (sum_s[p] + 0.0) * inv_n;
      vwide v = q * inv_n - m * m;
      v = v > 0.0 ? v : 0.0;
      const vwide row_mean = shift + m, d = row_mean - shift;
      again[p] = ~((mean_square >= kFloatSquaresMin) & (mean_square <= kFloatSquaresMax)) | (d * d > kRecenterRatio * v);
      store(mean + p * kWide, row_mean);
      store(var + p * kWide, v);
    } else {
      const vwide mean_square = q * inv_n;
      again[p] = ~((mean_square >= kFloatSquaresMin) & (mean_square <= kFloatSquaresMax));
      store(mean + p * kWide, vwide{});
      store(var + p * kWide, mean_square);
    }
    any_again |= any_lane(again[p]);
  }
  for (std::int64_t b = nb; b < kRowBlock; ++b) {
    mean[b] = 0.0;
    var[b] = 1.0;
  }
  if (!any_again) return;  // the common case: no lane read back one by one from memory
#pragma GCC unroll 1
  for (int b = 0; b < nb; ++b) {
    if (again[b / kWide][b % kWide]) {
      const S* values = (Add ? sum : x) + b * n;
      if constexpr (Centered) {
        const Moments m = finish_row_moments([&] { return values; }, n, double(shifts[b]), sum_s[b / kWide][b % kWide] + 0.0,
                                             sum_q[b / kWide][b % kWide] + 0.0);
        mean[b] = m.mean;
        var[b] = m.var;
      } else {
        var[b] = finish_mean_square([&] { return values; }, n, sum_q[b / kWide][b % kWide] + 0.0);
      }
    }
  }
}
#endif

// Mean and biased variance of a row: float sums where the target has them, else double.
// With a residual r, the row is s = x + r, written to sum first (fused into the same pass for
// float data on SIMD targets).
template <class T>
Moments row_moments(const T* x, std::int64_t n, const T* r = nullptr, T* sum = nullptr) {
#if NL_VEC_BYTES
  if constexpr (std::is_same<compute_t<T>, float>::value)
    return r ? row_moments_f32<T, true>(x, n, r, sum) : row_moments_f32<T, false>(x, n);
#endif
  if (r) {
    add_row(x, r, sum, n);
    x = sum;
  }
  return row_moments_wide(x, n);
}

// Mean of squares of a row, likewise.
template <class T>
double row_mean_square(const T* x, std::int64_t n, const T* r = nullptr, T* sum = nullptr) {
#if NL_VEC_BYTES
  if constexpr (std::is_same<compute_t<T>, float>::value)
    return r ? row_mean_square_f32<T, true>(x, n, r, sum) : row_mean_square_f32<T, false>(x, n);
#endif
  if (r) {
    add_row(x, r, sum, n);
    x = sum;
  }
  return row_mean_square_wide(x, n);
}

// The moments of row i of x (with a residual, of s = x + residual, written to sum): mean and
// variance, or for rms (not Centered) mean 0 and the mean square as var.
template <bool Centered, class T>
Moments row_moments_of(const T* x, const T* residual, T* sum, std::int64_t i, std::int64_t n) {
  const T* xi = x + i * n;
  if constexpr (Centered) return residual ? row_moments(xi, n, residual + i * n, sum + i * n) : row_moments(xi, n);
  return Moments{0.0, residual ? row_mean_square(xi, n, residual + i * n, sum + i * n) : row_mean_square(xi, n)};
}

// Whether the output of a row kernel, data_bytes in all, is written past the caches (map_row).
// Where one row's reads and writes (row_bytes: its inputs, weights, stages and output) fill L1,
// from stream_min_bytes() (half the cache counted as ours): cached stores would pull every output
// line into L1 and evict the row and weights the second pass reads again (streamed, float32
// layer_norm with weight and bias took 0.58-0.78x the time on rows of 2048-4096, its backward
// 0.78-0.88x). Smaller rows stream only from twice that, where input and output cannot both
// stay in the cache between calls: streamed, (8192, 768) (24 MiB) ran 1.03-1.5x slower,
// (16384, 768) 0.78-0.98x; half layer_norm_backward (2048, 4096) without weight 1.03-1.06x.
constexpr std::int64_t kL1Bytes = std::int64_t(32) << 10;
// The bytes one row of n moves: data_rows rows of T (inputs and outputs) and weight_rows rows of
// compute_t<T> (weights, bias, stages).
template <class T>
std::int64_t row_traffic_bytes(std::int64_t n, int data_rows, int weight_rows) {
  return n * (std::int64_t(sizeof(T)) * data_rows + std::int64_t(sizeof(compute_t<T>)) * weight_rows);
}
inline bool stream_rows(std::int64_t row_bytes, std::int64_t data_bytes) {
  const std::int64_t from = stream_min_bytes();
  return data_bytes >= from && (row_bytes >= kL1Bytes || data_bytes > 2 * from);
}
// stream_rows() of the forward kernels (norm, fused add and norm). Float rows stream from
// stream_min_bytes() at every length: with their partial vectors unmasked and streamed lines
// whole, float32 layer_norm rows of 256-768 (16-64 MiB, out= 16 bytes off a line) took
// 0.74-0.95x the cached time, add_layer_norm 0.74-0.97x. Their backward took 1.04-1.26x, and
// float16 rows of 768-1024 1.2-1.3x (their 32-byte vectors fill half a line): those keep
// stream_rows().
template <class T>
inline bool stream_forward_rows(std::int64_t row_bytes, std::int64_t data_bytes) {
  if constexpr (kHalf<T>) return stream_rows(row_bytes, data_bytes);
  return data_bytes >= stream_min_bytes();
}

// Whether the fused add + norm computes s = x + residual again where it normalizes each row
// (RowPass::recompute_sum) instead of writing s as the statistics read the row and reading it
// back: float32 rows streamed past the caches, whose s and y rows start at the same distance
// from a line (map_row_pair), and s a new array. x and the residual are read again from L2, and
// s streams out beside y: memory sees two reads and two writes, not also the s lines read for
// ownership. An s that is x or the residual itself is written as they are read (its lines are
// already in the cache; streamed, they took 1.4-1.6x the time).
template <class T>
bool recompute_sum(const T* x, const T* residual, const T* sum, const T* y, bool stream) {
  const std::uintptr_t apart = reinterpret_cast<std::uintptr_t>(sum) - reinterpret_cast<std::uintptr_t>(y);
  return std::is_same<T, float>::value && residual && stream && sum != x && sum != residual &&
         apart % kLineBytes == 0;
}

// Whether rows of n in a tensor of data_bytes go in blocks of kRowBlock (normalize_rows).
template <class T>
bool rows_in_blocks(std::int64_t n, std::int64_t data_bytes) {
  const std::int64_t block_bytes = n * std::int64_t(sizeof(T)) * kRowBlock;
  if (kHalf<T>) return block_bytes <= 16384;
  // Such rows stay far below L1: the row of x stands for all their traffic.
  return !stream_rows(row_traffic_bytes<T>(n, 1, 0), data_bytes) && data_bytes <= kBlockedFloatBytes &&
         block_bytes <= 8192;
}

// Whether the forward's rows of n in a tensor of data_bytes may go narrow (with_narrow_rows):
// float rows where they go in blocks (in cache); half rows always, but the fused add's rows
// written past the cache. Narrow half rows store y cached even there. Against blocks of rows one
// at a time (2 threads, AMD Zen 4 VM, in-process A/B), in cache: float16 layer_norm (4096, 64)
// 0.68x the time, (4096, 128) 0.59x, (2048, 256) 0.85x; rms_norm 0.66x, 0.86x, 0.94x; bfloat16
// 0.69x, 0.80x, 0.80x and 0.69x, 0.81x, 0.88x; add_layer_norm 0.71-1.00x. 32 MiB of float16
// rows of 64-256: layer_norm 0.91-0.97x, rms_norm 0.65-0.95x (their y streamed took 1.01-1.09x
// that), add_layer_norm 1.04-1.20x (streamed 1.03-1.05x), which therefore keeps its blocks.
template <class T>
bool narrow_forward_rows(std::int64_t n, std::int64_t data_bytes, const T* residual, bool stream) {
  if (kHalf<T>) return !(residual && stream);
  return rows_in_blocks<T>(n, data_bytes);
}

// Calls f(std::integral_constant<int, NV>()) with NV the number of whole float vectors in a row
// of n where that is 1 to 4 (half rows: 4), 8 or 16 (up to MaxNV), T is float or a half
// type, and `allowed`, else with NV = 0. Such narrow rows keep their vectors in registers:
// the forward's (narrow_forward_rows) up to 16 vectors; the backward's always, up to 8 (half
// rows: float16 layer_norm_backward (4096, 64) 0.81x the time, (4096, 128) 0.90x, (262144, 64)
// 0.85x; rms_norm 0.71x, 0.87x, 0.75x; add_layer_norm 0.83x, 0.92x, 0.78x; bfloat16 0.71-0.98x).
// Against rows one at a time (2 threads, AMD Zen 4 VM, in-process A/B), float32 rows of 128 in
// cache took 0.58-0.64x the time in layer_norm, 0.64-0.71x in rms_norm, 0.70-0.74x in
// add_layer_norm, 0.86x in add_rms_norm, 0.72-0.85x in their backwards ((65536, 128) from memory
// 0.84-0.96x); rows of 256 in cache 0.67-0.73x, 0.69-0.87x, 0.78-0.92x and 0.79-0.92x (the fused
// pair at (16384, 256), 16 MiB, 1.00-1.07x).
template <class T, int MaxNV, class F>
void with_narrow_rows(std::int64_t n, bool allowed, const F& f) {
#if NL_VEC_BYTES
  if constexpr (std::is_same<T, float>::value || kHalf<T>) {
    constexpr int L = kLanes<float>;
    // Half rows of 1-3 vectors (16-48 elements with AVX-512) stay out: rare, and each NV is
    // another set of kernels to compile.
    constexpr bool kFew = std::is_same<T, float>::value;
    if (allowed && n % L == 0 && n <= MaxNV * L) {
      switch (n / L) {
        case 1:
          if constexpr (kFew) return f(std::integral_constant<int, 1>());
          break;
        case 2:
          if constexpr (kFew) return f(std::integral_constant<int, 2>());
          break;
        case 3:
          if constexpr (kFew) return f(std::integral_constant<int, 3>());
          break;
        case 4: return f(std::integral_constant<int, 4>());
        case 8:
          if constexpr (MaxNV >= 8) return f(std::integral_constant<int, 8>());
          break;
        case 16:
          if constexpr (MaxNV >= 16) return f(std::integral_constant<int, 16>());
          break;
        default: break;
      }
    }
  }
#endif
  f(std::integral_constant<int, 0>());
}

// Whether narrow rows of NV vectors of T, with a weight or bias (has_params), keep those vectors
// in registers from row to row (load_vectors) instead of loading them again for each row: with
// AVX-512 (32 registers), float rows of up to 8 vectors and half rows of 4.
// Against loads (1 thread, AMD Zen 4 VM, in-process A/B, in cache), float32 layer_norm of
// (4096, 64) and (4096, 128) took 0.89-0.91x the time, rms_norm 0.93x, add_layer_norm
// 0.92-0.95x, add_rms_norm 0.92x; float16 (4096, 64) 0.87-0.92x. Float rows of 16 vectors
// (rms_norm (2048, 256)) took 1.07-1.16x, float16 rows of 8 1.02-1.03x; AVX2's 16 registers
// gained nothing clear on rows of 32 floats (0.94-1.08x).
template <class T>
constexpr bool held_param_vectors(int nv, bool has_params) {
  return NL_VEC_BYTES == 64 && has_params && nv > 0 && ((std::is_same<T, float>::value && nv <= 8) || (kHalf<T> && nv <= 4));
}

// v[t], the vectors t < NV of p (left as they are where p is null).
template <int NV, class C, class V>
void load_vectors(const C* p, V (&v)[NV]) {
  if (!p) return;
  for (int t = 0; t < NV; ++t) v[t] = load_n(p + t * kLanes<C>, kLanes<C>);
}

// How normalize_rows takes rows one at a time. pipeline: the sums of row i + 1 are stepped
// (FloatRowSums, HalfRowSums, WideRowSums) while row i is normalized, once per vector of row i,
// so that reading the next row from memory overlaps writing this one; alone, the sums of a row
// streamed from memory run with memory idle, its reads done and no writes yet. recompute_sum
// (the fused add and norm of float32, pipelined rows only): s is not written as the sums read
// x + residual (where a row is summed again it is, and then again, to the same values), and
// apply writes it.
struct RowPass {
  bool pipeline = false;
  bool recompute_sum = false;
};

// Streamed rows whose values take this many bytes or more in their compute type (8192 float32
// or half elements, 4096 float64) are pipelined, and fused float32 sums recomputed where
// recompute_sum() allows. Against rows one at a time (2 threads, Intel
// Xeon VM): float32 add_layer_norm (256, 65536) took 0.79x the time, (512, 32768) 0.87x,
// (2048, 8192) 0.84x; add_rms_norm 0.76x; add_layer_norm into the residual 0.82-0.97x; rms_norm
// 0.94x; layer_norm 0.93-0.95x (in alternating processes). Float16 and bfloat16 rows of
// 8192-65536 (in-process A/B): layer_norm without weight 0.78-0.98x, with weight and bias
// 0.91-0.99x (one row at a time: in pairs 0.98-1.00x), rms_norm 0.85-0.99x, add_layer_norm
// 0.80-0.89x. Rows of 4096 gained nothing (float32 0.97-1.02x, half rows of 1024-4096
// 0.92-1.06x), and float32 ones with their fused sums recomputed took 1.11-1.12x. Float64 rows
// of 4096-65536 (in-process A/B, one at a time): layer_norm with weight and bias 0.84-0.93x (in
// pairs 0.80-1.04x), without 0.89-0.99x, rms_norm 0.89-0.99x; rows of 1024-2048 0.95-1.01x.
constexpr std::int64_t kPipelinedRowBytes = std::int64_t(32) << 10;
template <class T>
RowPass row_pass(const T* x, const T* residual, const T* sum, const T* y, std::int64_t n, bool stream) {
  const bool pipeline = stream && n * std::int64_t(sizeof(compute_t<T>)) >= kPipelinedRowBytes;
  return RowPass{pipeline, pipeline && recompute_sum(x, residual, sum, y, stream)};
}

// The `next` of rows whose successor's sums are not stepped.
struct NoRowSums {
  void step() {}
};

// What normalizing a row of n does at its vector j for the row after it: steps `next`, its sums
// (normalize_rows' pipeline), or where there is none and rows stream, prefetches the same place
// of the next row's inputs p0 and p1 (p1 may be null). Rows too short to stream are left to the
// hardware prefetcher: prefetched, float32 layer_norm (65536, 128) took 1.06-1.09x the time.
template <class Next, class T>
__attribute__((always_inline)) inline auto next_row_tick(Next* next, bool stream, std::int64_t n, const T* p0,
                                                         const T* p1) {
  stream = stream && streamable_row<T>(n);
  // Inlined: GCC takes a call whose body only prefetches for one without effect, and drops it.
  return [=](std::int64_t j) __attribute__((always_inline)) {
    if constexpr (!std::is_same<Next, NoRowSums>::value) {
      if (next) return next->step();
    }
    if (stream) {
      prefetch_next_row(p0 + j);
      if (p1) prefetch_next_row(p1 + j);
    }
  };
}

// Rows [r0, r1) of a tensor of data_bytes, x or with a residual s = x + residual (written to
// sum as it is read): their moments (Centered: mean and variance, else mean 0 and the mean
// square as var), then apply(i, mean, rstd, next) with rstd = 1 / sqrt(var + eps): next, where
// not null, the sums of the next row, to step() once per vector while row i is normalized
// (pass.pipeline). Short rows, whose statistics (a reduction, a square root and a division per
// row) cost more than moving them, go in blocks of kRowBlock (at most 16 KiB of half data,
// 8 KiB of float, still in L1 when applied): the reductions of a block overlap in the pipeline
// instead of each waiting behind the previous row's normalization, and its square roots and
// divisions take one vector instruction each. Float rows go one at a time where the tensor is
// larger than kBlockedFloatBytes (memory bound: blocked, the rows of 32 MiB of (65536, 128) ran
// 15-35% slower, reads and writes coming in bursts) or streamed past the cache (8-14% slower).
// NV > 0: narrow rows (with_narrow_rows). With apply_pair, rows one at a time go in pairs
// instead: apply_pair(i, mean0, rstd0, mean1, rstd1, next0, next1) for rows i and i + 1 (the
// last row of an odd range alone), next0 and next1 those of rows i + 2 and i + 3.
template <bool Centered, int NV, class T, class ApplyFn, class ApplyPairFn = std::nullptr_t>
void normalize_rows(const T* x, const T* residual, T* sum, RowPass pass, std::int64_t r0, std::int64_t r1,
                    std::int64_t n, std::int64_t data_bytes, double eps, const ApplyFn& apply,
                    const ApplyPairFn& apply_pair = nullptr) {
  constexpr bool kPaired = !std::is_same<ApplyPairFn, std::nullptr_t>::value;
  NoRowSums* const none = nullptr;
  auto block_moments = [&](std::int64_t i, std::int64_t nb, double(&mean)[kRowBlock], double(&var)[kRowBlock]) {
#if NL_VEC_BYTES
    if constexpr (NV > 0) {
      if (residual) {
        narrow_block_moments<Centered, NV, true>(x + i * n, residual + i * n, sum + i * n, n, nb, mean, var);
      } else {
        narrow_block_moments<Centered, NV, false>(x + i * n, residual, sum, n, nb, mean, var);
      }
      return;
    }
#endif
    for (std::int64_t b = 0; b < kRowBlock; ++b) {
      const Moments m = b < nb ? row_moments_of<Centered>(x, residual, sum, i + b, n) : Moments{0.0, 1.0};
      mean[b] = m.mean;
      var[b] = m.var;
    }
  };
  if (NV > 0 || rows_in_blocks<T>(n, data_bytes)) {
    double mean[kRowBlock], rstd[kRowBlock];
    for (std::int64_t i = r0; i < r1; i += kRowBlock) {
      const std::int64_t nb = r1 - i < kRowBlock ? r1 - i : kRowBlock;
      block_moments(i, nb, mean, rstd);
      for (std::int64_t b = 0; b < kRowBlock; ++b) rstd[b] = 1.0 / __builtin_sqrt(rstd[b] + eps);
      for (std::int64_t b = 0; b < nb; ++b) apply(i + b, mean[b], rstd[b], none);
    }
    return;
  }
  auto rstd_of = [&](const Moments& m) { return 1.0 / __builtin_sqrt(m.var + eps); };
#if NL_VEC_BYTES
  auto pipelined = [&](auto add, auto keep) {
    constexpr bool kAdd = decltype(add)::value, kKeep = decltype(keep)::value;
    using Sums = std::conditional_t<
        std::is_same<T, double>::value, WideRowSums<Centered>,
        std::conditional_t<kHalf<T>, HalfRowSums<T, Centered, kAdd>, FloatRowSums<Centered, kAdd, kKeep>>>;
    auto sums_of = [&](std::int64_t k) {
      return kAdd ? Sums(x + k * n, residual + k * n, sum + k * n, n) : Sums(x + k * n, nullptr, nullptr, n);
    };
    std::int64_t i = r0;
    Moments m0{}, m1{};
    if (i < r1) m0 = sums_of(i).finish();
    if constexpr (kPaired) {
      if (i + 1 < r1) m1 = sums_of(i + 1).finish();
      for (; i + 1 < r1; i += 2) {
        if (i + 3 < r1) {
          Sums next0 = sums_of(i + 2), next1 = sums_of(i + 3);
          apply_pair(i, m0.mean, rstd_of(m0), m1.mean, rstd_of(m1), &next0, &next1);
          m0 = next0.finish();
          m1 = next1.finish();
        } else if (i + 2 < r1) {
          Sums next0 = sums_of(i + 2);
          apply_pair(i, m0.mean, rstd_of(m0), m1.mean, rstd_of(m1), &next0, static_cast<Sums*>(nullptr));
          m0 = next0.finish();
        } else {
          apply_pair(i, m0.mean, rstd_of(m0), m1.mean, rstd_of(m1), static_cast<Sums*>(nullptr),
                     static_cast<Sums*>(nullptr));
        }
      }
    }
    for (; i < r1; ++i) {
      if (i + 1 < r1) {
        Sums next = sums_of(i + 1);
        apply(i, m0.mean, rstd_of(m0), &next);
        m0 = next.finish();
      } else {
        apply(i, m0.mean, rstd_of(m0), static_cast<Sums*>(nullptr));
      }
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (pass.pipeline) {
    if (!residual) return pipelined(No(), Yes());
    if constexpr (!std::is_same<T, double>::value) {
      if (!pass.recompute_sum) return pipelined(Yes(), Yes());
      if constexpr (!kPaired) return pipelined(Yes(), No());
    }
  }
#endif
  std::int64_t i = r0;
  if constexpr (kPaired) {
    for (; i + 1 < r1; i += 2) {
      const Moments m0 = row_moments_of<Centered>(x, residual, sum, i, n);
      const Moments m1 = row_moments_of<Centered>(x, residual, sum, i + 1, n);
      apply_pair(i, m0.mean, rstd_of(m0), m1.mean, rstd_of(m1), none, none);
    }
  }
  for (; i < r1; ++i) {
    const Moments m = row_moments_of<Centered>(x, residual, sum, i, n);
    apply(i, m.mean, rstd_of(m), none);
  }
}

// Row blocks for column sums: fixed by the shape alone, so sums come out the same for every
// thread count. Up to 64 blocks, fewer when their double partials would pass 8 KiB and a
// thirty-second of the input (float32 bytes): each block's partial is cleared, flushed into
// and added up once, and the other threads' partials move to the thread that adds them up, so
// partials as large as the input (341 rows of 768 under a 2 MiB floor) cost more than the rows.
// Against a floor of 128 KiB and a sixteenth (2 threads, Zen 4 VM, in-process A/B), float32
// layer_norm_backward with weight of (256, 64) took 0.44x the time, (1024, 64) 0.72x,
// (4096, 64) 0.95x, rms_norm 0.67x, 0.89x, 1.00x; (4096, 128), (8192, 768) and (2048, 4096)
// 0.97-1.01x. In a phase of the VM where lines moved between its two cores more slowly, the
// 64 blocks of (256, 64) took 28 us on 2 threads against 9.4 us on one.
// But never fewer than kMinColumnSumBlocks (or one per row): the blocks are what threads share.
// With a single block, layer_norm_backward with weight of (64, 65536), (64, 8192), (32, 16384)
// and (16, 16384) ran on one thread; with four (2 threads, Zen 4 VM, in-process A/B) they took
// 0.56-0.65x the time, rms_norm's (32, 16384) and (16, 16384) 0.58-0.65x, its (64, 65536) and
// (64, 8192), two blocks before, 1.03-1.04x; eight took 0.57-1.16x. On one thread the extra
// partials cost 1.00-1.06x, and 1.14-1.24x on (16, 16384) (130 us).
constexpr std::int64_t kMinColumnSumBlocks = 4;
inline std::int64_t column_sum_blocks(std::int64_t rows, std::int64_t cols, int nsums) {
  const double partial_bytes = double(cols) * nsums * sizeof(double);
  double budget = double(rows) * double(cols) * 4.0 / 32.0;
  if (budget < 8.0 * 1024) budget = 8.0 * 1024;
  std::int64_t nb = rows < 64 ? rows : 64;
  const std::int64_t cap = std::int64_t(budget / partial_bytes);
  if (nb > cap) nb = cap;
  const std::int64_t floor = rows < kMinColumnSumBlocks ? rows : kMinColumnSumBlocks;
  if (nb < floor) nb = floor;
  return nb < 1 ? 1 : nb;
}

// Rows add their column contributions into a T-typed stage, which joins the block's double
// partial every kStageRows rows: most additions stay in the data's own precision, and each
// stage sum has at most kStageRows terms. 16 against 8: float32 layer_norm_backward with
// weight took 0.93-0.98x the time on (2048, 4096), (8192, 768) and (256, 65536), rms_norm
// 0.96-1.01x; dweight/dbias errors stay under float32 rounding of the result (at 32, dbias of
// (256, 65536) passed it: 1.2e-7 of the sum of |terms|).
constexpr std::int64_t kStageRows = 16;

// Runs row(i, stage) for every row i, where stage points at nsums * cols values of T the row
// adds its column contributions to (null when nsums == 0), then stores the column sums in
// outs[0..nsums). With sums, rows go in blocks fixed by the shape, each block's rows in order
// into its own stage and double partial, and blocks are added in order: no result depends on
// the thread count. With a stage_rows(i0, i1, stage) callable, that runs the rows of each
// stage (up to kStageRows, in order; without sums, spans as long) instead of row.
template <class T, class Row, class StageRows = std::nullptr_t>
void rows_with_column_sums(std::int64_t rows, std::int64_t cols, int nsums, T* const* outs, int nthreads,
                           const Row& row, const StageRows& stage_rows = nullptr) {
  if (nsums == 0 || rows == 0) {
    parallel_ranges(rows, nthreads, [&](std::int64_t r0, std::int64_t r1) {
      if constexpr (!std::is_same<StageRows, std::nullptr_t>::value) {
        for (std::int64_t i = r0; i < r1; i += kStageRows)
          stage_rows(i, r1 - i < kStageRows ? r1 : i + kStageRows, static_cast<T*>(nullptr));
      } else {
        for (std::int64_t i = r0; i < r1; ++i) row(i, static_cast<T*>(nullptr));
      }
      stream_fence();  // rows may stream their outputs
    });
    for (int k = 0; k < nsums; ++k)
      for (std::int64_t j = 0; j < cols; ++j) outs[k][j] = T(0);
    return;
  }
  const std::int64_t nb = column_sum_blocks(rows, cols, nsums);
  const std::int64_t stride = std::int64_t(nsums) * cols;
  // Each block's stage and partial start on their own cache lines: threads never share one.
  const std::int64_t padded = (stride + 15) / 16 * 16;
  ScratchBytes memory((sizeof(double) + sizeof(T)) * std::size_t(nb * padded));
  double* partials = static_cast<double*>(memory.data());
  T* stages = reinterpret_cast<T*>(partials + nb * padded);
  parallel_blocks(nb, nthreads, [&](std::int64_t b) {
    double* partial = partials + b * padded;
    T* stage = stages + b * padded;
    for (std::int64_t j = 0; j < stride; ++j) stage[j] = T(0);
    const std::int64_t r0 = rows * b / nb, r1 = rows * (b + 1) / nb;
    bool first = true;  // the partial starts at the first flush (0.0 + s, as when cleared first)
    auto flush = [&] {
      if (first) {
        for (std::int64_t j = 0; j < stride; ++j) partial[j] = 0.0 + double(stage[j]);
      } else {
        for (std::int64_t j = 0; j < stride; ++j) partial[j] += double(stage[j]);
      }
      for (std::int64_t j = 0; j < stride; ++j) stage[j] = T(0);
      first = false;
    };
    if constexpr (!std::is_same<StageRows, std::nullptr_t>::value) {
      for (std::int64_t i = r0; i < r1; i += kStageRows) {
        stage_rows(i, r1 - i < kStageRows ? r1 : i + kStageRows, stage);
        flush();
      }
    } else {
      for (std::int64_t i = r0; i < r1; ++i) {
        row(i, stage);
        if ((i - r0) % kStageRows == kStageRows - 1 || i == r1 - 1) flush();
      }
    }
    stream_fence();  // rows may stream their outputs
  });
  // Column sums, blocks added in order; a chunk of one sum's columns at a time, so that every
  // block's partial is read and the output written sequentially (written column by column
  // through outs[k], the output loop took 15 us of a 27 us (1, 4096) backward).
  constexpr std::int64_t kChunk = 256;
  const std::int64_t chunks = (cols + kChunk - 1) / kChunk;
  const int combine_threads = nb * stride * 8 >= (1 << 20) ? nthreads : 1;
  parallel_ranges(nsums * chunks, combine_threads, [&](std::int64_t t0, std::int64_t t1) {
    double acc[kChunk];
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t k = t / chunks, col = (t % chunks) * kChunk, c = k * cols + col;
      const std::int64_t len = cols - col < kChunk ? cols - col : kChunk;
      for (std::int64_t j = 0; j < len; ++j) acc[j] = partials[c + j];
      for (std::int64_t b = 1; b < nb; ++b) {
        const double* p = partials + b * padded + c;
        for (std::int64_t j = 0; j < len; ++j) acc[j] += p[j];
      }
      T* const out = outs[k] + col;
      for (std::int64_t j = 0; j < len; ++j) out[j] = T(acc[j]);
    }
  });
}

// Rows of fewer bytes, fetched into L2 by the row before, take their sums without
// prefetches (RowBackward::run_f32).
constexpr std::int64_t kFetchedSumsRowBytes = std::int64_t(8) << 10;

struct BackwardSums {
  double g = 0;   // sum of g = dy * w (dy without weight)
  double gx = 0;  // sum of g * xhat
};

// c0 = mean(g) (0 for rms) and c1 = mean(g * xhat) of a row of n elements from its sums.
template <bool Centered>
void backward_means(const BackwardSums& t, std::int64_t n, double& c0, double& c1) {
  const double inv_n = 1.0 / double(n);
  c0 = Centered ? t.g * inv_n : 0.0;
  c1 = t.gx * inv_n;
}

// The backward of one row of layer_norm (Centered) or rms_norm:
//   xhat = (x - mean) * rstd (mean = 0 for rms), g = dy * w,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (no mean(g) term for rms),
// and with weight stage[0..n) += dy * xhat, for layer_norm also stage[n..2n) += dy. With ds
// (the fused add + norm), dx also receives the gradient that reached x + residual directly.
template <bool Centered, bool HasW, class T>
struct RowBackward {
  using C = compute_t<T>;  // weight and stage values
  static constexpr bool kCentered = Centered, kHasW = HasW;
  const T* dy;
  const T* x;
  const C* w;
  T* dx;
  std::int64_t n;
  double mean;  // 0 for rms
  double rstd;
  const T* ds;  // optional
  // Elements from this row to the next one, whose x and dy are fetched into L2 during this
  // row's dx pass (prefetch_next_row); 0: none.
  std::int64_t ahead = 0;

  // The sums of g and g * xhat over the row, in double.
  BackwardSums wide_sums() const {
    const vwide vm = splat<vwide>(mean), vr = splat<vwide>(rstd);
    vwide sg{}, sgx{};
    std::int64_t j = 0;
    for (; j + kWide <= n; j += kWide) {
      vwide xh = load_wide(x + j);
      if constexpr (Centered) xh -= vm;
      xh *= vr;
      vwide gv = load_wide(dy + j);
      if constexpr (HasW) gv *= load_wide(w + j);
      if constexpr (Centered) sg += gv;
      sgx = fmadd(gv, xh, sgx);
    }
    return with_tail(j, lane_sum(sg), lane_sum(sgx));
  }

  // mean(g) (0 for rms) and mean(g * xhat), in double.
  void sums(double& c0, double& c1) const { backward_means<Centered>(wide_sums(), n, c0, c1); }

  // The sums sg, sgx of g and g * xhat over elements [0, j), with the rest of the row's added
  // in double.
  BackwardSums with_tail(std::int64_t j, double sg, double sgx) const {
    double tg = 0, tgx = 0;
    for (; j < n; ++j) {
      const double xh = (double(to_c(x[j])) - mean) * rstd;
      double gv = double(to_c(dy[j]));
      if constexpr (HasW) gv *= double(w[j]);
      tg += gv;
      tgx = fmadd(gv, xh, tgx);
    }
    return {sg + tg, sgx + tgx};
  }

  // c0 and c1 from the sums sg, sgx of g and g * xhat over elements [0, j), and the rest of
  // the row added here in double.
  void finish_sums(std::int64_t j, double sg, double sgx, double& c0, double& c1) const {
    backward_means<Centered>(with_tail(j, sg, sgx), n, c0, c1);
  }

  // The row in double.
  void run_wide(C* stage, bool stream) const {
    double c0, c1;
    sums(c0, c1);
    dx_wide(stage, c0, c1, stream);
  }

  // run_wide's second pass, given the row's c0 and c1: dx, and with weight the row's part of
  // the stage. Float64 rows on SIMD targets go through map_row (stream: dx written past the
  // caches where the row is long enough): against stores through the caches, float64
  // layer_norm_backward of rows of 4096-100000 took 0.56-0.71x the time (without weight
  // 0.65-0.76x), rows of 768 0.80x, of 64-512 0.85-1.09x (2 threads, Intel Xeon VM, in-process
  // A/B). They do not fetch the next row into L2 (ahead): on rows of 4096-65536 that took
  // 0.64-0.81x against 0.59-0.70x without.
  void dx_wide(C* stage, double c0, double c1, bool stream) const {
    const vwide vm = splat<vwide>(mean), vr = splat<vwide>(rstd);
    const vwide vc0 = splat<vwide>(c0), vc1 = splat<vwide>(c1);
#if NL_VEC_BYTES
    if constexpr (std::is_same<T, double>::value) {
      map_row(dx, n, stream, [&](std::int64_t j, int count) __attribute__((always_inline)) {
        vwide xh = load_n(x + j, count);
        if constexpr (Centered) xh -= vm;
        xh *= vr;
        const vwide d = load_n(dy + j, count);
        vwide gv = d;
        if constexpr (HasW) {
          gv *= load_n(w + j, count);
          // Both stage rows loaded before either is stored: they lie n elements apart, often a
          // multiple of 4 KiB, where a load after the other's store would wait on it.
          const vwide s0 = load_n(stage + j, count);
          vwide s1{};
          if constexpr (Centered) s1 = load_n(stage + n + j, count);
          if (count == kWide) {
            store(stage + j, fmadd(d, xh, s0));
            if constexpr (Centered) store(stage + n + j, s1 + d);
          } else {
            store_partial(stage + j, fmadd(d, xh, s0), count);
            if constexpr (Centered) store_partial(stage + n + j, s1 + d, count);
          }
        }
        if constexpr (Centered) gv -= vc0;
        vwide out = vr * (gv - xh * vc1);
        if (ds) out += load_n(ds + j, count);
        return out;
      });
      return;
    }
#endif
    std::int64_t j = 0;
    for (; j + kWide <= n; j += kWide) {
      vwide xh = load_wide(x + j);
      if constexpr (Centered) xh -= vm;
      xh *= vr;
      const vwide d = load_wide(dy + j);
      vwide gv = d;
      if constexpr (HasW) {
        gv *= load_wide(w + j);
        if constexpr (sizeof(C) == 8) {
          store(stage + j, fmadd(d, xh, load<vwide>(stage + j)));
          if constexpr (Centered) store(stage + n + j, load<vwide>(stage + n + j) + d);
        } else {
          for (int k = 0; k < kWide; ++k) {
            stage[j + k] += C(d[k] * xh[k]);
            if constexpr (Centered) stage[n + j + k] += C(d[k]);
          }
        }
      }
      if constexpr (Centered) gv -= vc0;
      vwide out = vr * (gv - xh * vc1);
      if (ds) out += load_wide(ds + j);
      store_narrow(dx + j, out);
    }
    for (; j < n; ++j) {
      const double xh = (double(to_c(x[j])) - mean) * rstd;
      const double d = double(to_c(dy[j]));
      double gv = d;
      if constexpr (HasW) {
        gv *= double(w[j]);
        stage[j] = C(fmadd(d, xh, double(stage[j])));
        if constexpr (Centered) stage[n + j] = C(double(stage[n + j]) + d);
      }
      dx[j] = narrow<T>(rstd * ((gv - c0) - xh * c1) + (ds ? double(to_c(ds[j])) : 0.0));
    }
  }

#if NL_VEC_BYTES
  // c0 = mean(g) (0 for rms) and c1 = mean(g * xhat) of a row of float data, in float lanes
  // (sums flushed to double as in row_moments_f32), a vector at a time: step() adds the row's
  // next whole vector (none once all are in), finish() the rest; summed again in double where
  // the float sums overflow. Stepped alone (sums_f32) or while the previous rows' dx is written
  // (pipelined rows), the arithmetic is the same. Prefetch: read kPrefetchFloats ahead (rows
  // not already fetched into L2).
  template <bool Prefetch>
  struct SumsF32Of {
    using V = vnative<float>;
    static constexpr int L = kLanes<float>;
    const T* x;
    const T* dy;
    const C* w;
    std::int64_t n, j = 0;
    V vm, vr, sg{}, sgx{};
    vwide dsg{}, dsgx{};
    int run = 0;

    SumsF32Of() = default;
    explicit SumsF32Of(const RowBackward& r)
        : x(r.x), dy(r.dy), w(r.w), n(r.n), vm(splat<V>(float(r.mean))), vr(splat<V>(float(r.rstd))) {}
    __attribute__((always_inline)) void add(std::int64_t k) {
      if constexpr (Prefetch) {
        __builtin_prefetch(x + k + kPrefetchFloats);
        __builtin_prefetch(dy + k + kPrefetchFloats);
      }
      V xh = load<V>(x + k);
      if constexpr (Centered) xh -= vm;
      xh *= vr;
      V gv = load<V>(dy + k);
      if constexpr (HasW) gv *= load<V>(w + k);
      if constexpr (Centered) sg += gv;
      sgx = fmadd(gv, xh, sgx);
      if (++run == kBackwardFlushEvery) flush();
    }
    __attribute__((always_inline)) void flush() {
      if constexpr (Centered) dsg += widen_sum(sg);
      dsgx += widen_sum(sgx);
      sg = sgx = V{};
      run = 0;
    }
    __attribute__((always_inline)) void step() {
      if (j + L > n) return;
      add(j);
      j += L;
    }
    __attribute__((always_inline)) void finish(const RowBackward& r, double& c0, double& c1) {
      for (; j + L <= n; j += L) add(j);
      if (run != 0) flush();
      r.finish_sums(j, lane_sum(dsg), lane_sum(dsgx), c0, c1);
      if (!__builtin_isfinite(c0) || !__builtin_isfinite(c1)) r.sums(c0, c1);  // overflow, or Inf/NaN
    }
  };

  using SumsF32 = SumsF32Of<true>;

  template <bool Prefetch = true>
  __attribute__((always_inline)) void sums_f32(double& c0, double& c1) const {
    SumsF32Of<Prefetch> sums(*this);
    sums.finish(*this, c0, c1);
  }

  // The row of float data in float lanes. Stream: dx written past the caches where the row is
  // long enough (stream_head). Rows under kFetchedSumsRowBytes that fetch the next row into
  // L2 (ahead) were most likely fetched by the row before: their sums read from L2 without
  // prefetches, which took load slots the hardware prefetcher fills anyway. Float32
  // layer_norm_backward of (8192, 768) and (4096, 1024) took 0.92-0.97x the time, rms_norm
  // 0.90-0.95x, without weight 0.935-0.945x, add_layer_norm 0.93-0.94x (2 threads, AMD Zen 4);
  // rows of 4096 without weight took 1.03-1.17x: they keep them.
  template <bool Stream>
  __attribute__((always_inline)) void run_f32(float* stage) const {
    double c0, c1;
    if (ahead && n * std::int64_t(sizeof(T)) < kFetchedSumsRowBytes) sums_f32<false>(c0, c1);
    else sums_f32<true>(c0, c1);
    dx_pass<Stream>(stage, c0, c1, [](std::int64_t) __attribute__((always_inline)) {});
  }

  // run_f32's second pass, given the row's c0 and c1: dx, and (WithStage) the row's part of the
  // stage. tick(j) at each vector j (the next row's sums, for pipelined rows).
  template <bool Stream, class Tick, bool WithStage = true>
  __attribute__((always_inline)) void dx_pass(float* stage, double c0, double c1, const Tick& tick) const {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    const V vm = splat<V>(float(mean)), vr = splat<V>(float(rstd));
    // dx = rstd * ((g - c0) - c1 * xhat), as the double path: rstd * (g - c0) alone overflows
    // float where g is near its limit and rstd over 1, though dx is in range.
    const V vc0 = splat<V>(float(c0)), vnc1 = splat<V>(-float(c1));
    // Cached, dx goes from j = 0, where the stage (64-byte aligned) stays aligned; streamed, in
    // whole lines from its first line-aligned element, as map_row. Whole vectors are stored as
    // whole_vectors puts them (bfloat16: one subnormal test per four). Two instantiations: a
    // call to a streamed loop on the side slowed the cached one by 4-16%.
    auto value = [&](std::int64_t j) __attribute__((always_inline)) {
      return dx_value<WithStage>(j, L, stage, vm, vr, vc0, vnc1);
    };
    if constexpr (Stream) {
      const std::int64_t head = stream_head(dx, n);
      if (head >= 0) {
        walk_line_spans<T>(
            head, n,
            [&](std::int64_t i, int count) __attribute__((always_inline)) {
              tick(i);
              dx_vector<kBesideStream, WithStage>(i, count, stage, vm, vr, vc0, vnc1);
            },
            [&](std::int64_t j0, std::int64_t j1) __attribute__((always_inline)) {
              whole_vectors<T>(
                  j0, j1,
                  [&](std::int64_t i, int) __attribute__((always_inline)) {
                    tick(i);
                    return value(i);
                  },
                  [&](std::int64_t i, V out, bool normal) __attribute__((always_inline)) {
                    store_stream(dx + i, out, normal);
                  });
            });
        return;
      }
    }
    const std::int64_t whole = n / L * L;
    whole_vectors<T>(
        0, whole,
        [&](std::int64_t j, int) __attribute__((always_inline)) {
          tick(j);
          prefetch_for_write(dx + j);
          return value(j);
        },
        [&](std::int64_t j, V out, bool normal) __attribute__((always_inline)) { store_whole(dx + j, out, normal); });
    if (whole < n) {
      tick(whole);
      prefetch_for_write(dx + whole);
      dx_vector<kCached, WithStage>(whole, int(n - whole), stage, vm, vr, vc0, vnc1);
    }
  }

  // How dx_vector stores: through the caches, or through them beside streamed lines (partial
  // vectors unmasked).
  enum StoreMode { kCached, kBesideStream };

  // dx[j .. j+count) of run_f32, returned to be stored, and (WithStage) the row's part of the
  // stage there.
  template <bool WithStage = true>
  __attribute__((always_inline)) vnative<float> dx_value(std::int64_t j, int count, float* stage, vnative<float> vm,
                                                         vnative<float> vr, vnative<float> vc0,
                                                         vnative<float> vnc1) const {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    if (ahead) {
      prefetch_next_row(x + ahead + j);
      prefetch_next_row(dy + ahead + j);
    }
    V xh = load_n(x + j, count);
    if constexpr (Centered) xh -= vm;
    xh *= vr;
    const V d = load_n(dy + j, count);
    V gv = d;
    if constexpr (HasW) gv *= load_n(w + j, count);
    if constexpr (Centered) gv -= vc0;
    V out = vr * fmadd(vnc1, xh, gv);
    if (ds) out += load_n(ds + j, count);
    if constexpr (HasW && WithStage) {
      if (count == L) {
        store(stage + j, fmadd(d, xh, load<V>(stage + j)));
        if constexpr (Centered) store(stage + n + j, load<V>(stage + n + j) + d);
      } else {
        store_partial(stage + j, fmadd(d, xh, load_n(stage + j, count)), count);
        if constexpr (Centered) store_partial(stage + n + j, load_n(stage + n + j, count) + d, count);
      }
    }
    return out;
  }

  // dx_value stored as Mode says.
  template <StoreMode Mode, bool WithStage = true>
  __attribute__((always_inline)) void dx_vector(std::int64_t j, int count, float* stage, vnative<float> vm,
                                                vnative<float> vr, vnative<float> vc0, vnative<float> vnc1) const {
    constexpr int L = kLanes<float>;
    const vnative<float> out = dx_value<WithStage>(j, count, stage, vm, vr, vc0, vnc1);
    if (count == L) store(dx + j, out);
    else if (Mode == kBesideStream) store_partial_unmasked(dx + j, out, count);
    else store_partial(dx + j, out, count);
  }

  // run_f32 of a row of NV whole vectors (n == NV * lanes, NV <= kBackwardFlushEvery), with weight wv
  // its stage in registers s0 (dweight) and s1 (dbias) across rows; x * rstd and dy * w are
  // kept from the sums to the output. The same arithmetic as run_f32, so the same results.
  template <int NV>
  __attribute__((always_inline)) void run_f32_narrow(const vnative<float> (&wv)[NV], vnative<float> (&s0)[NV],
                                                     vnative<float> (&s1)[NV]) const {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    static_assert(NV <= kBackwardFlushEvery, "one flush of the float sums per row");
    const V vm = splat<V>(float(mean)), vr = splat<V>(float(rstd));
    V xh[NV], d[NV], g[NV];
    V sg{}, sgx{};
    for (int t = 0; t < NV; ++t) {
      __builtin_prefetch(x + t * L + kPrefetchFloats);
      __builtin_prefetch(dy + t * L + kPrefetchFloats);
      xh[t] = load<V>(x + t * L);
      if constexpr (Centered) xh[t] -= vm;
      xh[t] *= vr;
      d[t] = load<V>(dy + t * L);
      g[t] = d[t];
      if constexpr (HasW) g[t] *= wv[t];
      if constexpr (Centered) sg += g[t];
      sgx = fmadd(g[t], xh[t], sgx);
    }
    vwide dsg{}, dsgx{};
    if constexpr (Centered) dsg += widen_sum(sg);
    dsgx += widen_sum(sgx);
    // run_f32's scalar tail sums, empty here but still added: + 0.0 turns a -0 sum into +0 there.
    const double tg = 0, tgx = 0, inv_n = 1.0 / double(n);
    double c0 = Centered ? (lane_sum_inline(dsg) + tg) * inv_n : 0.0;
    double c1 = (lane_sum_inline(dsgx) + tgx) * inv_n;
    if (!__builtin_isfinite(c0) || !__builtin_isfinite(c1)) sums(c0, c1);
    const V vc0 = splat<V>(float(c0)), vnc1 = splat<V>(-float(c1));
    V out[NV];
    for (int t = 0; t < NV; ++t) {
      V gv = g[t];
      if constexpr (Centered) gv -= vc0;
      out[t] = vr * fmadd(vnc1, xh[t], gv);
      if (ds) out[t] += load<V>(ds + t * L);
      if constexpr (HasW) {
        s0[t] = fmadd(d[t], xh[t], s0[t]);
        if constexpr (Centered) s1[t] += d[t];
      }
    }
    put_vectors<T>(out, [&](int t, V v, bool normal) __attribute__((always_inline)) { store_whole(dx + t * L, v, normal); });
  }
#endif

  template <bool Stream>
  __attribute__((always_inline)) void run(C* stage) const {
    // A local copy, whose fields stay in registers: every store (memcpy) may alias *this.
    const RowBackward row = *this;
#if NL_VEC_BYTES
    if constexpr (std::is_same<C, float>::value) return row.template run_f32<Stream>(stage);
#endif
    row.run_wide(stage, Stream);
  }
};

#if NL_VEC_BYTES
// Rows of fewer bytes go one by one (their stage stays in L1): grouped, float (8192, 768) took
// 1.13-1.24x the time, half (8192, 768) 0.96-1.08x.
constexpr std::int64_t kGroupedRowBytes = std::int64_t(8) << 10;
// Half rows read the next group's rows during a group's dx pass where the two groups' x and dy
// take at most this much (they stay in L2).
constexpr std::int64_t kGroupPrefetchBytes = std::int64_t(512) << 10;
// Float rows go in pairs where a group of four would read more x and dy than this.
constexpr std::int64_t kGroupPairBytes = std::int64_t(512) << 10;

// The row of group row b (first's row + b) of the backward of R rows from `first`.
template <bool Centered, class T>
__attribute__((always_inline)) inline RowBackward<Centered, true, T> group_row(const RowBackward<Centered, true, T>& first,
                                                                              const float* mean, const float* rstd,
                                                                              int b) {
  RowBackward<Centered, true, T> r = first;
  r.x += b * first.n;
  r.dy += b * first.n;
  r.mean = Centered ? double(mean[b]) : 0.0;
  r.rstd = double(rstd[b]);
  return r;
}

// RowBackward::run_f32's dx pass with weight for R rows (first and the R - 1 after it, still in
// cache from their sums c0[b], c1[b]) side by side: per column vector the weight and the stage
// are read once and the stage written once for all R rows, whose contributions are added in
// registers in row order: the same arithmetic as run_f32 row after row, so the same results.
// Row by row, the stage's loads and stores per element were as many as the rows' own. Stream:
// as run_f32, where every row's dx has the same alignment; groups whose rows differ are
// written cached. HasDs: first.ds is set. tick(j) at each column vector j (the next group's
// sums or prefetches).
template <int R, bool Stream, bool HasDs, bool Centered, class T, class Tick>
__attribute__((always_inline)) inline void grouped_dx_f32(const RowBackward<Centered, true, T>& first,
                                                          const float* mean, const float* rstd, const double* c0,
                                                          const double* c1, float* stage, const Tick& tick) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  const std::int64_t n = first.n;
  const T* const x = first.x;
  const T* const dy = first.dy;
  const T* const ds = first.ds;
  T* const dx = first.dx;
  const float* const w = first.w;
  V vm[R], vr[R], vc0[R], vnc1[R];
#pragma GCC unroll 8
  for (int b = 0; b < R; ++b) {
    vm[b] = splat<V>(Centered ? mean[b] : 0.0f);
    vr[b] = splat<V>(rstd[b]);
    vc0[b] = splat<V>(float(c0[b]));
    vnc1[b] = splat<V>(-float(c1[b]));
  }
  using yes = std::true_type;
  using no = std::false_type;
  struct beside {};
  // Columns [j, j + count); Full: count == L; how dx is stored: streamed (yes: a whole
  // line-aligned vector), cached (no) or cached beside streamed lines (beside: partial vectors
  // unmasked).
  auto columns = [&](auto full, auto how, std::int64_t j, int count) __attribute__((always_inline)) {
    constexpr bool kFull = decltype(full)::value, kStreamed = std::is_same<decltype(how), yes>::value,
                   kBeside = std::is_same<decltype(how), beside>::value;
    auto get = [&](const auto* p) __attribute__((always_inline)) {
      if constexpr (kFull) return load<V>(p);
      else return load_partial(p, count);
    };
    const V wv = get(w + j);
    V s0 = get(stage + j), s1{};
    if constexpr (Centered) s1 = get(stage + n + j);
    tick(j);
    // Groups of four load every row before storing any: rows n * 4 bytes apart in arrays that
    // share their offset in a page put dx[b] at j and x[b + 1] at j on the same 4 KiB offset,
    // and a load after such a store waits on it (4K aliasing). Float32 layer_norm_backward
    // (64, 4096) took 0.90-0.96x the time, (2048, 4096) 0.95x; pairs (pipelined long rows,
    // half rows) keep row by row: loads first, (256, 65536) took 1.04-1.05x.
    constexpr bool kLoadsFirst = R >= 4;
    // bfloat16 (kCheckedNarrow): the R rows' whole vectors are stored after one subnormal test.
    constexpr bool kTestedTogether = kCheckedNarrow<T> && kFull;
    V xs[R], dys[R], dss[R], outs[R];
    auto load_row = [&](int b) __attribute__((always_inline)) {
      const std::int64_t o = b * n + j;
      xs[b] = get(x + o);
      dys[b] = get(dy + o);
      if constexpr (HasDs) dss[b] = get(ds + o);
    };
    if constexpr (kLoadsFirst) {
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) load_row(b);
    }
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      const std::int64_t o = b * n + j;
      if constexpr (!kLoadsFirst) load_row(b);
      V xh = xs[b];
      if constexpr (Centered) xh -= vm[b];
      xh *= vr[b];
      const V d = dys[b];
      V gv = d;
      gv *= wv;
      if constexpr (Centered) gv -= vc0[b];
      V out = vr[b] * fmadd(vnc1[b], xh, gv);
      if constexpr (HasDs) out += dss[b];
      if constexpr (kTestedTogether) outs[b] = out;
      else if constexpr (kStreamed) store_stream(dx + o, out);
      else if constexpr (kFull) store(dx + o, out);
      else if constexpr (kBeside) store_partial_unmasked(dx + o, out, count);
      else store_partial(dx + o, out, count);
      s0 = fmadd(d, xh, s0);
      if constexpr (Centered) s1 += d;
    }
    if constexpr (kTestedTogether) {
      put_vectors<T>(outs, [&](int b, V out, bool normal) __attribute__((always_inline)) {
        if constexpr (kStreamed) store_stream(dx + b * n + j, out, normal);
        else store_whole(dx + b * n + j, out, normal);
      });
    }
    if constexpr (kFull) {
      store(stage + j, s0);
      if constexpr (Centered) store(stage + n + j, s1);
    } else {
      store_partial(stage + j, s0, count);
      if constexpr (Centered) store_partial(stage + n + j, s1, count);
    }
  };
  std::int64_t j = 0;
  if constexpr (Stream) {
    const std::int64_t head = stream_head(dx, n);
    bool same = head >= 0;
    for (int b = 1; b < R; ++b) same = same && stream_head(dx + b * n, n) == head;
    if (same) {
      walk_lines<T>(
          head, n,
          [&](std::int64_t i, int count) __attribute__((always_inline)) {
            if (count == L) columns(yes(), beside(), i, L);
            else columns(no(), beside(), i, count);
          },
          [&](std::int64_t i) __attribute__((always_inline)) { columns(yes(), yes(), i, L); });
      return;
    }
  }
  auto cached_vector = [&](std::int64_t i) __attribute__((always_inline)) {
    for (int b = 0; b < R; ++b) prefetch_for_write(dx + b * n + i);
    columns(yes(), no(), i, L);
  };
  // Cached, dx from its first line-aligned element where every row's is the same (as
  // map_row), the stage then off its alignment: per column vector, R stores of dx against two
  // of the stage (float32 (1024, 2048) layer_norm_backward into dx 16 or 32 bytes off a line
  // took 1.12-1.18x the time of a line-aligned dx).
  const std::int64_t head = stream_head(dx, n);
  bool same = head > 0;
  for (int b = 1; b < R; ++b) same = same && stream_head(dx + b * n, n) == head;
  if (same) {
    walk_lines<T>(
        head, n,
        [&](std::int64_t i, int count) __attribute__((always_inline)) {
          if (count == L) columns(yes(), no(), i, L);
          else columns(no(), no(), i, count);
        },
        cached_vector);
    return;
  }
  for (; j + L <= n; j += L) cached_vector(j);
  if (j < n) columns(no(), no(), j, int(n - j));
}

// Rows [i0, i1) of a stage with weight, in groups of R (grouped_dx_f32), the rows left one by
// one; row_at(i) gives row i. Pipeline (streamed rows, float32 or half): each group's dx pass
// steps the sums of the group after it in the stage, a vector of each of its rows per column
// vector, so that its reads from memory meet this group's writes; alone, a group's sums read
// memory with no writes, and its dx pass writes with no reads. Else the next group's rows are prefetched
// where both groups fit L2 (half rows, and streamed rows: float16 layer_norm_backward
// (2048, 4096) 0.75x the time of no prefetch, float32 streamed 0.92-0.96x on Intel; cached
// float rows 1.06-1.16x). Into L2 only (prefetch_next_row), as the rows one by one: rows of
// 4 KiB multiples share their L1 sets with this group's, which the next group's lines evicted
// (prefetched into L1, float32 layer_norm_backward (2048, 4096), (1024, 8192) and (8192, 2048)
// took 1.09-1.20x the time, rms_norm 1.11-1.20x, on AMD Zen 4; bfloat16 0.95-1.05x). The sums
// are the same either way, and so are the results.
template <int R, bool Stream, bool HasDs, bool Centered, class T, class RowAt>
__attribute__((always_inline)) inline void grouped_rows_f32(const RowAt& row_at, const float* mean, const float* rstd,
                                                            std::int64_t i0, std::int64_t i1, float* stage,
                                                            bool pipeline) {
  using Row = RowBackward<Centered, true, T>;
  const float* const no_mean = nullptr;
  auto group_mean = [&](std::int64_t i) { return Centered ? mean + i : no_mean; };
  double c0[R], c1[R];
  bool summed = false;  // c0, c1 hold the sums of the group at i
  std::int64_t i = i0;
  for (; i + R <= i1; i += R) {
    const Row first = row_at(i);
    const std::int64_t n = first.n;
    if (!summed) {
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) group_row(first, group_mean(i), rstd + i, b).sums_f32(c0[b], c1[b]);
    }
    summed = false;
    if (pipeline && i + 2 * R <= i1) {
      const Row after = row_at(i + R);
      typename Row::SumsF32 next[R];
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) next[b] = typename Row::SumsF32(group_row(after, group_mean(i + R), rstd + i + R, b));
      grouped_dx_f32<R, Stream, HasDs>(first, group_mean(i), rstd + i, c0, c1, stage,
                                       [&](std::int64_t) __attribute__((always_inline)) {
#pragma GCC unroll 8
                                         for (int b = 0; b < R; ++b) next[b].step();
                                       });
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b)
        next[b].finish(group_row(after, group_mean(i + R), rstd + i + R, b), c0[b], c1[b]);
      summed = true;
      continue;
    }
    const bool prefetch_next =
        (kHalf<T> || Stream) && 2 * R * n * std::int64_t(sizeof(T)) * 2 <= kGroupPrefetchBytes;
    const T* const x = first.x;
    const T* const dy = first.dy;
    grouped_dx_f32<R, Stream, HasDs>(first, group_mean(i), rstd + i, c0, c1, stage,
                                     [&](std::int64_t j) __attribute__((always_inline)) {
                                       if (!prefetch_next) return;
#pragma GCC unroll 8
                                       for (int b = 0; b < R; ++b) {
                                         prefetch_next_row(x + R * n + b * n + j);
                                         prefetch_next_row(dy + R * n + b * n + j);
                                       }
                                     });
  }
  for (; i < i1; ++i) row_at(i).template run<Stream>(stage);
}

// Cached float rows [i0, i1) of a stage with weight (kStageSummedRows), in groups of R (the
// rows left one by one), of `rows` in all; row_at(i) gives row i. A group's sums walk its R rows
// side by side, a column vector at a time, and add each row's dy * xhat and dy into the stage
// there: read and written once per R rows, in row order, the arithmetic of run_f32, so the same
// results. Each row's dx pass then reads x, dy and w and writes dx only, and fetches the row R
// after it into L2 where the row before it would (ahead). Per vector of a row, layer_norm took
// 8 loads and 3 stores row by row, 5.75 and 1.5 in groups of 4.
template <int R, bool Centered, class T, class RowAt>
__attribute__((always_inline)) inline void stage_summed_rows_f32(const RowAt& row_at, std::int64_t i0, std::int64_t i1,
                                                                 std::int64_t rows, float* stage) {
  using Row = RowBackward<Centered, true, T>;
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  const auto no_tick = [](std::int64_t) __attribute__((always_inline)) {};
  std::int64_t i = i0;
  for (; i + R <= i1; i += R) {
    const Row first = row_at(i);
    const std::int64_t n = first.n;
    const T* const x = first.x;
    const T* const dy = first.dy;
    const float* const w = first.w;
    V vm[R], vr[R], sg[R], sgx[R];
    vwide dsg[R], dsgx[R];
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      const Row r = row_at(i + b);
      vm[b] = splat<V>(float(r.mean));
      vr[b] = splat<V>(float(r.rstd));
      sg[b] = sgx[b] = V{};
      dsg[b] = dsgx[b] = vwide{};
    }
    int run = 0;
    std::int64_t j = 0;
    for (; j + L <= n; j += L) {
      const V wv = load<V>(w + j);
      V s0 = load<V>(stage + j), s1{};
      if constexpr (Centered) s1 = load<V>(stage + n + j);
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) {
        V xh = load<V>(x + b * n + j);
        if constexpr (Centered) xh -= vm[b];
        xh *= vr[b];
        const V d = load<V>(dy + b * n + j);
        const V gv = d * wv;
        if constexpr (Centered) sg[b] += gv;
        sgx[b] = fmadd(gv, xh, sgx[b]);
        s0 = fmadd(d, xh, s0);
        if constexpr (Centered) s1 += d;
      }
      store(stage + j, s0);
      if constexpr (Centered) store(stage + n + j, s1);
      if (++run == kBackwardFlushEvery || j + 2 * L > n) {
#pragma GCC unroll 8
        for (int b = 0; b < R; ++b) {
          if constexpr (Centered) dsg[b] += widen_sum(sg[b]);
          dsgx[b] += widen_sum(sgx[b]);
          sg[b] = sgx[b] = V{};
        }
        run = 0;
      }
    }
    if (j < n) {  // the partial vector's stage; its sums are finish_sums' scalar tail
      const int count = int(n - j);
      V s0 = load_n(stage + j, count), s1{};
      if constexpr (Centered) s1 = load_n(stage + n + j, count);
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) {
        V xh = load_n(x + b * n + j, count);
        if constexpr (Centered) xh -= vm[b];
        xh *= vr[b];
        const V d = load_n(dy + b * n + j, count);
        s0 = fmadd(d, xh, s0);
        if constexpr (Centered) s1 += d;
      }
      store_partial(stage + j, s0, count);
      if constexpr (Centered) store_partial(stage + n + j, s1, count);
    }
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      Row r = row_at(i + b);
      double c0, c1;
      r.finish_sums(j, lane_sum(dsg[b]), lane_sum(dsgx[b]), c0, c1);
      if (!__builtin_isfinite(c0) || !__builtin_isfinite(c1)) r.sums(c0, c1);  // overflow, or Inf/NaN
      r.ahead = r.ahead && i + b + R < rows ? R * n : 0;
      r.template dx_pass<false, decltype(no_tick), false>(stage, c0, c1, no_tick);
    }
  }
  for (; i < i1; ++i) row_at(i).template run<false>(stage);
}

// Streamed float32 or half rows [i0, i1) of a stage one by one, pipelined as grouped_rows_f32:
// each row's dx pass steps the sums of the row after it, a vector per vector.
template <class Row, class RowAt>
__attribute__((always_inline)) inline void pipelined_rows_f32(const RowAt& row_at, std::int64_t i0, std::int64_t i1,
                                                              float* stage) {
  double c0, c1;
  row_at(i0).sums_f32(c0, c1);
  for (std::int64_t i = i0; i < i1; ++i) {
    Row r = row_at(i);
    if (i + 1 == i1) {  // the next stage's first row is prefetched where r.ahead is set
      r.template dx_pass<true>(stage, c0, c1, [](std::int64_t) __attribute__((always_inline)) {});
      return;
    }
    r.ahead = 0;
    const Row after = row_at(i + 1);
    typename Row::SumsF32 next(after);
    r.template dx_pass<true>(stage, c0, c1, [&](std::int64_t) __attribute__((always_inline)) { next.step(); });
    next.finish(after, c0, c1);
  }
}

// RowBackward::run_f32 of float (or half) rows i < nb <= kRowBlock of NV whole float vectors
// each (n == NV * lanes, NV <= 8), side by side: every row's sums first, then their reductions across
// lanes and the steps to c0 and rstd * c1 kWide rows per instruction, then the rows again
// (still in L1) for dx. One row's chain of dependent steps would otherwise hold up the next row.
// With weight wv, the stage is in registers s0 (dweight) and s1 (dbias) across blocks. The same
// arithmetic as run_f32 (half rows: as their rows one by one), so the same results.
template <bool Centered, bool HasW, int NV, class T>
__attribute__((always_inline)) inline void narrow_block_backward(const RowBackward<Centered, HasW, T>& first,
                                                                 const float* mean, const float* rstd,
                                                                 std::int64_t nb, const vnative<float> (&wv)[NV],
                                                                 vnative<float> (&s0)[NV], vnative<float> (&s1)[NV]) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  static_assert(NV <= 8, "wv, s0 and s1 in registers");
  const std::int64_t n = first.n;
  auto row = [&](std::int64_t b) __attribute__((always_inline)) {
    RowBackward<Centered, HasW, T> r = first;
    r.dy += b * n;
    r.x += b * n;
    r.dx += b * n;
    if (r.ds) r.ds += b * n;
    r.mean = Centered ? double(mean[b]) : 0.0;
    r.rstd = double(rstd[b]);
    return r;
  };
  // xhat and g = dy * w of vector t of row b; vm and vr: the row's mean and rstd, splat once
  // per row (the stores to dx could alias the statistics).
  auto load_xhat_g = [&](std::int64_t b, int t, V vm, V vr, V& xh, V& d, V& g) __attribute__((always_inline)) {
    xh = load<V>(first.x + b * n + t * L);
    if constexpr (Centered) xh -= vm;
    xh *= vr;
    d = g = load<V>(first.dy + b * n + t * L);
    if constexpr (HasW) g *= wv[t];
  };
  vwide dsg[kRowBlock], dsgx[kRowBlock];
#pragma GCC unroll 8
  for (int b = 0; b < kRowBlock; ++b) {
    dsg[b] = dsgx[b] = vwide{};
    if (b >= nb) continue;
    const V vm = splat<V>(Centered ? mean[b] : 0.0f), vr = splat<V>(rstd[b]);
    V sg{}, sgx{};
    for (int t = 0; t < NV; ++t) {
      V xh, d, g;
      load_xhat_g(b, t, vm, vr, xh, d, g);
      if constexpr (Centered) sg += g;
      sgx = fmadd(g, xh, sgx);
      if (t % kBackwardFlushEvery == kBackwardFlushEvery - 1 || t == NV - 1) {  // as RowBackward::SumsF32Of
        if constexpr (Centered) dsg[b] += widen_sum(sg);
        dsgx[b] += widen_sum(sgx);
        sg = sgx = V{};
      }
    }
  }
  // c0 = mean(g), c1 = mean(g * xhat); + 0.0: run_f32's empty scalar tails, which turn a -0
  // sum into +0. Rows whose sums overflowed are summed again in double.
  constexpr int kSumVectors = kRowBlock / kWide;
  vwide sum_g[kSumVectors], sum_gx[kSumVectors];
  if constexpr (Centered) lane_sums_inline(dsg, sum_g);
  lane_sums_inline(dsgx, sum_gx);
  const vwide inv_n = splat<vwide>(1.0 / double(n));
  float c0f[kRowBlock], nc1f[kRowBlock];
  double c0[kRowBlock], c1[kRowBlock];
  bool any_overflow = false;
  for (int p = 0; p < kSumVectors; ++p) {
    const vwide g0 = Centered ? (sum_g[p] + 0.0) * inv_n : vwide{};
    const vwide g1 = (sum_gx[p] + 0.0) * inv_n;
    store(c0 + p * kWide, g0);
    store(c1 + p * kWide, g1);
    store_narrow(c0f + p * kWide, g0);
    store_narrow(nc1f + p * kWide, -g1);
    any_overflow |= any_lane(~((g0 - g0 == 0.0) & (g1 - g1 == 0.0)));  // Inf or NaN
  }
  if (any_overflow) {
#pragma GCC unroll 1
    for (int b = 0; b < nb; ++b) {
      if (__builtin_isfinite(c0[b]) && __builtin_isfinite(c1[b])) continue;
      row(b).sums(c0[b], c1[b]);
      c0f[b] = float(c0[b]);
      nc1f[b] = -float(c1[b]);
    }
  }
  for (int b = 0; b < nb; ++b) {
    const RowBackward<Centered, HasW, T> r = row(b);
    const V vm = splat<V>(Centered ? mean[b] : 0.0f), vr = splat<V>(rstd[b]);
    const V vc0 = splat<V>(c0f[b]), vnc1 = splat<V>(nc1f[b]);
    V out[NV];
    for (int t = 0; t < NV; ++t) {
      V xh, d, g;
      load_xhat_g(b, t, vm, vr, xh, d, g);
      if constexpr (Centered) g -= vc0;
      out[t] = vr * fmadd(vnc1, xh, g);
      if (r.ds) out[t] += load<V>(r.ds + t * L);
      if constexpr (HasW) {
        s0[t] = fmadd(d, xh, s0[t]);
        if constexpr (Centered) s1[t] += d;
      }
    }
    put_vectors<T>(out, [&](int t, V v, bool normal) __attribute__((always_inline)) { store_whole(r.dx + t * L, v, normal); });
  }
}
#endif

// Float rows whose x and dy together pass this size (beyond L2) fetch the next row's x and dy
// into L2 during a row's dx pass (RowBackward::ahead): layer_norm_backward with weight of
// (8192, 768), (4096, 768) and (2048, 1024) took 0.82-0.97x the time, without weight 0.95-1.05x;
// half rows 0.96-1.01x, so they do not (AMD Zen 4).
constexpr std::int64_t kFetchNextRowBytes = std::int64_t(4) << 20;

// Streamed float32 rows of more than this many bytes are pipelined (grouped_rows_f32,
// pipelined_rows_f32): with weight they go in pairs (kGroupPairBytes). Against the rows' sums
// taken alone (2 threads, AMD Zen 4 VM, in-process A/B): layer_norm_backward (256, 65536) took
// 0.94x the time, (512, 32768) 0.92x; rms_norm 0.89-0.91x; without weight 0.89-0.97x. Groups of
// four (rows of 4096 to 16384 floats) took 1.07-1.27x pipelined, rows of 8192 without weight
// 1.06x, and the fused backward (ds, a third row read) 1.02-1.12x: those are not. Half rows are
// pipelined from kPipelinedHalfBackwardRowBytes: float16 and bfloat16 layer_norm_backward and
// rms_norm_backward of rows of 4096-65536 took 0.79-0.98x the time (2 threads, Intel Xeon VM,
// in-process A/B; with weight in pairs, without one by one), rows of 512-2048 0.96-1.03x.
// layer_norm_backward's float rows under kGroupedRowBytes with weight, in a tensor that fits the
// cache (under stream_min_bytes()) and without ds, go in groups of kStageSummedRows
// (stage_summed_rows_f32). Against rows one by one (2 threads, AMD Zen 4 VM, in-process A/B):
// (16384, 128) took 0.885x the time, (512, 2000) 0.905x, (2048, 768) 0.94x, (8192, 256) 0.95x,
// (4096, 768) 0.96x, (1024, 1024) 1.01x. Not taken: rms_norm (0.94-1.07x, one stage row to
// save), the fused backward's ds (1.02-1.18x), half rows (bfloat16 and float16 (8192, 768)
// 1.49x, (4096, 1024) 1.03-1.08x, (16384, 128) 0.91x), tensors past the cache (rows of 768
// and 128 from memory: 0.99-1.62x with each of three prefetch placements tried), pairs
// (0.95-1.29x).
constexpr int kStageSummedRows = 4;
constexpr std::int64_t kPipelinedBackwardRowBytes = std::int64_t(64) << 10;
constexpr std::int64_t kPipelinedHalfBackwardRowBytes = std::int64_t(8) << 10;

// Pipelined float rows with weight of more than kOneByOneRowBytes go one by one, not in pairs,
// where a row's x and dy, the next row's and the stage (nsums rows of floats) fit L2: the next
// row's sums then read into L2 beside the row whose dx is written. Against pairs (Intel, 2 MiB
// L2, 2 threads, in-process A/B): layer_norm_backward (256, 65536) took 0.83-0.89x the time,
// (384, 43691) 0.71-0.72x; rms_norm 0.77-0.83x and 0.71-0.73x; bitwise the same results; one
// thread 0.86x and 0.71x (rms_norm 0.79x and 0.70x). Rows of 32768
// took 1.03-1.06x one by one, and rows of 2**17 and more, whose two rows alone fill that L2,
// 1.2-1.3x: they stay in pairs.
constexpr std::int64_t kOneByOneRowBytes = std::int64_t(128) << 10;

inline bool pipelined_one_by_one(bool pipeline, std::int64_t n, std::size_t elem_bytes, int nsums) {
  return pipeline && n * std::int64_t(elem_bytes) > kOneByOneRowBytes &&
         double(n) * double(4 * elem_bytes + std::size_t(nsums) * sizeof(float)) <= double(l2_cache_bytes());
}

// The backward of every row of a (rows, n) matrix, with the column sums dweight (and, for
// layer_norm, dbias) when weight is given.
template <bool Centered, class T, class C = compute_t<T>>
void row_norm_backward(const T* dy, const T* x, const C* mean, const C* rstd, const C* w, const T* ds,
                       T* dx, C* dweight, C* dbias, std::int64_t rows, std::int64_t n, int nthreads) {
  auto run = [&](auto has_weight, int nsums, C* const* outs) {
    constexpr bool HasW = decltype(has_weight)::value;
    // dy, x, dx and ds rows; the weight and the stage rows.
    const bool stream = stream_rows(row_traffic_bytes<T>(n, ds ? 4 : 3, HasW ? 1 + nsums : 0),
                                    rows * n * std::int64_t(sizeof(T)));
    const bool fetch_next =
        std::is_same<T, float>::value && 2 * rows * n * std::int64_t(sizeof(T)) > kFetchNextRowBytes;
    [[maybe_unused]] const bool pipeline =
        stream && !ds &&
        (kHalf<T> ? n * std::int64_t(sizeof(T)) >= kPipelinedHalfBackwardRowBytes
                  : std::is_same<T, float>::value && n * std::int64_t(sizeof(T)) > kPipelinedBackwardRowBytes);
    using Row = RowBackward<Centered, HasW, T>;
    auto row_at = [&](std::int64_t i) __attribute__((always_inline)) {
      return Row{dy + i * n,      x + i * n, w, dx + i * n, n, Centered ? double(mean[i]) : 0.0,
                 double(rstd[i]), ds ? ds + i * n : nullptr, fetch_next && i + 1 < rows ? n : 0};
    };
    auto row = [&](std::int64_t i, C* stage) { row_at(i).template run<false>(stage); };
    auto streamed_row = [&](std::int64_t i, C* stage) { row_at(i).template run<true>(stage); };
    // Narrow rows keep their vectors in registers between the passes, with weight also
    // the weight and the stage.
    with_narrow_rows<T, 8>(n, true, [&](auto nv) {
      constexpr int NV = decltype(nv)::value;
      if constexpr (NV == 0) {
#if NL_VEC_BYTES
        if constexpr (HasW && std::is_same<C, float>::value) {
          // Rows in groups of kGroupRows for the stage (grouped_rows_f32); a stage's last rows
          // that do not fill a group go one by one.
          auto grouped = [&](auto streamed, auto group_rows) {
            constexpr bool kStreamed = decltype(streamed)::value;
            constexpr int kGroupRows = decltype(group_rows)::value;
            static_assert(kStageRows % kGroupRows == 0, "a stage holds whole groups");
            return [&](std::int64_t i0, std::int64_t i1, C* stage) {
              if (ds) grouped_rows_f32<kGroupRows, kStreamed, true, Centered, T>(row_at, mean, rstd, i0, i1, stage, pipeline);
              else grouped_rows_f32<kGroupRows, kStreamed, false, Centered, T>(row_at, mean, rstd, i0, i1, stage, pipeline);
            };
          };
          auto grouped_rows = [&](auto group_rows) {
            if (stream) rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, row, grouped(std::true_type(), group_rows));
            else rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, row, grouped(std::false_type(), group_rows));
          };
          // Groups of 4 rows, or pairs for half rows and for float rows whose groups of 4 would
          // read more than kGroupPairBytes of x and dy: pairs took 0.85x the time of fours for
          // float32 (256, 65536) layer_norm_backward, 0.94-0.95x for bfloat16 rows of 4096 and
          // 16384; float32 rows of 4096 the same, of 16384 1.13x. Pipelined rows go one by one
          // where two rows' x and dy and the stage fit L2 (pipelined_one_by_one).
          if (n * std::int64_t(sizeof(T)) >= kGroupedRowBytes && !pipelined_one_by_one(pipeline, n, sizeof(T), nsums)) {
            if constexpr (kHalf<T>) {
              grouped_rows(std::integral_constant<int, 2>());
            } else {
              if (4 * 2 * n * std::int64_t(sizeof(T)) > kGroupPairBytes) grouped_rows(std::integral_constant<int, 2>());
              else grouped_rows(std::integral_constant<int, 4>());
            }
            return;
          }
        }
        if constexpr (Centered && HasW && std::is_same<T, float>::value) {
          if (!stream && !ds && rows * n * std::int64_t(sizeof(T)) < stream_min_bytes()) {
            rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, row, [&](std::int64_t i0, std::int64_t i1, C* stage) {
              stage_summed_rows_f32<kStageSummedRows, Centered, T>(row_at, i0, i1, rows, stage);
            });
            return;
          }
        }
        if constexpr (std::is_same<T, float>::value || kHalf<T>) {
          if (pipeline) {
            rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, streamed_row,
                                     [&](std::int64_t i0, std::int64_t i1, C* stage) {
                                       pipelined_rows_f32<Row>(row_at, i0, i1, stage);
                                     });
            return;
          }
        }
#endif
        if (stream) rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, streamed_row);
        else rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, row);
      } else {
#if NL_VEC_BYTES
        constexpr int L = kLanes<float>;
        using V = vnative<float>;
        static_assert(kStageRows % kRowBlock == 0, "a stage's rows are whole blocks");
        rows_with_column_sums<C>(rows, n, nsums, outs, nthreads, row, [&](std::int64_t i0, std::int64_t i1, C* stage) {
          V wv[NV] = {}, s0[NV] = {}, s1[NV] = {};
          if constexpr (HasW) {
            for (int t = 0; t < NV; ++t) {
              wv[t] = load<V>(w + t * L);
              s0[t] = load<V>(stage + t * L);
              if constexpr (Centered) s1[t] = load<V>(stage + n + t * L);
            }
          }
          // rms_norm rows of 2-4 vectors go one by one: in blocks (which load and scale each
          // row twice) they took 0.95-1.11x the time, their one sum's chain being short.
          constexpr int kMostVectorsOneByOne = 4;
          if constexpr (Centered || NV == 1 || NV > kMostVectorsOneByOne) {
            for (std::int64_t b = i0; b < i1; b += kRowBlock) {
              const std::int64_t e = i1 - b < kRowBlock ? i1 : b + kRowBlock;
              narrow_block_backward<Centered, HasW, NV>(row_at(b), mean ? mean + b : nullptr, rstd + b, e - b, wv, s0,
                                                        s1);
            }
          } else {
            for (std::int64_t i = i0; i < i1; ++i) row_at(i).template run_f32_narrow<NV>(wv, s0, s1);
          }
          if constexpr (HasW) {
            for (int t = 0; t < NV; ++t) {
              store(stage + t * L, s0[t]);
              if constexpr (Centered) store(stage + n + t * L, s1[t]);
            }
          }
        });
#endif
      }
    });
  };
  if (w) {
    C* const outs[2] = {dweight, dbias};
    run(std::true_type(), Centered ? 2 : 1, outs);
  } else {
    run(std::false_type(), 0, nullptr);
  }
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
