#include "parallel/parallel.hpp"

#include <omp.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "dispatch/kernel_table.hpp"
#include "normlab/runtime.hpp"

namespace normlab {
namespace {

std::atomic<bool> g_forked_child{false};

void mark_forked_child() { g_forked_child.store(true, std::memory_order_relaxed); }

std::atomic<int>& thread_count() {
  // omp_get_max_threads() honours OMP_NUM_THREADS, else counts the CPUs in our affinity mask.
  static std::atomic<int> count{[] {
    pthread_atfork(nullptr, nullptr, &mark_forked_child);
    const int n = omp_get_max_threads();
    return n > 0 ? n : 1;
  }()};
  return count;
}

}  // namespace

int get_num_threads() { return in_forked_child() ? 1 : thread_count().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
  thread_count().store(n, std::memory_order_relaxed);
}

bool in_forked_child() {
  thread_count();  // registers the fork handler
  return g_forked_child.load(std::memory_order_relaxed);
}

int threads_for(std::int64_t bytes) {
  if (bytes < kParallelMinBytes || omp_in_parallel()) return 1;
  return get_num_threads();
}

std::int64_t stream_min_bytes() {
  static const std::int64_t bytes = [] {
    if (const char* env = std::getenv("NORMLAB_STREAM_MIN_BYTES")) return std::int64_t(std::atoll(env));
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::int64_t(l3 > 0 ? l3 / 2 : 16 << 20);
  }();
  return bytes;
}

void parallel_copy(const void* src, void* dst, std::size_t bytes) {
  active_kernels().roofline.copy(src, dst, bytes, threads_for(std::int64_t(bytes) * 2));
}

void parallel_add(const float* a, const float* b, float* out, std::size_t n) {
  active_kernels().roofline.add(a, b, out, n, threads_for(std::int64_t(n) * 12));
}

}  // namespace normlab
