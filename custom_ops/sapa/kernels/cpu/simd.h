// SIMD building blocks of the framework-free SAPA CPU kernels (no TensorFlow, no Eigen).
//
// The channel loops use 32-byte vectors (GCC/Clang vector extensions, lowered to AVX2/FMA
// when built with those flags, to SSE otherwise) with several accumulators held in
// registers. Rows are addressed through arrays of row pointers, so a K x K window is
// never copied: a caller lists the at most K*K in-map rows of a window and passes them.

#ifndef KERAS_SAPA_KERNELS_CPU_SIMD_H_
#define KERAS_SAPA_KERNELS_CPU_SIMD_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__F16C__)
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

// Under AVX the intrinsic: from memory it is one vbroadcastss/sd load, where the lane loop
// compiled to a 128-bit broadcast plus a vinsertf128 on a vector pipe that the FMAs need.
template <typename T>
inline typename Simd<T>::V Broadcast(T x) {
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    return _mm256_set1_ps(x);
  } else if constexpr (std::is_same<T, double>::value) {
    return _mm256_set1_pd(x);
  }
#endif
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

// sums[i] = horizontal sum of the i-th vector, i < 4 (for AVX floats: three hadds and one
// 128-bit add, where four HorizontalSum calls take a lane loop each).
template <typename T, typename V>
inline void HorizontalSum4(V a0, V a1, V a2, V a3, T* sums) {
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    return;
  }
#endif
  const V v[4] = {a0, a1, a2, a3};
  for (int i = 0; i < 4; ++i) sums[i] = HorizontalSum<T>(v[i]);
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
  HorizontalSum4<T>(a0, a1, a2, a3, sums);
  HorizontalSum4<T>(a4, a5, a6, a7, sums + 4);
}

// sums[i] = horizontal sum of v[i] for i < n: eight at a time, then four, then one.
template <typename T, typename V>
inline void HorizontalSums(const V* v, int n, T* sums) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    HorizontalSum8<T>(v[i], v[i + 1], v[i + 2], v[i + 3], v[i + 4], v[i + 5], v[i + 6],
                      v[i + 7], sums + i);
  for (; i + 4 <= n; i += 4) HorizontalSum4<T>(v[i], v[i + 1], v[i + 2], v[i + 3], sums + i);
  for (; i < n; ++i) sums[i] = HorizontalSum<T>(v[i]);
}

// exp of 8 floats (Cephes' expf polynomial, within 2 ulp of std::exp for x in [-87, 88];
// inputs are clamped to that range: below it the result is exp(-87) ~ 1.6e-38 instead
// of a smaller number, which no softmax can tell apart).
inline Simd<float>::V ExpV(Simd<float>::V x) {
  typedef int32_t VI __attribute__((vector_size(32)));
  using V = Simd<float>::V;
  x = x < Broadcast<float>(-87.0f) ? Broadcast<float>(-87.0f) : x;
  x = x > Broadcast<float>(88.0f) ? Broadcast<float>(88.0f) : x;
  const V magic = Broadcast<float>(12582912.0f);  // 1.5 * 2^23: rounds to nearest
  const V n = (x * Broadcast<float>(1.44269504088896341f) + magic) - magic;
  const V r = (x - n * Broadcast<float>(0.693359375f)) - n * Broadcast<float>(-2.12194440e-4f);
  V p = Broadcast<float>(1.9875691500e-4f);
  p = p * r + Broadcast<float>(1.3981999507e-3f);
  p = p * r + Broadcast<float>(8.3334519073e-3f);
  p = p * r + Broadcast<float>(4.1665795894e-2f);
  p = p * r + Broadcast<float>(1.6666665459e-1f);
  p = p * r + Broadcast<float>(5.0000001201e-1f);
  p = p * (r * r) + r + Broadcast<float>(1.0f);
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// out[i] = exp(x[i] - shift) for i < n: vectorised for float, std::exp for double.
template <typename T>
inline void ExpShifted(const T* x, int64_t n, T shift, T* out) {
  if constexpr (std::is_same<T, float>::value) {
    constexpr int L = Simd<float>::kLanes;
    const auto sv = Broadcast<float>(shift);
    int64_t i = 0;
    for (; i + L <= n; i += L) Store(out + i, ExpV(Load(x + i) - sv));
    if (i < n) {
      float tmp[L] = {0};
      for (int64_t j = i; j < n; ++j) tmp[j - i] = x[j];
      const auto e = ExpV(Load(tmp) - sv);
      float res[L];
      Store(res, e);
      for (int64_t j = i; j < n; ++j) out[j] = res[j - i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i] - shift);
  }
}

// max(init, x[0], ..., x[n - 1]) (vector compares for float under AVX2, the tail of fewer
// than 8 values masked in as init; exact, so the same in any order).
template <typename T>
inline T MaxOf(const T* x, int64_t n, T init) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    constexpr int L = Simd<float>::kLanes;
    const __m256 iv = _mm256_set1_ps(init);
    __m256 mv = iv;
    int64_t i = 0;
    for (; i + L <= n; i += L) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
    if (i < n) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - i)), lane);
      const __m256 t = _mm256_blendv_ps(iv, _mm256_maskload_ps(x + i, mask),
                                        _mm256_castsi256_ps(mask));
      mv = _mm256_max_ps(mv, t);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
#endif
  T mx = init;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// out[i] = exp(x[i] - shift) for i < n; returns the sum of out[0 : n]. For float under AVX2
// the tail of fewer than 8 values goes through masked loads and stores (no scalar round
// trip through the stack, which stalls store-to-load forwarding); std::exp for double.
template <typename T>
inline T ExpShiftedSum(const T* x, int64_t n, T shift, T* out) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    constexpr int L = Simd<float>::kLanes;
    const auto sv = Broadcast<float>(shift);
    auto acc = Broadcast<float>(0.f);
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      const auto e = ExpV(Load(x + i) - sv);
      Store(out + i, e);
      acc += e;
    }
    if (i < n) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - i)), lane);
      const Simd<float>::V xv = _mm256_maskload_ps(x + i, mask);
      Simd<float>::V e = ExpV(xv - sv);
      e = (Simd<float>::V)_mm256_and_ps(e, _mm256_castsi256_ps(mask));
      _mm256_maskstore_ps(out + i, mask, e);
      acc += e;
    }
    return HorizontalSum<float>(acc);
  }
#endif
  if constexpr (std::is_same<T, float>::value) {
    ExpShifted<T>(x, n, shift, out);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = std::exp(x[i] - shift);
  }
  T total = 0;
  for (int64_t i = 0; i < n; ++i) total += out[i];
  return total;
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

// outs[g][c0 : c0 + NV*L] = sum_k w[k*G + g] * rows[k][c0 + shift : c0 + shift + NV*L].
template <typename T, int G, int NV>
inline void GatherBlock(const T* __restrict w, const T* const* rows, int64_t m, int64_t c0,
                        T* const* outs, int64_t shift = 0) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V acc[G][NV];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[g][v] = Broadcast<T>(0);
  for (int64_t k = 0; k < m; ++k) {
    const T* r = rows[k] + c0 + shift;
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

// outs[g][c] = sum_k w[k*G + g] * rows[k][c + shift] for g < G, c_begin <= c < c_end.
template <typename T, int G>
void MultiWeightedRowSumRange(const T* __restrict w, const T* const* rows, int64_t m,
                              int64_t c_begin, int64_t c_end, T* const* outs,
                              int64_t shift = 0) {
  constexpr int L = Simd<T>::kLanes;
  // 12 accumulators for G = 4 (and 8 for G <= 2): two FMA pipes of latency 4 need 8
  // independent chains, and the spare ones absorb the load latencies.
  constexpr int NV = G >= 3 ? 3 : 4;
  int64_t c = c_begin;
  for (; c + NV * L <= c_end; c += NV * L) GatherBlock<T, G, NV>(w, rows, m, c, outs, shift);
  if (NV > 2 && c + 2 * L <= c_end) {
    GatherBlock<T, G, 2>(w, rows, m, c, outs, shift);
    c += 2 * L;
  }
  for (; c + L <= c_end; c += L) GatherBlock<T, G, 1>(w, rows, m, c, outs, shift);
  for (; c < c_end; ++c) {
    for (int g = 0; g < G; ++g) {
      T a = 0;
      for (int64_t k = 0; k < m; ++k) a += w[k * G + g] * rows[k][c + shift];
      outs[g][c] = a;
    }
  }
}

// outs[g][c] = sum_k w[k*G + g] * rows[k][c] for g < G, c < d.
template <typename T, int G>
void MultiWeightedRowSum(const T* __restrict w, const T* const* rows, int64_t m, int64_t d,
                         T* const* outs) {
  MultiWeightedRowSumRange<T, G>(w, rows, m, 0, d, outs);
}

// out[g * m + k] = <xs[g], rows[k]> for g < G, k < m, vectors of length d.
template <typename T, int G>
void MultiDotRows(const T* const* xs, const T* const* rows, int64_t m, int64_t d,
                  T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  // G * R = 12 chains for G = 4 (8 would just cover the FMA latency of two pipes).
  constexpr int R = G >= 3 ? 3 : 4;
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
    HorizontalSums<T>(&acc[0][0], G * RC, sums);
    for (int g = 0; g < G; ++g) {
      for (int r = 0; r < RC; ++r) {
        T t = sums[g * RC + r];
        for (int64_t c = dv; c < d; ++c) t += xs[g][c] * rows[k + r][c];
        out[g * m + k + r] = t;
      }
    }
  };
  for (; k + R <= m; k += R) block(std::integral_constant<int, R>());
  if (R > 2 && k + 2 <= m) {
    block(std::integral_constant<int, 2>());
    k += 2;
  }
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

// ---- Half-precision storage ------------------------------------------------------------
//
// The kernels read and write fp16 / bf16 tensors (IEEE binary16 and bfloat16, 16-bit
// storage: Eigen::half, Eigen::bfloat16, jnp and torch half types all have this layout)
// and compute in float: rows are converted as a tile packs or reads them, and results
// rounded (to nearest even) as a tile writes them; no whole-tensor copy exists. With F16C
// (-mf16c, every AVX2 CPU has it) binary16 uses the vcvtph2ps / vcvtps2ph instructions,
// without it the bit manipulations below; bfloat16 is always a shift.

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// The compute type of a storage type: float for the half types, else the type itself.
template <typename In>
struct ComputeOf {
  typedef In type;
};
template <>
struct ComputeOf<Half> {
  typedef float type;
};
template <>
struct ComputeOf<BFloat16> {
  typedef float type;
};

inline float FloatFromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t BitsFromFloat(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// binary16 -> float, exact (subnormals, infinities and NaN included).
inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu,
                 mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return FloatFromBits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return FloatFromBits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2^-24, exact in float
  const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
#endif
}

// float -> binary16, rounded to nearest even; overflow to infinity, NaN stays NaN.
inline uint16_t FloatToHalf(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  const uint32_t u = BitsFromFloat(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 2^16: infinity
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), rounded by the FPU
    // adding 0.5 shifts the value's bits so that the float's own rounding (to nearest
    // even) rounds at the half's last subnormal bit, 2^-24.
    const float shifted = FloatFromBits(a) + 0.5f;
    return uint16_t(sign | (BitsFromFloat(shifted) - 0x3f000000u));
  }
  const uint32_t odd = (a >> 13) & 1u;  // round half to even
  return uint16_t(sign | ((a - 0x38000000u + 0xfffu + odd) >> 13));
#endif
}

inline float BFloat16ToFloat(uint16_t b) { return FloatFromBits(uint32_t(b) << 16); }

inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = BitsFromFloat(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
inline T ToCompute(T x) {
  return x;
}
inline float ToCompute(Half x) { return HalfToFloat(x.bits); }
inline float ToCompute(BFloat16 x) { return BFloat16ToFloat(x.bits); }

template <typename In>
inline In FromCompute(typename ComputeOf<In>::type x) {
  if constexpr (std::is_same<In, Half>::value) {
    return Half{FloatToHalf(x)};
  } else if constexpr (std::is_same<In, BFloat16>::value) {
    return BFloat16{FloatToBFloat16(x)};
  } else {
    return x;
  }
}

// dst[0 : n] = src[0 : n] converted to T (the compute type of In).
template <typename T, typename In>
inline void ConvertRow(const In* src, int64_t n, T* dst) {
  if constexpr (std::is_same<T, In>::value) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    static_assert(std::is_same<T, float>::value, "half types compute in float");
    int64_t i = 0;
    if constexpr (std::is_same<In, BFloat16>::value) {
      typedef uint16_t VH __attribute__((vector_size(16)));
      typedef uint32_t VU __attribute__((vector_size(32)));
      for (; i + 8 <= n; i += 8) {
        VH h;
        std::memcpy(&h, src + i, sizeof(h));
        const VU u = __builtin_convertvector(h, VU) << 16;
        std::memcpy(dst + i, &u, sizeof(u));
      }
    }
#if defined(__F16C__)
    if constexpr (std::is_same<In, Half>::value) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
    }
#endif
    for (; i < n; ++i) dst[i] = ToCompute(src[i]);
  }
}

// dst[0 : n] = src[0 : n] rounded to In (to nearest even).
template <typename In, typename T>
inline void RoundRow(const T* src, int64_t n, In* dst) {
  if constexpr (std::is_same<T, In>::value) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    int64_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same<In, Half>::value) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
      }
    }
#endif
    for (; i < n; ++i) dst[i] = FromCompute<In>(src[i]);
  }
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SIMD_H_
