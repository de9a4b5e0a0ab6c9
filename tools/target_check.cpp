// Cross-target check for machines without Python (e.g. aarch64 under qemu): runs every row-norm
// kernel on every target this CPU supports and compares each with the baseline (scalar) target,
// for float32 data and for float16 / bfloat16 data (layer_norm, fused add + rms_norm, batch_norm
// channels-last). Exit status 1 on a mismatch beyond float rounding: for halves one ulp, or
// where a result's float32 terms cancel (y near 0 with a bias) 16 float32 roundings of the
// largest result, as tests/test_half.py allows.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <random>
#include <string>
#include <vector>

#include "normlab/norm.hpp"
#include "normlab/runtime.hpp"

namespace {

struct Outputs {
  std::vector<float> y, mean, rstd, dx, dw, db, ry, rrstd, rdx, rdw;
};

Outputs run(long rows, long cols, const std::vector<float>& x, const std::vector<float>& dy,
            const std::vector<float>& w, const std::vector<float>& b) {
  Outputs o;
  o.y.resize(x.size()), o.mean.resize(rows), o.rstd.resize(rows), o.dx.resize(x.size());
  o.dw.resize(cols), o.db.resize(cols), o.ry.resize(x.size()), o.rrstd.resize(rows);
  o.rdx.resize(x.size()), o.rdw.resize(cols);
  normlab::LayerNormForward<float> f;
  f.x = x.data(), f.weight = w.data(), f.bias = b.data(), f.y = o.y.data(), f.mean = o.mean.data();
  f.rstd = o.rstd.data(), f.rows = rows, f.cols = cols;
  normlab::layer_norm(f);
  normlab::LayerNormBackward<float> g;
  g.dy = dy.data(), g.x = x.data(), g.mean = o.mean.data(), g.rstd = o.rstd.data(), g.weight = w.data();
  g.dx = o.dx.data(), g.dweight = o.dw.data(), g.dbias = o.db.data(), g.rows = rows, g.cols = cols;
  normlab::layer_norm_backward(g);
  normlab::RmsNormForward<float> r;
  r.x = x.data(), r.weight = w.data(), r.y = o.ry.data(), r.rstd = o.rrstd.data(), r.rows = rows, r.cols = cols;
  normlab::rms_norm(r);
  normlab::RmsNormBackward<float> h;
  h.dy = dy.data(), h.x = x.data(), h.rstd = o.rrstd.data(), h.weight = w.data(), h.dx = o.rdx.data();
  h.dweight = o.rdw.data(), h.rows = rows, h.cols = cols;
  normlab::rms_norm_backward(h);
  return o;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b, double scale) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i])) / scale;
    if (d > m || d != d) m = d;  // NaN counts as a mismatch
  }
  return m;
}

// Half-precision bit patterns as ordered integers: adjacent values differ by one.
int ordered(std::uint16_t bits) { return bits & 0x8000 ? -int(bits & 0x7fff) : int(bits & 0x7fff); }

template <class H>
double half_value(H h) {
  if constexpr (std::is_same<H, normlab::bfloat16>::value) {
    const std::uint32_t u = std::uint32_t(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  } else {
    const int e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ff;
    const double sign = h.bits & 0x8000 ? -1.0 : 1.0;
    if (e == 31) return m ? NAN : sign * INFINITY;
    return sign * (e ? std::ldexp(1024 + m, e - 25) : std::ldexp(m, -24));
  }
}

// The largest distance in ulps between a and b over the elements that differ by more than
// 16 float32 roundings of the largest |b|.
template <class H>
int max_ulps(const std::vector<H>& a, const std::vector<H>& b) {
  double largest = 0;
  for (const H& h : b) largest = std::max(largest, std::fabs(half_value(h)));
  const double slack = 16.0 * std::ldexp(1.0, -24) * largest;
  int m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::fabs(half_value(a[i]) - half_value(b[i])) <= slack) continue;
    m = std::max(m, std::abs(ordered(a[i].bits) - ordered(b[i].bits)));
  }
  return m;
}

// Half data with values 100 + N(0, 1)-ish built from random bit patterns near 100 (any pattern is
// a valid input): sign 0, exponent of 64..128, random mantissa.
template <class H>
std::vector<H> half_data(std::size_t n, std::mt19937& gen) {
  std::vector<H> v(n);
  const bool bf = sizeof(H) == 2 && std::is_same<H, normlab::bfloat16>::value;
  for (H& h : v) {
    const std::uint32_t r = gen();
    h.bits = bf ? std::uint16_t(0x42c0 + (r & 0x3f)) : std::uint16_t(0x5600 + (r & 0x1ff));
    if (r & 0x80000000u) h.bits ^= 0x8000;  // mixed signs: also exercises |mean| << spread
  }
  return v;
}

template <class H>
std::vector<std::vector<H>> run_half(long rows, long cols, const std::vector<H>& x, const std::vector<H>& r,
                                     const std::vector<float>& w, const std::vector<float>& b) {
  std::vector<H> y(x.size()), sum(x.size()), ry(x.size()), by(x.size());
  normlab::LayerNormForward<H> f;
  f.x = x.data(), f.weight = w.data(), f.bias = b.data(), f.y = y.data(), f.rows = rows, f.cols = cols;
  normlab::layer_norm(f);
  normlab::AddRmsNormForward<H> a;
  a.norm.x = x.data(), a.norm.weight = w.data(), a.norm.y = ry.data(), a.norm.rows = rows, a.norm.cols = cols;
  a.residual = r.data(), a.sum = sum.data();
  normlab::add_rms_norm(a);
  normlab::BatchNormForward<H> bn;  // (rows, 1, cols) channels-last: cols channels
  bn.x = x.data(), bn.weight = w.data(), bn.bias = b.data(), bn.y = by.data(), bn.batch = rows;
  bn.channels = cols, bn.spatial = 1, bn.channels_last = true;
  if (rows > 1) normlab::batch_norm(bn);
  return {y, sum, ry, by};
}

template <class H>
int check_half(const char* name, int& passes) {
  int failures = 0;
  std::mt19937 gen(11);
  // (2, 131075): rows of 512 KiB split across the threads in the forwards.
  for (auto [rows, cols] : {std::pair{37L, 1L}, {19L, 7L}, {64L, 33L}, {5L, 1000L}, {300L, 129L}, {2L, 131075L}}) {
    const std::vector<H> x = half_data<H>(rows * cols, gen), r = half_data<H>(rows * cols, gen);
    std::vector<float> w(cols), b(cols);
    for (long j = 0; j < cols; ++j) w[j] = 0.5f + float(j % 7) * 0.25f, b[j] = float(j % 5) - 2.0f;
    normlab::set_cpu_target("baseline");
    const auto ref = run_half(rows, cols, x, r, w, b);
    for (const std::string& target : normlab::supported_cpu_targets()) {
      normlab::set_cpu_target(target);
      const auto out = run_half(rows, cols, x, r, w, b);
      int ulps = 0;
      for (size_t k = 0; k < out.size(); ++k) ulps = std::max(ulps, max_ulps(out[k], ref[k]));
      const bool ok = ulps <= 1;
      std::printf("%-8s %-8s rows=%-4ld cols=%-5ld max difference %d ulp %s\n", target.c_str(), name, rows, cols,
                  ulps, ok ? "ok" : "MISMATCH");
      failures += !ok;
      passes += ok;
    }
  }
  return failures;
}

// A C++ caller's own parallel region: normlab runs on the calling thread there, and a row split
// across threads elsewhere must not wait at a barrier of the caller's team (only thread 0
// calls). Same bits as outside the region.
int check_in_parallel_region(int& passes) {
  const long cols = 131072;
  std::vector<float> x(cols), y(cols), y_in(cols), w(cols, 1.5f);
  for (long j = 0; j < cols; ++j) x[j] = float(j % 97) * 0.25f - 3.0f;
  normlab::LayerNormForward<float> f;
  f.x = x.data(), f.weight = w.data(), f.y = y.data(), f.rows = 1, f.cols = cols;
  normlab::layer_norm(f);
  f.y = y_in.data();
#pragma omp parallel num_threads(2)
  {
#pragma omp master
    normlab::layer_norm(f);
  }
  const bool ok = std::memcmp(y.data(), y_in.data(), sizeof(float) * cols) == 0;
  std::printf("layer_norm of a split row inside a parallel region: %s\n", ok ? "ok" : "MISMATCH");
  passes += ok;
  return !ok;
}

}  // namespace

int main() {
  int failures = 0, passes = 0;
  std::mt19937 gen(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  // (2, 131075): rows of 512 KiB split across the threads in the forwards.
  for (auto [rows, cols] : {std::pair{37L, 1L}, {19L, 7L}, {64L, 33L}, {5L, 1000L}, {300L, 129L}, {2L, 131075L}}) {
    std::vector<float> x(rows * cols), dy(rows * cols), w(cols), b(cols);
    for (float& v : x) v = 1000.0f + dist(gen);
    for (float& v : dy) v = dist(gen);
    for (float& v : w) v = dist(gen);
    for (float& v : b) v = dist(gen);
    normlab::set_cpu_target("baseline");
    const Outputs ref = run(rows, cols, x, dy, w, b);
    for (const std::string& target : normlab::supported_cpu_targets()) {
      normlab::set_cpu_target(target);
      const Outputs o = run(rows, cols, x, dy, w, b);
      const double err = std::fmax(
          std::fmax(max_diff(o.y, ref.y, 8.0), max_diff(o.ry, ref.ry, 8.0)),
          std::fmax(std::fmax(max_diff(o.dx, ref.dx, 8.0), max_diff(o.rdx, ref.rdx, 8.0)),
                    std::fmax(max_diff(o.dw, ref.dw, double(rows) * 8), max_diff(o.rdw, ref.rdw, double(rows) * 8))));
      const bool ok = err <= 4e-6 && max_diff(o.db, ref.db, double(rows) * 8) <= 4e-6;
      std::printf("%-8s rows=%-4ld cols=%-5ld max scaled difference %.2e %s\n", target.c_str(), rows, cols, err,
                  ok ? "ok" : "MISMATCH");
      failures += !ok;
      passes += ok;
    }
  }
  failures += check_in_parallel_region(passes);
  failures += check_half<normlab::float16>("float16", passes);
  failures += check_half<normlab::bfloat16>("bfloat16", passes);
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures ? 1 : 0;
}
