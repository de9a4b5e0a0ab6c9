// Thread policy shared by every kernel: how many threads a call of a given size gets.
#pragma once

#include <cstdint>

namespace normlab {

// Work below this many bytes of memory traffic runs on the calling thread: waking a team
// costs microseconds.
constexpr std::int64_t kParallelMinBytes = 192 * 1024;

// Threads for a call moving `bytes` of memory: 1 for small work, inside an OpenMP parallel
// region (no nesting) and in a forked child; else the global count.
int threads_for(std::int64_t bytes);

// The last-level cache of cpu0 in bytes (sysfs, else sysconf, else 32 MiB).
std::int64_t last_level_cache_bytes();
// cpu0's L2 (per core on the machines measured) as sysfs lists it; else sysconf's; else 1 MiB.
std::int64_t l2_cache_bytes();

// The last-level cache counted as ours: at most kCachePerCpuBytes per CPU this process may use.
// In a VM sysfs lists the whole host socket's L3, shared with other tenants (260 MiB for the
// 2 vCPUs of an Intel Emerald Rapids VM here), where copies of 2 x 32 MiB still ran at L3 speed
// with 2 threads and 2 x 48 MiB at memory speed; row norms writing 32-64 MiB outputs with cached
// stores took 1.1-1.5x the time of streamed ones there.
constexpr std::int64_t kCachePerCpuBytes = std::int64_t(32) << 20;
std::int64_t cache_counted_bytes();

// Outputs of at least this many bytes are written with non-temporal stores: they would not
// stay in the last-level cache anyway (half the cache counted as ours), and streaming saves
// reading them first. Row norms add a condition on their rows (stream_rows).
// NORMLAB_STREAM_MIN_BYTES overrides it.
std::int64_t stream_min_bytes();

}  // namespace normlab
