// batch_norm forward and backward: one body, compiled once per SIMD target. Statistics per
// channel over every other axis; see norm/channel_norm.hpp for the blocking.
#include "dispatch/kernel_table.hpp"
#include "norm/channel_norm.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

template <class T>
Geom batch_geom(std::int64_t n, std::int64_t c, std::int64_t s, bool channels_last) {
  return make_geom(n, c, s, c, channels_last, true, kLanes<compute_t<T>>, int(sizeof(T)));
}

template <class T>
void batch_norm_forward(const BatchNormForward<T>& a, int nthreads) {
  const Geom q = batch_geom<T>(a.batch, a.channels, a.spatial, a.channels_last);
  const std::int64_t c = a.channels;
  const double mom = a.momentum, unbias = q.count / (q.count - 1.0);
  // A channel's outputs: its statistics, and in training its running statistics updated.
  auto outputs = [&](std::int64_t ch, double m, double v, double r) {
    if (a.training && a.running_mean)
      a.running_mean[ch] = compute_t<T>((1.0 - mom) * double(a.running_mean[ch]) + mom * m);
    if (a.training && a.running_var)
      a.running_var[ch] = compute_t<T>((1.0 - mom) * double(a.running_var[ch]) + mom * v * unbias);
    if (a.mean) a.mean[ch] = compute_t<T>(m);
    if (a.invstd) a.invstd[ch] = compute_t<T>(r);
  };
  if (a.training && fused_sets(q, sizeof(T))) return fused_forward(q, a.x, a.weight, a.bias, a.y, a.eps, nthreads, outputs);
  const std::size_t nc = static_cast<std::size_t>(c);
  std::vector<double> mean(nc), rstd(nc), var(nc);
  if (a.training) {
    set_moments(q, a.x, a.eps, nthreads, mean.data(), rstd.data(), var.data());
  } else {
    for (std::int64_t ch = 0; ch < c; ++ch) {
      mean[std::size_t(ch)] = double(a.running_mean[ch]);
      rstd[std::size_t(ch)] = 1.0 / std::sqrt(double(a.running_var[ch]) + a.eps);
    }
  }
  for (std::int64_t ch = 0; ch < c; ++ch) outputs(ch, mean[std::size_t(ch)], var[std::size_t(ch)], rstd[std::size_t(ch)]);
  normalize(q, a.x, a.weight, a.bias, a.y, mean.data(), rstd.data(), nthreads, stream_output<T>(q));
}

template <class T>
void batch_norm_backward(const BatchNormBackward<T>& a, int nthreads) {
  const Geom q = batch_geom<T>(a.batch, a.channels, a.spatial, a.channels_last);
  auto backward = fused_sets(q, sizeof(T)) ? &fused_backward<T> : &channel_backward<T>;
  backward(q, a.dy, a.x, a.mean, a.invstd, a.weight, a.dx, a.weight ? a.dweight : nullptr,
           a.weight ? a.dbias : nullptr, a.training, nthreads);
}

template <class T>
void fill(ChannelNormKernels<T>& k) {
  k.batch_norm = &batch_norm_forward<T>;
  k.batch_norm_backward = &batch_norm_backward<T>;
}

}  // namespace

void register_batch_norm(KernelTable& t) {
  for_each_channel_dtype(t, [](auto& kernels) { fill(kernels); });
}

}  // namespace NL_TARGET
}  // namespace normlab
