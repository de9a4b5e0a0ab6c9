// The table of kernel entry points one SIMD target provides. Each per-target kernel file
// fills its entries through register_<file>(KernelTable&); dispatch.cpp keeps one table per
// target and points the active one at the best target the CPU supports.
#pragma once

#include <cstddef>
#include <cstdint>

#include "normlab/norm.hpp"

namespace normlab {

struct CclRequest;  // ccl/ccl_request.hpp

template <class T>
struct RowNormKernels {
  void (*layer_norm)(const LayerNormForward<T>&, int nthreads) = nullptr;
  void (*layer_norm_backward)(const LayerNormBackward<T>&, int nthreads) = nullptr;
  void (*rms_norm)(const RmsNormForward<T>&, int nthreads) = nullptr;
  void (*rms_norm_backward)(const RmsNormBackward<T>&, int nthreads) = nullptr;
  void (*add_layer_norm)(const AddLayerNormForward<T>&, int nthreads) = nullptr;
  void (*add_rms_norm)(const AddRmsNormForward<T>&, int nthreads) = nullptr;
};

template <class T>
struct ChannelNormKernels {
  void (*batch_norm)(const BatchNormForward<T>&, int nthreads) = nullptr;
  void (*batch_norm_backward)(const BatchNormBackward<T>&, int nthreads) = nullptr;
  void (*group_norm)(const GroupNormForward<T>&, int nthreads) = nullptr;
  void (*group_norm_backward)(const GroupNormBackward<T>&, int nthreads) = nullptr;
};

struct RooflineKernels {
  void (*copy)(const void* src, void* dst, std::size_t bytes, int nthreads, bool stream) = nullptr;
  void (*add)(const float* a, const float* b, float* out, std::size_t n, int nthreads, bool stream) = nullptr;
  void (*add_twice)(const float* a, const float* b, float* out1, float* out2, std::size_t n, int nthreads,
                    bool stream) = nullptr;
};

struct CclKernels {
  // Labels q.image and writes q.out per q.op; returns the component count (kept count for
  // remove_small). ccl/label.cpp.
  std::int64_t (*run)(const CclRequest& q, int nthreads) = nullptr;
};

struct KernelTable {
  const char* target = "";
  RowNormKernels<float> row_f32;
  RowNormKernels<double> row_f64;
  RowNormKernels<float16> row_f16;
  RowNormKernels<bfloat16> row_bf16;
  RooflineKernels roofline;
  ChannelNormKernels<float> chan_f32;
  ChannelNormKernels<double> chan_f64;
  ChannelNormKernels<float16> chan_f16;
  ChannelNormKernels<bfloat16> chan_bf16;
  CclKernels ccl;

  template <class T>
  const RowNormKernels<T>& row() const;
  template <class T>
  const ChannelNormKernels<T>& chan() const;
};

template <>
inline const RowNormKernels<float>& KernelTable::row<float>() const { return row_f32; }
template <>
inline const RowNormKernels<double>& KernelTable::row<double>() const { return row_f64; }

template <>
inline const RowNormKernels<float16>& KernelTable::row<float16>() const { return row_f16; }
template <>
inline const RowNormKernels<bfloat16>& KernelTable::row<bfloat16>() const { return row_bf16; }

template <>
inline const ChannelNormKernels<float>& KernelTable::chan<float>() const { return chan_f32; }
template <>
inline const ChannelNormKernels<float16>& KernelTable::chan<float16>() const { return chan_f16; }
template <>
inline const ChannelNormKernels<bfloat16>& KernelTable::chan<bfloat16>() const { return chan_bf16; }
template <>
inline const ChannelNormKernels<double>& KernelTable::chan<double>() const { return chan_f64; }

// Calls f on the row-norm / channel-norm kernels of every data dtype: the one list a new data
// dtype joins. (Instantiated with each target file's own lambda, so copies never merge.)
template <class F>
void for_each_row_dtype(KernelTable& t, const F& f) {
  f(t.row_f32), f(t.row_f64), f(t.row_f16), f(t.row_bf16);
}
template <class F>
void for_each_channel_dtype(KernelTable& t, const F& f) {
  f(t.chan_f32), f(t.chan_f64), f(t.chan_f16), f(t.chan_bf16);
}

// The per-target kernel files, each defining register_<name>(KernelTable&) in its target namespace.
#define NL_KERNEL_FILES(X) \
  X(layer_norm)            \
  X(rms_norm)              \
  X(batch_norm)            \
  X(group_norm)            \
  X(roofline)              \
  X(ccl)

// The table of the active target (never null).
const KernelTable& active_kernels();

}  // namespace normlab
