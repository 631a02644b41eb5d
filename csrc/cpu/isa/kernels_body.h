// One copy of the float32 hot kernels, in the namespace ptd_sparse::PTD_ISA_NAMESPACE, compiled for whatever target
// the including kernels_*.cpp has set, with float vectors of PTD_ISA_VECTOR_BYTES. Included once per ISA file, after
// prelude.h; no include guard, by design. The namespace keeps every inline function and template instantiation of
// this copy (vector helpers, lambdas handed to at::parallel_for, std::vector of its Tap type) under a name of its
// own, so the linker never merges an AVX-512 body into a function the baseline code calls.
#if !defined(PTD_ISA_NAMESPACE) || !defined(PTD_ISA_VECTOR_BYTES) || !defined(PTD_ISA_NAME)
#error "define PTD_ISA_NAMESPACE, PTD_ISA_NAME and PTD_ISA_VECTOR_BYTES before including kernels_body.h"
#endif

namespace ptd_sparse {
namespace PTD_ISA_NAMESPACE {

#include "../channel_chunks.h"
#include "../wide_conv_f32.h"
#include "../patch_conv_f32.h"
#include "../tiled_conv_f32.h"
#include "../vec_math.h"
#include "../conv_f32.h"
#include "../kd_row_f32.h"

const cpu_isa::F32Kernels kernels = {PTD_ISA_NAME,           conv_forward_f32,        fuses_max_pool_f32,
                                     conv_forward_max_pool_f32, conv_backward_input_f32, conv_backward_values_f32,
                                     kd_row_f32,                wide::kLanes};

}  // namespace PTD_ISA_NAMESPACE
}  // namespace ptd_sparse
