// Bindings of connected-component labelling. The Python layer (normlab/ccl.py) validates
// arguments and allocates outputs; these read the image header in place (any integer or bool
// dtype, any strides), check the outputs, release the GIL and call the C++ core.
#include <memory>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "ccl/ccl_request.hpp"
#include "normlab/ccl.hpp"

namespace normlab::bindings {
namespace {

namespace pd = py::detail;

const pd::PyArray_Proxy* array_header(py::handle h, const char* name) {
  if (!pd::npy_api::get().PyArray_Check_(h.ptr()))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray");
  return pd::array_proxy(h.ptr());
}

int itemsize(py::handle h) { return int(py::reinterpret_borrow<py::array>(h).itemsize()); }

bool native_order(const pd::PyArrayDescr_Proxy* d) {
  return d->byteorder != (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<');
}

// A 2-D bool or integer array read in place; background is the raw bit pattern of the
// background value in the array's own byte order.
ImageView image_view(py::handle h, std::uint64_t background) {
  const pd::PyArray_Proxy* a = array_header(h, "image");
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  if (a->nd != 2) throw py::type_error("image must be 2-D, got " + std::to_string(a->nd) + "-D");
  if (d->kind != 'b' && d->kind != 'i' && d->kind != 'u')
    throw py::type_error("image must have a bool or integer dtype");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_ALIGNED_))  // the Python layer copies such an image
    throw py::value_error("image must be aligned to its dtype");
  ImageView im;
  im.data = a->data;
  im.pixel_bytes = itemsize(h);
  im.rows = a->dimensions[0];
  im.cols = a->dimensions[1];
  im.row_stride = a->strides[0];
  im.col_stride = a->strides[1];
  im.background = background;
  return im;
}

LabelType label_type_of(py::handle h, const char* name) {
  const pd::PyArray_Proxy* a = array_header(h, name);
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  if ((d->kind == 'i' || d->kind == 'u') && native_order(d)) {
    const bool u = d->kind == 'u';
    switch (itemsize(h)) {
      case 1: return u ? LabelType::u8 : LabelType::i8;
      case 2: return u ? LabelType::u16 : LabelType::i16;
      case 4: return u ? LabelType::u32 : LabelType::i32;
      case 8: return u ? LabelType::u64 : LabelType::i64;
      default: break;
    }
  }
  throw py::type_error(std::string(name) + " must have a native-order integer dtype");
}

// The data of a C-contiguous, writeable rows x cols output array with elsize-byte elements.
void* output_2d(py::handle h, const char* name, const ImageView& im, int elsize) {
  const pd::PyArray_Proxy* a = array_header(h, name);
  const pd::PyArrayDescr_Proxy* d = pd::array_descriptor_proxy(a->descr);
  if (a->nd != 2 || a->dimensions[0] != im.rows || a->dimensions[1] != im.cols)
    throw py::value_error(std::string(name) + " must have the image's shape");
  if (itemsize(h) != elsize) throw py::type_error(std::string(name) + " has the wrong dtype");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error(std::string(name) + " must be aligned to its dtype");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_WRITEABLE_))
    throw py::value_error(std::string(name) + " is read-only");
  return a->data;
}

template <class T>
py::array to_numpy(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* owned = new std::vector<T>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), owned->data(), owner);
}

py::dict stats_dict(ComponentStats&& st) {
  const py::ssize_t n = py::ssize_t(st.area.size());
  py::dict out;
  out["area"] = to_numpy(std::move(st.area), {n});
  out["bbox"] = to_numpy(std::move(st.bbox), {n, 4});
  out["centroid"] = to_numpy(std::move(st.centroid), {n, 2});
  return out;
}

bool release_gil(const ImageView& im) { return im.rows * im.cols >= kReleaseGilElements; }

py::tuple label_py(py::handle image, std::uint64_t background, int connectivity, py::handle labels,
                   bool want_stats) {
  const ImageView im = image_view(image, background);
  const LabelType lt = label_type_of(labels, "out");
  int elsize = 0;
  switch (lt) {
    case LabelType::u16: elsize = 2; break;
    case LabelType::u32: case LabelType::i32: elsize = 4; break;
    case LabelType::u64: case LabelType::i64: elsize = 8; break;
    default: throw py::type_error("out must have dtype uint16, uint32, int32, int64 or uint64");
  }
  void* out = output_2d(labels, "out", im, elsize);
  ComponentStats st;
  std::int64_t count;
  {
    std::optional<py::gil_scoped_release> release;
    if (release_gil(im)) release.emplace();
    count = label(im, connectivity, lt, out, want_stats ? &st : nullptr);
  }
  if (!want_stats) return py::make_tuple(count, py::none());
  return py::make_tuple(count, stats_dict(std::move(st)));
}

std::int64_t largest_py(py::handle image, std::uint64_t background, int connectivity, py::handle mask) {
  const ImageView im = image_view(image, background);
  const pd::PyArray_Proxy* a = array_header(mask, "out");
  if (pd::array_descriptor_proxy(a->descr)->kind != 'b') throw py::type_error("out must have dtype bool");
  bool* out = static_cast<bool*>(output_2d(mask, "out", im, 1));
  std::optional<py::gil_scoped_release> release;
  if (release_gil(im)) release.emplace();
  return largest_component(im, connectivity, out);
}

std::int64_t remove_small_py(py::handle image, std::uint64_t background, std::int64_t min_size,
                             int connectivity, py::handle out_arr) {
  const ImageView im = image_view(image, background);
  void* out = output_2d(out_arr, "out", im, im.pixel_bytes);
  std::optional<py::gil_scoped_release> release;
  if (release_gil(im)) release.emplace();
  return remove_small_components(im, min_size, connectivity, out);
}

py::dict component_stats_py(py::handle labels, std::int64_t count) {
  const pd::PyArray_Proxy* a = array_header(labels, "labels");
  const LabelType lt = label_type_of(labels, "labels");
  if (a->nd != 2) throw py::type_error("labels must be 2-D");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
    throw py::value_error("labels must be C-contiguous");
  if (!(a->flags & pd::npy_api::NPY_ARRAY_ALIGNED_))
    throw py::value_error("labels must be aligned to its dtype");
  const std::int64_t rows = a->dimensions[0], cols = a->dimensions[1];
  const void* data = a->data;
  ComponentStats st;
  {
    std::optional<py::gil_scoped_release> release;
    if (rows * cols >= kReleaseGilElements) release.emplace();
    st = component_stats(data, lt, rows, cols, count);
  }
  return stats_dict(std::move(st));
}

}  // namespace

void bind_ccl(py::module_& m) {
  using py::arg;
  m.def("ccl_label", &label_py, arg("image"), arg("background"), arg("connectivity"),
        arg("out"), arg("want_stats"));
  m.def("ccl_largest_component", &largest_py, arg("image"), arg("background"),
        arg("connectivity"), arg("out"));
  m.def("ccl_remove_small_components", &remove_small_py, arg("image"), arg("background"),
        arg("min_size"), arg("connectivity"), arg("out"));
  m.def("ccl_component_stats", &component_stats_py, arg("labels"), arg("count"));
  m.def("_ccl_force_wide_index", &detail::set_ccl_force_wide_index, arg("on"),
        "Tests only: 64-bit run indices for every image.");
}

}  // namespace normlab::bindings
