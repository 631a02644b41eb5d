// The choice of the float32 kernel copy (see dispatch.h). Compiled with the extension's ordinary flags.
#include "dispatch.h"

#include "../huge_pages.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace ptd_sparse {
namespace cpu_isa {
namespace {

struct Candidate {
  const char* name;
  const F32Kernels* (*table)();
  const char* describe;  // for error messages
};

// Lowest first; the automatic choice takes the last one this CPU runs.
const Candidate kCandidates[] = {
    {"baseline", baseline_kernels, "the portable baseline kernels"},
    {"avx2", avx2_kernels, "AVX2+FMA kernels"},
    {"avx512", avx512_kernels, "AVX-512 kernels (avx512f, avx512vl, avx512bw, avx512dq)"},
};

// The features a copy needs that this CPU lacks (reported by CPUID and enabled by the OS: libgcc's
// __builtin_cpu_supports checks XGETBV for the AVX and AVX-512 register state).
std::vector<std::string> missing_features(const std::string& isa) {
  std::vector<std::string> missing;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  auto need = [&](bool has, const char* feature) {
    if (!has) missing.emplace_back(feature);
  };
  if (isa == "avx2" || isa == "avx512") {
    need(__builtin_cpu_supports("avx2"), "avx2");
    need(__builtin_cpu_supports("fma"), "fma");
  }
  if (isa == "avx512") {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
  }
#else
  if (isa != "baseline") missing.emplace_back(isa);  // never compiled here anyway
#endif
  return missing;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

const F32Kernels* choose() {
  const char* requested = std::getenv("PTD_CPU_ISA");
  const std::string want = requested ? requested : "";
  if (want.empty() || want == "auto") {
    const F32Kernels* best = nullptr;
    for (const Candidate& c : kCandidates)
      if (c.table() && missing_features(c.name).empty()) best = c.table();
    TORCH_CHECK(best, "ptd_sparse: the baseline CPU kernels are missing from this build");
    return best;
  }
  for (const Candidate& c : kCandidates) {
    if (want != c.name) continue;
    TORCH_CHECK_VALUE(c.table() != nullptr, "PTD_CPU_ISA=", want, " asks for ", c.describe,
                      ", but this build has none (they are compiled only on x86-64 with GCC); choose one of: ",
                      join(available_isas()));
    const auto missing = missing_features(c.name);
    TORCH_CHECK_VALUE(missing.empty(), "PTD_CPU_ISA=", want, " asks for ", c.describe, ", but this CPU lacks ",
                      join(missing), "; choose one of: ", join(available_isas()), " (or unset PTD_CPU_ISA)");
    return c.table();
  }
  TORCH_CHECK_VALUE(false, "PTD_CPU_ISA must be one of baseline, avx2, avx512 or auto (unset means auto), got '",
                    want, "'");
  return nullptr;
}

}  // namespace

const F32Kernels& f32_kernels() {
  // A static local: initialised once, thread-safe; if choose() throws (a bad PTD_CPU_ISA), the next call retries.
  static const F32Kernels* chosen = choose();
  return *chosen;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const Candidate& c : kCandidates)
    if (c.table() && missing_features(c.name).empty()) names.emplace_back(c.name);
  return names;
}

std::vector<std::string> missing_baseline_features() {
  std::vector<std::string> missing;
#if defined(__x86_64__) && defined(__GNUC__)
  // The predefined macros say what -march let the compiler assume for every function of this build.
  __builtin_cpu_init();
  auto need = [&](bool has, const char* feature) {
    if (!has) missing.emplace_back(feature);
  };
#ifdef __SSE4_2__
  need(__builtin_cpu_supports("sse4.2"), "sse4.2");
#endif
#ifdef __POPCNT__
  need(__builtin_cpu_supports("popcnt"), "popcnt");
#endif
#ifdef __AVX__
  need(__builtin_cpu_supports("avx"), "avx");
#endif
#ifdef __AVX2__
  need(__builtin_cpu_supports("avx2"), "avx2");
#endif
#ifdef __FMA__
  need(__builtin_cpu_supports("fma"), "fma");
#endif
#ifdef __BMI2__
  need(__builtin_cpu_supports("bmi2"), "bmi2");
#endif
#ifdef __AVX512F__
  need(__builtin_cpu_supports("avx512f"), "avx512f");
#endif
#ifdef __AVX512VL__
  need(__builtin_cpu_supports("avx512vl"), "avx512vl");
#endif
#ifdef __AVX512BW__
  need(__builtin_cpu_supports("avx512bw"), "avx512bw");
#endif
#ifdef __AVX512DQ__
  need(__builtin_cpu_supports("avx512dq"), "avx512dq");
#endif
#ifdef __AVX512VNNI__
  need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
#endif
#ifdef __AVX512BF16__
  need(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
#endif
#endif
  return missing;
}

namespace {

// A kept buffer is in use while any tensor other than the list's own (the one handed out, a view of it, a tensor
// sharing its storage) holds its storage.
bool is_free(const at::Tensor& buffer) { return buffer.storage().use_count() == 1; }

// Keeps `fresh` among at most `limit` buffers: appended while there is room, else in place of the smallest free
// buffer, if any is free and smaller.
void keep(std::vector<at::Tensor>& kept, const at::Tensor& fresh, int limit) {
  if (kept.size() < static_cast<size_t>(limit)) {
    kept.push_back(fresh);
    return;
  }
  at::Tensor* smallest = nullptr;
  for (at::Tensor& buffer : kept)
    if (is_free(buffer) && (smallest == nullptr || buffer.numel() < smallest->numel())) smallest = &buffer;
  if (smallest != nullptr && smallest->numel() < fresh.numel()) *smallest = fresh;
}

}  // namespace

at::Tensor packing_buffer(int64_t numel) {
  thread_local std::vector<at::Tensor> kept;
  for (const at::Tensor& buffer : kept)
    if (is_free(buffer) && buffer.numel() >= numel) return buffer.narrow(0, 0, numel);
  at::Tensor fresh = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  advise_huge_pages(fresh);
  if (numel * int64_t{sizeof(float)} <= kMaxKeptPackingBytes) keep(kept, fresh, kKeptPackingBuffers);
  return fresh;
}

namespace {

// An output buffer and the memory it was allocated with.
struct KeptOutput {
  at::Tensor buffer;
  const void* memory;
};

// `buffer` as a tensor of `sizes` in `options`' memory format, sharing its storage.
at::Tensor shaped(const at::Tensor& buffer, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const at::Tensor like = at::empty(sizes, options.device(at::kMeta));  // the format's strides, nothing allocated
  at::Tensor out = at::empty({0}, options.memory_format(c10::nullopt));
  out.set_(buffer.storage(), 0, like.sizes(), like.strides());
  return out;
}

}  // namespace

at::Tensor output_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kHugePageAdviceMinBytes || bytes > kMaxKeptOutputBytes || !options.device().is_cpu()) {
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out);
    return out;
  }
  thread_local std::vector<KeptOutput> kept;
  // A buffer whose storage no longer holds the memory it was allocated with was moved (into shared memory, to be sent
  // to another process, which may still read it after this one has let go): dropped, never handed out again.
  kept.erase(std::remove_if(kept.begin(), kept.end(),
                            [](const KeptOutput& k) { return k.buffer.storage().data() != k.memory; }),
             kept.end());
  // Only a buffer of exactly the output's size is reused: the output's storage then holds the output and nothing
  // else (no bytes of an earlier call go with a copy or a torch.save of it), and a network's layers repeat their
  // sizes on every forward.
  for (const KeptOutput& k : kept)
    if (is_free(k.buffer) && k.buffer.numel() == bytes) return shaped(k.buffer, sizes, options);
  at::Tensor fresh = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  advise_huge_pages(fresh);
  const KeptOutput entry{fresh, fresh.storage().data()};
  if (kept.size() < static_cast<size_t>(kKeptOutputBuffers)) {
    kept.push_back(entry);
  } else {
    // In place of a free buffer of another size, if any.
    const auto free = std::find_if(kept.begin(), kept.end(), [](const KeptOutput& k) { return is_free(k.buffer); });
    if (free != kept.end()) *free = entry;
  }
  return shaped(fresh, sizes, options);
}

}  // namespace cpu_isa
}  // namespace ptd_sparse
