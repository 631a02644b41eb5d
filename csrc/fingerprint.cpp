// The byte hash of csrc/fingerprint.h: four independent 64-bit multiply-rotate lanes over 32-byte stripes (the
// structure of xxHash64, written from its published description), so the loop runs at memory speed without SIMD
// multiplies, which the portable baseline build lacks.
#include "fingerprint.h"

#include <c10/util/Exception.h>

#include <cstring>

namespace ptd_sparse {
namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kPrime4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kPrime5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t round(uint64_t acc, uint64_t lane) { return rotl(acc + lane * kPrime2, 31) * kPrime1; }
inline uint64_t merge(uint64_t acc, uint64_t lane) { return (acc ^ round(0, lane)) * kPrime1 + kPrime4; }
inline uint64_t read64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint64_t hash_bytes(const unsigned char* data, size_t length) {
  const unsigned char* p = data;
  const unsigned char* end = data + length;
  uint64_t h;
  if (length >= 32) {
    uint64_t a = kPrime1 + kPrime2, b = kPrime2, c = 0, d = 0 - kPrime1;
    for (; p + 32 <= end; p += 32) {
      a = round(a, read64(p));
      b = round(b, read64(p + 8));
      c = round(c, read64(p + 16));
      d = round(d, read64(p + 24));
    }
    h = rotl(a, 1) + rotl(b, 7) + rotl(c, 12) + rotl(d, 18);
    h = merge(merge(merge(merge(h, a), b), c), d);
  } else {
    h = kPrime5;
  }
  h += static_cast<uint64_t>(length);
  for (; p + 8 <= end; p += 8) h = rotl(h ^ round(0, read64(p)), 27) * kPrime1 + kPrime4;
  for (; p < end; ++p) h = rotl(h ^ (*p * kPrime5), 11) * kPrime1;
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
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

}  // namespace ptd_sparse
