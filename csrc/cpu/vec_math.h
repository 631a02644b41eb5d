// Vectorised float math for the CPU kernels, on the vector types of wide_conv_f32.h (kLanes floats wide).
// exp_nonpositive(x) = exp(x) for x <= 0 (the only arguments softmax kernels need once the row maximum is
// subtracted): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so the reduction is exact; n rounded with the
// 1.5 * 2^23 shifter), exp(r) by the degree-6 Cephes polynomial, 2^n written into the exponent bits. Relative error
// about 1e-7; arguments below -87.3 (including -inf) give 0.
//
// Compiled once per instruction set, like wide_conv_f32.h: included only by csrc/cpu/isa/kernels_body.h, after it.
#ifndef PTD_ISA_VECTOR_BYTES
#error "vec_math.h is compiled per instruction set: include csrc/cpu/isa/kernels_body.h instead"
#endif

namespace vmath {

using wide::ivec;
using wide::vec;

inline vec select(ivec mask, vec a, vec b) { return mask ? a : b; }

inline vec exp_nonpositive(vec x) {
  const vec min_arg = wide::broadcast(-87.3365447505531f);
  const ivec underflow = x < min_arg;
  x = x < min_arg ? min_arg : x;
  const vec shifter = wide::broadcast(12582912.0f);  // adding 1.5 * 2^23 rounds to an integer in the low bits
  const vec shifted = x * 1.44269504088896341f + shifter;
  const vec nf = shifted - shifter;
  ivec n;
  std::memcpy(&n, &shifted, sizeof n);
  vec r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vec p = wide::broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const ivec bits = (n - 0x4B400000 + 127) << 23;  // the shifter's bit pattern is 0x4B400000 + n
  vec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return select(underflow, vec{}, p * two_n);
}

inline float horizontal_sum(vec v) {
  float total = 0;
  for (int i = 0; i < wide::kLanes; ++i) total += v[i];
  return total;
}

inline float horizontal_max(vec v) {
  float best = v[0];
  for (int i = 1; i < wide::kLanes; ++i) best = v[i] > best ? v[i] : best;
  return best;
}

}  // namespace vmath
