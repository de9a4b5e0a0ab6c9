// Connected-component labelling over runs: one body, compiled once per SIMD target.
//
// 1. Each row is compared with the background into a bitmask (the SIMD part: one compare and
//    mask extraction per vector; Fortran-ordered images are compared 64 rows at a time down
//    the columns and bit-transposed) and split into runs of foreground pixels from the bit
//    transitions. Every run is a provisional label: its index in a run array laid out in raster
//    order.
// 2. Runs touching runs of the row above (4- or 8-connectivity) are united; the root of a set is
//    always its smallest index, i.e. the run holding the component's first pixel in raster order.
//    Dense 4-connected rows find the touching pairs from the two rows' bits (connect_rows4).
// 3. Row stripes do steps 1-2 in parallel, each in its own index range (the runs of a stripe
//    starting at row r0 start at index r0 * ((cols + 1) / 2), so indices increase in raster
//    order across stripes); the rows at stripe borders are then united serially.
// 4. Flattening in index order gives each root the next label and each other run its parent's
//    label (parents always have smaller indices): scipy.ndimage.label's numbering, no sort.
//    Stripes flatten in parallel from their first label (their roots counted first).
// 5. The output (labels, a mask or the filtered image) is written in parallel from the runs;
//    statistics come from the runs too, in the same pass, never from a second pass over the
//    image.
#include "parallel/openmp.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "ccl/ccl_request.hpp"
#include "dispatch/kernel_table.hpp"
#include "memory/mappings.hpp"
#include "parallel/parallel.hpp"
#include "simd/vec.hpp"

namespace normlab {
namespace NL_TARGET {
namespace {

using std::int32_t;
using std::int64_t;
using std::uint64_t;

template <class T>
inline T min_of(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max_of(T a, T b) {
  return a < b ? b : a;
}
template <class T>
inline void fill_range(T* first, T* last, T value) {
  for (; first < last; ++first) *first = value;
}

int compare_int64(const void* a, const void* b) {
  const int64_t x = *static_cast<const int64_t*>(a), y = *static_cast<const int64_t*>(b);
  return (x > y) - (x < y);
}


// ---- row -> foreground bits ----------------------------------------------------------------

template <class T>
inline T load_pixel(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Bit i set when p[i] != bg, for 64 contiguous pixels.
template <class T>
inline uint64_t foreground_bits64(const T* p, T bg) {
#if defined(NL_TARGET_AVX512)
  if constexpr (sizeof(T) == 1) {
    return _mm512_cmpneq_epi8_mask(_mm512_loadu_si512(p), _mm512_set1_epi8(char(bg)));
  } else if constexpr (sizeof(T) == 2) {
    const __m512i b = _mm512_set1_epi16(short(bg));
    const uint64_t lo = _mm512_cmpneq_epi16_mask(_mm512_loadu_si512(p), b);
    const uint64_t hi = _mm512_cmpneq_epi16_mask(_mm512_loadu_si512(p + 32), b);
    return lo | hi << 32;
  } else if constexpr (sizeof(T) == 4) {
    const __m512i b = _mm512_set1_epi32(int(bg));
    uint64_t m = 0;
    for (int k = 0; k < 4; ++k)
      m |= uint64_t(_mm512_cmpneq_epi32_mask(_mm512_loadu_si512(p + 16 * k), b)) << (16 * k);
    return m;
  } else {
    const __m512i b = _mm512_set1_epi64((long long)bg);
    uint64_t m = 0;
    for (int k = 0; k < 8; ++k)
      m |= uint64_t(_mm512_cmpneq_epi64_mask(_mm512_loadu_si512(p + 8 * k), b)) << (8 * k);
    return m;
  }
#elif defined(NL_TARGET_AVX2)
  const auto ld = [](const T* q) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)); };
  uint64_t eq = 0;
  if constexpr (sizeof(T) == 1) {
    const __m256i b = _mm256_set1_epi8(char(bg));
    eq = uint64_t(uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi8(ld(p), b)))) |
         uint64_t(uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi8(ld(p + 32), b)))) << 32;
  } else if constexpr (sizeof(T) == 2) {
    const __m256i b = _mm256_set1_epi16(short(bg));
    for (int k = 0; k < 2; ++k) {
      const __m256i c0 = _mm256_cmpeq_epi16(ld(p + 32 * k), b);
      const __m256i c1 = _mm256_cmpeq_epi16(ld(p + 32 * k + 16), b);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi16(c0, c1), 0xD8);
      eq |= uint64_t(uint32_t(_mm256_movemask_epi8(packed))) << (32 * k);
    }
  } else if constexpr (sizeof(T) == 4) {
    const __m256i b = _mm256_set1_epi32(int(bg));
    for (int k = 0; k < 8; ++k)
      eq |= uint64_t(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(ld(p + 8 * k), b))))
            << (8 * k);
  } else {
    const __m256i b = _mm256_set1_epi64x((long long)bg);
    for (int k = 0; k < 16; ++k)
      eq |= uint64_t(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpeq_epi64(ld(p + 4 * k), b))))
            << (4 * k);
  }
  return ~eq;
#else
  // Baseline (and NEON): the plain scalar reference.
  uint64_t m = 0;
  for (int i = 0; i < 64; ++i) m |= uint64_t(p[i] != bg) << i;
  return m;
#endif
}

// The foreground bits of one row (words of 64 pixels, bits past cols cleared).
template <class T>
void row_bits(const char* row, int64_t col_stride, int64_t cols, uint64_t background,
              uint64_t* bits) {
  const T bg = T(background);
  const int64_t full = cols / 64;
  if (col_stride == int64_t(sizeof(T))) {
    const T* p = reinterpret_cast<const T*>(row);
    for (int64_t w = 0; w < full; ++w) bits[w] = foreground_bits64<T>(p + 64 * w, bg);
    if (cols % 64) {
      uint64_t m = 0;
      for (int64_t j = full * 64; j < cols; ++j) m |= uint64_t(p[j] != bg) << (j & 63);
      bits[full] = m;
    }
    return;
  }
  // Strided: gather 64 pixels at a time into a contiguous tile, then compare as above.
  T tile[64];
  for (int64_t w = 0; w < full; ++w) {
    const char* q = row + w * 64 * col_stride;
    for (int k = 0; k < 64; ++k) tile[k] = load_pixel<T>(q + k * col_stride);
    bits[w] = foreground_bits64<T>(tile, bg);
  }
  if (cols % 64) {
    uint64_t m = 0;
    const char* q = row + full * 64 * col_stride;
    for (int64_t j = full * 64; j < cols; ++j, q += col_stride)
      m |= uint64_t(load_pixel<T>(q) != bg) << (j & 63);
    bits[full] = m;
  }
}

using RowBitsFn = void (*)(const char*, int64_t, int64_t, uint64_t, uint64_t*);

RowBitsFn row_bits_for(int pixel_bytes) {
  switch (pixel_bytes) {
    case 1: return &row_bits<std::uint8_t>;
    case 2: return &row_bits<std::uint16_t>;
    case 4: return &row_bits<std::uint32_t>;
    default: return &row_bits<std::uint64_t>;
  }
}

// In-place transpose of a 64x64 bit matrix: bit j of a[i] <-> bit i of a[j].
inline void transpose64(uint64_t* a) {
  uint64_t m = 0x00000000FFFFFFFFull;
  for (int j = 32; j; j >>= 1, m ^= m << j) {
    for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
      a[k] ^= t << j;
      a[k | j] ^= t;
    }
  }
}

// The foreground bits of rows [r, r + n), n <= 64, of an image whose columns are contiguous
// (Fortran order): 64 pixels down a column are one vector compare, and a 64x64 bit transpose
// turns 64 column words into 64 row words. Row r + k's words go to out[k * nwords ...].
template <class T>
void column_block_bits(const char* base, int64_t col_stride, int64_t cols, int64_t r, int n,
                       uint64_t background, uint64_t* out, int64_t nwords) {
  const T bg = T(background);
  uint64_t tile[64];
  for (int64_t w = 0; w < nwords; ++w) {
    const int64_t c0 = w * 64;
    const int nc = int(min_of<int64_t>(64, cols - c0));
    for (int j = 0; j < nc; ++j) {
      const T* p = reinterpret_cast<const T*>(base + (c0 + j) * col_stride) + r;
      if (n == 64) {
        tile[j] = foreground_bits64<T>(p, bg);
      } else {
        uint64_t m = 0;
        for (int k = 0; k < n; ++k) m |= uint64_t(p[k] != bg) << k;
        tile[j] = m;
      }
    }
    for (int j = nc; j < 64; ++j) tile[j] = 0;
    transpose64(tile);
    for (int k = 0; k < n; ++k) out[k * nwords + w] = tile[k];
  }
}

using ColumnBitsFn = void (*)(const char*, int64_t, int64_t, int64_t, int, uint64_t, uint64_t*, int64_t);

ColumnBitsFn column_bits_for(int pixel_bytes) {
  switch (pixel_bytes) {
    case 1: return &column_block_bits<std::uint8_t>;
    case 2: return &column_block_bits<std::uint16_t>;
    case 4: return &column_block_bits<std::uint32_t>;
    default: return &column_block_bits<std::uint64_t>;
  }
}

// Runs of set bits as edges: run i is [edge[2i], edge[2i+1]). Every bit transition is found
// with count-trailing-zeros, no branch per run. Returns the number of runs.
inline int64_t extract_runs(const uint64_t* bits, int64_t nwords, int64_t cols, int32_t* edge) {
  int64_t n = 0;
  uint64_t carry = 0;
  for (int64_t w = 0; w < nwords; ++w) {
    const uint64_t b = bits[w];
    uint64_t t = b ^ ((b << 1) | carry);
    carry = b >> 63;
    const int32_t base = int32_t(w * 64);
    while (t) {
      edge[n++] = base + int32_t(__builtin_ctzll(t));
      t &= t - 1;
    }
  }
  if (carry) edge[n++] = int32_t(cols);  // a run reaching the end of a row of 64k columns (k >= 1)
  return n / 2;
}

// f(s) for every stripe s in [0, ns), one thread per stripe. An exception (bad_alloc) thrown
// by a stripe is carried out of the parallel region and rethrown here, never terminating.
template <class F>
void for_stripes(std::int64_t ns, const F& f) {
  if (ns <= 1) {
    if (ns == 1) f(std::size_t(0));
    return;
  }
  std::exception_ptr error;
#pragma omp parallel for schedule(static, 1) num_threads(int(ns))
  for (std::int64_t s = 0; s < ns; ++s) {
    try {
      f(std::size_t(s));
    } catch (...) {
#pragma omp critical(normlab_ccl_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

// ---- union-find over runs ------------------------------------------------------------------

// An uninitialised array: reserved in full, but only the pages actually written (the runs
// found) are ever backed by memory. Large ones are mapped directly and, on Linux, asked for
// transparent huge pages: a noisy 2048x2048 image writes ~12 MB of runs per call, and faulting
// that in 4 KiB pages costs more than a third of the labelling.
// A growable array for this file's bookkeeping. std::vector (and std::sort, std::fill, ...)
// would be instantiated in every SIMD target's copy of this file under the same names, and the
// linker would keep one copy, compiled for whichever CPU it picked, for all of them: a class
// of this anonymous namespace keeps each target's code to itself.
template <class T>
class LocalVector {
 public:
  LocalVector() = default;
  explicit LocalVector(std::size_t n) { resize(n); }
  LocalVector(const LocalVector&) = delete;
  LocalVector& operator=(const LocalVector&) = delete;
  LocalVector(LocalVector&& o) noexcept { swap(o); }
  LocalVector& operator=(LocalVector&& o) noexcept {
    swap(o);
    return *this;
  }
  ~LocalVector() { delete[] data_; }

  std::size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }
  T& operator[](std::size_t i) { return data_[i]; }
  const T& operator[](std::size_t i) const { return data_[i]; }

  // New elements are value-initialized; existing ones are kept.
  void resize(std::size_t n) {
    if (n > capacity_) grow(n);
    for (std::size_t i = size_; i < n; ++i) data_[i] = T();
    size_ = n;
  }
  void assign(std::size_t n, const T& value) {
    resize(n);
    for (std::size_t i = 0; i < n; ++i) data_[i] = value;
  }
  void push_back(const T& value) {
    if (size_ == capacity_) grow(capacity_ ? 2 * capacity_ : 8);
    data_[size_++] = value;
  }
  void truncate(std::size_t n) {
    if (n < size_) size_ = n;
  }

 private:
  void grow(std::size_t capacity) {
    T* fresh = new T[capacity]();
    for (std::size_t i = 0; i < size_; ++i) fresh[i] = static_cast<T&&>(data_[i]);
    delete[] data_;
    data_ = fresh;
    capacity_ = capacity;
  }
  void swap(LocalVector& o) noexcept {
    T* d = data_;
    data_ = o.data_;
    o.data_ = d;
    const std::size_t n = size_, c = capacity_;
    size_ = o.size_;
    capacity_ = o.capacity_;
    o.size_ = n;
    o.capacity_ = c;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0, capacity_ = 0;
};

template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  void allocate(std::size_t n) {
    release();
    bytes_ = n * sizeof(T);
    if (kHaveMappings && bytes_ >= kMapBytes) {
      // Kept from an earlier call (bytes_ becomes the mapping's size), else reserved for the
      // worst case (a run every other pixel), only the pages the runs fill committed.
      data_ = static_cast<T*>(run_mappings().get(bytes_, true));
      mapped_ = true;
      return;
    }
    data_ = static_cast<T*>(::operator new(bytes_ ? bytes_ : 1));
  }
  T* get() const { return data_; }
  T& operator[](std::int64_t i) const { return data_[i]; }

 private:
  static constexpr std::size_t kMapBytes = std::size_t(4) << 20;
  void release() {
    if (!data_) return;
    if (mapped_) {
      run_mappings().put(data_, bytes_);
      data_ = nullptr;
      mapped_ = false;
      return;
    }
    ::operator delete(data_);
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::size_t bytes_ = 0;
  bool mapped_ = false;
};

template <class Index>
struct Runs {
  int64_t rows = 0, cols = 0, per_row = 0;
  Buffer<int32_t> edge;               // run i covers columns [edge[2i], edge[2i+1])
  Buffer<Index> parent;               // union-find parent, then the final label
  LocalVector<int64_t> row_begin, row_end;
  LocalVector<int64_t> stripe_row;    // nstripes + 1 row bounds
  LocalVector<int64_t> stripe_end;    // one past the last run of each stripe
  LocalVector<int64_t> first_label;   // nstripes + 1: labels rooted in stripe s start here
  int64_t count = 0;

  int64_t base(int64_t r) const { return r * per_row; }
  int64_t start(int64_t i) const { return edge[2 * i]; }
  int64_t end(int64_t i) const { return edge[2 * i + 1]; }
  int64_t stripe_begin(std::size_t s) const { return base(stripe_row[s]); }
};

template <class Index>
inline Index find_root(Index* P, Index x) {
  while (P[x] != x) {
    P[x] = P[P[x]];
    x = P[x];
  }
  return x;
}

// Gives the runs [cb, ce) of a row their parents from the runs [pb, pe) of the row above.
template <class Index, bool Conn8>
void connect_rows(const int32_t* E, Index* P, int64_t pb, int64_t pe,
                  int64_t cb, int64_t ce) {
  int64_t j = pb;
  for (int64_t c = cb; c < ce; ++c) {
    const int32_t s = E[2 * c], e = E[2 * c + 1];
    while (j < pe && (Conn8 ? E[2 * j + 1] < s : E[2 * j + 1] <= s)) ++j;
    Index lab = Index(c);
    bool has = false;
    int64_t k = j;
    while (k < pe && (Conn8 ? E[2 * k] <= e : E[2 * k] < e)) {
      const Index r = find_root(P, Index(k));
      if (!has) {
        lab = r;
        has = true;
      } else if (r != lab) {
        if (r < lab) {
          P[lab] = r;
          lab = r;
        } else {
          P[r] = lab;
        }
      }
      if (E[2 * k + 1] > e) break;  // may touch the next run of this row too
      ++k;
    }
    j = k;
    P[c] = lab;
  }
}

// Rows with at least this many runs per 64 columns (noise) take connect_rows4; rows of longer
// runs cost less through connect_rows, whose branches then predict well.
constexpr int64_t kDenseRuns = 6;

// 4-connectivity from the rows' foreground bits: a run of the row and a run of the row above
// touch exactly where both have a pixel, and each maximal stretch of columns set in both rows
// lies in one run of each. So the pairs to unite are the starts of those stretches, found a word
// at a time with count-trailing-zeros, each run's index being the run starts up to that column:
// no loop whose length depends on the runs, whose branches noise mispredicts. Gives the runs
// [cb, ...) of the row (bits) their parents, the runs of the row above (above) starting at pb.
template <class Index>
void connect_rows4(const uint64_t* above, const uint64_t* bits, int64_t nwords, Index* P, int64_t pb,
                   int64_t cb, int64_t ce) {
  for (int64_t c = cb; c < ce; ++c) P[c] = Index(c);
  int64_t before_a = pb - 1, before_b = cb - 1;  // last run index started in earlier words
  uint64_t carry_a = 0, carry_b = 0, carry_both = 0;
  for (int64_t w = 0; w < nwords; ++w) {
    const uint64_t a = above[w], b = bits[w], both = a & b;
    const uint64_t starts_a = a & ~((a << 1) | carry_a), starts_b = b & ~((b << 1) | carry_b);
    uint64_t touch = both & ~((both << 1) | carry_both);
    carry_a = a >> 63;
    carry_b = b >> 63;
    carry_both = both >> 63;
    while (touch) {
      const int t = __builtin_ctzll(touch);
      const uint64_t upto = t == 63 ? ~uint64_t(0) : (uint64_t(2) << t) - 1;
      const Index ra = find_root(P, Index(before_a + __builtin_popcountll(starts_a & upto)));
      const Index rb = find_root(P, Index(before_b + __builtin_popcountll(starts_b & upto)));
      if (ra < rb) P[rb] = ra;
      else if (rb < ra) P[ra] = rb;
      touch &= touch - 1;
    }
    before_a += __builtin_popcountll(starts_a);
    before_b += __builtin_popcountll(starts_b);
  }
}

// Unites touching runs of two adjacent rows whose parents are already set (stripe borders).
template <class Index, bool Conn8>
void unite_rows(const int32_t* E, Index* P, int64_t pb, int64_t pe, int64_t cb,
                int64_t ce) {
  int64_t j = pb;
  for (int64_t c = cb; c < ce; ++c) {
    const int32_t s = E[2 * c], e = E[2 * c + 1];
    while (j < pe && (Conn8 ? E[2 * j + 1] < s : E[2 * j + 1] <= s)) ++j;
    int64_t k = j;
    while (k < pe && (Conn8 ? E[2 * k] <= e : E[2 * k] < e)) {
      const Index a = find_root(P, Index(k)), b = find_root(P, Index(c));
      if (a < b) P[b] = a;
      else if (b < a) P[a] = b;
      if (E[2 * k + 1] > e) break;
      ++k;
    }
    j = k;
  }
}

template <class Index, bool Conn8>
void label_stripe(const CclRequest& q, Runs<Index>& R, std::size_t stripe) {
  const ImageView& im = q.image;
  const int64_t r0 = R.stripe_row[stripe], r1 = R.stripe_row[stripe + 1];
  const int64_t nwords = (im.cols + 63) / 64;
  // Column-contiguous images (Fortran order) are read 64 rows at a time down the columns.
  const bool by_columns = im.row_stride == im.pixel_bytes && im.col_stride != im.pixel_bytes;
  LocalVector<uint64_t> bits(static_cast<std::size_t>(by_columns ? 64 * nwords : nwords));
  LocalVector<uint64_t> above(static_cast<std::size_t>(Conn8 ? 0 : nwords));  // 4-conn: the row above
  const RowBitsFn to_bits = row_bits_for(im.pixel_bytes);
  const ColumnBitsFn to_column_bits = column_bits_for(im.pixel_bytes);
  int32_t* E = R.edge.get();
  Index* P = R.parent.get();
  int64_t cur = R.base(r0);
  const char* base = static_cast<const char*>(im.data);
  for (int64_t r = r0; r < r1; ++r) {
    const uint64_t* row = bits.data();
    if (by_columns) {
      const int64_t k = (r - r0) % 64;
      if (k == 0)
        to_column_bits(base, im.col_stride, im.cols, r, int(min_of<int64_t>(64, r1 - r)),
                       im.background, bits.data(), nwords);
      row += k * nwords;
    } else {
      to_bits(base + r * im.row_stride, im.col_stride, im.cols, im.background, bits.data());
    }
    const int64_t n = extract_runs(row, nwords, im.cols, E + 2 * cur);
    R.row_begin[r] = cur;
    R.row_end[r] = cur + n;
    if (r == r0) {
      for (int64_t i = cur; i < cur + n; ++i) P[i] = Index(i);
    } else {
      if constexpr (Conn8) connect_rows<Index, true>(E, P, R.row_begin[r - 1], R.row_end[r - 1], cur, cur + n);
      else if (n >= kDenseRuns * nwords) connect_rows4(above.data(), row, nwords, P, R.row_begin[r - 1], cur, cur + n);
      else connect_rows<Index, false>(E, P, R.row_begin[r - 1], R.row_end[r - 1], cur, cur + n);
    }
    if constexpr (!Conn8)
      for (int64_t w = 0; w < nwords; ++w) above[std::size_t(w)] = row[w];
    cur += n;
  }
  R.stripe_end[stripe] = cur;
}

// Replaces every run's parent by its final label, the stripes in parallel, each with the
// labels from R.first_label[s]. Parents precede their children, so one pass in index order
// over a stripe resolves every run whose parent lies in the stripe: roots take the next label,
// the others their parent's. A run whose parent lies in an earlier stripe (a "head": it was
// looked up when the stripe borders were united) gets its label beforehand, while P is still
// read-only: the rank of its root among the roots of the root's stripe, counted per block.
template <class Index>
void flatten(Runs<Index>& R) {
  constexpr int64_t kBlock = 1024;
  const std::size_t ns = R.stripe_row.size() - 1;
  Index* P = R.parent.get();
  LocalVector<LocalVector<int64_t>> before(ns);  // roots of stripe s before its block k
  LocalVector<LocalVector<int64_t>> heads(ns);   // in index order
  for_stripes(std::int64_t(ns), [&](std::size_t s) {
    const int64_t sb = R.stripe_begin(s), e = R.stripe_end[s];
    LocalVector<int64_t>& counts = before[s];
    counts.resize(std::size_t((e - sb + kBlock - 1) / kBlock + 1));
    int64_t n = 0;
    std::size_t k = 0;
    for (int64_t b = sb; b < e; b += kBlock, ++k) {
      counts[k] = n;
      const int64_t be = min_of(b + kBlock, e);
      Index lowest = Index(sb);
      for (int64_t i = b; i < be; ++i) {
        n += P[i] == Index(i);
        lowest = min_of(lowest, P[i]);
      }
      if (lowest < Index(sb))
        for (int64_t i = b; i < be; ++i)
          if (P[i] < Index(sb)) heads[s].push_back(i);
    }
    counts[k] = n;
  });
  R.first_label.assign(ns + 1, 0);
  int64_t count = 0;
  for (std::size_t s = 0; s <= ns; ++s) {
    R.first_label[s] = count + 1;
    if (s < ns) count += before[s][before[s].size() - 1];
  }
  R.count = count;
  LocalVector<LocalVector<Index>> head_labels(ns);
  for_stripes(std::int64_t(ns), [&](std::size_t s) {
    head_labels[s].resize(heads[s].size());
    for (std::size_t h = 0; h < heads[s].size(); ++h) {
      int64_t g = int64_t(P[heads[s][h]]);
      while (int64_t(P[g]) != g) g = int64_t(P[g]);
      std::size_t t = s;
      while (R.stripe_begin(t) > g) --t;
      const int64_t sb = R.stripe_begin(t), k = (g - sb) / kBlock;
      int64_t rank = before[t][std::size_t(k)];
      for (int64_t i = sb + k * kBlock; i < g; ++i) rank += P[i] == Index(i);
      head_labels[s][h] = Index(R.first_label[t] + rank);
    }
  });
  for_stripes(std::int64_t(ns), [&](std::size_t s) {
    const int64_t sb = R.stripe_begin(s), e = R.stripe_end[s];
    Index label = Index(R.first_label[s] - 1);
    const Index* head_label = head_labels[s].data();
    for (int64_t i = sb; i < e; ++i) {
      const Index p = P[i];
      if (p == Index(i)) P[i] = ++label;
      else if (int64_t(p) >= sb) P[i] = P[p];
      else P[i] = *head_label++;
    }
  });
}

// Runs every stripe in parallel, unites the borders, flattens to final labels (R.count).
template <class Index, bool Conn8>
void label_runs(const CclRequest& q, Runs<Index>& R, int nthreads) {
  const std::size_t ns = R.stripe_row.size() - 1;
  (void)nthreads;  // one stripe per thread
  for_stripes(std::int64_t(ns), [&](std::size_t s) { label_stripe<Index, Conn8>(q, R, s); });
  Index* P = R.parent.get();
  for (std::size_t s = 1; s < ns; ++s) {
    const int64_t r = R.stripe_row[s];
    unite_rows<Index, Conn8>(R.edge.get(), P, R.row_begin[r - 1], R.row_end[r - 1],
                             R.row_begin[r], R.row_end[r]);
  }
  flatten(R);
}

template <class Index>
void make_runs(const CclRequest& q, Runs<Index>& R, int nthreads) {
  const ImageView& im = q.image;
  R.rows = im.rows;
  R.cols = im.cols;
  R.per_row = (im.cols + 1) / 2;
  const int64_t cap = im.rows * R.per_row;
  // Uninitialised: pages past the runs actually found are never touched.
  R.edge.allocate(std::size_t(2 * cap));
  R.parent.allocate(std::size_t(cap));
  R.row_begin.assign(std::size_t(im.rows), 0);
  R.row_end.assign(std::size_t(im.rows), 0);
  const int64_t ns = max_of<int64_t>(1, min_of<int64_t>(nthreads, im.rows));
  R.stripe_row.resize(std::size_t(ns + 1));
  for (int64_t s = 0; s <= ns; ++s) R.stripe_row[std::size_t(s)] = im.rows * s / ns;
  R.stripe_end.assign(std::size_t(ns), 0);
  if (q.connectivity == 8)
    label_runs<Index, true>(q, R, int(ns));
  else
    label_runs<Index, false>(q, R, int(ns));
}

// f(r) for every row, rows split into the same stripes as the labelling.
template <class Index, class F>
void for_rows(const Runs<Index>& R, const F& f) {
  for_stripes(std::int64_t(R.stripe_row.size()) - 1, [&](std::size_t s) {
    for (int64_t r = R.stripe_row[s]; r < R.stripe_row[s + 1]; ++r) f(r);
  });
}

// ---- outputs -------------------------------------------------------------------------------

// dst[0, bytes) = src[0, bytes) with non-temporal stores for the aligned middle (a plain copy
// on the baseline target).
inline void stream_copy(void* dst, const void* src, std::size_t bytes) {
#if defined(NL_TARGET_AVX512) || defined(NL_TARGET_AVX2)
#if defined(NL_TARGET_AVX512)
  constexpr std::size_t W = 64;
#else
  constexpr std::size_t W = 32;
#endif
  char* d = static_cast<char*>(dst);
  const char* p = static_cast<const char*>(src);
  std::size_t head = (W - reinterpret_cast<std::uintptr_t>(d) % W) % W;
  if (head > bytes) head = bytes;
  std::memcpy(d, p, head);
  d += head, p += head, bytes -= head;
  for (; bytes >= W; bytes -= W, d += W, p += W) {
#if defined(NL_TARGET_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(p));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
  }
  std::memcpy(d, p, bytes);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Writes labels[r] for the runs [b, e) of one row: zeros, then each run's label. Short runs
// (the common case in noisy images) take one unconditional 8-lane store each, no loop.
template <class L, class Index>
inline void write_label_row(L* row, int64_t cols, const int32_t* E, const Index* label, int64_t b,
                            int64_t e) {
  std::memset(row, 0, std::size_t(cols) * sizeof(L));
  for (int64_t i = b; i < e; ++i) {
    const int64_t s = E[2 * i], t = E[2 * i + 1];
    const L v = L(label[i]);
    if (s + 8 <= cols) {
      for (int k = 0; k < 8; ++k) row[s + k] = v;  // one or two vector stores
      for (int64_t j = s + 8; j < t; ++j) row[j] = v;
      if (t + 8 <= cols) {
        for (int k = 0; k < 8; ++k) row[t + k] = L(0);
      } else {
        for (int64_t j = t; j < s + 8; ++j) row[j] = L(0);
      }
    } else {
      for (int64_t j = s; j < t; ++j) row[j] = v;
    }
  }
}

// ---- statistics from the runs --------------------------------------------------------------
//
// Stripes accumulate in parallel. Labels rooted in stripe s (a contiguous range, since labels
// follow raster order) are owned by stripe s and updated in the shared table; a run of a label
// rooted in an earlier stripe ("foreign": its component crosses the stripe's top border, so it
// has a run in the stripe's first row) goes to a small stripe-local table merged afterwards.
// Integer sums, minima and maxima: identical results for every stripe count.

struct StatsRef {
  int64_t* area;
  int64_t* box;  // top, left, bottom, right; null for areas only
  int64_t* sum;  // row sum, column sum
};

template <bool Full>
inline void add_run(const StatsRef& t, std::size_t l, int64_t r, int64_t s, int64_t e) {
  const int64_t len = e - s;
  t.area[l] += len;
  if constexpr (Full) {
    int64_t* bx = t.box + 4 * l;
    bx[0] = min_of(bx[0], r);
    bx[1] = min_of(bx[1], s);
    bx[2] = max_of(bx[2], r + 1);
    bx[3] = max_of(bx[3], e);
    t.sum[2 * l] += r * len;
    t.sum[2 * l + 1] += (s + e - 1) * len / 2;
  }
}

template <bool Full>
inline void merge_into(const StatsRef& to, std::size_t l, const StatsRef& from, std::size_t k) {
  to.area[l] += from.area[k];
  if constexpr (Full) {
    int64_t* a = to.box + 4 * l;
    const int64_t* b = from.box + 4 * k;
    a[0] = min_of(a[0], b[0]);
    a[1] = min_of(a[1], b[1]);
    a[2] = max_of(a[2], b[2]);
    a[3] = max_of(a[3], b[3]);
    to.sum[2 * l] += from.sum[2 * k];
    to.sum[2 * l + 1] += from.sum[2 * k + 1];
  }
}

struct StatsTable {
  LocalVector<int64_t> area, box, sum;
  StatsRef ref() { return {area.data(), box.data(), sum.data()}; }
  void init(std::size_t n, bool full) {
    area.assign(n, 0);
    if (full) {
      box.resize(4 * n);
      sum.assign(2 * n, 0);
    }
  }
  void init_box(std::size_t l0, std::size_t l1) {
    for (std::size_t l = l0; l < l1; ++l) {
      box[4 * l] = box[4 * l + 1] = std::numeric_limits<int64_t>::max();
      box[4 * l + 2] = box[4 * l + 3] = -1;
    }
  }
};

// Every label's area (Full: also bbox and centroid), row 0 the background: prepare(), then
// stripe(s) for every stripe (in parallel, possibly fused with writing that stripe's output),
// then finish().
template <bool Full, class Index>
struct Accumulator {
  const Runs<Index>& R;
  StatsTable table;
  LocalVector<double> centroid;
  LocalVector<LocalVector<int64_t>> foreign;  // sorted foreign labels per stripe
  LocalVector<StatsTable> local;              // per stripe: [foreign..., background]

  explicit Accumulator(const Runs<Index>& runs) : R(runs) {
    const std::size_t ns = R.stripe_row.size() - 1, n = std::size_t(R.count) + 1;
    table.init(n, Full);
    if constexpr (Full) centroid.resize(2 * n);
    foreign.resize(ns);
    local.resize(ns);
  }

  void set_centroid(std::size_t l) {
    const double a = double(table.area[l]);
    centroid[2 * l] = double(table.sum[2 * l]) / a;
    centroid[2 * l + 1] = double(table.sum[2 * l + 1]) / a;
  }

  void stripe(std::size_t st) {
    const int64_t r0 = R.stripe_row[st], r1 = R.stripe_row[st + 1];
    const int64_t own = R.first_label[st], own_end = R.first_label[st + 1];
    if constexpr (Full) table.init_box(std::size_t(own), std::size_t(own_end));
    LocalVector<int64_t>& fl = foreign[st];
    for (int64_t i = R.row_begin[std::size_t(r0)]; i < R.row_end[std::size_t(r0)]; ++i)
      if (int64_t(R.parent[i]) < own) fl.push_back(int64_t(R.parent[i]));
    if (fl.size() > 1) std::qsort(fl.data(), fl.size(), sizeof(int64_t), compare_int64);
    std::size_t unique = 0;
    for (std::size_t k = 0; k < fl.size(); ++k)
      if (unique == 0 || fl[k] != fl[unique - 1]) fl[unique++] = fl[k];
    fl.truncate(unique);
    const std::size_t bg = fl.size();
    local[st].init(bg + 1, Full);
    if constexpr (Full) local[st].init_box(0, bg + 1);
    const StatsRef global = table.ref(), loc = local[st].ref();
    const int64_t cols = R.cols;
    const int64_t all_cols_sum = cols * (cols - 1) / 2;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = R.row_begin[std::size_t(r)], e = R.row_end[std::size_t(r)];
      int64_t fg = 0, fg_cols = 0;
      for (int64_t i = b; i < e; ++i) {
        const int64_t l = int64_t(R.parent[i]);
        const int64_t s = R.start(i), t = R.end(i);
        fg += t - s;
        if constexpr (Full) fg_cols += (s + t - 1) * (t - s) / 2;
        if (l >= own) {
          add_run<Full>(global, std::size_t(l), r, s, t);
        } else {
          const std::size_t k = std::size_t(std::lower_bound(fl.begin(), fl.end(), l) - fl.begin());
          add_run<Full>(loc, k, r, s, t);
        }
      }
      const int64_t nb = cols - fg;
      if (nb > 0) {
        loc.area[bg] += nb;
        if constexpr (Full) {
          int64_t* bx = loc.box + 4 * bg;
          const int64_t first = (e > b && R.start(b) == 0) ? R.end(b) : 0;
          const int64_t last = (e > b && R.end(e - 1) == cols) ? R.start(e - 1) - 1 : cols - 1;
          bx[0] = min_of(bx[0], r);
          bx[1] = min_of(bx[1], first);
          bx[2] = r + 1;
          bx[3] = max_of(bx[3], last + 1);
          loc.sum[2 * bg] += r * nb;
          loc.sum[2 * bg + 1] += all_cols_sum - fg_cols;
        }
      }
    }
    // Centroids of the stripe's own labels; those that continue into later stripes are redone
    // in finish().
    if constexpr (Full)
      for (int64_t l = own; l < own_end; ++l) set_centroid(std::size_t(l));
  }

  // Merges the stripe-local tables (components crossing stripe borders, the background).
  void finish() {
    const StatsRef global = table.ref();
    if constexpr (Full) table.init_box(0, 1);
    for (std::size_t st = 0; st < local.size(); ++st) {
      const StatsRef loc = local[st].ref();
      const LocalVector<int64_t>& fl = foreign[st];
      for (std::size_t k = 0; k < fl.size(); ++k) {
        merge_into<Full>(global, std::size_t(fl[k]), loc, k);
        if constexpr (Full) set_centroid(std::size_t(fl[k]));
      }
      merge_into<Full>(global, 0, loc, fl.size());
    }
    if constexpr (Full) {
      if (table.area[0] > 0) {
        set_centroid(0);
      } else {  // no background pixel (and labels 1..count always have pixels)
        for (int k = 0; k < 4; ++k) table.box[k] = 0;
        centroid[0] = centroid[1] = std::numeric_limits<double>::quiet_NaN();
      }
    }
  }

  void move_to(ComponentStats& st) {
    detail::set_component_stats(st, std::int64_t(table.area.size()), table.area.data(), table.box.data(),
                                centroid.data());
  }
};

template <class Index>
LocalVector<int64_t> areas(const Runs<Index>& R) {
  Accumulator<false, Index> acc(R);
  for_stripes(std::int64_t(R.stripe_row.size()) - 1, [&](std::size_t s) { acc.stripe(s); });
  acc.finish();
  return std::move(acc.table.area);
}

// Writes the labels, and with stats accumulates them in the same pass over each stripe.
template <class L, class Index>
void write_labels(const Runs<Index>& R, void* out, ComponentStats* stats) {
  L* labels = static_cast<L*>(out);
  std::unique_ptr<Accumulator<true, Index>> acc;
  if (stats) acc = std::make_unique<Accumulator<true, Index>>(R);
  // Labels too large to stay in the cache are built a row at a time in a small buffer and
  // streamed out, which saves reading every output line before writing it.
  const bool stream = R.rows * R.cols * int64_t(sizeof(L)) >= stream_min_bytes();
  for_stripes(std::int64_t(R.stripe_row.size()) - 1, [&](std::size_t s) {
    LocalVector<L> buffer(stream ? std::size_t(R.cols) : 0);
    for (int64_t r = R.stripe_row[s]; r < R.stripe_row[s + 1]; ++r) {
      L* row = labels + r * R.cols;
      write_label_row(stream ? buffer.data() : row, R.cols, R.edge.get(), R.parent.get(),
                      R.row_begin[std::size_t(r)], R.row_end[std::size_t(r)]);
      if (stream) stream_copy(row, buffer.data(), std::size_t(R.cols) * sizeof(L));
    }
    if (stream) stream_fence();
    if (acc) acc->stripe(s);
  });
  if (acc) {
    acc->finish();
    acc->move_to(*stats);
  }
}

int64_t label_max(LabelType t) {
  switch (t) {
    case LabelType::u16: return 65535;
    case LabelType::u32: return 4294967295LL;
    case LabelType::i32: return 2147483647LL;
    default: return std::numeric_limits<int64_t>::max();
  }
}


template <class T, class Index>
void write_filtered(const CclRequest& q, const Runs<Index>& R, const LocalVector<char>& keep) {
  const ImageView& im = q.image;
  T* out = static_cast<T*>(q.out);
  const T bg = T(im.background);
  const char* base = static_cast<const char*>(im.data);
  for_rows(R, [&](int64_t r) {
    T* row = out + r * R.cols;
    const char* in = base + r * im.row_stride;
    if (im.col_stride == int64_t(sizeof(T))) {
      if (in != reinterpret_cast<const char*>(row)) std::memcpy(row, in, std::size_t(R.cols) * sizeof(T));
    } else {
      for (int64_t j = 0; j < R.cols; ++j) row[j] = load_pixel<T>(in + j * im.col_stride);
    }
    for (int64_t i = R.row_begin[std::size_t(r)]; i < R.row_end[std::size_t(r)]; ++i)
      if (!keep[std::size_t(R.parent[i])]) fill_range(row + R.start(i), row + R.end(i), bg);
  });
}

template <class Index>
int64_t run_request(const CclRequest& q, int nthreads) {
  Runs<Index> R;
  make_runs(q, R, nthreads);
  switch (q.op) {
    case CclOp::label: {
      if (R.count > label_max(q.label_type))
        detail::throw_label_overflow(R.count, q.label_type);
      switch (q.label_type) {
        case LabelType::u16: write_labels<std::uint16_t>(R, q.out, q.stats); break;
        case LabelType::u32: write_labels<std::uint32_t>(R, q.out, q.stats); break;
        case LabelType::i32: write_labels<std::int32_t>(R, q.out, q.stats); break;
        case LabelType::i64: write_labels<std::int64_t>(R, q.out, q.stats); break;
        case LabelType::u64: write_labels<std::uint64_t>(R, q.out, q.stats); break;
        default: throw std::invalid_argument("label dtype must be uint16, uint32, int32, int64 or uint64");
      }
      return R.count;
    }
    case CclOp::largest: {
      const LocalVector<int64_t> area = areas(R);
      std::size_t best = 0;
      for (std::size_t l = 1; l < area.size(); ++l)
        if (best == 0 || area[l] > area[best]) best = l;
      bool* mask = static_cast<bool*>(q.out);
      for_rows(R, [&](int64_t r) {
        bool* row = mask + r * R.cols;
        fill_range(row, row + R.cols, false);
        if (best == 0) return;
        for (int64_t i = R.row_begin[std::size_t(r)]; i < R.row_end[std::size_t(r)]; ++i)
          if (std::size_t(R.parent[i]) == best) fill_range(row + R.start(i), row + R.end(i), true);
      });
      return R.count;
    }
    case CclOp::remove_small: {
      const LocalVector<int64_t> area = areas(R);
      LocalVector<char> keep(area.size());
      int64_t kept = 0;
      for (std::size_t l = 1; l < area.size(); ++l) {
        keep[l] = area[l] >= q.min_size;
        kept += keep[l];
      }
      switch (q.image.pixel_bytes) {
        case 1: write_filtered<std::uint8_t>(q, R, keep); break;
        case 2: write_filtered<std::uint16_t>(q, R, keep); break;
        case 4: write_filtered<std::uint32_t>(q, R, keep); break;
        default: write_filtered<std::uint64_t>(q, R, keep); break;
      }
      return kept;
    }
  }
  return 0;
}

int64_t ccl_run(const CclRequest& q, int nthreads) {
  const int64_t cap = q.image.rows * ((q.image.cols + 1) / 2);
  if (cap < int64_t(std::numeric_limits<int32_t>::max()) && !q.wide_index)
    return run_request<int32_t>(q, nthreads);
  return run_request<int64_t>(q, nthreads);
}

}  // namespace

void register_ccl(KernelTable& t) { t.ccl.run = &ccl_run; }

}  // namespace NL_TARGET
}  // namespace normlab
