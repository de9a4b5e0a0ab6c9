// Plain calls: x (and every data array: residual, dy, ds) a float32, float64, float16 or
// bfloat16 numpy.ndarray (the type, native byte order, C-contiguous, aligned) with elements;
// weight and bias None or of x's parameter dtype (float32 for the half types), C-contiguous, of
// shape (cols,) (the row norms' last axis, the channel norms' channels); statistics of the
// parameter dtype and their shape; out (and sum_out) None or x-like,
// writeable, overlapping no input (sum_out may be x or residual itself); eps a float in
// (0, inf) (or None, the dtype's machine epsilon, for rms); flags True or False. Such a call
// runs in one C++ step. Any other is turned down (None) and the Python layer checks it in full,
// naming what is wrong: the checks of a plain call cost more than a small call's kernel
// (layer_norm (4, 64): 1.3 us of 1.8 us; add_layer_norm: 8 us; batch_norm (2, 8, 4, 4): 3.3 us).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

#include "bindings.hpp"

namespace normlab::bindings {

class PlainCall {
 public:
  using handle = py::handle;

  // A row norm's x: normalized over its last axis, rows() rows of cols() elements.
  explicit PlainCall(handle x) {
    namespace pd = py::detail;
    a_ = array(x, -1);
    if (a_ && a_->nd >= 1) type_num_ = pd::array_descriptor_proxy(a_->descr)->type_num;
    kind_ = type_num_ == type_num<float>()    ? 0
            : type_num_ == type_num<double>() ? 1
            : type_num_ == type_num<float16>() ? 2
            : type_num_ >= 0 && type_num_ == bfloat16_num() ? 3
                                                : -1;
    if (kind_ < 0) {
      fail();
      return;
    }
    param_num_ = kind_ == 1 ? type_num_ : type_num<float>();
    cols_ = a_->dimensions[a_->nd - 1];
    rows_ = 1;
    for (int i = 0; i + 1 < a_->nd; ++i) rows_ *= a_->dimensions[i];
    if (cols_ == 0 || rows_ == 0) fail();
  }
  // A channel norm's x, (N, C, *spatial) with channel_axis the int 1 or (N, *spatial, C) with
  // -1 (as normlab.channel_norm._layout reads them): batch() x cols() channels x spatial().
  PlainCall(handle x, handle channel_axis) : PlainCall(x) {
    long axis = 0;
    if (a_ && a_->nd >= 2 && PyLong_CheckExact(channel_axis.ptr())) {
      axis = PyLong_AsLong(channel_axis.ptr());
      if (axis == -1 && PyErr_Occurred()) {  // overflow
        PyErr_Clear();
        axis = 0;
      }
    }
    if (axis != 1 && axis != -1) {
      fail();
      return;
    }
    const int nd = a_->nd, at = int((axis + nd) % nd);
    channels_last_ = at != 1;
    batch_ = a_->dimensions[0];
    cols_ = a_->dimensions[at];
    spatial_ = 1;
    for (int i = 1; i < nd; ++i)
      if (i != at) spatial_ *= a_->dimensions[i];
    if (batch_ * cols_ * spatial_ == 0) fail();
  }
  explicit operator bool() const { return a_ != nullptr; }
  // f(T()) with T x's element type.
  template <class F>
  decltype(auto) with_type(const F& f) const {
    switch (kind_) {
      case 0: return f(float());
      case 1: return f(double());
      case 2: return f(float16());
      default: return f(bfloat16());
    }
  }
  std::int64_t rows() const { return rows_; }
  std::int64_t batch() const { return batch_; }
  std::int64_t spatial() const { return spatial_; }
  bool channels_last() const { return channels_last_; }
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
    const py::detail::PyArray_Proxy* d = array(h, param_num_);
    if (!d || d->nd != 1 || d->dimensions[0] != cols_) fail();
  }
  // An array of x's leading shape.
  void stat(handle h) {
    const py::detail::PyArray_Proxy* d = a_ ? array(h, param_num_) : nullptr;
    if (!d || !same_dims(d, a_->nd - 1)) fail();
  }
  // An array of the given shape.
  void stat(handle h, std::initializer_list<std::int64_t> shape) {
    const py::detail::PyArray_Proxy* d = a_ ? array(h, param_num_) : nullptr;
    if (!d || d->nd != int(shape.size())) return fail();
    int i = 0;
    for (std::int64_t n : shape)
      if (d->dimensions[i++] != n) return fail();
  }
  // A flag: True or False.
  bool flag(handle h) {
    if (h.ptr() != Py_True && h.ptr() != Py_False) fail();
    return h.ptr() == Py_True;
  }
  // A float in [lo, hi].
  double real(handle h, double lo, double hi) {
    const double v = PyFloat_CheckExact(h.ptr()) ? PyFloat_AS_DOUBLE(h.ptr()) : lo - 1;
    if (!(v >= lo && v <= hi)) fail();
    return v;
  }
  // A positive int (not bool).
  std::int64_t count(handle h) {
    long long v = PyLong_CheckExact(h.ptr()) ? PyLong_AsLongLong(h.ptr()) : -1;
    if (v == -1 && PyErr_Occurred()) PyErr_Clear();
    if (v < 1) fail();
    return v;
  }
  void require(bool ok) {
    if (!ok) fail();
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
  // None, or a writeable array of shape (cols,) (a running statistic) that overlaps none of
  // `inputs`.
  void output_param(handle h, std::initializer_list<handle> inputs) {
    if (h.is_none() || !a_) return;
    param(h);
    if (!a_ || !(py::detail::array_proxy(h.ptr())->flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_)) return fail();
    for (handle in : inputs)
      if (overlaps(h, in)) return fail();
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
      eps_ = kind_ == 0 ? double(std::numeric_limits<float>::epsilon())
             : kind_ == 1 ? std::numeric_limits<double>::epsilon()
             : kind_ == 2 ? 0x1p-10  // numpy.finfo(float16).eps
                          : 0x1p-7;  // ml_dtypes.finfo(bfloat16).eps
    } else {
      fail();
    }
  }
  void return_stats(handle h) { stats_ = flag(h); }
  // The arguments every forward takes: weight and bias, out (overlapping neither them nor x),
  // eps and return_stats.
  void forward(handle x, handle weight, handle bias, handle out, handle eps, handle stats,
               bool none_eps_is_machine_eps = false) {
    param(weight);
    param(bias);
    output(out, {x, weight, bias});
    this->eps(eps, none_eps_is_machine_eps);
    return_stats(stats);
  }
  // The arguments of a fused add + norm forward: residual like x, weight and bias, sum_out
  // (sum_output), out (overlapping none of x, residual, sum_out, weight, bias), eps and
  // return_stats.
  void fused_forward(handle x, handle residual, handle weight, handle bias, handle out, handle sum_out,
                     handle eps, handle stats, bool none_eps_is_machine_eps = false) {
    data(residual);
    param(weight);
    param(bias);
    sum_output(sum_out, x, residual, {weight, bias});
    output(out, {x, residual, sum_out, weight, bias});
    this->eps(eps, none_eps_is_machine_eps);
    return_stats(stats);
  }
  // New statistics of x's leading shape where return_stats asked for them, else None.
  py::object requested_stat() const { return stats_ ? py::object(new_stat()) : py::object(py::none()); }

  // out, or a new array like x.
  py::array result(handle out) const {
    if (!out.is_none()) return py::reinterpret_borrow<py::array>(out);
    return empty_result(std::vector<py::ssize_t>(a_->dimensions, a_->dimensions + a_->nd), dtype());
  }
  py::array new_stat() const {
    return py::array(param_dtype(), std::vector<py::ssize_t>(a_->dimensions, a_->dimensions + a_->nd - 1));
  }
  py::array new_stat(std::initializer_list<py::ssize_t> shape) const {
    return py::array(param_dtype(), std::vector<py::ssize_t>(shape));
  }
  py::object new_param(handle weight) const {
    if (weight.is_none()) return py::none();
    return py::array(param_dtype(), std::vector<py::ssize_t>{cols_});
  }

 private:
  template <class T>
  static int type_num() {
    static const int num = dtype_of<T>().num();
    return num;
  }
  // ml_dtypes.bfloat16's number once ml_dtypes is imported (an array of it means it is), else -1.
  static int bfloat16_num() {
    static int num = -1;
    if (num < 0) {
      PyObject* module = PyImport_GetModule(py::str("ml_dtypes").ptr());
      if (module) {
        Py_DECREF(module);
        num = type_num<bfloat16>();
      } else if (PyErr_Occurred()) {
        PyErr_Clear();
      }
    }
    return num;
  }
  static const py::detail::PyArray_Proxy* array(handle h, int type_num) {
    namespace pd = py::detail;
    if (Py_TYPE(h.ptr()) != pd::npy_api::get().PyArray_Type_) return nullptr;
    const pd::PyArray_Proxy* a = pd::array_proxy(h.ptr());
    const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
    const char foreign = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';
    if ((type_num >= 0 && d->type_num != type_num) || d->byteorder == foreign) return nullptr;
    // Strided or misaligned arrays go the Python way (inputs copied, an out= refused).
    constexpr int usable = pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_ | pd::npy_api::NPY_ARRAY_ALIGNED_;
    return (a->flags & usable) == usable ? a : nullptr;
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
  py::dtype param_dtype() const { return kind_ == 1 ? dtype() : dtype_of<float>(); }
  void fail() { a_ = nullptr; }

  const py::detail::PyArray_Proxy* a_ = nullptr;
  int type_num_ = -1, param_num_ = -1;
  int kind_ = -1;  // x's element type: float, double, float16, bfloat16
  std::int64_t rows_ = 0, cols_ = 0, batch_ = 0, spatial_ = 0;
  bool channels_last_ = false;
  double eps_ = 0;
  bool stats_ = false;
};

}  // namespace normlab::bindings
