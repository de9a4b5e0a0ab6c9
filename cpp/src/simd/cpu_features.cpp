#include "simd/cpu_features.hpp"

#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace normlab {

bool cpu_supports_target(const char* name) {
  if (std::strcmp(name, "baseline") == 0) return true;
#if defined(__x86_64__) || defined(__i386__)
  // libgcc's feature bits include the OS check (XCR0) for AVX and AVX-512 state.
  __builtin_cpu_init();
  // F16C from CPUID leaf 1 (Clang 14's __builtin_cpu_supports does not know it); its AVX state
  // is checked with AVX2's.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  if (std::strcmp(name, "avx2") == 0) return avx2;
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (std::strcmp(name, "avx512") == 0) return avx512;
  if (std::strcmp(name, "avx512bf16") == 0) return avx512 && __builtin_cpu_supports("avx512bf16");
#elif defined(__aarch64__)
  if (std::strcmp(name, "neon") == 0) return true;  // mandatory in AArch64
#endif
  return false;
}

}  // namespace normlab
