// The AVX-512 copy of the float32 hot kernels (x86-64 with GCC; elsewhere this file provides no copy): 16-float zmm
// vectors in the register-blocked loops. Dispatch runs it only on CPUs that report avx512f, avx512vl, avx512bw,
// avx512dq and fma (Skylake-SP and later Xeons, Ice Lake and later, AMD Zen 4 and later).
#include "prelude.h"

#if PTD_ISA_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")
#define PTD_ISA_NAMESPACE isa_avx512
#define PTD_ISA_NAME "avx512"
#define PTD_ISA_VECTOR_BYTES 64  // 16 floats, one zmm register
#include "kernels_body.h"
#pragma GCC pop_options
#endif

namespace ptd_sparse {
namespace cpu_isa {
#if PTD_ISA_X86_COPIES
const F32Kernels* avx512_kernels() { return &isa_avx512::kernels; }
#else
const F32Kernels* avx512_kernels() { return nullptr; }
#endif
}  // namespace cpu_isa
}  // namespace ptd_sparse
