// See buffer.h. Why: the fused weights are tens of MB of fresh memory per fusion; with 4 KB pages their first-touch
// faults cost more than the scatter that writes them (a 640 x 640 x 3 x 3 float64 weight, 29.5 MB, 1 thread, AMD
// EPYC VM: 4.8 ms of faults for a fill of 0.6 ms; 1.5 ms with 2 MB pages). torch.empty's memory comes from glibc
// malloc (an mmap at a 16-byte offset, or the heap once glibc's dynamic mmap threshold has grown past the size), so
// advising its interior leaves up to 4 MB of 4 KB pages and depends on the allocator's history; here the whole
// buffer is one aligned mapping.
#include "scatter/buffer.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyfusion::scatter {

namespace {
constexpr std::size_t kHuge = std::size_t{1} << 21;
std::atomic<std::size_t> g_live{0};
}  // namespace

HugeBuffer::HugeBuffer(std::size_t nbytes) : size_(nbytes) {
  const std::size_t want = nbytes == 0 ? 1 : nbytes;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // over-map by 2 MB so that an aligned start exists, then give back the unaligned head and the tail
  const std::size_t body = (want + kHuge - 1) & ~(kHuge - 1);
  const std::size_t len = body + kHuge;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p != MAP_FAILED) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t lo = (a + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
    if (lo > a) munmap(p, lo - a);
    const uintptr_t end = a + len, hi = lo + body;
    if (end > hi) munmap(reinterpret_cast<void*>(hi), end - hi);
    base_ = reinterpret_cast<void*>(lo);
    mapped_ = body;
    mmapped_ = true;
    huge_ = madvise(base_, body, MADV_HUGEPAGE) == 0;  // advice only: without THP the pages are 4 KB
    data_ = base_;
    g_live += mapped_;
    return;
  }
#endif
  base_ = std::aligned_alloc(64, (want + 63) & ~std::size_t{63});
  if (base_ == nullptr) throw std::bad_alloc();
  mapped_ = (want + 63) & ~std::size_t{63};
  data_ = base_;
  g_live += mapped_;
}

HugeBuffer::~HugeBuffer() {
  if (base_ == nullptr) return;
  g_live -= mapped_;
#if defined(__linux__)
  if (mmapped_) {
    munmap(base_, mapped_);
    return;
  }
#endif
  std::free(base_);
}

std::size_t HugeBuffer::live_bytes() { return g_live.load(); }

}  // namespace pyfusion::scatter
