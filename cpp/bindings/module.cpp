#include "bindings.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "normlab C++ core (internal; use the normlab package)";
  normlab::bindings::bind_runtime(m);
  normlab::bindings::bind_norm(m);
  normlab::bindings::bind_channel_norm(m);
  normlab::bindings::bind_ccl(m);
}
