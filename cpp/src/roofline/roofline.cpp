// Memory-roofline kernels for the benchmarks: what any kernel moving the same bytes with the
// same threads cannot beat. Compiled once per SIMD target like the kernels they are held to.
#include <cstring>

#include "dispatch/kernel_table.hpp"
#include "parallel/parallel_for.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

void parallel_copy(const void* src, void* dst, std::size_t bytes, int nthreads) {
  const std::int64_t lines = std::int64_t((bytes + 63) / 64);
  parallel_ranges(lines, nthreads, [&](std::int64_t l0, std::int64_t l1) {
    const std::size_t begin = std::size_t(l0) * 64;
    const std::size_t end = std::size_t(l1) * 64 < bytes ? std::size_t(l1) * 64 : bytes;
    std::memcpy(static_cast<char*>(dst) + begin, static_cast<const char*>(src) + begin, end - begin);
  });
}

void parallel_add(const float* a, const float* b, float* out, std::size_t n, int nthreads) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  parallel_ranges(std::int64_t(n), nthreads, [&](std::int64_t i0, std::int64_t i1) {
    std::int64_t i = i0;
    for (; i + L <= i1; i += L) store(out + i, load<V>(a + i) + load<V>(b + i));
    for (; i < i1; ++i) out[i] = a[i] + b[i];
  });
}

void parallel_add_twice(const float* a, const float* b, float* out1, float* out2, std::size_t n, int nthreads) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  parallel_ranges(std::int64_t(n), nthreads, [&](std::int64_t i0, std::int64_t i1) {
    std::int64_t i = i0;
    for (; i + L <= i1; i += L) {
      const V s = load<V>(a + i) + load<V>(b + i);
      store(out1 + i, s);
      store(out2 + i, s);
    }
    for (; i < i1; ++i) out1[i] = out2[i] = a[i] + b[i];
  });
}

}  // namespace

void register_roofline(KernelTable& t) {
  t.roofline.copy = &parallel_copy;
  t.roofline.add = &parallel_add;
  t.roofline.add_twice = &parallel_add_twice;
}

}  // namespace NL_TARGET
}  // namespace normlab
