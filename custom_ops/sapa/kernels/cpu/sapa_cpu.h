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

// The maps of one call, SAPA's and SAPA-D's: B images of H x W low-resolution points, each
// with up x up high-resolution children. Products are formed in int64.
struct UpShape {
  int64_t batch = 0;
  int64_t height = 0;  // low-resolution H
  int64_t width = 0;   // low-resolution W
  int64_t up = 1;      // s

  int64_t high_height() const { return height * up; }
  int64_t high_width() const { return width * up; }
  int64_t low_points() const { return batch * height * width; }
  int64_t high_points() const { return low_points() * up * up; }
};

// Sizes of one SAPA call (channels are passed per tensor).
struct Shape : UpShape {
  int64_t kernel = 1;  // K (odd)

  int64_t radius() const { return kernel / 2; }
  int64_t window() const { return kernel * kernel; }
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

// Per-range scratch of the anchor walks: the window's row pointers (K*K) and room for the
// K*K values of a group of up to four children.
template <typename T>
struct AnchorScratch {
  explicit AnchorScratch(int64_t kk) : rows(kk), buf(4 * kk) {}
  std::vector<const T*> rows;
  std::vector<T> buf;
};

// A group of children of one anchor for the window primitives: children first .. first + G
// - 1 of the anchor's window `win`, whose in-map rows of the low-resolution tensor are in
// rows[0 : m], and room (buf) for the G * K*K values of the group.
template <typename T>
struct ChildGroup {
  const AnchorWindow& win;
  const T* const* rows;
  T* buf;
  int64_t first, m;
  int64_t point(int g) const { return win.points()[first + g]; }
  int64_t index(int64_t k) const { return win.index()[k]; }
};

// Runs fn(child_group, group) on the pool for every low-resolution anchor and every group
// of its children (group: std::integral_constant<int, G>), the rows those of lo (`channels`
// wide).
template <typename T, typename Fn>
void ForEachChildGroup(const ParallelFor& pool, const Shape& d, int64_t channels, const T* lo,
                       Fn fn) {
  const int64_t ss = d.up * d.up;
  pool(d.low_points(), ss * d.window() * (channels + 4), [&](int64_t begin, int64_t end) {
    AnchorWindow window(d);
    AnchorScratch<T> scratch(d.window());
    for (int64_t u = begin; u < end; ++u) {
      window.Set(u);
      window.Rows(lo, channels, scratch.rows.data());
      ForGroups(ss, [&](auto group, int64_t first) {
        fn(ChildGroup<T>{window, scratch.rows.data(), scratch.buf.data(), first, window.m()},
           group);
      });
    }
  });
}

// w = Dot(hi, lo); hi and lo have `channels` channels.
template <typename T>
void Dot(const ParallelFor& pool, const Shape& d, int64_t channels, const T* hi, const T* lo,
         T* out) {
  const int64_t kk = d.window();
  ForEachChildGroup<T>(pool, d, channels, lo, [&](const ChildGroup<T>& c, auto group) {
    constexpr int G = decltype(group)::value;
    const T* xs[G];
    for (int g = 0; g < G; ++g) xs[g] = hi + c.point(g) * channels;
    MultiDotRows<T, G>(xs, c.rows, c.m, channels, c.buf);
    for (int g = 0; g < G; ++g) {
      T* o = out + c.point(g) * kk;
      if (c.m < kk) std::fill(o, o + kk, T(0));
      for (int64_t k = 0; k < c.m; ++k) o[c.index(k)] = c.buf[g * c.m + k];
    }
  });
}

// hi = Gather(w, lo); lo has `channels` channels.
template <typename T>
void Gather(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt, const T* lo,
            T* out) {
  const int64_t kk = d.window();
  ForEachChildGroup<T>(pool, d, channels, lo, [&](const ChildGroup<T>& c, auto group) {
    constexpr int G = decltype(group)::value;
    T* outs[G];
    for (int g = 0; g < G; ++g) {
      for (int64_t k = 0; k < c.m; ++k) c.buf[k * G + g] = wt[c.point(g) * kk + c.index(k)];
      outs[g] = out + c.point(g) * channels;
    }
    MultiWeightedRowSum<T, G>(c.buf, c.rows, c.m, channels, outs);
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
// current row needs packed in a ring buffer: each packed row is copied once per run
// (converted to the compute type there, for half-precision storage), is contiguous (no
// cache-set collisions between window rows that lie a power of two apart in the tensor)
// and zero outside the map. The forward and the backward's first pass list the in-map
// points of each window, as the anchor walks do (padded points enter the softmax with
// logit 0 analytically, SAPA_SPEC.md's border rule, and cost no work); the scatter reads
// full K x K windows of packed children with zero weights for anchors outside the map.

namespace tiled {

constexpr int64_t kTileCols = 8;   // anchors per column tile
constexpr int64_t kRunUnits = 48;  // units of work wanted per call: the pool balances them

// The split of a call into units (b, column tile, run of rows).
struct Grid {
  int64_t tile = 1, tiles = 1, runs = 1, run = 1, parts = 1;

  Grid(const Shape& d, int64_t parts_per_run, int64_t tile_cols = kTileCols)
      : parts(std::max<int64_t>(1, parts_per_run)) {
    tile = std::max<int64_t>(1, std::min(tile_cols, d.width));
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

// Packs anchors [u0, u0 + n) of row h of the low-resolution map src (B, H, W, ch), converted
// to T, into dst[(u - u0) * ch + c]; zero outside the map.
template <typename T, typename In>
void PackRow(const In* src, const Shape& d, int64_t ch, int64_t b, int64_t h, int64_t u0,
             int64_t n, T* dst) {
  const int64_t lo = h < 0 || h >= d.height ? u0 + n : std::max<int64_t>(u0, 0);
  const int64_t hi = std::max(lo, std::min(u0 + n, d.width));
  std::memset(dst, 0, sizeof(T) * (lo - u0) * ch);
  if (hi > lo) ConvertRow<T, In>(src + ((b * d.height + h) * d.width + lo) * ch, (hi - lo) * ch,
                                 dst + (lo - u0) * ch);
  std::memset(dst + (hi - u0) * ch, 0, sizeof(T) * (u0 + n - hi) * ch);
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

// dst[sl * slice_stride + c'] = src[sl * sw + c'] (converted to T) for every channel slice sl
// of width sw (the last one narrower), c' < the slice's width; src null: zeros.
template <typename T, typename In>
inline void CopySliced(const In* src, int64_t ch, int64_t sw, int64_t slice_stride, T* dst) {
  constexpr int L = Simd<T>::kLanes;
  for (int64_t c0 = 0; c0 < ch; c0 += sw, dst += slice_stride) {
    const int64_t w = std::min(sw, ch - c0);
    int64_t c = 0;
    if (src == nullptr) {
      for (; c + L <= w; c += L) Store(dst + c, Broadcast<T>(0));
      for (; c < w; ++c) dst[c] = T(0);
    } else {
      ConvertRow<T, In>(src + c0, w, dst);
    }
  }
}

// Packs the children of anchor row h, anchors [u0, u0 + n), of the high-resolution map
// src (B, H*s, W*s, ch) in channel slices of width sw:
// dst[sl * slice_stride + ((ci * n + u - u0) * s + cj) * sw + c']; zero outside the map.
template <typename T, typename In>
void PackChildren(const In* src, const Shape& d, int64_t ch, int64_t sw, int64_t slice_stride,
                  int64_t b, int64_t h, int64_t u0, int64_t n, T* dst) {
  const int64_t s = d.up;
  const bool row_in = h >= 0 && h < d.height;
  for (int64_t ci = 0; ci < s; ++ci) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t u = u0 + i;
      const bool in = row_in && u >= 0 && u < d.width;
      const In* row = in ? src + ((b * d.height * s + h * s + ci) * d.width * s + u * s) * ch
                         : nullptr;
      for (int64_t cj = 0; cj < s; ++cj)
        CopySliced<T, In>(in ? row + cj * ch : nullptr, ch, sw, slice_stride,
                          dst + ((ci * n + i) * s + cj) * sw);
    }
  }
}

// Rows of a tensor of storage type In read or written in the compute type T: the rows
// themselves when In is T; else a read converts the row into scratch slot `slot`, and a
// write goes to the slot, to be rounded into the tensor by Flush.
template <typename T, typename In>
class RowCache {
 public:
  static constexpr bool kDirect = std::is_same<T, In>::value;
  RowCache(int64_t slots, int64_t width) : width_(width), buf_(kDirect ? 0 : slots * width) {}

  const T* Read(const In* row, int64_t slot) {
    if constexpr (kDirect) {
      return row;
    } else {
      T* dst = buf_.data() + slot * width_;
      ConvertRow<T, In>(row, width_, dst);
      return dst;
    }
  }
  T* Write(In* row, int64_t slot) {
    if constexpr (kDirect) {
      return row;
    } else {
      return buf_.data() + slot * width_;
    }
  }
  void Flush(In* row, int64_t slot) {
    if constexpr (!kDirect) RoundRow<In, T>(buf_.data() + slot * width_, width_, row);
  }

 private:
  int64_t width_;
  std::vector<T> buf_;
};

// The flat index of child i (of s*s, row-major) of the anchor (b, p, w0).
inline int64_t ChildPoint(const Shape& d, int64_t b, int64_t p, int64_t w0, int64_t i) {
  return (b * d.high_height() + p * d.up + i / d.up) * d.high_width() + w0 * d.up + i % d.up;
}

// lo = Scatter(w, hi) over tiles (see ScatterPoint). Per row of a tile: the weights that
// each window child gives each output point, listed once (zero for anchors outside the
// map), then the sums channel slice by channel slice, so that the slice of the packed
// children stays in L1 while the tile's points read it. hi and lo of storage type In.
template <typename T, typename In = T>
void ScatterTiled(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt,
                  const In* hi, In* out) {
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
      RowCache<T, In> outs(grid.tile, channels);
      std::vector<T*> orow(grid.tile);
      for (int64_t u = begin; u < end; ++u) {
        const Unit unit(d, grid, u);
        const int64_t n = unit.tw + 2 * r, u0 = unit.x0 - r;
        for (int64_t cc = 0, j = 0; cc < K; ++cc)
          for (int64_t ci = 0; ci < s; ++ci)
            for (int64_t cj = 0; cj < s; ++cj) roff[j++] = ((ci * n + cc) * s + cj) * sw;
        for (int64_t h = unit.h0 - r; h < unit.h1 + r; ++h) {
          PackChildren<T, In>(hi, d, channels, sw, slice_stride, unit.b, h, u0, n,
                              xring.Slot(h));
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
          In* o = out + ((unit.b * d.height + p) * d.width + unit.x0) * channels;
          for (int64_t x = 0; x < unit.tw; ++x) orow[x] = outs.Write(o + x * channels, x);
          for (int64_t sl = 0; sl < slices; ++sl) {
            const int64_t c0 = sl * sw, cw = std::min(sw, channels - c0);
            for (int64_t x = 0; x < unit.tw; ++x)
              ScatterPoint<KC, T>(d, wl.data() + x * kk * ss, xslots.data(), roff.data(), x, sw,
                                  sl * slice_stride, cw, orow[x] + c0);
          }
          for (int64_t x = 0; x < unit.tw; ++x) outs.Flush(o + x * channels, x);
        }
      }
    });
  });
}

// The key and value rows of a unit's windows, walked down the unit's rows: Walk runs fn(p)
// for each anchor row p of the unit once the rows of its windows are at hand; then
// Window<KC>(p, x) lists the m in-map points of the window of the anchor at column x of
// the tile: their key and value rows and their window indices (row-major). Storage of the
// compute type is read in place; half-precision storage is converted into K packed rows
// (a ring, PackRow), each row once per run of rows. The fused pair walks whole rows
// (Grid tile = W): each unit then streams the query / gradient and output rows in order,
// as the anchor walk does; column tiles of 8 anchors measured 5-15% slower at M1 (writes
// of 16 KiB chunks 256 KiB apart), reading in place 5-10% faster than packing.
template <typename T>
class KeyValueHalo {
 public:
  KeyValueHalo(const Shape& d, const Grid& grid, int64_t dim, int64_t channels)
      : d_(d), dim_(dim), channels_(channels), halo_(grid.tile + 2 * d.radius()),
        kslots_(d.kernel), vslots_(d.kernel), krows(d.window()), vrows(d.window()),
        index(d.window()) {}

  template <typename In, typename Fn>
  void Walk(const Unit& unit, const In* k, const In* v, Fn fn) {
    const int64_t r = d_.radius(), n = unit.tw + 2 * r, u0 = unit.x0 - r;
    const int64_t row = d_.width;  // points per map row
    for (int64_t h = unit.h0 - r; h < unit.h1 + r; ++h) {
      if constexpr (!std::is_same<T, In>::value) {
        if (kring_.empty()) {
          kring_.emplace_back(d_.kernel, halo_ * dim_);
          vring_.emplace_back(d_.kernel, halo_ * channels_);
        }
        PackRow<T, In>(k, d_, dim_, unit.b, h, u0, n, kring_[0].Slot(h));
        PackRow<T, In>(v, d_, channels_, unit.b, h, u0, n, vring_[0].Slot(h));
      }
      const int64_t p = h - r;
      if (p < unit.h0) continue;
      for (int64_t a = 0; a < d_.kernel; ++a) {
        if constexpr (std::is_same<T, In>::value) {  // the map row, from its column 0
          const int64_t ah = p - r + a, first = (unit.b * d_.height + ah) * row;
          const bool in = ah >= 0 && ah < d_.height;
          kslots_[a] = in ? k + first * dim_ : nullptr;
          vslots_[a] = in ? v + first * channels_ : nullptr;
          shift_ = u0;
        } else {  // the packed row, from the halo's column 0 (anchor u0)
          kslots_[a] = kring_[0].Slot(p - r + a);
          vslots_[a] = vring_[0].Slot(p - r + a);
        }
      }
      x0_ = unit.x0;
      fn(p);
    }
  }

  template <int KC>
  void Window(int64_t p, int64_t x) {
    const int64_t K = KC > 0 ? KC : d_.kernel, r = K / 2, w0 = x0_ + x;
    const int64_t a0 = std::max<int64_t>(0, r - p), a1 = std::min<int64_t>(K, d_.height - p + r);
    const int64_t c0 = std::max<int64_t>(0, r - w0), c1 = std::min<int64_t>(K, d_.width - w0 + r);
    m = 0;
    for (int64_t a = a0; a < a1; ++a) {
      const T* kb = kslots_[a] + (shift_ + x) * dim_;
      const T* vb = vslots_[a] + (shift_ + x) * channels_;
      for (int64_t c = c0; c < c1; ++c, ++m) {
        krows[m] = kb + c * dim_;
        vrows[m] = vb + c * channels_;
        index[m] = a * K + c;
      }
    }
  }

 private:
  Shape d_;
  int64_t dim_, channels_, halo_, x0_ = 0, shift_ = 0;
  std::vector<Ring<T>> kring_, vring_;  // one each, for half-precision storage only
  std::vector<const T*> kslots_, vslots_;

 public:
  int64_t m = 0;  // in-map points of the last Window
  std::vector<const T*> krows, vrows;
  std::vector<int64_t> index;
};

// The walk of the fused pair: on the pool, for every anchor row p of every unit (runs of
// whole rows), row(halo, unit, p, scratch, windows), where scratch = make_scratch(grid) is
// made once per pool range and windows(fn) runs fn(x, group, first) for every anchor x of
// the row (halo.Window set for it) and every group of its children (group:
// std::integral_constant<int, G>, children first .. first + G - 1). extra_cost: cycles per
// window point besides the dim + channels multiply-adds.
template <typename T, typename In, typename Make, typename Row>
void FusedWalk(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
               int64_t extra_cost, const In* k, const In* v, Make make_scratch, Row row) {
  const Grid grid(d, 1, d.width);  // whole rows (see KeyValueHalo)
  const int64_t ss = d.up * d.up;
  const int64_t cost = grid.run * grid.tile * ss * d.window() * (dim + channels + extra_cost);
  WithKernel(d.kernel, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    pool(grid.units(d), cost, [&](int64_t begin, int64_t end) {
      KeyValueHalo<T> halo(d, grid, dim, channels);
      auto scratch = make_scratch(grid);
      for (int64_t u = begin; u < end; ++u) {
        const Unit unit(d, grid, u);
        halo.Walk(unit, k, v, [&](int64_t p) {
          auto windows = [&](auto fn) {
            for (int64_t x = 0; x < unit.tw; ++x) {
              halo.template Window<KC>(p, x);
              ForGroups(ss, [&](auto group, int64_t first) { fn(x, group, first); });
            }
          };
          row(halo, unit, p, scratch, windows);
        });
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

// out = Gather(softmax(Dot(q, k)), v) in one pass over tiles (tiled::Grid): per row of a
// tile, first for each anchor the logits of its s x s children over the full K x K window
// of the packed halo (padded points read zero rows, so their logit is 0, as the spec's
// border rule wants) and their softmax, kept for the row; then for each anchor the
// aggregation of the window's value rows. (Two phases per row rather than per anchor: the
// key rows and the value rows of one window together overflow L1 at d=64, C=256.)
// q (B,sH,sW,dim), k (B,H,W,dim), v (B,H,W,channels) -> out (B,sH,sW,channels), all of
// storage type In (half types: converted per tile, out rounded per row); weights
// (B,sH,sW,K*K) of type T, the softmax that the backward needs, written unless null.
template <typename T, typename In = T>
void SapaForward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                 const In* q, const In* k, const In* v, In* out, T* weights) {
  const int64_t ss = d.up * d.up, kk = d.window();
  struct Scratch {
    tiled::RowCache<T, In> qrows, orows;
    std::vector<T> dots, exps, row_weights;  // row_weights: the softmax of the row's anchors
  };
  auto make_scratch = [&](const tiled::Grid& grid) {
    return Scratch{{4, dim}, {4, channels}, std::vector<T>(4 * kk), std::vector<T>(kk),
                   std::vector<T>(grid.tile * ss * kk)};
  };
  auto row = [&](auto& halo, const tiled::Unit& unit, int64_t p, Scratch& sc, auto windows) {
    windows([&](int64_t x, auto group, int64_t first) {  // logits and softmax
      constexpr int G = decltype(group)::value;
      const T* xs[G];
      T* full[G];
      for (int g = 0; g < G; ++g) {
        const int64_t point = tiled::ChildPoint(d, unit.b, p, unit.x0 + x, first + g);
        xs[g] = sc.qrows.Read(q + point * dim, g);
        full[g] = weights == nullptr ? nullptr : weights + point * kk;
      }
      MultiDotRows<T, G>(xs, halo.krows.data(), halo.m, dim, sc.dots.data());
      WindowSoftmax<T, G>(sc.dots.data(), halo.m, kk, halo.index.data(), sc.exps.data(),
                          sc.row_weights.data() + x * ss * kk + first * halo.m,
                          weights == nullptr ? nullptr : full);
    });
    windows([&](int64_t x, auto group, int64_t first) {  // aggregation
      constexpr int G = decltype(group)::value;
      In* rows[G];
      T* outs[G];
      for (int g = 0; g < G; ++g) {
        rows[g] = out + tiled::ChildPoint(d, unit.b, p, unit.x0 + x, first + g) * channels;
        outs[g] = sc.orows.Write(rows[g], g);
      }
      MultiWeightedRowSum<T, G>(sc.row_weights.data() + x * ss * kk + first * halo.m,
                                halo.vrows.data(), halo.m, channels, outs);
      for (int g = 0; g < G; ++g) sc.orows.Flush(rows[g], g);
    });
  };
  tiled::FusedWalk<T>(pool, d, dim, channels, 12, k, v, make_scratch, row);
}

// Backward of SapaForward, given the upstream gradient g (B,sH,sW,channels) and the
// forward's weights. Two passes over tiles, both scatter-free:
//  1. per anchor: dw = Dot(g, v) on the packed window, the softmax backward
//     dlogits = w * (dw - <w, dw>) (zero at padded points, which have no logit to
//     differentiate), and dq = Gather(dlogits, k); dlogits is kept (B,sH,sW,K*K).
//  2. per low-resolution point: dk = Scatter(dlogits, q), dv = Scatter(w, g), in gather
//     form (ScatterTiled).
// grad, q, k, v and the gradients of storage type In; weights and dlogits of type T.
template <typename T, typename In = T>
void SapaBackward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                  const In* grad, const In* q, const In* k, const In* v, const T* weights,
                  T* dlogits, In* dq, In* dk, In* dv) {
  const int64_t kk = d.window();
  struct Scratch {
    tiled::RowCache<T, In> grows, dqrows;
    std::vector<T> dw, dl;
  };
  auto make_scratch = [&](const tiled::Grid&) {
    return Scratch{{4, channels}, {4, dim}, std::vector<T>(4 * kk), std::vector<T>(4 * kk)};
  };
  auto row = [&](auto& halo, const tiled::Unit& unit, int64_t p, Scratch& sc, auto windows) {
    windows([&](int64_t x, auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      const T* gs[G];
      T* dqs[G];
      int64_t pts[G];
      for (int g = 0; g < G; ++g) {
        pts[g] = tiled::ChildPoint(d, unit.b, p, unit.x0 + x, first + g);
        gs[g] = sc.grows.Read(grad + pts[g] * channels, g);
        dqs[g] = sc.dqrows.Write(dq + pts[g] * dim, g);
      }
      const int64_t m = halo.m;
      const int64_t* index = halo.index.data();
      MultiDotRows<T, G>(gs, halo.vrows.data(), m, channels, sc.dw.data());
      for (int g = 0; g < G; ++g) {
        const T* w = weights + pts[g] * kk;
        const T* dwg = sc.dw.data() + g * m;
        T inner = 0;  // padded points have dw = 0
        for (int64_t j = 0; j < m; ++j) inner += w[index[j]] * dwg[j];
        T* row = dlogits + pts[g] * kk;
        if (m < kk) std::fill(row, row + kk, T(0));
        for (int64_t j = 0; j < m; ++j) {
          const T value = w[index[j]] * (dwg[j] - inner);
          sc.dl[j * G + g] = value;
          row[index[j]] = value;
        }
      }
      MultiWeightedRowSum<T, G>(sc.dl.data(), halo.krows.data(), m, dim, dqs);
      for (int g = 0; g < G; ++g) sc.dqrows.Flush(dq + pts[g] * dim, g);
    });
  };
  tiled::FusedWalk<T>(pool, d, dim, channels, 16, k, v, make_scratch, row);
  tiled::ScatterTiled<T, In>(pool, d, dim, dlogits, q, dk);
  tiled::ScatterTiled<T, In>(pool, d, channels, weights, grad, dv);
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_
