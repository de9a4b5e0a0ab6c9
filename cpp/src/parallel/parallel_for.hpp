// OpenMP loops for kernel files (per target, like vec.hpp). Work is split into fixed pieces
// that do not depend on the thread count, so results never do either.
#pragma once

#include "parallel/openmp.hpp"

#include <cstdint>

namespace normlab {
namespace NL_TARGET {
namespace {

// f(begin, end) over contiguous ranges covering [0, n), one per thread.
template <class F>
inline void parallel_ranges(std::int64_t n, int nthreads, const F& f) {
  if (nthreads <= 1 || n <= 1) {
    if (n > 0) f(std::int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  {
    const std::int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const std::int64_t begin = n * t / nt, end = n * (t + 1) / nt;
    if (begin < end) f(begin, end);
  }
}

// f(block) for every block in [0, nblocks).
template <class F>
inline void parallel_blocks(std::int64_t nblocks, int nthreads, const F& f) {
  parallel_ranges(nblocks, nthreads, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) f(b);
  });
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
