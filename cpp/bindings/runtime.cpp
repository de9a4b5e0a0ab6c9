#include <omp.h>

#include "bindings.hpp"
#include "normlab/runtime.hpp"

// C entry points for threadpoolctl's controller (normlab/runtime.py).
extern "C" __attribute__((visibility("default"))) int normlab_get_num_threads() {
  return normlab::get_num_threads();
}
extern "C" __attribute__((visibility("default"))) void normlab_set_num_threads(int n) {
  normlab::set_num_threads(n < 1 ? 1 : n);
}

namespace normlab::bindings {

void bind_runtime(py::module_& m) {
  m.def("compiled_cpu_targets", &compiled_cpu_targets);
  m.def("supported_cpu_targets", &supported_cpu_targets);
  m.def("get_cpu_target", &get_cpu_target);
  m.def("set_cpu_target", &set_cpu_target, py::arg("name"));
  m.def("rejected_env_cpu_target", &rejected_env_cpu_target);
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("in_forked_child", &in_forked_child);
  m.def("openmp_version", [] { return _OPENMP; });

  m.def(
      "parallel_copy",
      [](py::array src, py::array dst) {
        if (!(src.flags() & py::array::c_style) || !(dst.flags() & py::array::c_style))
          throw py::value_error("src and dst must be C-contiguous");
        require_size(std::int64_t(dst.nbytes()), std::int64_t(src.nbytes()), "dst bytes");
        const void* s = src.data();
        void* d = dst.mutable_data();
        const std::size_t n = std::size_t(src.nbytes());
        py::gil_scoped_release release;
        parallel_copy(s, d, n);
      },
      py::arg("src"), py::arg("dst"));
  m.def(
      "parallel_add",
      [](carray<float> a, carray<float> b, carray<float> out) {
        require_size(std::int64_t(b.size()), std::int64_t(a.size()), "b");
        require_size(std::int64_t(out.size()), std::int64_t(a.size()), "out");
        const float* pa = a.data();
        const float* pb = b.data();
        float* po = out.mutable_data();
        const std::size_t n = std::size_t(a.size());
        py::gil_scoped_release release;
        parallel_add(pa, pb, po, n);
      },
      py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("out").noconvert());

  m.def(
      "parallel_add_twice",
      [](py::handle a, py::handle b, py::handle out1, py::handle out2) {
        const std::int64_t n = std::int64_t(py::array(py::reinterpret_borrow<py::object>(a)).size());
        const float* pa = input<float>(a, "a", n);
        const float* pb = input<float>(b, "b", n);
        float* p1 = output<float>(out1, "out1", n);
        float* p2 = output<float>(out2, "out2", n);
        py::gil_scoped_release release;
        parallel_add_twice(pa, pb, p1, p2, std::size_t(n));
      },
      py::arg("a"), py::arg("b"), py::arg("out1"), py::arg("out2"));

  m.attr("__version__") = NORMLAB_VERSION;
  m.attr("compiler") = NORMLAB_COMPILER;
  m.attr("build_flags") = NORMLAB_BUILD_FLAGS;
}

}  // namespace normlab::bindings
