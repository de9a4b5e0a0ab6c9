#include "parallel/parallel.hpp"

#include "parallel/openmp.hpp"
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

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

int get_num_threads() {
  return !kHaveOpenMP || in_forked_child() ? 1 : thread_count().load(std::memory_order_relaxed);
}

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

namespace {

// "32768K" (sysfs cache sizes) in bytes, or -1.
std::int64_t parse_cache_size(const std::string& text) {
  std::size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 12) return -1;
  std::int64_t bytes = std::atoll(text.substr(0, digits).c_str());
  const std::string unit = text.substr(digits);
  if (unit == "K") bytes <<= 10;
  else if (unit == "M") bytes <<= 20;
  else if (unit == "G") bytes <<= 30;
  else if (!unit.empty()) return -1;
  return bytes;
}

// The cache of cpu0 at `level` (0: the highest) as sysfs lists it (what lscpu shows), or -1.
std::int64_t sysfs_cache_bytes(int level) {
  int best_level = 0;
  std::int64_t best = -1;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
    int found_level = 0;
    std::string size, type;
    if (!(level_file >> found_level) || !(size_file >> size) || !(type_file >> type)) continue;
    if (type == "Instruction" || (level > 0 && found_level != level)) continue;
    const std::int64_t bytes = parse_cache_size(size);
    if (bytes > 0 && found_level > best_level) best_level = found_level, best = bytes;
  }
  return best;
}

// The size of cpu0's cache at `level` (0: the highest) from sysfs, else from sysconf(name)
// (name -1: none), else fallback.
std::int64_t cache_bytes(int level, int sysconf_name, std::int64_t fallback) {
  std::int64_t found = sysfs_cache_bytes(level);
  if (found <= 0 && sysconf_name >= 0) found = sysconf(sysconf_name);
  return found > 0 ? found : fallback;
}

}  // namespace

std::int64_t last_level_cache_bytes() {
  // sysfs first: in a VM sysconf can report the host's L3 (320 MiB on the 32 MiB L3 here).
#ifdef _SC_LEVEL3_CACHE_SIZE
  static const std::int64_t bytes = cache_bytes(0, _SC_LEVEL3_CACHE_SIZE, std::int64_t(32) << 20);
#else
  static const std::int64_t bytes = cache_bytes(0, -1, std::int64_t(32) << 20);
#endif
  return bytes;
}

std::int64_t l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const std::int64_t bytes = cache_bytes(2, _SC_LEVEL2_CACHE_SIZE, std::int64_t(1) << 20);
#else
  static const std::int64_t bytes = cache_bytes(2, -1, std::int64_t(1) << 20);
#endif
  return bytes;
}

std::int64_t cache_counted_bytes() {
  static const std::int64_t bytes = [] {
    const std::int64_t cpus = omp_get_num_procs() > 0 ? omp_get_num_procs() : 1;
    const std::int64_t cap = kCachePerCpuBytes * cpus;
    return last_level_cache_bytes() < cap ? last_level_cache_bytes() : cap;
  }();
  return bytes;
}

std::int64_t stream_min_bytes() {
  static const std::int64_t bytes = [] {
    if (const char* env = std::getenv("NORMLAB_STREAM_MIN_BYTES")) return std::int64_t(std::atoll(env));
    return cache_counted_bytes() / 2;
  }();
  return bytes;
}

void parallel_copy(const void* src, void* dst, std::size_t bytes, bool stream) {
  active_kernels().roofline.copy(src, dst, bytes, threads_for(std::int64_t(bytes) * 2), stream);
}

void parallel_add(const float* a, const float* b, float* out, std::size_t n, bool stream) {
  active_kernels().roofline.add(a, b, out, n, threads_for(std::int64_t(n) * 12), stream);
}

void parallel_add_twice(const float* a, const float* b, float* out1, float* out2, std::size_t n, bool stream) {
  active_kernels().roofline.add_twice(a, b, out1, out2, n, threads_for(std::int64_t(n) * 16), stream);
}

}  // namespace normlab
