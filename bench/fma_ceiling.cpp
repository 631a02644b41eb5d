// The load-fed FMA ceiling of bench_roofline.py: how many multiply-adds a second the cores run when every FMA takes
// one of its operands from a fresh vector load out of L1, as the sparse kernel's inner loop does (one broadcast
// weight, then kAccumulators FMAs that each load an input vector: csrc/cpu/tiled_conv_f32.h, sum_taps), beside the
// same loop where each loaded vector feeds several FMAs. The sgemm peak counts FMAs alone; on a core that loads fewer
// vectors a cycle than it runs FMAs, a kernel with one load per FMA cannot pass this ceiling, whatever its tiling.
//
// Compiled by bench_roofline.py (torch.utils.cpp_extension.load) once per kernel copy, with that copy's -m flags and
// PTD_CEILING_LANES / PTD_CEILING_ACCUMULATORS (16 x 16 for AVX-512, 8 x 12 for AVX2, 4 x 12 for the baseline),
// so the vectors and the register block are the kernel copy's own. A benchmark tool, not part of the package.
#include <torch/extension.h>

#include <chrono>
#include <cstdint>
#include <vector>

#ifndef PTD_CEILING_LANES
#error "compile with -DPTD_CEILING_LANES=<floats per vector> -DPTD_CEILING_ACCUMULATORS=<registers>"
#endif

namespace {

constexpr int kLanes = PTD_CEILING_LANES, kAccumulators = PTD_CEILING_ACCUMULATORS;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

// Inputs of 64 taps, each kAccumulators / kFmasPerLoad vectors: 64 KiB at most with 16 x 16, in L1 or L2 on any of
// the machines; taps cycle through them so no load is hoisted out of the loop.
constexpr int kTapSlots = 64;

// One thread's work: `taps` taps `reps` times; each tap broadcasts a weight and runs kAccumulators FMAs over
// kAccumulators / kFmasPerLoad loaded vectors. Returns a value that depends on every FMA (so none is dropped).
template <int kFmasPerLoad>
__attribute__((noinline)) float fma_loop(const float* inputs, const float* weights, int64_t taps, int64_t reps) {
  constexpr int kLoads = kAccumulators / kFmasPerLoad;
  vec a[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) a[i] = vec{};
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t t = 0; t < taps; ++t) {
      const vec w = vec{} + weights[t];
      const float* tap = inputs + (t % kTapSlots) * kLoads * kLanes;
#pragma GCC unroll 16
      for (int i = 0; i < kLoads; ++i) {
        vec x = *reinterpret_cast<const vec*>(tap + i * kLanes);
        asm("" : "+v"(x));  // one load into a register: GCC would otherwise load again for each FMA
#pragma GCC unroll 16
        for (int k = 0; k < kFmasPerLoad; ++k) a[i * kFmasPerLoad + k] += w * x;
      }
    }
  vec sum = vec{};
  for (int i = 0; i < kAccumulators; ++i) sum += a[i];
  float total = 0;
  for (int i = 0; i < kLanes; ++i) total += sum[i];
  return total;
}

// GMAC/s of fma_loop<kFmasPerLoad> on every thread of the pool at once (the kernels' threads), the fastest of
// `trials` runs: a busy moment on a shared machine only ever lowers it.
template <int kFmasPerLoad>
double gmacs(int64_t trials) {
  constexpr int64_t kTaps = 4096, kReps = 1000;
  const int64_t threads = at::get_num_threads();
  std::vector<float> weights(kTaps, 1e-3f);
  double best = 0;
  for (int64_t trial = 0; trial < trials; ++trial) {
    std::vector<float> sink(threads);
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t thread = begin; thread < end; ++thread) {
        // Each thread's own aligned inputs, so no two threads share a cache line.
        std::vector<vec> inputs(kTapSlots * kAccumulators / kFmasPerLoad, vec{} + 1e-3f);
        sink[thread] = fma_loop<kFmasPerLoad>(reinterpret_cast<const float*>(inputs.data()), weights.data(), kTaps,
                                              kReps);
      }
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    TORCH_CHECK(sink[0] == sink[0], "fma_ceiling: the loop produced NaN");  // keeps the sums live
    best = std::max(best, static_cast<double>(threads) * kTaps * kReps * kAccumulators * kLanes / seconds / 1e9);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lanes", []() { return kLanes; });
  module.def("accumulators", []() { return kAccumulators; });
  module.def("one_load_per_fma_gmacs", &gmacs<1>, pybind11::arg("trials") = 5,
             "GMAC/s with one vector load from L1 per FMA (the sparse kernel's inner loop), all threads.");
  module.def("two_fmas_per_load_gmacs", &gmacs<2>, pybind11::arg("trials") = 5,
             "GMAC/s with each loaded vector feeding two FMAs, all threads.");
  module.def("four_fmas_per_load_gmacs", &gmacs<4>, pybind11::arg("trials") = 5,
             "GMAC/s with each loaded vector feeding four FMAs, all threads (close to the FMA peak).");
}
