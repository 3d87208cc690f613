// Copyright (c) boat-mm contributors. All rights reserved.
//
// Fixed-width SIMD helpers shared by the C++ CPU kernels of boat_mm.
//
// The kernels are written once with GCC/Clang vector extensions and built
// twice on x86: for the baseline instruction set (16-byte vectors) and,
// through __attribute__((target("avx2,fma"))), for AVX2+FMA (32-byte
// vectors), chosen at run time with cpu_has_avx2_fma(). No -march=native,
// so the built library runs on any x86-64 CPU.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BOAT_MM_X86_DISPATCH 1
#define BOAT_MM_INLINE inline __attribute__((always_inline))
#else
#define BOAT_MM_X86_DISPATCH 0
#define BOAT_MM_INLINE inline
#endif

namespace boat_mm {
namespace simd {

// Fixed-width vectors (GCC/Clang vector extensions) of `Bytes` bytes: 16
// for the baseline instruction set, 32 for the AVX2 build.
template <typename T, int Bytes>
struct Simd {
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int64_t kLanes = Bytes / sizeof(T);
  static BOAT_MM_INLINE V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static BOAT_MM_INLINE void store(T* p, V v) {
    __builtin_memcpy(p, &v, sizeof(V));
  }
  static BOAT_MM_INLINE T sum(V v) {
    T s = 0;
    for (int64_t j = 0; j < kLanes; ++j) s += v[j];
    return s;
  }
};

// exp(x) of float lanes with x <= 0: 2^n * p(r), r = x - n ln2 in
// [-ln2/2, ln2/2], p of degree 7 (Cephes' expf coefficients); within
// 1e-7 relative of the exact value; below 2^-126 it returns 0.
template <int Bytes>
BOAT_MM_INLINE typename Simd<float, Bytes>::V exp_nonpositive(
    typename Simd<float, Bytes>::V x) {
  using V = typename Simd<float, Bytes>::V;
  typedef int32_t I __attribute__((vector_size(Bytes)));
  const V lowest = V{} - 87.33654f;
  const auto under = x < lowest;
  x = under ? lowest : x;
  const V fx = x * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);  // truncates toward zero
  n = __builtin_convertvector(n, V) > fx ? n - 1 : n;  // floor
  const V nf = __builtin_convertvector(n, V);
  V r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I bits = (n + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(V));
  return under ? V{} : p * scale;
}

#if BOAT_MM_X86_DISPATCH
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma");
  return has;
}
#endif

}  // namespace simd
}  // namespace boat_mm
