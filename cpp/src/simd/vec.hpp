// The small vector layer every kernel body is written against. Included only by per-target
// kernel files (compiled once per SIMD target with NL_TARGET naming the namespace). Everything
// here lives in normlab::NL_TARGET::<anonymous> so copies built for different CPUs never merge.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "normlab/norm.hpp"  // float16, bfloat16, param_t

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
// Sum of a vector's lanes by halving: a fixed order, log-depth. lane_sum_inline is the same sum
// always inlined, for loops that keep vectors in registers (a call spills them all).
template <class V>
__attribute__((always_inline)) inline double lane_sum_inline(V v) {
  constexpr int n = int(sizeof(V) / sizeof(v[0]));
  double a[n];
  for (int i = 0; i < n; ++i) a[i] = v[i];
  for (int w = n / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}
template <class V>
inline double lane_sum(V v) {
  return lane_sum_inline(v);
}

// Lane i of the halving step of lane_sums_inline for pairs of vectors of partial sums `width`
// lanes wide: where lane i's lower (upper) half comes from in the two vectors side by side.
constexpr std::int64_t halving_lane(int i, int width, bool upper) {
  return (i / (width / 2)) * width + i % (width / 2) + (upper ? width / 2 : 0);
}
template <class M, int width, bool upper, int... I>
constexpr M halving_mask(std::integer_sequence<int, I...>) {
  return M{halving_lane(I, width, upper)...};
}

// The halving steps of lane_sums_inline from vectors v that hold W / width rows' partial sums,
// width lanes each, rows in order.
template <int width, int R, int NOut, class V>
__attribute__((always_inline)) inline void halving_sums(const V (&v)[R], V (&out)[NOut]) {
  if constexpr (width == 1) {
    static_assert(R == NOut, "one lane per row");
    for (int p = 0; p < R; ++p) out[p] = v[p];
  } else {
    constexpr int W = int(sizeof(V) / sizeof(v[0][0]));
    using M = vec<std::int64_t, W>;
    constexpr M lo = halving_mask<M, width, false>(std::make_integer_sequence<int, W>());
    constexpr M hi = halving_mask<M, width, true>(std::make_integer_sequence<int, W>());
    V half[R / 2];
    for (int p = 0; p < R / 2; ++p)
      half[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], lo) + __builtin_shuffle(v[2 * p], v[2 * p + 1], hi);
    halving_sums<width / 2>(half, out);
  }
}

// Lane r % W of out[r / W] = lane_sum_inline(v[r]) for R vectors of W lanes, bitwise the same
// sums: each halving step adds the halves of two vectors' partial sums at once (two shuffles and
// one add per pair), so R sums take R - R / W adds instead of R * log2(W) adds and shuffles.
template <int R, int NOut, class V>
__attribute__((always_inline)) inline void lane_sums_inline(const V (&v)[R], V (&out)[NOut]) {
  constexpr int W = int(sizeof(V) / sizeof(v[0][0]));
  static_assert(R == NOut * W, "whole vectors of sums");
#if defined(__GNUC__) && !defined(__clang__)
  halving_sums<W>(v, out);
#else
  for (int r = 0; r < R; ++r) out[r / W][r % W] = lane_sum_inline(v[r]);
#endif
}

// Whether any lane of a comparison's result (lanes 0 or -1) is set, tested in registers: read
// back lane by lane from memory, a vector just stored stalls on store-to-load forwarding.
template <class M>
__attribute__((always_inline)) inline bool any_lane(M m) {
#if defined(NL_TARGET_AVX512)
  if constexpr (sizeof(M) == 64) return _mm512_test_epi64_mask(__m512i(m), __m512i(m)) != 0;
#endif
#if defined(NL_TARGET_AVX2) || defined(NL_TARGET_AVX512)
  if constexpr (sizeof(M) == 32) return !_mm256_testz_si256(__m256i(m), __m256i(m));
#endif
  bool any = false;
  for (int i = 0; i < int(sizeof(M) / sizeof(m[0])); ++i) any |= m[i] != 0;
  return any;
}

// a * b + c, rounded once where the target has FMA (kernels build with -ffp-contract=off, so
// every fused operation is this explicit one and results never depend on compiler choices).
template <class V>
inline V fmadd(V a, V b, V c) {
#if defined(NL_TARGET_AVX512) || defined(NL_TARGET_AVX2) || defined(NL_TARGET_NEON)
  if constexpr (std::is_floating_point<V>::value) {
    return std::fma(a, b, c);
  } else {
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
#else
    V r;
    for (int i = 0; i < int(sizeof(V) / sizeof(a[0])); ++i) r[i] = __builtin_fma(a[i], b[i], c[i]);
    return r;
#endif
  }
#else
  return a * b + c;
#endif
}

// v - k for vectors v and k, as fmadd(v, 1, -k) on AVX-512: one rounding, so the same bits,
// but on the FMA pipes. On AMD Zen 4, where adds and FMAs take separate pipes, a row's shifted
// sums (d = x - k, s += d, q += d * d) then take two FMAs and one add instead of two adds and
// one FMA: in-cache half layer_norm rows took 0.94-0.97x the time, float rows 0.96-1.00x, the
// channel norms' sets 0.95-0.99x (the same bits). AVX2 keeps the subtraction: float32
// layer_norm (512, 768) without weight took 1.14x as long there.
template <class V>
__attribute__((always_inline)) inline V minus_on_fma(V v, V k) {
#if defined(NL_TARGET_AVX512)
  using T = std::remove_reference_t<decltype(v[0])>;
  return fmadd(v, V{} + T(1), -k);
#else
  return v - k;
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


// ---- half-precision storage (float16, bfloat16) ----------------------------------------------
// Data of a storage type S is computed in compute_t<S>: float for the half types (and float),
// double for double. Loads widen halves to float vectors and stores round floats to nearest
// even, with the CPU's instructions where the target has them and exact scalar code otherwise.

template <class S>
using compute_t = param_t<S>;
template <class S>
constexpr bool kHalf = std::is_same<S, float16>::value || std::is_same<S, bfloat16>::value;

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_c(float v) { return v; }
inline double to_c(double v) { return v; }
inline float to_c(bfloat16 h) { return bits_float(std::uint32_t(h.bits) << 16); }
inline float to_c(float16 h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // Inf, NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float m = float(man) * 5.9604644775390625e-08f;
    return sign ? -m : m;
  }
  return bits_float(sign | ((exp + 112) << 23) | (man << 13));
}

// float -> half, rounded to nearest even; NaN stays a (quiet) NaN.
inline bfloat16 to_bfloat16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {std::uint16_t(u >> 16)};
}
inline float16 to_float16(float f) {
  std::uint32_t u = float_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  std::uint32_t h;
  if (u >= 0x47800000u) {  // >= 65536: Inf (or NaN)
    h = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below 2^-14: the float addition rounds to the subnormal grid
    const float magic = 0.5f;     // 2^-1: its ulp is the half subnormal step 2^-24
    h = float_bits(bits_float(u) + magic) - float_bits(magic);
  } else {  // rebias the exponent and round the 13 dropped bits to nearest even
    u += 0xc8000fffu + ((u >> 13) & 1u);  // (15 - 127) << 23, plus the rounding
    h = u >> 13;
  }
  return {std::uint16_t(h | sign)};
}

// A compute value stored as S (rounded once for the half types; double -> half goes through
// float, within one half ulp of the exact rounding).
template <class S>
inline S narrow(double v) {
  if constexpr (std::is_same<S, float16>::value) return to_float16(float(v));
  else if constexpr (std::is_same<S, bfloat16>::value) return to_bfloat16(float(v));
  else return S(v);
}
template <class S>
inline S narrow(float v) {
  if constexpr (std::is_same<S, float16>::value) return to_float16(v);
  else if constexpr (std::is_same<S, bfloat16>::value) return to_bfloat16(v);
  else return S(v);
}

using vfloat = vnative<float>;
constexpr int kFloatLanes = kLanes<float>;

// kFloatLanes halves at p, as a float vector.
template <class S>
inline vfloat widen_half(const S* p) {
#if defined(NL_TARGET_AVX512)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same<S, float16>::value) return vfloat(_mm512_cvtph_ps(h));
  else return vfloat(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#elif defined(NL_TARGET_AVX2)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same<S, float16>::value) return vfloat(_mm256_cvtph_ps(h));
  else return vfloat(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  vfloat v;
  for (int i = 0; i < kFloatLanes; ++i) v[i] = to_c(p[i]);
  return v;
#endif
}

// A float vector rounded to kFloatLanes halves, as raw bits (Bits: __m256i, __m128i or an array).
#if defined(NL_TARGET_AVX512)
using half_bits = __m256i;
#elif defined(NL_TARGET_AVX2)
using half_bits = __m128i;
#else
struct half_bits {
  std::uint16_t b[kFloatLanes];
};
#endif

// Whether stores of S check each vector for subnormal floats (narrow_half): bfloat16 on targets
// with vcvtneps2bf16. Where it is set, whole_vectors() tests several vectors at once instead.
template <class S>
constexpr bool kCheckedNarrow =
#if defined(NL_TARGET_AVX512BF16)
    std::is_same<S, bfloat16>::value;
#else
    false;
#endif

// normal: v is known to hold no subnormal float (whole_vectors), so the check can be skipped.
template <class S>
__attribute__((always_inline)) inline half_bits narrow_half(vfloat v, bool normal = false) {
#if defined(NL_TARGET_AVX512)
  // Register forms, kept apart from the store: the compiler would otherwise fold the store into
  // vcvtps2ph / vpmovdw with a memory operand, which are slow on AMD Zen.
  if constexpr (std::is_same<S, float16>::value) {
    __m256i h = _mm512_cvtps_ph(__m512(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __asm__("" : "+v"(h));
    return h;
  } else {
#if defined(NL_TARGET_AVX512BF16)
    // vcvtneps2bf16 rounds to nearest even and quiets NaN as below, but reads subnormal floats
    // as zero: vectors holding one take the integer rounding instead.
    if (normal || !_mm512_fpclass_ps_mask(__m512(v), 0x20)) {
      __m256i h = __m256i(_mm512_cvtneps_pbh(__m512(v)));
      __asm__("" : "+v"(h));
      return h;
    }
#endif
    const __m512i u = _mm512_castps_si512(__m512(v));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    const __mmask16 nan = _mm512_cmp_ps_mask(__m512(v), __m512(v), _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    // The high 16 bits of each lane, packed into the low 256 bits.
    const __m512i high_words = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 31, 29, 27, 25, 23,
                                                21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(high_words, r));
  }
#elif defined(NL_TARGET_AVX2)
  if constexpr (std::is_same<S, float16>::value) {
    __m128i h = _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __asm__("" : "+x"(h));  // the register form (see the AVX-512 branch)
    return h;
  } else {
    const __m256i u = _mm256_castps_si256(__m256(v));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    const __m256 nan = _mm256_cmp_ps(__m256(v), __m256(v), _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_or_si256(u, _mm256_set1_epi32(0x400000))), nan));
    r = _mm256_srli_epi32(r, 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
#else
  half_bits h;
  for (int i = 0; i < kFloatLanes; ++i) h.b[i] = narrow<S>(float(v[i])).bits;
  return h;
#endif
}

// Vector load/store overloads for half pointers (const or not): the same calls as for float
// data. They match half pointers exactly, so they win over load/store(void*).
template <class V, class S, class = std::enable_if_t<kHalf<std::remove_const_t<S>>>>
inline V load(S* p) {
  return widen_half(static_cast<const std::remove_const_t<S>*>(p));
}
template <class S, class = std::enable_if_t<kHalf<S>>>
__attribute__((always_inline)) inline void store(S* p, vfloat v, bool normal = false) {
  const half_bits h = narrow_half<S>(v, normal);
  std::memcpy(p, &h, sizeof h);
}

#if defined(NL_TARGET_AVX512) || defined(NL_TARGET_AVX2)
// The 2 * lanes bfloat16 at p as two float vectors: even gets elements 0, 2, 4, .., odd
// elements 1, 3, 5, .. (a shift and a mask, against a widening and a shift per vector): for
// sums, where the order of the elements does not matter (HalfRowSums). Against widening each
// vector (2 threads, Intel Xeon VM, in-process A/B), bfloat16 layer_norm of (8192, 768) to
// (256, 65536) took 0.92-0.97x the time, without weight 0.85-0.97x, rms_norm 0.91-1.02x; in
// cache on one thread 0.95-1.00x.
inline void widen_bf16_pairs(const bfloat16* p, vfloat& even, vfloat& odd) {
#if defined(NL_TARGET_AVX512)
  const __m512i h = _mm512_loadu_si512(p);
  even = vfloat(_mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
  odd = vfloat(_mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(int(0xffff0000u)))));
#else
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = vfloat(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
  odd = vfloat(_mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(int(0xffff0000u)))));
#endif
}
#define NL_HAVE_BF16_PAIRS 1
#endif

// kWide halves at p, widened to double.
template <class S, class = std::enable_if_t<kHalf<S>>>
inline vwide load_wide(const S* p) {
#if defined(NL_TARGET_AVX512)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same<S, float16>::value) return _mm512_cvtps_pd(_mm256_cvtph_ps(h));
  else return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#elif defined(NL_TARGET_AVX2)
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same<S, float16>::value) return _mm256_cvtps_pd(_mm_cvtph_ps(h));
  else return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
#else
  vwide v;
  for (int i = 0; i < kWide; ++i) v[i] = double(to_c(p[i]));
  return v;
#endif
}
template <class S, class = std::enable_if_t<kHalf<S>>>
inline void store_narrow(S* p, vwide v) {
  for (int i = 0; i < kWide; ++i) p[i] = narrow<S>(v[i]);
}

// The first `count` (0 < count <= lanes) elements at p; the other lanes are zero.
template <class T>
inline vnative<compute_t<T>> load_partial(const T* p, int count) {
  using V = vnative<compute_t<T>>;
  if constexpr (kHalf<T>) {
#if defined(NL_TARGET_AVX512)
    const __m256i h = _mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1), p);
    if constexpr (std::is_same<T, float16>::value) return V(_mm512_cvtph_ps(h));
    else return V(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#else
    T buf[kFloatLanes] = {};
    std::memcpy(buf, p, sizeof(T) * std::size_t(count));
    return widen_half(static_cast<const T*>(buf));
#endif
  } else {
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
}

// Stores the first `count` (0 < count <= lanes) lanes of v at p.
template <class T>
inline void store_partial(T* p, vnative<compute_t<T>> v, int count) {
  if constexpr (kHalf<T>) {
    const half_bits h = narrow_half<T>(v);
#if defined(NL_TARGET_AVX512)
    _mm256_mask_storeu_epi16(p, __mmask16((1u << count) - 1), h);
#else
    std::memcpy(p, &h, sizeof(T) * std::size_t(count));
#endif
  } else {
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
}

// store_partial() without a masked store, for the partial vectors of rows whose other vectors
// stream: beside streamed lines, AVX-512 masked stores of float32 layer_norm rows of 256 and 512
// (out= from NumPy, 16 bytes off a line) took the streamed forward to 1.1-1.9x the cached
// time; with plain stores it ran 0.67-0.94x (AMD Zen 4). A plain store when count is the full
// width.
template <class T>
inline void store_partial_unmasked(T* p, vnative<compute_t<T>> v, int count) {
  if (count == kLanes<compute_t<T>>) return store(p, v);
  T lanes[kLanes<compute_t<T>>];
  store(lanes, v);
  std::memcpy(p, lanes, sizeof(T) * std::size_t(count));
}

// count elements at p as a vector: a plain load when count is the full width.
template <class T>
inline vnative<compute_t<T>> load_n(const T* p, int count) {
  using V = vnative<compute_t<T>>;
  return count == kLanes<compute_t<T>> ? load<V>(p) : load_partial(p, count);
}

// A store that bypasses the caches, for outputs too large to stay in them. p is aligned to
// the vector width. stream_fence() orders these stores before the thread's later ones.
// normal: as for narrow_half (half data only).
template <class T>
__attribute__((always_inline)) inline void store_stream(T* p, vnative<compute_t<T>> v, bool normal = false) {
  if constexpr (kHalf<T>) {
#if defined(NL_TARGET_AVX512)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow_half<T>(v, normal));
#elif defined(NL_TARGET_AVX2)
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow_half<T>(v));
#else
    store(p, v);
#endif
  } else {
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
}
inline void stream_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#elif defined(__aarch64__)
  __asm__ __volatile__("dmb ishst" ::: "memory");
#endif
}

// Cached outputs are prefetched kWritePrefetchBytes ahead of their stores. A store whose line
// is not in L1 waits in the store buffer for it; a loop storing faster than lines arrive fills
// the buffer and stalls. On Intel (Emerald Rapids, lines from L3 or memory) row-norm backwards
// with weight took 0.56-0.82x the time with it, forwards of rows from memory 0.73-0.97x. This
// is a read prefetch (no -mprfchw): PREFETCHW measured the same or up to 1.1x slower.
constexpr std::int64_t kWritePrefetchBytes = 2048;
template <class T>
__attribute__((always_inline)) inline void prefetch_for_write(T* p) {
  __builtin_prefetch(reinterpret_cast<char*>(p) + kWritePrefetchBytes, 1);
}

// store(p, v), for half data skipping the subnormal check where normal (narrow_half).
template <class T>
__attribute__((always_inline)) inline void store_whole(T* p, vnative<compute_t<T>> v, bool normal) {
  if constexpr (kHalf<T>) store(p, v, normal);
  else store(p, v);
}

// One vector of an output: stored past the caches with stream where p is aligned to the vector
// width (store_stream), else through them, its line prefetched ahead (prefetch_for_write).
// normal: as for narrow_half (half data only).
template <class T>
__attribute__((always_inline)) inline void store_out(T* p, vnative<compute_t<T>> v, bool stream, bool normal = false) {
  constexpr std::uintptr_t width = kLanes<compute_t<T>> * sizeof(T);
  if (stream && reinterpret_cast<std::uintptr_t>(p) % width == 0) {
    store_stream(p, v, normal);
  } else {
    prefetch_for_write(p);
    store_whole(p, v, normal);
  }
}

// Rows whose outputs stream come from memory: while one row is written, the same place of the
// next row is fetched into L2, so that reads and writes overlap instead of alternating row by
// row (float32 rows of (2048, 4096) and (256, 65536) took 0.73-0.92x the time on Intel
// Emerald Rapids; rows from L3 1.07-1.10x, so cached rows do not).
template <class T>
__attribute__((always_inline)) inline void prefetch_next_row(const T* p) {
  __builtin_prefetch(p, 0, 2);
}
// The row after row i of rows (the last row itself: pointers stay inside the array).
inline std::int64_t next_row(std::int64_t i, std::int64_t rows) { return i + 1 < rows ? i + 1 : i; }

// Streamed stores fill whole cache lines: a line shared by a streamed vector and a cached store
// is written twice (float16 layer_norm (16384, 768), 32-byte vectors aligned off the line, took
// 2.4-2.9x the cached time streamed; AMD Zen 4).
constexpr std::size_t kLineBytes = 64;

// Whether a row of n elements of T is long enough to stream (16 vectors or more): shorter rows
// are stored cached.
template <class T>
inline bool streamable_row(std::int64_t n) {
  return n >= 16 * kLanes<compute_t<T>>;
}

// Elements of y before its first line-aligned one, where a row of n is long enough to stream
// (streamable_row); -1 where it is not. It may exceed one vector where vectors are narrower
// than a line.
template <class T>
inline std::int64_t stream_head(const T* y, std::int64_t n) {
  constexpr int L = kLanes<compute_t<T>>;
  static_assert(L * sizeof(T) <= kLineBytes, "vectors fit a line");
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(y);
  if (L == 1 || addr % sizeof(T) != 0 || !streamable_row<T>(n)) return -1;
  const std::int64_t head = std::int64_t((kLineBytes - addr % kLineBytes) % kLineBytes / sizeof(T));
  return head < n ? head : n;
}

// The end of the streamed part of a row of n whose head elements come first: whole lines.
template <class T>
inline std::int64_t stream_end(std::int64_t head, std::int64_t n) {
  constexpr std::int64_t line = std::int64_t(kLineBytes / sizeof(T));
  return head + (n - head) / line * line;
}

// Walks a row of n elements whose first line-aligned one is head >= 0 (stream_head):
// edge(j, count) for the partial vectors before head, span(head, end) for the whole vectors over
// whole lines (end: stream_end), then edge(j, count) for the rest (count <= lanes).
template <class T, class Edge, class Span>
__attribute__((always_inline)) inline void walk_line_spans(std::int64_t head, std::int64_t n, const Edge& edge,
                                                           const Span& span) {
  constexpr int L = kLanes<compute_t<T>>;
  for (std::int64_t j = 0; j < head; j += L) edge(j, head - j < L ? int(head - j) : L);
  const std::int64_t end = stream_end<T>(head, n);
  span(head, end);
  for (std::int64_t j = end; j < n; j += L) edge(j, n - j < L ? int(n - j) : L);
}

// walk_line_spans, a vector at a time: whole(j) for each whole vector of the span.
template <class T, class Edge, class Whole>
__attribute__((always_inline)) inline void walk_lines(std::int64_t head, std::int64_t n, const Edge& edge, const Whole& whole) {
  constexpr int L = kLanes<compute_t<T>>;
  auto span = [&](std::int64_t j, std::int64_t end) __attribute__((always_inline)) {
    for (; j < end; j += L) whole(j);
  };
  walk_line_spans<T>(head, n, edge, span);
}

// Whether any lane of the R vectors may be a subnormal float: used only where kCheckedNarrow
// (AVX-512 BF16); elsewhere true, so every vector would keep its own check.
template <int R, class V>
__attribute__((always_inline)) inline bool any_subnormal(const V (&v)[R]) {
#if defined(NL_TARGET_AVX512)
  __mmask16 subnormal = 0;
  for (int b = 0; b < R; ++b) subnormal |= _mm512_fpclass_ps_mask(__m512(v[b]), 0x20);
  return subnormal != 0;
#else
  return ((void)v, true);
#endif
}

// put(b, v[b], normal) for b = 0 .. R-1, in order. Where stores check each vector for subnormal
// floats (kCheckedNarrow), one test for all R (normal: none holds one); else normal is false.
// For the backwards' bfloat16 dx, against a test per vector: layer_norm_backward and
// rms_norm_backward of (4096, 64) to (256, 65536) took 0.86-0.99x the time, add_layer_norm's
// (2048, 4096) 0.77x, batch and instance norm backward of (64, 3, 224, 224) 0.79x (channels-
// first), channels-last 0.95-1.04x (2 threads, AMD Zen 4 VM, in-process A/B).
template <class T, int R, class Put>
__attribute__((always_inline)) inline void put_vectors(const vnative<compute_t<T>> (&v)[R], const Put& put) {
  bool normal = false;
  if constexpr (kCheckedNarrow<T>) normal = !any_subnormal(v);
  for (int b = 0; b < R; ++b) put(b, v[b], normal);
}

// put(j, f(j, lanes), normal) for the whole vectors j = j0, j0 + lanes, .. < j1, in order. Where
// stores check each vector for subnormal floats (kCheckedNarrow), the vectors go four at a time,
// one test for the four (put_vectors). A test per vector took a tenth of the time: against it,
// bfloat16 layer_norm of (512, 768), (8192, 768), (2048, 4096) and (4096, 64) took 0.89-0.94x the
// time, rms_norm 0.89-0.96x, add_layer_norm 0.94-0.96x; (256, 65536), from memory, 0.97-1.01x
// (2 threads, AMD Zen 4 VM, in-process A/B). The lambdas of map_row and map_row_pair are
// inlined: GCC left the grouped spans out of line, 1.2x the time.
template <class T, class F, class Put>
__attribute__((always_inline)) inline void whole_vectors(std::int64_t j, std::int64_t j1, const F& f, const Put& put) {
  constexpr int L = kLanes<compute_t<T>>;
  if constexpr (kCheckedNarrow<T>) {
    for (; j + 4 * L <= j1; j += 4 * L) {
      const vfloat v[4] = {f(j, L), f(j + L, L), f(j + 2 * L, L), f(j + 3 * L, L)};
      put_vectors<T>(v, [&](int b, vfloat u, bool normal) __attribute__((always_inline)) { put(j + b * L, u, normal); });
    }
  }
  for (; j < j1; j += L) put(j, f(j, L), false);
}

// out[j .. j1) = f(j, lanes) for its whole vectors (whole_vectors), each through store_out.
template <class T, class F>
__attribute__((always_inline)) inline void store_out_vectors(T* out, std::int64_t j, std::int64_t j1, bool stream,
                                                             const F& f) {
  whole_vectors<T>(j, j1, f, [&](std::int64_t k, vnative<compute_t<T>> v, bool normal) __attribute__((always_inline)) {
    store_out(out + k, v, stream, normal);
  });
}

// y[j .. j+count) = f(j, count) over a row of n elements, one vector at a time: for long rows
// partial vectors up to the first line-aligned element, then full vectors (streamed past the
// caches when stream is set, over whole lines), then the rest (walk_line_spans). Every element
// goes through the same vector code. Short rows skip the alignment: a split store costs less
// than a partial vector there. NV > 0: a row of NV whole vectors (n == NV * lanes, not
// streamed). f is called in order of j, but whole vectors may be stored a few calls later
// (whole_vectors): f(j) must not read y before j.
template <int NV = 0, class T, class F>
__attribute__((always_inline)) inline void map_row(T* y, std::int64_t n, bool stream, const F& f) {
  using V = vnative<compute_t<T>>;
  constexpr int L = kLanes<compute_t<T>>;
  auto put = [&](std::int64_t j, V v, bool normal) __attribute__((always_inline)) { store_whole(y + j, v, normal); };
  if constexpr (NV > 0) {
    whole_vectors<T>(0, NV * L, f, put);
    return;
  }
  auto put_cached = [&](std::int64_t j, V v, bool normal) __attribute__((always_inline)) {
    prefetch_for_write(y + j);
    store_whole(y + j, v, normal);
  };
  auto cached = [&](std::int64_t j, int count) __attribute__((always_inline)) {
    if (count == L) return put_cached(j, f(j, L), false);
    prefetch_for_write(y + j);
    store_partial(y + j, f(j, count), count);
  };
  auto cached_span = [&](std::int64_t j0, std::int64_t j1) __attribute__((always_inline)) {
    whole_vectors<T>(j0, j1, f, put_cached);
  };
  const std::int64_t head = stream_head(y, n);
  if (head < 0) {
    const std::int64_t whole = n / L * L;
    cached_span(0, whole);
    if (whole < n) cached(whole, int(n - whole));
  } else if (stream) {
    // Beside streamed lines, partial vectors are stored unmasked (store_partial_unmasked).
    walk_line_spans<T>(
        head, n,
        [&](std::int64_t j, int count) __attribute__((always_inline)) {
          store_partial_unmasked(y + j, f(j, count), count);
        },
        [&](std::int64_t j0, std::int64_t j1) __attribute__((always_inline)) {
          whole_vectors<T>(j0, j1, f, [&](std::int64_t j, V v, bool normal) __attribute__((always_inline)) {
            store_stream(y + j, v, normal);
          });
        });
  } else {
    walk_line_spans<T>(head, n, cached, cached_span);
  }
}

// map_row over two rows of n at once, f(j, count, out0, out1) giving both rows' vectors at j:
// the rows share whatever f loads for column j. Both rows must start at the same distance from
// a line (stream_head(y0, n) == stream_head(y1, n)); each element is stored as map_row would.
template <class T, class F>
__attribute__((always_inline)) inline void map_row_pair(T* y0, T* y1, std::int64_t n, bool stream, const F& f) {
  using V = vnative<compute_t<T>>;
  constexpr int L = kLanes<compute_t<T>>;
  // put(j, a, b, normal) for the whole vectors j of [j, j1), two at a time where stores check
  // for subnormal floats (as whole_vectors).
  auto pairs = [&](std::int64_t j, std::int64_t j1, const auto& put) __attribute__((always_inline)) {
    if constexpr (kCheckedNarrow<T>) {
      for (; j + 2 * L <= j1; j += 2 * L) {
        V v[4];
        f(j, L, v[0], v[1]);
        f(j + L, L, v[2], v[3]);
        const bool normal = !any_subnormal(v);
        put(j, v[0], v[1], normal);
        put(j + L, v[2], v[3], normal);
      }
    }
    for (; j < j1; j += L) {
      V a, b;
      f(j, L, a, b);
      put(j, a, b, false);
    }
  };
  auto put_cached = [&](std::int64_t j, V a, V b, bool normal) __attribute__((always_inline)) {
    prefetch_for_write(y0 + j);
    prefetch_for_write(y1 + j);
    store_whole(y0 + j, a, normal);
    store_whole(y1 + j, b, normal);
  };
  auto cached = [&](std::int64_t j, int count) __attribute__((always_inline)) {
    V a, b;
    if (count == L) {
      f(j, L, a, b);
      return put_cached(j, a, b, false);
    }
    prefetch_for_write(y0 + j);
    prefetch_for_write(y1 + j);
    f(j, count, a, b);
    store_partial(y0 + j, a, count);
    store_partial(y1 + j, b, count);
  };
  auto cached_span = [&](std::int64_t j0, std::int64_t j1) __attribute__((always_inline)) {
    pairs(j0, j1, put_cached);
  };
  const std::int64_t head = stream_head(y0, n);
  if (head < 0) {
    const std::int64_t whole = n / L * L;
    cached_span(0, whole);
    if (whole < n) cached(whole, int(n - whole));
  } else if (stream) {
    walk_line_spans<T>(
        head, n,
        [&](std::int64_t j, int count) __attribute__((always_inline)) {
          V a, b;
          f(j, count, a, b);
          store_partial_unmasked(y0 + j, a, count);
          store_partial_unmasked(y1 + j, b, count);
        },
        [&](std::int64_t j0, std::int64_t j1) __attribute__((always_inline)) {
          pairs(j0, j1, [&](std::int64_t j, V a, V b, bool normal) __attribute__((always_inline)) {
            store_stream(y0 + j, a, normal);
            store_stream(y1 + j, b, normal);
          });
        });
  } else {
    walk_line_spans<T>(head, n, cached, cached_span);
  }
}

}  // namespace
}  // namespace NL_TARGET
}  // namespace normlab
