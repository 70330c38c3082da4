// SIMD building blocks of the framework-free SAPA CPU kernels (no TensorFlow, no Eigen).
//
// The channel loops use 32-byte vectors (GCC/Clang vector extensions, lowered to AVX2/FMA
// when built with those flags, to SSE otherwise) with several accumulators held in
// registers. Rows are addressed through arrays of row pointers, so a K x K window is
// never copied: a caller lists the at most K*K in-map rows of a window and passes them.

#ifndef KERAS_SAPA_KERNELS_CPU_SIMD_H_
#define KERAS_SAPA_KERNELS_CPU_SIMD_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace keras_sapa {
namespace cpu {

// A 32-byte vector of T with unaligned loads and stores.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename T>
inline typename Simd<T>::V Load(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void Store(T* p, typename Simd<T>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline typename Simd<T>::V Broadcast(T x) {
  typename Simd<T>::V v;
  for (int l = 0; l < Simd<T>::kLanes; ++l) v[l] = x;
  return v;
}

template <typename T>
inline T HorizontalSum(typename Simd<T>::V v) {
  T s = 0;
  for (int l = 0; l < Simd<T>::kLanes; ++l) s += v[l];
  return s;
}

// sums[i] = horizontal sum of the i-th vector, i < 8 (a transpose-add tree for AVX floats).
template <typename T, typename V>
inline void HorizontalSum8(V a0, V a1, V a2, V a3, V a4, V a5, V a6, V a7, T* sums) {
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 t0 = _mm256_hadd_ps(a0, a1);
    const __m256 t1 = _mm256_hadd_ps(a2, a3);
    const __m256 t2 = _mm256_hadd_ps(a4, a5);
    const __m256 t3 = _mm256_hadd_ps(a6, a7);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // a0..a3 partial sums, low and high halves
    const __m256 u1 = _mm256_hadd_ps(t2, t3);  // a4..a7
    const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_storeu_ps(sums, _mm256_add_ps(lo, hi));
    return;
  }
#endif
  sums[0] = HorizontalSum<T>(a0);
  sums[1] = HorizontalSum<T>(a1);
  sums[2] = HorizontalSum<T>(a2);
  sums[3] = HorizontalSum<T>(a3);
  sums[4] = HorizontalSum<T>(a4);
  sums[5] = HorizontalSum<T>(a5);
  sums[6] = HorizontalSum<T>(a6);
  sums[7] = HorizontalSum<T>(a7);
}

// out[c] = sum_k w[k] * rows[k][c] for c_begin <= c < d. The channel axis is processed in blocks of
// four vectors whose accumulators stay in registers across the k loop.
template <typename T>
void WeightedRowSum(const T* __restrict w, const T* const* rows, int64_t m, int64_t c_begin,
                    int64_t d, T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  int64_t c = c_begin;
  for (; c + 4 * L <= d; c += 4 * L) {
    V a0 = Broadcast<T>(0), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < m; ++k) {
      const V wk = Broadcast<T>(w[k]);
      const T* r = rows[k] + c;
      a0 += wk * Load(r);
      a1 += wk * Load(r + L);
      a2 += wk * Load(r + 2 * L);
      a3 += wk * Load(r + 3 * L);
    }
    Store(out + c, a0);
    Store(out + c + L, a1);
    Store(out + c + 2 * L, a2);
    Store(out + c + 3 * L, a3);
  }
  for (; c + L <= d; c += L) {
    V a0 = Broadcast<T>(0);
    for (int64_t k = 0; k < m; ++k) a0 += Broadcast<T>(w[k]) * Load(rows[k] + c);
    Store(out + c, a0);
  }
  for (; c < d; ++c) {
    T a = 0;
    for (int64_t k = 0; k < m; ++k) a += w[k] * rows[k][c];
    out[c] = a;
  }
}

// Register-blocked kernels over G high-resolution points that share one window (the s x s
// children of an anchor): every row loaded from the window feeds G accumulators.

// outs[g][c] += ... : outs[g][c0 : c0 + NV*L] = sum_k w[k*G + g] * rows[k][c0 : ...].
template <typename T, int G, int NV>
inline void GatherBlock(const T* __restrict w, const T* const* rows, int64_t m, int64_t c0,
                        T* const* outs) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc[G][NV];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[g][v] = Broadcast<T>(0);
  for (int64_t k = 0; k < m; ++k) {
    const T* r = rows[k] + c0;
    V rv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) rv[v] = Load(r + v * L);
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      const V wg = Broadcast<T>(w[k * G + g]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[g][v] += wg * rv[v];
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) Store(outs[g] + c0 + v * L, acc[g][v]);
}

// outs[g][c] = sum_k w[k*G + g] * rows[k][c] for g < G, c < d.
template <typename T, int G>
void MultiWeightedRowSum(const T* __restrict w, const T* const* rows, int64_t m, int64_t d,
                         T* const* outs) {
  constexpr int L = Simd<T>::kLanes;
  constexpr int NV = G >= 3 ? 2 : 4;
  int64_t c = 0;
  for (; c + NV * L <= d; c += NV * L) GatherBlock<T, G, NV>(w, rows, m, c, outs);
  for (; c + L <= d; c += L) GatherBlock<T, G, 1>(w, rows, m, c, outs);
  for (; c < d; ++c) {
    for (int g = 0; g < G; ++g) {
      T a = 0;
      for (int64_t k = 0; k < m; ++k) a += w[k * G + g] * rows[k][c];
      outs[g][c] = a;
    }
  }
}

// out[g * m + k] = <xs[g], rows[k]> for g < G, k < m, vectors of length d.
template <typename T, int G>
void MultiDotRows(const T* const* xs, const T* const* rows, int64_t m, int64_t d,
                  T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  constexpr int R = G >= 3 ? 2 : 4;
  const int64_t dv = d - d % L;
  int64_t k = 0;
  auto block = [&](auto rcount) {
    constexpr int RC = decltype(rcount)::value;
    V acc[G][RC];
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
      for (int r = 0; r < RC; ++r) acc[g][r] = Broadcast<T>(0);
    for (int64_t c = 0; c < dv; c += L) {
      V rv[RC];
#pragma GCC unroll 16
      for (int r = 0; r < RC; ++r) rv[r] = Load(rows[k + r] + c);
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const V xv = Load(xs[g] + c);
#pragma GCC unroll 16
        for (int r = 0; r < RC; ++r) acc[g][r] += xv * rv[r];
      }
    }
    T sums[G * RC];
    if constexpr (G * RC == 8) {
      HorizontalSum8<T>(acc[0 / RC][0 % RC], acc[1 / RC][1 % RC], acc[2 / RC][2 % RC], acc[3 / RC][3 % RC], acc[4 / RC][4 % RC], acc[5 / RC][5 % RC], acc[6 / RC][6 % RC], acc[7 / RC][7 % RC], sums);
    } else {
      for (int g = 0; g < G; ++g)
        for (int r = 0; r < RC; ++r) sums[g * RC + r] = HorizontalSum<T>(acc[g][r]);
    }
    for (int g = 0; g < G; ++g) {
      for (int r = 0; r < RC; ++r) {
        T t = sums[g * RC + r];
        for (int64_t c = dv; c < d; ++c) t += xs[g][c] * rows[k + r][c];
        out[g * m + k + r] = t;
      }
    }
  };
  for (; k + R <= m; k += R) block(std::integral_constant<int, R>());
  for (; k < m; ++k) block(std::integral_constant<int, 1>());
}

// Runs fn<G>(first) over `count` items in groups of 4, then 2, then 1.
template <typename Fn>
inline void ForGroups(int64_t count, Fn fn) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) fn(std::integral_constant<int, 4>(), i);
  for (; i + 2 <= count; i += 2) fn(std::integral_constant<int, 2>(), i);
  for (; i < count; ++i) fn(std::integral_constant<int, 1>(), i);
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SIMD_H_
