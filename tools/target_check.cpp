// Cross-target check for machines without Python (e.g. aarch64 under qemu): runs every row-norm
// kernel on every target this CPU supports and compares each with the baseline (scalar) target.
// Exit status 1 on a mismatch beyond float rounding.
#include <cmath>
#include <cstdio>
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

}  // namespace

int main() {
  int failures = 0, passes = 0;
  std::mt19937 gen(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (auto [rows, cols] : {std::pair{37L, 1L}, {19L, 7L}, {64L, 33L}, {5L, 1000L}, {300L, 129L}}) {
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
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures ? 1 : 0;
}
