// The SAPA CPU kernels, free of any framework: raw pointers (channels last), shapes and a
// thread-pool callback. TensorFlow binds them in cc/kernels/sapa_kernels.cc (with its
// intra-op pool's ParallelFor); other bindings pass their own pool, or Serial().
//
// With hi (B, sH, sW, D) high resolution, lo (B, H, W, D) low resolution and
// w (B, sH, sW, K*K) window weights, three mutually adjoint window primitives:
//
//   Dot     (hi, lo) -> w   w[b,i,j,n]  = <hi[b,i,j], lo[b, i/s+a, j/s+c]>
//   Gather  (w,  lo) -> hi  hi[b,i,j]   = sum_n w[b,i,j,n] * lo[b, i/s+a, j/s+c]
//   Scatter (w,  hi) -> lo  lo[b,p,q]   = sum over (i,j,n) whose window point n is
//                                         (p,q) of w[b,i,j,n] * hi[b,i,j]
//
// (n = (a+r)*K + (c+r), points outside the map contribute zero) and the fused SAPA pass:
//
//   SapaForward  (q, k, v)          -> out = Gather(softmax(Dot(q, k)), v), weights
//   SapaBackward (g, q, k, v, w)    -> dq, dk, dv
//
// Padded window points take part in the softmax with logit 0 (SAPA_SPEC.md).
// Scatter is written as a gather over the output points whose window contains each
// low-resolution point, so nothing needs atomics and every result is deterministic.
//
// Every function computes in T (float or double); half-precision callers convert to float.

#ifndef KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_
#define KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace keras_sapa {
namespace cpu {

// Sizes of one call (channels are passed per tensor). Products are formed in int64.
struct Shape {
  int64_t batch = 0;
  int64_t height = 0;  // low-resolution H
  int64_t width = 0;   // low-resolution W
  int64_t up = 1;      // s
  int64_t kernel = 1;  // K (odd)

  int64_t radius() const { return kernel / 2; }
  int64_t window() const { return kernel * kernel; }
  int64_t high_height() const { return height * up; }
  int64_t high_width() const { return width * up; }
  int64_t low_points() const { return batch * height * width; }
  int64_t high_points() const { return low_points() * up * up; }
};

// The thread-pool callback: runs fn(begin, end) over disjoint ranges that cover
// [0, units), possibly concurrently; cost_per_unit is a rough cycle count per unit, for
// the pool to choose its block size.
using Range = std::function<void(int64_t, int64_t)>;
using ParallelFor = std::function<void(int64_t units, int64_t cost_per_unit, const Range& fn)>;

// A ParallelFor that runs everything on the calling thread.
inline ParallelFor Serial() {
  return [](int64_t units, int64_t, const Range& fn) {
    if (units > 0) fn(0, units);
  };
}

// The window of one low-resolution anchor (b, h, w): its in-map points low[k] (flat
// low-resolution indices) at window positions index[k], k < m, and its s x s
// high-resolution children points[] (flat indices). One per thread range.
class AnchorWindow {
 public:
  explicit AnchorWindow(const Shape& shape)
      : shape_(shape), low_(shape.window()), index_(shape.window()),
        points_(shape.up * shape.up) {}

  // Fills the window of the anchor with flat index u (b * H * W + h * W + w).
  void Set(int64_t u) {
    const Shape& d = shape_;
    const int64_t w = u % d.width;
    const int64_t h = (u / d.width) % d.height;
    const int64_t b = u / (d.width * d.height);
    const int64_t r = d.radius();
    m_ = 0;
    for (int64_t a = -r; a <= r; ++a) {
      const int64_t p = h + a;
      if (p < 0 || p >= d.height) continue;
      for (int64_t c = -r; c <= r; ++c) {
        const int64_t q = w + c;
        if (q < 0 || q >= d.width) continue;
        low_[m_] = (b * d.height + p) * d.width + q;
        index_[m_] = (a + r) * d.kernel + (c + r);
        ++m_;
      }
    }
    const int64_t s = d.up, hh = d.high_height(), hw = d.high_width();
    for (int64_t ci = 0; ci < s; ++ci)
      for (int64_t cj = 0; cj < s; ++cj) points_[ci * s + cj] = (b * hh + h * s + ci) * hw + w * s + cj;
  }

  int64_t m() const { return m_; }
  const int64_t* low() const { return low_.data(); }
  const int64_t* index() const { return index_.data(); }
  const int64_t* points() const { return points_.data(); }

  // rows[k] = base + low[k] * channels.
  template <typename T>
  void Rows(const T* base, int64_t channels, const T** rows) const {
    for (int64_t k = 0; k < m_; ++k) rows[k] = base + low_[k] * channels;
  }

 private:
  Shape shape_;
  std::vector<int64_t> low_, index_, points_;
  int64_t m_ = 0;
};

// Per-range scratch of the anchor walks: two row-pointer lists of K*K entries and two
// value buffers of 5 * K*K and 4 * K*K entries (a group of up to four children).
template <typename T>
struct AnchorScratch {
  explicit AnchorScratch(int64_t kk) : rows_a(kk), rows_b(kk), buf_a(5 * kk), buf_b(4 * kk) {}
  std::vector<const T*> rows_a, rows_b;
  std::vector<T> buf_a, buf_b;
};

// Runs fn(window, scratch) for every low-resolution anchor on the pool.
template <typename T, typename Fn>
void ForEachAnchor(const ParallelFor& pool, const Shape& d, int64_t cost, Fn fn) {
  pool(d.low_points(), cost, [&](int64_t begin, int64_t end) {
    AnchorWindow window(d);
    AnchorScratch<T> scratch(d.window());
    for (int64_t u = begin; u < end; ++u) {
      window.Set(u);
      fn(window, scratch);
    }
  });
}

// w = Dot(hi, lo); hi and lo have `channels` channels.
template <typename T>
void Dot(const ParallelFor& pool, const Shape& d, int64_t channels, const T* hi, const T* lo,
         T* out) {
  const int64_t s = d.up, kk = d.window();
  ForEachAnchor<T>(pool, d, s * s * kk * (channels + 4), [&](const AnchorWindow& win,
                                                             AnchorScratch<T>& scratch) {
    std::vector<const T*>& rows = scratch.rows_a;
    std::vector<T>& dots = scratch.buf_a;
    const int64_t m = win.m();
    win.Rows(lo, channels, rows.data());
    ForGroups(s * s, [&](auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      const T* xs[G];
      for (int g = 0; g < G; ++g) xs[g] = hi + win.points()[first + g] * channels;
      MultiDotRows<T, G>(xs, rows.data(), m, channels, dots.data());
      for (int g = 0; g < G; ++g) {
        T* o = out + win.points()[first + g] * kk;
        if (m < kk) std::fill(o, o + kk, T(0));
        for (int64_t k = 0; k < m; ++k) o[win.index()[k]] = dots[g * m + k];
      }
    });
  });
}

// hi = Gather(w, lo); lo has `channels` channels.
template <typename T>
void Gather(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt, const T* lo,
            T* out) {
  const int64_t s = d.up, kk = d.window();
  ForEachAnchor<T>(pool, d, s * s * kk * (channels + 4), [&](const AnchorWindow& win,
                                                             AnchorScratch<T>& scratch) {
    std::vector<const T*>& rows = scratch.rows_a;
    std::vector<T>& weights = scratch.buf_a;
    const int64_t m = win.m();
    win.Rows(lo, channels, rows.data());
    ForGroups(s * s, [&](auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      T* outs[G];
      for (int g = 0; g < G; ++g) {
        const T* wp = wt + win.points()[first + g] * kk;
        for (int64_t k = 0; k < m; ++k) weights[k * G + g] = wp[win.index()[k]];
        outs[g] = out + win.points()[first + g] * channels;
      }
      MultiWeightedRowSum<T, G>(weights.data(), rows.data(), m, channels, outs);
    });
  });
}

// lo = Scatter(w, hi); hi has `channels` channels. Defined below (tiled::ScatterTiled).
template <typename T>
void Scatter(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt, const T* hi,
             T* out);

// ---------------------------------------------------------------------------------------
// The fused pass (SapaForward, SapaBackward) works on tiles: a unit of work is a run of
// low-resolution rows of one column tile (up to kTileCols anchors) of one image. Walking
// down the rows, it keeps the K rows of the window halo (tile + K - 1 points wide) that the
// current row needs packed in a ring buffer: each packed row is copied once per run, is
// contiguous (no cache-set collisions between window rows that lie a power of two apart
// in the tensor) and zero outside the map, so every window is a full K x K window of
// rows: padded points get logit 0 and contribute a zero value with no branch in the inner
// loops, exactly as SAPA_SPEC.md defines the border.

namespace tiled {

constexpr int64_t kTileCols = 8;   // anchors per column tile
constexpr int64_t kRunUnits = 48;  // units of work wanted per call: the pool balances them

// The split of a call into units (b, column tile, run of rows).
struct Grid {
  int64_t tile = 1, tiles = 1, runs = 1, run = 1, parts = 1;

  Grid(const Shape& d, int64_t parts_per_run) : parts(std::max<int64_t>(1, parts_per_run)) {
    tile = std::max<int64_t>(1, std::min(kTileCols, d.width));
    tiles = (d.width + tile - 1) / tile;
    const int64_t per_image = std::max<int64_t>(1, d.batch * tiles * parts);
    runs = std::min<int64_t>(std::max<int64_t>(1, d.height),
                             std::max<int64_t>(1, (kRunUnits + per_image - 1) / per_image));
    run = (d.height + runs - 1) / std::max<int64_t>(1, runs);
    runs = run > 0 ? (d.height + run - 1) / run : 1;
  }
  int64_t units(const Shape& d) const { return d.batch * tiles * runs * parts; }
};

// One unit: image b, anchor columns [x0, x0 + tw), rows [h0, h1), part p (a channel slice).
struct Unit {
  int64_t b, x0, tw, h0, h1, part;
  Unit(const Shape& d, const Grid& g, int64_t u) {
    part = u % g.parts;
    u /= g.parts;
    const int64_t t = u % g.tiles;
    u /= g.tiles;
    const int64_t run = u % g.runs;
    b = u / g.runs;
    x0 = t * g.tile;
    tw = std::min(d.width, x0 + g.tile) - x0;
    h0 = run * g.run;
    h1 = std::min(d.height, h0 + g.run);
  }
};

// Packs row h of an anchor grid (H x W anchors, each with up x up children) of the map
// src (B, H*up, W*up, ch), anchors [u0, u0 + n), channels [c0, c0 + cw), into
// dst[((u - u0) * up*up + ci * up + cj) * cw + c]; zero outside the map.
template <typename T>
void PackRow(const T* src, int64_t height, int64_t width, int64_t up, int64_t ch, int64_t c0,
             int64_t cw, int64_t b, int64_t h, int64_t u0, int64_t n, T* dst) {
  const int64_t uu = up * up;
  if (h < 0 || h >= height) {
    std::memset(dst, 0, sizeof(T) * n * uu * cw);
    return;
  }
  const int64_t hw = width * up;
  if (up == 1 && cw == ch) {  // one contiguous copy of the in-map points
    const int64_t lo = std::max<int64_t>(u0, 0), hi = std::min(u0 + n, width);
    if (lo > u0) std::memset(dst, 0, sizeof(T) * (lo - u0) * cw);
    if (hi > lo) std::memcpy(dst + (lo - u0) * cw, src + ((b * height + h) * width + lo) * ch,
                             sizeof(T) * (hi - lo) * cw);
    const int64_t from = std::max(hi, lo);
    if (u0 + n > from) std::memset(dst + (from - u0) * cw, 0, sizeof(T) * (u0 + n - from) * cw);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u = u0 + i;
    T* o = dst + i * uu * cw;
    if (u < 0 || u >= width) {
      std::memset(o, 0, sizeof(T) * uu * cw);
      continue;
    }
    for (int64_t ci = 0; ci < up; ++ci) {
      const T* row = src + ((b * height * up + h * up + ci) * hw + u * up) * ch + c0;
      for (int64_t cj = 0; cj < up; ++cj) std::memcpy(o + (ci * up + cj) * cw, row + cj * ch,
                                                      sizeof(T) * cw);
    }
  }
}

// K packed rows of a halo, indexed by map row (ring slot h mod K).
template <typename T>
class Ring {
 public:
  Ring(int64_t kernel, int64_t row_size) : kernel_(kernel), size_(row_size),
                                           data_(kernel * row_size) {}
  T* Slot(int64_t h) { return data_.data() + (((h % kernel_) + kernel_) % kernel_) * size_; }

 private:
  int64_t kernel_, size_;
  std::vector<T> data_;
};

// Runs fn(kernel) with kernel a std::integral_constant for K = 3, 5, 7, else with 0 (the
// generic path reads d.kernel).
template <typename Fn>
inline void WithKernel(int64_t kernel, Fn fn) {
  switch (kernel) {
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 5: fn(std::integral_constant<int, 5>()); break;
    case 7: fn(std::integral_constant<int, 7>()); break;
    default: fn(std::integral_constant<int, 0>()); break;
  }
}

// rows[a*K + c] = slots[a] + (x + c) * stride for the K x K window of halo column x.
template <int KC, typename T>
inline void WindowRows(const Shape& d, T* const* slots, int64_t x, int64_t stride,
                       const T** rows) {
  const int64_t K = KC > 0 ? KC : d.kernel;
  for (int64_t a = 0; a < K; ++a) {
    const T* base = slots[a] + x * stride;
    for (int64_t c = 0; c < K; ++c) rows[a * K + c] = base + c * stride;
  }
}

// out[0 : cw] = sum_j wl[j] * row_j[0 : cw], over the K x K anchors of the window of a
// low-resolution point and their ss children (j = (a, cc, ci, cj) in that order): the
// adjoint of the gather, in gather form. xslots[a] + shift: one channel slice of the packed
// children of anchor row h - r + a, laid out [ci][anchor][cj][pitch] (see PackChildren);
// x: the halo column of the window's first anchor; roff[(cc, ci, cj)]: the offset of that
// child of the window's anchor column cc from the slot's first anchor.
template <int KC, typename T>
inline void ScatterPoint(const Shape& d, const T* __restrict wl, const T* const* xslots,
                         const int64_t* roff, int64_t x, int64_t pitch, int64_t shift,
                         int64_t cw, T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const int64_t K = KC > 0 ? KC : d.kernel, s = d.up, m = K * s * s;
  int64_t c = 0;
  // Two sets of accumulators, for even and odd rows: one set of NV <= 4 chains would wait
  // on the FMA latency.
  auto block = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    V acc0[NV], acc1[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc0[v] = acc1[v] = Broadcast<T>(0);
    const T* w = wl;
    for (int64_t a = 0; a < K; ++a, w += m) {
      const T* xa = xslots[a] + shift + x * s * pitch + c;
      int64_t j = 0;
      for (; j + 2 <= m; j += 2) {
        const V w0 = Broadcast<T>(w[j]), w1 = Broadcast<T>(w[j + 1]);
        const T* r0 = xa + roff[j];
        const T* r1 = xa + roff[j + 1];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          acc0[v] += w0 * Load(r0 + v * L);
          acc1[v] += w1 * Load(r1 + v * L);
        }
      }
      if (j < m) {
        const V w0 = Broadcast<T>(w[j]);
        const T* r0 = xa + roff[j];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc0[v] += w0 * Load(r0 + v * L);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Store(out + c + v * L, acc0[v] + acc1[v]);
    c += NV * L;
  };
  while (c + 4 * L <= cw) block(std::integral_constant<int, 4>());
  if (c + 2 * L <= cw) block(std::integral_constant<int, 2>());
  if (c + L <= cw) block(std::integral_constant<int, 1>());
  for (; c < cw; ++c) {
    T acc = 0;
    for (int64_t a = 0; a < K; ++a)
      for (int64_t j = 0; j < m; ++j)
        acc += wl[a * m + j] * xslots[a][shift + x * s * pitch + roff[j] + c];
    out[c] = acc;
  }
}

// dst[sl * slice_stride + c'] = src[sl * sw + c'] for every channel slice sl of width sw
// (the last one narrower), c' < the slice's width; src null: zeros.
template <typename T>
inline void CopySliced(const T* src, int64_t ch, int64_t sw, int64_t slice_stride, T* dst) {
  constexpr int L = Simd<T>::kLanes;
  for (int64_t c0 = 0; c0 < ch; c0 += sw, dst += slice_stride) {
    const int64_t w = std::min(sw, ch - c0);
    int64_t c = 0;
    if (src == nullptr) {
      for (; c + L <= w; c += L) Store(dst + c, Broadcast<T>(0));
      for (; c < w; ++c) dst[c] = T(0);
    } else {
      for (; c + L <= w; c += L) Store(dst + c, Load(src + c0 + c));
      for (; c < w; ++c) dst[c] = src[c0 + c];
    }
  }
}

// Packs the children of anchor row h, anchors [u0, u0 + n), of the high-resolution map
// src (B, H*s, W*s, ch) in channel slices of width sw:
// dst[sl * slice_stride + ((ci * n + u - u0) * s + cj) * sw + c']; zero outside the map.
template <typename T>
void PackChildren(const T* src, const Shape& d, int64_t ch, int64_t sw, int64_t slice_stride,
                  int64_t b, int64_t h, int64_t u0, int64_t n, T* dst) {
  const int64_t s = d.up;
  const bool row_in = h >= 0 && h < d.height;
  for (int64_t ci = 0; ci < s; ++ci) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t u = u0 + i;
      const bool in = row_in && u >= 0 && u < d.width;
      const T* row = in ? src + ((b * d.height * s + h * s + ci) * d.width * s + u * s) * ch
                        : nullptr;
      for (int64_t cj = 0; cj < s; ++cj)
        CopySliced(in ? row + cj * ch : nullptr, ch, sw, slice_stride,
                   dst + ((ci * n + i) * s + cj) * sw);
    }
  }
}

// lo = Scatter(w, hi) over tiles (see ScatterPoint). Per row of a tile: the weights that
// each window child gives each output point, listed once (zero for anchors outside the
// map), then the sums channel slice by channel slice, so that the slice of the packed
// children stays in L1 while the tile's points read it.
template <typename T>
void ScatterTiled(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt,
                  const T* hi, T* out) {
  constexpr int64_t kSlice = 64;
  const int64_t s = d.up, ss = s * s, K = d.kernel, r = d.radius(), kk = K * K;
  const int64_t hh = d.high_height(), hw = d.high_width();
  const Grid grid(d, 1);
  const int64_t cost = grid.run * grid.tile * kk * ss * (channels + 4);
  const int64_t sw = std::max<int64_t>(1, std::min(kSlice, channels));
  const int64_t slices = (channels + sw - 1) / sw;
  WithKernel(K, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    pool(grid.units(d), cost, [&](int64_t begin, int64_t end) {
      const int64_t halo = grid.tile + 2 * r, slice_stride = halo * ss * sw;
      Ring<T> xring(K, slices * slice_stride);
      std::vector<const T*> xslots(K);
      std::vector<T> wl(grid.tile * kk * ss);
      std::vector<int64_t> roff(K * ss);
      for (int64_t u = begin; u < end; ++u) {
        const Unit unit(d, grid, u);
        const int64_t n = unit.tw + 2 * r, u0 = unit.x0 - r;
        for (int64_t cc = 0, j = 0; cc < K; ++cc)
          for (int64_t ci = 0; ci < s; ++ci)
            for (int64_t cj = 0; cj < s; ++cj) roff[j++] = ((ci * n + cc) * s + cj) * sw;
        for (int64_t h = unit.h0 - r; h < unit.h1 + r; ++h) {
          PackChildren(hi, d, channels, sw, slice_stride, unit.b, h, u0, n, xring.Slot(h));
          const int64_t p = h - r;  // the row whose window rows are now all packed
          if (p < unit.h0) continue;
          for (int64_t a = 0; a < K; ++a) xslots[a] = xring.Slot(p - r + a);
          // wl[x][a][cc][ci][cj]: p is window point (K-1-a, K-1-cc) of anchor
          // (p - r + a, x0 + x - r + cc).
          for (int64_t x = 0; x < unit.tw; ++x) {
            T* o = wl.data() + x * kk * ss;
            for (int64_t a = 0; a < K; ++a) {
              const int64_t ah = p - r + a;
              for (int64_t cc = 0; cc < K; ++cc) {
                const int64_t aw = unit.x0 + x - r + cc;
                const int64_t nidx = (K - 1 - a) * K + (K - 1 - cc);
                if (ah < 0 || ah >= d.height || aw < 0 || aw >= d.width) {
                  for (int64_t j = 0; j < ss; ++j) *o++ = T(0);
                  continue;
                }
                for (int64_t ci = 0; ci < s; ++ci) {
                  const T* w = wt + ((unit.b * hh + ah * s + ci) * hw + aw * s) * kk + nidx;
                  for (int64_t cj = 0; cj < s; ++cj) *o++ = w[cj * kk];
                }
              }
            }
          }
          T* o = out + ((unit.b * d.height + p) * d.width + unit.x0) * channels;
          for (int64_t sl = 0; sl < slices; ++sl) {
            const int64_t c0 = sl * sw, cw = std::min(sw, channels - c0);
            for (int64_t x = 0; x < unit.tw; ++x)
              ScatterPoint<KC, T>(d, wl.data() + x * kk * ss, xslots.data(), roff.data(), x, sw,
                                  sl * slice_stride, cw, o + x * channels + c0);
          }
        }
      }
    });
  });
}

}  // namespace tiled

template <typename T>
void Scatter(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt, const T* hi,
             T* out) {
  tiled::ScatterTiled<T>(pool, d, channels, wt, hi, out);
}

// Softmax over the K*K window of G points, of which m are in the map (logits
// dots[g * m + k]) and K*K - m padded (logit 0). Writes weights[k * G + g] for the
// in-map points and, where full is non-null, the whole row full[g][n] (padded n
// included). `exps` is room for m values.
template <typename T, int G>
inline void WindowSoftmax(const T* dots, int64_t m, int64_t kk, const int64_t* index,
                          T* exps, T* weights, T* const* full) {
  for (int g = 0; g < G; ++g) {
    const T* l = dots + g * m;
    T mx = m < kk ? T(0) : -std::numeric_limits<T>::infinity();
    for (int64_t k = 0; k < m; ++k) mx = std::max(mx, l[k]);
    T total = ExpShiftedSum<T>(l, m, mx, exps);
    const T pad = m < kk ? std::exp(-mx) : T(0);
    total += T(kk - m) * pad;
    const T inv = T(1) / total;
    for (int64_t k = 0; k < m; ++k) weights[k * G + g] = exps[k] * inv;
    if (full != nullptr) {
      T* row = full[g];
      if (m < kk) std::fill(row, row + kk, pad * inv);
      for (int64_t k = 0; k < m; ++k) row[index[k]] = weights[k * G + g];
    }
  }
}

// out = Gather(softmax(Dot(q, k)), v) in one pass over tiles of low-resolution anchors:
// for each anchor of a tile, the logits of its s x s children (they share the window)
// and their softmax, kept on the stack; then, for each anchor of the tile, the
// aggregation of the window's value rows. (Two phases per tile rather than per anchor:
// the key rows and the value rows of one window together overflow L1 at d=64, C=256.)
// q (B,sH,sW,dim), k (B,H,W,dim), v (B,H,W,channels) -> out (B,sH,sW,channels);
// weights (B,sH,sW,K*K), the softmax that the backward needs, written unless null.
template <typename T>
void SapaForward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                 const T* q, const T* k, const T* v, T* out, T* weights) {
  const int64_t s = d.up, kk = d.window(), ss = s * s;
  constexpr int64_t kTile = 8;
  const int64_t units = d.low_points();
  pool(units, ss * kk * (dim + channels + 12), [&](int64_t begin, int64_t end) {
    AnchorWindow win(d);
    std::vector<const T*> rows(kk);
    std::vector<T> dots(5 * kk);
    std::vector<T> tile_weights(kTile * ss * kk);
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      const int64_t t1 = std::min(end, t0 + kTile);
      for (int64_t u = t0; u < t1; ++u) {  // logits and softmax
        win.Set(u);
        const int64_t m = win.m();
        T* wt = tile_weights.data() + (u - t0) * ss * kk;
        win.Rows(k, dim, rows.data());
        ForGroups(ss, [&](auto group, int64_t first) {
          constexpr int G = decltype(group)::value;
          const T* xs[G];
          T* full[G];
          for (int g = 0; g < G; ++g) {
            const int64_t point = win.points()[first + g];
            xs[g] = q + point * dim;
            full[g] = weights == nullptr ? nullptr : weights + point * kk;
          }
          MultiDotRows<T, G>(xs, rows.data(), m, dim, dots.data());
          WindowSoftmax<T, G>(dots.data(), m, kk, win.index(), dots.data() + 4 * kk,
                              wt + first * m, weights == nullptr ? nullptr : full);
        });
      }
      for (int64_t u = t0; u < t1; ++u) {  // aggregation
        win.Set(u);
        const int64_t m = win.m();
        const T* wt = tile_weights.data() + (u - t0) * ss * kk;
        win.Rows(v, channels, rows.data());
        ForGroups(ss, [&](auto group, int64_t first) {
          constexpr int G = decltype(group)::value;
          T* outs[G];
          for (int g = 0; g < G; ++g) outs[g] = out + win.points()[first + g] * channels;
          MultiWeightedRowSum<T, G>(wt + first * m, rows.data(), m, channels, outs);
        });
      }
    }
  });
}

// Backward of SapaForward, given the upstream gradient g (B,sH,sW,channels) and the
// forward's weights. Two passes over tiles, both scatter-free:
//  1. per anchor: dw = Dot(g, v) on the packed window, the softmax backward
//     dlogits = w * (dw - <w, dw>) (zero at padded points, which have no logit to
//     differentiate), and dq = Gather(dlogits, k); dlogits is kept (B,sH,sW,K*K).
//  2. per low-resolution point: dk = Scatter(dlogits, q), dv = Scatter(w, g), in gather
//     form (ScatterTiled).
template <typename T>
void SapaBackward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                  const T* grad, const T* q, const T* k, const T* v, const T* weights,
                  T* dlogits, T* dq, T* dk, T* dv) {
  using namespace tiled;
  const int64_t s = d.up, ss = s * s, K = d.kernel, r = d.radius(), kk = K * K;
  const int64_t hh = d.high_height(), hw = d.high_width();
  const Grid grid(d, 1);
  const int64_t cost = grid.run * grid.tile * ss * kk * (dim + channels + 16);
  WithKernel(K, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    pool(grid.units(d), cost, [&](int64_t begin, int64_t end) {
      const int64_t halo = grid.tile + 2 * r;
      Ring<T> kring(K, halo * dim), vring(K, halo * channels);
      std::vector<const T*> kslots(K), vslots(K), krows(kk), vrows(kk);
      std::vector<T> dw(4 * kk), dl(4 * kk);
      std::vector<unsigned char> inside(kk);
      for (int64_t u = begin; u < end; ++u) {
        const Unit unit(d, grid, u);
        const int64_t n = unit.tw + 2 * r, u0 = unit.x0 - r;
        for (int64_t h = unit.h0 - r; h < unit.h1 + r; ++h) {
          PackRow(k, d.height, d.width, 1, dim, 0, dim, unit.b, h, u0, n, kring.Slot(h));
          PackRow(v, d.height, d.width, 1, channels, 0, channels, unit.b, h, u0, n,
                  vring.Slot(h));
          const int64_t p = h - r;
          if (p < unit.h0) continue;
          for (int64_t a = 0; a < K; ++a) {
            kslots[a] = kring.Slot(p - r + a);
            vslots[a] = vring.Slot(p - r + a);
          }
          for (int64_t x = 0; x < unit.tw; ++x) {
            const int64_t w0 = unit.x0 + x;
            for (int64_t a = 0; a < K; ++a)
              for (int64_t c = 0; c < K; ++c)
                inside[a * K + c] = p - r + a >= 0 && p - r + a < d.height &&
                                    w0 - r + c >= 0 && w0 - r + c < d.width;
            WindowRows<KC, const T>(d, kslots.data(), x, dim, krows.data());
            WindowRows<KC, const T>(d, vslots.data(), x, channels, vrows.data());
            ForGroups(ss, [&](auto group, int64_t first) {
              constexpr int G = decltype(group)::value;
              const T* gs[G];
              T* dqs[G];
              int64_t pts[G];
              for (int g = 0; g < G; ++g) {
                const int64_t i = first + g;
                pts[g] = (unit.b * hh + p * s + i / s) * hw + w0 * s + i % s;
                gs[g] = grad + pts[g] * channels;
                dqs[g] = dq + pts[g] * dim;
              }
              MultiDotRows<T, G>(gs, vrows.data(), kk, channels, dw.data());
              for (int g = 0; g < G; ++g) {
                const T* w = weights + pts[g] * kk;
                const T* dwg = dw.data() + g * kk;
                T inner = 0;
                for (int64_t j = 0; j < kk; ++j) inner += w[j] * dwg[j];
                T* row = dlogits + pts[g] * kk;
                for (int64_t j = 0; j < kk; ++j) {
                  const T value = inside[j] ? w[j] * (dwg[j] - inner) : T(0);
                  dl[j * G + g] = value;
                  row[j] = value;
                }
              }
              MultiWeightedRowSum<T, G>(dl.data(), krows.data(), kk, dim, dqs);
            });
          }
        }
      }
    });
  });
  tiled::ScatterTiled<T>(pool, d, dim, dlogits, q, dk);
  tiled::ScatterTiled<T>(pool, d, channels, weights, grad, dv);
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_
