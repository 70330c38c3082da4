// CUDA kernels of SAPA-D (shared/SAPA_SPEC.md, section "SAPA-D"), with no framework in
// them: raw pointers, channels-last dense tensors, sizes in a plain struct. Same
// semantics as the CPU core (kernels/cpu/sapa_deform_cpu.h), same build (NVRTC) and
// launch path (driver API) as the SAPA kernels, whose type helpers (Acc, to_acc, from_acc,
// acc_exp) they reuse.
//
// Tensors (contiguous, channels last), D = G*E, GP = G*P:
//   query (B, sH, sW, D)  key (B, H, W, D)  value (B, H, W, C)  out, grad (B, sH, sW, C)
//   offsets (B, sH, sW, 2*GP): channel 2k the shift along the width, 2k+1 along the height
//   of the point k = g*P + p; logits, weights (B, sH, sW, GP).
// Point k of output point (i, j) samples at (i/s + off[2k+1], j/s + off[2k]) bilinearly
// (taps of the cell of floor, zero outside the map); a point outside (-1, H) x (-1, W),
// or NaN, is dropped: sample 0, every gradient 0.
//
// Design: a block takes `tile` consecutive output points at a time (grid-stride over
// tiles) and runs phases separated by __syncthreads(), the threads of each phase striding
// over its items: (1) one item per (point, k): its cell and fractions into shared memory,
// and the dot products over the group's channels that need the four taps (logits, or in
// the backward the weights' gradient and the offsets' derivatives); (2) one item per
// (point, group): softmax, or its backward and the offsets' gradients; (3) one item per
// (point, channel), consecutive threads on consecutive channels (coalesced): the
// aggregation, or the query gradient. No P x 4 copies of key or value exist anywhere.
// The key/value gradients are a scatter (any point may sample any cell): one item per
// (point, channel) adds its taps' contributions with atomicAdd into an accumulation-type
// buffer (the output itself for f32/f64; a float workspace, converted by the cast kernel,
// for f16/bf16): unlike the CPU core, their summation order is not fixed.
// Control flow around __syncthreads() is uniform (every thread runs every tile), so the
// kernels also run under the test emulation, one std::thread per CUDA thread.
// float, half and bfloat16 accumulate in float, double in double; indices are 64-bit.

#ifndef KERAS_SAPA_CUDA_SAPA_DEFORM_KERNELS_CUH_
#define KERAS_SAPA_CUDA_SAPA_DEFORM_KERNELS_CUH_

#include "sapa_kernels.cuh"

namespace sapa {
namespace deform {

// Sizes of one launch; all fields 64-bit (no padding). Keep in sync with the launcher.
struct DeformArgs {
  i64 batch, height, width;  // low resolution
  i64 up, points, groups;    // s, P, G
  i64 dim, channels;         // D = G*E (query, key), C (value)
  i64 tile;                  // output points per block and step (the shared memory holds
                             // tile * G*P * (kSharedAcc accumulators + 2 ints))
  i64 count;                 // scatter: channels of its tensor (D or C); zero/cast: elements
};

// Accumulation-type values per (point, k) in shared memory, and ints (h0, w0).
enum { kSharedAcc = 7, kSharedInt = 2 };

// Shared memory a launch needs, in bytes (A: float, or double for f64).
__host__ __device__ inline i64 deform_shared_bytes(i64 tile, i64 gp, i64 acc_size) {
  return tile * gp * (kSharedAcc * acc_size + kSharedInt * 4);
}

#define DEFORM_LOOP(e, n) for (i64 e = threadIdx.x; e < (n); e += blockDim.x)

// Shared arrays of one block: acc[a][tile * GP] (a < kSharedAcc), then h0 and w0.
template <typename A>
struct Shared {
  A* acc[kSharedAcc];
  int* h0;
  int* w0;
};

template <typename A>
__device__ __forceinline__ Shared<A> shared_arrays(const DeformArgs& g) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Shared<A> s;
  const i64 n = g.tile * g.groups * g.points;
  A* base = reinterpret_cast<A*>(smem_raw);
  for (int a = 0; a < kSharedAcc; ++a) s.acc[a] = base + a * n;
  s.h0 = reinterpret_cast<int*>(base + kSharedAcc * n);
  s.w0 = s.h0 + n;
  return s;
}

// Cell (h0, w0) and fractions of point k of output point `point`, stored in slot e of the
// shared arrays (h0, w0, acc[4] = lh, acc[5] = lw); returns h0, which is -2 when dropped.
template <typename T, typename A>
__device__ __forceinline__ int store_cell(const DeformArgs& g, const T* __restrict__ off,
                                          i64 point, i64 k, i64 e, Shared<A>& s) {
  const i64 hw = g.width * g.up, hh = g.height * g.up;
  const i64 j = point % hw, i = (point / hw) % hh;
  const T* o = off + point * 2 * g.groups * g.points + 2 * k;
  const A ph = A(i / g.up) + to_acc(o[1]);
  const A pw = A(j / g.up) + to_acc(o[0]);
  int h0 = -2, w0 = -2;
  A lh = A(0), lw = A(0);
  if (ph > A(-1) && ph < A(g.height) && pw > A(-1) && pw < A(g.width)) {
    const A fh = floor(ph), fw = floor(pw);
    h0 = (int)fh;
    w0 = (int)fw;
    lh = ph - fh;
    lw = pw - fw;
  }
  s.h0[e] = h0;
  s.w0[e] = w0;
  s.acc[4][e] = lh;
  s.acc[5][e] = lw;
  return h0;
}

// The four taps of a kept point: values v[a] of channel c of a map (stride channels per
// cell, image base `img`), 0 outside the map; corner a: (h0 + a/2, w0 + a%2).
template <typename T, typename A>
__device__ __forceinline__ void taps(const DeformArgs& g, const T* __restrict__ img, i64 stride,
                                     i64 c, int h0, int w0, A v[4]) {
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const i64 h = h0 + a / 2, w = w0 + a % 2;
    v[a] = (h >= 0 && h < g.height && w >= 0 && w < g.width)
               ? to_acc(img[(h * g.width + w) * stride + c])
               : A(0);
  }
}

// Bilinear weights of the corners, and their derivatives along w and h.
template <typename A>
__device__ __forceinline__ void corner_weights(A lh, A lw, A wt[4], A dw[4], A dh[4]) {
  const A hh = A(1) - lh, hw = A(1) - lw;
  wt[0] = hh * hw; wt[1] = hh * lw; wt[2] = lh * hw; wt[3] = lh * lw;
  dw[0] = -hh;     dw[1] = hh;      dw[2] = -lh;     dw[3] = lh;
  dh[0] = -hw;     dh[1] = -lw;     dh[2] = hw;      dh[3] = lw;
}

// sum over the corners of coef[a] * v[a].
template <typename A>
__device__ __forceinline__ A blend(const A coef[4], const A v[4]) {
  return coef[0] * v[0] + coef[1] * v[1] + coef[2] * v[2] + coef[3] * v[3];
}

// sum[j] = sum over channels c of the point's group (per of them, from c0) of
// x[c] * blend(coef[j], taps of the map at c), for the corner coefficients coef = {the
// bilinear weights, their d/dw, their d/dh}: the sample's dot product with x and its
// derivatives along w and h.
template <typename T, typename A>
__device__ __forceinline__ void tap_sums(const DeformArgs& g, const T* __restrict__ img,
                                         const T* __restrict__ x, i64 stride, i64 c0, i64 per,
                                         int h0, int w0, const A* const coef[3], A sum[3]) {
  sum[0] = sum[1] = sum[2] = A(0);
  for (i64 c = c0; c < c0 + per; ++c) {
    A v[4];
    taps<T, A>(g, img, stride, c, h0, w0, v);
    const A xc = to_acc(x[c]);
#pragma unroll
    for (int j = 0; j < 3; ++j) sum[j] += xc * blend(coef[j], v);
  }
}

__device__ __forceinline__ i64 image_of(const DeformArgs& g, i64 point) {
  return point / (g.height * g.up * g.width * g.up);
}

// Runs fn(first, n) for each tile of the block (grid-stride): output points
// [first, first + n), n <= g.tile. Every thread of the block runs every tile.
template <typename Fn>
__device__ __forceinline__ void for_each_tile(const DeformArgs& g, Fn fn) {
  const i64 total = g.batch * g.height * g.up * g.width * g.up;
  for (i64 first = blockIdx.x * g.tile; first < total; first += (i64)gridDim.x * g.tile) {
    fn(first, total - first < g.tile ? total - first : g.tile);
  }
}

// Phase 1 of every kernel: the cells of the tile's (point, k) into shared memory; with
// DOT, also s.acc[0] = <q_g, sample(key_g)> (the logit; 0 when dropped).
template <typename T, bool DOT>
__device__ __forceinline__ void phase_cells(const DeformArgs& g, i64 first, i64 n,
                                            const T* __restrict__ q, const T* __restrict__ key,
                                            const T* __restrict__ off,
                                            Shared<typename Acc<T>::type>& s) {
  typedef typename Acc<T>::type A;
  const i64 GP = g.groups * g.points, E = g.dim / g.groups;
  DEFORM_LOOP(e, n * GP) {
    const i64 point = first + e / GP, k = e % GP;
    const int h0 = store_cell<T, A>(g, off, point, k, e, s);
    if (DOT) {
      A sums[3] = {A(0), A(0), A(0)};  // the logit (0 when dropped) and, unused, its derivatives
      if (h0 != -2) {
        A wt[4], dw[4], dh[4];
        corner_weights(s.acc[4][e], s.acc[5][e], wt, dw, dh);
        const A* const coef[3] = {wt, dw, dh};
        tap_sums<T, A>(g, key + image_of(g, point) * g.height * g.width * g.dim, q + point * g.dim,
                       g.dim, (k / g.points) * E, E, h0, s.w0[e], coef, sums);
      }
      s.acc[0][e] = sums[0];
    }
  }
}

// Phase 3 of the forwards (map = value, ch = C) and of the query gradient (map = key,
// ch = D): out[point, c] = sum_p s.acc[0][point, g(c)*P + p] * sample(map, c) over the kept
// points p of the group g(c) of channel c.
template <typename T>
__device__ __forceinline__ void phase_gather(const DeformArgs& g, i64 first, i64 n,
                                             const T* __restrict__ map, i64 ch,
                                             T* __restrict__ out,
                                             const Shared<typename Acc<T>::type>& s) {
  typedef typename Acc<T>::type A;
  const i64 GP = g.groups * g.points, per = ch / g.groups;
  DEFORM_LOOP(e, n * ch) {
    const i64 lp = e / ch, c = e % ch, point = first + lp;
    const T* img = map + image_of(g, point) * g.height * g.width * ch;
    A acc = A(0);
    for (i64 p = 0; p < g.points; ++p) {
      const i64 idx = lp * GP + (c / per) * g.points + p;
      if (s.h0[idx] == -2) continue;
      A wt[4], dw[4], dh[4], v[4];
      corner_weights(s.acc[4][idx], s.acc[5][idx], wt, dw, dh);
      taps<T, A>(g, img, ch, c, s.h0[idx], s.w0[idx], v);
      acc += s.acc[0][idx] * blend(wt, v);
    }
    out[point * ch + c] = from_acc<T>(acc);
  }
}

// Fused forward: out = aggregate(softmax_P(similarity)); attn (the softmax, accumulation
// type) written unless null.
template <typename T>
__device__ __forceinline__ void forward(DeformArgs g, const T* __restrict__ q,
                                        const T* __restrict__ key, const T* __restrict__ value,
                                        const T* __restrict__ off, T* __restrict__ out,
                                        typename Acc<T>::type* __restrict__ attn) {
  typedef typename Acc<T>::type A;
  Shared<A> s = shared_arrays<A>(g);
  const i64 GP = g.groups * g.points;
  for_each_tile(g, [&](i64 first, i64 n) {
    phase_cells<T, true>(g, first, n, q, key, off, s);
    __syncthreads();
    DEFORM_LOOP(e, n * g.groups) {  // softmax over the P points of a group, in place
      A* l = s.acc[0] + e * g.points;
      A m = l[0];
      for (i64 p = 1; p < g.points; ++p) m = l[p] > m ? l[p] : m;
      A sum = A(0);
      for (i64 p = 0; p < g.points; ++p) {
        l[p] = acc_exp(l[p] - m);
        sum += l[p];
      }
      const A inv = A(1) / sum;
      for (i64 p = 0; p < g.points; ++p) {
        l[p] *= inv;
        if (attn != nullptr) attn[first * GP + e * g.points + p] = l[p];
      }
    }
    __syncthreads();
    phase_gather<T>(g, first, n, value, g.channels, out, s);
    __syncthreads();
  });
}

// logits = similarity(q, key, off).
template <typename T>
__device__ __forceinline__ void similarity(DeformArgs g, const T* __restrict__ q,
                                           const T* __restrict__ key, const T* __restrict__ off,
                                           T* __restrict__ logits) {
  typedef typename Acc<T>::type A;
  Shared<A> s = shared_arrays<A>(g);
  const i64 GP = g.groups * g.points;
  for_each_tile(g, [&](i64 first, i64 n) {
    phase_cells<T, true>(g, first, n, q, key, off, s);
    __syncthreads();
    DEFORM_LOOP(e, n * GP) logits[first * GP + e] = from_acc<T>(s.acc[0][e]);
    __syncthreads();
  });
}

// The cells of the tile and s.acc[0] = coef (of type W) for its (point, k): the setup of
// the aggregation and of the scatter.
template <typename T, typename W>
__device__ __forceinline__ void phase_coef(const DeformArgs& g, i64 first, i64 n,
                                           const W* __restrict__ coef, const T* __restrict__ off,
                                           Shared<typename Acc<T>::type>& s) {
  const i64 GP = g.groups * g.points;
  phase_cells<T, false>(g, first, n, nullptr, nullptr, off, s);
  DEFORM_LOOP(e, n * GP) s.acc[0][e] = to_acc(coef[first * GP + e]);
  __syncthreads();
}

// out = aggregate(w, value, off), weights of type W.
template <typename T, typename W>
__device__ __forceinline__ void aggregate(DeformArgs g, const W* __restrict__ w,
                                          const T* __restrict__ value, const T* __restrict__ off,
                                          T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  Shared<A> s = shared_arrays<A>(g);
  for_each_tile(g, [&](i64 first, i64 n) {
    phase_coef<T, W>(g, first, n, w, off, s);
    phase_gather<T>(g, first, n, value, g.channels, out, s);
    __syncthreads();
  });
}

// Backward, per output point. MODE 3 (fused): grad, q, key, value, off, the forward's
// softmax `w` (accumulation type) -> dl (the logits' gradient, accumulation type), dq,
// doff. MODE 1 (similarity): `dl_in` the logits' gradient -> dq, doff. MODE 2
// (aggregation): grad, value, off, weights `w` -> dl (the weights' gradient), doff.
// doff is written whole (0 at dropped points).
template <typename T, typename W, typename DL, int MODE>
__device__ __forceinline__ void point_backward(DeformArgs g, const T* __restrict__ grad,
                                               const T* __restrict__ q,
                                               const T* __restrict__ key,
                                               const T* __restrict__ value,
                                               const T* __restrict__ off,
                                               const W* __restrict__ w,
                                               const T* __restrict__ dl_in,
                                               DL* __restrict__ dl, T* __restrict__ dq,
                                               T* __restrict__ doff) {
  typedef typename Acc<T>::type A;
  const bool sim = MODE & 1, agg = MODE & 2;
  Shared<A> s = shared_arrays<A>(g);
  const i64 GP = g.groups * g.points;
  const i64 E = g.dim / g.groups, Cg = g.channels / g.groups;
  for_each_tile(g, [&](i64 first, i64 n) {
    // 1. per (point, k): acc[0] = <grad_g, sample(value)>, acc[1] and acc[2] its
    //    derivatives along w and h; acc[3] and acc[6] those of <q_g, sample(key)>.
    DEFORM_LOOP(e, n * GP) {
      const i64 point = first + e / GP, k = e % GP, grp = k / g.points;
      const int h0 = store_cell<T, A>(g, off, point, k, e, s);
      const int w0 = s.w0[e];
      A gs[3] = {A(0), A(0), A(0)}, qs[3] = {A(0), A(0), A(0)};
      if (h0 != -2) {
        A wt[4], dw[4], dh[4];
        corner_weights(s.acc[4][e], s.acc[5][e], wt, dw, dh);
        const A* const coef[3] = {wt, dw, dh};
        const i64 b = image_of(g, point);
        if (agg) {
          tap_sums<T, A>(g, value + b * g.height * g.width * g.channels,
                         grad + point * g.channels, g.channels, grp * Cg, Cg, h0, w0, coef, gs);
        }
        if (sim) {  // (its qs[0], the logit, is not needed here)
          tap_sums<T, A>(g, key + b * g.height * g.width * g.dim, q + point * g.dim, g.dim,
                         grp * E, E, h0, w0, coef, qs);
        }
      }
      s.acc[0][e] = gs[0];
      s.acc[1][e] = gs[1];
      s.acc[2][e] = gs[2];
      s.acc[3][e] = qs[1];
      s.acc[6][e] = qs[2];
    }
    __syncthreads();
    // 2. per (point, group): the logits' gradient and the offsets' gradients.
    DEFORM_LOOP(e, n * g.groups) {
      const i64 lp = e / g.groups, grp = e % g.groups, point = first + lp;
      const i64 k0 = grp * g.points, s0 = lp * GP + k0;
      A inner = A(0);
      if (MODE == 3) {
        for (i64 p = 0; p < g.points; ++p) {
          inner += to_acc(w[point * GP + k0 + p]) * s.acc[0][s0 + p];
        }
      }
      for (i64 p = 0; p < g.points; ++p) {
        const i64 idx = s0 + p, k = k0 + p;
        const bool kept = s.h0[idx] != -2;
        const A wk = agg ? A(to_acc(w[point * GP + k])) : A(0);
        A d = A(0);
        if (MODE == 3) d = kept ? wk * (s.acc[0][idx] - inner) : A(0);
        if (MODE == 1) d = kept ? to_acc(dl_in[point * GP + k]) : A(0);
        if (MODE == 2) d = s.acc[0][idx];
        if (MODE != 1) dl[point * GP + k] = from_acc<DL>(d);
        A ow = A(0), oh = A(0);
        if (kept) {
          if (agg) {
            ow += wk * s.acc[1][idx];
            oh += wk * s.acc[2][idx];
          }
          if (sim) {
            ow += d * s.acc[3][idx];
            oh += d * s.acc[6][idx];
          }
        }
        doff[point * 2 * GP + 2 * k] = from_acc<T>(ow);
        doff[point * 2 * GP + 2 * k + 1] = from_acc<T>(oh);
        s.acc[0][idx] = d;
      }
    }
    __syncthreads();
    // 3. dq[point, c] = sum_p dl[point, g(c)*P + p] * sample(key, c).
    if (sim) phase_gather<T>(g, first, n, key, g.dim, dq, s);
    __syncthreads();
  });
}

// Scatter: dst[cell, c] += coef[point, g(c)*P + p] * weight(tap) * src[point, c] over every
// (point, p, tap) landing on `cell`, with g.count channels (D: key, C: value); dst is of
// the accumulation type and must be zero beforehand (deform_zero).
template <typename T, typename W>
__device__ __forceinline__ void scatter(DeformArgs g, const W* __restrict__ coef,
                                        const T* __restrict__ src, const T* __restrict__ off,
                                        typename Acc<T>::type* __restrict__ dst) {
  typedef typename Acc<T>::type A;
  Shared<A> s = shared_arrays<A>(g);
  const i64 GP = g.groups * g.points, ch = g.count;
  const i64 per = ch / g.groups;
  for_each_tile(g, [&](i64 first, i64 n) {
    phase_coef<T, W>(g, first, n, coef, off, s);
    DEFORM_LOOP(e, n * ch) {
      const i64 lp = e / ch, c = e % ch, point = first + lp;
      A* img = dst + image_of(g, point) * g.height * g.width * ch;
      const A x = to_acc(src[point * ch + c]);
      for (i64 p = 0; p < g.points; ++p) {
        const i64 idx = lp * GP + (c / per) * g.points + p;
        const int h0 = s.h0[idx], w0 = s.w0[idx];
        if (h0 == -2) continue;
        const A a = s.acc[0][idx] * x;
        A wt[4], dw[4], dh[4];
        corner_weights(s.acc[4][idx], s.acc[5][idx], wt, dw, dh);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          const i64 h = h0 + t / 2, wc = w0 + t % 2;
          if (h >= 0 && h < g.height && wc >= 0 && wc < g.width) {
            atomicAdd(img + (h * g.width + wc) * ch + c, a * wt[t]);
          }
        }
      }
    }
    __syncthreads();
  });
}

// x[0 .. g.count) = 0.
template <typename A>
__device__ __forceinline__ void zero(DeformArgs g, A* __restrict__ x) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < g.count;
       e += (i64)blockDim.x * gridDim.x) {
    x[e] = A(0);
  }
}

// y = x converted to T, g.count elements.
template <typename T>
__device__ __forceinline__ void cast(DeformArgs g, const typename Acc<T>::type* __restrict__ x,
                                     T* __restrict__ y) {
  for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < g.count;
       e += (i64)blockDim.x * gridDim.x) {
    y[e] = from_acc<T>(x[e]);
  }
}

}  // namespace deform
}  // namespace sapa

// ---- Entry points: one extern "C" kernel per instantiation (names for the driver API) --
//
//   sapa_deform_forward_<t>(args, q, key, value, off, out, A* attn)          fused forward
//   sapa_deform_similarity_<t>(args, q, key, off, logits)
//   sapa_deform_aggregate_<t>[_wacc](args, W* w, value, off, out)
//   sapa_deform_backward_<t>(args, grad, q, key, value, off, const A* attn, A* dlogits,
//                            dq, doff)                                        fused, pass 1
//   sapa_deform_similarity_backward_<t>(args, dlogits, q, key, off, dq, doff)     pass 1
//   sapa_deform_aggregate_backward_<t>(args, grad, w, value, off, dw, doff)       pass 1
//   sapa_deform_scatter_<t>[_wacc](args, W* coef, src, off, A* dst)               pass 2
//   sapa_deform_zero_<f32|f64>(args, A* x)      sapa_deform_cast_<f16|bf16>(args, A* x, T* y)
//
// <t>: f32, f64, f16, bf16; A: float (double for f64); W: <t>, or A for the _wacc
// variants (f16, bf16 only; for f32/f64 the plain ones already read A).

// At most 256 threads per block and a minimum of two blocks per SM: ptxas may then use up
// to 128 registers a thread (with the thread count alone it aimed lower and spilled the
// f64 aggregate and similarity backward on sm_70). No kernel spills on sm_60 .. sm_90
// (custom_ops/build.py fails the build on a spill).
#define SAPA_DEFORM_KERNEL extern "C" __global__ void __launch_bounds__(256, 2)
#define SAPA_DEFORM_ARGS ::sapa::deform::DeformArgs g

#define SAPA_DEFORM_WINDOW(TN, T, W, SUFFIX)                                                \
  SAPA_DEFORM_KERNEL sapa_deform_aggregate_##TN##SUFFIX(SAPA_DEFORM_ARGS, const W* w,       \
                                                        const T* value, const T* off,       \
                                                        T* out) {                           \
    ::sapa::deform::aggregate<T, W>(g, w, value, off, out);                                 \
  }                                                                                         \
  SAPA_DEFORM_KERNEL sapa_deform_scatter_##TN##SUFFIX(SAPA_DEFORM_ARGS, const W* coef,      \
                                                      const T* src, const T* off,           \
                                                      typename ::sapa::Acc<T>::type* dst) { \
    ::sapa::deform::scatter<T, W>(g, coef, src, off, dst);                                  \
  }

#define SAPA_DEFORM_TYPE(TN, T, A)                                                          \
  SAPA_DEFORM_KERNEL sapa_deform_forward_##TN(SAPA_DEFORM_ARGS, const T* q, const T* key,   \
                                              const T* value, const T* off, T* out,         \
                                              A* attn) {                                    \
    ::sapa::deform::forward<T>(g, q, key, value, off, out, attn);                           \
  }                                                                                         \
  SAPA_DEFORM_KERNEL sapa_deform_similarity_##TN(SAPA_DEFORM_ARGS, const T* q,              \
                                                 const T* key, const T* off, T* logits) {   \
    ::sapa::deform::similarity<T>(g, q, key, off, logits);                                  \
  }                                                                                         \
  SAPA_DEFORM_KERNEL sapa_deform_backward_##TN(SAPA_DEFORM_ARGS, const T* grad,             \
                                               const T* q, const T* key, const T* value,    \
                                               const T* off, const A* attn, A* dlogits,     \
                                               T* dq, T* doff) {                            \
    ::sapa::deform::point_backward<T, A, A, 3>(g, grad, q, key, value, off, attn, nullptr,  \
                                               dlogits, dq, doff);                          \
  }                                                                                         \
  SAPA_DEFORM_KERNEL sapa_deform_similarity_backward_##TN(                                  \
      SAPA_DEFORM_ARGS, const T* dlogits, const T* q, const T* key, const T* off, T* dq,    \
      T* doff) {                                                                            \
    ::sapa::deform::point_backward<T, T, T, 1>(g, nullptr, q, key, nullptr, off, nullptr,   \
                                               dlogits, nullptr, dq, doff);                 \
  }                                                                                         \
  SAPA_DEFORM_KERNEL sapa_deform_aggregate_backward_##TN(                                   \
      SAPA_DEFORM_ARGS, const T* grad, const T* w, const T* value, const T* off, T* dw,     \
      T* doff) {                                                                            \
    ::sapa::deform::point_backward<T, T, T, 2>(g, grad, nullptr, nullptr, value, off, w,    \
                                               nullptr, dw, nullptr, doff);                 \
  }                                                                                         \
  SAPA_DEFORM_WINDOW(TN, T, T, )

SAPA_FOR_EACH_TYPE(SAPA_DEFORM_TYPE)
SAPA_FOR_EACH_WACC(SAPA_DEFORM_WINDOW)

SAPA_DEFORM_KERNEL sapa_deform_zero_f32(SAPA_DEFORM_ARGS, float* x) {
  ::sapa::deform::zero<float>(g, x);
}
SAPA_DEFORM_KERNEL sapa_deform_zero_f64(SAPA_DEFORM_ARGS, double* x) {
  ::sapa::deform::zero<double>(g, x);
}
SAPA_DEFORM_KERNEL sapa_deform_cast_f16(SAPA_DEFORM_ARGS, const float* x, __half* y) {
  ::sapa::deform::cast<__half>(g, x, y);
}
SAPA_DEFORM_KERNEL sapa_deform_cast_bf16(SAPA_DEFORM_ARGS, const float* x, __nv_bfloat16* y) {
  ::sapa::deform::cast<__nv_bfloat16>(g, x, y);
}

#endif  // KERAS_SAPA_CUDA_SAPA_DEFORM_KERNELS_CUH_
