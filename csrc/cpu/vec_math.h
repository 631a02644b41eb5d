// Vectorised float math for the CPU kernels, on the GCC/Clang vector types of wide_conv_f32.h.
// exp8_nonpositive(x) = exp(x) for x <= 0 (the only arguments softmax kernels need once the row maximum is
// subtracted): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so the reduction is exact; n rounded with the
// 1.5 * 2^23 shifter), exp(r) by the degree-6 Cephes polynomial, 2^n written into the exponent bits. Relative error
// about 1e-7; arguments below -87.3 (including -inf) give 0.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "wide_conv_f32.h"

namespace ptd_sparse {
namespace vmath {

using wide::vec8;
typedef int32_t ivec8 __attribute__((vector_size(32)));

inline vec8 select(ivec8 mask, vec8 a, vec8 b) { return mask ? a : b; }

inline vec8 exp8_nonpositive(vec8 x) {
  const vec8 min_arg = wide::broadcast8(-87.3365447505531f);
  const ivec8 underflow = x < min_arg;
  x = x < min_arg ? min_arg : x;
  const vec8 shifter = wide::broadcast8(12582912.0f);  // adding 1.5 * 2^23 rounds to an integer in the low bits
  const vec8 shifted = x * 1.44269504088896341f + shifter;
  const vec8 nf = shifted - shifter;
  ivec8 n;
  std::memcpy(&n, &shifted, sizeof n);
  vec8 r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vec8 p = wide::broadcast8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const ivec8 bits = (n - 0x4B400000 + 127) << 23;  // the shifter's bit pattern is 0x4B400000 + n
  vec8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return select(underflow, vec8{}, p * two_n);
}

inline float horizontal_sum(vec8 v) {
  float total = 0;
  for (int i = 0; i < wide::kLanes; ++i) total += v[i];
  return total;
}

inline float horizontal_max(vec8 v) {
  float best = v[0];
  for (int i = 1; i < wide::kLanes; ++i) best = v[i] > best ? v[i] : best;
  return best;
}

}  // namespace vmath
}  // namespace ptd_sparse
