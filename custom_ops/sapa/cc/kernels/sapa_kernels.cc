// CPU kernels of the keras_sapa ops, and their registration for DEVICE_CPU.
//
// Work is split over TensorFlow's intra-op thread pool (ParallelFor with a cost
// estimate). WindowDot and WindowGather take one low-resolution anchor per work unit
// (its s x s children share the same K x K window rows, which stay in L1); WindowScatter
// takes one low-resolution point per unit and gathers over every output point whose
// window contains it. No K*K window tensor is ever formed: a unit keeps a list of at
// most K*K (or K*K*s*s) row pointers. The channel loops use 32-byte vectors (GCC/Clang
// vector extensions, lowered to AVX2/FMA when built with those flags, to SSE otherwise)
// with several accumulators held in registers.
//
// float and double compute in their own type; half and bfloat16 are converted to float,
// computed in float, and the result is rounded once.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sapa_kernels.h"
#include "sapa_op_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/threadpool.h"
#include "unsupported/Eigen/CXX11/Tensor"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace keras_sapa {

using CPUDevice = Eigen::ThreadPoolDevice;

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

// out[k] = <x, rows[k]> for k < m, vectors of length d.
template <typename T>
void DotRows(const T* __restrict x, const T* const* rows, int64_t m, int64_t d,
             T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const int64_t dv = d - d % L;
  int64_t k = 0;
  for (; k + 4 <= m; k += 4) {
    const T* r0 = rows[k];
    const T* r1 = rows[k + 1];
    const T* r2 = rows[k + 2];
    const T* r3 = rows[k + 3];
    V s0 = Broadcast<T>(0), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t c = 0; c < dv; c += L) {
      const V xv = Load(x + c);
      s0 += xv * Load(r0 + c);
      s1 += xv * Load(r1 + c);
      s2 += xv * Load(r2 + c);
      s3 += xv * Load(r3 + c);
    }
    T t0 = HorizontalSum<T>(s0), t1 = HorizontalSum<T>(s1);
    T t2 = HorizontalSum<T>(s2), t3 = HorizontalSum<T>(s3);
    for (int64_t c = dv; c < d; ++c) {
      t0 += x[c] * r0[c];
      t1 += x[c] * r1[c];
      t2 += x[c] * r2[c];
      t3 += x[c] * r3[c];
    }
    out[k] = t0;
    out[k + 1] = t1;
    out[k + 2] = t2;
    out[k + 3] = t3;
  }
  for (; k < m; ++k) {
    const T* r0 = rows[k];
    V s0 = Broadcast<T>(0);
    for (int64_t c = 0; c < dv; c += L) s0 += Load(x + c) * Load(r0 + c);
    T t0 = HorizontalSum<T>(s0);
    for (int64_t c = dv; c < d; ++c) t0 += x[c] * r0[c];
    out[k] = t0;
  }
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

// Runs fn(begin, end) over [0, units) on the intra-op pool; cost in rough cycles per unit.
inline void ParallelFor(OpKernelContext* ctx, int64_t units, int64_t cost_per_unit,
                        const std::function<void(int64_t, int64_t)>& fn) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  workers->ParallelFor(units, std::max<int64_t>(cost_per_unit, 1), fn);
}

// Collects the window rows of the anchor (b, h, w) that lie inside the map:
// index[k] is the window position n of rows[k].
template <typename T>
inline int64_t WindowRows(const WindowDims& d, const T* lo, int64_t b, int64_t h, int64_t w,
                          const T** rows, int64_t* index) {
  const int64_t r = d.radius();
  int64_t m = 0;
  for (int64_t a = -r; a <= r; ++a) {
    const int64_t p = h + a;
    if (p < 0 || p >= d.height) continue;
    for (int64_t c = -r; c <= r; ++c) {
      const int64_t q = w + c;
      if (q < 0 || q >= d.width) continue;
      rows[m] = lo + ((b * d.height + p) * d.width + q) * d.channels;
      index[m] = (a + r) * d.kernel + (c + r);
      ++m;
    }
  }
  return m;
}

// Runs fn(rows, index, m, points, scratch) for every low-resolution anchor (b, h, w), on
// the pool: rows[k] / index[k] (k < m) are its in-map window rows and their window
// positions (WindowRows), points the flat indices of its s x s high-resolution children,
// scratch room for 4 * K * K values of T.
template <typename T, typename Fn>
void ForEachAnchor(OpKernelContext* ctx, const WindowDims& d, const T* lo, Fn fn) {
  const int64_t s = d.up, kk = d.window(), hh = d.high_height(), hw = d.high_width();
  const int64_t cost = s * s * kk * (d.channels + 4);
  ParallelFor(ctx, d.low_points(), cost, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(kk);
    std::vector<int64_t> index(kk);
    std::vector<T> scratch(4 * kk);
    std::vector<int64_t> points(s * s);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t w = u % d.width;
      const int64_t h = (u / d.width) % d.height;
      const int64_t b = u / (d.width * d.height);
      const int64_t m = WindowRows(d, lo, b, h, w, rows.data(), index.data());
      for (int64_t ci = 0; ci < s; ++ci)
        for (int64_t cj = 0; cj < s; ++cj)
          points[ci * s + cj] = (b * hh + h * s + ci) * hw + w * s + cj;
      fn(rows.data(), index.data(), m, points.data(), scratch.data());
    }
  });
}

template <typename T>
void Dot(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo, T* out) {
  const int64_t s = d.up, kk = d.window();
  ForEachAnchor<T>(ctx, d, lo, [&](const T* const* rows, const int64_t* index, int64_t m,
                                   const int64_t* points, T* dots) {
    ForGroups(s * s, [&](auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      const T* xs[G];
      for (int g = 0; g < G; ++g) xs[g] = hi + points[first + g] * d.channels;
      MultiDotRows<T, G>(xs, rows, m, d.channels, dots);
      for (int g = 0; g < G; ++g) {
        T* o = out + points[first + g] * kk;
        if (m < kk) std::fill(o, o + kk, T(0));
        for (int64_t k = 0; k < m; ++k) o[index[k]] = dots[g * m + k];
      }
    });
  });
}

template <typename T>
void Gather(OpKernelContext* ctx, const WindowDims& d, const T* wt, const T* lo, T* out) {
  const int64_t s = d.up, kk = d.window();
  ForEachAnchor<T>(ctx, d, lo, [&](const T* const* rows, const int64_t* index, int64_t m,
                                   const int64_t* points, T* weights) {
    ForGroups(s * s, [&](auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      T* outs[G];
      for (int g = 0; g < G; ++g) {
        const T* wp = wt + points[first + g] * kk;
        for (int64_t k = 0; k < m; ++k) weights[k * G + g] = wp[index[k]];
        outs[g] = out + points[first + g] * d.channels;
      }
      MultiWeightedRowSum<T, G>(weights, rows, m, d.channels, outs);
    });
  });
}

template <typename T>
void Scatter(OpKernelContext* ctx, const WindowDims& d, const T* wt, const T* hi, T* out) {
  const int64_t s = d.up, kk = d.window(), hh = d.high_height(), hw = d.high_width();
  const int64_t r = d.radius();
  // A unit is a tile of `tile` consecutive low-resolution points of one row; units run
  // down the rows of a column tile, so the high-resolution rows they read (K anchor rows
  // of s x s children, (tile + 2r) * s columns) stay in L2 from one unit to the next.
  const int64_t row_bytes = std::max<int64_t>(1, d.channels * int64_t(sizeof(T)));
  const int64_t budget = int64_t(256) << 10;
  const int64_t tile = std::max<int64_t>(
      1, std::min<int64_t>(d.width, budget / (d.kernel * s * s * row_bytes) - 2 * r));
  const int64_t tiles = (d.width + tile - 1) / tile;
  const int64_t units = d.batch * tiles * d.height;
  const int64_t cost = tile * s * s * kk * (d.channels + 6);
  // Whole rows per point: with C*sizeof(T) a multiple of 4 KiB / rows, channel blocks
  // across many rows alias to few L1 sets, which measured slower.
  const int64_t block = std::max<int64_t>(d.channels, 1);
  ParallelFor(ctx, units, cost, [&](int64_t begin, int64_t end) {
    const int64_t max_m = kk * s * s;
    std::vector<const T*> rows_all(tile * max_m);
    std::vector<T> weights_all(tile * max_m);
    std::vector<int64_t> counts(tile);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u % d.height;
      const int64_t t = (u / d.height) % tiles;
      const int64_t b = u / (d.height * tiles);
      const int64_t q_end = std::min(d.width, (t + 1) * tile);
      for (int64_t q = t * tile; q < q_end; ++q) {
        const T** rows = rows_all.data() + (q - t * tile) * max_m;
        T* weights = weights_all.data() + (q - t * tile) * max_m;
        int64_t m = 0;
        // (p, q) is the window point n = (a+r)*K + (c+r) of the anchor (p - a, q - c).
        for (int64_t a = -r; a <= r; ++a) {
          const int64_t h = p - a;
          if (h < 0 || h >= d.height) continue;
          for (int64_t c = -r; c <= r; ++c) {
            const int64_t w = q - c;
            if (w < 0 || w >= d.width) continue;
            const int64_t n = (a + r) * d.kernel + (c + r);
            for (int64_t ci = 0; ci < s; ++ci) {
              const int64_t row_start = (b * hh + h * s + ci) * hw + w * s;
              for (int64_t cj = 0; cj < s; ++cj) {
                const int64_t point = row_start + cj;
                weights[m] = wt[point * kk + n];
                rows[m] = hi + point * d.channels;
                ++m;
              }
            }
          }
        }
        counts[q - t * tile] = m;
      }
      for (int64_t c0 = 0; c0 < d.channels; c0 += block) {
        const int64_t c1 = std::min(d.channels, c0 + block);
        for (int64_t q = t * tile; q < q_end; ++q) {
          const int64_t i = q - t * tile;
          T* o = out + ((b * d.height + p) * d.width + q) * d.channels;
          WeightedRowSum(weights_all.data() + i * max_m, rows_all.data() + i * max_m,
                         counts[i], c0, c1, o);
        }
      }
    }
  });
}

// float and double compute directly; half and bfloat16 through float copies.
template <typename T>
struct Compute {
  static constexpr bool kNative = std::is_same<T, float>::value || std::is_same<T, double>::value;
};

// Converts `n` elements of `src` to float in a temporary tensor (on the pool).
template <typename T>
Status ToFloat(OpKernelContext* ctx, const T* src, int64_t n, Tensor* tmp) {
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({n}), tmp));
  if (n > 0) {
    const auto& device = ctx->eigen_device<CPUDevice>();
    Eigen::TensorMap<Eigen::Tensor<const T, 1, Eigen::RowMajor>> in(src, n);
    tmp->flat<float>().device(device) = in.template cast<float>();
  }
  return absl::OkStatus();
}

template <typename T>
void FromFloat(OpKernelContext* ctx, const Tensor& tmp, int64_t n, T* dst) {
  if (n == 0) return;
  const auto& device = ctx->eigen_device<CPUDevice>();
  Eigen::TensorMap<Eigen::Tensor<T, 1, Eigen::RowMajor>> out(dst, n);
  out.device(device) = tmp.flat<float>().template cast<T>();
}

// Calls fn(float_a, float_b, float_out) on float copies of a (na elements), b (nb) and
// a float output of nout elements, then rounds the output into out.
template <typename T, typename Fn>
Status ViaFloat(OpKernelContext* ctx, const T* a, int64_t na, const T* b, int64_t nb, T* out,
                int64_t nout, Fn fn) {
  Tensor fa, fb, fout;
  TF_RETURN_IF_ERROR(ToFloat(ctx, a, na, &fa));
  TF_RETURN_IF_ERROR(ToFloat(ctx, b, nb, &fb));
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({nout}), &fout));
  fn(fa.flat<float>().data(), fb.flat<float>().data(), fout.flat<float>().data());
  FromFloat(ctx, fout, nout, out);
  return absl::OkStatus();
}

}  // namespace cpu

namespace functor {

template <typename T>
struct WindowDot<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* hi, const T* lo,
                    T* out) const {
    if constexpr (cpu::Compute<T>::kNative) {
      cpu::Dot<T>(ctx, d, hi, lo, out);
      return absl::OkStatus();
    } else {
      return cpu::ViaFloat<T>(ctx, hi, d.high_points() * d.channels, lo,
                              d.low_points() * d.channels, out, d.high_points() * d.window(),
                              [&](const float* fh, const float* fl, float* fo) {
                                cpu::Dot<float>(ctx, d, fh, fl, fo);
                              });
    }
  }
};

template <typename T>
struct WindowGather<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* lo,
                    T* out) const {
    if constexpr (cpu::Compute<T>::kNative) {
      cpu::Gather<T>(ctx, d, w, lo, out);
      return absl::OkStatus();
    } else {
      return cpu::ViaFloat<T>(ctx, w, d.high_points() * d.window(), lo,
                              d.low_points() * d.channels, out, d.high_points() * d.channels,
                              [&](const float* fw, const float* fl, float* fo) {
                                cpu::Gather<float>(ctx, d, fw, fl, fo);
                              });
    }
  }
};

template <typename T>
struct WindowScatter<CPUDevice, T> {
  Status operator()(OpKernelContext* ctx, const WindowDims& d, const T* w, const T* hi,
                    T* out) const {
    if constexpr (cpu::Compute<T>::kNative) {
      cpu::Scatter<T>(ctx, d, w, hi, out);
      return absl::OkStatus();
    } else {
      return cpu::ViaFloat<T>(ctx, w, d.high_points() * d.window(), hi,
                              d.high_points() * d.channels, out, d.low_points() * d.channels,
                              [&](const float* fw, const float* fh, float* fo) {
                                cpu::Scatter<float>(ctx, d, fw, fh, fo);
                              });
    }
  }
};

}  // namespace functor

#define KERAS_SAPA_REGISTER_CPU(T) KERAS_SAPA_REGISTER_KERNELS(tensorflow::DEVICE_CPU, CPUDevice, T)
KERAS_SAPA_REGISTER_CPU(float);
KERAS_SAPA_REGISTER_CPU(double);
KERAS_SAPA_REGISTER_CPU(Eigen::half);
KERAS_SAPA_REGISTER_CPU(Eigen::bfloat16);
#undef KERAS_SAPA_REGISTER_CPU

}  // namespace keras_sapa
