// google-benchmark suite for the row-wise norms, against the copy roofline.
// Threaded kernels: UseRealTime(); bytes are the minimum memory traffic of each kernel.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "normlab/norm.hpp"
#include "normlab/runtime.hpp"

namespace {

struct RowData {
  std::int64_t rows, cols;
  std::vector<float> x, dy, y, w, b, mean, rstd, dw, db;

  RowData(std::int64_t r, std::int64_t c)
      : rows(r), cols(c), x(r * c), dy(r * c), y(r * c), w(c), b(c), mean(r), rstd(r), dw(c), db(c) {
    std::mt19937 gen(42);
    std::normal_distribution<float> dist(0.5f, 2.0f);
    for (auto* v : {&x, &dy}) for (float& e : *v) e = dist(gen);
    for (auto* v : {&w, &b}) for (float& e : *v) e = dist(gen);
    normlab::LayerNormForward<float> a;
    a.x = x.data(), a.y = y.data(), a.mean = mean.data(), a.rstd = rstd.data();
    a.rows = rows, a.cols = cols;
    normlab::layer_norm(a);
  }
  std::int64_t bytes() const { return rows * cols * std::int64_t(sizeof(float)); }
};

// Half-precision bits of a float, mantissa truncated (the benchmark data, N(0.5, 2), lies far
// from the half formats' limits; values below float16's smallest normal become 0).
void store(float f, normlab::bfloat16& h) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  h.bits = std::uint16_t(u >> 16);
}
void store(float f, normlab::float16& h) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const int exponent = int((u >> 23) & 0xffu) - 127 + 15;
  h.bits = std::uint16_t(exponent <= 0 ? sign
                         : exponent >= 31 ? sign | 0x7bffu  // the largest finite float16
                                          : sign | (std::uint32_t(exponent) << 10) | ((u >> 13) & 0x3ffu));
}

// Rows of float16 / bfloat16 data with float32 weight and bias (param_t<T>).
template <class T>
struct HalfRowData {
  std::int64_t rows, cols;
  std::vector<T> x, y;
  std::vector<normlab::param_t<T>> w, b;

  HalfRowData(std::int64_t r, std::int64_t c) : rows(r), cols(c), x(r * c), y(r * c), w(c), b(c) {
    std::mt19937 gen(42);
    std::normal_distribution<float> dist(0.5f, 2.0f);
    for (T& e : x) store(dist(gen), e);
    for (auto* v : {&w, &b}) for (float& e : *v) e = dist(gen);
  }
  std::int64_t bytes() const { return rows * cols * std::int64_t(sizeof(T)); }
};

template <class D = RowData>
D& data(const benchmark::State& state) {
  static std::vector<std::unique_ptr<D>> cache;
  for (auto& d : cache)
    if (d->rows == state.range(0) && d->cols == state.range(1)) return *d;
  cache.push_back(std::make_unique<D>(state.range(0), state.range(1)));
  return *cache.back();
}

void BM_copy(benchmark::State& state) {
  RowData& d = data(state);
  for (auto _ : state) normlab::parallel_copy(d.x.data(), d.y.data(), std::size_t(d.bytes()));
  state.SetBytesProcessed(state.iterations() * d.bytes() * 2);
}

void BM_add(benchmark::State& state) {
  RowData& d = data(state);
  for (auto _ : state) normlab::parallel_add(d.x.data(), d.dy.data(), d.y.data(), std::size_t(d.rows * d.cols));
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

// layer_norm forward on data D of element type T. The half-precision entries read and write
// half the bytes of the float32 one; compare their bytes/s with BM_copy's (the roofline at any
// element size).
template <class T, class D>
void layer_norm_forward(benchmark::State& state) {
  D& d = data<D>(state);
  normlab::LayerNormForward<T> a;
  a.x = d.x.data(), a.weight = d.w.data(), a.bias = d.b.data(), a.y = d.y.data();
  a.rows = d.rows, a.cols = d.cols;
  for (auto _ : state) normlab::layer_norm(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 2);
}

void BM_layer_norm(benchmark::State& state) { layer_norm_forward<float, RowData>(state); }
void BM_layer_norm_bf16(benchmark::State& state) {
  layer_norm_forward<normlab::bfloat16, HalfRowData<normlab::bfloat16>>(state);
}
void BM_layer_norm_f16(benchmark::State& state) {
  layer_norm_forward<normlab::float16, HalfRowData<normlab::float16>>(state);
}

void BM_layer_norm_backward(benchmark::State& state) {
  RowData& d = data(state);
  normlab::LayerNormBackward<float> a;
  a.dy = d.dy.data(), a.x = d.x.data(), a.mean = d.mean.data(), a.rstd = d.rstd.data();
  a.weight = d.w.data(), a.dx = d.y.data(), a.dweight = d.dw.data(), a.dbias = d.db.data();
  a.rows = d.rows, a.cols = d.cols;
  for (auto _ : state) normlab::layer_norm_backward(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

void BM_rms_norm(benchmark::State& state) {
  RowData& d = data(state);
  normlab::RmsNormForward<float> a;
  a.x = d.x.data(), a.weight = d.w.data(), a.y = d.y.data();
  a.rows = d.rows, a.cols = d.cols;
  for (auto _ : state) normlab::rms_norm(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 2);
}

void BM_rms_norm_backward(benchmark::State& state) {
  RowData& d = data(state);
  normlab::RmsNormBackward<float> a;
  a.dy = d.dy.data(), a.x = d.x.data(), a.rstd = d.rstd.data(), a.weight = d.w.data();
  a.dx = d.y.data(), a.dweight = d.dw.data();
  a.rows = d.rows, a.cols = d.cols;
  for (auto _ : state) normlab::rms_norm_backward(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

void row_shapes(benchmark::internal::Benchmark* b) {
  for (auto [r, c] : {std::pair{4096, 64}, {8192, 768}, {2048, 4096}, {256, 65536}, {65536, 128}, {4, 64}})
    b->Args({r, c});
  b->ArgNames({"rows", "cols"})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_copy)->Apply(row_shapes);
BENCHMARK(BM_add)->Apply(row_shapes);
BENCHMARK(BM_layer_norm)->Apply(row_shapes);
BENCHMARK(BM_layer_norm_bf16)->Apply(row_shapes);
BENCHMARK(BM_layer_norm_f16)->Apply(row_shapes);
BENCHMARK(BM_layer_norm_backward)->Apply(row_shapes);
BENCHMARK(BM_rms_norm)->Apply(row_shapes);
BENCHMARK(BM_rms_norm_backward)->Apply(row_shapes);

}  // namespace
