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
// Sum of a vector's lanes by halving: a fixed order, log-depth.
template <class V>
inline double lane_sum(V v) {
  constexpr int n = int(sizeof(V) / sizeof(v[0]));
  double a[n];
  for (int i = 0; i < n; ++i) a[i] = v[i];
  for (int w = n / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// a * b + c, rounded once where the target has FMA (kernels build with -ffp-contract=off, so
// every fused operation is this explicit one and results never depend on compiler choices).
template <class V>
inline V fmadd(V a, V b, V c) {
#if defined(NL_TARGET_AVX512) || defined(NL_TARGET_AVX2)
  constexpr bool is_float = sizeof(a[0]) == 4;
  if constexpr (sizeof(V) == 64 && is_float) return V(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
  else if constexpr (sizeof(V) == 64) return V(_mm512_fmadd_pd(__m512d(a), __m512d(b), __m512d(c)));
  else if constexpr (sizeof(V) == 32 && is_float) return V(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
  else if constexpr (sizeof(V) == 32) return V(_mm256_fmadd_pd(__m256d(a), __m256d(b), __m256d(c)));
  else if constexpr (sizeof(V) == 16 && is_float) return V(_mm_fmadd_ps(__m128(a), __m128(b), __m128(c)));
  else if constexpr (sizeof(V) == 16) return V(_mm_fmadd_pd(__m128d(a), __m128d(b), __m128d(c)));
  else {
    V r;
    for (int i = 0; i < int(sizeof(V) / sizeof(a[0])); ++i) r[i] = __builtin_fma(a[i], b[i], c[i]);
    return r;
  }
#elif defined(NL_TARGET_NEON)
  V r;
  for (int i = 0; i < int(sizeof(V) / sizeof(a[0])); ++i) r[i] = __builtin_fma(a[i], b[i], c[i]);
  return r;
#else
  return a * b + c;
#endif
}
inline double fmadd(double a, double b, double c) {
#if defined(NL_TARGET_AVX512) || defined(NL_TARGET_AVX2) || defined(NL_TARGET_NEON)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
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

// The low and high halves of a native float vector, widened to double (SIMD targets only).
#if NL_VEC_BYTES
inline vwide widen_low(vnative<float> v) {
#if defined(NL_TARGET_AVX512)
  return vwide(_mm512_cvtps_pd(_mm512_castps512_ps256(__m512(v))));
#elif defined(NL_TARGET_AVX2)
  return vwide(_mm256_cvtps_pd(_mm256_castps256_ps128(__m256(v))));
#elif defined(NL_TARGET_NEON)
  return vwide(vcvt_f64_f32(vget_low_f32(v)));
#endif
}
inline vwide widen_high(vnative<float> v) {
#if defined(NL_TARGET_AVX512)
  return vwide(_mm512_cvtps_pd(_mm512_extractf32x8_ps(__m512(v), 1)));
#elif defined(NL_TARGET_AVX2)
  return vwide(_mm256_cvtps_pd(_mm256_extractf128_ps(__m256(v), 1)));
#elif defined(NL_TARGET_NEON)
  return vwide(vcvt_high_f64_f32(v));
#endif
}
#endif

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


// The first `count` (0 < count <= lanes) elements at p; the other lanes are zero.
template <class T>
inline vnative<T> load_partial(const T* p, int count) {
  using V = vnative<T>;
#if defined(NL_TARGET_AVX512)
  if constexpr (sizeof(T) == 4)
    return V(_mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), p));
  else
    return V(_mm512_maskz_loadu_pd(__mmask8((1u << count) - 1), p));
#elif defined(NL_TARGET_AVX2)
  if constexpr (sizeof(T) == 4) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return V(_mm256_maskload_ps(reinterpret_cast<const float*>(p), mask));
  } else {
    const __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3));
    return V(_mm256_maskload_pd(reinterpret_cast<const double*>(p), mask));
  }
#else
  V v{};
  for (int i = 0; i < count; ++i) v[i] = p[i];
  return v;
#endif
}

// Stores the first `count` (0 < count <= lanes) lanes of v at p.
template <class T>
inline void store_partial(T* p, vnative<T> v, int count) {
#if defined(NL_TARGET_AVX512)
  if constexpr (sizeof(T) == 4)
    _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1), __m512(v));
  else
    _mm512_mask_storeu_pd(p, __mmask8((1u << count) - 1), __m512d(v));
#elif defined(NL_TARGET_AVX2)
  if constexpr (sizeof(T) == 4) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(reinterpret_cast<float*>(p), mask, __m256(v));
  } else {
    const __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), _mm256_setr_epi64x(0, 1, 2, 3));
    _mm256_maskstore_pd(reinterpret_cast<double*>(p), mask, __m256d(v));
  }
#else
  for (int i = 0; i < count; ++i) p[i] = v[i];
#endif
}

// count elements at p as a vector: a plain load when count is the full width.
template <class T>
inline vnative<T> load_n(const T* p, int count) {
  return count == kLanes<T> ? load<vnative<T>>(p) : load_partial(p, count);
}

// A store that bypasses the caches, for outputs too large to stay in them. p is aligned to
// the vector width. stream_fence() orders these stores before the thread's later ones.
template <class T>
inline void store_stream(T* p, vnative<T> v) {
#if defined(NL_TARGET_AVX512)
  if constexpr (sizeof(T) == 4) _mm512_stream_ps(reinterpret_cast<float*>(p), __m512(v));
  else _mm512_stream_pd(reinterpret_cast<double*>(p), __m512d(v));
#elif defined(NL_TARGET_AVX2)
  if constexpr (sizeof(T) == 4) _mm256_stream_ps(reinterpret_cast<float*>(p), __m256(v));
  else _mm256_stream_pd(reinterpret_cast<double*>(p), __m256d(v));
#else
  store(p, v);
#endif
}
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#elif defined(__aarch64__)
  __asm__ __volatile__("dmb ishst" ::: "memory");
#endif
}

// y[j .. j+count) = f(j, count) over a row of n elements, one vector at a time: for long rows
// a partial vector first so the rest of y is aligned, then full vectors (streamed past the
// caches when stream is set), then a partial tail. Every element goes through the same vector
// code. Short rows skip the alignment: a split store costs less than a partial vector there.
template <class T, class F>
inline void map_row(T* y, std::int64_t n, bool stream, const F& f) {
  constexpr int L = kLanes<T>;
  std::int64_t j = 0;
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(y);
  if (L > 1 && addr % sizeof(T) == 0 && n >= 16 * L) {
    constexpr std::uintptr_t width = L * sizeof(T);
    const std::int64_t head = std::int64_t((width - addr % width) % width / sizeof(T));
    const int count = int(head < n ? head : n);
    if (count > 0) store_partial(y, f(j, count), count);
    j = count;
  } else {
    stream = false;
  }
  if (stream) {
    for (; j + L <= n; j += L) store_stream(y + j, f(j, L));
  } else {
    for (; j + L <= n; j += L) store(y + j, f(j, L));
  }
  if (j < n) store_partial(y + j, f(j, int(n - j)), int(n - j));
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
