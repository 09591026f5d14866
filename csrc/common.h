#pragma once
// Shared helpers for the native CPU ops: half conversion, a vectorizable exp, ISA dispatch.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fastitm.h"

#define FASTITM_INLINE inline __attribute__((always_inline))

// Compile the hot loops once per ISA level and pick one at load time (GCC function
// multiversioning), so one wheel runs everywhere yet uses AVX-512/AVX2+FMA where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTITM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTITM_MULTIVERSION
#endif

namespace fastitm {

FASTITM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FASTITM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> binary32, exact (including subnormals, inf, nan).
FASTITM_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: man * 2^-24
    float v = (float)man * 5.9604644775390625e-08f;
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// binary32 -> binary16 with round-to-nearest-even (as torch's .half()).
FASTITM_INLINE uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0));  // inf/nan
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: overflow to inf
  if (x < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (x < 0x33000000u) return (uint16_t)sign;  // < 2^-25 rounds to zero
    const uint32_t e = x >> 23;
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1))) r++;
    return (uint16_t)(sign | r);
  }
  uint32_t r = x - 0x38000000u;  // rebias exponent 127 -> 15
  r = (r + 0xfffu + ((r >> 13) & 1)) >> 13;
  return (uint16_t)(sign | r);
}

// exp(x) for x <= 0 (softmax arguments), written so GCC vectorizes it: range reduction to
// r in [-ln2/2, ln2/2], a degree-6 polynomial, and the exponent built from integer bits.
// Relative error about 2e-7. Arguments below -87 give 0.
FASTITM_INLINE float exp_neg(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  // Round to nearest by adding and subtracting 1.5 * 2^23 (no libm call, so it vectorizes).
  const float kRound = 12582912.0f;
  const float n = (x * kLog2e + kRound) - kRound;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.0f : p * scale;
}

// 16 floats as one GCC/Clang generic vector: one AVX-512 register, two AVX2 or four SSE registers,
// lowered per ISA clone. Accumulators of this type stay in registers, which plain float arrays
// often do not.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

FASTITM_INLINE v16f loadv(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FASTITM_INLINE void storev(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// Horizontal sum and max as trees of halvings (log2(16) = 4 dependent steps instead of 15).
FASTITM_INLINE float hsum(v16f v) {
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
FASTITM_INLINE float hmax(v16f v) {
  const v8f lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8f a = lo > hi ? lo : hi;
  const v4f b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3), b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4f b = b0 > b1 ? b0 : b1;
  const float m0 = b[0] > b[2] ? b[0] : b[2], m1 = b[1] > b[3] ? b[1] : b[3];
  return m0 > m1 ? m0 : m1;
}

// exp_neg on 16 lanes at once (same steps as the scalar version).
FASTITM_INLINE v16f exp_neg_v(v16f x) {
  const v16i underflow = x < -87.0f;
  x = underflow ? (v16f){} - 87.0f : x;
  const float kRound = 12582912.0f;
  const v16f n = (x * 1.44269504088896341f + kRound) - kRound;
  v16f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16f p = r * 1.3981999507e-3f + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? (v16f){} : p * scale;
}

// Element i of a float32 or float16 (raw uint16_t bits) buffer, as float32.
template <typename T>
FASTITM_INLINE float load(const T* p, int64_t i);
template <>
FASTITM_INLINE float load<float>(const float* p, int64_t i) { return p[i]; }
template <>
FASTITM_INLINE float load<uint16_t>(const uint16_t* p, int64_t i) { return half_to_float(p[i]); }
FASTITM_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
FASTITM_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_half(v); }

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace fastitm
