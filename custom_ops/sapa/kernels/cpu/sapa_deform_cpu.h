// The SAPA-D CPU kernels (shared/SAPA_SPEC.md, section "SAPA-D"), free of any framework:
// raw pointers, channels last, and the thread-pool callback of sapa_cpu.h.
//
// Tensors (dense, row-major, channels last), with D = G*E and GP = G*P:
//   query   (B, sH, sW, D)     key   (B, H, W, D)     value (B, H, W, C), C % G == 0
//   offsets (B, sH, sW, 2*GP)  channel 2k: shift along the width, 2k+1: along the height,
//                              for the point k = g*P + p, in low-resolution pixels
//   logits, weights (B, sH, sW, GP)      out, grad (B, sH, sW, C)
//
// Point k of output point (i, j) samples the low-resolution maps bilinearly at
// (ph, pw) = (i/s + offsets[2k+1], j/s + offsets[2k]) (integer division for the anchor),
// from the four taps of the cell (floor(ph), floor(pw)); a tap outside the map counts 0,
// and a point with ph <= -1, ph >= H, pw <= -1 or pw >= W (or a NaN) is dropped: its
// sample is 0 and every gradient through it is 0. Group g of the query and the key
// (channels g*E .. g*E+E-1) and of the value (g*C/G .. (g+1)*C/G - 1) uses the points
// k = g*P .. g*P+P-1.
//
//   DeformSimilarity (q, key, off)    -> logits  logits[k] = <q_g, sample(key_g, k)>
//   DeformAggregate  (w, value, off)  -> out     out_g = sum_p w[k] * sample(value_g, k)
//   DeformForward    (q, key, value, off) -> out = Aggregate(softmax_P(Similarity)), and
//                    the softmax weights, which the backward needs (dropped points enter
//                    the softmax with logit 0, as the spec's border rule says)
//
// and their backwards, which give the gradients of every input, the offsets included
// (from both the similarity and the aggregation in the fused op). The derivative with
// respect to a position is taken in the cell of floor() (at an integer position: the
// cell towards increasing coordinate), as in the official kernels.
//
// The taps: every point has its four corners, a corner outside the map (or of a dropped
// point) reading a row of zeros with weight 0, so the loops have no branches; the tap
// geometry of the G*P points of an output point is computed a vector of points at a time.
//
// Every backward runs in two passes, neither with atomics nor races, so results are
// deterministic whatever the thread count:
//  1. per output point (a gather): the dot products of the query and of the output
//     gradient with the taps' key and value rows give the logits' and weights' gradients
//     and the offsets' gradients; the query gradient is a weighted sum of key rows.
//  2. the key and value gradients (a scatter: any output point may sample any cell): a
//     unit of work owns a band of low-resolution rows of one image (every channel of its
//     cells), walks in order the output points whose taps reach the band (a first cheap
//     pass over the offsets finds each point's span of rows) and adds their taps' shares
//     to the band's cells; taps of one point and group that share a cell are summed
//     before the read-modify-write. Each element is summed by one unit in a fixed order;
//     no (B, sH, sW, G*P, 4, ...) tensor is materialised.
//
// Everything computes in T (float or double). The fused pair also takes its tensors in a
// storage type S (cpu::Half / cpu::BFloat16 of simd.h, computed in float): a unit of work
// converts the rows it reads as it reads them (query, gradient and offsets rows per output
// point; each sampled (cell, group) slice of key and value once per tile, where the tile's
// points mostly sample the same cells) and rounds what it writes once (output rows per
// point, key and value gradients per band); no whole-tensor copy exists. The softmax
// weights and dlogits stay in T. The halves take T only.
// Workspace: the fused backward needs dlogits (B, sH, sW, GP) of T from the caller; the
// scatter allocates its row spans (2 int32 per output point and per output row).

#ifndef KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_
#define KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "sapa_cpu.h"
#include "simd.h"

namespace keras_sapa {
namespace cpu {
namespace deform {

// Sizes of one call (the maps: UpShape of sapa_cpu.h). Products are formed in int64.
struct DeformShape : UpShape {
  int64_t points = 1;    // P, per group
  int64_t groups = 1;    // G
  int64_t dim = 0;       // D = G*E, channels of query and key
  int64_t channels = 0;  // C, channels of value and out

  int64_t gp() const { return groups * points; }
  int64_t group_dim() const { return dim / groups; }
  int64_t group_channels() const { return channels / groups; }

  // Every size non-negative, s, P and G positive, G dividing D and C, and the cells of
  // a map (with a border) countable in int32.
  bool Valid() const {
    return batch >= 0 && height >= 0 && width >= 0 && up >= 1 && points >= 1 && groups >= 1 &&
           dim >= 0 && channels >= 0 && dim % groups == 0 && channels % groups == 0 &&
           (height + 1) * (width + 1) <= std::numeric_limits<int32_t>::max();
  }
};

// ---- SIMD helpers (on top of simd.h) ---------------------------------------------------

// out[k] = <x, rows[k]> for k < m, vectors of length d: eight rows per pass through x,
// their sums reduced together (HorizontalSum8); a last partial block reads `zeros` (d
// zeros) in place of the missing rows.
template <typename T>
void DotRows(const T* __restrict x, const T* const* rows, int64_t m, int64_t d,
             const T* zeros, T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const int64_t dv = d - d % L;
  for (int64_t k = 0; k < m; k += 8) {
    const T* r[8];
    for (int j = 0; j < 8; ++j) r[j] = k + j < m ? rows[k + j] : zeros;
    V a[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = Broadcast<T>(0);
    for (int64_t c = 0; c < dv; c += L) {
      const V xv = Load(x + c);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) a[j] += xv * Load(r[j] + c);
    }
    T sums[8];
    HorizontalSum8<T>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], sums);
    const int n = static_cast<int>(std::min<int64_t>(8, m - k));
    for (int j = 0; j < n; ++j) {
      T t = sums[j];
      for (int64_t c = dv; c < d; ++c) t += x[c] * r[j][c];
      out[k + j] = t;
    }
  }
}

// Channels [c0, c0 + NV*L) of out = sum_k w[k] * rows[k], with S = 8 / NV interleaved
// streams of k: eight independent accumulators, so that the FMAs are not bound by the
// latency of one accumulator's chain (m is 4P, about 36: a chain per vector would wait
// four cycles per row).
template <typename T, int NV>
inline void RowSumBlock(const T* __restrict w, const T* const* rows, int64_t m, int64_t c0,
                        T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes, S = 8 / NV;
  V acc[S][NV];
#pragma GCC unroll 8
  for (int t = 0; t < S; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[t][v] = Broadcast<T>(0);
  int64_t k = 0;
  for (; k + S <= m; k += S) {
#pragma GCC unroll 8
    for (int t = 0; t < S; ++t) {
      const V wk = Broadcast<T>(w[k + t]);
      const T* r = rows[k + t] + c0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[t][v] += wk * Load(r + v * L);
    }
  }
  for (; k < m; ++k) {
    const V wk = Broadcast<T>(w[k]);
    const T* r = rows[k] + c0;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] += wk * Load(r + v * L);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    V total = acc[0][v];
#pragma GCC unroll 8
    for (int t = 1; t < S; ++t) total += acc[t][v];
    Store(out + c0 + v * L, total);
  }
}

// out[c] = sum_k w[k] * rows[k][c] for c < d (rows of d channels, listed by pointer).
template <typename T>
void RowSum(const T* __restrict w, const T* const* rows, int64_t m, int64_t d,
            T* __restrict out) {
  constexpr int L = Simd<T>::kLanes;
  int64_t c = 0;
  for (; c + 8 * L <= d; c += 8 * L) RowSumBlock<T, 8>(w, rows, m, c, out);
  if (c + 4 * L <= d) {
    RowSumBlock<T, 4>(w, rows, m, c, out);
    c += 4 * L;
  }
  if (c + 2 * L <= d) {
    RowSumBlock<T, 2>(w, rows, m, c, out);
    c += 2 * L;
  }
  if (c + L <= d) {
    RowSumBlock<T, 1>(w, rows, m, c, out);
    c += L;
  }
  for (; c < d; ++c) {
    T a = 0;
    for (int64_t k = 0; k < m; ++k) a += w[k] * rows[k][c];
    out[c] = a;
  }
}

// y[c] += a * x[c] for c < n.
template <typename T>
inline void Axpy(T a, const T* __restrict x, int64_t n, T* __restrict y) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const V av = Broadcast<T>(a);
  int64_t c = 0;
  for (; c + L <= n; c += L) Store(y + c, Load(y + c) + av * Load(x + c));
  for (; c < n; ++c) y[c] += a * x[c];
}

// ---- Sampling geometry -----------------------------------------------------------------

// Integer lanes matching Simd<T>::V (same lane count and width).
template <typename T>
struct IntLanes;
template <>
struct IntLanes<float> {
  typedef int32_t I;
  typedef int32_t VI __attribute__((vector_size(32)));
};
template <>
struct IntLanes<double> {
  typedef int64_t I;
  typedef int64_t VI __attribute__((vector_size(32)));
};

// The bilinear taps of n consecutive points, structure of arrays, corner a = 0..3 being
// (h0, w0), (h0, w0+1), (h0+1, w0), (h0+1, w0+1) of the cell (h0, w0) = floor(ph, pw):
//   cell(a)[n]   the tap's cell h*W + w within the image, -1 outside the map or dropped;
//   weight(a)[n] its bilinear weight, d_w(a)[n] / d_h(a)[n] the derivative of the weight
//                with respect to pw / ph (all 0 where cell is -1);
//   valid()[n]   1 for a kept point, 0 for a dropped one; h0()[n], w0()[n] the cell.
// Computed a vector of points at a time, without branches.
template <typename T>
class TapGeometry {
 public:
  static constexpr int kLanes = Simd<T>::kLanes;
  typedef typename IntLanes<T>::I I;

  explicit TapGeometry(int64_t capacity)
      : stride_((capacity + kLanes - 1) / kLanes * kLanes), cell_(4 * stride_), h0_(stride_),
        w0_(stride_),
        weight_(4 * stride_), d_w_(4 * stride_), d_h_(4 * stride_), valid_(stride_) {}

  // Points 0..n-1 (n <= capacity) at (ah + off[2q + 1], aw + off[2q]) in an H x W map.
  void Set(const T* off, int64_t n, T ah, T aw, int64_t height, int64_t width) {
    using V = typename Simd<T>::V;
    using VI = typename IntLanes<T>::VI;
    constexpr int L = kLanes;
    const V one = Broadcast<T>(1), zero = Broadcast<T>(0), minus_one = Broadcast<T>(-1);
    const V hf = Broadcast<T>(static_cast<T>(height)), wf = Broadcast<T>(static_cast<T>(width));
    VI even, odd;
    for (int l = 0; l < L; ++l) {
      even[l] = 2 * l;
      odd[l] = 2 * l + 1;
    }
    VI wide;
    for (int l = 0; l < L; ++l) wide[l] = static_cast<I>(width);
    VI hmax, wmax;
    for (int l = 0; l < L; ++l) {
      hmax[l] = static_cast<I>(height - 1);
      wmax[l] = static_cast<I>(width - 1);
    }
    const VI none = VI{} - 1;
    for (int64_t q = 0; q < n; q += L) {
      V ow, oh;
      if (q + L <= n) {
        const V lo = Load(off + 2 * q), hi = Load(off + 2 * q + L);
        ow = __builtin_shuffle(lo, hi, even);
        oh = __builtin_shuffle(lo, hi, odd);
      } else {  // the tail: missing points are NaN, hence dropped
        T tw[L], th[L];
        for (int l = 0; l < L; ++l) {
          const bool in = q + l < n;
          tw[l] = in ? off[2 * (q + l)] : std::numeric_limits<T>::quiet_NaN();
          th[l] = in ? off[2 * (q + l) + 1] : std::numeric_limits<T>::quiet_NaN();
        }
        ow = Load(tw);
        oh = Load(th);
      }
      V ph = Broadcast<T>(ah) + oh, pw = Broadcast<T>(aw) + ow;
      const VI keep = (ph > minus_one) & (ph < hf) & (pw > minus_one) & (pw < wf);
      ph = keep ? ph : zero;  // dropped (or NaN) lanes: any finite position, masked below
      pw = keep ? pw : zero;
      const VI th0 = __builtin_convertvector(ph, VI), tw0 = __builtin_convertvector(pw, VI);
      const V fh0 = __builtin_convertvector(th0, V), fw0 = __builtin_convertvector(tw0, V);
      const VI below_h = fh0 > ph, below_w = fw0 > pw;  // truncation rounded up: floor is one less
      const V fh = below_h ? fh0 - one : fh0, fw = below_w ? fw0 - one : fw0;
      const VI h0 = th0 + below_h, w0 = tw0 + below_w;  // masks are -1 where true
      const V lh = ph - fh, lw = pw - fw, hh = one - lh, hw = one - lw;
      const VI top = keep & (h0 >= 0), bottom = keep & (h0 + 1 <= hmax);
      const VI left = w0 >= 0, right = w0 + 1 <= wmax;
      const VI base = h0 * wide + w0;
      const VI in[4] = {top & left, top & right, bottom & left, bottom & right};
      const VI delta[4] = {VI{}, VI{} + 1, wide, wide + 1};
      const V weight[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
      const V d_w[4] = {zero - hh, hh, zero - lh, lh};
      const V d_h[4] = {zero - hw, zero - lw, hw, lw};
      for (int a = 0; a < 4; ++a) {
        Store(weight_.data() + a * stride_ + q, in[a] ? weight[a] : zero);
        Store(d_w_.data() + a * stride_ + q, in[a] ? d_w[a] : zero);
        Store(d_h_.data() + a * stride_ + q, in[a] ? d_h[a] : zero);
        const VI cell = in[a] ? base + delta[a] : none;
        std::memcpy(cell_.data() + a * stride_ + q, &cell, sizeof(cell));
      }
      Store(valid_.data() + q, keep ? one : zero);
      std::memcpy(h0_.data() + q, &h0, sizeof(h0));
      std::memcpy(w0_.data() + q, &w0, sizeof(w0));
    }
  }

  const I* cell(int a) const { return cell_.data() + a * stride_; }
  const T* weight(int a) const { return weight_.data() + a * stride_; }
  const T* d_w(int a) const { return d_w_.data() + a * stride_; }
  const T* d_h(int a) const { return d_h_.data() + a * stride_; }
  const T* valid() const { return valid_.data(); }
  // The cell's row and column (meaningful where some cell of the point is not -1).
  const I* h0() const { return h0_.data(); }
  const I* w0() const { return w0_.data(); }

 private:
  int64_t stride_;
  std::vector<I> cell_, h0_, w0_;
  std::vector<T> weight_, d_w_, d_h_, valid_;
};

// rows[a*P + p] = the row (channels [c0, ...) of a map with `stride` channels, image
// `image`) of corner a of point g*P + p, or the zero row outside the map.
template <typename T>
inline void TapRows(const DeformShape& d, const TapGeometry<T>& geo, int64_t g, const T* map,
                    int64_t image, int64_t stride, int64_t c0, const T* zeros, const T** rows) {
  const int64_t P = d.points;
  const T* base = map + image * d.height * d.width * stride + c0;
  for (int a = 0; a < 4; ++a) {
    const auto* cell = geo.cell(a) + g * P;
    for (int64_t p = 0; p < P; ++p) {
      rows[a * P + p] = cell[p] >= 0 ? base + static_cast<int64_t>(cell[p]) * stride : zeros;
    }
  }
}

// The tap rows of one map (key or value, `stride` channels a cell, group g's `width`
// channels from g * width) in the compute type T, listed as TapRows lists them. Storage T:
// pointers into the map. Storage S (half types): a (group, cell) slice is converted into
// the buffer on its first use within a tile and reused by the tile's later taps; EndTile
// forgets them. A null map: never read.
template <typename T, typename S>
class TapSource {
 public:
  static constexpr bool kDirect = std::is_same<T, S>::value;

  TapSource(const DeformShape& d, const S* map, int64_t stride, int64_t width,
            int64_t tile_points)
      : d_(d), map_(map), stride_(stride), width_(width) {
    if constexpr (!kDirect) {
      if (map == nullptr) return;
      const int64_t cells = d.height * d.width;
      slot_.assign(d.groups * cells, -1);
      // At most every slice of the image, or every tap of the tile's points a new one;
      // left uninitialised (pages of a large bound that the tile never reaches stay
      // untouched).
      const int64_t capacity = std::min(d.groups * cells, tile_points * 4 * d.gp());
      buf_.reset(new T[capacity * width + 1]);
    }
  }

  void Rows(const TapGeometry<T>& geo, int64_t g, int64_t image, const T* zeros,
            const T** rows) {
    if constexpr (kDirect) {
      TapRows<T>(d_, geo, g, map_, image, stride_, g * width_, zeros, rows);
    } else {
      const int64_t P = d_.points, cells = d_.height * d_.width;
      const S* base = map_ + image * cells * stride_ + g * width_;
      int32_t* slot = slot_.data() + g * cells;
      for (int a = 0; a < 4; ++a) {
        const auto* cell = geo.cell(a) + g * P;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t c = cell[p];
          if (c < 0) {
            rows[a * P + p] = zeros;
            continue;
          }
          if (slot[c] < 0) {
            slot[c] = static_cast<int32_t>(touched_.size());
            touched_.push_back(static_cast<int32_t>(g * cells + c));
            ConvertRow<T, S>(base + c * stride_, width_, buf_.get() + slot[c] * width_);
          }
          rows[a * P + p] = buf_.get() + slot[c] * width_;
        }
      }
    }
  }

  void EndTile() {
    if constexpr (!kDirect) {
      for (const int32_t i : touched_) slot_[i] = -1;
      touched_.clear();
    }
  }

 private:
  const DeformShape& d_;
  const S* map_;
  int64_t stride_, width_;
  std::vector<int32_t> slot_, touched_;
  std::unique_ptr<T[]> buf_;
};

// Per-range scratch of the per-point walks. Taps of a group are listed corner-major:
// tap a*P + p is corner a of point p. The row caches hold one output point's rows in T
// (read: converted from S; write: rounded into S by Flush); with S = T they are the
// tensors' own rows.
template <typename T, typename S = T>
struct PointScratch {
  PointScratch(const DeformShape& d, const S* key, const S* value, int64_t tile_points)
      : geometry(d.gp()), key(d, key, d.dim, d.group_dim(), tile_points),
        value(d, value, d.channels, d.group_channels(), tile_points), off(1, 2 * d.gp()),
        doff(1, 2 * d.gp()), qrow(1, d.dim), dqrow(1, d.dim), grow(1, d.channels),
        orow(1, d.channels), rows(4 * d.points), coef(4 * d.points), dots(4 * d.points),
        dots2(4 * d.points), logits(d.points + 8), exps(d.points + 8),
        zeros(std::max(d.group_dim(), d.group_channels()) + 8, T(0)) {}
  TapGeometry<T> geometry;
  TapSource<T, S> key, value;
  tiled::RowCache<T, S> off, doff, qrow, dqrow, grow, orow;
  std::vector<const T*> rows;
  std::vector<T> coef, dots, dots2, logits, exps, zeros;
};

// Runs fn(point, scratch) for every output point on the pool, the taps of all its
// points in scratch.geometry (key and value: the maps scratch.key / scratch.value read,
// either may be null). Units of work are square tiles of output points: the key and value
// rows that a tile gathers come from a small region of the low-resolution maps, which
// stays in cache while the tile is walked (a whole row of output points would sweep the
// full width of both maps).
template <typename T, typename S, typename Fn>
void ForEachPoint(const ParallelFor& pool, const DeformShape& d, const S* offsets, const S* key,
                  const S* value, int64_t cost, Fn fn) {
  constexpr int64_t kTile = 8;
  const int64_t hw = d.high_width(), hh = d.high_height();
  const int64_t tiles_h = (hh + kTile - 1) / kTile, tiles_w = (hw + kTile - 1) / kTile;
  pool(d.batch * tiles_h * tiles_w, cost * kTile * kTile, [&](int64_t begin, int64_t end) {
    PointScratch<T, S> scratch(d, key, value, kTile * kTile);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t tj = u % tiles_w, ti = (u / tiles_w) % tiles_h, b = u / (tiles_w * tiles_h);
      const int64_t i1 = std::min(hh, (ti + 1) * kTile), j1 = std::min(hw, (tj + 1) * kTile);
      for (int64_t i = ti * kTile; i < i1; ++i) {
        for (int64_t j = tj * kTile; j < j1; ++j) {
          const int64_t point = (b * hh + i) * hw + j;
          scratch.geometry.Set(scratch.off.Read(offsets + point * 2 * d.gp(), 0), d.gp(),
                               static_cast<T>(i / d.up), static_cast<T>(j / d.up), d.height,
                               d.width);
          fn(point, scratch);
        }
      }
      scratch.key.EndTile();
      scratch.value.EndTile();
    }
  });
}

// out[p] = sum over corners a of coef(a)[g*P + p] * dots[a*P + p].
template <typename T>
inline void CornerSum(const T* c0, const T* c1, const T* c2, const T* c3, int64_t points,
                      const T* dots, T* out) {
  for (int64_t p = 0; p < points; ++p) {
    out[p] = c0[p] * dots[p] + c1[p] * dots[points + p] + c2[p] * dots[2 * points + p] +
             c3[p] * dots[3 * points + p];
  }
}

// In place: logits[0..n) -> softmax (float: vectorised exp).
template <typename T>
inline void Softmax(T* logits, int64_t n, T* exps) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t p = 0; p < n; ++p) mx = std::max(mx, logits[p]);
  ExpShifted<T>(logits, n, mx, exps);
  T total = 0;
  for (int64_t p = 0; p < n; ++p) total += exps[p];
  const T inv = T(1) / total;
  for (int64_t p = 0; p < n; ++p) logits[p] = exps[p] * inv;
}

inline int64_t PointCost(const DeformShape& d) {
  return d.gp() * (4 * (d.group_dim() + d.group_channels()) + 48);
}

// ---- Forward ---------------------------------------------------------------------------

// Runs fn(point, g, scratch) for every output point and group g on the pool, with
// scratch.rows holding the tap rows of the group's points in the map (key, else value),
// listed by TapRows.
template <typename T, typename Fn>
void ForEachGroupTaps(const ParallelFor& pool, const DeformShape& d, const T* offsets,
                      const T* key, const T* value, Fn fn) {
  const int64_t image_points = d.high_height() * d.high_width();
  const int64_t width = key != nullptr ? d.group_dim() : d.group_channels();
  ForEachPoint<T, T>(pool, d, offsets, key, value, d.gp() * (4 * width + 24),
                     [&](int64_t point, PointScratch<T>& sc) {
                       TapSource<T, T>& source = key != nullptr ? sc.key : sc.value;
                       for (int64_t g = 0; g < d.groups; ++g) {
                         source.Rows(sc.geometry, g, point / image_points, sc.zeros.data(),
                                     sc.rows.data());
                         fn(point, g, sc);
                       }
                     });
}

// logits = DeformSimilarity(q, key, offsets).
template <typename T>
void DeformSimilarity(const ParallelFor& pool, const DeformShape& d, const T* q, const T* key,
                      const T* offsets, T* logits) {
  const int64_t E = d.group_dim(), P = d.points;
  ForEachGroupTaps<T>(pool, d, offsets, key, nullptr, [&](int64_t point, int64_t g,
                                                          PointScratch<T>& sc) {
    const TapGeometry<T>& geo = sc.geometry;
    DotRows<T>(q + point * d.dim + g * E, sc.rows.data(), 4 * P, E, sc.zeros.data(),
               sc.dots.data());
    CornerSum<T>(geo.weight(0) + g * P, geo.weight(1) + g * P, geo.weight(2) + g * P,
                 geo.weight(3) + g * P, P, sc.dots.data(), logits + point * d.gp() + g * P);
  });
}

// coef[a*P + p] = w[p] * weight(a)[g*P + p].
template <typename T>
inline void CornerCoef(const TapGeometry<T>& geo, int64_t g, int64_t points, const T* w,
                       T* coef) {
  for (int a = 0; a < 4; ++a) {
    const T* wt = geo.weight(a) + g * points;
    for (int64_t p = 0; p < points; ++p) coef[a * points + p] = w[p] * wt[p];
  }
}

// out = DeformAggregate(weights, value, offsets).
template <typename T>
void DeformAggregate(const ParallelFor& pool, const DeformShape& d, const T* weights,
                     const T* value, const T* offsets, T* out) {
  const int64_t Cg = d.group_channels(), P = d.points;
  ForEachGroupTaps<T>(pool, d, offsets, nullptr, value, [&](int64_t point, int64_t g,
                                                            PointScratch<T>& sc) {
    CornerCoef<T>(sc.geometry, g, P, weights + point * d.gp() + g * P, sc.coef.data());
    RowSum<T>(sc.coef.data(), sc.rows.data(), 4 * P, Cg, out + point * d.channels + g * Cg);
  });
}

// out = DeformAggregate(softmax_P(DeformSimilarity(q, key, offsets)), value, offsets) in one
// pass per output point (logits and weights of a group stay in the scratch); the softmax
// weights go to `weights` (B, sH, sW, GP) unless it is null. q, key, value, offsets and
// out of storage type S (see the header comment), weights of T.
template <typename T, typename S = T>
void DeformForward(const ParallelFor& pool, const DeformShape& d, const S* q, const S* key,
                   const S* value, const S* offsets, S* out, T* weights) {
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points;
  const int64_t image_points = d.high_height() * d.high_width();
  ForEachPoint<T, S>(pool, d, offsets, key, value, PointCost(d), [&](int64_t point,
                                                                     PointScratch<T, S>& sc) {
    const TapGeometry<T>& geo = sc.geometry;
    const int64_t b = point / image_points;
    const T* qp = sc.qrow.Read(q + point * d.dim, 0);
    T* op = sc.orow.Write(out + point * d.channels, 0);
    for (int64_t g = 0; g < d.groups; ++g) {
      sc.key.Rows(geo, g, b, sc.zeros.data(), sc.rows.data());
      DotRows<T>(qp + g * E, sc.rows.data(), 4 * P, E, sc.zeros.data(), sc.dots.data());
      T* w = sc.logits.data();
      CornerSum<T>(geo.weight(0) + g * P, geo.weight(1) + g * P, geo.weight(2) + g * P,
                   geo.weight(3) + g * P, P, sc.dots.data(), w);
      Softmax<T>(w, P, sc.exps.data());
      if (weights != nullptr) std::copy(w, w + P, weights + point * d.gp() + g * P);
      sc.value.Rows(geo, g, b, sc.zeros.data(), sc.rows.data());
      CornerCoef<T>(geo, g, P, w, sc.coef.data());
      RowSum<T>(sc.coef.data(), sc.rows.data(), 4 * P, Cg, op + g * Cg);
    }
    sc.orow.Flush(out + point * d.channels, 0);
  });
}

// ---- Backward, pass 1: per output point ------------------------------------------------

// The per-point half of the backwards. kSim: the similarity's part (needs q, key; gives dq
// and the offsets' share through the logits); kAgg: the aggregation's part (needs grad,
// value, weights; gives the weights' gradient and the offsets' share through the samples).
//  - kSim && kAgg (fused): `dl` is written with the logits' gradient w * (dw - <w, dw>)
//    (0 at dropped points, whose logit is a constant).
//  - kSim only: `dl` is read (the logits' gradient given by the caller).
//  - kAgg only: `dl` is written with the weights' gradient.
// doffsets (B, sH, sW, 2*GP) is written whole (0 for dropped points). grad, q, key, value,
// offsets, dq and doffsets of storage type S; weights and dl of T.
template <typename T, typename S, bool kSim, bool kAgg>
void DeformPointBackward(const ParallelFor& pool, const DeformShape& d, const S* grad,
                         const S* q, const S* key, const S* value, const S* offsets,
                         const T* weights, T* dl, S* dq, S* doffsets) {
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t image_points = d.high_height() * d.high_width();
  const int64_t cost = GP * (4 * ((kSim ? 2 * E : 0) + (kAgg ? Cg : 0)) + 48);
  ForEachPoint<T, S>(pool, d, offsets, key, value, cost, [&](int64_t point,
                                                             PointScratch<T, S>& sc) {
    const TapGeometry<T>& geo = sc.geometry;
    const int64_t b = point / image_points;
    T* doff = sc.doff.Write(doffsets + point * 2 * GP, 0);
    T* dlp = dl + point * GP;
    T* dw = sc.logits.data();  // per p: the weights' gradient, then the logits'
    T* by_w = sc.exps.data();  // per p: d/dpw, then d/dph, of the sampled dot products
    const T* gp = kAgg ? sc.grow.Read(grad + point * d.channels, 0) : nullptr;
    const T* qp = kSim ? sc.qrow.Read(q + point * d.dim, 0) : nullptr;
    T* dqp = kSim ? sc.dqrow.Write(dq + point * d.dim, 0) : nullptr;
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t k0 = g * P;
      const T* valid = geo.valid() + k0;
      if (kAgg) {
        const T* w = weights + point * GP + k0;
        sc.value.Rows(geo, g, b, sc.zeros.data(), sc.rows.data());
        DotRows<T>(gp + g * Cg, sc.rows.data(), 4 * P, Cg, sc.zeros.data(), sc.dots2.data());
        CornerSum<T>(geo.weight(0) + k0, geo.weight(1) + k0, geo.weight(2) + k0,
                     geo.weight(3) + k0, P, sc.dots2.data(), dw);
        CornerSum<T>(geo.d_w(0) + k0, geo.d_w(1) + k0, geo.d_w(2) + k0, geo.d_w(3) + k0, P,
                     sc.dots2.data(), by_w);
        for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p)] = w[p] * by_w[p];
        CornerSum<T>(geo.d_h(0) + k0, geo.d_h(1) + k0, geo.d_h(2) + k0, geo.d_h(3) + k0, P,
                     sc.dots2.data(), by_w);
        for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p) + 1] = w[p] * by_w[p];
        if (kSim) {
          T inner = 0;
          for (int64_t p = 0; p < P; ++p) inner += w[p] * dw[p];
          for (int64_t p = 0; p < P; ++p) dw[p] = valid[p] * (w[p] * (dw[p] - inner));
        }
        std::copy(dw, dw + P, dlp + k0);
      } else {
        for (int64_t p = 0; p < P; ++p) {
          dw[p] = valid[p] != T(0) ? dlp[k0 + p] : T(0);
          doff[2 * (k0 + p)] = 0;
          doff[2 * (k0 + p) + 1] = 0;
        }
      }
      if (kSim) {
        sc.key.Rows(geo, g, b, sc.zeros.data(), sc.rows.data());
        DotRows<T>(qp + g * E, sc.rows.data(), 4 * P, E, sc.zeros.data(), sc.dots.data());
        CornerSum<T>(geo.d_w(0) + k0, geo.d_w(1) + k0, geo.d_w(2) + k0, geo.d_w(3) + k0, P,
                     sc.dots.data(), by_w);
        for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p)] += dw[p] * by_w[p];
        CornerSum<T>(geo.d_h(0) + k0, geo.d_h(1) + k0, geo.d_h(2) + k0, geo.d_h(3) + k0, P,
                     sc.dots.data(), by_w);
        for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p) + 1] += dw[p] * by_w[p];
        CornerCoef<T>(geo, g, P, dw, sc.coef.data());
        RowSum<T>(sc.coef.data(), sc.rows.data(), 4 * P, E, dqp + g * E);
      }
    }
    sc.doff.Flush(doffsets + point * 2 * GP, 0);
    if (kSim) sc.dqrow.Flush(dq + point * d.dim, 0);
  });
}

// ---- Backward, pass 2: the key and value gradients -------------------------------------

// dkey  = sum over (point, k, tap) of key_coef[point, k] * weight(tap) * q[point, group(k)]
// dvalue = sum over (point, k, tap) of value_coef[point, k] * weight(tap) * grad[point, group(k)]
// each added to the tap's cell; either half is skipped when its coefficient is null.
//
// A unit of work owns a band of low-resolution rows of one image (every channel of those
// cells): it walks, in order, the output rows whose points sample that band (their span
// of sampled rows is found first, in a cheap pass over the offsets) and adds the taps
// that land in the band. Any offsets are handled; small ones keep the walk short.
// offsets, q, grad, dkey and dvalue of storage type S (half types: the band's sums are
// kept in T and rounded once at its end), the coefficients of T.
template <typename T, typename S = T>
void DeformScatter(const ParallelFor& pool, const DeformShape& d, const S* offsets,
                   const T* key_coef, const S* q, S* dkey, const T* value_coef, const S* grad,
                   S* dvalue) {
  constexpr bool kDirect = std::is_same<T, S>::value;
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t hh = d.high_height(), hw = d.high_width(), cells = d.height * d.width;
  const bool do_key = key_coef != nullptr, do_value = value_coef != nullptr;
  if (d.batch == 0 || cells == 0) return;
  // 1. The span [lo, hi] of low-resolution rows that each output point's taps touch, and
  //    that of each output row (lo > hi: none).
  std::vector<int32_t> point_span(2 * d.high_points()), row_span(2 * d.batch * hh);
  pool(d.batch * hh, hw * GP * 4, [&](int64_t begin, int64_t end) {
    TapGeometry<T> geo(GP);
    tiled::RowCache<T, S> off(1, 2 * GP);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % hh;
      int64_t row_lo = std::numeric_limits<int32_t>::max(), row_hi = -1;
      for (int64_t j = 0; j < hw; ++j) {
        const int64_t point = row * hw + j;
        geo.Set(off.Read(offsets + point * 2 * GP, 0), GP, static_cast<T>(i / d.up),
                static_cast<T>(j / d.up), d.height, d.width);
        int64_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
        for (int a = 0; a < 4; ++a) {  // cells grow with their row: min/max of cells
          const auto* cell = geo.cell(a);
          for (int64_t k = 0; k < GP; ++k) {
            if (cell[k] < 0) continue;
            lo = std::min<int64_t>(lo, cell[k]);
            hi = std::max<int64_t>(hi, cell[k]);
          }
        }
        lo = hi < 0 ? 1 : lo / d.width;
        hi = hi < 0 ? 0 : hi / d.width;
        point_span[2 * point] = static_cast<int32_t>(lo);
        point_span[2 * point + 1] = static_cast<int32_t>(hi);
        row_lo = std::min(row_lo, lo);
        row_hi = std::max(row_hi, hi);
      }
      row_span[2 * row] = static_cast<int32_t>(row_lo);
      row_span[2 * row + 1] = static_cast<int32_t>(row_hi);
    }
  });
  // 2. Bands of rows: about 16 units in all (fewer, taller bands visit fewer points twice).
  const int64_t band = std::max<int64_t>(1, (d.batch * d.height + 15) / 16);
  const int64_t bands = (d.height + band - 1) / band;
  const int64_t units = d.batch * bands;
  const int64_t cost = band * d.up * hw * GP * (4 * (E + Cg) + 16) * 2;
  constexpr int kSlot = 8;
  pool(units, cost, [&](int64_t begin, int64_t end) {
    TapGeometry<T> geo(GP);
    tiled::RowCache<T, S> off(1, 2 * GP), qrow(1, d.dim), grow(1, d.channels);
    // The band's sums in T (half storage; T storage sums in place).
    std::vector<T> kband(kDirect || !do_key ? 0 : band * d.width * d.dim);
    std::vector<T> vband(kDirect || !do_value ? 0 : band * d.width * d.channels);
    uint8_t used[kSlot * kSlot] = {};
    int order[kSlot * kSlot];
    int64_t slot_cell[kSlot * kSlot];
    T slot_k[kSlot * kSlot], slot_v[kSlot * kSlot];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / bands, r0 = (u % bands) * band;
      const int64_t r1 = std::min(d.height, r0 + band);
      const int64_t c_lo = r0 * d.width, c_hi = r1 * d.width;  // cells of the band
      // dk, dv: the sums of the band's first cell, c_lo.
      S* dk_out = do_key ? dkey + (b * cells + c_lo) * d.dim : nullptr;
      S* dv_out = do_value ? dvalue + (b * cells + c_lo) * d.channels : nullptr;
      T* dk = nullptr;
      T* dv = nullptr;
      if constexpr (kDirect) {
        dk = dk_out;
        dv = dv_out;
      } else {
        dk = do_key ? kband.data() : nullptr;
        dv = do_value ? vband.data() : nullptr;
      }
      if (do_key) std::fill(dk, dk + (c_hi - c_lo) * d.dim, T(0));
      if (do_value) std::fill(dv, dv + (c_hi - c_lo) * d.channels, T(0));
      for (int64_t i = 0; i < hh; ++i) {
        const int64_t row = b * hh + i;
        if (row_span[2 * row + 1] < r0 || row_span[2 * row] >= r1) continue;
        for (int64_t j = 0; j < hw; ++j) {
          const int64_t point = row * hw + j;
          if (point_span[2 * point + 1] < r0 || point_span[2 * point] >= r1) continue;
          geo.Set(off.Read(offsets + point * 2 * GP, 0), GP, static_cast<T>(i / d.up),
                  static_cast<T>(j / d.up), d.height, d.width);
          const int64_t ah = i / d.up, aw = j / d.up;
          const T* qp = do_key ? qrow.Read(q + point * d.dim, 0) : nullptr;
          const T* gp = do_value ? grow.Read(grad + point * d.channels, 0) : nullptr;
          for (int64_t g = 0; g < d.groups; ++g) {
            const T* qg = do_key ? qp + g * E : nullptr;
            const T* gg = do_value ? gp + g * Cg : nullptr;
            auto add = [&](int64_t c, T kw, T vw) {
              if (do_key) Axpy<T>(kw, qg, E, dk + (c - c_lo) * d.dim + g * E);
              if (do_value) Axpy<T>(vw, gg, Cg, dv + (c - c_lo) * d.channels + g * Cg);
            };
            // Taps of the group that share a cell are summed first (all their rows are
            // the same q and grad slices): the taps of nearby points mostly coincide, and
            // every read-modify-write saved counts, the stores being the bottleneck.
            // Cells within kSlot/2 - 1 of the anchor have a slot; others are added alone.
            int touched = 0;
            for (int64_t p = 0; p < P; ++p) {
              const int64_t k = g * P + p;
              const T kc = do_key ? key_coef[point * GP + k] : T(0);
              const T vc = do_value ? value_coef[point * GP + k] : T(0);
              for (int a = 0; a < 4; ++a) {
                const int64_t c = geo.cell(a)[k];
                if (c < c_lo || c >= c_hi) continue;
                const T wt = geo.weight(a)[k];
                const uint64_t sh = uint64_t(geo.h0()[k] + a / 2 - ah + kSlot / 2 - 1);
                const uint64_t sw = uint64_t(geo.w0()[k] + a % 2 - aw + kSlot / 2 - 1);
                if (sh >= uint64_t(kSlot) || sw >= uint64_t(kSlot)) {
                  add(c, kc * wt, vc * wt);
                  continue;
                }
                const int slot = int(sh) * kSlot + int(sw);
                if (!used[slot]) {
                  used[slot] = 1;
                  order[touched++] = slot;
                  slot_cell[slot] = c;
                  slot_k[slot] = 0;
                  slot_v[slot] = 0;
                }
                slot_k[slot] += kc * wt;
                slot_v[slot] += vc * wt;
              }
            }
            for (int t = 0; t < touched; ++t) {
              const int slot = order[t];
              add(slot_cell[slot], slot_k[slot], slot_v[slot]);
              used[slot] = 0;
            }
          }
        }
      }
      if constexpr (!kDirect) {
        if (do_key) RoundRow<S, T>(dk, (c_hi - c_lo) * d.dim, dk_out);
        if (do_value) RoundRow<S, T>(dv, (c_hi - c_lo) * d.channels, dv_out);
      }
    }
  });
}

// ---- Backwards -------------------------------------------------------------------------

// (dq, dkey, doffsets) of DeformSimilarity for the logits' gradient dlogits.
template <typename T>
void DeformSimilarityBackward(const ParallelFor& pool, const DeformShape& d, const T* dlogits,
                              const T* q, const T* key, const T* offsets, T* dq, T* dkey,
                              T* doffsets) {
  DeformPointBackward<T, T, true, false>(pool, d, nullptr, q, key, nullptr, offsets, nullptr,
                                         const_cast<T*>(dlogits), dq, doffsets);
  DeformScatter<T, T>(pool, d, offsets, dlogits, q, dkey, nullptr, nullptr, nullptr);
}

// (dweights, dvalue, doffsets) of DeformAggregate for the output gradient grad.
template <typename T>
void DeformAggregateBackward(const ParallelFor& pool, const DeformShape& d, const T* grad,
                             const T* weights, const T* value, const T* offsets, T* dweights,
                             T* dvalue, T* doffsets) {
  DeformPointBackward<T, T, false, true>(pool, d, grad, nullptr, nullptr, value, offsets,
                                         weights, dweights, nullptr, doffsets);
  DeformScatter<T, T>(pool, d, offsets, nullptr, nullptr, nullptr, weights, grad, dvalue);
}

// (dq, dkey, dvalue, doffsets) of DeformForward for the output gradient grad, given the
// forward's softmax weights. dlogits (B, sH, sW, GP) is the caller's workspace. grad, q,
// key, value, offsets and the four gradients of storage type S; weights and dlogits of T.
template <typename T, typename S = T>
void DeformBackward(const ParallelFor& pool, const DeformShape& d, const S* grad, const S* q,
                    const S* key, const S* value, const S* offsets, const T* weights,
                    T* dlogits, S* dq, S* dkey, S* dvalue, S* doffsets) {
  DeformPointBackward<T, S, true, true>(pool, d, grad, q, key, value, offsets, weights, dlogits,
                                        dq, doffsets);
  DeformScatter<T, S>(pool, d, offsets, dlogits, q, dkey, weights, grad, dvalue);
}

}  // namespace deform
}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_
