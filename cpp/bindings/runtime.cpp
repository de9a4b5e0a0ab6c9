#include "parallel/openmp.hpp"

#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "bindings.hpp"
#include "memory/mappings.hpp"
#include "normlab/runtime.hpp"
#include "parallel/parallel.hpp"

// C entry points for threadpoolctl's controller (normlab/runtime.py).
extern "C" __attribute__((visibility("default"))) int normlab_get_num_threads() {
  return normlab::get_num_threads();
}
extern "C" __attribute__((visibility("default"))) void normlab_set_num_threads(int n) {
  normlab::set_num_threads(n < 1 ? 1 : n);
}

namespace normlab::bindings {

namespace {

// Results of this many bytes or more get pages of their own, kept for reuse when freed. Below
// it, NumPy's allocation (glibc malloc) reuses freed memory already; from 32 MiB on
// (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) glibc maps and unmaps every such array, so each new
// result would fault in and clear all its pages: 3.6 ms for 32 MiB here, against 0.8 ms to fill
// pages kept from the previous result.
constexpr std::size_t kMappedResultBytes = std::size_t(32) << 20;

// A mapping that backs one returned array, given back to the cache when the array goes.
struct ResultPages {
  void* data;
  std::size_t bytes;
};

}  // namespace

// Large results are pages of normlab's own (the array's base is the capsule that owns them),
// taken from output_mappings() when a freed result left some: a loop that gets a new result
// every call then skips faulting in and clearing its pages every call.
py::array empty_result(const std::vector<py::ssize_t>& shape, const py::dtype& dtype) {
  std::size_t bytes = std::size_t(dtype.itemsize());
  for (py::ssize_t d : shape) {
    if (d < 0) throw py::value_error("empty_result: negative dimension");
    if (d != 0 && bytes > std::numeric_limits<std::size_t>::max() / std::size_t(d))
      throw py::value_error("empty_result: array too large");
    bytes *= std::size_t(d);
  }
  if (!kHaveMappings || bytes < kMappedResultBytes) return py::array(dtype, shape);
  std::size_t mapped = bytes;
  void* data = output_mappings().get(mapped, false);
  ResultPages* pages = new ResultPages{data, mapped};
  py::capsule owner(pages, [](void* p) {
    const ResultPages* pages = static_cast<const ResultPages*>(p);
    output_mappings().put(pages->data, pages->bytes);
    delete pages;
  });
  return py::array(dtype, shape, std::vector<py::ssize_t>(), data, owner);
}


void bind_runtime(py::module_& m) {
  m.def("compiled_cpu_targets", &compiled_cpu_targets);
  m.def("supported_cpu_targets", &supported_cpu_targets);
  m.def("get_cpu_target", &get_cpu_target);
  m.def("set_cpu_target", &set_cpu_target, py::arg("name"));
  m.def("rejected_env_cpu_target", &rejected_env_cpu_target);
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("in_forked_child", &in_forked_child);
  m.def("openmp_version", [] {
#if defined(_OPENMP)
    return _OPENMP;
#else
    return 0;
#endif
  });
  m.attr("openmp") = kHaveOpenMP;
  m.def("last_level_cache_bytes", &last_level_cache_bytes);
  m.def("cache_counted_bytes", &cache_counted_bytes);
  m.def("l2_cache_bytes", &l2_cache_bytes);
  m.def("stream_min_bytes", &stream_min_bytes);

  m.def(
      "parallel_copy",
      [](py::array src, py::array dst, bool stream) {
        if (!(src.flags() & py::array::c_style) || !(dst.flags() & py::array::c_style))
          throw py::value_error("src and dst must be C-contiguous");
        require_size(std::int64_t(dst.nbytes()), std::int64_t(src.nbytes()), "dst bytes");
        const void* s = src.data();
        void* d = dst.mutable_data();
        const std::size_t n = std::size_t(src.nbytes());
        py::gil_scoped_release release;
        parallel_copy(s, d, n, stream);
      },
      py::arg("src"), py::arg("dst"), py::arg("stream") = false);
  m.def(
      "parallel_add",
      [](carray<float> a, carray<float> b, carray<float> out, bool stream) {
        require_size(std::int64_t(b.size()), std::int64_t(a.size()), "b");
        require_size(std::int64_t(out.size()), std::int64_t(a.size()), "out");
        const float* pa = a.data();
        const float* pb = b.data();
        float* po = out.mutable_data();
        const std::size_t n = std::size_t(a.size());
        py::gil_scoped_release release;
        parallel_add(pa, pb, po, n, stream);
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("out").noconvert(), py::arg("stream") = false);

  m.def(
      "parallel_add_twice",
      [](py::handle a, py::handle b, py::handle out1, py::handle out2, bool stream) {
        const std::int64_t n = std::int64_t(py::array(py::reinterpret_borrow<py::object>(a)).size());
        const float* pa = input<float>(a, "a", n);
        const float* pb = input<float>(b, "b", n);
        float* p1 = output<float>(out1, "out1", n);
        float* p2 = output<float>(out2, "out2", n);
        py::gil_scoped_release release;
        parallel_add_twice(pa, pb, p1, p2, std::size_t(n), stream);
      },
      py::arg("a"), py::arg("b"), py::arg("out1"), py::arg("out2"), py::arg("stream") = false);

  // The name of the first (array, name) pair in `inputs` whose memory may overlap `out`, else
  // None: numpy.may_share_memory's bounds test in one call for all of a call's inputs.
  m.def(
      "first_overlap",
      [](py::handle out, py::handle inputs) -> py::object {
        if (!is_ndarray(out) || !PyTuple_Check(inputs.ptr()))
          throw py::type_error("first_overlap takes an array and a tuple of (array, name) pairs");
        const auto [out_lo, out_hi] = memory_extent(out);
        for (py::handle pair : py::reinterpret_borrow<py::tuple>(inputs)) {
          if (!PyTuple_Check(pair.ptr()) || PyTuple_GET_SIZE(pair.ptr()) != 2)
            throw py::type_error("first_overlap takes (array, name) pairs");
          const py::handle arr = PyTuple_GET_ITEM(pair.ptr(), 0);
          if (!is_ndarray(arr)) continue;
          const auto [lo, hi] = memory_extent(arr);
          if (lo < out_hi && out_lo < hi) return py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(pair.ptr(), 1));
        }
        return py::none();
      },
      py::arg("out"), py::arg("inputs"));

  m.def("empty_result", &empty_result, py::arg("shape"), py::arg("dtype"));
  m.def("kept_result_pages", [] {
    MappingCache::Kept kept[4];
    const int n = output_mappings().kept(kept);
    py::list out;
    for (int k = 0; k < n; ++k) out.append(py::make_tuple(kept[k].bytes, kept[k].advised));
    return out;
  });
  m.def(
      "same_view",
      [](py::handle a, py::handle b) {
        if (!is_ndarray(a) || !is_ndarray(b)) return false;
        const py::detail::PyArray_Proxy* p = py::detail::array_proxy(a.ptr());
        const py::detail::PyArray_Proxy* q = py::detail::array_proxy(b.ptr());
        if (p->data != q->data || p->nd != q->nd) return false;
        for (int i = 0; i < p->nd; ++i)
          if (p->dimensions[i] != q->dimensions[i] || p->strides[i] != q->strides[i]) return false;
        return true;
      },
      py::arg("a"), py::arg("b"));

  m.attr("__version__") = NORMLAB_VERSION;
  m.attr("compiler") = NORMLAB_COMPILER;
  m.attr("build_flags") = NORMLAB_BUILD_FLAGS;
}

}  // namespace normlab::bindings
