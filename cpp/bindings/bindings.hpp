// Shared helpers of the pybind11 bindings: typed array arguments that never convert, and
// size checks that keep a bad call from reaching a kernel.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "normlab/norm.hpp"

namespace normlab::bindings {

namespace py = pybind11;

template <class T>
using carray = py::array_t<T, py::array::c_style>;

inline void require_size(std::int64_t size, std::int64_t expected, const char* name) {
  if (size != expected)
    throw py::value_error(std::string(name) + " has " + std::to_string(size) + " elements, expected " +
                          std::to_string(expected));
}

// The NumPy dtype of element type T: float32/float64, numpy.float16, ml_dtypes.bfloat16
// (imported on first use; the Python layer only passes bfloat16 arrays when it is installed).
template <class T>
py::dtype dtype_of() {
  if constexpr (std::is_same<T, float16>::value) return py::dtype("float16");
  else if constexpr (std::is_same<T, bfloat16>::value)
    return py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  else return py::dtype::of<T>();
}

// The data of a NumPy array argument that must already be C-contiguous, of dtype T in native
// byte order, hold `size` elements and, for outputs, be writeable. Nothing is ever converted:
// a mismatch raises. Reads only the array header, so a call costs nanoseconds.
template <class T>
T* array_data(py::handle h, const char* name, std::int64_t size, bool writeable) {
  namespace pd = py::detail;
  static const int type_num = dtype_of<T>().num();
  if (!pd::npy_api::get().PyArray_Check_(h.ptr()))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray");
  const pd::PyArray_Proxy* a = pd::array_proxy(h.ptr());
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  const bool native = d->byteorder != (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<');
  if (d->type_num != type_num || !native)
    throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(dtype_of<T>())));
  if (!(a->flags & pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (writeable && !(a->flags & pd::npy_api::NPY_ARRAY_WRITEABLE_))
    throw py::value_error(std::string(name) + " is read-only");
  std::int64_t n = 1;
  for (int i = 0; i < a->nd; ++i) n *= a->dimensions[i];
  require_size(n, size, name);
  return reinterpret_cast<T*>(a->data);
}

template <class T>
const T* input(py::handle h, const char* name, std::int64_t size) {
  return array_data<T>(h, name, size, false);
}
template <class T>
const T* optional_input(py::handle h, const char* name, std::int64_t size) {
  return h.is_none() ? nullptr : array_data<T>(h, name, size, false);
}
template <class T>
T* output(py::handle h, const char* name, std::int64_t size) {
  return array_data<T>(h, name, size, true);
}
template <class T>
T* optional_output(py::handle h, const char* name, std::int64_t size) {
  return h.is_none() ? nullptr : array_data<T>(h, name, size, true);
}

// The bytes [lo, hi) the elements of the NumPy array `h` can touch, as numpy.may_share_memory
// bounds them; lo == hi for an empty array. Reads the array header only.
inline std::pair<std::uintptr_t, std::uintptr_t> memory_extent(py::handle h) {
  const py::detail::PyArray_Proxy* a = py::detail::array_proxy(h.ptr());
  std::uintptr_t lo = reinterpret_cast<std::uintptr_t>(a->data);
  std::uintptr_t hi = lo;
  for (int i = 0; i < a->nd; ++i) {
    if (a->dimensions[i] == 0) return {lo, lo};
    const py::ssize_t reach = (a->dimensions[i] - 1) * a->strides[i];
    (reach < 0 ? lo : hi) += reach;
  }
  return {lo, hi + std::uintptr_t(py::reinterpret_borrow<py::dtype>(a->descr).itemsize())};
}

inline bool is_ndarray(py::handle h) { return py::detail::npy_api::get().PyArray_Check_(h.ptr()); }

// An uninitialized C-contiguous array of `shape` and `dtype`, as numpy.empty, for results.
py::array empty_result(const std::vector<py::ssize_t>& shape, const py::dtype& dtype);

// Calls below this many elements keep the GIL: releasing it costs more than they take.
constexpr std::int64_t kReleaseGilElements = 1 << 14;

void bind_runtime(py::module_& m);
void bind_norm(py::module_& m);
void bind_channel_norm(py::module_& m);
void bind_ccl(py::module_& m);

}  // namespace normlab::bindings
