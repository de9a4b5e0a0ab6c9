// google-benchmark suite for the row-wise norms, against the copy roofline.
// Threaded kernels: UseRealTime(); bytes are the minimum memory traffic of each kernel.
#include <benchmark/benchmark.h>

#include <cstdint>
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

RowData& data(const benchmark::State& state) {
  static std::vector<std::unique_ptr<RowData>> cache;
  for (auto& d : cache)
    if (d->rows == state.range(0) && d->cols == state.range(1)) return *d;
  cache.push_back(std::make_unique<RowData>(state.range(0), state.range(1)));
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

void BM_layer_norm(benchmark::State& state) {
  RowData& d = data(state);
  normlab::LayerNormForward<float> a;
  a.x = d.x.data(), a.weight = d.w.data(), a.bias = d.b.data(), a.y = d.y.data();
  a.rows = d.rows, a.cols = d.cols;
  for (auto _ : state) normlab::layer_norm(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 2);
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
BENCHMARK(BM_layer_norm_backward)->Apply(row_shapes);
BENCHMARK(BM_rms_norm)->Apply(row_shapes);
BENCHMARK(BM_rms_norm_backward)->Apply(row_shapes);

}  // namespace
