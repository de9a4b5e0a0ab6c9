// The public C++ entry points of the channel norms (batch, instance, group): check arguments,
// pick threads, call the active target's kernel.
#include <stdexcept>
#include <string>

#include "dispatch/kernel_table.hpp"
#include "normlab/norm.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_dims(std::int64_t batch, std::int64_t channels, std::int64_t spatial) {
  require(batch >= 0, "batch must be >= 0");
  require(channels >= 1, "channels must be >= 1");
  require(spatial >= 0, "spatial must be >= 0");
  const double total = double(batch) * double(channels) * double(spatial);
  require(total < 9.2e18, "tensor too large");
}

void check_eps(double eps) { require(eps > 0 && eps < __builtin_inf(), "eps must be finite and > 0"); }

template <class T>
int threads_for_elems(std::int64_t elems, int arrays) {
  return threads_for(elems * std::int64_t(sizeof(T)) * arrays);
}

void check_groups(std::int64_t channels, std::int64_t groups) {
  require(groups >= 1, "groups must be >= 1");
  require(channels % groups == 0, "groups (" + std::to_string(groups) + ") must divide channels (" +
                                      std::to_string(channels) + ")");
}

}  // namespace

template <class T>
static void batch_norm_impl(const BatchNormForward<T>& a) {
  check_dims(a.batch, a.channels, a.spatial);
  check_eps(a.eps);
  const std::int64_t elems = a.batch * a.channels * a.spatial;
  require((a.x && a.y) || elems == 0, "x and y are required");
  if (a.training) {
    require(a.momentum >= 0 && a.momentum <= 1, "momentum must be in [0, 1]");
    require(a.batch * a.spatial > 1, "batch_norm in training needs more than one value per channel");
  } else {
    require(a.running_mean && a.running_var, "running_mean and running_var are required when not training");
  }
  active_kernels().chan<T>().batch_norm(a, threads_for_elems<T>(elems, 2));
}

template <class T>
static void batch_norm_backward_impl(const BatchNormBackward<T>& a) {
  check_dims(a.batch, a.channels, a.spatial);
  const std::int64_t elems = a.batch * a.channels * a.spatial;
  require((a.dy && a.x && a.dx) || elems == 0, "dy, x and dx are required");
  require(a.mean && a.invstd, "mean and invstd are required");
  require(!a.weight || (a.dweight && a.dbias), "dweight and dbias are required with weight");
  active_kernels().chan<T>().batch_norm_backward(a, threads_for_elems<T>(elems, 3));
}

template <class T>
static void group_norm_impl(const GroupNormForward<T>& a) {
  check_dims(a.batch, a.channels, a.spatial);
  check_groups(a.channels, a.groups);
  check_eps(a.eps);
  const std::int64_t elems = a.batch * a.channels * a.spatial;
  require((a.x && a.y) || elems == 0, "x and y are required");
  require(a.spatial >= 1 || a.batch == 0, "spatial must be >= 1: nothing to normalize");
  active_kernels().chan<T>().group_norm(a, threads_for_elems<T>(elems, 2));
}

template <class T>
static void group_norm_backward_impl(const GroupNormBackward<T>& a) {
  check_dims(a.batch, a.channels, a.spatial);
  check_groups(a.channels, a.groups);
  const std::int64_t elems = a.batch * a.channels * a.spatial;
  require((a.dy && a.x && a.dx && a.mean && a.rstd) || elems == 0,
          "dy, x, mean, rstd and dx are required");
  require(!a.weight || (a.dweight && a.dbias), "dweight and dbias are required with weight");
  active_kernels().chan<T>().group_norm_backward(a, threads_for_elems<T>(elems, 3));
}

template <class T>
static GroupNormForward<T> as_group(const InstanceNormForward<T>& a) {
  GroupNormForward<T> g;
  g.x = a.x, g.weight = a.weight, g.bias = a.bias, g.y = a.y, g.mean = a.mean, g.rstd = a.rstd;
  g.batch = a.batch, g.channels = a.channels, g.spatial = a.spatial, g.groups = a.channels;
  g.channels_last = a.channels_last, g.eps = a.eps;
  return g;
}

template <class T>
static GroupNormBackward<T> as_group(const InstanceNormBackward<T>& a) {
  GroupNormBackward<T> g;
  g.dy = a.dy, g.x = a.x, g.mean = a.mean, g.rstd = a.rstd, g.weight = a.weight;
  g.dx = a.dx, g.dweight = a.dweight, g.dbias = a.dbias;
  g.batch = a.batch, g.channels = a.channels, g.spatial = a.spatial, g.groups = a.channels;
  g.channels_last = a.channels_last;
  return g;
}

void batch_norm(const BatchNormForward<float>& a) { batch_norm_impl(a); }
void batch_norm(const BatchNormForward<double>& a) { batch_norm_impl(a); }
void batch_norm(const BatchNormForward<float16>& a) { batch_norm_impl(a); }
void batch_norm(const BatchNormForward<bfloat16>& a) { batch_norm_impl(a); }
void batch_norm_backward(const BatchNormBackward<float>& a) { batch_norm_backward_impl(a); }
void batch_norm_backward(const BatchNormBackward<double>& a) { batch_norm_backward_impl(a); }
void batch_norm_backward(const BatchNormBackward<float16>& a) { batch_norm_backward_impl(a); }
void batch_norm_backward(const BatchNormBackward<bfloat16>& a) { batch_norm_backward_impl(a); }
void group_norm(const GroupNormForward<float>& a) { group_norm_impl(a); }
void group_norm(const GroupNormForward<double>& a) { group_norm_impl(a); }
void group_norm(const GroupNormForward<float16>& a) { group_norm_impl(a); }
void group_norm(const GroupNormForward<bfloat16>& a) { group_norm_impl(a); }
void group_norm_backward(const GroupNormBackward<float>& a) { group_norm_backward_impl(a); }
void group_norm_backward(const GroupNormBackward<double>& a) { group_norm_backward_impl(a); }
void group_norm_backward(const GroupNormBackward<float16>& a) { group_norm_backward_impl(a); }
void group_norm_backward(const GroupNormBackward<bfloat16>& a) { group_norm_backward_impl(a); }
void instance_norm(const InstanceNormForward<float>& a) { group_norm_impl(as_group(a)); }
void instance_norm(const InstanceNormForward<double>& a) { group_norm_impl(as_group(a)); }
void instance_norm(const InstanceNormForward<float16>& a) { group_norm_impl(as_group(a)); }
void instance_norm(const InstanceNormForward<bfloat16>& a) { group_norm_impl(as_group(a)); }
void instance_norm_backward(const InstanceNormBackward<float>& a) { group_norm_backward_impl(as_group(a)); }
void instance_norm_backward(const InstanceNormBackward<double>& a) { group_norm_backward_impl(as_group(a)); }
void instance_norm_backward(const InstanceNormBackward<float16>& a) { group_norm_backward_impl(as_group(a)); }
void instance_norm_backward(const InstanceNormBackward<bfloat16>& a) { group_norm_backward_impl(as_group(a)); }

}  // namespace normlab
