// OpenMP's runtime calls, or where normlab is built without OpenMP (NORMLAB_OPENMP=OFF, or no
// runtime found) their answers for a single thread: the pragmas are then ignored, and every
// parallel region runs once on the calling thread as thread 0 of 1.
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#else
#include <unistd.h>
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_in_parallel() { return 0; }
inline int omp_get_num_procs() { return int(sysconf(_SC_NPROCESSORS_ONLN)); }
#endif

namespace normlab {
// Whether this build runs kernels on OpenMP threads.
constexpr bool kHaveOpenMP =
#if defined(_OPENMP)
    true;
#else
    false;
#endif
}  // namespace normlab
