// The AVX2+FMA copy of the float32 hot kernels (x86-64 with GCC; elsewhere this file provides no copy). Dispatch
// runs it only on CPUs that report avx2 and fma.
#include "prelude.h"

#if PTD_ISA_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma")
#define PTD_ISA_NAMESPACE isa_avx2
#define PTD_ISA_NAME "avx2"
#define PTD_ISA_VECTOR_BYTES 32  // 8 floats, one ymm register
#include "kernels_body.h"
#pragma GCC pop_options
#endif

namespace ptd_sparse {
namespace cpu_isa {
#if PTD_ISA_X86_COPIES
const F32Kernels* avx2_kernels() { return &isa_avx2::kernels; }
#else
const F32Kernels* avx2_kernels() { return nullptr; }
#endif
}  // namespace cpu_isa
}  // namespace ptd_sparse
