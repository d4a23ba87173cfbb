// Device helpers shared by fastdg's CUDA kernels: aligned vector access, Welford/Chan
// moment merges and fixed-order warp reductions. Every reduction here combines values in an
// order fixed by lane and index only (shfl_down trees, no atomics), so a kernel built on them
// returns the same bits for the same inputs and launch shape.
#pragma once

#include <cstdint>

namespace fastdg {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Widest global access a thread issues (LDG.128 / STG.128).
constexpr int kVecBytes = 16;

// V consecutive elements moved by one access; V * sizeof(T) must divide kVecBytes.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// p must be aligned to sizeof(T) * V (callers check the base pointers on the host).
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Chan et al.'s merge of the moments (nb, mean_b, m2_b) into (na, mean_a, m2_a), where m2 is
// the sum of squared deviations from the mean. Exact in exact arithmetic, and it never forms
// E[x^2] - E[x]^2, so no cancellation. Either side may be empty.
template <typename T>
__device__ __forceinline__ void welford_merge(int& na, T& mean_a, T& m2_a, int nb, T mean_b, T m2_b) {
  if (nb == 0) return;
  if (na == 0) {
    na = nb;
    mean_a = mean_b;
    m2_a = m2_b;
    return;
  }
  const int n = na + nb;
  const T wb = static_cast<T>(nb) / static_cast<T>(n);
  const T delta = mean_b - mean_a;
  mean_a += delta * wb;
  m2_a += m2_b + delta * delta * static_cast<T>(na) * wb;
  na = n;
}

// Welford's update with one value.
template <typename T>
__device__ __forceinline__ void welford_push(int& n, T& mean, T& m2, T x) {
  ++n;
  const T delta = x - mean;
  mean += delta / static_cast<T>(n);
  m2 += delta * (x - mean);
}

// Merge the moments of V values (held in registers) into a running state: their own mean and
// M2 in two sweeps over the registers, then one Chan merge (one division per V values).
template <int V, typename T>
__device__ __forceinline__ void welford_push_vec(int& n, T& mean, T& m2, const T (&x)[V]) {
  T s = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) s += x[k];
  const T mb = s * (T(1) / T(V));  // V is a power of two: exact
  T q = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const T d = x[k] - mb;
    q += d * d;
  }
  welford_merge(n, mean, m2, V, mb, q);
}

// Lane 0 ends with the merge of the warp's 32 states, combined in a fixed tree order
// (lane i takes lane i + o). Other lanes hold partial results. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ void welford_warp_reduce(int& n, T& mean, T& m2) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const int nb = __shfl_down_sync(kFullMask, n, o);
    const T mb = __shfl_down_sync(kFullMask, mean, o);
    const T qb = __shfl_down_sync(kFullMask, m2, o);
    welford_merge(n, mean, m2, nb, mb, qb);
  }
}

// Lane 0 ends with the warp's sum, in the same fixed tree order. All 32 lanes must call it.
template <typename T>
__device__ __forceinline__ T warp_sum_down(T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  return v;
}

}  // namespace cuda
}  // namespace fastdg
