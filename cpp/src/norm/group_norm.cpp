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

template <class T>
void group_norm_forward(const GroupNormForward<T>& a, int nthreads) {
  const Geom q = group_geom<T>(a.batch, a.channels, a.spatial, a.groups, a.channels_last);
  if (q.units == 0) return;
  auto outputs = [&](std::int64_t st, double mean, double, double rstd) {
    if (a.mean) a.mean[st] = compute_t<T>(mean);
    if (a.rstd) a.rstd[st] = compute_t<T>(rstd);
  };
  if (fused_sets(q, sizeof(T))) return fused_forward(q, a.x, a.weight, a.bias, a.y, a.eps, nthreads, outputs);
  if (fused_samples(q, sizeof(T)))
    return fused_sample_forward(q, a.x, a.weight, a.bias, a.y, a.eps, nthreads, outputs);
  const std::size_t ns = std::size_t(q.nsets);
  std::vector<double> mean(ns), rstd(ns), var(ns);
  set_moments(q, a.x, a.eps, nthreads, mean.data(), rstd.data(), var.data());
  for (std::size_t st = 0; st < ns; ++st) outputs(std::int64_t(st), mean[st], var[st], rstd[st]);
  normalize(q, a.x, a.weight, a.bias, a.y, mean.data(), rstd.data(), nthreads, stream_output<T>(q));
}

template <class T>
void group_norm_backward(const GroupNormBackward<T>& a, int nthreads) {
  const Geom q = group_geom<T>(a.batch, a.channels, a.spatial, a.groups, a.channels_last);
  auto backward = fused_sets(q, sizeof(T))      ? &fused_backward<T>
                  : fused_samples(q, sizeof(T)) ? &fused_sample_backward<T>
                                                : &channel_backward<T>;
  backward(q, a.dy, a.x, a.mean, a.rstd, a.weight, a.dx, a.weight ? a.dweight : nullptr, a.weight ? a.dbias : nullptr,
           true, nthreads);
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
