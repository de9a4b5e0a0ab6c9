// normlab runtime: SIMD target selection and the global thread count.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace normlab {

// SIMD targets this build was compiled for, best last ("baseline", "avx2", "avx512", "avx512bf16", "neon").
std::vector<std::string> compiled_cpu_targets();
// Compiled targets this CPU can run, best last.
std::vector<std::string> supported_cpu_targets();
// The target whose kernels run now. Chosen once, at first use: the best supported target,
// capped by the environment variable NORMLAB_CPU_TARGET when it names a compiled target.
std::string get_cpu_target();
// Switch every kernel to `name` (compiled and supported); throws std::invalid_argument otherwise.
void set_cpu_target(const std::string& name);
// The value of NORMLAB_CPU_TARGET when it was set but named no compiled target, else "".
std::string rejected_env_cpu_target();

// Threads used by parallel kernels. Default: OMP_NUM_THREADS, else the CPUs this process may use.
// Shared by every calling thread. In a child created by fork() normlab runs single-threaded,
// because GNU libgomp cannot start a thread team there after the parent used one.
int get_num_threads();
void set_num_threads(int n);  // n >= 1, else std::invalid_argument
bool in_forked_child();

// Memory-roofline helpers for benchmarks, run with the same threads as the kernels:
// a parallel copy, out = a + b (two reads and one write), and out1 = out2 = a + b (two reads
// and two writes). stream: outputs written past the caches (non-temporal stores), else cached;
// which is faster depends on the machine and the size, so benchmarks time both.
void parallel_copy(const void* src, void* dst, std::size_t bytes, bool stream = false);
void parallel_add(const float* a, const float* b, float* out, std::size_t n, bool stream = false);
void parallel_add_twice(const float* a, const float* b, float* out1, float* out2, std::size_t n,
                        bool stream = false);

}  // namespace normlab
