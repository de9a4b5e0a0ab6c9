// Memory-roofline kernels for the benchmarks: what any kernel moving the same bytes with the
// same threads cannot beat. Compiled once per SIMD target like the kernels they are held to.
// Each writes its outputs either cached (prefetched ahead, as the kernels' cached outputs are)
// or streamed past the caches; the benchmarks take the faster of the two.
#include <cstring>

#include "dispatch/kernel_table.hpp"
#include "parallel/parallel_for.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

// f(begin, end) over [0, n) elements of 64-byte lines, split among the threads.
template <class F>
void parallel_lines(std::size_t n, std::size_t elem_bytes, int nthreads, const F& f) {
  const std::size_t per_line = 64 / elem_bytes;
  const std::int64_t lines = std::int64_t((n + per_line - 1) / per_line);
  parallel_ranges(lines, nthreads, [&](std::int64_t l0, std::int64_t l1) {
    const std::size_t begin = std::size_t(l0) * per_line;
    const std::size_t end = std::size_t(l1) * per_line < n ? std::size_t(l1) * per_line : n;
    f(begin, end);
  });
}

void parallel_copy(const void* src, void* dst, std::size_t bytes, int nthreads, bool stream) {
  if (!stream || bytes % sizeof(float) != 0) {
    parallel_lines(bytes, 1, nthreads, [&](std::size_t b0, std::size_t b1) {
      std::memcpy(static_cast<char*>(dst) + b0, static_cast<const char*>(src) + b0, b1 - b0);
    });
    return;
  }
  const float* s = static_cast<const float*>(src);
  float* d = static_cast<float*>(dst);
  parallel_lines(bytes / sizeof(float), sizeof(float), nthreads, [&](std::size_t i0, std::size_t i1) {
    map_row(d + i0, std::int64_t(i1 - i0), true, [&](std::int64_t j, int count) { return load_n(s + i0 + j, count); });
    stream_fence();
  });
}

void parallel_add(const float* a, const float* b, float* out, std::size_t n, int nthreads, bool stream) {
  parallel_lines(n, sizeof(float), nthreads, [&](std::size_t i0, std::size_t i1) {
    map_row(out + i0, std::int64_t(i1 - i0), stream, [&](std::int64_t j, int count) {
      return load_n(a + i0 + j, count) + load_n(b + i0 + j, count);
    });
    if (stream) stream_fence();
  });
}

void parallel_add_twice(const float* a, const float* b, float* out1, float* out2, std::size_t n, int nthreads,
                        bool stream) {
  using V = vnative<float>;
  constexpr int L = kLanes<float>;
  parallel_lines(n, sizeof(float), nthreads, [&](std::size_t i0, std::size_t i1) {
    const std::int64_t len = std::int64_t(i1 - i0);
    float* o1 = out1 + i0;
    float* o2 = out2 + i0;
    auto sum = [&](std::int64_t j, int count) { return V(load_n(a + i0 + j, count) + load_n(b + i0 + j, count)); };
    const std::int64_t head = stream_head(o1, len);
    // Streamed where both outputs line up alike; else cached.
    if (stream && head >= 0 && stream_head(o2, len) == head) {
      walk_lines<float>(
          head, len,
          [&](std::int64_t j, int count) {
            const V s = sum(j, count);
            store_partial_unmasked(o1 + j, s, count);
            store_partial_unmasked(o2 + j, s, count);
          },
          [&](std::int64_t j) {
            const V s = sum(j, L);
            store_stream(o1 + j, s);
            store_stream(o2 + j, s);
          });
      stream_fence();
      return;
    }
    std::int64_t j = 0;
    for (; j + L <= len; j += L) {
      prefetch_for_write(o1 + j);
      prefetch_for_write(o2 + j);
      const V s = sum(j, L);
      store(o1 + j, s);
      store(o2 + j, s);
    }
    if (j < len) {
      const int count = int(len - j);
      const V s = sum(j, count);
      store_partial(o1 + j, s, count);
      store_partial(o2 + j, s, count);
    }
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
