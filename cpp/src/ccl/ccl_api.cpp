// The public C++ entry points of connected-component labelling: check arguments, pick threads,
// call the active target's kernel (label.cpp). component_stats() has no SIMD part and lives here.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "ccl/ccl_request.hpp"
#include "dispatch/kernel_table.hpp"
#include "normlab/ccl.hpp"
#include "parallel/parallel.hpp"

namespace normlab {

namespace detail {
namespace {
std::atomic<bool> g_force_wide_index{false};
}
void set_ccl_force_wide_index(bool on) { g_force_wide_index.store(on); }
void set_component_stats(ComponentStats& stats, std::int64_t rows, const std::int64_t* area,
                         const std::int64_t* bbox, const double* centroid) {
  stats.area.assign(area, area + rows);
  stats.bbox.assign(bbox, bbox + 4 * rows);
  stats.centroid.assign(centroid, centroid + 2 * rows);
}

void throw_label_overflow(std::int64_t count, LabelType type) {
  const char* name = "uint64";
  std::int64_t max = std::numeric_limits<std::int64_t>::max();
  switch (type) {
    case LabelType::u16: name = "uint16", max = 65535; break;
    case LabelType::u32: name = "uint32", max = 4294967295LL; break;
    case LabelType::i32: name = "int32", max = 2147483647LL; break;
    case LabelType::i64: name = "int64"; break;
    default: break;
  }
  throw std::overflow_error("the image has " + std::to_string(count) + " components, more than dtype " + name +
                            " can label (at most " + std::to_string(max) + ")");
}

}  // namespace detail

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_image(const ImageView& im, int connectivity) {
  require(connectivity == 4 || connectivity == 8,
          "connectivity must be 4 or 8, got " + std::to_string(connectivity));
  require(im.pixel_bytes == 1 || im.pixel_bytes == 2 || im.pixel_bytes == 4 || im.pixel_bytes == 8,
          "image pixels must be 1, 2, 4 or 8 bytes wide");
  require(im.rows >= 0 && im.cols >= 0, "image rows and cols must be >= 0");
  require(im.cols < std::int64_t(std::numeric_limits<std::int32_t>::max()),
          "image must have fewer than 2**31 - 1 columns");
  require(im.rows == 0 || im.cols == 0 || im.data, "image data is null");
  if (im.pixel_bytes < 8)
    require(im.background < (std::uint64_t(1) << (8 * im.pixel_bytes)),
            "background does not fit the pixel width");
}

int label_bytes(LabelType t) {
  switch (t) {
    case LabelType::i8:
    case LabelType::u8: return 1;
    case LabelType::i16:
    case LabelType::u16: return 2;
    case LabelType::i32:
    case LabelType::u32: return 4;
    default: return 8;
  }
}

int threads_for_image(const ImageView& im, int out_bytes) {
  return threads_for(im.rows * im.cols * std::int64_t(im.pixel_bytes + out_bytes));
}

void empty_stats(ComponentStats* stats) {
  if (!stats) return;
  stats->area.assign(1, 0);
  stats->bbox.assign(4, 0);
  stats->centroid.assign(2, std::numeric_limits<double>::quiet_NaN());
}

}  // namespace

std::int64_t label(const ImageView& image, int connectivity, LabelType label_type, void* labels,
                   ComponentStats* stats) {
  check_image(image, connectivity);
  require(label_type == LabelType::u16 || label_type == LabelType::u32 ||
              label_type == LabelType::i32 || label_type == LabelType::i64 ||
              label_type == LabelType::u64,
          "labels must be uint16, uint32, int32, int64 or uint64");
  if (image.rows == 0 || image.cols == 0) {
    empty_stats(stats);
    return 0;
  }
  require(labels != nullptr, "labels is null");
  CclRequest q;
  q.wide_index = detail::g_force_wide_index.load(std::memory_order_relaxed);
  q.image = image;
  q.connectivity = connectivity;
  q.op = CclOp::label;
  q.label_type = label_type;
  q.out = labels;
  q.stats = stats;
  return active_kernels().ccl.run(q, threads_for_image(image, label_bytes(label_type)));
}

std::int64_t largest_component(const ImageView& image, int connectivity, bool* mask) {
  check_image(image, connectivity);
  if (image.rows == 0 || image.cols == 0) return 0;
  require(mask != nullptr, "mask is null");
  CclRequest q;
  q.wide_index = detail::g_force_wide_index.load(std::memory_order_relaxed);
  q.image = image;
  q.connectivity = connectivity;
  q.op = CclOp::largest;
  q.out = mask;
  return active_kernels().ccl.run(q, threads_for_image(image, 1));
}

std::int64_t remove_small_components(const ImageView& image, std::int64_t min_size,
                                     int connectivity, void* out) {
  check_image(image, connectivity);
  require(min_size >= 0, "min_size must be >= 0, got " + std::to_string(min_size));
  if (image.rows == 0 || image.cols == 0) return 0;
  require(out != nullptr, "out is null");
  CclRequest q;
  q.wide_index = detail::g_force_wide_index.load(std::memory_order_relaxed);
  q.image = image;
  q.connectivity = connectivity;
  q.op = CclOp::remove_small;
  q.out = out;
  q.min_size = min_size;
  return active_kernels().ccl.run(q, threads_for_image(image, image.pixel_bytes));
}

namespace {

// Statistics over runs of equal labels along each row: one pass, serial.
template <class L>
ComponentStats stats_of(const L* labels, std::int64_t rows, std::int64_t cols, std::int64_t count) {
  const std::size_t n = std::size_t(count) + 1;
  ComponentStats st;
  st.area.assign(n, 0);
  st.bbox.assign(4 * n, 0);
  st.centroid.assign(2 * n, 0.0);
  std::vector<std::int64_t> sums(2 * n, 0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const L* row = labels + r * cols;
    std::int64_t j = 0;
    while (j < cols) {
      const L v = row[j];
      std::int64_t k = j + 1;
      while (k < cols && row[k] == v) ++k;
      if (v < L(0) || std::uint64_t(v) > std::uint64_t(count))
        throw std::invalid_argument("labels holds " + std::to_string(v) + " at (" +
                                    std::to_string(r) + ", " + std::to_string(j) +
                                    "), outside [0, count=" + std::to_string(count) + "]");
      const std::size_t l = std::size_t(v);
      const std::int64_t len = k - j;
      std::int64_t* bx = &st.bbox[4 * l];
      if (st.area[l] == 0) {
        bx[0] = r;
        bx[1] = j;
        bx[3] = k;
      } else {
        bx[1] = std::min(bx[1], j);
        bx[3] = std::max(bx[3], k);
      }
      bx[2] = r + 1;
      st.area[l] += len;
      sums[2 * l] += r * len;
      sums[2 * l + 1] += (j + k - 1) * len / 2;
      j = k;
    }
  }
  for (std::size_t l = 0; l < n; ++l) {
    if (st.area[l] > 0) {
      st.centroid[2 * l] = double(sums[2 * l]) / double(st.area[l]);
      st.centroid[2 * l + 1] = double(sums[2 * l + 1]) / double(st.area[l]);
    } else {
      st.centroid[2 * l] = st.centroid[2 * l + 1] = std::numeric_limits<double>::quiet_NaN();
    }
  }
  return st;
}

}  // namespace

ComponentStats component_stats(const void* labels, LabelType label_type, std::int64_t rows,
                               std::int64_t cols, std::int64_t count) {
  require(rows >= 0 && cols >= 0, "labels rows and cols must be >= 0");
  require(count >= 0, "count must be >= 0, got " + std::to_string(count));
  require(rows == 0 || cols == 0 || labels, "labels data is null");
  // count + 1 rows of 7 numbers each must be allocatable; a count far above the pixel count
  // cannot come from a labelling of this image.
  require(count <= std::max<std::int64_t>(rows * cols, 1) || count <= (std::int64_t(1) << 24),
          "count " + std::to_string(count) + " exceeds the number of pixels");
  switch (label_type) {
    case LabelType::i8: return stats_of(static_cast<const std::int8_t*>(labels), rows, cols, count);
    case LabelType::u8: return stats_of(static_cast<const std::uint8_t*>(labels), rows, cols, count);
    case LabelType::i16: return stats_of(static_cast<const std::int16_t*>(labels), rows, cols, count);
    case LabelType::u16: return stats_of(static_cast<const std::uint16_t*>(labels), rows, cols, count);
    case LabelType::i32: return stats_of(static_cast<const std::int32_t*>(labels), rows, cols, count);
    case LabelType::u32: return stats_of(static_cast<const std::uint32_t*>(labels), rows, cols, count);
    case LabelType::i64: return stats_of(static_cast<const std::int64_t*>(labels), rows, cols, count);
    case LabelType::u64: return stats_of(static_cast<const std::uint64_t*>(labels), rows, cols, count);
  }
  throw std::invalid_argument("unknown label type");
}

}  // namespace normlab
