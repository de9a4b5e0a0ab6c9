// The one request every connected-component kernel serves (internal: see normlab/ccl.hpp).
#pragma once

#include <cstdint>

#include "normlab/ccl.hpp"

namespace normlab {

enum class CclOp { label, largest, remove_small };

struct CclRequest {
  ImageView image;          // rows >= 1, cols >= 1, checked by ccl_api.cpp
  int connectivity = 8;     // 4 or 8
  CclOp op = CclOp::label;
  LabelType label_type = LabelType::i32;  // CclOp::label
  void* out = nullptr;      // labels, mask or filtered image (C-contiguous rows x cols)
  ComponentStats* stats = nullptr;        // CclOp::label, optional
  std::int64_t min_size = 0;              // CclOp::remove_small
  bool wide_index = false;  // 64-bit run indices even for small images (tests of that path)
};

namespace detail {
// Tests only: run every labelling with 64-bit run indices (normally used from 2**31 runs on).
void set_ccl_force_wide_index(bool on);

// For the per-target kernels, compiled here once: they must not instantiate std::vector or
// std::string themselves (see LocalVector in label.cpp).
void set_component_stats(ComponentStats& stats, std::int64_t rows, const std::int64_t* area,
                         const std::int64_t* bbox, const double* centroid);
[[noreturn]] void throw_label_overflow(std::int64_t count, LabelType type);
}  // namespace detail

}  // namespace normlab
