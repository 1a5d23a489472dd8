// 16-float vectors and the sum of squares in a fixed order, shared by memopt's two C++ kernel files
// (cpu_kernels.cpp and cpu_adapprox.cpp; each build hashes this header with its source).
#pragma once
#include <cstdint>

namespace {

using idx = int64_t;

// Sums of squares go through explicit vectors (GCC/Clang vector types; 16 floats, one AVX-512
// register, two AVX2 ones): an `omp simd` reduction kept one accumulator, a chain of dependent
// adds, and the sums of rows already in L1 (pass 2 measures each W row before and after its
// update) were compute-bound at a third of the memory stream's speed. The order is fixed by this
// code, not by the ISA: lanes j mod 32 in two accumulators, then the tail in order, then the lanes
// added in order. Every sum of squares of a W row (pass 1's, and pass 2's before/after) must use
// this same order: the speculation compares them bit for bit.
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));  // an unaligned load/store
constexpr idx kLanes = 16;

inline vf16 load16(const float* p) { return *(const vf16u*)p; }
inline void store16(float* p, vf16 v) { *(vf16u*)p = v; }
inline float lanes_sum(vf16 v) {
  float s = 0.0f;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

float sum_sq(const float* __restrict x, idx n) {
  vf16 a0 = {}, a1 = {};
  idx j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    const vf16 x0 = load16(x + j), x1 = load16(x + j + kLanes);
    a0 += x0 * x0;
    a1 += x1 * x1;
  }
  float tail = 0.0f;
  for (; j < n; ++j) tail += x[j] * x[j];
  return lanes_sum(a0 + a1) + tail;
}

}  // namespace
