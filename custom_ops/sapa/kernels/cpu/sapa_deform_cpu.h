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
// The walk: by low-resolution anchor, whose s x s children (output points) are taken in
// chunks of up to four. The taps of a chunk's points in one group (4 corners of P points
// each; geometry computed a vector of points at a time) mostly land on a few cells around
// the anchor: the chunk lists the cells of the smallest box holding them once
// (ChunkCells; at most 4P cells, else the chunk is halved, and a single point with a
// larger box lists its 4P taps) and works on them as a small dense window, as SAPA-B's
// kernels do: the dot products of the chunk's query (or gradient) rows with every listed
// key (or value) row in one register-blocked pass, each row loaded once for all the
// chunk's points; the taps' coefficients summed per cell and point, then one blocked
// weighted sum of the listed rows per point. A cell outside the map reads a row of zeros.
// (So a non-finite key or value in a listed cell reaches every point of the chunk, through
// a zero weight, where a per-tap walk would reach only the points that sample it.)

// Every backward runs in two passes, neither with atomics nor races, so results are
// deterministic whatever the thread count:
//  1. per chunk (a gather): the dot products of the query and of the output gradient
//     with the listed key and value rows give the logits' and weights' gradients and the
//     offsets' gradients; the query gradient is a weighted sum of the listed key rows.
//  2. the key and value gradients (a scatter: any output point may sample any cell): a
//     unit of work owns a band of low-resolution rows of one image (every channel of its
//     cells), walks in order the anchors whose children's taps reach the band (a first
//     cheap pass over the offsets finds each anchor's span of rows) and, per chunk and
//     group, adds to each listed cell of the band the combination of the chunk's query and
//     gradient rows (one read-modify-write of the cell's row per chunk). Each element is
//     summed by one unit in a fixed order; no (B, sH, sW, G*P, 4, ...) tensor is
//     materialised.
//
// Everything computes in T (float or double). The fused pair also takes its tensors in a
// storage type S (cpu::Half / cpu::BFloat16 of simd.h, computed in float): a unit of work
// converts the rows it reads as it reads them (query, gradient and offsets rows per output
// point; each sampled (group, cell) slice of key and value once per tile, where the tile's
// points mostly sample the same cells) and rounds what it writes once (output rows per
// point, key and value gradients per band); no whole-tensor copy exists. The softmax
// weights and dlogits stay in T. The halves take T only.
// Workspace: the fused backward needs dlogits (B, sH, sW, GP) of T from the caller; the
// scatter allocates its row spans (2 int32 per anchor and per anchor row).

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

// y[i] += sum_{c < NC} coef[c] * xs[c][i] for i < n: one read-modify-write of y for NC
// rows.
template <typename T, int NC>
inline void AddCombination(const T* coef, const T* const* xs, int64_t n, T* __restrict y) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  V cv[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) cv[c] = Broadcast<T>(coef[c]);
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    V a0 = Load(y + i), a1 = Load(y + i + L);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      a0 += cv[c] * Load(xs[c] + i);
      a1 += cv[c] * Load(xs[c] + i + L);
    }
    Store(y + i, a0);
    Store(y + i + L, a1);
  }
  for (; i + L <= n; i += L) {
    V a0 = Load(y + i);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) a0 += cv[c] * Load(xs[c] + i);
    Store(y + i, a0);
  }
  for (; i < n; ++i) {
    T a = y[i];
    for (int c = 0; c < NC; ++c) a += coef[c] * xs[c][i];
    y[i] = a;
  }
}

// out[c*m + k] = <xs[c], rows[k]> for c < NC, k < m, vectors of length n: 8/NC rows per
// pass through the xs, whose 8 accumulators are reduced together (HorizontalSum8, where
// one reduction per sum would cost as much as the products at n = 32); a last partial
// block reads `zeros` (n zeros) in place of the missing rows.
template <typename T, int NC>
void ChunkDots(const T* const* xs, const T* const* rows, int64_t m, int64_t n, const T* zeros,
               T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes, R = 8 / NC;
  const int64_t nv = n - n % L;
  for (int64_t k = 0; k < m; k += R) {
    const T* r[R];
    for (int j = 0; j < R; ++j) r[j] = k + j < m ? rows[k + j] : zeros;
    V a[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = Broadcast<T>(0);
    for (int64_t i = 0; i < nv; i += L) {
      V rv[R];
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) rv[j] = Load(r[j] + i);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
        const V xv = Load(xs[c] + i);
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) a[c * R + j] += xv * rv[j];
      }
    }
    T sums[8];
    HorizontalSum8<T>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], sums);
    const int rc = static_cast<int>(std::min<int64_t>(R, m - k));
    if (nv == n && rc == R) {
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) {
#pragma GCC unroll 8
        for (int j = 0; j < R; ++j) out[c * m + k + j] = sums[c * R + j];
      }
      continue;
    }
    for (int c = 0; c < NC; ++c) {
      for (int j = 0; j < rc; ++j) {
        T t = sums[c * R + j];
        for (int64_t i = nv; i < n; ++i) t += xs[c][i] * r[j][i];
        out[c * m + k + j] = t;
      }
    }
  }
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

// ---- The anchor walk -------------------------------------------------------------------

// Rows of one map (key or value, `stride` channels a cell, group g's `width` channels from
// g * width) in the compute type T. Storage T: pointers into the map. Storage S (half
// types): a (group, cell) slice is converted into the buffer on its first use within a
// tile and reused by the tile's later chunks; EndTile forgets them. A null map: never read.
template <typename T, typename S>
class TapSource {
 public:
  static constexpr bool kDirect = std::is_same<T, S>::value;

  TapSource(const DeformShape& d, const S* map, int64_t stride, int64_t width,
            int64_t tile_points)
      : map_(map), cells_(d.height * d.width), stride_(stride), width_(width) {
    if constexpr (!kDirect) {
      if (map == nullptr) return;
      slot_.assign(d.groups * cells_, -1);
      // At most every slice of the image, or every tap of the tile's points a new one;
      // left uninitialised (pages of a large bound that the tile never reaches stay
      // untouched).
      const int64_t capacity = std::min(d.groups * cells_, tile_points * 4 * d.gp());
      buf_.reset(new T[capacity * width + 1]);
    }
  }

  // The row of cell `cell` (within image `image`), group g.
  const T* Row(int64_t g, int64_t image, int64_t cell) {
    if constexpr (kDirect) {
      return map_ + (image * cells_ + cell) * stride_ + g * width_;
    } else {
      int32_t& slot = slot_[g * cells_ + cell];
      if (slot < 0) {
        slot = static_cast<int32_t>(touched_.size());
        touched_.push_back(static_cast<int32_t>(g * cells_ + cell));
        ConvertRow<T, S>(map_ + (image * cells_ + cell) * stride_ + g * width_, width_,
                         buf_.get() + slot * width_);
      }
      return buf_.get() + slot * width_;
    }
  }

  void EndTile() {
    if constexpr (!kDirect) {
      for (const int32_t i : touched_) slot_[i] = -1;
      touched_.clear();
    }
  }

 private:
  const S* map_;
  int64_t cells_, stride_, width_;
  std::vector<int32_t> slot_, touched_;
  std::unique_ptr<T[]> buf_;
};

// The low-resolution rows that the taps of one group of n <= 4 output points (of one
// anchor) read, listed for a chunk: Build lists slots (cells()[slot], -1: a row of zeros,
// for a cell outside the map or outside [lo, hi)) and gives corner a of point p of the
// c-th point the slot base(c)[p] + offset(a). Two layouts:
//  - box: the slots are the cells of the smallest box holding every kept point's four
//    corners (row-major, bw wide; offsets 0, 1, bw, bw + 1): taps on one cell share its
//    slot. Used when the box has at most 4P cells (at most the taps of one point; the
//    chunk's points share them). A dropped point's base is 0 (its weights are 0).
//  - taps (one point whose box is larger): a slot per tap (offsets 0, P, 2P, 3P).
// Build returns the number of slots, or -1 for a chunk of several points whose box is too
// large (to be halved).
template <typename T>
class ChunkCells {
 public:
  explicit ChunkCells(const DeformShape& d)
      : points_(d.points), width_(d.width), height_(d.height), base_(4 * d.points),
        cells_(4 * d.points) {}

  int64_t Build(const TapGeometry<T>* geos, int n, int64_t g, int64_t lo, int64_t hi) {
    const int64_t P = points_, k0 = g * P;
    int64_t hmin = std::numeric_limits<int32_t>::max(), wmin = hmin, hmax = -hmin, wmax = -hmin;
    for (int c = 0; c < n; ++c) {
      const auto* h0 = geos[c].h0() + k0;
      const auto* w0 = geos[c].w0() + k0;
      const T* valid = geos[c].valid() + k0;
      for (int64_t p = 0; p < P; ++p) {
        if (valid[p] == T(0)) continue;
        hmin = std::min<int64_t>(hmin, h0[p]);
        hmax = std::max<int64_t>(hmax, h0[p]);
        wmin = std::min<int64_t>(wmin, w0[p]);
        wmax = std::max<int64_t>(wmax, w0[p]);
      }
    }
    if (hmax < hmin) hmin = hmax = wmin = wmax = 0;  // no kept point: every weight is 0
    const int64_t bh = hmax - hmin + 2, bw = wmax - wmin + 2, box = bh * bw;
    if (box <= 4 * P) {
      for (int64_t r = 0; r < bh; ++r) {
        const int64_t h = hmin + r;
        for (int64_t x = 0; x < bw; ++x) {
          const int64_t w = wmin + x, cell = h * width_ + w;
          const bool in = h >= 0 && h < height_ && w >= 0 && w < width_ && cell >= lo && cell < hi;
          cells_[r * bw + x] = in ? static_cast<int32_t>(cell) : -1;
        }
      }
      for (int c = 0; c < n; ++c) {
        const auto* h0 = geos[c].h0() + k0;
        const auto* w0 = geos[c].w0() + k0;
        const T* valid = geos[c].valid() + k0;
        int32_t* base = base_.data() + c * P;
        for (int64_t p = 0; p < P; ++p) {
          base[p] = valid[p] != T(0) ? static_cast<int32_t>((h0[p] - hmin) * bw + w0[p] - wmin)
                                     : 0;
        }
      }
      offset_[0] = 0;
      offset_[1] = 1;
      offset_[2] = static_cast<int32_t>(bw);
      offset_[3] = static_cast<int32_t>(bw + 1);
      return box;
    }
    if (n > 1) return -1;
    for (int a = 0; a < 4; ++a) {
      const auto* cell = geos[0].cell(a) + k0;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t x = cell[p];
        cells_[a * P + p] = x >= lo && x < hi ? static_cast<int32_t>(x) : -1;
      }
      offset_[a] = static_cast<int32_t>(a * P);
    }
    for (int64_t p = 0; p < P; ++p) base_[p] = static_cast<int32_t>(p);
    return 4 * P;
  }

  const int32_t* base(int c) const { return base_.data() + c * points_; }
  const int32_t* offsets() const { return offset_; }
  const int32_t* cells() const { return cells_.data(); }

 private:
  int64_t points_, width_, height_;
  int32_t offset_[4] = {0, 0, 0, 0};
  std::vector<int32_t> base_, cells_;
};

// Per-range scratch of the anchor walks: the s*s children of the current anchor (flat
// output points and tap geometries), the union of a chunk's cells, the map sources, and
// row caches of up to four points in T (read: converted from S; write: rounded into S by
// Flush; with S = T the tensors' own rows).
template <typename T, typename S = T>
struct AnchorScratch {
  AnchorScratch(const DeformShape& d, const S* key, const S* value, int64_t tile_points)
      : points(d.up * d.up), union_(d), key(d, key, d.dim, d.group_dim(), tile_points),
        value(d, value, d.channels, d.group_channels(), tile_points), off(1, 2 * d.gp()),
        doff(d.up * d.up, 2 * d.gp()), qrow(d.up * d.up, d.dim), dqrow(d.up * d.up, d.dim),
        grow(d.up * d.up, d.channels), orow(d.up * d.up, d.channels), qp(d.up * d.up),
        gp(d.up * d.up), op(d.up * d.up), dqp(d.up * d.up), doffp(d.up * d.up),
        rows(16 * d.points), dots(64 * d.points), dots2(64 * d.points), coef(64 * d.points),
        coef2(64 * d.points), w(4 * d.points + 8), dw(4 * d.points + 8), exps(d.points + 8),
        by(d.points + 8), corners(16 * (8 * d.points + 2)),
        zeros(std::max(d.group_dim(), d.group_channels()) + 8, T(0)) {
    geo.reserve(d.up * d.up);
    for (int64_t i = 0; i < d.up * d.up; ++i) geo.emplace_back(d.gp());
  }
  std::vector<int64_t> points;
  std::vector<TapGeometry<T>> geo;
  ChunkCells<T> union_;
  TapSource<T, S> key, value;
  // Row caches (a slot per child) and the children's rows in T: query, gradient (read),
  // output, query gradient, offsets gradient (written).
  tiled::RowCache<T, S> off, doff, qrow, dqrow, grow, orow;
  std::vector<const T*> qp, gp;
  std::vector<T*> op, dqp, doffp;
  std::vector<const T*> rows;
  std::vector<T> dots, dots2, coef, coef2, w, dw, exps, by, corners, zeros;
};

// Runs fn(image, scratch) for every low-resolution anchor on the pool, with scratch.points
// and scratch.geo holding its s*s children (row-major) and their taps. Units of work are
// square tiles of anchors (about 8 x 8 output points): the key and value rows that a tile
// gathers come from a small region of the maps, which stays in cache while the tile is
// walked. point_cost: the cost of one output point.
template <typename T, typename S, typename Fn>
void ForEachAnchor(const ParallelFor& pool, const DeformShape& d, const S* offsets,
                   const S* key, const S* value, int64_t point_cost, Fn fn) {
  const int64_t s = d.up, ss = s * s, ta = std::max<int64_t>(1, 8 / s);
  const int64_t hh = d.high_height(), hw = d.high_width(), GP = d.gp();
  const int64_t tiles_h = (d.height + ta - 1) / ta, tiles_w = (d.width + ta - 1) / ta;
  pool(d.batch * tiles_h * tiles_w, point_cost * ta * ta * ss, [&](int64_t begin,
                                                                    int64_t end) {
    AnchorScratch<T, S> sc(d, key, value, ta * ta * ss);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t tj = u % tiles_w, ti = (u / tiles_w) % tiles_h, b = u / (tiles_w * tiles_h);
      const int64_t h1 = std::min(d.height, (ti + 1) * ta), w1 = std::min(d.width, (tj + 1) * ta);
      for (int64_t h = ti * ta; h < h1; ++h) {
        for (int64_t w = tj * ta; w < w1; ++w) {
          for (int64_t c = 0; c < ss; ++c) {
            const int64_t point = (b * hh + h * s + c / s) * hw + w * s + c % s;
            sc.points[c] = point;
            sc.geo[c].Set(sc.off.Read(offsets + point * 2 * GP, 0), GP, static_cast<T>(h),
                          static_cast<T>(w), d.height, d.width);
          }
          fn(b, sc);
        }
      }
      sc.key.EndTile();
      sc.value.EndTile();
    }
  });
}

// Runs fn(nc, first, m) over the children [first, first + NC) of the current anchor, with
// sc.union_ holding the m slots of their taps in group g within cells [lo, hi) (nc a
// std::integral_constant of the chunk's size); a chunk whose box is too large is halved.
template <int NC, typename T, typename S, typename Fn>
void RunChunk(AnchorScratch<T, S>& sc, int64_t first, int64_t g, int64_t lo, int64_t hi,
              Fn& fn) {
  const int64_t m = sc.union_.Build(sc.geo.data() + first, NC, g, lo, hi);
  if constexpr (NC > 1) {
    if (m < 0) {
      RunChunk<NC / 2>(sc, first, g, lo, hi, fn);
      RunChunk<NC / 2>(sc, first + NC / 2, g, lo, hi, fn);
      return;
    }
  }
  fn(std::integral_constant<int, NC>(), first, m);
}

// RunChunk over all children of the anchor (chunks of 4, then 2, then 1), group g.
template <typename T, typename S, typename Fn>
void ForEachChunk(AnchorScratch<T, S>& sc, const DeformShape& d, int64_t g, int64_t lo,
                  int64_t hi, Fn fn) {
  ForGroups(d.up * d.up, [&](auto nc, int64_t first) {
    RunChunk<decltype(nc)::value>(sc, first, g, lo, hi, fn);
  });
}

// rows[i] = the row of listed cell i (i < m) of group g from source, or zeros.
template <typename T, typename S>
inline void ListRows(TapSource<T, S>& source, const ChunkCells<T>& cells, int64_t g,
                     int64_t image, int64_t m, const T* zeros, const T** rows) {
  const int32_t* list = cells.cells();
  for (int64_t i = 0; i < m; ++i) rows[i] = list[i] >= 0 ? source.Row(g, image, list[i]) : zeros;
}

// out[p] = sum over corners a of coef(a)[p] * values[base[p] + offsets[a]], p < P;
// coef(a) = geo.weight(a), d_w(a) or d_h(a) (Which = 0, 1, 2) of group g (0 for a tap
// outside the map or of a dropped point).
template <int Which, typename T>
inline void SlotSum(const TapGeometry<T>& geo, int64_t g, int64_t P, const ChunkCells<T>& cells,
                    int c, const T* values, T* out) {
  const T* k[4];
  for (int a = 0; a < 4; ++a)
    k[a] = (Which == 0 ? geo.weight(a) : Which == 1 ? geo.d_w(a) : geo.d_h(a)) + g * P;
  const int32_t* base = cells.base(c);
  const int32_t* off = cells.offsets();
  const T *v0 = values + off[0], *v1 = values + off[1], *v2 = values + off[2],
          *v3 = values + off[3];
  for (int64_t p = 0; p < P; ++p) {
    const int32_t x = base[p];
    out[p] = k[0][p] * v0[x] + k[1][p] * v1[x] + k[2][p] * v2[x] + k[3][p] * v3[x];
  }
}

// coef[slot * NC + c] = sum over the taps (a, p) of the chunk's c-th point on that slot
// of ws[c][p] * weight(a)[g*P + p], for the m slots and c < NC. Each corner a has its own
// plane in `planes` (4 (offsets[3] + m) NC entries), indexed by the point's base slot, so
// that the four corners of a point update four independent entries (a scalar update per
// tap on its own slot would wait on the store of the last tap on that slot, which is the
// common case); then each slot sums its four corner planes, shifted by the corners'
// offsets, in one vectorisable pass.
template <typename T, int NC>
inline void ChunkCoef(const TapGeometry<T>* geos, int64_t g, int64_t P,
                      const ChunkCells<T>& cells, int64_t m, const T* const* ws,
                      T* __restrict planes, T* __restrict coef) {
  const int32_t* off = cells.offsets();
  const int64_t pad = off[3], size = (pad + m) * NC;
  std::fill(planes, planes + 4 * size, T(0));
  T* __restrict p0 = planes;
  T* __restrict p1 = planes + size;
  T* __restrict p2 = planes + 2 * size;
  T* __restrict p3 = planes + 3 * size;
  for (int c = 0; c < NC; ++c) {
    const int32_t* base = cells.base(c);
    const T* w = ws[c];
    const T *w0 = geos[c].weight(0) + g * P, *w1 = geos[c].weight(1) + g * P,
            *w2 = geos[c].weight(2) + g * P, *w3 = geos[c].weight(3) + g * P;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = (pad + base[p]) * NC + c;
      const T wp = w[p];
      p0[i] += wp * w0[p];
      p1[i] += wp * w1[p];
      p2[i] += wp * w2[p];
      p3[i] += wp * w3[p];
    }
  }
  const T* q0 = p0 + pad * NC;
  const T* q1 = p1 + (pad - off[1]) * NC;
  const T* q2 = p2 + (pad - off[2]) * NC;
  const T* q3 = p3 + (pad - off[3]) * NC;
  for (int64_t i = 0; i < m * NC; ++i) coef[i] = q0[i] + q1[i] + q2[i] + q3[i];
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

// Runs fn(b, sc, g, nc, first, m) for every chunk of every anchor and group g on the pool
// (ForEachAnchor, then ForEachChunk over the whole map), for the halves.
template <typename T, typename Fn>
void ForEachGroupChunk(const ParallelFor& pool, const DeformShape& d, const T* offsets,
                       const T* key, const T* value, int64_t point_cost, Fn fn) {
  const int64_t cells = d.height * d.width;
  ForEachAnchor<T, T>(pool, d, offsets, key, value, point_cost,
                      [&](int64_t b, AnchorScratch<T>& sc) {
    for (int64_t g = 0; g < d.groups; ++g) {
      ForEachChunk(sc, d, g, 0, cells, [&](auto nc, int64_t first, int64_t m) {
        fn(b, sc, g, nc, first, m);
      });
    }
  });
}

// logits = DeformSimilarity(q, key, offsets).
template <typename T>
void DeformSimilarity(const ParallelFor& pool, const DeformShape& d, const T* q, const T* key,
                      const T* offsets, T* logits) {
  const int64_t E = d.group_dim(), P = d.points, GP = d.gp();
  ForEachGroupChunk<T>(pool, d, offsets, key, nullptr, GP * (4 * E + 24),
                       [&](int64_t b, AnchorScratch<T>& sc, int64_t g, auto nc, int64_t first,
                           int64_t m) {
    constexpr int NC = decltype(nc)::value;
    const T* xs[NC];
    for (int c = 0; c < NC; ++c) xs[c] = q + sc.points[first + c] * d.dim + g * E;
    ListRows(sc.key, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
    ChunkDots<T, NC>(xs, sc.rows.data(), m, E, sc.zeros.data(), sc.dots.data());
    for (int c = 0; c < NC; ++c) {
      SlotSum<0>(sc.geo[first + c], g, P, sc.union_, c, sc.dots.data() + c * m,
                 logits + sc.points[first + c] * GP + g * P);
    }
  });
}

// out = DeformAggregate(weights, value, offsets).
template <typename T>
void DeformAggregate(const ParallelFor& pool, const DeformShape& d, const T* weights,
                     const T* value, const T* offsets, T* out) {
  const int64_t Cg = d.group_channels(), P = d.points, GP = d.gp();
  ForEachGroupChunk<T>(pool, d, offsets, nullptr, value, GP * (4 * Cg + 24),
                       [&](int64_t b, AnchorScratch<T>& sc, int64_t g, auto nc, int64_t first,
                           int64_t m) {
    constexpr int NC = decltype(nc)::value;
    T* outs[NC];
    const T* ws[NC];
    for (int c = 0; c < NC; ++c) {
      const int64_t point = sc.points[first + c];
      ws[c] = weights + point * GP + g * P;
      outs[c] = out + point * d.channels + g * Cg;
    }
    ChunkCoef<T, NC>(sc.geo.data() + first, g, P, sc.union_, m, ws, sc.corners.data(),
                     sc.coef.data());
    ListRows(sc.value, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
    MultiWeightedRowSum<T, NC>(sc.coef.data(), sc.rows.data(), m, Cg, outs);
  });
}

// out = DeformAggregate(softmax_P(DeformSimilarity(q, key, offsets)), value, offsets) in one
// pass per chunk (logits and weights of a group stay in the scratch); the softmax weights
// go to `weights` (B, sH, sW, GP) unless it is null. q, key, value, offsets and out of
// storage type S (see the header comment), weights of T.
template <typename T, typename S = T>
void DeformForward(const ParallelFor& pool, const DeformShape& d, const S* q, const S* key,
                   const S* value, const S* offsets, S* out, T* weights) {
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t cells = d.height * d.width, ss = d.up * d.up;
  ForEachAnchor<T, S>(pool, d, offsets, key, value, PointCost(d),
                      [&](int64_t b, AnchorScratch<T, S>& sc) {
    for (int64_t c = 0; c < ss; ++c) {
      sc.qp[c] = sc.qrow.Read(q + sc.points[c] * d.dim, c);
      sc.op[c] = sc.orow.Write(out + sc.points[c] * d.channels, c);
    }
    for (int64_t g = 0; g < d.groups; ++g) {
      ForEachChunk(sc, d, g, 0, cells, [&](auto nc, int64_t first, int64_t m) {
        constexpr int NC = decltype(nc)::value;
        const T* xs[NC];
        T* outs[NC];
        for (int c = 0; c < NC; ++c) {
          xs[c] = sc.qp[first + c] + g * E;
          outs[c] = sc.op[first + c] + g * Cg;
        }
        ListRows(sc.key, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
        ChunkDots<T, NC>(xs, sc.rows.data(), m, E, sc.zeros.data(), sc.dots.data());
        const T* ws[NC];
        for (int c = 0; c < NC; ++c) {
          T* w = sc.w.data() + c * P;
          SlotSum<0>(sc.geo[first + c], g, P, sc.union_, c, sc.dots.data() + c * m, w);
          Softmax<T>(w, P, sc.exps.data());
          if (weights != nullptr) std::copy(w, w + P, weights + sc.points[first + c] * GP + g * P);
          ws[c] = w;
        }
        ChunkCoef<T, NC>(sc.geo.data() + first, g, P, sc.union_, m, ws, sc.corners.data(),
                         sc.coef.data());
        ListRows(sc.value, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
        MultiWeightedRowSum<T, NC>(sc.coef.data(), sc.rows.data(), m, Cg, outs);
      });
    }
    for (int64_t c = 0; c < ss; ++c) sc.orow.Flush(out + sc.points[c] * d.channels, c);
  });
}

// ---- Backward, pass 1: per chunk -------------------------------------------------------

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
  const int64_t cells = d.height * d.width, ss = d.up * d.up;
  const int64_t cost = GP * (4 * ((kSim ? 2 * E : 0) + (kAgg ? Cg : 0)) + 48);
  ForEachAnchor<T, S>(pool, d, offsets, key, value, cost,
                      [&](int64_t b, AnchorScratch<T, S>& sc) {
    for (int64_t c = 0; c < ss; ++c) {
      const int64_t point = sc.points[c];
      if (kAgg) sc.gp[c] = sc.grow.Read(grad + point * d.channels, c);
      if (kSim) {
        sc.qp[c] = sc.qrow.Read(q + point * d.dim, c);
        sc.dqp[c] = sc.dqrow.Write(dq + point * d.dim, c);
      }
      sc.doffp[c] = sc.doff.Write(doffsets + point * 2 * GP, c);
    }
    for (int64_t g = 0; g < d.groups; ++g) {
      ForEachChunk(sc, d, g, 0, cells, [&](auto nc, int64_t first, int64_t m) {
        constexpr int NC = decltype(nc)::value;
        const int64_t k0 = g * P;
        const T* xs[NC];
        if (kAgg) {
          for (int c = 0; c < NC; ++c) xs[c] = sc.gp[first + c] + g * Cg;
          ListRows(sc.value, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
          ChunkDots<T, NC>(xs, sc.rows.data(), m, Cg, sc.zeros.data(), sc.dots2.data());
        }
        if (kSim) {  // the key rows stay listed for dq
          for (int c = 0; c < NC; ++c) xs[c] = sc.qp[first + c] + g * E;
          ListRows(sc.key, sc.union_, g, b, m, sc.zeros.data(), sc.rows.data());
          ChunkDots<T, NC>(xs, sc.rows.data(), m, E, sc.zeros.data(), sc.dots.data());
        }
        const T* ws[NC];
        for (int c = 0; c < NC; ++c) {
          const TapGeometry<T>& geo = sc.geo[first + c];
          const int64_t point = sc.points[first + c];
          const T* valid = geo.valid() + k0;
          T* doff = sc.doffp[first + c];
          T* dw = sc.dw.data() + c * P;  // per p: the weights' gradient, then the logits'
          ws[c] = dw;
          T* by = sc.by.data();  // per p: d/dpw, then d/dph, of the sampled dot products
          T* dlp = dl + point * GP + k0;
          if (kAgg) {
            const T* w = weights + point * GP + k0;
            const T* dots2 = sc.dots2.data() + c * m;
            SlotSum<0>(geo, g, P, sc.union_, c, dots2, dw);
            SlotSum<1>(geo, g, P, sc.union_, c, dots2, by);
            for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p)] = w[p] * by[p];
            SlotSum<2>(geo, g, P, sc.union_, c, dots2, by);
            for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p) + 1] = w[p] * by[p];
            if (kSim) {
              T inner = 0;
              for (int64_t p = 0; p < P; ++p) inner += w[p] * dw[p];
              for (int64_t p = 0; p < P; ++p) dw[p] = valid[p] * (w[p] * (dw[p] - inner));
            }
            std::copy(dw, dw + P, dlp);
          } else {
            for (int64_t p = 0; p < P; ++p) {
              dw[p] = valid[p] != T(0) ? dlp[p] : T(0);
              doff[2 * (k0 + p)] = 0;
              doff[2 * (k0 + p) + 1] = 0;
            }
          }
          if (kSim) {
            const T* dots = sc.dots.data() + c * m;
            SlotSum<1>(geo, g, P, sc.union_, c, dots, by);
            for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p)] += dw[p] * by[p];
            SlotSum<2>(geo, g, P, sc.union_, c, dots, by);
            for (int64_t p = 0; p < P; ++p) doff[2 * (k0 + p) + 1] += dw[p] * by[p];
          }
        }
        if (kSim) {
          ChunkCoef<T, NC>(sc.geo.data() + first, g, P, sc.union_, m, ws, sc.corners.data(),
                           sc.coef.data());
          T* outs[NC];
          for (int c = 0; c < NC; ++c) outs[c] = sc.dqp[first + c] + g * E;
          MultiWeightedRowSum<T, NC>(sc.coef.data(), sc.rows.data(), m, E, outs);
        }
      });
    }
    for (int64_t c = 0; c < ss; ++c) {
      sc.doff.Flush(doffsets + sc.points[c] * 2 * GP, c);
      if (kSim) sc.dqrow.Flush(dq + sc.points[c] * d.dim, c);
    }
  });
}

// ---- Backward, pass 2: the key and value gradients -------------------------------------

// dkey  = sum over (point, k, tap) of key_coef[point, k] * weight(tap) * q[point, group(k)]
// dvalue = sum over (point, k, tap) of value_coef[point, k] * weight(tap) * grad[point, group(k)]
// each added to the tap's cell; either half is skipped when its coefficient is null.
//
// A unit of work owns a band of low-resolution rows of one image (every channel of those
// cells): it walks, in order, the anchors whose children sample that band (their span of
// sampled rows is found first, in a cheap pass over the offsets) and adds the taps that
// land in the band, a chunk's taps on one cell summed first (one read-modify-write of the
// cell's row per chunk and group). Any offsets are handled; small ones keep the walk short.
// offsets, q, grad, dkey and dvalue of storage type S (half types: the band's sums are
// kept in T and rounded once at its end), the coefficients of T.
template <typename T, typename S = T>
void DeformScatter(const ParallelFor& pool, const DeformShape& d, const S* offsets,
                   const T* key_coef, const S* q, S* dkey, const T* value_coef, const S* grad,
                   S* dvalue) {
  constexpr bool kDirect = std::is_same<T, S>::value;
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t s = d.up, ss = s * s, hh = d.high_height(), hw = d.high_width();
  const int64_t cells = d.height * d.width;
  const bool do_key = key_coef != nullptr, do_value = value_coef != nullptr;
  if (d.batch == 0 || cells == 0) return;
  auto set_children = [&](AnchorScratch<T, S>& sc, int64_t b, int64_t h, int64_t w) {
    for (int64_t c = 0; c < ss; ++c) {
      const int64_t point = (b * hh + h * s + c / s) * hw + w * s + c % s;
      sc.points[c] = point;
      sc.geo[c].Set(sc.off.Read(offsets + point * 2 * GP, 0), GP, static_cast<T>(h),
                    static_cast<T>(w), d.height, d.width);
    }
  };
  // 1. The span [lo, hi] of low-resolution rows that the taps of each anchor's children
  //    touch, and that of each anchor row (lo > hi: none).
  std::vector<int32_t> anchor_span(2 * d.low_points()), row_span(2 * d.batch * d.height);
  pool(d.batch * d.height, d.width * ss * GP * 4, [&](int64_t begin, int64_t end) {
    AnchorScratch<T, S> sc(d, nullptr, nullptr, 0);
    for (int64_t row = begin; row < end; ++row) {
      int64_t row_lo = std::numeric_limits<int32_t>::max(), row_hi = -1;
      for (int64_t w = 0; w < d.width; ++w) {
        set_children(sc, row / d.height, row % d.height, w);
        int64_t lo = std::numeric_limits<int32_t>::max(), hi = -1;
        for (int64_t c = 0; c < ss; ++c) {
          for (int a = 0; a < 4; ++a) {  // cells grow with their row: min/max of cells
            const auto* cell = sc.geo[c].cell(a);
            for (int64_t k = 0; k < GP; ++k) {
              if (cell[k] < 0) continue;
              lo = std::min<int64_t>(lo, cell[k]);
              hi = std::max<int64_t>(hi, cell[k]);
            }
          }
        }
        lo = hi < 0 ? 1 : lo / d.width;
        hi = hi < 0 ? 0 : hi / d.width;
        const int64_t anchor = row * d.width + w;
        anchor_span[2 * anchor] = static_cast<int32_t>(lo);
        anchor_span[2 * anchor + 1] = static_cast<int32_t>(hi);
        row_lo = std::min(row_lo, lo);
        row_hi = std::max(row_hi, hi);
      }
      row_span[2 * row] = static_cast<int32_t>(row_lo);
      row_span[2 * row + 1] = static_cast<int32_t>(row_hi);
    }
  });
  // 2. Bands of rows: about 16 units in all (fewer, taller bands visit fewer anchors twice).
  const int64_t band = std::max<int64_t>(1, (d.batch * d.height + 15) / 16);
  const int64_t bands = (d.height + band - 1) / band;
  const int64_t units = d.batch * bands;
  const int64_t cost = band * d.width * ss * GP * (4 * (E + Cg) + 16) * 2;
  pool(units, cost, [&](int64_t begin, int64_t end) {
    AnchorScratch<T, S> sc(d, nullptr, nullptr, 0);
    // The band's sums in T (half storage; T storage sums in place).
    std::vector<T> kband(kDirect || !do_key ? 0 : band * d.width * d.dim);
    std::vector<T> vband(kDirect || !do_value ? 0 : band * d.width * d.channels);
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
      for (int64_t h = 0; h < d.height; ++h) {
        const int64_t row = b * d.height + h;
        if (row_span[2 * row + 1] < r0 || row_span[2 * row] >= r1) continue;
        for (int64_t w = 0; w < d.width; ++w) {
          const int64_t anchor = row * d.width + w;
          if (anchor_span[2 * anchor + 1] < r0 || anchor_span[2 * anchor] >= r1) continue;
          set_children(sc, b, h, w);
          for (int64_t c = 0; c < ss; ++c) {
            if (do_key) sc.qp[c] = sc.qrow.Read(q + sc.points[c] * d.dim, c);
            if (do_value) sc.gp[c] = sc.grow.Read(grad + sc.points[c] * d.channels, c);
          }
          for (int64_t g = 0; g < d.groups; ++g) {
            ForEachChunk(sc, d, g, c_lo, c_hi, [&](auto nc, int64_t first, int64_t m) {
              constexpr int NC = decltype(nc)::value;
              const T* kx[NC];
              const T* vx[NC];
              const T* kw[NC];
              const T* vw[NC];
              for (int c = 0; c < NC; ++c) {
                const int64_t point = sc.points[first + c];
                kx[c] = do_key ? sc.qp[first + c] + g * E : nullptr;
                vx[c] = do_value ? sc.gp[first + c] + g * Cg : nullptr;
                kw[c] = do_key ? key_coef + point * GP + g * P : nullptr;
                vw[c] = do_value ? value_coef + point * GP + g * P : nullptr;
              }
              const TapGeometry<T>* geos = sc.geo.data() + first;
              if (do_key) {
                ChunkCoef<T, NC>(geos, g, P, sc.union_, m, kw, sc.corners.data(),
                                 sc.coef.data());
              }
              if (do_value) {
                ChunkCoef<T, NC>(geos, g, P, sc.union_, m, vw, sc.corners.data(),
                                 sc.coef2.data());
              }
              const int32_t* list = sc.union_.cells();
              for (int64_t i = 0; i < m; ++i) {
                if (list[i] < 0) continue;
                const int64_t cell = list[i] - c_lo;
                if (do_key) {
                  AddCombination<T, NC>(sc.coef.data() + i * NC, kx, E,
                                        dk + cell * d.dim + g * E);
                }
                if (do_value) {
                  AddCombination<T, NC>(sc.coef2.data() + i * NC, vx, Cg,
                                        dv + cell * d.channels + g * Cg);
                }
              }
            });
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
