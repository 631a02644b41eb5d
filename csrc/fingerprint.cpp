// The byte hash of csrc/fingerprint.h: eight independent lanes, each folding in one 64-bit word per 64-byte stripe
// as lane = (lane ^ word) * odd constant, a bijection of the lane for a fixed word and of the word for a fixed lane,
// so a change to any one word always changes its lane; the lanes and the tail are then mixed into one value. Eight
// lanes keep eight multiplies in flight, which runs at memory speed without SIMD multiplies (the portable baseline
// build has none). It detects changes; it is not meant to resist a chosen collision.
#include "fingerprint.h"

#include <c10/util/Exception.h>

#include <cstring>

namespace ptd_sparse {
namespace {

constexpr uint64_t kLaneFactor = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kMixFactor1 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kMixFactor2 = 0x165667B19E3779F9ULL;
constexpr int kLanes = 8;

inline uint64_t read64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A bijective finaliser (the avalanche step of xxHash64, from its published description).
inline uint64_t mix(uint64_t h) {
  h ^= h >> 33;
  h *= kMixFactor1;
  h ^= h >> 29;
  h *= kMixFactor2;
  h ^= h >> 32;
  return h;
}

uint64_t hash_bytes(const unsigned char* data, size_t length) {
  uint64_t lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = kLaneFactor * static_cast<uint64_t>(i + 1);
  const unsigned char* p = data;
  const unsigned char* end = data + length;
  for (; p + 8 * kLanes <= end; p += 8 * kLanes)
    for (int i = 0; i < kLanes; ++i) lanes[i] = (lanes[i] ^ read64(p + 8 * i)) * kLaneFactor;
  uint64_t h = mix(static_cast<uint64_t>(length));
  for (int i = 0; i < kLanes; ++i) h = mix(h ^ lanes[i]);
  for (; p + 8 <= end; p += 8) h = mix(h ^ read64(p));
  for (; p < end; ++p) h = mix(h ^ *p);
  return h;
}

}  // namespace

int64_t fingerprint(const at::Tensor& tensor) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), "fingerprint: the tensor must be on the CPU, got ", tensor.device());
  const at::Tensor bytes = tensor.contiguous();
  const auto* data = static_cast<const unsigned char*>(bytes.const_data_ptr());
  const uint64_t h = hash_bytes(data, static_cast<size_t>(bytes.numel()) * bytes.element_size());
  int64_t out;
  std::memcpy(&out, &h, sizeof out);
  return out;
}

WeightKey weight_key(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  TORCH_CHECK_VALUE(values.device().is_cpu() && row_ptr.device().is_cpu() && col_idx.device().is_cpu(),
                    "weight_key: values, row_ptr and col_idx must be on the CPU, got ", values.device(), ", ",
                    row_ptr.device(), " and ", col_idx.device());
  return {fingerprint(values), static_cast<int64_t>(values.scalar_type()), values.numel(), fingerprint(row_ptr),
          fingerprint(col_idx), static_cast<int64_t>(col_idx.scalar_type()), col_idx.numel()};
}

}  // namespace ptd_sparse
