// The engine shared by the channel norms (batch_norm, group_norm; instance_norm is group_norm
// with one group per channel). Per-target, like simd/vec.hpp.
//
// x is (N, C, S) ("channels-first") or (N, S, C) ("channels-last"). Statistics are taken over
// sets of elements: batch norm has one set per channel (all n and s), group norm one per
// (n, group of C/G channels). A "plane" is the elements of one (n, c) pair (for channels-last
// batch norm, of one channel c over all rows), and every set is a fixed list of planes.
//
// Every reduction runs in two steps fixed by the shape alone:
//  1. the tensor is cut into units of about kUnitElems elements (channels-first: chunks of a
//     plane, or runs of whole small planes; channels-last: blocks of rows of one n, vectorized
//     across channels) and each unit writes double partial sums per plane;
//  2. partials are added per plane in unit order, and planes per set in plane order.
// Threads only decide which unit runs where, so results are identical for every thread count.
// Channels-last rows are walked m at a time as one "row" of period W = m * c, m chosen so that W
// is whole vectors; per-column coefficients and sums are replicated over the period, kept in
// registers over runs of periods (narrow rows: sum_run_rows, kRunRows) or kept in L1 and
// applied four rows per load (wide rows).
// Sums are shifted by the mean of a few of the set's first elements (set_shift), so var =
// E[d^2] - E[d]^2 keeps its digits when |mean| >> std; channels-first sums run in float lanes
// flushed to double, and sets whose float sums cannot be trusted are summed again in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "norm/row_norm.hpp"
#include "parallel/parallel_for.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

constexpr std::int64_t kUnitElems = 32768;
constexpr std::int64_t kMaxPeriod = 4096;
// Channels-last loops keep per-column coefficients and sums in registers over runs of this
// many rows: loading them from memory in the streaming loop stalls on 4K aliasing with the
// in-flight stores.
constexpr std::int64_t kRunRows = 16;
// Double vectors per register tile (fewer where registers are few).
constexpr int kTile = NL_VEC_BYTES >= 64 ? 4 : 2;

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

inline std::int64_t gcd64(std::int64_t a, std::int64_t b) {
  while (b) {
    const std::int64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

struct Geom {
  std::int64_t n = 0, c = 0, s = 0, g = 0;
  bool cl = false, batch = false;
  std::int64_t cg = 1, nsets = 0;
  int cg_log2 = -1;  // log2(cg) where cg is a power of two, else -1
  std::int64_t pn = 0;  // rows of planes: planes are pn * c
  double count = 0;     // elements per set
  // channels-first units
  std::int64_t chunk = 0, nch = 1, ppu = 1;
  // channels-last units: rows per plane row, rows per block, blocks per plane row, period
  std::int64_t rows = 0, rb = 0, blocks = 0, m = 1, W = 0;
  std::int64_t units = 0;

  std::int64_t nplanes() const { return pn * c; }
  // Called per channel in the units' setup loops: a shift, not a division, for the usual cg.
  std::int64_t set_of(std::int64_t i, std::int64_t ch) const {
    return batch ? ch : i * g + (cg_log2 >= 0 ? ch >> cg_log2 : ch / cg);
  }
  // Index of the first element of set `set` (its shift).
  std::int64_t set_first(std::int64_t set) const {
    std::int64_t i = 0, ch = set;
    if (!batch) {
      i = set / g;
      ch = (set % g) * cg;
    }
    return cl ? i * s * c + ch : (i * c + ch) * s;
  }
};

// The unit plan of a tensor; `lanes` is the native vector width of the element type.
inline Geom make_geom(std::int64_t n, std::int64_t c, std::int64_t s, std::int64_t groups,
                      bool channels_last, bool batch, int lanes, int elem_bytes) {
  Geom q;
  q.n = n, q.c = c, q.s = s, q.batch = batch;
  q.g = batch ? c : groups;
  q.cg = c / q.g;
  if (q.cg > 0 && (q.cg & (q.cg - 1)) == 0) q.cg_log2 = __builtin_ctzll(std::uint64_t(q.cg));
  q.cl = channels_last || s == 1;  // (N, C, 1) and (N, 1, C) are the same memory
  q.nsets = batch ? c : n * q.g;
  q.count = batch ? double(n) * double(s) : double(q.cg) * double(s);
  if (n == 0 || s == 0) return q;
  if (!q.cl) {
    q.pn = n;
    if (s >= kUnitElems) {
      q.nch = ceil_div(s, kUnitElems);
      q.chunk = ceil_div(s, q.nch);
      q.ppu = 1;
      q.units = n * c * q.nch;
    } else {
      q.nch = 1;
      q.chunk = s;
      q.ppu = kUnitElems / s;
      q.units = ceil_div(n * c, q.ppu);
    }
  } else {
    q.pn = batch ? 1 : n;
    q.rows = batch ? n * s : s;
    q.m = lanes / gcd64(c, lanes);
    if (c * q.m > kMaxPeriod) q.m = 1;
    q.W = c * q.m;
    std::int64_t rb = ceil_div(ceil_div(kUnitElems, c), q.m) * q.m;
    std::int64_t blocks = ceil_div(q.rows, rb);
    // Keep the partials (2 doubles per column per block) small next to the data.
    double budget = double(n) * double(s) * double(c) * elem_bytes / 2.0;
    if (budget < 4.0 * 1024 * 1024) budget = 4.0 * 1024 * 1024;
    const std::int64_t cap = std::int64_t(budget / (16.0 * double(c) * double(q.pn)));
    if (blocks > cap) {
      blocks = cap < 1 ? 1 : cap;
      rb = ceil_div(ceil_div(q.rows, blocks), q.m) * q.m;
      blocks = ceil_div(q.rows, rb);
    }
    q.rb = rb;
    q.blocks = blocks;
    q.units = q.pn * blocks;
  }
  return q;
}

// The channels-last loops prefetch the float (and double) data they read, kPrefetchFloats
// elements ahead: batch_norm (32, 64, 56, 56) took 0.77-0.88x the time, its backward 0.90x.
// Half data, its tensors half the size, is not prefetched (1.03-1.05x the time with it).
template <class T>
__attribute__((always_inline)) inline void prefetch_ahead(const T* p) {
  if constexpr (sizeof(T) >= 4) __builtin_prefetch(p + kPrefetchFloats);
}

// ---- unit drivers -----------------------------------------------------------------------------

// Per-plane sums of two quantities: cf(p, j0, j1, out2) adds over elements [j0, j1) of
// channels-first plane p into out2[0..2); cl(i, r0, r1, out) adds over rows [r0, r1) of plane
// row i into out[0..c) and out[c..2c). On return psum[p] and psum[np + p] hold the sums.
template <class CF, class CL>
void plane_sums(const Geom& q, int nthreads, double* psum, const CF& cf, const CL& cl) {
  const std::int64_t np = q.nplanes();
  if (q.units == 0) {
    for (std::int64_t p = 0; p < 2 * np; ++p) psum[p] = 0.0;
    return;
  }
  if (!q.cl) {
    std::vector<double> part(std::size_t(np * q.nch * 2), 0.0);
    parallel_blocks(q.units, nthreads, [&](std::int64_t u) {
      if (q.nch > 1) {
        const std::int64_t p = u / q.nch, k = u % q.nch;
        const std::int64_t j0 = k * q.chunk, j1 = j0 + q.chunk < q.s ? j0 + q.chunk : q.s;
        cf(p, j0, j1, &part[std::size_t((p * q.nch + k) * 2)]);
      } else {
        const std::int64_t p0 = u * q.ppu, p1 = p0 + q.ppu < np ? p0 + q.ppu : np;
        for (std::int64_t p = p0; p < p1; ++p) cf(p, std::int64_t(0), q.s, &part[std::size_t(p * 2)]);
      }
    });
    for (std::int64_t p = 0; p < np; ++p) {
      double a = 0, b = 0;
      for (std::int64_t k = 0; k < q.nch; ++k) {
        a += part[std::size_t((p * q.nch + k) * 2)];
        b += part[std::size_t((p * q.nch + k) * 2 + 1)];
      }
      psum[p] = a;
      psum[np + p] = b;
    }
  } else {
    const std::int64_t c = q.c;
    std::vector<double> part(std::size_t(q.units * 2 * c), 0.0);
    parallel_blocks(q.units, nthreads, [&](std::int64_t u) {
      const std::int64_t i = u / q.blocks, k = u % q.blocks;
      const std::int64_t r0 = k * q.rb, r1 = r0 + q.rb < q.rows ? r0 + q.rb : q.rows;
      cl(i, r0, r1, &part[std::size_t(u * 2 * c)]);
    });
    // Per column, blocks in order (walked block-major so that reads are contiguous).
    for (std::int64_t i = 0; i < q.pn; ++i) {
      double* pa = psum + i * c;
      double* pb = psum + np + i * c;
      for (std::int64_t ch = 0; ch < c; ++ch) pa[ch] = pb[ch] = 0.0;
      for (std::int64_t k = 0; k < q.blocks; ++k) {
        const double* pp = &part[std::size_t((i * q.blocks + k) * 2 * c)];
        for (std::int64_t ch = 0; ch < c; ++ch) {
          pa[ch] += pp[ch];
          pb[ch] += pp[c + ch];
        }
      }
    }
  }
}

// An elementwise pass over the same units: cf(p, j0, j1) or cl(i, r0, r1).
template <class CF, class CL>
void pointwise(const Geom& q, int nthreads, const CF& cf, const CL& cl) {
  if (q.units == 0) return;
  const std::int64_t np = q.nplanes();
  parallel_blocks(q.units, nthreads, [&](std::int64_t u) {
    if (!q.cl) {
      if (q.nch > 1) {
        const std::int64_t p = u / q.nch, k = u % q.nch;
        const std::int64_t j0 = k * q.chunk, j1 = j0 + q.chunk < q.s ? j0 + q.chunk : q.s;
        cf(p, j0, j1);
      } else {
        const std::int64_t p0 = u * q.ppu, p1 = p0 + q.ppu < np ? p0 + q.ppu : np;
        for (std::int64_t p = p0; p < p1; ++p) cf(p, std::int64_t(0), q.s);
      }
    } else {
      const std::int64_t i = u / q.blocks, k = u % q.blocks;
      const std::int64_t r0 = k * q.rb, r1 = r0 + q.rb < q.rows ? r0 + q.rb : q.rows;
      cl(i, r0, r1);
    }
  });
}

// The longest runs of channels-last sums (cl_runs): a period that fits one register tile keeps
// its double sums in registers over all the rows of a unit, instead of a call and a store of
// the sums every kRunRows rows: float32 batch_norm (32, 56, 56, 64) channels-last took
// 0.82-0.89x the time, (8, 56, 56, 32) 0.75-0.78x, group_norm alike, the backwards 0.84-0.99x,
// bfloat16 0.85-0.97x (AMD Zen 4).
inline std::int64_t sum_run_rows(const Geom& q) { return q.W <= kTile * kLanes<float> ? q.rows : kRunRows; }

// Channels-last rows [r0, r1) of plane row i as runs: run(base, nrows, len) covers nrows rows
// of len elements each, row r starting at element base + r * len of the tensor, whose columns
// line up with the period-W coefficient arrays: len == W (each "row" is m tensor rows, at most
// max_rows at a time) or len == c (the leftover tensor rows).
template <class Run>
inline void cl_runs(const Geom& q, std::int64_t i, std::int64_t r0, std::int64_t r1, const Run& run,
                    std::int64_t max_rows = kRunRows) {
  const std::int64_t off = (i * q.rows + r0) * q.c;
  const std::int64_t nsuper = (r1 - r0) / q.m, left = (r1 - r0) % q.m;
  for (std::int64_t k = 0; k < nsuper; k += max_rows)
    run(off + k * q.W, nsuper - k < max_rows ? nsuper - k : max_rows, q.W);
  if (left) run(off + nsuper * q.W, left, q.c);
}

// Elements from a channels-last output's rows [r0, r1) of plane row i to its first vector-aligned
// element, where its period-W rows all start that far off the vector width and can stream
// (W whole vectors); 0 where they are aligned or cannot be shifted.
template <class T>
inline std::int64_t cl_shift(const Geom& q, const T* out, std::int64_t i, std::int64_t r0, std::int64_t r1,
                             bool stream) {
  constexpr int L = kLanes<compute_t<T>>;
  constexpr std::uintptr_t width = L * sizeof(T);
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(out + (i * q.rows + r0) * q.c);
  if (!stream || L == 1 || q.W % L != 0 || (r1 - r0) / q.m == 0 || addr % sizeof(T) != 0) return 0;
  return std::int64_t((width - addr % width) % width / sizeof(T));
}

// cl_runs() for loops that write an output: run(base, nrows, len, k0), the coefficients of
// column j at index k0 + j of the period-W arrays, extended to W + L entries. With a shift
// (cl_shift), the period-W rows are walked `shift` elements later, so that every streamed vector
// is aligned: the first `shift` elements, then W-long rows with the coefficients rotated by
// shift (k0 = shift), then the last row's remaining W - shift elements. Every element gets the
// coefficients of its column, in the same arithmetic.
template <class Run>
inline void cl_out_runs(const Geom& q, std::int64_t i, std::int64_t r0, std::int64_t r1, std::int64_t shift,
                        const Run& run) {
  if (shift == 0) {
    cl_runs(q, i, r0, r1, [&](std::int64_t base, std::int64_t nr, std::int64_t len) { run(base, nr, len, 0); });
    return;
  }
  const std::int64_t off = (i * q.rows + r0) * q.c, W = q.W;
  const std::int64_t nsuper = (r1 - r0) / q.m, left = (r1 - r0) % q.m;
  run(off, 1, shift, 0);
  for (std::int64_t k = 0; k + 1 < nsuper; k += kRunRows)
    run(off + shift + k * W, nsuper - 1 - k < kRunRows ? nsuper - 1 - k : kRunRows, W, shift);
  run(off + (nsuper - 1) * W + shift, 1, W - shift, shift);
  if (left) run(off + nsuper * W, left, q.c, 0);
}

template <int NV>
using nv_t = std::integral_constant<int, NV>;

template <int NV, int Lanes, class F>
inline void tile_rest(std::int64_t rest, std::int64_t j, const F& f) {
  if constexpr (NV > 0) {
    if (rest == NV) f(nv_t<NV>{}, j);
    else tile_rest<NV - 1, Lanes>(rest, j, f);
  }
}

// Columns [0, len) as register tiles: f(nv_t<NV>, j) for tiles of NV vectors of Lanes columns
// starting at column j (MaxNV wide, then one narrower tile for the whole vectors left). Returns
// the first column left for scalar code. A row that fits one tile is walked row by row.
template <int MaxNV, int Lanes, class F>
inline std::int64_t for_tiles(std::int64_t len, const F& f) {
  std::int64_t j = 0;
  for (; j + MaxNV * Lanes <= len; j += MaxNV * Lanes) f(nv_t<MaxNV>{}, j);
  const std::int64_t rest = (len - j) / Lanes;
  tile_rest<MaxNV - 1, Lanes>(rest, j, f);
  return j + rest * Lanes;
}

// Repeats a[0..c) over a[0..W).
template <class U>
inline void periodic(U* a, std::int64_t c, std::int64_t W) {
  for (std::int64_t j = c; j < W; ++j) a[j] = a[j - c];
}

// Folds a period-W accumulator into c columns: out[ch] = sum over the m copies, in order.
inline void fold_period(const Geom& q, const double* acc, double* out) {
  if (q.m == 1) {
    std::copy(acc, acc + q.c, out);
    return;
  }
  for (std::int64_t ch = 0; ch < q.c; ++ch) {
    double a = acc[ch];
    for (std::int64_t t = 1; t < q.m; ++t) a += acc[t * q.c + ch];
    out[ch] = a;
  }
}

// ---- forward ------------------------------------------------------------------------------------

// Shifted sums of x[0..n) in double: out[0] += sum(x - k), out[1] += sum((x - k)^2), as the
// row norms sum them.
template <class T>
inline void shifted_sums_wide(const T* x, std::int64_t n, double k, double* out) {
  const ShiftedSums t = shifted_sums_wide<true>(x, n, k);
  out[0] += t.s;
  out[1] += t.q;
}

// The same sums; float data (and half data, as floats) on SIMD targets take the differences and
// squares in float lanes, kRowFlushEvery vectors per lane at most (two chains of half as many;
// half data twice that in four chains, as HalfRowSums), before adding them into double (as
// row_moments_f32). k is set_shift(), so float(k) is exact.
// The float squares lose digits when k lies far from the mean, or overflow:
// float_sums_trusted() tells, from the result, when a set must be summed again in double
// about its mean.
template <class T>
inline void shifted_sums(const T* x, std::int64_t n, double k, double* out) {
#if NL_VEC_BYTES
  if constexpr (std::is_same<compute_t<T>, float>::value) {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    const V vk = splat<V>(float(k));
    V s0{}, s1{}, q0{}, q1{};
    vwide ds{}, dq{};
    std::int64_t j = 0;
    int run = 0;
    if constexpr (kHalf<T>) {  // four chains, flushed every 2 * kRowFlushEvery vectors (HalfRowSums)
      while (j + 4 * L <= n) {
        V s2{}, s3{}, q2{}, q3{};
#pragma GCC unroll 4
        for (int t = 0; t < kRowFlushEvery / 2 && j + 4 * L <= n; ++t, j += 4 * L) {
          const V d0 = minus_on_fma(load<V>(x + j), vk), d1 = minus_on_fma(load<V>(x + j + L), vk);
          const V d2 = minus_on_fma(load<V>(x + j + 2 * L), vk), d3 = minus_on_fma(load<V>(x + j + 3 * L), vk);
          s0 += d0;
          s1 += d1;
          s2 += d2;
          s3 += d3;
          q0 = fmadd(d0, d0, q0);
          q1 = fmadd(d1, d1, q1);
          q2 = fmadd(d2, d2, q2);
          q3 = fmadd(d3, d3, q3);
        }
        ds += widen_sum((s0 + s1) + (s2 + s3));
        dq += widen_sum((q0 + q1) + (q2 + q3));
        s0 = s1 = q0 = q1 = V{};
      }
    }
    for (; j + 2 * L <= n; j += 2 * L) {
      const V a = minus_on_fma(load<V>(x + j), vk), b = minus_on_fma(load<V>(x + j + L), vk);
      s0 += a;
      s1 += b;
      q0 = fmadd(a, a, q0);
      q1 = fmadd(b, b, q1);
      if (++run == kRowFlushEvery / 2) {
        ds += widen_sum(s0 + s1);
        dq += widen_sum(q0 + q1);
        s0 = s1 = q0 = q1 = V{};
        run = 0;
      }
    }
    if (j + L <= n) {  // one more vector: planes like 28 x 28 leave 16 of 784
      const V a = minus_on_fma(load<V>(x + j), vk);
      s0 += a;
      q0 = fmadd(a, a, q0);
      j += L;
      ++run;
    }
    if (run) {
      ds += widen_sum(s0 + s1);
      dq += widen_sum(q0 + q1);
    }
    double ts = 0, tq = 0;
    for (; j < n; ++j) {
      const double d = double(to_c(x[j])) - k;
      ts += d;
      tq += d * d;
    }
    out[0] += ts + lane_sum(ds);
    out[1] += tq + lane_sum(dq);
    return;
  }
#endif
  shifted_sums_wide(x, n, k, out);
}

// Whether shifted_sums() of a set with these moments (md = mean - shift, var biased) kept its
// digits: the shift within a few standard deviations of the mean, and float squares far from
// overflow and underflow (or all zero: a constant set, summed exactly).
inline bool float_sums_trusted(double md, double var) {
  const double mean_square = var + md * md;
#if NL_VEC_BYTES
  return md * md <= kRecenterRatio * var &&
         (mean_square == 0 || (mean_square >= kFloatSquaresMin && mean_square <= kFloatSquaresMax));
#else
  (void)mean_square;
  return true;  // baseline sums in double
#endif
}

// Whether T's sums go through float lanes (float and half data on SIMD targets).
template <class T>
constexpr bool kFloatSums = NL_VEC_BYTES > 0 && std::is_same<compute_t<T>, float>::value;

#if NL_VEC_BYTES
// Channels-last float sums add this many rows per lane in float before widening them into
// double: the widening (conversions and double additions) cost as much as the float sums at 4.
constexpr std::int64_t kFloatRows = 8;

// The register tiles of channels-last float sums over nr rows of len columns (row stride len)
// that fit one tile: for each tile of NV float vectors at column j0, group(nv, e0, rows, c, s, q)
// gives the float sums s, q of up to kFloatRows rows from element e0, c being the tile's per-column
// constants from k; they are widened into double sums kept in registers for the whole run,
// then added into sa/qa. Returns the first column left for scalar code.
template <class Group>
__attribute__((always_inline)) inline std::int64_t cl_tile_sums(std::int64_t nr, std::int64_t len, const float* k,
                                                                double* sa, double* qa, const Group& group) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  return for_tiles<kTile, L>(len, [&](auto nv, std::int64_t j0) {
    constexpr int NV = decltype(nv)::value;
    V c[NV];
    vwide ds[2 * NV], dq[2 * NV];
    for (int t = 0; t < NV; ++t) {
      c[t] = load<V>(k + j0 + t * L);
      ds[2 * t] = ds[2 * t + 1] = dq[2 * t] = dq[2 * t + 1] = vwide{};
    }
    for (std::int64_t r = 0; r < nr; r += kFloatRows) {
      V sv[NV], qv[NV];
      group(nv, r * len + j0, nr - r < kFloatRows ? int(nr - r) : int(kFloatRows), c, sv, qv);
      for (int t = 0; t < NV; ++t) {
        ds[2 * t] += widen_low(sv[t]);
        ds[2 * t + 1] += widen_high(sv[t]);
        dq[2 * t] += widen_low(qv[t]);
        dq[2 * t + 1] += widen_high(qv[t]);
      }
    }
    for (int t = 0; t < 2 * NV; ++t) {
      store(sa + j0 + t * kWide, load<vwide>(sa + j0 + t * kWide) + ds[t]);
      store(qa + j0 + t * kWide, load<vwide>(qa + j0 + t * kWide) + dq[t]);
    }
  });
}
#endif

// cl_float_sums() of rows that fit one register tile: the double sums stay in registers for
// the whole run and the rows are read in order.
template <class T>
__attribute__((noinline)) void cl_float_sums_tile(const T* xb, std::int64_t nr, std::int64_t len,
                                                  const float* kf, double* sa, double* qa) {
#if NL_VEC_BYTES
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  // sum (x - k) and sum (x - k)^2 of `rows` rows from element e0
  auto group = [&](auto nv, std::int64_t e0, int rows, const V* kv, V* sv, V* qv) {
    constexpr int NV = decltype(nv)::value;
    for (int t = 0; t < NV; ++t) {
      prefetch_ahead(xb + e0 + t * L);
      sv[t] = minus_on_fma(load<V>(xb + e0 + t * L), kv[t]);
      qv[t] = sv[t] * sv[t];
    }
    for (int u = 1; u < rows; ++u)
      for (int t = 0; t < NV; ++t) {
        prefetch_ahead(xb + e0 + u * len + t * L);
        const V d = minus_on_fma(load<V>(xb + e0 + u * len + t * L), kv[t]);
        sv[t] += d;
        qv[t] = fmadd(d, d, qv[t]);
      }
  };
  const std::int64_t j = cl_tile_sums(nr, len, kf, sa, qa, group);
  for (std::int64_t jj = j; jj < len; ++jj)
    for (std::int64_t r = 0; r < nr; ++r) {
      const double d = double(to_c(xb[r * len + jj])) - double(kf[jj]);
      sa[jj] += d;
      qa[jj] += d * d;
    }
#else
  (void)xb, (void)nr, (void)len, (void)kf, (void)sa, (void)qa;
#endif
}

// Channels-last shifted sums in float lanes: nr rows of len elements at xb (row stride len),
// columns lined up with the float shifts kf; sa[j] += sum (x - k), qa[j] += sum (x - k)^2 for
// j < len. kFloatRows rows at a time are summed in float and widened into the double sums (rows that
// fit one register tile: see cl_float_sums_tile), down the columns, each vector of the next
// kFloatRows rows fetched meanwhile. Returns false (nothing done) where T's sums
// are not float. Not inlined: inlined into set_moments, it slowed the row-major loop by 5-8%.
template <class T>
__attribute__((noinline)) bool cl_float_sums(const T* xb, std::int64_t nr, std::int64_t len, const float* kf,
                                             double* sa, double* qa) {
#if NL_VEC_BYTES
  if constexpr (kFloatSums<T>) {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    if (len <= kTile * L) {
      cl_float_sums_tile(xb, nr, len, kf, sa, qa);
      return true;
    }
    auto add_wide = [](double* a, V v) {
      store(a, load<vwide>(a) + widen_low(v));
      store(a + kWide, load<vwide>(a + kWide) + widen_high(v));
    };
    std::int64_t r = 0;
    for (; r < nr; r += kFloatRows) {
      const int rows = nr - r < kFloatRows ? int(nr - r) : int(kFloatRows);
      const T* xr = xb + r * len;
      std::int64_t j = 0;
      for (; j + L <= len; j += L) {
        const V k = load<V>(kf + j);
        __builtin_prefetch(xr + kFloatRows * len + j);
        V sv = minus_on_fma(load<V>(xr + j), k);
        V qv = sv * sv;
        for (int t = 1; t < rows; ++t) {
          __builtin_prefetch(xr + (t + kFloatRows) * len + j);
          const V d = minus_on_fma(load<V>(xr + t * len + j), k);
          sv += d;
          qv = fmadd(d, d, qv);
        }
        add_wide(sa + j, sv);
        add_wide(qa + j, qv);
      }
      for (; j < len; ++j)
        for (int t = 0; t < rows; ++t) {
          const double d = double(to_c(xr[t * len + j])) - double(kf[j]);
          sa[j] += d;
          qa[j] += d * d;
        }
    }
    return true;
  }
#endif
  (void)xb, (void)nr, (void)len, (void)kf, (void)sa, (void)qa;
  return false;
}

// The shift of a set's sums: the mean of up to 16 of its first elements (along one channel),
// rounded to the compute type so that float lanes subtract it exactly. A shift near the mean
// keeps the shifted values small: with the set's first element alone, one set in twenty of
// normal data fails float_sums_trusted() and goes through double sums again.
// shift_elems() is how many elements, shift_of() the shift from their sum.
inline std::int64_t shift_elems(const Geom& q) {
  const std::int64_t run = q.cl && q.batch ? q.rows : q.s;
  return run < 16 ? run : 16;
}
template <class T>
double shift_of(double sum, std::int64_t k) {
  return k ? double(compute_t<T>(sum / double(k))) : 0.0;
}

// The shift of set st.
template <class T>
double set_shift(const Geom& q, const T* x, std::int64_t st) {
  const std::int64_t first = q.set_first(st), stride = q.cl ? q.c : 1, k = shift_elems(q);
  double sum = 0;
  for (std::int64_t i = 0; i < k; ++i) sum += double(to_c(x[first + i * stride]));
  return shift_of<T>(sum, k);
}

// set_shift() of every set. Channels-last sets of one sample (or, for batch norm, all
// channels) go together: row by row, each set's sum in its own accumulator, so the additions are
// those of set_shift() in the same order, with the sets' chains side by side instead of one
// after another (instance norm has a set per sample and channel).
template <class T>
void set_shifts(const Geom& q, const T* x, double* shift) {
  if (!q.cl) {
    for (std::int64_t st = 0; st < q.nsets; ++st) shift[st] = set_shift(q, x, st);
    return;
  }
  const std::int64_t per = q.batch ? q.c : q.g, cg = q.batch ? 1 : q.cg, samples = q.batch ? 1 : q.n;
  const std::int64_t k = shift_elems(q);
  std::vector<double> acc(static_cast<std::size_t>(per));
  for (std::int64_t i = 0; i < samples; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (std::int64_t r = 0; r < k; ++r) {
      const T* row = x + (i * q.s + r) * q.c;
      for (std::int64_t j = 0; j < per; ++j) acc[std::size_t(j)] += double(to_c(row[j * cg]));
    }
    for (std::int64_t j = 0; j < per; ++j) shift[i * per + j] = shift_of<T>(acc[std::size_t(j)], k);
  }
}

// Channels-last units fill per-channel arrays (a period long) for their plane row before its
// rows. Where the arrays of every plane row take at most this many values per array, they are
// filled once, before the units, and shared (batch norm has one plane row, a fused group norm
// sample one). Filled by each unit, they were about a tenth of group_norm (8, 28, 28, 256).
constexpr std::int64_t kSharedRowCoefs = std::int64_t(64) << 10;

// Shared arrays of at least this many channels in all are filled by the kernel's threads (a
// serial fill of many plane rows would idle the others).
constexpr std::int64_t kParallelFillChannels = std::int64_t(8) << 10;

// `stride` values of U per plane row (arrays of `period` values), as fill(i, dst) writes them
// for plane row i: shared where small (kSharedRowCoefs), else filled by each unit into its own.
template <class U, class Fill>
class PlaneRowArrays {
 public:
  PlaneRowArrays(const Geom& q, std::int64_t stride, std::int64_t period, const Fill& fill, int nthreads)
      : stride_(stride), fill_(fill) {
    if (!q.cl || q.units == 0 || stride == 0 || q.pn * period > kSharedRowCoefs) return;
    shared_ = std::vector<U>(std::size_t(q.pn * stride));  // not resize(): see check_target_symbols.sh
    parallel_blocks(q.pn, q.pn * q.c >= kParallelFillChannels ? nthreads : 1,
                    [&](std::int64_t i) { fill(i, shared_.data() + i * stride); });
  }
  // Plane row i's values: the shared ones, or filled into own.
  const U* row(std::int64_t i, std::vector<U>& own) const {
    if (!shared_.empty()) return shared_.data() + i * stride_;
    own = std::vector<U>(std::size_t(stride_));
    fill_(i, own.data());
    return own.data();
  }

 private:
  std::int64_t stride_;
  const Fill& fill_;
  std::vector<U> shared_;
};

template <class U, class Fill>
PlaneRowArrays<U, Fill> plane_row_arrays(const Geom& q, std::int64_t stride, std::int64_t period, const Fill& fill,
                                         int nthreads) {
  return PlaneRowArrays<U, Fill>(q, stride, period, fill, nthreads);
}

// Per-set mean and 1 / sqrt(var + eps) (biased var) of x, in double; var also returned.
template <class T>
void set_moments(const Geom& q, const T* x, double eps, int nthreads, double* mean, double* rstd,
                 double* var, const double* recenter = nullptr) {
  const std::int64_t np = q.nplanes(), c = q.c;
  std::vector<double> shift(std::size_t(q.nsets));
  if (recenter) std::copy(recenter, recenter + q.nsets, shift.begin());
  else set_shifts(q, x, shift.data());
  std::vector<double> psum(std::size_t(2 * np));
  // Channels-last: the shift of each column over a period, in double and, for float sums, in
  // float (exact: set_shift()).
  const bool use_float = kFloatSums<T> && !recenter;
  auto fill_shifts = [&](std::int64_t i, auto* k) {
    for (std::int64_t j = 0; j < c; ++j) k[j] = shift[std::size_t(q.set_of(i, j))];
    periodic(k, c, q.W);
  };
  const auto shifts = plane_row_arrays<double>(q, q.W, q.W, fill_shifts, nthreads);
  const auto float_shifts = plane_row_arrays<float>(q, use_float ? q.W : 0, q.W, fill_shifts, nthreads);
  plane_sums(
      q, nthreads, psum.data(),
      [&](std::int64_t p, std::int64_t j0, std::int64_t j1, double* out) {
        const double k = shift[std::size_t(q.set_of(p / c, p % c))];
        if (recenter) shifted_sums_wide(x + p * q.s + j0, j1 - j0, k, out);
        else shifted_sums(x + p * q.s + j0, j1 - j0, k, out);
      },
      [&](std::int64_t i, std::int64_t r0, std::int64_t r1, double* out) {
        const std::int64_t W = q.W;
        std::vector<double> buf(std::size_t(2 * W), 0.0);
        double* sa = buf.data();
        double* qa = sa + W;
        std::vector<double> own;
        std::vector<float> own_float;
        const double* k = shifts.row(i, own);
        const float* kf = use_float ? float_shifts.row(i, own_float) : nullptr;
        cl_runs(q, i, r0, r1, [&](std::int64_t base, std::int64_t nr, std::int64_t len) {
          const T* xb = x + base;
          if (kf && cl_float_sums(xb, nr, len, kf, sa, qa)) return;
          if (len > 2 * kTile * kWide) {
            // Wide rows: row-major, sums in L1 (they take no aliasing stalls: no stores stream).
            std::int64_t r = 0;
            for (; r + 4 <= nr; r += 4) {
              const T* xr = xb + r * len;
              std::int64_t j = 0;
              for (; j + kWide <= len; j += kWide) {
                const vwide kv = load<vwide>(k + j);
                const vwide d0 = load_wide(xr + j) - kv, d1 = load_wide(xr + len + j) - kv;
                const vwide d2 = load_wide(xr + 2 * len + j) - kv, d3 = load_wide(xr + 3 * len + j) - kv;
                store(sa + j, load<vwide>(sa + j) + ((d0 + d1) + (d2 + d3)));
                store(qa + j, load<vwide>(qa + j) + ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)));
              }
              for (; j < len; ++j) {
                const double d0 = double(to_c(xr[j])) - k[j], d1 = double(to_c(xr[len + j])) - k[j];
                const double d2 = double(to_c(xr[2 * len + j])) - k[j], d3 = double(to_c(xr[3 * len + j])) - k[j];
                sa[j] += (d0 + d1) + (d2 + d3);
                qa[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
              }
            }
            for (; r < nr; ++r) {
              const T* xr = xb + r * len;
              std::int64_t j = 0;
              for (; j + kWide <= len; j += kWide) {
                const vwide d = load_wide(xr + j) - load<vwide>(k + j);
                store(sa + j, load<vwide>(sa + j) + d);
                store(qa + j, load<vwide>(qa + j) + d * d);
              }
              for (; j < len; ++j) {
                const double d = double(to_c(xr[j])) - k[j];
                sa[j] += d;
                qa[j] += d * d;
              }
            }
            return;
          }
          const std::int64_t j = for_tiles<2 * kTile, kWide>(len, [&](auto nv, std::int64_t j0) {
            constexpr int NV = decltype(nv)::value;
            vwide kv[NV], sv[NV], qv[NV];
            for (int t = 0; t < NV; ++t) {
              kv[t] = load<vwide>(k + j0 + t * kWide);
              sv[t] = vwide{};
              qv[t] = vwide{};
            }
            for (std::int64_t r = 0; r < nr; ++r)
              for (int t = 0; t < NV; ++t) {
                const vwide d = load_wide(xb + r * len + j0 + t * kWide) - kv[t];
                sv[t] += d;
                qv[t] += d * d;
              }
            for (int t = 0; t < NV; ++t) {
              store(sa + j0 + t * kWide, load<vwide>(sa + j0 + t * kWide) + sv[t]);
              store(qa + j0 + t * kWide, load<vwide>(qa + j0 + t * kWide) + qv[t]);
            }
          });
          for (std::int64_t jj = j; jj < len; ++jj) {
            const std::int64_t j = jj;
            double sv = 0, qv = 0;
            for (std::int64_t r = 0; r < nr; ++r) {
              const double d = double(to_c(xb[r * len + j])) - k[j];
              sv += d;
              qv += d * d;
            }
            sa[j] += sv;
            qa[j] += qv;
          }
        }, sum_run_rows(q));
        fold_period(q, sa, out);
        fold_period(q, qa, out + c);
      });
  // Sets: planes in order (batch: n = 0.., group: its channels in order).
  std::vector<std::int64_t> redo(std::size_t(q.nsets));  // the first nredo of them
  std::size_t nredo = 0;
  for (std::int64_t st = 0; st < q.nsets; ++st) {
    double s = 0, sq = 0;
    if (q.batch) {
      for (std::int64_t i = 0; i < q.pn; ++i) {
        s += psum[std::size_t(i * c + st)];
        sq += psum[std::size_t(np + i * c + st)];
      }
    } else {
      const std::int64_t p0 = (st / q.g) * c + (st % q.g) * q.cg;
      for (std::int64_t j = 0; j < q.cg; ++j) {
        s += psum[std::size_t(p0 + j)];
        sq += psum[std::size_t(np + p0 + j)];
      }
    }
    const double md = s / q.count;
    double v = sq / q.count - md * md;
    if (!(v > 0)) v = v != v ? v : 0.0;  // keep NaN, clamp rounding below zero
    mean[st] = shift[std::size_t(st)] + md;
    var[st] = v;
    rstd[st] = 1.0 / std::sqrt(v + eps);
    if (kFloatSums<T> && !recenter && !float_sums_trusted(md, v)) redo[nredo++] = st;
  }
  // Sums went through float lanes: the sets they failed are summed again in double about their
  // mean (rare, and decided by each set's data alone, as fused_forward does), so that a NaN or a
  // far-off shift in one set leaves every other set's bits alone.
  if (nredo > 0) {
    std::vector<double> centre(shift), again(std::size_t(3 * q.nsets));
    for (std::size_t k = 0; k < nredo; ++k) {  // a mean lost to float overflow: the old shift
      const std::int64_t st = redo[k];
      if (std::isfinite(mean[st])) centre[std::size_t(st)] = mean[st];
    }
    double* const mean2 = again.data();
    double* const rstd2 = mean2 + q.nsets;
    double* const var2 = rstd2 + q.nsets;
    set_moments(q, x, eps, nthreads, mean2, rstd2, var2, centre.data());
    for (std::size_t k = 0; k < nredo; ++k) {
      const std::int64_t st = redo[k];
      mean[st] = mean2[st];
      rstd[st] = rstd2[st];
      var[st] = var2[st];
    }
  }
}

// Elements of a span of n at y written one by one before its vectors, so that streamed vectors
// are aligned (stream_head); stream is cleared for spans too short to stream.
template <class T>
inline std::int64_t span_head(const T* y, std::int64_t n, bool& stream) {
  const std::int64_t head = stream ? stream_head(y, n) : -1;
  if (head < 0) stream = false;
  return head > 0 ? head : 0;
}

// y = ((x - head) - tail) * scale + bias over n elements (scalar coefficients); streamed past
// the caches with stream (the scalar and vector arithmetic round alike).
template <class T, class C = compute_t<T>>
inline void normalize_span(const T* x, T* y, std::int64_t n, C head, C tail, C scale, C bias, bool stream) {
  using V = vnative<C>;
  constexpr int L = kLanes<C>;
  const V vh = splat<V>(head), vt = splat<V>(tail), vs = splat<V>(scale), vb = splat<V>(bias);
  auto one = [&](std::int64_t j) { y[j] = narrow<T>(((to_c(x[j]) - head) - tail) * scale + bias); };
  std::int64_t j = 0;
  for (const std::int64_t h = span_head(y, n, stream); j < h; ++j) one(j);
  const std::int64_t whole_end = j + (n - j) / L * L;
  store_out_vectors(y, j, whole_end, stream, [&](std::int64_t k, int) __attribute__((always_inline)) {
    return V(((load<V>(x + k) - vh) - vt) * vs + vb);
  });
  for (j = whole_end; j < n; ++j) one(j);
}

// Whether a channel norm writes its output (x's size) past the caches: from stream_min_bytes(),
// as the row norms do for rows that fill L1 (x and the output cannot both stay in the cache).
template <class T>
inline bool stream_output(const Geom& q) {
  return double(q.n) * double(q.s) * double(q.c) * double(sizeof(T)) >= double(stream_min_bytes());
}

// y = (x - mean) * rstd * w + b with per-set mean/rstd and per-channel w/b (either may be null).
template <class T, class C = compute_t<T>>
void normalize(const Geom& q, const T* x, const C* w, const C* b, T* y, const double* mean,
               const double* rstd, int nthreads, bool stream) {
  const std::int64_t c = q.c;
  auto coef = [&](std::int64_t i, std::int64_t ch, C& head, C& tail, C& scale, C& bias) {
    const std::int64_t st = q.set_of(i, ch);
    head = C(mean[st]);
    tail = C(mean[st] - double(head));
    scale = C(rstd[st] * (w ? double(w[ch]) : 1.0));
    bias = b ? b[ch] : C(0);
  };
  // Channels-last: y = (x - head) * scale + (bias - tail * scale), three coefficient loads per
  // vector, from arrays of a period and a vector more (for shifted rows): hd, then sc and bs.
  const std::int64_t P = q.W + kLanes<C>;
  auto fill_row = [&](std::int64_t i, C* hd) {
    C* sc = hd + P;
    C* bs = sc + P;
    for (std::int64_t j = 0; j < c; ++j) {
      C tail;
      coef(i, j, hd[j], tail, sc[j], bs[j]);
      bs[j] = C(double(bs[j]) - double(tail) * double(sc[j]));
    }
    periodic(hd, c, P);
    periodic(sc, c, P);
    periodic(bs, c, P);
  };
  const auto coefs = plane_row_arrays<C>(q, 3 * P, P, fill_row, nthreads);
  pointwise(
      q, nthreads,
      [&](std::int64_t p, std::int64_t j0, std::int64_t j1) {
        C head, tail, scale, bias;
        coef(p / c, p % c, head, tail, scale, bias);
        normalize_span(x + p * q.s + j0, y + p * q.s + j0, j1 - j0, head, tail, scale, bias, stream);
        if (stream) stream_fence();
      },
      [&](std::int64_t i, std::int64_t r0, std::int64_t r1) {
        using V = vnative<C>;
        constexpr int L = kLanes<C>;
        std::vector<C> own;
        const C* hd = coefs.row(i, own);
        const C* sc = hd + P;
        const C* bs = sc + P;
        constexpr int TV = 2 * kTile * kWide / L > 0 ? 2 * kTile * kWide / L : 1;  // T vectors per tile
        const std::int64_t shift = cl_shift(q, y, i, r0, r1, stream);
        cl_out_runs(q, i, r0, r1, shift, [&](std::int64_t base, std::int64_t nr, std::int64_t len, std::int64_t k0) {
          const T* xb = x + base;
          T* yb = y + base;
          // local copies: store() may alias anything, so captured pointers are reloaded after it
          const C* const hdl = hd + k0;
          const C* const scl = sc + k0;
          const C* const bsl = bs + k0;
          if (len > 2 * TV * L) {
            // Wide rows: row by row, the coefficients reloaded from L1 for every vector. Four
            // rows per coefficient load took 1.6-1.8x the time on Intel (Emerald Rapids).
            for (std::int64_t r = 0; r < nr; ++r) {
              const std::int64_t whole_end = len / L * L;
              T* const yr = yb + r * len;
              const T* const xr = xb + r * len;
              store_out_vectors(yr, 0, whole_end, stream, [&](std::int64_t j, int) __attribute__((always_inline)) {
                prefetch_ahead(xr + j);
                return V((load<V>(xr + j) - load<V>(hdl + j)) * load<V>(scl + j) + load<V>(bsl + j));
              });
              for (std::int64_t j = whole_end; j < len; ++j) {
                const std::int64_t e = r * len + j;
                yb[e] = narrow<T>((to_c(xb[e]) - hdl[j]) * scl[j] + bsl[j]);
              }
            }
            return;
          }
          const std::int64_t j = for_tiles<TV, L>(len, [&](auto nv, std::int64_t j0) {
            constexpr int NV = decltype(nv)::value;
            V h[NV], sv[NV], bv[NV];
            for (int t = 0; t < NV; ++t) {
              h[t] = load<V>(hdl + j0 + t * L);
              sv[t] = load<V>(scl + j0 + t * L);
              bv[t] = load<V>(bsl + j0 + t * L);
            }
            for (std::int64_t r = 0; r < nr; ++r) {
              V out[NV];
              for (int t = 0; t < NV; ++t) {
                const std::int64_t e = r * len + j0 + t * L;
                prefetch_ahead(xb + e);
                out[t] = (load<V>(xb + e) - h[t]) * sv[t] + bv[t];
              }
              put_vectors<T>(out, [&](int t, V v, bool normal) __attribute__((always_inline)) {
                store_out(yb + r * len + j0 + t * L, v, stream, normal);
              });
            }
          });
          for (std::int64_t jj = j; jj < len; ++jj) {
            const std::int64_t j = jj;
            const C h = hdl[j], sv = scl[j], bv = bsl[j];
            for (std::int64_t r = 0; r < nr; ++r) yb[r * len + j] = narrow<T>((to_c(xb[r * len + j]) - h) * sv + bv);
          }
        });
        if (stream) stream_fence();
      });
}

// ---- backward -----------------------------------------------------------------------------------

// The two halves of a float vector, widened to double.
inline void widen(vnative<float> v, vwide& lo, vwide& hi) {
  float t[kLanes<float>];
  store(t, v);
  lo = load_wide(t);
  hi = load_wide(t + kWide);
}

// Gradient sums of float data take four vectors at a time in float (dy, and dy * (x - head)
// with head = float(mean): exact or rounded once) before adding them up in double: a relative
// error of a few 2^-24 per four terms, far below what float32 gradients carry, for half the
// work of converting every element. Set to false to sum every element in double.
constexpr bool kFloatGradPartials = true;
// Whether T's gradient sums take those float partials (float and half data on SIMD targets).
template <class T>
constexpr bool kFloatGradSums = kFloatSums<T> && kFloatGradPartials && kLanes<float> >= 2 * kWide;

// out[0] += sum(dy), out[1] += sum(dy * (x - mean)) over n elements; Wide: every element in
// double (for a plane whose float partials overflowed).
template <class T, bool Wide = false>
inline void grad_sums(const T* dy, const T* x, std::int64_t n, double mean, double* out) {
  vwide a0{}, a1{}, b0{}, b1{};
  std::int64_t j = 0;
  double a = 0, b = 0;
  if constexpr (kFloatGradSums<T> && !Wide) {
    using V = vnative<float>;
    constexpr int L = kLanes<float>;
    const float head = float(mean);
    const V vh = splat<V>(head);
    vwide ta0{}, ta1{}, tb0{}, tb1{};
    for (; j + 4 * L <= n; j += 4 * L) {
      const V g0 = load<V>(dy + j), g1 = load<V>(dy + j + L);
      const V g2 = load<V>(dy + j + 2 * L), g3 = load<V>(dy + j + 3 * L);
      const V d0 = load<V>(x + j) - vh, d1 = load<V>(x + j + L) - vh;
      const V d2 = load<V>(x + j + 2 * L) - vh, d3 = load<V>(x + j + 3 * L) - vh;
      vwide lo, hi;
      widen((g0 + g1) + (g2 + g3), lo, hi);
      ta0 += lo;
      ta1 += hi;
      widen((g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3), lo, hi);
      tb0 += lo;
      tb1 += hi;
    }
    // sum dy * (x - mean) = sum dy * (x - head) - (mean - head) * sum dy
    const double sa = lane_sum(ta0 + ta1), sb = lane_sum(tb0 + tb1);
    a = sa;
    b = sb - (mean - double(head)) * sa;
  }
  const vwide vm = splat<vwide>(mean);
  for (; j + 2 * kWide <= n; j += 2 * kWide) {
    const vwide d0 = load_wide(dy + j), d1 = load_wide(dy + j + kWide);
    a0 += d0;
    a1 += d1;
    b0 += d0 * (load_wide(x + j) - vm);
    b1 += d1 * (load_wide(x + j + kWide) - vm);
  }
  for (; j < n; ++j) {
    const double d = double(to_c(dy[j]));
    a += d;
    b += d * (double(to_c(x[j])) - mean);
  }
  out[0] += a + lane_sum(a0 + a1);
  out[1] += b + lane_sum(b0 + b1);
}

// Channels-last gradient sums of float data on SIMD targets (kFloatGradSums): aa[j] += sum dy
// and ba[j] += sum dy * (x - h[j]) over nr rows of len elements (row stride len), kFloatRows
// rows at a time in float, then widened into double sums: kept in registers for the whole run
// when the row fits one register tile (the rows are then read in order), else added into aa/ba
// every kFloatRows rows. Out of line, as cl_float_sums.
template <class T>
__attribute__((noinline)) void cl_float_grad_sums(const T* xb, const T* db, std::int64_t nr, std::int64_t len,
                                                  const float* h, double* aa, double* ba) {
#if NL_VEC_BYTES
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  // Rows [r0, r1) of column j, in double.
  auto scalar_column = [&](std::int64_t j, std::int64_t r0, std::int64_t r1) {
    double sa = 0, sb = 0;
    for (std::int64_t r = r0; r < r1; ++r) {
      const double d = double(to_c(db[r * len + j]));
      sa += d;
      sb += d * (double(to_c(xb[r * len + j])) - double(h[j]));
    }
    aa[j] += sa;
    ba[j] += sb;
  };
  // sum dy and sum dy * (x - h) of `rows` rows from element e0, over NV vectors of columns.
  auto float_rows = [&](auto nv, std::int64_t e0, int rows, const V* hv, V* sa, V* sb) {
    constexpr int NV = decltype(nv)::value;
    for (int t = 0; t < NV; ++t) {
      prefetch_ahead(db + e0 + t * L);
      prefetch_ahead(xb + e0 + t * L);
      const V g = load<V>(db + e0 + t * L);
      sa[t] = g;
      sb[t] = g * (load<V>(xb + e0 + t * L) - hv[t]);
    }
    for (int u = 1; u < rows; ++u)
      for (int t = 0; t < NV; ++t) {
        const std::int64_t e = e0 + u * len + t * L;
        prefetch_ahead(db + e);
        prefetch_ahead(xb + e);
        const V g = load<V>(db + e);
        sa[t] += g;
        sb[t] = fmadd(g, load<V>(xb + e) - hv[t], sb[t]);
      }
  };
  if (len <= kTile * L) {
    const std::int64_t j = cl_tile_sums(nr, len, h, aa, ba, float_rows);
    for (std::int64_t jj = j; jj < len; ++jj) scalar_column(jj, 0, nr);
    return;
  }
  for (std::int64_t r = 0; r < nr; r += kFloatRows) {
    const int rows = nr - r < kFloatRows ? int(nr - r) : int(kFloatRows);
    std::int64_t j = 0;
    for (; j + L <= len; j += L) {
      const V hv = load<V>(h + j);
      V sa, sb;
      float_rows(nv_t<1>{}, r * len + j, rows, &hv, &sa, &sb);
      store(aa + j, load<vwide>(aa + j) + widen_low(sa));
      store(aa + j + kWide, load<vwide>(aa + j + kWide) + widen_high(sa));
      store(ba + j, load<vwide>(ba + j) + widen_low(sb));
      store(ba + j + kWide, load<vwide>(ba + j + kWide) + widen_high(sb));
    }
    for (; j < len; ++j) scalar_column(j, r, r + rows);
  }
#else
  (void)xb, (void)db, (void)nr, (void)len, (void)h, (void)aa, (void)ba;
#endif
}

// Planes whose float gradient partials overflowed (dy * (x - mean) past the float limit, while
// the sums in double are finite; or NaN/Inf data) take their sums again with every element in
// double: sum_wide(sums) writes every plane's, and the failed planes' are copied into psum. The
// choice depends on each plane's data alone, so the other planes keep their bits.
template <class SumWide>
void resum_overflowed_planes(std::int64_t np, double* psum, const SumWide& sum_wide) {
  auto failed = [&](std::int64_t p) { return !std::isfinite(psum[p]) || !std::isfinite(psum[np + p]); };
  std::int64_t p = 0;
  while (p < np && !failed(p)) ++p;
  if (p == np) return;
  std::vector<double> again(std::size_t(2 * np));
  sum_wide(again.data());
  for (; p < np; ++p)
    if (failed(p)) {
      psum[p] = again[std::size_t(p)];
      psum[np + p] = again[std::size_t(np + p)];
    }
}

// dx = rstd * (w * dy - c0 - (x - mean) * b1), with c0 = mean(g) and b1 = rstd * mean(g * xhat)
// (both 0 without training), evaluated in C as r * ((w * dy + nc) + (head - x) * b) with head =
// C(mean) and nc = (mean - head) * b1 - c0, so that x - head keeps its digits when |mean| >> std
// (as the forward does). rstd multiplies last: an rstd over 1 cannot overflow a product whose dx
// is in range (as in the row norms).
template <class C>
struct GradCoef {
  C head, w, nc, b, r;
};

template <class C>
inline GradCoef<C> grad_coef(double mean, double rstd, double w, double c0, double b1) {
  const C head = C(mean);
  return {head, C(w), C((mean - double(head)) * b1 - c0), C(b1), C(rstd)};
}

template <class V>
__attribute__((always_inline)) inline V grad_value(V dy, V x, V head, V w, V nc, V b, V r) {
  return r * fmadd(b, head - x, fmadd(w, dy, nc));
}

template <class T, class C = compute_t<T>>
inline void grad_span(const T* dy, const T* x, T* dx, std::int64_t n, const GradCoef<C>& k, bool stream) {
  using V = vnative<C>;
  constexpr int L = kLanes<C>;
  const V vh = splat<V>(k.head), vw = splat<V>(k.w), vnc = splat<V>(k.nc), vb = splat<V>(k.b), vr = splat<V>(k.r);
  auto one = [&](std::int64_t j) {
    dx[j] = narrow<T>(grad_value(to_c(dy[j]), to_c(x[j]), k.head, k.w, k.nc, k.b, k.r));
  };
  std::int64_t j = 0;
  for (const std::int64_t h = span_head(dx, n, stream); j < h; ++j) one(j);
  const std::int64_t whole_end = j + (n - j) / L * L;
  store_out_vectors(dx, j, whole_end, stream, [&](std::int64_t e, int) __attribute__((always_inline)) {
    return grad_value(load<V>(dy + e), load<V>(x + e), vh, vw, vnc, vb, vr);
  });
  for (j = whole_end; j < n; ++j) one(j);
}

// dbias[ch] = sum dy, dweight[ch] = sum dy * xhat (when non-null) from the per-plane gradient
// sums psum (sum dy, then sum dy * (x - mean)), planes added in order.
template <class C>
void column_sums_from_planes(const Geom& q, const double* psum, const C* rstd, C* dweight, C* dbias) {
  const std::int64_t c = q.c, np = q.nplanes();
  for (std::int64_t ch = 0; ch < c; ++ch) {
    double sa = 0, sb = 0;
    for (std::int64_t i = 0; i < q.pn; ++i) {
      sa += psum[std::size_t(i * c + ch)];
      sb += psum[std::size_t(np + i * c + ch)] * double(rstd[q.set_of(i, ch)]);
    }
    if (dbias) dbias[ch] = C(sa);
    if (dweight) dweight[ch] = C(sb);
  }
}

// The backward pass shared by batch and group norm. mean/rstd are per set. With `training`,
// dx = rstd * (g - mean_set(g) - xhat * mean_set(g * xhat)), g = dy * w, xhat = (x - mean) * rstd;
// without, dx = rstd * w * dy. dweight[c] = sum dy * xhat, dbias[c] = sum dy (when non-null).
// dx streams past the caches with stream; plane_sums_out (when non-null) gets the per-plane
// gradient sums (column_sums_from_planes).
template <class T, class C = compute_t<T>>
void channel_backward_sums(const Geom& q, const T* dy, const T* x, const C* mean_in, const C* rstd_in,
                           const C* w, T* dx, C* dweight, C* dbias, bool training, int nthreads,
                           bool stream, double* plane_sums_out) {
  const std::int64_t np = q.nplanes(), c = q.c;
  std::vector<double> mean(std::size_t(q.nsets)), rstd(std::size_t(q.nsets));
  for (std::int64_t st = 0; st < q.nsets; ++st) {
    mean[std::size_t(st)] = double(mean_in[st]);
    rstd[std::size_t(st)] = double(rstd_in[st]);
  }
  std::vector<double> c0s(std::size_t(q.nsets), 0.0), b1s(std::size_t(q.nsets), 0.0);
  const bool need_sums = training || dweight || dbias || plane_sums_out;
  if (need_sums) {
    // Channels-last: each column's head, C(mean), over a period, as C and in double.
    auto fill_heads = [&](std::int64_t i, auto* h) {
      for (std::int64_t j = 0; j < c; ++j) h[j] = C(mean[std::size_t(q.set_of(i, j))]);
      periodic(h, c, q.W);
    };
    const auto heads = plane_row_arrays<C>(q, q.W, q.W, fill_heads, nthreads);
    const auto wide_heads = plane_row_arrays<double>(q, q.W, q.W, fill_heads, nthreads);
    // wide: every element in double, also for float data on SIMD targets.
    auto sum_planes = [&](bool wide, double* sums) {
      plane_sums(
          q, nthreads, sums,
          [&](std::int64_t p, std::int64_t j0, std::int64_t j1, double* out) {
            const double m = mean[std::size_t(q.set_of(p / c, p % c))];
            const std::int64_t off = p * q.s + j0;
            if (wide) grad_sums<T, true>(dy + off, x + off, j1 - j0, m, out);
            else grad_sums(dy + off, x + off, j1 - j0, m, out);
          },
          [&](std::int64_t i, std::int64_t r0, std::int64_t r1, double* out) {
            // Sums of dy * (x - head), head = T(mean) per column (exact differences near the
            // mean), corrected to x - mean after folding.
            const std::int64_t W = q.W;
            std::vector<double> buf(std::size_t(2 * W), 0.0);
            double* aa = buf.data();
            double* ba = aa + W;
            std::vector<C> own_heads;
            std::vector<double> own_wide;
            const C* hv = heads.row(i, own_heads);
            const double* mv = wide_heads.row(i, own_wide);
            cl_runs(q, i, r0, r1, [&](std::int64_t base, std::int64_t nr, std::int64_t len) {
              const T* xb = x + base;
              const T* db = dy + base;
              // Columns [j, len) of four rows, in double.
              auto four_rows_scalar = [&](const T* xr, const T* dr, std::int64_t j) {
                for (; j < len; ++j) {
                  double sa = 0, sb = 0;
                  for (int t = 0; t < 4; ++t) {
                    const double d = double(to_c(dr[t * len + j]));
                    sa += d;
                    sb += d * (double(to_c(xr[t * len + j])) - mv[j]);
                  }
                  aa[j] += sa;
                  ba[j] += sb;
                }
              };
              if constexpr (kFloatGradSums<T>) {
                if (!wide) {
                  cl_float_grad_sums(xb, db, nr, len, hv, aa, ba);
                  return;
                }
              }
              if (len > 2 * kTile * kWide) {
                // Wide rows: row-major, sums in L1.
                std::int64_t r = 0;
                for (; r + 4 <= nr; r += 4) {
                  const T* xr = xb + r * len;
                  const T* dr = db + r * len;
                  std::int64_t j = 0;
                  for (; j + kWide <= len; j += kWide) {
                    const vwide m = load<vwide>(mv + j);
                    const vwide d0 = load_wide(dr + j), d1 = load_wide(dr + len + j);
                    const vwide d2 = load_wide(dr + 2 * len + j), d3 = load_wide(dr + 3 * len + j);
                    const vwide x0 = load_wide(xr + j) - m, x1 = load_wide(xr + len + j) - m;
                    const vwide x2 = load_wide(xr + 2 * len + j) - m, x3 = load_wide(xr + 3 * len + j) - m;
                    store(aa + j, load<vwide>(aa + j) + ((d0 + d1) + (d2 + d3)));
                    store(ba + j, load<vwide>(ba + j) + ((d0 * x0 + d1 * x1) + (d2 * x2 + d3 * x3)));
                  }
                  four_rows_scalar(xr, dr, j);
                }
                for (; r < nr; ++r) {
                  const T* xr = xb + r * len;
                  const T* dr = db + r * len;
                  std::int64_t j = 0;
                  for (; j + kWide <= len; j += kWide) {
                    const vwide d = load_wide(dr + j);
                    store(aa + j, load<vwide>(aa + j) + d);
                    store(ba + j, load<vwide>(ba + j) + d * (load_wide(xr + j) - load<vwide>(mv + j)));
                  }
                  for (; j < len; ++j) {
                    const double d = double(to_c(dr[j]));
                    aa[j] += d;
                    ba[j] += d * (double(to_c(xr[j])) - mv[j]);
                  }
                }
                return;
              }
              const std::int64_t j = for_tiles<2 * kTile, kWide>(len, [&](auto nv, std::int64_t j0) {
                constexpr int NV = decltype(nv)::value;
                vwide m[NV], av[NV], bv[NV];
                for (int t = 0; t < NV; ++t) {
                  m[t] = load<vwide>(mv + j0 + t * kWide);
                  av[t] = vwide{};
                  bv[t] = vwide{};
                }
                for (std::int64_t r = 0; r < nr; ++r)
                  for (int t = 0; t < NV; ++t) {
                    const std::int64_t e = r * len + j0 + t * kWide;
                    const vwide d = load_wide(db + e);
                    av[t] += d;
                    bv[t] += d * (load_wide(xb + e) - m[t]);
                  }
                for (int t = 0; t < NV; ++t) {
                  store(aa + j0 + t * kWide, load<vwide>(aa + j0 + t * kWide) + av[t]);
                  store(ba + j0 + t * kWide, load<vwide>(ba + j0 + t * kWide) + bv[t]);
                }
              });
              for (std::int64_t jj = j; jj < len; ++jj) {
                const std::int64_t j = jj;
                double av = 0, bv = 0;
                for (std::int64_t r = 0; r < nr; ++r) {
                  const double d = double(to_c(db[r * len + j]));
                  av += d;
                  bv += d * (double(to_c(xb[r * len + j])) - mv[j]);
                }
                aa[j] += av;
                ba[j] += bv;
              }
            }, sum_run_rows(q));
            fold_period(q, aa, out);
            fold_period(q, ba, out + c);
            for (std::int64_t ch = 0; ch < c; ++ch)
              out[c + ch] -= (mean[std::size_t(q.set_of(i, ch))] - mv[ch]) * out[ch];
          });
    };
    std::vector<double> psum(std::size_t(2 * np));
    sum_planes(false, psum.data());
    if (kFloatGradSums<T>) resum_overflowed_planes(np, psum.data(), [&](double* again) { sum_planes(true, again); });
    if (dweight || dbias) column_sums_from_planes(q, psum.data(), rstd_in, dweight, dbias);
    if (plane_sums_out) std::copy(psum.begin(), psum.end(), plane_sums_out);
    if (training) {
      for (std::int64_t st = 0; st < q.nsets; ++st) {
        double sg = 0, sgx = 0;
        auto add = [&](std::int64_t p, std::int64_t ch) {
          const double wc = w ? double(w[ch]) : 1.0;
          sg += wc * psum[std::size_t(p)];
          sgx += wc * psum[std::size_t(np + p)];
        };
        if (q.batch) {
          for (std::int64_t i = 0; i < q.pn; ++i) add(i * c + st, st);
        } else {
          const std::int64_t p0 = (st / q.g) * c + (st % q.g) * q.cg;
          for (std::int64_t j = 0; j < q.cg; ++j) add(p0 + j, (st % q.g) * q.cg + j);
        }
        const double r = rstd[std::size_t(st)];
        c0s[std::size_t(st)] = sg / q.count;
        b1s[std::size_t(st)] = r * (r * sgx / q.count);
      }
    }
  }
  auto coef = [&](std::int64_t i, std::int64_t ch) {
    const std::size_t st = std::size_t(q.set_of(i, ch));
    return grad_coef<C>(mean[st], rstd[st], w ? double(w[ch]) : 1.0, c0s[st], b1s[st]);
  };
  using V = vnative<C>;
  constexpr int L = kLanes<C>;
  constexpr int TV = kTile;  // C vectors per register tile: five coefficients each
  // Channels-last: the five coefficients of each column (grad_coef) over a period and a vector
  // more (for shifted rows), one array after the other.
  const std::int64_t P = q.W + L;
  auto fill_coefs = [&](std::int64_t i, C* hv) {
    C* wv = hv + P;
    C* ncv = wv + P;
    C* bv = ncv + P;
    C* rv = bv + P;
    for (std::int64_t j = 0; j < c; ++j) {
      const GradCoef<C> k = coef(i, j);
      hv[j] = k.head, wv[j] = k.w, ncv[j] = k.nc, bv[j] = k.b, rv[j] = k.r;
    }
    for (C* a : {hv, wv, ncv, bv, rv}) periodic(a, c, P);
  };
  const auto coefs = plane_row_arrays<C>(q, 5 * P, P, fill_coefs, nthreads);
  pointwise(
      q, nthreads,
      [&](std::int64_t p, std::int64_t j0, std::int64_t j1) {
        const std::int64_t off = p * q.s + j0;
        grad_span(dy + off, x + off, dx + off, j1 - j0, coef(p / c, p % c), stream);
        if (stream) stream_fence();
      },
      [&](std::int64_t i, std::int64_t r0, std::int64_t r1) {
        std::vector<C> own;
        const C* hv = coefs.row(i, own);
        const std::int64_t shift = cl_shift(q, dx, i, r0, r1, stream);
        cl_out_runs(q, i, r0, r1, shift, [&](std::int64_t base, std::int64_t nr, std::int64_t len, std::int64_t k0) {
          const T* xb = x + base;
          const T* db = dy + base;
          T* ob = dx + base;
          // Local copies: store() may alias anything, so captured pointers would be reloaded after it.
          const C* const hl = hv + k0;
          const C* const wl = hl + P;
          const C* const nl = wl + P;
          const C* const bl = nl + P;
          const C* const rl = bl + P;
          auto one = [&](std::int64_t e, std::int64_t j) {
            ob[e] = narrow<T>(grad_value(to_c(db[e]), to_c(xb[e]), hl[j], wl[j], nl[j], bl[j], rl[j]));
          };
          if (len > 2 * TV * L) {
            // Wide rows: row by row, the coefficients reloaded from L1 for every vector (four rows
            // per coefficient load took 1.5x the time on Intel; strided tiles 1.2x).
            for (std::int64_t r = 0; r < nr; ++r) {
              const std::int64_t whole_end = len / L * L;
              const T* const dr = db + r * len;
              const T* const xr = xb + r * len;
              T* const outr = ob + r * len;
              store_out_vectors(outr, 0, whole_end, stream, [&](std::int64_t j, int) __attribute__((always_inline)) {
                prefetch_ahead(dr + j);
                prefetch_ahead(xr + j);
                return grad_value(load<V>(dr + j), load<V>(xr + j), load<V>(hl + j), load<V>(wl + j),
                                  load<V>(nl + j), load<V>(bl + j), load<V>(rl + j));
              });
              for (std::int64_t j = whole_end; j < len; ++j) one(r * len + j, j);
            }
            return;
          }
          const std::int64_t j = for_tiles<TV, L>(len, [&](auto nv, std::int64_t j0) {
            constexpr int NV = decltype(nv)::value;
            V h[NV], wt[NV], nc[NV], b[NV], rs[NV];
            for (int t = 0; t < NV; ++t) {
              h[t] = load<V>(hl + j0 + t * L);
              wt[t] = load<V>(wl + j0 + t * L);
              nc[t] = load<V>(nl + j0 + t * L);
              b[t] = load<V>(bl + j0 + t * L);
              rs[t] = load<V>(rl + j0 + t * L);
            }
            for (std::int64_t r = 0; r < nr; ++r) {
              V out[NV];
              for (int t = 0; t < NV; ++t) {
                const std::int64_t e = r * len + j0 + t * L;
                prefetch_ahead(db + e);
                prefetch_ahead(xb + e);
                out[t] = grad_value(load<V>(db + e), load<V>(xb + e), h[t], wt[t], nc[t], b[t], rs[t]);
              }
              put_vectors<T>(out, [&](int t, V v, bool normal) __attribute__((always_inline)) {
                store_out(ob + r * len + j0 + t * L, v, stream, normal);
              });
            }
          });
          for (std::int64_t jj = j; jj < len; ++jj)
            for (std::int64_t r = 0; r < nr; ++r) one(r * len + jj, jj);
        });
        if (stream) stream_fence();
      });
}

template <class T, class C = compute_t<T>>
void channel_backward(const Geom& q, const T* dy, const T* x, const C* mean_in, const C* rstd_in,
                      const C* w, T* dx, C* dweight, C* dbias, bool training, int nthreads) {
  channel_backward_sums(q, dy, x, mean_in, rstd_in, w, dx, dweight, dbias, training, nthreads, stream_output<T>(q),
                        nullptr);
}

// ---- fused sets ---------------------------------------------------------------------------------

// Channels-first sets small enough to stay in cache go one task per set: its statistics (or
// gradient sums), then its normalization (or dx), while its planes are still there: x (and dy)
// read from memory once instead of twice. A group norm set is cg contiguous planes, a batch norm
// set one plane per sample, C planes apart. The arithmetic and its order are those of the
// two-pass path (one sum per plane, planes added in order); a set whose float sums cannot be
// trusted is summed again alone in both. The choice depends on the shape alone.
constexpr std::int64_t kFusedMaxBytes = 1 << 20;

inline bool fused_sets(const Geom& q, std::size_t elem_bytes) {
  return !q.cl && q.units > 0 && q.nch == 1 && q.nsets >= 8 && q.count * double(elem_bytes) <= double(kFusedMaxBytes);
}

inline std::int64_t planes_per_set(const Geom& q) { return q.batch ? q.n : q.cg; }

// The plane index of the k-th plane of set st (its channel is the index % c).
inline std::int64_t set_plane(const Geom& q, std::int64_t st, std::int64_t k) {
  return q.batch ? k * q.c + st : (st / q.g) * q.c + (st % q.g) * q.cg + k;
}

// Forward of fused sets: moments as set_moments() computes them, on_moments(st, mean, var, rstd)
// (statistics and running-statistics outputs), then y as normalize() writes it.
template <class T, class OnMoments, class C = compute_t<T>>
void fused_forward(const Geom& q, const T* x, const C* w, const C* b, T* y, double eps, int nthreads,
                   const OnMoments& on_moments) {
  const std::int64_t s = q.s, planes = planes_per_set(q);
  const bool stream = stream_output<T>(q);
  parallel_blocks(q.nsets, nthreads, [&](std::int64_t st) {
    double shift = set_shift(q, x, st), md, v;
    for (bool wide = false;; wide = true) {  // as set_moments: float sums, else double
      double sum = 0, sq = 0;
      for (std::int64_t k = 0; k < planes; ++k) {
        const T* plane = x + set_plane(q, st, k) * s;
        double part[2] = {0.0, 0.0};
        if (wide) shifted_sums_wide(plane, s, shift, part);
        else shifted_sums(plane, s, shift, part);
        sum += part[0];
        sq += part[1];
      }
      md = sum / q.count;
      v = sq / q.count - md * md;
      if (!(v > 0)) v = v != v ? v : 0.0;
      if (wide || !kFloatSums<T> || float_sums_trusted(md, v)) break;
      if (std::isfinite(md)) shift += md;  // else float sums overflowed: keep the shift
    }
    const double mean = shift + md, rstd = 1.0 / std::sqrt(v + eps);
    on_moments(st, mean, v, rstd);
    const C head = C(mean), tail = C(mean - double(head));
    for (std::int64_t k = 0; k < planes; ++k) {
      const std::int64_t p = set_plane(q, st, k), ch = p % q.c;
      const C scale = C(rstd * (w ? double(w[ch]) : 1.0));
      normalize_span(x + p * s, y + p * s, s, head, tail, scale, b ? b[ch] : C(0), stream);
    }
    if (stream) stream_fence();
  });
}

// channel_backward() of fused sets.
template <class T, class C = compute_t<T>>
void fused_backward(const Geom& q, const T* dy, const T* x, const C* mean_in, const C* rstd_in, const C* w,
                    T* dx, C* dweight, C* dbias, bool training, int nthreads) {
  const std::int64_t c = q.c, s = q.s, np = q.nplanes(), planes = planes_per_set(q);
  const bool column_sums = dweight || dbias, need_sums = training || column_sums;
  const bool stream = stream_output<T>(q);
  std::vector<double> psum(column_sums ? std::size_t(2 * np) : 0);
  parallel_blocks(q.nsets, nthreads, [&](std::int64_t st) {
    const double mean = double(mean_in[st]), r = double(rstd_in[st]);
    double sg = 0, sgx = 0;
    for (std::int64_t k = 0; k < planes && need_sums; ++k) {
      const std::int64_t p = set_plane(q, st, k);
      double part[2] = {0.0, 0.0};
      grad_sums(dy + p * s, x + p * s, s, mean, part);
      if (kFloatGradSums<T> && !(std::isfinite(part[0]) && std::isfinite(part[1]))) {
        part[0] = part[1] = 0.0;  // as resum_overflowed_planes()
        grad_sums<T, true>(dy + p * s, x + p * s, s, mean, part);
      }
      if (column_sums) {
        psum[std::size_t(p)] = part[0];
        psum[std::size_t(np + p)] = part[1];
      }
      const double wc = w ? double(w[p % c]) : 1.0;
      sg += wc * part[0];
      sgx += wc * part[1];
    }
    // as channel_backward_sums()
    const double c0 = training ? sg / q.count : 0.0, b1 = training ? r * (r * sgx / q.count) : 0.0;
    for (std::int64_t k = 0; k < planes; ++k) {
      const std::int64_t p = set_plane(q, st, k);
      grad_span(dy + p * s, x + p * s, dx + p * s, s, grad_coef<C>(mean, r, w ? double(w[p % c]) : 1.0, c0, b1),
                stream);
    }
    if (stream) stream_fence();
  });
  if (column_sums) column_sums_from_planes(q, psum.data(), rstd_in, dweight, dbias);
}

// Channels-last group and instance norm samples small enough to stay in cache go one task per
// sample, as fused_sets: the sample's statistics (or gradient sums), then its output while its
// rows are still there. The units, sums and their order are those of the two-pass path on the
// sample; a set whose float sums cannot be trusted is summed again alone in both. The choice
// depends on the shape alone.
constexpr std::int64_t kFusedSampleMaxBytes = 1 << 20;

inline bool fused_samples(const Geom& q, std::size_t elem_bytes) {
  return q.cl && !q.batch && q.units > 0 && q.n >= 8 &&
         double(q.s) * double(q.c) * double(elem_bytes) <= double(kFusedSampleMaxBytes);
}

// One sample of q, with the units q gives it.
inline Geom sample_geom(const Geom& q) {
  Geom one = q;
  one.n = one.pn = 1;
  one.nsets = q.g;
  one.units = q.blocks;
  return one;
}

// Forward of fused samples: set_moments(), on_moments(st, mean, var, rstd), normalize() per sample.
template <class T, class OnMoments, class C = compute_t<T>>
void fused_sample_forward(const Geom& q, const T* x, const C* w, const C* b, T* y, double eps, int nthreads,
                          const OnMoments& on_moments) {
  const Geom one = sample_geom(q);
  const std::int64_t elems = q.s * q.c, g = q.g;
  const bool stream = stream_output<T>(q);
  parallel_blocks(q.n, nthreads, [&](std::int64_t i) {
    std::vector<double> buf(std::size_t(3 * g));
    double* mean = buf.data();
    double* rstd = mean + g;
    double* var = rstd + g;
    set_moments(one, x + i * elems, eps, 1, mean, rstd, var);
    for (std::int64_t st = 0; st < g; ++st) on_moments(i * g + st, mean[st], var[st], rstd[st]);
    normalize(one, x + i * elems, w, b, y + i * elems, mean, rstd, 1, stream);
  });
}

// channel_backward() of fused samples; dweight/dbias from every sample's plane sums, in order.
template <class T, class C = compute_t<T>>
void fused_sample_backward(const Geom& q, const T* dy, const T* x, const C* mean, const C* rstd, const C* w,
                           T* dx, C* dweight, C* dbias, bool training, int nthreads) {
  const Geom one = sample_geom(q);
  const std::int64_t elems = q.s * q.c, c = q.c, g = q.g, np = q.nplanes();
  const bool column_sums = dweight || dbias, stream = stream_output<T>(q);
  std::vector<double> psum(column_sums ? std::size_t(2 * np) : 0);
  parallel_blocks(q.n, nthreads, [&](std::int64_t i) {
    std::vector<double> part(column_sums ? std::size_t(2 * c) : 0);
    const std::int64_t o = i * elems;
    channel_backward_sums(one, dy + o, x + o, mean + i * g, rstd + i * g, w, dx + o, static_cast<C*>(nullptr),
                          static_cast<C*>(nullptr), training, 1, stream, column_sums ? part.data() : nullptr);
    if (!column_sums) return;
    std::copy(part.begin(), part.begin() + c, psum.begin() + i * c);
    std::copy(part.begin() + c, part.end(), psum.begin() + np + i * c);
  });
  if (column_sums) column_sums_from_planes(q, psum.data(), rstd, dweight, dbias);
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
