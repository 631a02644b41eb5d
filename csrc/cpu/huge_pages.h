// Transparent huge pages for the operators' large outputs. A fresh allocation of tens of megabytes is mapped anew by
// the C library and faulted in 4 KiB at a time on its first write: a ResNet stem's output at batch 64 (64 x 64 x 112
// x 112 floats, 205 MB) took 50k page faults per call, about a third of the sparse convolution's time (perf, 2 cores,
// Zen 4). Where the kernel grants huge pages on request (transparent_hugepage "madvise", the common default), asking
// for them before the first write maps 2 MiB per fault. Advice only: where it is refused, nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ptd_sparse {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;
// Below this, the allocation is likely a reused heap block whose pages are already mapped.
constexpr int64_t kHugePageAdviceMinBytes = int64_t{32} << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugePageAdviceMinBytes) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  const uintptr_t last = (begin + bytes) & ~static_cast<uintptr_t>(kHugePageBytes - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace ptd_sparse
