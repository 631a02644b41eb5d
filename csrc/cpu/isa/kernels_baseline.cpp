// The baseline copy of the float32 hot kernels: compiled with the extension's ordinary flags (setup.py), so it runs
// on every CPU the build runs on. The fallback of the dispatch, and the only copy on non-x86 machines.
#include "prelude.h"

#define PTD_ISA_NAMESPACE isa_baseline
#define PTD_ISA_NAME "baseline"
#define PTD_ISA_VECTOR_BYTES 16  // 4 floats: one SSE register on x86-64-v2, one NEON register on aarch64
#include "kernels_body.h"

namespace ptd_sparse {
namespace cpu_isa {
const F32Kernels* baseline_kernels() { return &isa_baseline::kernels; }
}  // namespace cpu_isa
}  // namespace ptd_sparse
