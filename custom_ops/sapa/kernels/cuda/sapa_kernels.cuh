// CUDA kernels of SAPA (see shared/SAPA_SPEC.md), with no framework in them: raw
// pointers, channels-last dense tensors, sizes in a plain struct. Compiled at build time
// by NVRTC (custom_ops/build.py) into cubins/PTX, loaded and launched through the CUDA
// driver API by custom_ops/sapa/launcher/.
//
// Tensors (all contiguous, channels last):
//   hi  (B, sH, sW, D)  high resolution (query, or a gradient of the output)
//   lo  (B, H, W, D)    low resolution (key, value)
//   w   (B, sH, sW, K*K) window weights; n = (a + r) * K + (c + r) for the window point
//                        (i / s + a, j / s + c), points outside the map count as zero.
//
// Primitives (mutually adjoint, as in the CPU kernels):
//   dot     (hi, lo) -> w    w[i,j,n] = <hi[i,j], lo[i/s+a, j/s+c]>
//   gather  (w, lo)  -> hi   hi[i,j]  = sum_n w[i,j,n] lo[i/s+a, j/s+c]
//   scatter (w, hi)  -> lo   lo[p,q]  = sum of w[i,j,n] hi[i,j] over the (i,j,n) whose
//                                       window point n is (p,q)
//   fused   (q, k, v) -> out, attn: attn = softmax_n(dot(q, k)), out = gather(attn, v)
//   dot with the softmax-backward epilogue: (g, v, attn) -> attn * (dot(g,v) - <attn, dot(g,v)>)
//
// Design of the tiled kernels: a block owns a tile of T x T low-resolution anchors (and
// their (T*s)^2 high-resolution points) of one image. The (T+K-1)^2 halo of the
// low-resolution tensor is loaded into shared memory once per channel chunk, coalesced,
// zero where it falls outside the map (which is exactly the zero padding of the spec);
// the s*s points of an anchor read the same window from it. The K*K logits of a point
// and its softmax stay in registers (K is a template parameter). The backward "scatter"
// is a gather over the points whose window holds each low-resolution point: every output
// element is summed by one thread in a fixed order, so results are deterministic and no
// atomics are used. float, half and bfloat16 accumulate in float; double in double. All
// global indices are 64-bit. The untiled ("any") kernels cover every K and s, one thread
// per output element or point, as the reference for the tiled ones and the fallback.

#ifndef KERAS_SAPA_CUDA_SAPA_KERNELS_CUH_
#define KERAS_SAPA_CUDA_SAPA_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sapa {

typedef long long i64;

// Sizes of one launch. Keep in sync with SapaArgs in launcher/sapa_launcher.h (all
// fields are 64-bit, so the layout has no padding).
struct Args {
  i64 batch, height, width;  // low resolution
  i64 up, kernel;            // s, K
  i64 ch;                    // D of dot/gather/scatter; d (query/key) of fused
  i64 ch_v;                  // C of the value (fused only)
  i64 tile;                  // T: anchors per tile side (tiled kernels)
  i64 tiles_h, tiles_w;      // tiles per image
};

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The element types of the entry points, X(name, storage type, accumulation type), and the
// half types again with the weights of the accumulation type (gather and scatter variants
// whose names end in _wacc): sapa_kernels.cu and sapa_deform_kernels.cuh instantiate their
// kernels for each.
#define SAPA_FOR_EACH_TYPE(X) \
  X(f32, float, float) X(f64, double, double) X(f16, __half, float) X(bf16, __nv_bfloat16, float)
#define SAPA_FOR_EACH_WACC(X) X(f16, __half, float, _wacc) X(bf16, __nv_bfloat16, float, _wacc)

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }

// Channel chunk staged in shared memory (dot: padded by one to avoid bank conflicts).
template <typename A> struct Chunk { enum { kDot = 16, kRow = 32, kScatter = 16 }; };
template <> struct Chunk<double> { enum { kDot = 8, kRow = 32, kScatter = 8 }; };

// Geometry of the tile a block owns.
struct Tile {
  i64 b, p0, q0;  // image, first anchor row/column
  int T, HT, P;   // anchors per side, halo side, high-res points per tile ((T*s)^2)
  int TS;         // T * s
};

// The block's dynamic shared memory, as an array of the accumulation type A.
template <typename A>
__device__ __forceinline__ A* shared_acc() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<A*>(smem_raw);
}

__device__ __forceinline__ Tile make_tile(const Args& g) {
  Tile t;
  const i64 id = blockIdx.x;
  const i64 per_image = g.tiles_h * g.tiles_w;
  t.b = id / per_image;
  const i64 rem = id - t.b * per_image;
  t.p0 = (rem / g.tiles_w) * g.tile;
  t.q0 = (rem % g.tiles_w) * g.tile;
  t.T = (int)g.tile;
  t.HT = (int)(g.tile + g.kernel - 1);
  t.TS = (int)(g.tile * g.up);
  t.P = t.TS * t.TS;
  return t;
}

// Global index (in points) of the tile's local high-res point l, or -1 outside the map.
__device__ __forceinline__ i64 high_point(const Args& g, const Tile& t, int l) {
  const i64 i = t.p0 * g.up + l / t.TS;
  const i64 j = t.q0 * g.up + l % t.TS;
  if (i >= g.height * g.up || j >= g.width * g.up) return -1;
  return (t.b * g.height * g.up + i) * (g.width * g.up) + j;
}

// Index in the halo of the window point n of the local high-res point l.
__device__ __forceinline__ int halo_index(const Args& g, const Tile& t, int l, int n, int K) {
  const int ai = (l / t.TS) / (int)g.up, aj = (l % t.TS) / (int)g.up;
  return (ai + n / K) * t.HT + aj + n % K;
}

// Runs fn(ap, aq, n) for every anchor (ap, aq) in the map whose window holds the
// low-resolution point (p, q), n being (p, q)'s index in that window: the scatter's view of
// the windows.
template <typename Fn>
__device__ __forceinline__ void for_each_anchor_of(const Args& g, i64 p, i64 q, Fn fn) {
  const i64 K = g.kernel, r = K / 2;
  for (i64 a = -r; a <= r; ++a) {
    const i64 ap = p - a;
    if (ap < 0 || ap >= g.height) continue;
    for (i64 b = -r; b <= r; ++b) {
      const i64 aq = q - b;
      if (aq < 0 || aq >= g.width) continue;
      fn(ap, aq, (a + r) * K + (b + r));
    }
  }
}

// The low-resolution point (*p, *q) of window point n of the high-resolution point (i, j);
// false where it lies outside the map.
__device__ __forceinline__ bool window_point(const Args& g, i64 i, i64 j, i64 n, i64* p,
                                             i64* q) {
  const i64 K = g.kernel, r = K / 2;
  *p = i / g.up + n / K - r;
  *q = j / g.up + n % K - r;
  return *p >= 0 && *p < g.height && *q >= 0 && *q < g.width;
}

// Loads channels [c0, c0 + CW) of the low-res halo into dst[h * stride + c], zero outside
// the map or past the channel count.
template <typename T, typename A>
__device__ __forceinline__ void load_halo(const Args& g, const Tile& t, const T* __restrict__ lo,
                                          i64 ch, i64 c0, int CW, int stride, A* dst) {
  const int r = (int)(g.kernel / 2);
  const int total = t.HT * t.HT * CW;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int h = e / CW, c = e - (e / CW) * CW;
    const i64 p = t.p0 - r + h / t.HT, q = t.q0 - r + h % t.HT;
    A v = A(0);
    if (p >= 0 && p < g.height && q >= 0 && q < g.width && c0 + c < ch) {
      v = to_acc(lo[((t.b * g.height + p) * g.width + q) * ch + c0 + c]);
    }
    dst[h * stride + c] = v;
  }
}

// Loads channels [c0, c0 + CW) of the tile's high-res points into dst[l * stride + c].
template <typename T, typename A>
__device__ __forceinline__ void load_points(const Args& g, const Tile& t, const T* __restrict__ hi,
                                            i64 ch, i64 c0, int CW, int stride, A* dst) {
  const int total = t.P * CW;
  for (int e = threadIdx.x; e < total; e += blockDim.x) {
    const int l = e / CW, c = e - (e / CW) * CW;
    const i64 point = high_point(g, t, l);
    A v = A(0);
    if (point >= 0 && c0 + c < ch) v = to_acc(hi[point * ch + c0 + c]);
    dst[l * stride + c] = v;
  }
}

// Accumulates the K*K window dot products of the thread's point l over all channels.
// Shared layout: [P][DC+1] points, then [HT*HT][DC+1] halo.
template <typename T, int K>
__device__ __forceinline__ void tile_dot(const Args& g, const Tile& t, const T* __restrict__ hi,
                                         const T* __restrict__ lo, i64 ch,
                                         typename Acc<T>::type* smem,
                                         typename Acc<T>::type (&acc)[K * K]) {
  typedef typename Acc<T>::type A;
  const int DC = Chunk<A>::kDot, S = DC + 1;
  A* sh_hi = smem;
  A* sh_lo = smem + t.P * S;
  const int l = threadIdx.x;
#pragma unroll
  for (int n = 0; n < K * K; ++n) acc[n] = A(0);
  int base = 0;
  if (l < t.P) {
    const int ai = (l / t.TS) / (int)g.up, aj = (l % t.TS) / (int)g.up;
    base = ai * t.HT + aj;
  }
  for (i64 c0 = 0; c0 < ch; c0 += DC) {
    load_points(g, t, hi, ch, c0, DC, S, sh_hi);
    load_halo(g, t, lo, ch, c0, DC, S, sh_lo);
    __syncthreads();
    if (l < t.P) {
#pragma unroll 4
      for (int c = 0; c < DC; ++c) {
        const A x = sh_hi[l * S + c];
#pragma unroll
        for (int n = 0; n < K * K; ++n) {
          acc[n] += x * sh_lo[(base + (n / K) * t.HT + n % K) * S + c];
        }
      }
    }
    __syncthreads();
  }
}

// EPI 0: out (O = T) = dot(hi, lo). EPI 1 (softmax backward): hi = grad of the output,
// lo = value, attn = the forward weights, out (O = the accumulation type) =
// attn * (dot - <attn, dot>).
template <typename T, int K, int EPI, typename O>
__device__ __forceinline__ void dot_tiled(Args g, const T* __restrict__ hi,
                                          const T* __restrict__ lo,
                                          const typename Acc<T>::type* __restrict__ attn,
                                          O* __restrict__ out) {
  typedef typename Acc<T>::type A;
  A* smem = shared_acc<A>();
  const Tile t = make_tile(g);
  A acc[K * K];
  tile_dot<T, K>(g, t, hi, lo, g.ch, smem, acc);
  const int l = threadIdx.x;
  if (l >= t.P) return;
  const i64 point = high_point(g, t, l);
  if (point < 0) return;
  O* o = out + point * (K * K);
  if (EPI == 0) {
#pragma unroll
    for (int n = 0; n < K * K; ++n) o[n] = from_acc<O>(acc[n]);
  } else {
    const A* a = attn + point * (K * K);
    A wsum = A(0);
#pragma unroll
    for (int n = 0; n < K * K; ++n) wsum += a[n] * acc[n];
#pragma unroll
    for (int n = 0; n < K * K; ++n) o[n] = from_acc<O>(a[n] * (acc[n] - wsum));
  }
}

// Phase 2 shared by the fused forward and the gather: out[point, c] = sum_n sh_w[l, n] *
// halo(value)[n, c], value channels staged by chunks of kRow.
template <typename T>
__device__ __forceinline__ void tile_gather(const Args& g, const Tile& t, const T* __restrict__ lo,
                                            i64 ch, const typename Acc<T>::type* sh_w,
                                            typename Acc<T>::type* sh_lo, T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  const int DV = Chunk<A>::kRow;
  const int K = (int)g.kernel, KK = K * K;
  for (i64 c0 = 0; c0 < ch; c0 += DV) {
    load_halo(g, t, lo, ch, c0, DV, DV, sh_lo);
    __syncthreads();
    for (int e = threadIdx.x; e < t.P * DV; e += blockDim.x) {
      const int l = e / DV, c = e - (e / DV) * DV;
      const i64 point = high_point(g, t, l);
      if (point < 0 || c0 + c >= ch) continue;
      const int ai = (l / t.TS) / (int)g.up, aj = (l % t.TS) / (int)g.up;
      const A* wl = sh_w + l * KK;
      A sum = A(0);
      for (int a = 0; a < K; ++a) {
        const A* row = sh_lo + ((ai + a) * t.HT + aj) * DV + c;
        for (int b = 0; b < K; ++b) sum += wl[a * K + b] * row[b * DV];
      }
      out[point * ch + c0 + c] = from_acc<T>(sum);
    }
    __syncthreads();
  }
}

// Fused forward: attn = softmax(dot(q, k)) (written to attn, in the accumulation type),
// out = gather(attn, v).
// Shared: [P][K*K] weights, then max(dot staging, value halo).
template <typename T, int K>
__device__ __forceinline__ void fused_tiled(Args g, const T* __restrict__ q,
                                            const T* __restrict__ k, const T* __restrict__ v,
                                            T* __restrict__ out,
                                            typename Acc<T>::type* __restrict__ attn) {
  typedef typename Acc<T>::type A;
  A* smem = shared_acc<A>();
  const Tile t = make_tile(g);
  A* sh_w = smem;
  A* work = smem + t.P * K * K;
  A acc[K * K];
  tile_dot<T, K>(g, t, q, k, g.ch, work, acc);
  const int l = threadIdx.x;
  if (l < t.P) {
    A m = acc[0];
#pragma unroll
    for (int n = 1; n < K * K; ++n) m = acc[n] > m ? acc[n] : m;
    A sum = A(0);
#pragma unroll
    for (int n = 0; n < K * K; ++n) {
      acc[n] = acc_exp(acc[n] - m);
      sum += acc[n];
    }
    const A inv = A(1) / sum;
    const i64 point = high_point(g, t, l);
#pragma unroll
    for (int n = 0; n < K * K; ++n) {
      const A w = acc[n] * inv;
      sh_w[l * K * K + n] = w;
      if (point >= 0) attn[point * (K * K) + n] = w;
    }
  }
  __syncthreads();
  tile_gather<T>(g, t, v, g.ch_v, sh_w, work, out);
}

// Gather with the weights (type W: T, or the accumulation type) read from global memory.
// Shared: [P][K*K] weights, value halo.
template <typename T, typename W>
__device__ __forceinline__ void gather_tiled(Args g, const W* __restrict__ w,
                                             const T* __restrict__ lo, T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  A* smem = shared_acc<A>();
  const Tile t = make_tile(g);
  const int KK = (int)(g.kernel * g.kernel);
  A* sh_w = smem;
  for (int e = threadIdx.x; e < t.P * KK; e += blockDim.x) {
    const int l = e / KK, n = e - (e / KK) * KK;
    const i64 point = high_point(g, t, l);
    sh_w[e] = point >= 0 ? to_acc(w[point * KK + n]) : A(0);
  }
  // tile_gather synchronises after loading the first halo chunk.
  tile_gather<T>(g, t, lo, g.ch, sh_w, smem + t.P * KK, out);
}

// Scatter: the block owns T x T low-res output points; it stages the high-res children
// of the (T+K-1)^2 anchors around them, a chunk of channels at a time, and reads the
// weights from global memory (each (point, n) is used by one output point of the block).
template <typename T, typename W>
__device__ __forceinline__ void scatter_tiled(Args g, const W* __restrict__ w,
                                              const T* __restrict__ hi, T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  A* sh_hi = shared_acc<A>();
  const Tile t = make_tile(g);
  const int DV = Chunk<A>::kScatter;
  const int K = (int)g.kernel, KK = K * K, r = K / 2, s = (int)g.up;
  const int HS = t.HT * s;  // side of the staged high-res region
  const i64 Hh = g.height * g.up, Wh = g.width * g.up;
  const i64 i0 = (t.p0 - r) * g.up, j0 = (t.q0 - r) * g.up;  // its first row/column
  for (i64 c0 = 0; c0 < g.ch; c0 += DV) {
    for (int e = threadIdx.x; e < HS * HS * DV; e += blockDim.x) {
      const int h = e / DV, c = e - (e / DV) * DV;
      const i64 i = i0 + h / HS, j = j0 + h % HS;
      A x = A(0);
      if (i >= 0 && i < Hh && j >= 0 && j < Wh && c0 + c < g.ch) {
        x = to_acc(hi[((t.b * Hh + i) * Wh + j) * g.ch + c0 + c]);
      }
      sh_hi[e] = x;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < t.T * t.T * DV; e += blockDim.x) {
      const int lp = e / DV, c = e - (e / DV) * DV;
      const i64 p = t.p0 + lp / t.T, q = t.q0 + lp % t.T;
      if (p >= g.height || q >= g.width || c0 + c >= g.ch) continue;
      A sum = A(0);
      for_each_anchor_of(g, p, q, [&](i64 ap, i64 aq, i64 n) {
        // Children of the anchor (ap, aq), local to the staged region.
        const int li = (int)((ap - (t.p0 - r)) * s), lj = (int)((aq - (t.q0 - r)) * s);
        for (int ci = 0; ci < s; ++ci) {
          const i64 row = (t.b * Hh + ap * g.up + ci) * Wh + aq * g.up;
          for (int cj = 0; cj < s; ++cj) {
            sum += to_acc(w[(row + cj) * KK + n]) * sh_hi[((li + ci) * HS + lj + cj) * DV + c];
          }
        }
      });
      out[((t.b * g.height + p) * g.width + q) * g.ch + c0 + c] = from_acc<T>(sum);
    }
    __syncthreads();
  }
}

// ---- Untiled kernels: any K and s, grid-stride loops, one thread per output element
// (dot/gather/scatter) or per point (softmax, softmax backward). --------------------------

#define SAPA_LOOP(i, n)                                                             \
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                 \
       i += (i64)blockDim.x * gridDim.x)

template <typename T>
__device__ __forceinline__ typename Acc<T>::type window_dot(const Args& g, const T* hi,
                                                            const T* lo, i64 point, int n) {
  typedef typename Acc<T>::type A;
  const i64 Wh = g.width * g.up, Hh = g.height * g.up;
  const i64 j = point % Wh, i = (point / Wh) % Hh, b = point / (Wh * Hh);
  i64 p, q;
  A sum = A(0);
  if (window_point(g, i, j, n, &p, &q)) {
    const T* x = hi + point * g.ch;
    const T* y = lo + ((b * g.height + p) * g.width + q) * g.ch;
    for (i64 c = 0; c < g.ch; ++c) sum += to_acc(x[c]) * to_acc(y[c]);
  }
  return sum;
}

template <typename T>
__device__ __forceinline__ void dot_any(Args g, const T* __restrict__ hi,
                                        const T* __restrict__ lo, T* __restrict__ out) {
  const i64 KK = g.kernel * g.kernel;
  const i64 total = g.batch * g.height * g.up * g.width * g.up * KK;
  SAPA_LOOP(e, total) { out[e] = from_acc<T>(window_dot(g, hi, lo, e / KK, (int)(e % KK))); }
}

// One thread per point: out (accumulation type) = attn * (dot(g, v) - <attn, dot(g, v)>).
template <typename T>
__device__ __forceinline__ void softmax_grad_any(Args g, const T* __restrict__ hi,
                                                 const T* __restrict__ lo,
                                                 const typename Acc<T>::type* __restrict__ attn,
                                                 typename Acc<T>::type* __restrict__ out) {
  typedef typename Acc<T>::type A;
  const int KK = (int)(g.kernel * g.kernel);
  const i64 points = g.batch * g.height * g.up * g.width * g.up;
  SAPA_LOOP(point, points) {
    const A* a = attn + point * KK;
    A* o = out + point * KK;
    A wsum = A(0);
    for (int n = 0; n < KK; ++n) {
      o[n] = window_dot(g, hi, lo, point, n);
      wsum += a[n] * o[n];
    }
    for (int n = 0; n < KK; ++n) o[n] = a[n] * (o[n] - wsum);
  }
}

// Fused forward, one thread per point (any K and s): the logits go to attn, the softmax
// is taken there in place, then every value channel is summed by the same thread.
template <typename T>
__device__ __forceinline__ void fused_any(Args g, const T* __restrict__ q,
                                          const T* __restrict__ k, const T* __restrict__ v,
                                          T* __restrict__ out,
                                          typename Acc<T>::type* __restrict__ attn) {
  typedef typename Acc<T>::type A;
  const i64 KK = g.kernel * g.kernel;
  const i64 Wh = g.width * g.up, Hh = g.height * g.up;
  const i64 points = g.batch * Hh * Wh;
  SAPA_LOOP(point, points) {
    A* a = attn + point * KK;
    A m = A(0);
    for (int n = 0; n < KK; ++n) {
      a[n] = window_dot(g, q, k, point, n);
      m = (n == 0 || a[n] > m) ? a[n] : m;
    }
    A sum = A(0);
    for (int n = 0; n < KK; ++n) {
      a[n] = acc_exp(a[n] - m);
      sum += a[n];
    }
    const A inv = A(1) / sum;
    for (int n = 0; n < KK; ++n) a[n] *= inv;
    const i64 j = point % Wh, i = (point / Wh) % Hh, b = point / (Wh * Hh);
    for (i64 c = 0; c < g.ch_v; ++c) {
      A acc = A(0);
      for (i64 n = 0; n < KK; ++n) {
        i64 p, qq;
        if (!window_point(g, i, j, n, &p, &qq)) continue;
        acc += a[n] * to_acc(v[((b * g.height + p) * g.width + qq) * g.ch_v + c]);
      }
      out[point * g.ch_v + c] = from_acc<T>(acc);
    }
  }
}

template <typename T, typename W>
__device__ __forceinline__ void gather_any(Args g, const W* __restrict__ w,
                                           const T* __restrict__ lo, T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  const i64 KK = g.kernel * g.kernel;
  const i64 Wh = g.width * g.up, Hh = g.height * g.up;
  const i64 total = g.batch * Hh * Wh * g.ch;
  SAPA_LOOP(e, total) {
    const i64 c = e % g.ch, point = e / g.ch;
    const i64 j = point % Wh, i = (point / Wh) % Hh, b = point / (Wh * Hh);
    A sum = A(0);
    for (i64 n = 0; n < KK; ++n) {
      i64 p, q;
      if (!window_point(g, i, j, n, &p, &q)) continue;
      sum += to_acc(w[point * KK + n]) * to_acc(lo[((b * g.height + p) * g.width + q) * g.ch + c]);
    }
    out[e] = from_acc<T>(sum);
  }
}

template <typename T, typename W>
__device__ __forceinline__ void scatter_any(Args g, const W* __restrict__ w,
                                            const T* __restrict__ hi, T* __restrict__ out) {
  typedef typename Acc<T>::type A;
  const i64 KK = g.kernel * g.kernel;
  const i64 Wh = g.width * g.up, Hh = g.height * g.up;
  const i64 total = g.batch * g.height * g.width * g.ch;
  SAPA_LOOP(e, total) {
    const i64 c = e % g.ch, lp = e / g.ch;
    const i64 q = lp % g.width, p = (lp / g.width) % g.height, b = lp / (g.width * g.height);
    A sum = A(0);
    for_each_anchor_of(g, p, q, [&](i64 ap, i64 aq, i64 n) {
      for (i64 ci = 0; ci < g.up; ++ci) {
        for (i64 cj = 0; cj < g.up; ++cj) {
          const i64 point = (b * Hh + ap * g.up + ci) * Wh + aq * g.up + cj;
          sum += to_acc(w[point * KK + n]) * to_acc(hi[point * g.ch + c]);
        }
      }
    });
    out[e] = from_acc<T>(sum);
  }
}

}  // namespace sapa

#endif  // KERAS_SAPA_CUDA_SAPA_KERNELS_CUH_
