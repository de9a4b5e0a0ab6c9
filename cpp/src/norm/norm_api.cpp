// The public C++ entry points of the row-wise norms: check arguments, pick threads, call the
// active target's kernel.
#include <stdexcept>
#include <string>

#include "dispatch/kernel_table.hpp"
#include "normlab/norm.hpp"
#include "parallel/parallel.hpp"

namespace normlab {
namespace {

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_shape(std::int64_t rows, std::int64_t cols) {
  require(rows >= 0, "rows must be >= 0");
  require(cols >= 1, "cols must be >= 1");
}

void check_eps(double eps) { require(eps > 0 && eps < __builtin_inf(), "eps must be finite and > 0"); }

template <class T>
int threads_for_rows(std::int64_t rows, std::int64_t cols, int arrays) {
  return threads_for(rows * cols * std::int64_t(sizeof(T)) * arrays);
}

}  // namespace

template <class T>
static void layer_norm_impl(const LayerNormForward<T>& a) {
  check_shape(a.rows, a.cols);
  check_eps(a.eps);
  require((a.x && a.y) || a.rows == 0, "x and y are required");
  active_kernels().row<T>().layer_norm(a, threads_for_rows<T>(a.rows, a.cols, 2));
}

template <class T>
static void layer_norm_backward_impl(const LayerNormBackward<T>& a) {
  check_shape(a.rows, a.cols);
  require((a.dy && a.x && a.mean && a.rstd && a.dx) || a.rows == 0,
          "dy, x, mean, rstd and dx are required");
  require(!a.weight || (a.dweight && a.dbias), "dweight and dbias are required with weight");
  active_kernels().row<T>().layer_norm_backward(a, threads_for_rows<T>(a.rows, a.cols, 3));
}

template <class T>
static void rms_norm_impl(const RmsNormForward<T>& a) {
  check_shape(a.rows, a.cols);
  check_eps(a.eps);
  require((a.x && a.y) || a.rows == 0, "x and y are required");
  active_kernels().row<T>().rms_norm(a, threads_for_rows<T>(a.rows, a.cols, 2));
}

template <class T>
static void rms_norm_backward_impl(const RmsNormBackward<T>& a) {
  check_shape(a.rows, a.cols);
  require((a.dy && a.x && a.rstd && a.dx) || a.rows == 0, "dy, x, rstd and dx are required");
  require(!a.weight || a.dweight, "dweight is required with weight");
  active_kernels().row<T>().rms_norm_backward(a, threads_for_rows<T>(a.rows, a.cols, 3));
}

template <class T>
static void add_layer_norm_impl(const AddLayerNormForward<T>& a) {
  check_shape(a.norm.rows, a.norm.cols);
  check_eps(a.norm.eps);
  require((a.norm.x && a.norm.y && a.residual && a.sum) || a.norm.rows == 0, "x, residual, y and sum are required");
  active_kernels().row<T>().add_layer_norm(a, threads_for_rows<T>(a.norm.rows, a.norm.cols, 4));
}

template <class T>
static void add_rms_norm_impl(const AddRmsNormForward<T>& a) {
  check_shape(a.norm.rows, a.norm.cols);
  check_eps(a.norm.eps);
  require((a.norm.x && a.norm.y && a.residual && a.sum) || a.norm.rows == 0, "x, residual, y and sum are required");
  active_kernels().row<T>().add_rms_norm(a, threads_for_rows<T>(a.norm.rows, a.norm.cols, 4));
}

void layer_norm(const LayerNormForward<float>& a) { layer_norm_impl(a); }
void layer_norm(const LayerNormForward<double>& a) { layer_norm_impl(a); }
void layer_norm(const LayerNormForward<float16>& a) { layer_norm_impl(a); }
void layer_norm(const LayerNormForward<bfloat16>& a) { layer_norm_impl(a); }
void layer_norm_backward(const LayerNormBackward<float>& a) { layer_norm_backward_impl(a); }
void layer_norm_backward(const LayerNormBackward<double>& a) { layer_norm_backward_impl(a); }
void layer_norm_backward(const LayerNormBackward<float16>& a) { layer_norm_backward_impl(a); }
void layer_norm_backward(const LayerNormBackward<bfloat16>& a) { layer_norm_backward_impl(a); }
void rms_norm(const RmsNormForward<float>& a) { rms_norm_impl(a); }
void rms_norm(const RmsNormForward<double>& a) { rms_norm_impl(a); }
void rms_norm(const RmsNormForward<float16>& a) { rms_norm_impl(a); }
void rms_norm(const RmsNormForward<bfloat16>& a) { rms_norm_impl(a); }
void rms_norm_backward(const RmsNormBackward<float>& a) { rms_norm_backward_impl(a); }
void rms_norm_backward(const RmsNormBackward<double>& a) { rms_norm_backward_impl(a); }
void rms_norm_backward(const RmsNormBackward<float16>& a) { rms_norm_backward_impl(a); }
void rms_norm_backward(const RmsNormBackward<bfloat16>& a) { rms_norm_backward_impl(a); }
void add_layer_norm(const AddLayerNormForward<float>& a) { add_layer_norm_impl(a); }
void add_layer_norm(const AddLayerNormForward<double>& a) { add_layer_norm_impl(a); }
void add_layer_norm(const AddLayerNormForward<float16>& a) { add_layer_norm_impl(a); }
void add_layer_norm(const AddLayerNormForward<bfloat16>& a) { add_layer_norm_impl(a); }
void add_rms_norm(const AddRmsNormForward<float>& a) { add_rms_norm_impl(a); }
void add_rms_norm(const AddRmsNormForward<double>& a) { add_rms_norm_impl(a); }
void add_rms_norm(const AddRmsNormForward<float16>& a) { add_rms_norm_impl(a); }
void add_rms_norm(const AddRmsNormForward<bfloat16>& a) { add_rms_norm_impl(a); }

}  // namespace normlab
