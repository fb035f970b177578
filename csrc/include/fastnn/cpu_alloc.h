// Fresh outputs of the CPU kernels (norms, GLU family), advised as transparent huge pages.
//
// A large at::empty is a new mmap (glibc serves 32 MB and up that way, smaller sizes too until its
// threshold adapts), so the kernel's first writes fault in every 4 KB page: 16,384 faults for a
// [4096, 4096] fp32 output. Measured on the 2-core AMD EPYC dev VM (2026-11-26, THP mode
// `madvise`): filling a fresh 64 MB tensor took 26 ms (median of 15) against 3.9 ms for one already
// touched, and 6.1 ms once its 2 MB-aligned interior was advised MADV_HUGEPAGE, which is what
// torch's THP_MEM_ALLOC_ENABLE=1 does for every CPU allocation. The advice changes no data; where
// THP is `never` or the OS is not Linux it does nothing. FASTNN_CPU_NO_HUGE_PAGES=1 turns it off:
// in a VM that reports free 2 MB blocks to its host (virtio-balloon free page reporting, as on
// the dev VM), a huge page freed for a second or more comes back only through the host's page
// faults, and a [4096, 4096] fp32 SwiGLU fwd+bwd round then took 40-460 ms instead of 40 ms.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "fastnn/cpu_isa.h"  // env_flag

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastnn::cpu {

// glibc serves an allocation from a fresh mmap for certain only at 32 MB and up (the most its
// dynamic mmap threshold rises to); smaller ones may come from the heap, already faulted in and
// reused, where the advice would only invite khugepaged to copy pages in the background.
constexpr size_t kFreshMapBytes = size_t{32} << 20;

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool advise = !env_flag("FASTNN_CPU_NO_HUGE_PAGES");
  if (!advise || out.nbytes() < kFreshMapBytes) return out;
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t lo = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t hi = (begin + out.nbytes()) & ~(kHugePage - 1);
  // Only whole huge pages inside the buffer; a refusal (EINVAL without THP) changes nothing.
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return out;
}

}  // namespace fastnn::cpu
