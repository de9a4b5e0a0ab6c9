// google-benchmark suite for the channel norms (batch, instance, group), float32, against the
// memory roofline. Threaded kernels: UseRealTime(). Bytes are the minimum memory traffic:
// training forward reads x twice (statistics, normalize) and writes y once; backward reads dy
// and x twice (sums, dx) and writes dx once; the rooflines count the bytes they move.
// Arguments: batch, channels, spatial (product of the spatial dims), channels_last, groups.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "normlab/norm.hpp"
#include "normlab/runtime.hpp"

namespace {

struct ChanData {
  std::int64_t n, c, s;
  bool cl;
  std::vector<float> x, dy, y, w, b, rm, rv, mean, rstd, dw, db;

  ChanData(std::int64_t n_, std::int64_t c_, std::int64_t s_, bool cl_)
      : n(n_), c(c_), s(s_), cl(cl_), x(n * c * s), dy(n * c * s), y(n * c * s), w(c), b(c),
        rm(c, 0.f), rv(c, 1.f), mean(n * c), rstd(n * c), dw(c), db(c) {
    std::mt19937 gen(42);
    std::normal_distribution<float> dist(0.5f, 2.0f);
    for (auto* v : {&x, &dy}) for (float& e : *v) e = dist(gen);
    for (auto* v : {&w, &b}) for (float& e : *v) e = dist(gen);
  }
  std::int64_t bytes() const { return n * c * s * std::int64_t(sizeof(float)); }
};

ChanData& data(const benchmark::State& state) {
  static std::vector<std::unique_ptr<ChanData>> cache;
  const std::int64_t n = state.range(0), c = state.range(1), s = state.range(2);
  const bool cl = state.range(3) != 0;
  for (auto& d : cache)
    if (d->n == n && d->c == c && d->s == s && d->cl == cl) return *d;
  cache.push_back(std::make_unique<ChanData>(n, c, s, cl));
  return *cache.back();
}

void BM_chan_copy(benchmark::State& state) {
  ChanData& d = data(state);
  for (auto _ : state) normlab::parallel_copy(d.x.data(), d.y.data(), std::size_t(d.bytes()));
  state.SetBytesProcessed(state.iterations() * d.bytes() * 2);
}

void BM_chan_add(benchmark::State& state) {
  ChanData& d = data(state);
  for (auto _ : state) normlab::parallel_add(d.x.data(), d.dy.data(), d.y.data(), std::size_t(d.n * d.c * d.s));
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

void BM_batch_norm(benchmark::State& state) {
  ChanData& d = data(state);
  normlab::BatchNormForward<float> a;
  a.x = d.x.data(), a.weight = d.w.data(), a.bias = d.b.data(), a.y = d.y.data();
  a.mean = d.mean.data(), a.invstd = d.rstd.data(), a.running_mean = d.rm.data(), a.running_var = d.rv.data();
  a.batch = d.n, a.channels = d.c, a.spatial = d.s, a.channels_last = d.cl;
  for (auto _ : state) normlab::batch_norm(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

void BM_batch_norm_backward(benchmark::State& state) {
  ChanData& d = data(state);
  normlab::BatchNormForward<float> f;
  f.x = d.x.data(), f.y = d.y.data(), f.mean = d.mean.data(), f.invstd = d.rstd.data();
  f.batch = d.n, f.channels = d.c, f.spatial = d.s, f.channels_last = d.cl;
  normlab::batch_norm(f);
  normlab::BatchNormBackward<float> a;
  a.dy = d.dy.data(), a.x = d.x.data(), a.mean = d.mean.data(), a.invstd = d.rstd.data();
  a.weight = d.w.data(), a.dx = d.y.data(), a.dweight = d.dw.data(), a.dbias = d.db.data();
  a.batch = d.n, a.channels = d.c, a.spatial = d.s, a.channels_last = d.cl;
  for (auto _ : state) normlab::batch_norm_backward(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 5);
}

void BM_group_norm(benchmark::State& state) {
  ChanData& d = data(state);
  normlab::GroupNormForward<float> a;
  a.x = d.x.data(), a.weight = d.w.data(), a.bias = d.b.data(), a.y = d.y.data();
  a.mean = d.mean.data(), a.rstd = d.rstd.data();
  a.batch = d.n, a.channels = d.c, a.spatial = d.s, a.groups = state.range(4), a.channels_last = d.cl;
  for (auto _ : state) normlab::group_norm(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 3);
}

void BM_group_norm_backward(benchmark::State& state) {
  ChanData& d = data(state);
  normlab::GroupNormForward<float> f;
  f.x = d.x.data(), f.y = d.y.data(), f.mean = d.mean.data(), f.rstd = d.rstd.data();
  f.batch = d.n, f.channels = d.c, f.spatial = d.s, f.groups = state.range(4), f.channels_last = d.cl;
  normlab::group_norm(f);
  normlab::GroupNormBackward<float> a;
  a.dy = d.dy.data(), a.x = d.x.data(), a.mean = d.mean.data(), a.rstd = d.rstd.data();
  a.weight = d.w.data(), a.dx = d.y.data(), a.dweight = d.dw.data(), a.dbias = d.db.data();
  a.batch = d.n, a.channels = d.c, a.spatial = d.s, a.groups = state.range(4), a.channels_last = d.cl;
  for (auto _ : state) normlab::group_norm_backward(a);
  state.SetBytesProcessed(state.iterations() * d.bytes() * 5);
}

void batch_shapes(benchmark::internal::Benchmark* b) {
  for (int cl = 0; cl < 2; ++cl) {
    b->Args({32, 64, 56 * 56, cl, 64});
    b->Args({8, 256, 28 * 28, cl, 256});
    b->Args({64, 3, 224 * 224, cl, 3});
  }
  b->ArgNames({"n", "c", "s", "cl", "g"})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

// group_norm with 32 groups, and instance norm (groups == channels), on (8, 256, 28, 28).
void group_shapes(benchmark::internal::Benchmark* b) {
  for (int cl = 0; cl < 2; ++cl) {
    b->Args({8, 256, 28 * 28, cl, 32});
    b->Args({8, 256, 28 * 28, cl, 256});
  }
  b->ArgNames({"n", "c", "s", "cl", "g"})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_chan_copy)->Apply(batch_shapes);
BENCHMARK(BM_chan_add)->Apply(batch_shapes);
BENCHMARK(BM_batch_norm)->Apply(batch_shapes);
BENCHMARK(BM_batch_norm_backward)->Apply(batch_shapes);
BENCHMARK(BM_group_norm)->Apply(group_shapes);
BENCHMARK(BM_group_norm_backward)->Apply(group_shapes);

}  // namespace
