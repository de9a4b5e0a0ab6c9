#include "memory/mappings.hpp"

#include <cstdlib>
#include <new>
#include <utility>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace normlab {

#if defined(__linux__)

void* MappingCache::take(std::size_t& bytes) {
  std::lock_guard<std::mutex> hold(lock_);
  int best = -1;
  for (int k = 0; k < kSlots; ++k)
    if (ptr_[k] && size_[k] >= bytes && size_[k] / 4 <= bytes && (best < 0 || size_[k] < size_[best])) best = k;
  if (best < 0) return nullptr;
  void* p = ptr_[best];
  bytes = size_[best];
  ptr_[best] = nullptr;
  return p;
}

void MappingCache::put(void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> hold(lock_);
  ++puts_;
#if defined(MADV_FREE)
  for (int k = 0; k < kSlots; ++k) {
    if (lazy_free_ && ptr_[k] && !advised_[k] && puts_ - kept_at_[k] >= kStalePuts) {
      madvise(ptr_[k], size_[k], MADV_FREE);
      advised_[k] = true;
    }
  }
#endif
  int slot = -1;
  for (int k = 0; k < kSlots; ++k)
    if (slot < 0 || !ptr_[k] || (ptr_[slot] && size_[k] < size_[slot])) slot = k;
  if (bytes > kMaxBytes || (ptr_[slot] && size_[slot] >= bytes)) {
    munmap(p, bytes);
    return;
  }
  if (ptr_[slot]) munmap(ptr_[slot], size_[slot]);
  ptr_[slot] = p;
  size_[slot] = bytes;
  kept_at_[slot] = puts_;
  advised_[slot] = false;
}

int MappingCache::kept(Kept (&out)[4]) {
  static_assert(kSlots == 4, "kept() lists every slot");
  std::lock_guard<std::mutex> hold(lock_);
  int n = 0;
  for (int k = 0; k < kSlots; ++k)
    if (ptr_[k]) out[n++] = Kept{size_[k], advised_[k]};
  for (int a = 1; a < n; ++a)
    for (int b = a; b > 0 && out[b].bytes < out[b - 1].bytes; --b) std::swap(out[b], out[b - 1]);
  return n;
}

namespace {
MappingCache* run_cache = nullptr;
MappingCache* output_cache = nullptr;
MappingCache* scratch_cache = nullptr;

void make_caches() {
  run_cache = new MappingCache;
  output_cache = new MappingCache;
  scratch_cache = new MappingCache(false);
}

void ensure_caches() {
  static const bool once = [] {
    make_caches();
    pthread_atfork(nullptr, nullptr, make_caches);
    return true;
  }();
  (void)once;
}
}  // namespace

MappingCache& run_mappings() {
  ensure_caches();
  return *run_cache;
}

MappingCache& output_mappings() {
  ensure_caches();
  return *output_cache;
}

MappingCache& scratch_mappings() {
  ensure_caches();
  return *scratch_cache;
}

void* map_pages(std::size_t bytes, bool noreserve) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (noreserve ? MAP_NORESERVE : 0),
                 -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return p;
}

#else

void* MappingCache::take(std::size_t&) { return nullptr; }
void MappingCache::put(void*, std::size_t) {}
int MappingCache::kept(Kept (&)[4]) { return 0; }
MappingCache& run_mappings() {
  static MappingCache* cache = new MappingCache;
  return *cache;
}
MappingCache& output_mappings() { return run_mappings(); }
MappingCache& scratch_mappings() { return run_mappings(); }
void* map_pages(std::size_t, bool) { throw std::bad_alloc(); }

#endif

void* MappingCache::get(std::size_t& bytes, bool noreserve) {
  void* p = take(bytes);
  return p ? p : map_pages(bytes, noreserve);
}

ScratchBytes::ScratchBytes(std::size_t bytes) : bytes_(bytes) {
  if (kHaveMappings && bytes_ >= kScratchMapBytes) {
    data_ = scratch_mappings().get(bytes_, false);  // page-aligned; bytes_ becomes its size
    mapped_ = true;
    return;
  }
  data_ = std::aligned_alloc(64, (bytes_ + 63) / 64 * 64 + 64);
  if (!data_) throw std::bad_alloc();
}

ScratchBytes::~ScratchBytes() {
  if (mapped_) scratch_mappings().put(data_, bytes_);
  else std::free(data_);
}

}  // namespace normlab
