// normlab normalization kernels: C++ API.
//
// Every tensor is a C-contiguous (rows, cols) matrix: each row is normalized over its cols
// elements. Statistics (mean, rstd) have one value per row; weight/bias one per column.
// Optional pointers may be null: weight/bias (identity affine), mean/rstd outputs (not stored),
// dweight/dbias (not computed). Statistics are accumulated in double; results do not depend on
// the thread count. Threads come from normlab::set_num_threads (runtime.hpp).
#pragma once

#include <cstdint>

namespace normlab {

// Half-precision storage types: IEEE binary16 and bfloat16 (the top half of a float32), as
// raw bits. Kernels convert them to float32, compute in float32 (statistics in double) and
// round results to nearest even. numpy.float16 / ml_dtypes.bfloat16 arrays hold exactly these.
struct float16 {
  std::uint16_t bits;
};
struct bfloat16 {
  std::uint16_t bits;
};

// The type of per-row / per-channel values that go with data of type T (weight, bias,
// statistics, their gradients): T itself for float and double, float for the half types.
template <class T>
struct ParamOf {
  using type = T;
};
template <>
struct ParamOf<float16> {
  using type = float;
};
template <>
struct ParamOf<bfloat16> {
  using type = float;
};
template <class T>
using param_t = typename ParamOf<T>::type;

template <class T>
struct LayerNormForward {
  const T* x = nullptr;
  const param_t<T>* weight = nullptr;
  const param_t<T>* bias = nullptr;
  T* y = nullptr;
  param_t<T>* mean = nullptr;  // optional output, rows values
  param_t<T>* rstd = nullptr;  // optional output, rows values: 1 / sqrt(var + eps), biased var
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  double eps = 1e-5;
};

template <class T>
struct LayerNormBackward {
  const T* dy = nullptr;
  const T* x = nullptr;
  const param_t<T>* mean = nullptr;
  const param_t<T>* rstd = nullptr;
  const param_t<T>* weight = nullptr;
  T* dx = nullptr;
  param_t<T>* dweight = nullptr;  // computed only when weight is given
  param_t<T>* dbias = nullptr;    // computed only when weight is given
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  const T* ds = nullptr;  // optional: a gradient added to dx (add_layer_norm's sum output)
};

template <class T>
struct RmsNormForward {
  const T* x = nullptr;
  const param_t<T>* weight = nullptr;
  T* y = nullptr;
  param_t<T>* rstd = nullptr;  // optional output: 1 / sqrt(mean(x^2) + eps)
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  double eps = 1e-6;
};

template <class T>
struct RmsNormBackward {
  const T* dy = nullptr;
  const T* x = nullptr;
  const param_t<T>* rstd = nullptr;
  const param_t<T>* weight = nullptr;
  T* dx = nullptr;
  param_t<T>* dweight = nullptr;  // computed only when weight is given
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  const T* ds = nullptr;  // optional: a gradient added to dx (add_rms_norm's sum output)
};

// Fused residual add + norm ("Add & Norm"): sum = x + residual (elementwise, in T), then
// y = layer_norm(sum) / rms_norm(sum) as above, in one pass over memory. norm.x is x; sum may
// be x or residual itself. The backward is layer_norm_backward / rms_norm_backward with
// x = sum and ds = the gradient reaching sum from its other uses; its dx is the gradient of
// both x and residual.
template <class T>
struct AddLayerNormForward {
  LayerNormForward<T> norm;
  const T* residual = nullptr;
  T* sum = nullptr;
};

template <class T>
struct AddRmsNormForward {
  RmsNormForward<T> norm;
  const T* residual = nullptr;
  T* sum = nullptr;
};

// Each throws std::invalid_argument for null required pointers, rows < 0, cols < 1 or eps <= 0.
void layer_norm(const LayerNormForward<float>& args);
void layer_norm(const LayerNormForward<double>& args);
void layer_norm(const LayerNormForward<float16>& args);
void layer_norm(const LayerNormForward<bfloat16>& args);
void layer_norm_backward(const LayerNormBackward<float>& args);
void layer_norm_backward(const LayerNormBackward<double>& args);
void layer_norm_backward(const LayerNormBackward<float16>& args);
void layer_norm_backward(const LayerNormBackward<bfloat16>& args);
void rms_norm(const RmsNormForward<float>& args);
void rms_norm(const RmsNormForward<double>& args);
void rms_norm(const RmsNormForward<float16>& args);
void rms_norm(const RmsNormForward<bfloat16>& args);
void rms_norm_backward(const RmsNormBackward<float>& args);
void rms_norm_backward(const RmsNormBackward<double>& args);
void rms_norm_backward(const RmsNormBackward<float16>& args);
void rms_norm_backward(const RmsNormBackward<bfloat16>& args);
void add_layer_norm(const AddLayerNormForward<float>& args);
void add_layer_norm(const AddLayerNormForward<double>& args);
void add_layer_norm(const AddLayerNormForward<float16>& args);
void add_layer_norm(const AddLayerNormForward<bfloat16>& args);
void add_rms_norm(const AddRmsNormForward<float>& args);
void add_rms_norm(const AddRmsNormForward<double>& args);
void add_rms_norm(const AddRmsNormForward<float16>& args);
void add_rms_norm(const AddRmsNormForward<bfloat16>& args);

// ---- Channel norms: batch, instance and group normalization ---------------------------------
//
// x is a C-contiguous tensor of `batch` samples, `channels` channels and `spatial` positions
// (the product of the spatial dims, 1 for none), laid out (batch, channels, spatial) when
// channels_last is false and (batch, spatial, channels) when it is true; y, dy and dx share x's
// layout. weight/bias/running statistics and dweight/dbias have one value per channel.
// Statistics are accumulated in double from shifted sums over fixed blocks combined in a fixed
// order: results are bitwise identical for every thread count.

template <class T>
struct BatchNormForward {
  const T* x = nullptr;
  const param_t<T>* weight = nullptr;
  const param_t<T>* bias = nullptr;
  T* y = nullptr;
  param_t<T>* mean = nullptr;           // optional output, channels values (training: batch mean;
                               // inference: running_mean)
  param_t<T>* invstd = nullptr;         // optional output, channels values: 1 / sqrt(var + eps)
  param_t<T>* running_mean = nullptr;   // training: updated in place when given; inference: required input
  param_t<T>* running_var = nullptr;    // likewise; updated with the unbiased batch variance
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  bool channels_last = false;
  bool training = true;
  double momentum = 0.1;
  double eps = 1e-5;
};

template <class T>
struct BatchNormBackward {
  const T* dy = nullptr;
  const T* x = nullptr;
  const param_t<T>* mean = nullptr;    // channels values (inference: the running mean)
  const param_t<T>* invstd = nullptr;  // channels values (inference: 1 / sqrt(running_var + eps))
  const param_t<T>* weight = nullptr;
  T* dx = nullptr;
  param_t<T>* dweight = nullptr;  // computed only when weight is given
  param_t<T>* dbias = nullptr;    // computed only when weight is given
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  bool channels_last = false;
  bool training = true;
};

template <class T>
struct GroupNormForward {
  const T* x = nullptr;
  const param_t<T>* weight = nullptr;
  const param_t<T>* bias = nullptr;
  T* y = nullptr;
  param_t<T>* mean = nullptr;  // optional output, batch * groups values
  param_t<T>* rstd = nullptr;  // optional output, batch * groups values
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  std::int64_t groups = 1;  // divides channels
  bool channels_last = false;
  double eps = 1e-5;
};

template <class T>
struct GroupNormBackward {
  const T* dy = nullptr;
  const T* x = nullptr;
  const param_t<T>* mean = nullptr;  // batch * groups values
  const param_t<T>* rstd = nullptr;  // batch * groups values
  const param_t<T>* weight = nullptr;
  T* dx = nullptr;
  param_t<T>* dweight = nullptr;  // computed only when weight is given
  param_t<T>* dbias = nullptr;    // computed only when weight is given
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  std::int64_t groups = 1;
  bool channels_last = false;
};

// Instance norm is group norm with one group per channel: statistics are batch * channels values.
template <class T>
struct InstanceNormForward {
  const T* x = nullptr;
  const param_t<T>* weight = nullptr;
  const param_t<T>* bias = nullptr;
  T* y = nullptr;
  param_t<T>* mean = nullptr;  // optional output, batch * channels values
  param_t<T>* rstd = nullptr;  // optional output, batch * channels values
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  bool channels_last = false;
  double eps = 1e-5;
};

template <class T>
struct InstanceNormBackward {
  const T* dy = nullptr;
  const T* x = nullptr;
  const param_t<T>* mean = nullptr;
  const param_t<T>* rstd = nullptr;
  const param_t<T>* weight = nullptr;
  T* dx = nullptr;
  param_t<T>* dweight = nullptr;
  param_t<T>* dbias = nullptr;
  std::int64_t batch = 0;
  std::int64_t channels = 0;
  std::int64_t spatial = 1;
  bool channels_last = false;
};

// Each throws std::invalid_argument for null required pointers, negative or zero sizes, groups
// not dividing channels, eps <= 0, momentum outside [0, 1], a training batch norm with one value
// per channel, or an inference batch norm without running statistics.
void batch_norm(const BatchNormForward<float>& args);
void batch_norm(const BatchNormForward<double>& args);
void batch_norm(const BatchNormForward<float16>& args);
void batch_norm(const BatchNormForward<bfloat16>& args);
void batch_norm_backward(const BatchNormBackward<float>& args);
void batch_norm_backward(const BatchNormBackward<double>& args);
void batch_norm_backward(const BatchNormBackward<float16>& args);
void batch_norm_backward(const BatchNormBackward<bfloat16>& args);
void group_norm(const GroupNormForward<float>& args);
void group_norm(const GroupNormForward<double>& args);
void group_norm(const GroupNormForward<float16>& args);
void group_norm(const GroupNormForward<bfloat16>& args);
void group_norm_backward(const GroupNormBackward<float>& args);
void group_norm_backward(const GroupNormBackward<double>& args);
void group_norm_backward(const GroupNormBackward<float16>& args);
void group_norm_backward(const GroupNormBackward<bfloat16>& args);
void instance_norm(const InstanceNormForward<float>& args);
void instance_norm(const InstanceNormForward<double>& args);
void instance_norm(const InstanceNormForward<float16>& args);
void instance_norm(const InstanceNormForward<bfloat16>& args);
void instance_norm_backward(const InstanceNormBackward<float>& args);
void instance_norm_backward(const InstanceNormBackward<double>& args);
void instance_norm_backward(const InstanceNormBackward<float16>& args);
void instance_norm_backward(const InstanceNormBackward<bfloat16>& args);

}  // namespace normlab
