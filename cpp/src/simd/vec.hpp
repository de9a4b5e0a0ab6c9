// The small vector layer every kernel body is written against. Included only by per-target
// kernel files (compiled once per SIMD target with NL_TARGET naming the namespace). Everything
// here lives in normlab::NL_TARGET::<anonymous> so copies built for different CPUs never merge.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#ifndef NL_TARGET
#error "kernel files are compiled once per SIMD target by normlab_add_kernels() in CMake"
#endif

#if defined(NL_TARGET_AVX512)
#define NL_VEC_BYTES 64
#elif defined(NL_TARGET_AVX2)
#define NL_VEC_BYTES 32
#elif defined(NL_TARGET_NEON)
#define NL_VEC_BYTES 16
#else
#define NL_VEC_BYTES 0  // baseline: one lane, the plain scalar reference path
#endif

namespace normlab {
namespace NL_TARGET {
namespace {

template <class T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <class T, int N>
using vec = typename VecOf<T, N>::type;

// Lanes of one native register of T (1 on the scalar baseline).
template <class T>
constexpr int kLanes = NL_VEC_BYTES ? NL_VEC_BYTES / int(sizeof(T)) : 1;
template <class T>
using vnative = vec<T, kLanes<T>>;

// Double accumulators: kWide lanes, the floats one native double register holds.
constexpr int kWide = kLanes<double>;
using vwide = vec<double, kWide>;

template <class V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
template <class V, class S>
inline V splat(S s) {
  return V{} + s;
}
template <class V>
inline double reduce_add(V v) {
  double s = 0;
  for (int i = 0; i < int(sizeof(V) / sizeof(v[0])); ++i) s += v[i];
  return s;
}

// kWide values at p, widened to double.
inline vwide load_wide(const double* p) { return load<vwide>(p); }
inline vwide load_wide(const float* p) {
#if defined(NL_TARGET_AVX512)
  return _mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif defined(NL_TARGET_AVX2)
  return _mm256_cvtps_pd(_mm_loadu_ps(p));
#elif defined(NL_TARGET_NEON)
  return vcvt_f64_f32(vld1_f32(p));
#else
  return vwide{double(p[0])};
#endif
}

// kWide doubles stored at p, rounded to nearest.
inline void store_narrow(double* p, vwide v) { store(p, v); }
inline void store_narrow(float* p, vwide v) {
#if defined(NL_TARGET_AVX512)
  _mm256_storeu_ps(p, _mm512_cvtpd_ps(v));
#elif defined(NL_TARGET_AVX2)
  _mm_storeu_ps(p, _mm256_cvtpd_ps(v));
#elif defined(NL_TARGET_NEON)
  vst1_f32(p, vcvt_f32_f64(v));
#else
  p[0] = float(v[0]);
#endif
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
