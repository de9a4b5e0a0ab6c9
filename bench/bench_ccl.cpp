// google-benchmark suite for connected-component labelling (normlab/ccl.hpp), images made here:
// uniform noise, granular noise (square blocks), and a synthetic "document" (rows of short text
// strokes). Threaded kernels: UseRealTime(); bytes are the image read plus the labels written.
// Arguments: rows, cols, connectivity, stats (0/1).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "normlab/ccl.hpp"

namespace {

enum Kind { kNoise = 0, kGranular4 = 1, kGranular16 = 2, kDocument = 3 };

std::vector<std::uint8_t> make_image(int kind, std::int64_t rows, std::int64_t cols) {
  std::vector<std::uint8_t> img(std::size_t(rows * cols), 0);
  std::mt19937_64 gen(12345);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (kind == kNoise) {
    for (auto& p : img) p = u(gen) < 0.5;
  } else if (kind == kGranular4 || kind == kGranular16) {
    const std::int64_t block = kind == kGranular4 ? 4 : 16;
    const double density = kind == kGranular4 ? 0.4 : 0.6;
    const std::int64_t br = (rows + block - 1) / block, bc = (cols + block - 1) / block;
    std::vector<std::uint8_t> small(std::size_t(br * bc));
    for (auto& p : small) p = u(gen) < density;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c)
        img[std::size_t(r * cols + c)] = small[std::size_t((r / block) * bc + c / block)];
  } else {
    // Lines of text: 12-pixel glyph rows every 20 rows, glyphs of random strokes 6-9 wide.
    for (std::int64_t top = 4; top + 12 < rows; top += 20) {
      std::int64_t c = 8;
      while (c + 10 < cols) {
        const std::int64_t w = 6 + std::int64_t(u(gen) * 4);
        for (std::int64_t r = top; r < top + 12; ++r)
          for (std::int64_t x = c; x < c + w; ++x)
            if (u(gen) < 0.7) img[std::size_t(r * cols + x)] = 1;
        c += w + 2 + (u(gen) < 0.15 ? 8 : 0);
      }
    }
  }
  return img;
}

struct Case {
  int kind;
  std::int64_t rows, cols;
  std::vector<std::uint8_t> image;
  std::vector<std::int32_t> labels;
};

Case& data(int kind, std::int64_t rows, std::int64_t cols) {
  static std::vector<std::unique_ptr<Case>> cache;
  for (auto& c : cache)
    if (c->kind == kind && c->rows == rows && c->cols == cols) return *c;
  auto c = std::make_unique<Case>();
  c->kind = kind;
  c->rows = rows;
  c->cols = cols;
  c->image = make_image(kind, rows, cols);
  c->labels.resize(std::size_t(rows * cols));
  cache.push_back(std::move(c));
  return *cache.back();
}

void run_label(benchmark::State& state, int kind) {
  Case& d = data(kind, state.range(0), state.range(1));
  const int conn = int(state.range(2));
  const bool with_stats = state.range(3) != 0;
  normlab::ImageView im;
  im.data = d.image.data();
  im.pixel_bytes = 1;
  im.rows = d.rows;
  im.cols = d.cols;
  im.row_stride = d.cols;
  im.col_stride = 1;
  std::int64_t count = 0;
  for (auto _ : state) {
    normlab::ComponentStats stats;
    count = normlab::label(im, conn, normlab::LabelType::i32, d.labels.data(),
                           with_stats ? &stats : nullptr);
    benchmark::DoNotOptimize(count);
    benchmark::ClobberMemory();
  }
  state.counters["components"] = double(count);
  state.SetBytesProcessed(state.iterations() * d.rows * d.cols * std::int64_t(1 + sizeof(std::int32_t)));
}

void BM_label_noise(benchmark::State& s) { run_label(s, kNoise); }
void BM_label_granular4(benchmark::State& s) { run_label(s, kGranular4); }
void BM_label_granular16(benchmark::State& s) { run_label(s, kGranular16); }
void BM_label_document(benchmark::State& s) { run_label(s, kDocument); }

void BM_remove_small_components(benchmark::State& state) {
  Case& d = data(kGranular4, state.range(0), state.range(1));
  normlab::ImageView im;
  im.data = d.image.data();
  im.rows = d.rows;
  im.cols = d.cols;
  im.row_stride = d.cols;
  im.col_stride = 1;
  std::vector<std::uint8_t> out(d.image.size());
  for (auto _ : state) {
    benchmark::DoNotOptimize(normlab::remove_small_components(im, 64, int(state.range(2)), out.data()));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * d.rows * d.cols * 2);
}

void args(benchmark::internal::Benchmark* b, std::int64_t rows, std::int64_t cols) {
  for (int conn : {4, 8})
    for (int stats : {0, 1}) b->Args({rows, cols, conn, stats});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_label_noise)->Apply([](auto* b) { args(b, 2048, 2048); });
BENCHMARK(BM_label_granular4)->Apply([](auto* b) { args(b, 2048, 2048); });
BENCHMARK(BM_label_granular16)->Apply([](auto* b) { args(b, 4096, 4096); });
BENCHMARK(BM_label_document)->Apply([](auto* b) { args(b, 1528, 3072); });
BENCHMARK(BM_remove_small_components)
    ->Args({2048, 2048, 4})
    ->Args({2048, 2048, 8})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
