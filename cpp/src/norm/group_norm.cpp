// group_norm forward and backward (instance_norm is group_norm with one group per channel):
// one body, compiled once per SIMD target. Statistics per (sample, group); see
// norm/channel_norm.hpp for the blocking.
#include "dispatch/kernel_table.hpp"
#include "norm/channel_norm.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

template <class T>
Geom group_geom(std::int64_t n, std::int64_t c, std::int64_t s, std::int64_t g, bool channels_last) {
  return make_geom(n, c, s, g, channels_last, false, kLanes<compute_t<T>>, int(sizeof(T)));
}

// Channels-first groups are contiguous blocks of cg * s elements. When a block fits in cache,
// one task per group computes its statistics and normalizes it while it is still there: x is
// read from memory once instead of twice. The arithmetic and its order are those of the
// two-pass path (one shifted sum per plane, planes added in order); the choice depends on the
// shape alone.
constexpr std::int64_t kFusedMaxBytes = 1 << 20;

inline bool fused(const Geom& q, std::size_t elem_bytes) {
  return !q.cl && !q.batch && q.units > 0 && q.nch == 1 && q.nsets >= 8 &&
         double(q.cg) * double(q.s) * double(elem_bytes) <= double(kFusedMaxBytes);
}

template <class T>
void group_norm_forward_fused(const GroupNormForward<T>& a, const Geom& q, int nthreads) {
  const std::int64_t s = q.s, len = q.cg * s;
  parallel_blocks(q.nsets, nthreads, [&](std::int64_t st) {
    const T* x = a.x + st * len;
    T* y = a.y + st * len;
    double shift = set_shift(q, a.x, st), md, v;
    for (bool wide = false;; wide = true) {  // as set_moments: float sums, else double
      double sum = 0, sq = 0;
      for (std::int64_t j = 0; j < q.cg; ++j) {
        double part[2] = {0.0, 0.0};
        if (wide) shifted_sums_wide(x + j * s, s, shift, part);
        else shifted_sums(x + j * s, s, shift, part);
        sum += part[0];
        sq += part[1];
      }
      md = sum / q.count;
      v = sq / q.count - md * md;
      if (!(v > 0)) v = v != v ? v : 0.0;
      if (wide || float_sums_trusted(md, v)) break;
      if (std::isfinite(md)) shift += md;  // else float sums overflowed: keep the shift
    }
    const double mean = shift + md, rstd = 1.0 / std::sqrt(v + a.eps);
    using C = compute_t<T>;
    if (a.mean) a.mean[st] = C(mean);
    if (a.rstd) a.rstd[st] = C(rstd);
    const C head = C(mean), tail = C(mean - double(head));
    const std::int64_t c0 = (st % q.g) * q.cg;
    for (std::int64_t j = 0; j < q.cg; ++j) {
      const std::int64_t ch = c0 + j;
      const C scale = C(rstd * (a.weight ? double(a.weight[ch]) : 1.0));
      const C bias = a.bias ? a.bias[ch] : C(0);
      normalize_span(x + j * s, y + j * s, s, head, tail, scale, bias);
    }
  });
}

template <class T>
void group_norm_backward_fused(const GroupNormBackward<T>& a, const Geom& q, int nthreads) {
  const std::int64_t c = q.c, s = q.s, len = q.cg * s, np = q.nplanes();
  const bool sums = a.weight != nullptr;
  std::vector<double> psum(sums ? std::size_t(2 * np) : 0);
  parallel_blocks(q.nsets, nthreads, [&](std::int64_t st) {
    const T* x = a.x + st * len;
    const T* dy = a.dy + st * len;
    T* dx = a.dx + st * len;
    const double mean = double(a.mean[st]), r = double(a.rstd[st]);
    const std::int64_t c0 = (st % q.g) * q.cg, p0 = (st / q.g) * c + c0;
    double sg = 0, sgx = 0;
    for (std::int64_t j = 0; j < q.cg; ++j) {
      double part[2] = {0.0, 0.0};
      grad_sums(dy + j * s, x + j * s, s, mean, part);
      if (sums) {
        psum[std::size_t(p0 + j)] = part[0];
        psum[std::size_t(np + p0 + j)] = part[1];
      }
      const double wc = a.weight ? double(a.weight[c0 + j]) : 1.0;
      sg += wc * part[0];
      sgx += wc * part[1];
    }
    const double kc = r * (sg / q.count), kb = r * r * (r * sgx / q.count);
    for (std::int64_t j = 0; j < q.cg; ++j) {
      const double ka = r * (a.weight ? double(a.weight[c0 + j]) : 1.0);
      grad_span(dy + j * s, x + j * s, dx + j * s, s, mean, ka, kb, kc);
    }
  });
  if (sums) {
    for (std::int64_t ch = 0; ch < c; ++ch) {
      double sa = 0, sb = 0;
      for (std::int64_t i = 0; i < q.pn; ++i) {
        sa += psum[std::size_t(i * c + ch)];
        sb += psum[std::size_t(np + i * c + ch)] * double(a.rstd[q.set_of(i, ch)]);
      }
      a.dbias[ch] = compute_t<T>(sa);
      a.dweight[ch] = compute_t<T>(sb);
    }
  }
}

template <class T>
void group_norm_forward(const GroupNormForward<T>& a, int nthreads) {
  const Geom q = group_geom<T>(a.batch, a.channels, a.spatial, a.groups, a.channels_last);
  if (q.units == 0) return;
  if (fused(q, sizeof(T))) return group_norm_forward_fused(a, q, nthreads);
  const std::size_t ns = std::size_t(q.nsets);
  std::vector<double> mean(ns), rstd(ns), var(ns);
  set_moments(q, a.x, a.eps, nthreads, mean.data(), rstd.data(), var.data());
  for (std::size_t st = 0; st < ns; ++st) {
    if (a.mean) a.mean[st] = compute_t<T>(mean[st]);
    if (a.rstd) a.rstd[st] = compute_t<T>(rstd[st]);
  }
  normalize(q, a.x, a.weight, a.bias, a.y, mean.data(), rstd.data(), nthreads);
}

template <class T>
void group_norm_backward(const GroupNormBackward<T>& a, int nthreads) {
  const Geom q = group_geom<T>(a.batch, a.channels, a.spatial, a.groups, a.channels_last);
  if (fused(q, sizeof(T))) return group_norm_backward_fused(a, q, nthreads);
  channel_backward(q, a.dy, a.x, a.mean, a.rstd, a.weight, a.dx, a.weight ? a.dweight : nullptr,
                   a.weight ? a.dbias : nullptr, true, nthreads);
}

template <class T>
void fill(ChannelNormKernels<T>& k) {
  k.group_norm = &group_norm_forward<T>;
  k.group_norm_backward = &group_norm_backward<T>;
}

}  // namespace

void register_group_norm(KernelTable& t) {
  for_each_channel_dtype(t, [](auto& kernels) { fill(kernels); });
}

}  // namespace NL_TARGET
}  // namespace normlab
