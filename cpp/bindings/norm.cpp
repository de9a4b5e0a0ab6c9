// Bindings of the row-wise norms. The Python layer (normlab/norm.py) validates arguments and
// allocates outputs; these take the pointers, check dtypes and sizes, and release the GIL. The
// plain calls (PlainCall) are recognized and run here in one step.
#include "bindings.hpp"
#include "plain_call.hpp"
#include "normlab/norm.hpp"

namespace normlab::bindings {
namespace {

using py::handle;

template <class T>
void layer_norm_py(handle x, handle weight, handle bias, handle y, handle mean, handle rstd,
                   std::int64_t rows, std::int64_t cols, double eps) {
  LayerNormForward<T> a;
  a.x = input<T>(x, "x", rows * cols);
  a.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.bias = optional_input<param_t<T>>(bias, "bias", cols);
  a.y = output<T>(y, "out", rows * cols);
  a.mean = optional_output<param_t<T>>(mean, "mean", rows);
  a.rstd = optional_output<param_t<T>>(rstd, "rstd", rows);
  a.rows = rows;
  a.cols = cols;
  a.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  layer_norm(a);
}

template <class T>
void layer_norm_backward_py(handle dy, handle x, handle mean, handle rstd, handle weight, handle ds, handle dx,
                            handle dweight, handle dbias, std::int64_t rows, std::int64_t cols) {
  LayerNormBackward<T> a;
  a.dy = input<T>(dy, "dy", rows * cols);
  a.x = input<T>(x, "x", rows * cols);
  a.mean = input<param_t<T>>(mean, "mean", rows);
  a.rstd = input<param_t<T>>(rstd, "rstd", rows);
  a.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.ds = optional_input<T>(ds, "ds", rows * cols);
  a.dx = output<T>(dx, "dx", rows * cols);
  a.dweight = optional_output<param_t<T>>(dweight, "dweight", cols);
  a.dbias = optional_output<param_t<T>>(dbias, "dbias", cols);
  a.rows = rows;
  a.cols = cols;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  layer_norm_backward(a);
}

template <class T>
void rms_norm_py(handle x, handle weight, handle y, handle rstd, std::int64_t rows,
                 std::int64_t cols, double eps) {
  RmsNormForward<T> a;
  a.x = input<T>(x, "x", rows * cols);
  a.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.y = output<T>(y, "out", rows * cols);
  a.rstd = optional_output<param_t<T>>(rstd, "rstd", rows);
  a.rows = rows;
  a.cols = cols;
  a.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  rms_norm(a);
}

template <class T>
void rms_norm_backward_py(handle dy, handle x, handle rstd, handle weight, handle ds, handle dx,
                          handle dweight, std::int64_t rows, std::int64_t cols) {
  RmsNormBackward<T> a;
  a.dy = input<T>(dy, "dy", rows * cols);
  a.x = input<T>(x, "x", rows * cols);
  a.rstd = input<param_t<T>>(rstd, "rstd", rows);
  a.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.ds = optional_input<T>(ds, "ds", rows * cols);
  a.dx = output<T>(dx, "dx", rows * cols);
  a.dweight = optional_output<param_t<T>>(dweight, "dweight", cols);
  a.rows = rows;
  a.cols = cols;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  rms_norm_backward(a);
}

template <class T>
void add_layer_norm_py(handle x, handle residual, handle weight, handle bias, handle y, handle sum, handle mean,
                       handle rstd, std::int64_t rows, std::int64_t cols, double eps) {
  AddLayerNormForward<T> a;
  a.norm.x = input<T>(x, "x", rows * cols);
  a.residual = input<T>(residual, "residual", rows * cols);
  a.norm.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.norm.bias = optional_input<param_t<T>>(bias, "bias", cols);
  a.norm.y = output<T>(y, "out", rows * cols);
  a.sum = output<T>(sum, "sum_out", rows * cols);
  a.norm.mean = optional_output<param_t<T>>(mean, "mean", rows);
  a.norm.rstd = optional_output<param_t<T>>(rstd, "rstd", rows);
  a.norm.rows = rows;
  a.norm.cols = cols;
  a.norm.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  add_layer_norm(a);
}

template <class T>
void add_rms_norm_py(handle x, handle residual, handle weight, handle y, handle sum, handle rstd,
                     std::int64_t rows, std::int64_t cols, double eps) {
  AddRmsNormForward<T> a;
  a.norm.x = input<T>(x, "x", rows * cols);
  a.residual = input<T>(residual, "residual", rows * cols);
  a.norm.weight = optional_input<param_t<T>>(weight, "weight", cols);
  a.norm.y = output<T>(y, "out", rows * cols);
  a.sum = output<T>(sum, "sum_out", rows * cols);
  a.norm.rstd = optional_output<param_t<T>>(rstd, "rstd", rows);
  a.norm.rows = rows;
  a.norm.cols = cols;
  a.norm.eps = eps;
  std::optional<py::gil_scoped_release> release;
  if (rows * cols >= kReleaseGilElements) release.emplace();
  add_rms_norm(a);
}

py::object layer_norm_plain(handle x, handle weight, handle bias, handle out, handle eps, handle return_stats) {
  PlainCall p(x);
  p.forward(x, weight, bias, out, eps, return_stats);
  if (!p) return py::none();
  py::array y = p.result(out);
  py::object mean = p.requested_stat(), rstd = p.requested_stat();
  auto run = p.with_type([](auto t) { return &layer_norm_py<decltype(t)>; });
  run(x, weight, bias, y, mean, rstd, p.rows(), p.cols(), p.eps());
  if (p.stats()) return py::make_tuple(y, mean, rstd);
  return std::move(y);
}

py::object rms_norm_plain(handle x, handle weight, handle out, handle eps, handle return_stats) {
  PlainCall p(x);
  p.forward(x, weight, py::none(), out, eps, return_stats, true);
  if (!p) return py::none();
  py::array y = p.result(out);
  py::object rstd = p.requested_stat();
  auto run = p.with_type([](auto t) { return &rms_norm_py<decltype(t)>; });
  run(x, weight, y, rstd, p.rows(), p.cols(), p.eps());
  if (p.stats()) return py::make_tuple(y, rstd);
  return std::move(y);
}

py::object add_layer_norm_plain(handle x, handle residual, handle weight, handle bias, handle out, handle sum_out,
                                handle eps, handle return_stats) {
  PlainCall p(x);
  p.fused_forward(x, residual, weight, bias, out, sum_out, eps, return_stats);
  if (!p) return py::none();
  py::array y = p.result(out), s = p.result(sum_out);
  py::object mean = p.requested_stat(), rstd = p.requested_stat();
  auto run = p.with_type([](auto t) { return &add_layer_norm_py<decltype(t)>; });
  run(x, residual, weight, bias, y, s, mean, rstd, p.rows(), p.cols(), p.eps());
  if (p.stats()) return py::make_tuple(y, s, mean, rstd);
  return py::make_tuple(y, s);
}

py::object add_rms_norm_plain(handle x, handle residual, handle weight, handle out, handle sum_out, handle eps,
                              handle return_stats) {
  PlainCall p(x);
  p.fused_forward(x, residual, weight, py::none(), out, sum_out, eps, return_stats, true);
  if (!p) return py::none();
  py::array y = p.result(out), s = p.result(sum_out);
  py::object rstd = p.requested_stat();
  auto run = p.with_type([](auto t) { return &add_rms_norm_py<decltype(t)>; });
  run(x, residual, weight, y, s, rstd, p.rows(), p.cols(), p.eps());
  if (p.stats()) return py::make_tuple(y, s, rstd);
  return py::make_tuple(y, s);
}

// layer_norm_backward (ds None) and add_layer_norm_backward.
py::object layer_norm_backward_plain(handle dy, handle x, handle mean, handle rstd, handle weight, handle ds,
                                     handle out) {
  PlainCall p(x);
  p.data(dy);
  p.stat(mean);
  p.stat(rstd);
  p.param(weight);
  if (!ds.is_none()) p.data(ds);
  p.output(out, {dy, x, mean, rstd, weight, ds});
  if (!p) return py::none();
  py::array dx = p.result(out);
  py::object dweight = p.new_param(weight), dbias = p.new_param(weight);
  auto run = p.with_type([](auto t) { return &layer_norm_backward_py<decltype(t)>; });
  run(dy, x, mean, rstd, weight, ds, dx, dweight, dbias, p.rows(), p.cols());
  return py::make_tuple(dx, dweight, dbias);
}

// rms_norm_backward (ds None) and add_rms_norm_backward.
py::object rms_norm_backward_plain(handle dy, handle x, handle rstd, handle weight, handle ds, handle out) {
  PlainCall p(x);
  p.data(dy);
  p.stat(rstd);
  p.param(weight);
  if (!ds.is_none()) p.data(ds);
  p.output(out, {dy, x, rstd, weight, ds});
  if (!p) return py::none();
  py::array dx = p.result(out);
  py::object dweight = p.new_param(weight);
  auto run = p.with_type([](auto t) { return &rms_norm_backward_py<decltype(t)>; });
  run(dy, x, rstd, weight, ds, dx, dweight, p.rows(), p.cols());
  return py::make_tuple(dx, dweight);
}

template <class T>
void bind_dtype(py::module_& m, const std::string& suffix) {
  using py::arg;
  m.def(("layer_norm_" + suffix).c_str(), &layer_norm_py<T>, arg("x"), arg("weight"), arg("bias"),
        arg("y"), arg("mean"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"));
  m.def(("layer_norm_backward_" + suffix).c_str(), &layer_norm_backward_py<T>, arg("dy"), arg("x"),
        arg("mean"), arg("rstd"), arg("weight"), arg("ds"), arg("dx"), arg("dweight"), arg("dbias"),
        arg("rows"), arg("cols"));
  m.def(("rms_norm_" + suffix).c_str(), &rms_norm_py<T>, arg("x"), arg("weight"), arg("y"),
        arg("rstd"), arg("rows"), arg("cols"), arg("eps"));
  m.def(("rms_norm_backward_" + suffix).c_str(), &rms_norm_backward_py<T>, arg("dy"), arg("x"),
        arg("rstd"), arg("weight"), arg("ds"), arg("dx"), arg("dweight"), arg("rows"), arg("cols"));
  m.def(("add_layer_norm_" + suffix).c_str(), &add_layer_norm_py<T>, arg("x"), arg("residual"), arg("weight"),
        arg("bias"), arg("y"), arg("sum"), arg("mean"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"));
  m.def(("add_rms_norm_" + suffix).c_str(), &add_rms_norm_py<T>, arg("x"), arg("residual"), arg("weight"),
        arg("y"), arg("sum"), arg("rstd"), arg("rows"), arg("cols"), arg("eps"));
}

}  // namespace

void bind_norm(py::module_& m) {
  bind_dtype<float>(m, "f32");
  bind_dtype<double>(m, "f64");
  bind_dtype<float16>(m, "f16");
  bind_dtype<bfloat16>(m, "bf16");
  using py::arg;
  m.def("layer_norm_plain", &layer_norm_plain, arg("x"), arg("weight"), arg("bias"), arg("out"), arg("eps"),
        arg("return_stats"));
  m.def("rms_norm_plain", &rms_norm_plain, arg("x"), arg("weight"), arg("out"), arg("eps"), arg("return_stats"));
  m.def("add_layer_norm_plain", &add_layer_norm_plain, arg("x"), arg("residual"), arg("weight"), arg("bias"),
        arg("out"), arg("sum_out"), arg("eps"), arg("return_stats"));
  m.def("add_rms_norm_plain", &add_rms_norm_plain, arg("x"), arg("residual"), arg("weight"), arg("out"),
        arg("sum_out"), arg("eps"), arg("return_stats"));
  m.def("layer_norm_backward_plain", &layer_norm_backward_plain, arg("dy"), arg("x"), arg("mean"), arg("rstd"),
        arg("weight"), arg("ds"), arg("out"));
  m.def("rms_norm_backward_plain", &rms_norm_backward_plain, arg("dy"), arg("x"), arg("rstd"), arg("weight"),
        arg("ds"), arg("out"));
}

}  // namespace normlab::bindings
