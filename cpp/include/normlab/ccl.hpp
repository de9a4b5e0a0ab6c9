// normlab connected-component labelling: C++ API (no Python dependency).
//
// An image is a 2-D view of integer pixels (any width: 1, 2, 4 or 8 bytes; signedness does not
// matter) with arbitrary byte strides, so C-ordered, Fortran-ordered and sliced arrays are read
// in place. A pixel is foreground when its bit pattern differs from `background` (given as the
// same-width bit pattern, e.g. uint64_t(uint16_t(v))).
//
// Labels are 1..count in raster (row-major) order of each component's first pixel and 0 for the
// background: exactly scipy.ndimage.label's numbering (8-connectivity: the 3x3 square; 4: the
// cross). Results do not depend on the thread count (normlab::set_num_threads) or SIMD target.
//
// Algorithm: each row is turned into a foreground bitmask (SIMD compare) and split into runs;
// every run gets a provisional label (its index) and runs touching runs of the previous row are
// merged with a union-find that keeps the smaller index as root. Row stripes are labelled in
// parallel with disjoint index ranges in raster order, merged across stripe borders and
// flattened in raster order, so the final numbering needs no sort. Memory: the output plus
// O(runs) (12 bytes per run, 16 from 2**31 runs on), never a second image.
#pragma once

#include <cstdint>
#include <vector>

namespace normlab {

struct ImageView {
  const void* data = nullptr;
  int pixel_bytes = 1;             // 1, 2, 4 or 8
  std::int64_t rows = 0;
  std::int64_t cols = 0;           // < 2**31
  std::int64_t row_stride = 0;     // bytes between rows (may be negative)
  std::int64_t col_stride = 0;     // bytes between columns (may be negative)
  std::uint64_t background = 0;    // bit pattern of the background value, pixel_bytes wide
};

// Integer types of label images. label() writes u16, u32, i32, i64 or u64; component_stats()
// reads any of them.
enum class LabelType { i8, u8, i16, u16, i32, u32, i64, u64 };

// Per-label statistics, row 0 the background, as cv2.connectedComponentsWithStats:
//   area[l], bbox[4*l..4*l+3] = top, left, bottom, right (bottom/right exclusive),
//   centroid[2*l..2*l+1] = mean row, mean column.
// When the image has no background pixel, row 0 is area 0, bbox 0,0,0,0, centroid NaN, NaN.
struct ComponentStats {
  std::vector<std::int64_t> area;
  std::vector<std::int64_t> bbox;
  std::vector<double> centroid;
};

// Labels `image` into `labels`, a C-contiguous rows x cols array of `label_type`, and returns
// the number of components. With `stats`, also fills it (count + 1 rows) from the same pass.
// Throws std::invalid_argument for bad arguments (connectivity not 4 or 8, ...) and
// std::overflow_error, before writing anything, when count exceeds the label type's maximum.
std::int64_t label(const ImageView& image, int connectivity, LabelType label_type, void* labels,
                   ComponentStats* stats = nullptr);

// Writes mask (C-contiguous rows x cols bytes, 0/1) of the largest component (ties: the lowest
// label); all 0 without foreground. Returns the number of components.
std::int64_t largest_component(const ImageView& image, int connectivity, bool* mask);

// Writes into `out` (C-contiguous rows x cols pixels of image.pixel_bytes) the image with every
// component of fewer than min_size pixels set to the background. `out` may be the image itself
// when the image is C-contiguous (in place); it must not overlap it otherwise. Returns the
// number of components kept.
std::int64_t remove_small_components(const ImageView& image, std::int64_t min_size,
                                     int connectivity, void* out);

// Statistics of an existing label image (C-contiguous rows x cols integers of `label_type`):
// labels must lie in [0, count], else std::invalid_argument. A second pass over the image.
ComponentStats component_stats(const void* labels, LabelType label_type, std::int64_t rows,
                               std::int64_t cols, std::int64_t count);

}  // namespace normlab
