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
#include <functional>
#include <limits>
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

// Scatter of one or more (weights, hi) pairs that share the walk: for each pair i,
// outs[i] = Scatter(ws[i], his[i]) with chans[i] channels.
template <typename T, int P>
void ScatterMany(const ParallelFor& pool, const Shape& d, const int64_t* chans,
                 const T* const* ws, const T* const* his, T* const* outs) {
  const int64_t s = d.up, kk = d.window(), hh = d.high_height(), hw = d.high_width();
  const int64_t r = d.radius();
  int64_t channels = 0;
  for (int i = 0; i < P; ++i) channels += chans[i];
  // A unit is a tile of `tile` consecutive low-resolution points of one row; units run
  // down the rows of a column tile, so the high-resolution rows they read (K anchor rows
  // of s x s children, (tile + 2r) * s columns) stay in L2 from one unit to the next.
  const int64_t row_bytes = std::max<int64_t>(1, channels * int64_t(sizeof(T)));
  const int64_t budget = int64_t(256) << 10;
  const int64_t tile = std::max<int64_t>(
      1, std::min<int64_t>(d.width, budget / (d.kernel * s * s * row_bytes) - 2 * r));
  const int64_t tiles = (d.width + tile - 1) / tile;
  const int64_t units = d.batch * tiles * d.height;
  const int64_t cost = tile * s * s * kk * (channels + 6 * P);
  pool(units, cost, [&](int64_t begin, int64_t end) {
    const int64_t max_m = kk * s * s;
    std::vector<int64_t> point_all(tile * max_m), n_all(tile * max_m);
    std::vector<const T*> rows(max_m);
    std::vector<T> weights(max_m);
    std::vector<int64_t> counts(tile);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u % d.height;
      const int64_t t = (u / d.height) % tiles;
      const int64_t b = u / (d.height * tiles);
      const int64_t q_end = std::min(d.width, (t + 1) * tile);
      for (int64_t q = t * tile; q < q_end; ++q) {
        int64_t* points = point_all.data() + (q - t * tile) * max_m;
        int64_t* ns = n_all.data() + (q - t * tile) * max_m;
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
                points[m] = row_start + cj;
                ns[m] = n;
                ++m;
              }
            }
          }
        }
        counts[q - t * tile] = m;
      }
      for (int i = 0; i < P; ++i) {
        const int64_t ch = chans[i];
        for (int64_t q = t * tile; q < q_end; ++q) {
          const int64_t j = q - t * tile, m = counts[j];
          const int64_t* points = point_all.data() + j * max_m;
          const int64_t* ns = n_all.data() + j * max_m;
          for (int64_t k = 0; k < m; ++k) {
            weights[k] = ws[i][points[k] * kk + ns[k]];
            rows[k] = his[i] + points[k] * ch;
          }
          T* o = outs[i] + ((b * d.height + p) * d.width + q) * ch;
          StreamRowSum(weights.data(), rows.data(), m, ch, o);
        }
      }
    }
  });
}

// lo = Scatter(w, hi); hi has `channels` channels.
template <typename T>
void Scatter(const ParallelFor& pool, const Shape& d, int64_t channels, const T* wt, const T* hi,
             T* out) {
  ScatterMany<T, 1>(pool, d, &channels, &wt, &hi, &out);
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
    ExpShifted<T>(l, m, mx, exps);
    T total = 0;
    for (int64_t k = 0; k < m; ++k) total += exps[k];
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
// forward's weights. Two passes, both scatter-free:
//  1. per anchor: dw = Dot(g, v) on the window, the softmax backward
//     dlogits = w * (dw - <w, dw>) (padded points have no logit to differentiate), and
//     dq = Gather(dlogits, k); dlogits is kept (B,sH,sW,K*K) in `dlogits`.
//  2. per low-resolution point: dk = Scatter(dlogits, q), then dv = Scatter(w, g).
template <typename T>
void SapaBackward(const ParallelFor& pool, const Shape& d, int64_t dim, int64_t channels,
                  const T* grad, const T* q, const T* k, const T* v, const T* weights,
                  T* dlogits, T* dq, T* dk, T* dv) {
  const int64_t s = d.up, kk = d.window();
  ForEachAnchor<T>(pool, d, s * s * kk * (dim + channels + 8), [&](const AnchorWindow& win,
                                                                    AnchorScratch<T>& scratch) {
    std::vector<const T*>& krows = scratch.rows_a;
    std::vector<const T*>& vrows = scratch.rows_b;
    std::vector<T>& dw = scratch.buf_a;
    std::vector<T>& dl = scratch.buf_b;
    const int64_t m = win.m();
    const int64_t* index = win.index();
    win.Rows(k, dim, krows.data());
    win.Rows(v, channels, vrows.data());
    ForGroups(s * s, [&](auto group, int64_t first) {
      constexpr int G = decltype(group)::value;
      const T* gs[G];
      T* dqs[G];
      for (int g = 0; g < G; ++g) {
        const int64_t point = win.points()[first + g];
        gs[g] = grad + point * channels;
        dqs[g] = dq + point * dim;
      }
      MultiDotRows<T, G>(gs, vrows.data(), m, channels, dw.data());
      for (int g = 0; g < G; ++g) {
        const int64_t point = win.points()[first + g];
        const T* w = weights + point * kk;
        const T* dwg = dw.data() + g * m;
        T inner = 0;
        for (int64_t j = 0; j < m; ++j) inner += w[index[j]] * dwg[j];
        T* row = dlogits + point * kk;
        if (m < kk) std::fill(row, row + kk, T(0));
        for (int64_t j = 0; j < m; ++j) {
          const T value = w[index[j]] * (dwg[j] - inner);
          dl[j * G + g] = value;
          row[index[j]] = value;
        }
      }
      MultiWeightedRowSum<T, G>(dl.data(), krows.data(), m, dim, dqs);
    });
  });
  // Separate walks measured no slower than one walk over both (whose tiles must be
  // smaller, to hold the rows of both tensors).
  Scatter<T>(pool, d, dim, dlogits, q, dk);
  Scatter<T>(pool, d, channels, weights, grad, dv);
}

}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_CPU_H_
