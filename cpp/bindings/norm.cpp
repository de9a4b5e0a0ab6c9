// Bindings of the row-wise norms. The Python layer (normlab/norm.py) validates arguments and
// allocates outputs; these take the pointers, check dtypes and sizes, and release the GIL. The
// plain calls (PlainCall) are recognized and run here in one step.
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

// Plain calls of the row norms: x (and every data array: residual, dy, ds) a float32 or float64
// numpy.ndarray (the type itself, native byte order, C-contiguous) with elements, normalized
// over its last axis; weight and bias None or of x's dtype, C-contiguous, of shape (cols,);
// statistics of x's dtype and leading shape; out (and sum_out) None or x-like, writeable,
// overlapping no input (sum_out may be x or residual itself); eps a float in (0, inf) (or None,
// the dtype's machine epsilon, for rms); return_stats True or False. Such a call runs here in
// one step. Any other is turned down (None) and the Python layer checks it in full, naming
// what is wrong: the checks of a plain call cost more than a small call's kernel (layer_norm
// (4, 64): 1.3 us of 1.8 us; add_layer_norm: 8 us).
class PlainCall {
 public:
  explicit PlainCall(handle x) {
    namespace pd = py::detail;
    a_ = array(x, -1);
    if (a_ && a_->nd >= 1) type_num_ = pd::array_descriptor_proxy(a_->descr)->type_num;
    if (type_num_ != float_num() && type_num_ != double_num()) {
      fail();
      return;
    }
    cols_ = a_->dimensions[a_->nd - 1];
    rows_ = 1;
    for (int i = 0; i + 1 < a_->nd; ++i) rows_ *= a_->dimensions[i];
    if (cols_ == 0 || rows_ == 0) fail();
  }
  explicit operator bool() const { return a_ != nullptr; }
  bool is_float() const { return type_num_ == float_num(); }
  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  double eps() const { return eps_; }
  bool stats() const { return stats_; }

  // An array of x's dtype and shape.
  void data(handle h) {
    const py::detail::PyArray_Proxy* d = a_ ? array(h, type_num_) : nullptr;
    if (!d || !same_dims(d, a_->nd)) fail();
  }
  // None or an array of shape (cols,).
  void param(handle h) {
    if (h.is_none() || !a_) return;
    const py::detail::PyArray_Proxy* d = array(h, type_num_);
    if (!d || d->nd != 1 || d->dimensions[0] != cols_) fail();
  }
  // An array of x's leading shape.
  void stat(handle h) {
    const py::detail::PyArray_Proxy* d = a_ ? array(h, type_num_) : nullptr;
    if (!d || !same_dims(d, a_->nd - 1)) fail();
  }
  // None, or a writeable array of x's dtype and shape that overlaps none of `inputs` (arrays
  // checked before, or None).
  void output(handle h, std::initializer_list<handle> inputs) {
    if (h.is_none() || !a_) return;
    const py::detail::PyArray_Proxy* d = array(h, type_num_);
    if (!d || !same_dims(d, a_->nd) || !(d->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_)) {
      fail();
      return;
    }
    for (handle in : inputs)
      if (overlaps(h, in)) fail();
  }
  // sum_out of a fused add: None, x or residual itself (the same elements), or an output.
  void sum_output(handle h, handle x, handle residual, std::initializer_list<handle> params) {
    if (h.is_none() || !a_) return;
    const py::detail::PyArray_Proxy* d = array(h, type_num_);
    if (d && same_dims(d, a_->nd) && (same_elements(h, x) || same_elements(h, residual))) {
      if (!(d->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_)) fail();
    } else {
      output(h, {x, residual});
      if (!a_) return;
    }
    for (handle in : params)
      if (overlaps(h, in)) fail();
  }
  void eps(handle h, bool none_is_machine_eps) {
    if (PyFloat_CheckExact(h.ptr())) {
      eps_ = PyFloat_AS_DOUBLE(h.ptr());
      if (!(eps_ > 0.0 && eps_ < std::numeric_limits<double>::infinity())) fail();
    } else if (h.is_none() && none_is_machine_eps) {
      eps_ = is_float() ? double(std::numeric_limits<float>::epsilon()) : std::numeric_limits<double>::epsilon();
    } else {
      fail();
    }
  }
  void return_stats(handle h) {
    if (h.ptr() != Py_True && h.ptr() != Py_False) fail();
    stats_ = h.ptr() == Py_True;
  }

  // out, or a new array like x.
  py::array result(handle out) const {
    if (!out.is_none()) return py::reinterpret_borrow<py::array>(out);
    return empty_result(std::vector<py::ssize_t>(a_->dimensions, a_->dimensions + a_->nd), dtype());
  }
  py::array new_stat() const {
    return py::array(dtype(), std::vector<py::ssize_t>(a_->dimensions, a_->dimensions + a_->nd - 1));
  }
  py::object new_param(handle weight) const {
    if (weight.is_none()) return py::none();
    return py::array(dtype(), std::vector<py::ssize_t>{cols_});
  }

 private:
  static int float_num() {
    static const int num = dtype_of<float>().num();
    return num;
  }
  static int double_num() {
    static const int num = dtype_of<double>().num();
    return num;
  }
  static const py::detail::PyArray_Proxy* array(handle h, int type_num) {
    namespace pd = py::detail;
    if (Py_TYPE(h.ptr()) != pd::npy_api::get().PyArray_Type_) return nullptr;
    const pd::PyArray_Proxy* a = pd::array_proxy(h.ptr());
    const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
    const char foreign = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';
    if ((type_num >= 0 && d->type_num != type_num) || d->byteorder == foreign) return nullptr;
    return (a->flags & pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_) ? a : nullptr;
  }
  bool same_dims(const py::detail::PyArray_Proxy* d, int nd) const {
    if (d->nd != nd) return false;
    for (int i = 0; i < nd; ++i)
      if (d->dimensions[i] != a_->dimensions[i]) return false;
    return true;
  }
  static bool same_elements(handle a, handle b) {
    return py::detail::array_proxy(a.ptr())->data == py::detail::array_proxy(b.ptr())->data;
  }
  static bool overlaps(handle a, handle b) {
    if (b.is_none()) return false;
    const auto [a_lo, a_hi] = memory_extent(a);
    const auto [b_lo, b_hi] = memory_extent(b);
    return a_lo < b_hi && b_lo < a_hi;
  }
  py::dtype dtype() const { return py::reinterpret_borrow<py::dtype>(a_->descr); }
  void fail() { a_ = nullptr; }

  const py::detail::PyArray_Proxy* a_ = nullptr;
  int type_num_ = -1;
  std::int64_t rows_ = 0, cols_ = 0;
  double eps_ = 0;
  bool stats_ = false;
};

py::object layer_norm_plain(handle x, handle weight, handle bias, handle out, handle eps, handle return_stats) {
  PlainCall p(x);
  p.param(weight);
  p.param(bias);
  p.output(out, {x, weight, bias});
  p.eps(eps, false);
  p.return_stats(return_stats);
  if (!p) return py::none();
  py::array y = p.result(out);
  auto run = p.is_float() ? &layer_norm_py<float> : &layer_norm_py<double>;
  if (!p.stats()) {
    run(x, weight, bias, y, py::none(), py::none(), p.rows(), p.cols(), p.eps());
    return std::move(y);
  }
  py::array mean = p.new_stat(), rstd = p.new_stat();
  run(x, weight, bias, y, mean, rstd, p.rows(), p.cols(), p.eps());
  return py::make_tuple(y, mean, rstd);
}

py::object rms_norm_plain(handle x, handle weight, handle out, handle eps, handle return_stats) {
  PlainCall p(x);
  p.param(weight);
  p.output(out, {x, weight});
  p.eps(eps, true);
  p.return_stats(return_stats);
  if (!p) return py::none();
  py::array y = p.result(out);
  auto run = p.is_float() ? &rms_norm_py<float> : &rms_norm_py<double>;
  if (!p.stats()) {
    run(x, weight, y, py::none(), p.rows(), p.cols(), p.eps());
    return std::move(y);
  }
  py::array rstd = p.new_stat();
  run(x, weight, y, rstd, p.rows(), p.cols(), p.eps());
  return py::make_tuple(y, rstd);
}

py::object add_layer_norm_plain(handle x, handle residual, handle weight, handle bias, handle out, handle sum_out,
                                handle eps, handle return_stats) {
  PlainCall p(x);
  p.data(residual);
  p.param(weight);
  p.param(bias);
  p.sum_output(sum_out, x, residual, {weight, bias});
  p.output(out, {x, residual, sum_out, weight, bias});
  p.eps(eps, false);
  p.return_stats(return_stats);
  if (!p) return py::none();
  py::array y = p.result(out), s = p.result(sum_out);
  auto run = p.is_float() ? &add_layer_norm_py<float> : &add_layer_norm_py<double>;
  if (!p.stats()) {
    run(x, residual, weight, bias, y, s, py::none(), py::none(), p.rows(), p.cols(), p.eps());
    return py::make_tuple(y, s);
  }
  py::array mean = p.new_stat(), rstd = p.new_stat();
  run(x, residual, weight, bias, y, s, mean, rstd, p.rows(), p.cols(), p.eps());
  return py::make_tuple(y, s, mean, rstd);
}

py::object add_rms_norm_plain(handle x, handle residual, handle weight, handle out, handle sum_out, handle eps,
                              handle return_stats) {
  PlainCall p(x);
  p.data(residual);
  p.param(weight);
  p.sum_output(sum_out, x, residual, {weight});
  p.output(out, {x, residual, sum_out, weight});
  p.eps(eps, true);
  p.return_stats(return_stats);
  if (!p) return py::none();
  py::array y = p.result(out), s = p.result(sum_out);
  auto run = p.is_float() ? &add_rms_norm_py<float> : &add_rms_norm_py<double>;
  if (!p.stats()) {
    run(x, residual, weight, y, s, py::none(), p.rows(), p.cols(), p.eps());
    return py::make_tuple(y, s);
  }
  py::array rstd = p.new_stat();
  run(x, residual, weight, y, s, rstd, p.rows(), p.cols(), p.eps());
  return py::make_tuple(y, s, rstd);
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
  auto run = p.is_float() ? &layer_norm_backward_py<float> : &layer_norm_backward_py<double>;
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
  auto run = p.is_float() ? &rms_norm_backward_py<float> : &rms_norm_backward_py<double>;
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
