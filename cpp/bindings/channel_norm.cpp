// Bindings of the channel norms (batch, instance, group). The Python layer
// (normlab/channel_norm.py) validates arguments and allocates outputs; these take the pointers,
// check dtypes and sizes, and release the GIL. instance_norm is group_norm with groups ==
// channels, so it has no bindings of its own.
#include "bindings.hpp"
#include "normlab/norm.hpp"

namespace normlab::bindings {
namespace {

using py::handle;
using i64 = std::int64_t;

template <class T>
void batch_norm_py(handle x, handle weight, handle bias, handle y, handle mean, handle invstd,
                   handle running_mean, handle running_var, i64 batch, i64 channels, i64 spatial,
                   bool channels_last, bool training, double momentum, double eps) {
  BatchNormForward<T> a;
  const i64 n = batch * channels * spatial;
  a.x = input<T>(x, "x", n);
  a.weight = optional_input<param_t<T>>(weight, "weight", channels);
  a.bias = optional_input<param_t<T>>(bias, "bias", channels);
  a.y = output<T>(y, "out", n);
  a.mean = optional_output<param_t<T>>(mean, "mean", channels);
  a.invstd = optional_output<param_t<T>>(invstd, "invstd", channels);
  a.running_mean = optional_output<param_t<T>>(running_mean, "running_mean", channels);
  a.running_var = optional_output<param_t<T>>(running_var, "running_var", channels);
  a.batch = batch, a.channels = channels, a.spatial = spatial;
  a.channels_last = channels_last, a.training = training, a.momentum = momentum, a.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (n >= kReleaseGilElements) release.emplace();
  batch_norm(a);
}

template <class T>
void batch_norm_backward_py(handle dy, handle x, handle mean, handle invstd, handle weight, handle dx,
                            handle dweight, handle dbias, i64 batch, i64 channels, i64 spatial,
                            bool channels_last, bool training) {
  BatchNormBackward<T> a;
  const i64 n = batch * channels * spatial;
  a.dy = input<T>(dy, "dy", n);
  a.x = input<T>(x, "x", n);
  a.mean = input<param_t<T>>(mean, "mean", channels);
  a.invstd = input<param_t<T>>(invstd, "invstd", channels);
  a.weight = optional_input<param_t<T>>(weight, "weight", channels);
  a.dx = output<T>(dx, "dx", n);
  a.dweight = optional_output<param_t<T>>(dweight, "dweight", channels);
  a.dbias = optional_output<param_t<T>>(dbias, "dbias", channels);
  a.batch = batch, a.channels = channels, a.spatial = spatial;
  a.channels_last = channels_last, a.training = training;
  std::optional<py::gil_scoped_release> release;
  if (n >= kReleaseGilElements) release.emplace();
  batch_norm_backward(a);
}

template <class T>
void group_norm_py(handle x, handle weight, handle bias, handle y, handle mean, handle rstd, i64 batch,
                   i64 channels, i64 spatial, i64 groups, bool channels_last, double eps) {
  GroupNormForward<T> a;
  const i64 n = batch * channels * spatial;
  if (groups < 1) throw py::value_error("num_groups must be >= 1");
  a.x = input<T>(x, "x", n);
  a.weight = optional_input<param_t<T>>(weight, "weight", channels);
  a.bias = optional_input<param_t<T>>(bias, "bias", channels);
  a.y = output<T>(y, "out", n);
  a.mean = optional_output<param_t<T>>(mean, "mean", batch * groups);
  a.rstd = optional_output<param_t<T>>(rstd, "rstd", batch * groups);
  a.batch = batch, a.channels = channels, a.spatial = spatial, a.groups = groups;
  a.channels_last = channels_last, a.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (n >= kReleaseGilElements) release.emplace();
  group_norm(a);
}

template <class T>
void group_norm_backward_py(handle dy, handle x, handle mean, handle rstd, handle weight, handle dx,
                            handle dweight, handle dbias, i64 batch, i64 channels, i64 spatial,
                            i64 groups, bool channels_last) {
  GroupNormBackward<T> a;
  const i64 n = batch * channels * spatial;
  if (groups < 1) throw py::value_error("num_groups must be >= 1");
  a.dy = input<T>(dy, "dy", n);
  a.x = input<T>(x, "x", n);
  a.mean = input<param_t<T>>(mean, "mean", batch * groups);
  a.rstd = input<param_t<T>>(rstd, "rstd", batch * groups);
  a.weight = optional_input<param_t<T>>(weight, "weight", channels);
  a.dx = output<T>(dx, "dx", n);
  a.dweight = optional_output<param_t<T>>(dweight, "dweight", channels);
  a.dbias = optional_output<param_t<T>>(dbias, "dbias", channels);
  a.batch = batch, a.channels = channels, a.spatial = spatial, a.groups = groups;
  a.channels_last = channels_last;
  std::optional<py::gil_scoped_release> release;
  if (n >= kReleaseGilElements) release.emplace();
  group_norm_backward(a);
}

template <class T>
void bind_dtype(py::module_& m, const std::string& suffix) {
  using py::arg;
  m.def(("batch_norm_" + suffix).c_str(), &batch_norm_py<T>, arg("x"), arg("weight"), arg("bias"),
        arg("y"), arg("mean"), arg("invstd"), arg("running_mean"), arg("running_var"), arg("batch"),
        arg("channels"), arg("spatial"), arg("channels_last"), arg("training"), arg("momentum"),
        arg("eps"));
  m.def(("batch_norm_backward_" + suffix).c_str(), &batch_norm_backward_py<T>, arg("dy"), arg("x"),
        arg("mean"), arg("invstd"), arg("weight"), arg("dx"), arg("dweight"), arg("dbias"),
        arg("batch"), arg("channels"), arg("spatial"), arg("channels_last"), arg("training"));
  m.def(("group_norm_" + suffix).c_str(), &group_norm_py<T>, arg("x"), arg("weight"), arg("bias"),
        arg("y"), arg("mean"), arg("rstd"), arg("batch"), arg("channels"), arg("spatial"),
        arg("groups"), arg("channels_last"), arg("eps"));
  m.def(("group_norm_backward_" + suffix).c_str(), &group_norm_backward_py<T>, arg("dy"), arg("x"),
        arg("mean"), arg("rstd"), arg("weight"), arg("dx"), arg("dweight"), arg("dbias"),
        arg("batch"), arg("channels"), arg("spatial"), arg("groups"), arg("channels_last"));
}

}  // namespace

void bind_channel_norm(py::module_& m) {
  bind_dtype<float>(m, "f32");
  bind_dtype<double>(m, "f64");
  bind_dtype<float16>(m, "f16");
  bind_dtype<bfloat16>(m, "bf16");
}

}  // namespace normlab::bindings
