// Large output buffers for the scatter engine: anonymous mappings aligned to 2 MB with transparent huge pages
// advised before the first touch. Torch-free; pyfusion.fuse.builder wraps one in a torch tensor (torch.frombuffer)
// that keeps the owning Python object, so the mapping is released when the last tensor on it dies.
#pragma once

#include <cstddef>

namespace pyfusion::scatter {

class HugeBuffer {
 public:
  explicit HugeBuffer(std::size_t nbytes);
  ~HugeBuffer();
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;

  void* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool huge() const { return huge_; }  // the mapping is 2 MB aligned and MADV_HUGEPAGE was accepted
  static std::size_t live_bytes();      // bytes mapped by HugeBuffers alive now (tests check the release)

 private:
  void* base_ = nullptr;  // the mapping (or the malloc'd block)
  std::size_t mapped_ = 0;
  void* data_ = nullptr;
  std::size_t size_ = 0;
  bool huge_ = false;
  bool mmapped_ = false;
};

}  // namespace pyfusion::scatter
