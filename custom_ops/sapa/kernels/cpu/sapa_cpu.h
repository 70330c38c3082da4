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
// The fused pass (SapaForward, SapaBackward) and the scatter work on runs of rows: a unit
// of work is a run of whole low-resolution rows of one image. Walking down the rows, the
// fused pass reads the K key and value rows that the current row's windows need in place,
// or, for half-precision storage, keeps them packed in a ring buffer (W + K - 1 points
// wide): each packed row is converted once per run, is contiguous and zero outside the
// map. The forward, the backward's first pass and the scatter list the in-map points of
// each window, as the anchor walks do (padded points enter the softmax with logit 0
// analytically, SAPA_SPEC.md's border rule, and cost no work).

namespace tiled {

// The split of a call into units of work, runs of whole rows: at least min_units units per
// call where the map has the rows (the pool balances them), and runs of at most max_run
// rows. Empty maps (no batch, no rows, max_run 0 for "the whole height") get one run.
struct Grid {
  int64_t runs = 1, run = 1;

  Grid(const Shape& d, int64_t min_units, int64_t max_run) {
    const int64_t H = std::max<int64_t>(1, d.height), B = std::max<int64_t>(1, d.batch);
    const int64_t R = std::max<int64_t>(1, max_run);
    const int64_t want = std::max((min_units + B - 1) / B, (H + R - 1) / R);
    run = (H + std::min(H, want) - 1) / std::min(H, want);
    runs = (H + run - 1) / run;
  }
  int64_t units(const Shape& d) const { return d.batch * runs; }
};

// One unit: image b, low-resolution rows [h0, h1).
struct Unit {
  int64_t b, h0, h1;
  Unit(const Shape& d, const Grid& g, int64_t u)
      : b(u / g.runs), h0((u % g.runs) * g.run), h1(std::min(d.height, h0 + g.run)) {}
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

// acc[offs[k] + c] += sum_g wl[k * G + g] * xs[g][c] for k < m, c in [c0, c0 + NV * L): the
// G children rows of one anchor stay in registers while each of its m window points'
// accumulator row is read, updated and stored (per window point G * NV FMAs for NV loads
// and NV stores, and G weight broadcasts).
template <typename T, int G, int NV>
inline void ScatterBlock(const T* const* xs, const T* __restrict wl, const int64_t* offs,
                         int64_t m, int64_t c0, T* acc) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V x[G][NV];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) x[g][v] = Load(xs[g] + c0 + v * L);
  for (int64_t k = 0; k < m; ++k) {
    T* dst = acc + offs[k] + c0;
    V a[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) a[v] = Load(dst + v * L);
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      const V w = Broadcast<T>(wl[k * G + g]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) a[v] += w * x[g][v];
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) Store(dst + v * L, a[v]);
  }
}

// ScatterBlock over channels [0, cw) (xs and acc at the first of them).
template <typename T, int G>
inline void ScatterChildren(const T* const* xs, const T* __restrict wl, const int64_t* offs,
                            int64_t m, int64_t cw, T* acc) {
  constexpr int L = Simd<T>::kLanes;
  constexpr int NV = G >= 3 ? 2 : 4;  // G * NV + NV + 1 vector registers of 16
  int64_t c = 0;
  for (; c + NV * L <= cw; c += NV * L) ScatterBlock<T, G, NV>(xs, wl, offs, m, c, acc);
  for (; c + L <= cw; c += L) ScatterBlock<T, G, 1>(xs, wl, offs, m, c, acc);
  for (; c < cw; ++c) {
    for (int64_t k = 0; k < m; ++k) {
      T a = acc[offs[k] + c];
      for (int g = 0; g < G; ++g) a += wl[k * G + g] * xs[g][c];
      acc[offs[k] + c] = a;
    }
  }
}

// The flat index of child i (of s*s, row-major) of the anchor (b, p, w0).
inline int64_t ChildPoint(const Shape& d, int64_t b, int64_t p, int64_t w0, int64_t i) {
  return (b * d.high_height() + p * d.up + i / d.up) * d.high_width() + w0 * d.up + i % d.up;
}

constexpr int64_t kScatterUnits = 4;   // units of work wanted per scatter call, at least
constexpr int64_t kScatterRun = 16;    // rows per unit on tall maps
constexpr int64_t kScatterGroup = 256; // channels per pass over a row of anchors

// lo = Scatter(w, hi) in scatter form, the owner computing, for one unit of work: output
// rows [h0, h1) of image b. AddRow is fed the anchor rows h0 - r .. h1 + r - 1 in order and
// adds each in-map anchor's children, weighted, into the rows of its window that lie in
// [h0, h1) (so every product is formed once, by the unit that owns its output row, and each
// output point sums its terms in the same order, anchor row by anchor row, whatever the
// split: deterministic, no atomics). The sums build up in a ring of K float rows (row p in
// slot p mod K, zeroed when anchor row p - r starts, written to the tensor, rounded for half
// storage, when anchor row p + r is done), a pass per channel group of up to 256 so that
// the window's accumulators (K*K x 1 KiB at K = 5) stay in L1 from one anchor to the next.
// hi and lo of storage type In (hi rows converted per anchor and group). Measured against
// the gather form it replaced (packed halo rings of the children, 100 child rows read per
// output point): W1's dv 4.4 -> 2.5 ms, dk 1.2 -> 0.7.
template <typename T, typename In = T>
class ScatterRows {
 public:
  ScatterRows(const Shape& d, int64_t channels)
      : d_(d), channels_(channels), group_(std::min(kScatterGroup, channels)),
        point_(channels + kLine), pitch_(d.width * point_ + 4 * kLine),
        ring_(d.kernel * pitch_), wl_(d.width * d.window() * d.up * d.up),
        conv_(kScatterGroup * d.up * d.up), offs_(d.width * d.window()), count_(d.width),
        nidx_(d.window()), xs_(d.up * d.up) {}

  void AddRow(int64_t b, int64_t h0, int64_t h1, int64_t ah, const T* wt, const In* hi,
              In* out) {
    const Shape& d = d_;
    const int64_t ss = d.up * d.up, K = d.kernel, r = d.radius(), kk = K * K;
    const int64_t H = d.height, W = d.width, channels = channels_;
    T* ring = ring_.data();
    if (ah + r >= h0 && ah + r < h1) std::fill_n(ring + ((ah + r) % K) * pitch_, W * point_, T(0));
    if (ah >= 0 && ah < H) {
      // The window points of each anchor of the row that lie in rows [h0, h1) and in the
      // map: their accumulator offsets, and the weights each child gives them.
      const int64_t a0 = std::max<int64_t>(0, h0 - ah + r), a1 = std::min<int64_t>(K, h1 - ah + r);
      for (int64_t aw = 0; aw < W; ++aw) {
        const int64_t c0 = std::max<int64_t>(0, r - aw), c1 = std::min<int64_t>(K, W - aw + r);
        int64_t m = 0;
        int64_t* o = offs_.data() + aw * kk;
        for (int64_t a = a0; a < a1; ++a) {
          const int64_t base = ((ah + a - r) % K) * pitch_ + (aw - r) * point_;
          for (int64_t c = c0; c < c1; ++c, ++m) {
            o[m] = base + c * point_;
            nidx_[m] = a * K + c;
          }
        }
        count_[aw] = m;
        T* wa = wl_.data() + aw * kk * ss;
        ForGroups(ss, [&](auto group, int64_t first) {
          constexpr int G = decltype(group)::value;
          for (int g = 0; g < G; ++g) {
            const T* w = wt + ChildPoint(d, b, ah, aw, first + g) * kk;
            for (int64_t k = 0; k < m; ++k) wa[first * m + k * G + g] = w[nidx_[k]];
          }
        });
      }
      for (int64_t c0 = 0; c0 < channels; c0 += group_) {
        const int64_t cw = std::min(group_, channels - c0);
        for (int64_t aw = 0; aw < W; ++aw) {
          const int64_t m = count_[aw];
          if (m == 0) continue;
          for (int64_t i = 0; i < ss; ++i) {
            const In* row = hi + ChildPoint(d, b, ah, aw, i) * channels + c0;
            if constexpr (std::is_same<T, In>::value) {
              xs_[i] = row;
            } else {
              ConvertRow<T, In>(row, cw, conv_.data() + i * kScatterGroup);
              xs_[i] = conv_.data() + i * kScatterGroup;
            }
          }
          ForGroups(ss, [&](auto group, int64_t first) {
            constexpr int G = decltype(group)::value;
            ScatterChildren<T, G>(xs_.data() + first, wl_.data() + aw * kk * ss + first * m,
                                  offs_.data() + aw * kk, m, cw, ring + c0);
          });
        }
      }
    }
    const int64_t p = ah - r;  // complete now
    if (p >= h0 && p < h1) {
      for (int64_t q = 0; q < W; ++q)
        RoundRow<In, T>(ring + (p % K) * pitch_ + q * point_, channels,
                        out + ((b * H + p) * W + q) * channels);
    }
  }

 private:
  // Accumulator rows one cache line more than `channels` apart and ring slots four lines
  // more than a map row: the points of a window then fall into different L1 sets, and no
  // two of them lie a multiple of 4 KiB apart (a load would wait on the store to the other).
  static constexpr int64_t kLine = 64 / sizeof(T);
  Shape d_;
  int64_t channels_, group_, point_, pitch_;
  std::vector<T> ring_, wl_, conv_;
  std::vector<int64_t> offs_, count_, nidx_;
  std::vector<const T*> xs_;
};

// lo = Scatter(w, hi) on the pool: at least kScatterUnits units per call, runs of at most
// kScatterRun rows on tall maps (each unit reads 2r anchor rows of its neighbours again).
template <typename T, typename In = T>
void ScatterTiled(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt,
                  const In* hi, In* out) {
  const Grid grid(d, kScatterUnits, kScatterRun);
  const int64_t r = d.radius();
  const int64_t cost = grid.run * d.width * d.up * d.up * d.window() * (channels + 4);
  pool(grid.units(d), cost, [&](int64_t begin, int64_t end) {
    ScatterRows<T, In> rows(d, channels);
    for (int64_t u = begin; u < end; ++u) {
      const Unit unit(d, grid, u);
      for (int64_t ah = unit.h0 - r; ah < unit.h1 + r; ++ah)
        rows.AddRow(unit.b, unit.h0, unit.h1, ah, wt, hi, out);
    }
  });
}

// The key and value rows of a unit's windows, walked down the unit's rows: Walk runs fn(p)
// for each anchor row p of the unit once the rows of its windows are at hand; then
// Window<KC>(p, x) lists the m in-map points of the window of the anchor at column x: their
// key and value rows and their window indices (row-major). Storage of the compute type is
// read in place; half-precision storage is converted into K packed rows (a ring, PackRow),
// each row once per run of rows. Units are whole rows: each then streams the query /
// gradient and output rows in order, as the anchor walk does; column tiles of 8 anchors
// measured 5-15% slower at M1 (writes of 16 KiB chunks 256 KiB apart), reading in place
// 5-10% faster than packing.
template <typename T>
class KeyValueHalo {
 public:
  KeyValueHalo(const Shape& d, int64_t dim, int64_t channels)
      : d_(d), dim_(dim), channels_(channels), halo_(d.width + 2 * d.radius()),
        kslots_(d.kernel), vslots_(d.kernel), krows(d.window()), vrows(d.window()),
        index(d.window()) {}

  template <typename In, typename Fn>
  void Walk(const Unit& unit, const In* k, const In* v, Fn fn) {
    const int64_t r = d_.radius(), n = d_.width + 2 * r, u0 = -r;
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
      fn(p);
    }
  }

  template <int KC>
  void Window(int64_t p, int64_t x) {
    const int64_t K = KC > 0 ? KC : d_.kernel, r = K / 2, w0 = x;
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
  int64_t dim_, channels_, halo_, shift_ = 0;
  std::vector<Ring<T>> kring_, vring_;  // one each, for half-precision storage only
  std::vector<const T*> kslots_, vslots_;

 public:
  int64_t m = 0;  // in-map points of the last Window
  std::vector<const T*> krows, vrows;
  std::vector<int64_t> index;
};

constexpr int64_t kRunUnits = 48;  // units of work wanted per forward call

// The walk of the fused pair: on the pool, for every anchor row p of every unit of grid,
// row(halo, unit, p, scratch, windows), where scratch = make_scratch() is made once per
// pool range and windows(fn) runs fn(x, group, first) for every anchor x of the row
// (halo.Window set for it) and every group of its children (group:
// std::integral_constant<int, G>, children first .. first + G - 1). extra_cost: cycles per
// window point besides the dim + channels multiply-adds.
template <typename T, typename In, typename Make, typename Row>
void FusedWalk(const ParallelFor& pool, const Shape& d, const Grid& grid, int64_t dim,
               int64_t channels, int64_t extra_cost, const In* k, const In* v,
               Make make_scratch, Row row) {
  const int64_t ss = d.up * d.up;
  const int64_t cost = grid.run * d.width * ss * d.window() * (dim + channels + extra_cost);
  WithKernel(d.kernel, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    pool(grid.units(d), cost, [&](int64_t begin, int64_t end) {
      KeyValueHalo<T> halo(d, dim, channels);
      auto scratch = make_scratch();
      for (int64_t u = begin; u < end; ++u) {
        const Unit unit(d, grid, u);
        halo.Walk(unit, k, v, [&](int64_t p) {
          auto windows = [&](auto fn) {
            for (int64_t x = 0; x < d.width; ++x) {
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
// included). `exps` is room for G * m values. Vector passes per point (max, exp and sum,
// scale); an interior window (m = K*K, index[k] = k) computes its exps in the full row
// itself, scaled there in place, so only the interleaved copy for the aggregation is
// scalar.
template <typename T, int G>
inline void WindowSoftmax(const T* dots, int64_t m, int64_t kk, const int64_t* index,
                          T* exps, T* weights, T* const* full) {
  const bool interior = m == kk && full != nullptr;
  const T* es[G];
  for (int g = 0; g < G; ++g) {
    const T* l = dots + g * m;
    const T mx = MaxOf<T>(l, m, m < kk ? T(0) : -std::numeric_limits<T>::infinity());
    T* e = interior ? full[g] : exps + g * m;
    T total = ExpShiftedSum<T>(l, m, mx, e);
    const T pad = m < kk ? std::exp(-mx) : T(0);
    total += T(kk - m) * pad;
    const T inv = T(1) / total;
    for (int64_t k = 0; k < m; ++k) e[k] *= inv;
    es[g] = e;
    if (full != nullptr && !interior) {
      T* row = full[g];
      std::fill(row, row + kk, pad * inv);
      for (int64_t k = 0; k < m; ++k) row[index[k]] = e[k];
    }
  }
  for (int64_t k = 0; k < m; ++k)
    for (int g = 0; g < G; ++g) weights[k * G + g] = es[g][k];
}

// out = Gather(softmax(Dot(q, k)), v) in one pass over runs of rows (tiled::Grid): per
// anchor row, first for each anchor the logits of its s x s children over the in-map
// points of its window and their softmax (padded points enter it with logit 0, the spec's
// border rule), kept for the row; then for each anchor the aggregation of the window's
// value rows. (Two phases per row rather than per anchor: the key rows and the value rows
// of one window together overflow L1 at d=64, C=256.)
// q (B,sH,sW,dim), k (B,H,W,dim), v (B,H,W,channels) -> out (B,sH,sW,channels), all of
// storage type In (half types: converted per row, out rounded per row); weights
// (B,sH,sW,K*K) of type T, the softmax that the backward needs, written unless null.
template <typename T, typename In = T>
void SapaForward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                 const In* q, const In* k, const In* v, In* out, T* weights) {
  const int64_t ss = d.up * d.up, kk = d.window();
  struct Scratch {
    tiled::RowCache<T, In> qrows, orows;
    std::vector<T> dots, exps, row_weights;  // row_weights: the softmax of the row's anchors
  };
  auto make_scratch = [&] {
    return Scratch{{4, dim}, {4, channels}, std::vector<T>(4 * kk), std::vector<T>(4 * kk),
                   std::vector<T>(d.width * ss * kk)};
  };
  auto row = [&](auto& halo, const tiled::Unit& unit, int64_t p, Scratch& sc, auto windows) {
    windows([&](int64_t x, auto group, int64_t first) {  // logits and softmax
      constexpr int G = decltype(group)::value;
      const T* xs[G];
      T* full[G];
      for (int g = 0; g < G; ++g) {
        const int64_t point = tiled::ChildPoint(d, unit.b, p, x, first + g);
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
        rows[g] = out + tiled::ChildPoint(d, unit.b, p, x, first + g) * channels;
        outs[g] = sc.orows.Write(rows[g], g);
      }
      MultiWeightedRowSum<T, G>(sc.row_weights.data() + x * ss * kk + first * halo.m,
                                halo.vrows.data(), halo.m, channels, outs);
      for (int g = 0; g < G; ++g) sc.orows.Flush(rows[g], g);
    });
  };
  const tiled::Grid grid(d, tiled::kRunUnits, d.height);
  tiled::FusedWalk<T>(pool, d, grid, dim, channels, 12, k, v, make_scratch, row);
}

// Backward of SapaForward, given the upstream gradient g (B,sH,sW,channels) and the
// forward's weights. Two passes over runs of whole rows, deterministic, without atomics:
//  1. per anchor row p of a unit: for each anchor dw = Dot(g, v) on its window, the softmax
//     backward dlogits = w * (dw - <w, dw>) (zero at padded points, which have no logit to
//     differentiate), and dq = Gather(dlogits, k); dlogits is kept (B,sH,sW,K*K). Then
//     dv = Scatter(w, g) takes the same row of children while their g rows are in cache
//     (ScatterRows: the unit owns dv's rows [h0, h1) and also feeds it the r anchor rows
//     on either side, whose g rows it reads once more), so g streams from memory once.
//  2. dk = Scatter(dlogits, q) (ScatterTiled).
// grad, q, k, v and the gradients of storage type In; weights and dlogits of type T.
template <typename T, typename In = T>
void SapaBackward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                  const In* grad, const In* q, const In* k, const In* v, const T* weights,
                  T* dlogits, In* dq, In* dk, In* dv) {
  const int64_t kk = d.window();
  const int64_t r = d.radius();
  struct Scratch {
    tiled::RowCache<T, In> grows, dqrows;
    std::vector<T> dw, dl;
    tiled::ScatterRows<T, In> dvrows;
  };
  auto make_scratch = [&] {
    return Scratch{{4, channels}, {4, dim}, std::vector<T>(4 * kk), std::vector<T>(4 * kk),
                   tiled::ScatterRows<T, In>(d, channels)};
  };
  auto row = [&](auto& halo, const tiled::Unit& unit, int64_t p, Scratch& sc, auto windows) {
    auto add_dv = [&](int64_t ah) {
      sc.dvrows.AddRow(unit.b, unit.h0, unit.h1, ah, weights, grad, dv);
    };
    if (p == unit.h0)  // the r anchor rows above the unit
      for (int64_t ah = p - r; ah < p; ++ah) add_dv(ah);
    windows([&](int64_t x, auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      const T* gs[G];
      T* dqs[G];
      int64_t pts[G];
      for (int g = 0; g < G; ++g) {
        pts[g] = tiled::ChildPoint(d, unit.b, p, x, first + g);
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
    add_dv(p);
    if (p == unit.h1 - 1)  // the r anchor rows below the unit
      for (int64_t ah = p + 1; ah <= p + r; ++ah) add_dv(ah);
  };
  // Twice the scatter's units (its row runs then 8 rows at W1): 1-4% slower on two cores
  // than 4 units (more g rows read again at the unit edges), twice the threads' worth.
  const tiled::Grid grid(d, 2 * tiled::kScatterUnits, tiled::kScatterRun);
  tiled::FusedWalk<T>(pool, d, grid, dim, channels, 16 + channels, k, v, make_scratch, row);
  tiled::ScatterTiled<T, In>(pool, d, dim, dlogits, q, dk);
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_
