// The load-fed FMA ceilings of bench_roofline.py: how many multiply-adds a second the cores run when every FMA takes
// one of its operands from a fresh vector load, as the sparse kernel's inner loop does (one broadcast weight, then
// kAccumulators FMAs that each load an input vector: csrc/cpu/tiled_conv_f32.h, sum_taps), with the inputs in L1
// (16 KiB) or in L2 (512 KiB), beside the same loop where each loaded vector feeds two or four FMAs. The sgemm peak
// counts FMAs alone; on a core that loads fewer vectors a cycle than it runs FMAs, or from L2 fewer still, a kernel
// with one load per FMA cannot pass the ceiling of the level its loads come from, whatever its tiling.
//
// Compiled by bench_roofline.py (torch.utils.cpp_extension.load) once per kernel copy, with that copy's -m flags and
// PTD_CEILING_LANES / PTD_CEILING_ACCUMULATORS (16 x 16 for AVX-512, 8 x 12 for AVX2, 4 x 12 for the baseline),
// so the vectors and the register block are the kernel copy's own. A benchmark tool, not part of the package.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#ifndef PTD_CEILING_LANES
#error "compile with -DPTD_CEILING_LANES=<floats per vector> -DPTD_CEILING_ACCUMULATORS=<registers>"
#endif

namespace {

constexpr int kLanes = PTD_CEILING_LANES, kAccumulators = PTD_CEILING_ACCUMULATORS;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

// One thread's work: `taps` taps `reps` times; each tap broadcasts a weight and runs kAccumulators FMAs over
// kAccumulators / kFmasPerLoad loaded vectors, tap t reading slot t mod slots of the inputs (so no load is hoisted out of
// the loop, and the slots' bytes decide which cache level serves the loads). Returns a value that depends on every
// FMA (so none is dropped).
template <int kFmasPerLoad>
__attribute__((noinline)) float fma_loop(const float* inputs, int64_t slots, const float* weights, int64_t taps,
                                         int64_t reps) {
  constexpr int kLoads = kAccumulators / kFmasPerLoad;
  vec a[kAccumulators];
  for (int i = 0; i < kAccumulators; ++i) a[i] = vec{};
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t t = 0; t < taps; ++t) {
      const vec w = vec{} + weights[t];
      const float* tap = inputs + (t & (slots - 1)) * kLoads * kLanes;  // slots: a power of two (no division)
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

// The sparse kernel's loop as a chunked task runs it (csrc/cpu/tiled_conv_f32.h, forward_tiles and sum_taps): output
// rows of `taps_per_row` taps, each tap an (offset, value) pair read from memory (the listed taps) and kAccumulators
// FMAs loading the input vectors at that offset, each row's accumulators loaded from its tile in memory before its
// taps and stored after them (once per row and chunk of input channels). Offsets are spread over the inputs, whose
// footprint decides where the input loads are served; the 256 tiles (256 KiB on AVX-512) and the tap list stream
// through the caches as a chunked task's do.
struct Tap {
  int32_t offset;
  float value;
};

constexpr int64_t kTileRows = 256;  // a 256-channel layer's output rows: 256 tiles of kAccumulators vectors

__attribute__((noinline)) void tap_rows(const float* inputs, const Tap* taps, int64_t taps_per_row, float* tiles) {
  for (int64_t r = 0; r < kTileRows; ++r) {
    float* tile = tiles + r * kAccumulators * kLanes;
    vec a[kAccumulators];
    for (int i = 0; i < kAccumulators; ++i) a[i] = *reinterpret_cast<const vec*>(tile + i * kLanes);
    for (int64_t t = r * taps_per_row; t < (r + 1) * taps_per_row; ++t) {
      const vec w = vec{} + taps[t].value;
      const float* window = inputs + taps[t].offset;
#pragma GCC unroll 16
      for (int i = 0; i < kAccumulators; ++i) a[i] += w * *reinterpret_cast<const vec*>(window + i * kLanes);
    }
    for (int i = 0; i < kAccumulators; ++i) *reinterpret_cast<vec*>(tile + i * kLanes) = a[i];
  }
}

// The fastest of `trials` runs of run(thread) on every thread of the pool at once (the kernels' threads), in GMAC/s for
// `macs` multiply-adds a thread: a busy moment on a shared machine only ever lowers it. run returns a value that
// depends on every FMA (so none is dropped); each thread's data is made before the clock starts.
template <typename Run>
double fastest_gmacs(int64_t trials, double macs, Run run) {
  const int64_t threads = at::get_num_threads();
  double best = 0;
  for (int64_t trial = 0; trial < trials; ++trial) {
    std::vector<float> sink(threads);
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t thread = begin; thread < end; ++thread) sink[thread] = run(thread);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    TORCH_CHECK(sink[0] == sink[0], "fma_ceiling: the loop produced NaN");
    best = std::max(best, static_cast<double>(threads) * macs / seconds / 1e9);
  }
  return best;
}

// GMAC/s of tap_rows over `footprint_kib` KiB of inputs per thread with `taps_per_row` taps a row, all threads.
double tap_rows_gmacs(int64_t footprint_kib, int64_t taps_per_row, int64_t trials) {
  TORCH_CHECK_VALUE(footprint_kib >= 1 && taps_per_row >= 1, "fma_ceiling: footprint_kib and taps_per_row must be at "
                    "least 1, got ", footprint_kib, " and ", taps_per_row);
  const int64_t window = int64_t{kAccumulators} * kLanes;  // floats a tap reads
  const int64_t floats = std::max(window, footprint_kib * 256);
  const int64_t taps = kTileRows * taps_per_row;
  const int64_t reps = std::max<int64_t>(1, (int64_t{1} << 26) / (taps * window));  // ~64M multiply-adds a run
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<vec>> inputs(threads, std::vector<vec>(floats / kLanes, vec{} + 1e-3f));
  std::vector<std::vector<vec>> tiles(threads, std::vector<vec>(kTileRows * kAccumulators, vec{}));
  std::vector<std::vector<Tap>> lists(threads, std::vector<Tap>(taps));
  for (int64_t thread = 0; thread < threads; ++thread) {
    uint64_t state = 0x9E3779B97F4A7C15ULL * (thread + 1);
    for (Tap& tap : lists[thread]) {  // a vector-aligned window anywhere in the inputs (an LCG: reproducible, cheap)
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      tap = {static_cast<int32_t>((state >> 33) % ((floats - window) / kLanes + 1) * kLanes), 1e-3f};
    }
  }
  return fastest_gmacs(trials, static_cast<double>(reps) * taps * window, [&](int64_t thread) {
    for (int64_t r = 0; r < reps; ++r)
      tap_rows(reinterpret_cast<const float*>(inputs[thread].data()), lists[thread].data(), taps_per_row,
               reinterpret_cast<float*>(tiles[thread].data()));
    return tiles[thread][0][0];
  });
}

// GMAC/s of fma_loop<kFmasPerLoad> over `footprint_kib` KiB of inputs per thread, all threads.
template <int kFmasPerLoad>
double gmacs(int64_t footprint_kib, int64_t trials) {
  constexpr int64_t kTaps = 4096, kReps = 1000;
  constexpr int64_t kSlotBytes = int64_t{kAccumulators} / kFmasPerLoad * sizeof(vec);
  TORCH_CHECK_VALUE(footprint_kib >= 1, "fma_ceiling: footprint_kib must be at least 1, got ", footprint_kib);
  int64_t slots = 1;  // the largest power of two whose slots fit the footprint
  while (2 * slots * kSlotBytes <= footprint_kib * 1024) slots *= 2;
  const int64_t threads = at::get_num_threads();
  const std::vector<float> weights(kTaps, 1e-3f);
  // Each thread's own aligned inputs, so no two threads share a cache line.
  const std::vector<std::vector<vec>> inputs(threads, std::vector<vec>(slots * kAccumulators / kFmasPerLoad,
                                                                       vec{} + 1e-3f));
  return fastest_gmacs(trials, static_cast<double>(kTaps) * kReps * kAccumulators * kLanes, [&](int64_t thread) {
    return fma_loop<kFmasPerLoad>(reinterpret_cast<const float*>(inputs[thread].data()), slots, weights.data(), kTaps,
                                  kReps);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lanes", []() { return kLanes; });
  module.def("accumulators", []() { return kAccumulators; });
  module.def("one_load_per_fma_gmacs", &gmacs<1>, pybind11::arg("footprint_kib"), pybind11::arg("trials") = 5,
             "GMAC/s with one vector load per FMA (the sparse kernel's inner loop) over footprint_kib KiB of inputs "
             "per thread, all threads.");
  module.def("two_fmas_per_load_gmacs", &gmacs<2>, pybind11::arg("footprint_kib"), pybind11::arg("trials") = 5,
             "GMAC/s with each loaded vector feeding two FMAs, all threads.");
  module.def("tap_rows_gmacs", &tap_rows_gmacs, pybind11::arg("footprint_kib"), pybind11::arg("taps_per_row"),
             pybind11::arg("trials") = 5,
             "GMAC/s of the sparse kernel's loop as a chunked task runs it: rows of taps_per_row listed taps over "
             "footprint_kib KiB of inputs per thread, each row's tile loaded and stored around its taps; all threads.");
  module.def("four_fmas_per_load_gmacs", &gmacs<4>, pybind11::arg("footprint_kib"), pybind11::arg("trials") = 5,
             "GMAC/s with each loaded vector feeding four FMAs, all threads (close to the FMA peak).");
}
