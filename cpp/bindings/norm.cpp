// Bindings of the row-wise norms. The Python layer (normlab/norm.py) validates arguments and
// allocates outputs; these take the pointers, check dtypes and sizes, and release the GIL. The
// plain forward calls (layer_norm_plain, rms_norm_plain) are recognized and run here in one step.
#include <initializer_list>
#include <limits>
#include <vector>

#include "bindings.hpp"
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

// The plain call of a row-norm forward: x a float32 or float64 numpy.ndarray (the type itself,
// native byte order, C-contiguous, at least 1-D, with elements) normalized over its last axis;
// parameters None or of x's dtype, C-contiguous, of shape (cols,); out None or such an array of
// x's shape, writeable, overlapping no input; eps a float in (0, inf) (or None, the dtype's
// machine epsilon, where none_eps_is_machine_eps); return_stats True or False. Such a call runs here in one
// step; any other is turned down (None) and the Python layer checks it in full, naming what is
// wrong: the checks of a plain call cost more than a small call's kernel (4 x 64: 1.3 us of
// 1.8 us).
struct PlainRows {
  const py::detail::PyArray_Proxy* x = nullptr;
  std::int64_t rows = 0, cols = 0;
  double eps = 0;
  bool stats = false;
};

inline const py::detail::PyArray_Proxy* plain_array(handle h, int type_num) {
  namespace pd = py::detail;
  if (Py_TYPE(h.ptr()) != pd::npy_api::get().PyArray_Type_) return nullptr;
  const pd::PyArray_Proxy* a = pd::array_proxy(h.ptr());
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  const char foreign = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';
  if ((type_num >= 0 && d->type_num != type_num) || d->byteorder == foreign) return nullptr;
  return (a->flags & pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_) ? a : nullptr;
}

inline bool overlaps(handle a, handle b) {
  if (b.is_none()) return false;
  const auto [a_lo, a_hi] = memory_extent(a);
  const auto [b_lo, b_hi] = memory_extent(b);
  return a_lo < b_hi && b_lo < a_hi;
}

// x, eps and return_stats of a plain call, with params checked; x == nullptr if it is not one.
inline PlainRows plain_rows(handle x, std::initializer_list<handle> params, handle out, handle eps,
                            handle return_stats, bool none_eps_is_machine_eps) {
  namespace pd = py::detail;
  static const int float_num = dtype_of<float>().num(), double_num = dtype_of<double>().num();
  PlainRows p;
  const pd::PyArray_Proxy* a = plain_array(x, -1);
  if (!a || a->nd < 1 || (pd::array_descriptor_proxy(a->descr)->type_num != float_num &&
                          pd::array_descriptor_proxy(a->descr)->type_num != double_num))
    return p;
  const int type_num = pd::array_descriptor_proxy(a->descr)->type_num;
  if (return_stats.ptr() != Py_True && return_stats.ptr() != Py_False) return p;
  if (PyFloat_CheckExact(eps.ptr())) {
    p.eps = PyFloat_AS_DOUBLE(eps.ptr());
    if (!(p.eps > 0.0 && p.eps < std::numeric_limits<double>::infinity())) return p;
  } else if (eps.is_none() && none_eps_is_machine_eps) {
    p.eps = type_num == float_num ? double(std::numeric_limits<float>::epsilon())
                                  : std::numeric_limits<double>::epsilon();
  } else {
    return p;
  }
  const std::int64_t cols = a->dimensions[a->nd - 1];
  std::int64_t rows = 1;
  for (int i = 0; i + 1 < a->nd; ++i) rows *= a->dimensions[i];
  if (cols == 0 || rows == 0) return p;
  for (handle w : params) {
    if (w.is_none()) continue;
    const pd::PyArray_Proxy* wa = plain_array(w, type_num);
    if (!wa || wa->nd != 1 || wa->dimensions[0] != cols) return p;
  }
  if (!out.is_none()) {
    const pd::PyArray_Proxy* o = plain_array(out, type_num);
    if (!o || o->nd != a->nd || !(o->flags & pd::npy_api::NPY_ARRAY_WRITEABLE_)) return p;
    for (int i = 0; i < a->nd; ++i)
      if (o->dimensions[i] != a->dimensions[i]) return p;
    if (overlaps(out, x)) return p;
    for (handle w : params)
      if (overlaps(out, w)) return p;
  }
  p.x = a;
  p.rows = rows;
  p.cols = cols;
  p.stats = return_stats.ptr() == Py_True;
  return p;
}

// The output of a plain call (out, or a new array like x) and, with stats, new arrays of x's
// leading shape.
inline py::array plain_result(const PlainRows& p, handle x, handle out) {
  if (!out.is_none()) return py::reinterpret_borrow<py::array>(out);
  const std::vector<py::ssize_t> shape(p.x->dimensions, p.x->dimensions + p.x->nd);
  return empty_result(shape, py::reinterpret_borrow<py::dtype>(p.x->descr));
}
inline py::array plain_stat(const PlainRows& p) {
  const std::vector<py::ssize_t> lead(p.x->dimensions, p.x->dimensions + p.x->nd - 1);
  return py::array(py::reinterpret_borrow<py::dtype>(p.x->descr), lead);
}
inline bool is_float(const PlainRows& p) {
  return py::detail::array_descriptor_proxy(p.x->descr)->type_num == dtype_of<float>().num();
}

py::object layer_norm_plain(handle x, handle weight, handle bias, handle out, handle eps, handle return_stats) {
  const PlainRows p = plain_rows(x, {weight, bias}, out, eps, return_stats, false);
  if (!p.x) return py::none();
  py::array y = plain_result(p, x, out);
  handle none = py::none();
  auto run = is_float(p) ? &layer_norm_py<float> : &layer_norm_py<double>;
  if (!p.stats) {
    run(x, weight, bias, y, none, none, p.rows, p.cols, p.eps);
    return std::move(y);
  }
  py::array mean = plain_stat(p), rstd = plain_stat(p);
  run(x, weight, bias, y, mean, rstd, p.rows, p.cols, p.eps);
  return py::make_tuple(y, mean, rstd);
}

py::object rms_norm_plain(handle x, handle weight, handle out, handle eps, handle return_stats) {
  const PlainRows p = plain_rows(x, {weight}, out, eps, return_stats, true);
  if (!p.x) return py::none();
  py::array y = plain_result(p, x, out);
  auto run = is_float(p) ? &rms_norm_py<float> : &rms_norm_py<double>;
  if (!p.stats) {
    run(x, weight, y, py::none(), p.rows, p.cols, p.eps);
    return std::move(y);
  }
  py::array rstd = plain_stat(p);
  run(x, weight, y, rstd, p.rows, p.cols, p.eps);
  return py::make_tuple(y, rstd);
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
}

}  // namespace normlab::bindings
