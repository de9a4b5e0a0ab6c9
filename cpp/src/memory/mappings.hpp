// Anonymous page mappings for large arrays, and the last few of them kept for the next call:
// a loop that allocates the same large array every call would otherwise fault in and clear
// the same pages every time. Kept mappings that go unused while kStalePuts others are given
// back are left to the kernel to take back lazily (MADV_FREE) when memory runs short; the one
// a loop gives back and takes again each call is not: advising it cost every call a TLB
// shootdown per huge page (float32 layer_norm (2048, 4096) returning a new array took 1.2x
// the time with out=, 2 threads). Linux only (kHaveMappings); elsewhere callers use plain
// allocations.
#pragma once

#include <cstddef>
#include <mutex>

namespace normlab {

#if defined(__linux__)
constexpr bool kHaveMappings = true;
#else
constexpr bool kHaveMappings = false;
#endif

class MappingCache {
 public:
  // lazy_free: stale kept mappings are advised MADV_FREE (the kernel may take their pages back
  // when memory runs short); that call costs a page-table walk and, with other threads, TLB
  // shootdowns, too much for small scratch kept every call.
  explicit MappingCache(bool lazy_free = true) : lazy_free_(lazy_free) {}
  // A kept mapping of at least `bytes` (and at most 4x; `bytes` becomes its size), else a fresh
  // one from map_pages(bytes, noreserve).
  void* get(std::size_t& bytes, bool noreserve);
  // Keeps p (a mapping of `bytes`) in place of the smallest kept one, or unmaps it; advises
  // the kept mappings that have become stale.
  void put(void* p, std::size_t bytes);

  struct Kept {
    std::size_t bytes;
    bool advised;  // left to the kernel to take back (MADV_FREE)
  };
  // The kept mappings, smallest first (for tests).
  int kept(Kept (&out)[4]);

 private:
  void* take(std::size_t& bytes);  // the kept part of get(); null if none fits
  static constexpr int kSlots = 4;
  static constexpr std::size_t kMaxBytes = std::size_t(1) << 30;  // larger ones are not kept
  // A kept mapping still unused after this many later put()s is stale.
  static constexpr unsigned long long kStalePuts = 2;
  const bool lazy_free_;
  std::mutex lock_;
  void* ptr_[kSlots] = {};
  std::size_t size_[kSlots] = {};
  unsigned long long kept_at_[kSlots] = {};  // the put() that kept it
  bool advised_[kSlots] = {};
  unsigned long long puts_ = 0;
};

// The caches of labelling's run arrays, of the arrays normlab returns to Python and of kernels'
// scratch (ScratchBytes). Never destroyed: a thread may still return a mapping while the
// process exits. A fork()ed child starts caches of its own: another thread may have held a
// lock at the fork.
MappingCache& run_mappings();
MappingCache& output_mappings();
MappingCache& scratch_mappings();

// A kernel's scratch memory, 64-byte aligned. From kScratchMapBytes on, pages kept from an
// earlier call (scratch_mappings()): glibc maps and unmaps allocations that large, so a kernel
// called in a loop faulted in and cleared its scratch every call (the column sums of a
// (1024, 4096) layer_norm_backward with weight, 1.5 MiB: 8% of its time).
class ScratchBytes {
 public:
  explicit ScratchBytes(std::size_t bytes);
  ScratchBytes(const ScratchBytes&) = delete;
  ScratchBytes& operator=(const ScratchBytes&) = delete;
  ~ScratchBytes();
  void* data() const { return data_; }

 private:
  static constexpr std::size_t kScratchMapBytes = std::size_t(128) << 10;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  bool mapped_ = false;
};

// A fresh anonymous mapping of `bytes` with huge pages advised (advice only); with noreserve,
// only the pages written are committed. Throws std::bad_alloc when the kernel refuses.
void* map_pages(std::size_t bytes, bool noreserve);

}  // namespace normlab
