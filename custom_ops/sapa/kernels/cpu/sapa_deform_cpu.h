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
// Every backward runs in two passes, neither with atomics nor races, so results are
// deterministic whatever the thread count:
//  1. per output point (a gather): the dot products of the query and of the output
//     gradient with the taps' key and value rows give the logits' and weights' gradients
//     and the offsets' gradients; the query gradient is a weighted sum of key rows.
//  2. the key and value gradients (a scatter: any output point may sample any cell) are
//     split by image and by channel slice: a unit of work owns the slice [c0, c1) of one
//     group of one image of dkey and dvalue, walks every output point of that image in
//     order and adds its taps' contributions to that slice only. Each element is summed
//     by one unit in a fixed order; no (B, sH, sW, G*P, 4, ...) tensor is materialised.
//
// Everything computes in T (float or double); half-precision callers convert to float.
// Workspace: the fused backward needs dlogits (B, sH, sW, GP) of T from the caller.

#ifndef KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_
#define KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "sapa_cpu.h"
#include "simd.h"

namespace keras_sapa {
namespace cpu {
namespace deform {

// Sizes of one call. Products are formed in int64.
struct DeformShape {
  int64_t batch = 0;
  int64_t height = 0;    // low-resolution H
  int64_t width = 0;     // low-resolution W
  int64_t up = 1;        // s
  int64_t points = 1;    // P, per group
  int64_t groups = 1;    // G
  int64_t dim = 0;       // D = G*E, channels of query and key
  int64_t channels = 0;  // C, channels of value and out

  int64_t high_height() const { return height * up; }
  int64_t high_width() const { return width * up; }
  int64_t high_points() const { return batch * high_height() * high_width(); }
  int64_t gp() const { return groups * points; }
  int64_t group_dim() const { return dim / groups; }
  int64_t group_channels() const { return channels / groups; }

  // Every size non-negative, s, P and G positive, G dividing D and C.
  bool Valid() const {
    return batch >= 0 && height >= 0 && width >= 0 && up >= 1 && points >= 1 && groups >= 1 &&
           dim >= 0 && channels >= 0 && dim % groups == 0 && channels % groups == 0;
  }
};

// ---- SIMD helpers (on top of simd.h) ---------------------------------------------------

// out[k] = <x, rows[k]> for k < m, vectors of length d: eight rows per pass through x,
// their sums reduced together (HorizontalSum8).
template <typename T>
void DotRows(const T* __restrict x, const T* const* rows, int64_t m, int64_t d,
             T* __restrict out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::kLanes;
  const int64_t dv = d - d % L;
  int64_t k = 0;
  for (; k + 8 <= m; k += 8) {
    V a[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) a[r] = Broadcast<T>(0);
    for (int64_t c = 0; c < dv; c += L) {
      const V xv = Load(x + c);
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) a[r] += xv * Load(rows[k + r] + c);
    }
    T sums[8];
    HorizontalSum8<T>(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], sums);
    for (int r = 0; r < 8; ++r) {
      T t = sums[r];
      for (int64_t c = dv; c < d; ++c) t += x[c] * rows[k + r][c];
      out[k + r] = t;
    }
  }
  for (; k < m; ++k) {
    V a = Broadcast<T>(0);
    for (int64_t c = 0; c < dv; c += L) a += Load(x + c) * Load(rows[k] + c);
    T t = HorizontalSum<T>(a);
    for (int64_t c = dv; c < d; ++c) t += x[c] * rows[k][c];
    out[k] = t;
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

// The in-map taps of one point: flat low-resolution index (b*H + h)*W + w, bilinear weight
// and its derivatives with respect to pw and ph (in the cell of floor). Returns the
// number of taps (0..4), or -1 when the point is dropped.
template <typename T>
inline int PointTaps(T ph, T pw, int64_t height, int64_t width, int64_t image, int64_t* row,
                     T* weight, T* d_w, T* d_h) {
  if (!(ph > T(-1) && ph < T(height) && pw > T(-1) && pw < T(width))) return -1;
  const T fh = std::floor(ph), fw = std::floor(pw);
  const int64_t h0 = static_cast<int64_t>(fh), w0 = static_cast<int64_t>(fw);
  const T lh = ph - fh, lw = pw - fw, hh = T(1) - lh, hw = T(1) - lw;
  const bool top = h0 >= 0, bottom = h0 + 1 <= height - 1;
  const bool left = w0 >= 0, right = w0 + 1 <= width - 1;
  const int64_t base = (image * height + h0) * width + w0;
  int n = 0;
  auto add = [&](bool in, int64_t r, T wt, T dw, T dh) {
    if (!in) return;
    row[n] = r;
    weight[n] = wt;
    d_w[n] = dw;
    d_h[n] = dh;
    ++n;
  };
  add(top && left, base, hh * hw, -hh, -hw);
  add(top && right, base + 1, hh * lw, hh, -lw);
  add(bottom && left, base + width, lh * hw, -lh, hw);
  add(bottom && right, base + width + 1, lh * lw, lh, lw);
  return n;
}

// The taps of every point k < GP of one output point, kept per range of work.
template <typename T>
class PointSamples {
 public:
  explicit PointSamples(const DeformShape& d)
      : d_(d), first_(d.gp() + 1), valid_(d.gp()), owner_(4 * d.gp()), row_(4 * d.gp()),
        weight_(4 * d.gp()), d_w_(4 * d.gp()), d_h_(4 * d.gp()) {}

  // Fills the taps of output point `point` (flat index over B*sH*sW) from its offsets.
  void Set(int64_t point, const T* offsets) {
    const DeformShape& d = d_;
    const int64_t hw = d.high_width(), hh = d.high_height();
    const int64_t j = point % hw, i = (point / hw) % hh, b = point / (hw * hh);
    const T ah = static_cast<T>(i / d.up), aw = static_cast<T>(j / d.up);
    const T* o = offsets + point * 2 * d.gp();
    int64_t n = 0;
    for (int64_t k = 0; k < d.gp(); ++k) {
      first_[k] = n;
      const int c = PointTaps<T>(ah + o[2 * k + 1], aw + o[2 * k], d.height, d.width, b,
                                 row_.data() + n, weight_.data() + n, d_w_.data() + n,
                                 d_h_.data() + n);
      valid_[k] = c >= 0;
      for (int t = 0; t < c; ++t) owner_[n + t] = k;
      n += std::max(c, 0);
    }
    first_[d.gp()] = n;
  }

  // Taps of point k: [first(k), first(k + 1)); of group g: [first(g*P), first(g*P + P)).
  int64_t first(int64_t k) const { return first_[k]; }
  bool valid(int64_t k) const { return valid_[k] != 0; }
  const int64_t* owner() const { return owner_.data(); }
  const int64_t* row() const { return row_.data(); }
  const T* weight() const { return weight_.data(); }
  const T* d_w() const { return d_w_.data(); }
  const T* d_h() const { return d_h_.data(); }

 private:
  DeformShape d_;
  std::vector<int64_t> first_;
  std::vector<uint8_t> valid_;
  std::vector<int64_t> owner_, row_;
  std::vector<T> weight_, d_w_, d_h_;
};

// Per-range scratch of the per-point walks.
template <typename T>
struct PointScratch {
  explicit PointScratch(const DeformShape& d)
      : samples(d), rows(4 * d.gp()), coef(4 * d.gp()), dots(4 * d.gp()), dots2(4 * d.gp()),
        logits(d.points + 8), exps(d.points + 8) {}
  PointSamples<T> samples;
  std::vector<const T*> rows;
  std::vector<T> coef, dots, dots2, logits, exps;
};

// Runs fn(point, scratch) for every output point on the pool.
template <typename T, typename Fn>
void ForEachPoint(const ParallelFor& pool, const DeformShape& d, const T* offsets, int64_t cost,
                  Fn fn) {
  pool(d.high_points(), cost, [&](int64_t begin, int64_t end) {
    PointScratch<T> scratch(d);
    for (int64_t point = begin; point < end; ++point) {
      scratch.samples.Set(point, offsets);
      fn(point, scratch);
    }
  });
}

// rows[t] = base + row[t] * stride for the taps t in [t0, t1).
template <typename T>
inline void TapRows(const PointSamples<T>& s, int64_t t0, int64_t t1, const T* base,
                    int64_t stride, const T** rows) {
  for (int64_t t = t0; t < t1; ++t) rows[t] = base + s.row()[t] * stride;
}

// logits[p] = sum over the taps t of point g*P + p of weight[t] * dots[t] (0 when dropped).
template <typename T>
inline void TapLogits(const PointSamples<T>& s, int64_t g, int64_t points, const T* dots,
                      T* logits) {
  for (int64_t p = 0; p < points; ++p) {
    const int64_t k = g * points + p;
    T acc = 0;
    for (int64_t t = s.first(k); t < s.first(k + 1); ++t) acc += s.weight()[t] * dots[t];
    logits[p] = acc;
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

// logits = DeformSimilarity(q, key, offsets).
template <typename T>
void DeformSimilarity(const ParallelFor& pool, const DeformShape& d, const T* q, const T* key,
                      const T* offsets, T* logits) {
  const int64_t E = d.group_dim(), P = d.points;
  ForEachPoint<T>(pool, d, offsets, d.gp() * (4 * E + 48), [&](int64_t point,
                                                                PointScratch<T>& sc) {
    const PointSamples<T>& s = sc.samples;
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t t0 = s.first(g * P), t1 = s.first(g * P + P);
      TapRows<T>(s, t0, t1, key + g * E, d.dim, sc.rows.data());
      DotRows<T>(q + point * d.dim + g * E, sc.rows.data() + t0, t1 - t0, E, sc.dots.data() + t0);
      TapLogits<T>(s, g, P, sc.dots.data(), logits + point * d.gp() + g * P);
    }
  });
}

// out = DeformAggregate(weights, value, offsets).
template <typename T>
void DeformAggregate(const ParallelFor& pool, const DeformShape& d, const T* weights,
                     const T* value, const T* offsets, T* out) {
  const int64_t Cg = d.group_channels(), P = d.points;
  ForEachPoint<T>(pool, d, offsets, d.gp() * (4 * Cg + 48), [&](int64_t point,
                                                                 PointScratch<T>& sc) {
    const PointSamples<T>& s = sc.samples;
    const T* w = weights + point * d.gp();
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t t0 = s.first(g * P), t1 = s.first(g * P + P);
      TapRows<T>(s, t0, t1, value + g * Cg, d.channels, sc.rows.data());
      for (int64_t t = t0; t < t1; ++t) sc.coef[t] = w[s.owner()[t]] * s.weight()[t];
      WeightedRowSum<T>(sc.coef.data() + t0, sc.rows.data() + t0, t1 - t0, 0, Cg,
                        out + point * d.channels + g * Cg);
    }
  });
}

// out = DeformAggregate(softmax_P(DeformSimilarity(q, key, offsets)), value, offsets) in one
// pass per output point (logits and weights of a group stay in the scratch); the softmax
// weights go to `weights` (B, sH, sW, GP) unless it is null.
template <typename T>
void DeformForward(const ParallelFor& pool, const DeformShape& d, const T* q, const T* key,
                   const T* value, const T* offsets, T* out, T* weights) {
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points;
  ForEachPoint<T>(pool, d, offsets, PointCost(d), [&](int64_t point, PointScratch<T>& sc) {
    const PointSamples<T>& s = sc.samples;
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t t0 = s.first(g * P), t1 = s.first(g * P + P);
      TapRows<T>(s, t0, t1, key + g * E, d.dim, sc.rows.data());
      DotRows<T>(q + point * d.dim + g * E, sc.rows.data() + t0, t1 - t0, E, sc.dots.data() + t0);
      T* w = sc.logits.data();
      TapLogits<T>(s, g, P, sc.dots.data(), w);
      Softmax<T>(w, P, sc.exps.data());
      if (weights != nullptr) std::copy(w, w + P, weights + point * d.gp() + g * P);
      TapRows<T>(s, t0, t1, value + g * Cg, d.channels, sc.rows.data());
      for (int64_t t = t0; t < t1; ++t) sc.coef[t] = w[s.owner()[t] - g * P] * s.weight()[t];
      WeightedRowSum<T>(sc.coef.data() + t0, sc.rows.data() + t0, t1 - t0, 0, Cg,
                        out + point * d.channels + g * Cg);
    }
  });
}

// ---- Backward, pass 1: per output point ------------------------------------------------

// Sums over the taps of point k of coef[t] * dots[t] for the three tap coefficients
// (weight, d/dpw, d/dph).
template <typename T>
inline void TapSums(const PointSamples<T>& s, int64_t k, const T* dots, T* value, T* by_w,
                    T* by_h) {
  T v = 0, a = 0, b = 0;
  for (int64_t t = s.first(k); t < s.first(k + 1); ++t) {
    v += s.weight()[t] * dots[t];
    a += s.d_w()[t] * dots[t];
    b += s.d_h()[t] * dots[t];
  }
  *value = v;
  *by_w = a;
  *by_h = b;
}

// The per-point half of the backwards. kSim: the similarity's part (needs q, key; gives dq
// and the offsets' share through the logits); kAgg: the aggregation's part (needs grad,
// value, weights; gives the weights' gradient and the offsets' share through the samples).
//  - kSim && kAgg (fused): `dl` is written with the logits' gradient w * (dw - <w, dw>).
//  - kSim only: `dl` is read (the logits' gradient given by the caller).
//  - kAgg only: `dl` is written with the weights' gradient.
// doffsets (B, sH, sW, 2*GP) is written whole (0 for dropped points).
template <typename T, bool kSim, bool kAgg>
void DeformPointBackward(const ParallelFor& pool, const DeformShape& d, const T* grad,
                         const T* q, const T* key, const T* value, const T* offsets,
                         const T* weights, T* dl, T* dq, T* doffsets) {
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t cost = GP * (4 * ((kSim ? 2 * E : 0) + (kAgg ? Cg : 0)) + 64);
  ForEachPoint<T>(pool, d, offsets, cost, [&](int64_t point, PointScratch<T>& sc) {
    const PointSamples<T>& s = sc.samples;
    T* doff = doffsets + point * 2 * GP;
    T* dlp = dl + point * GP;
    const T* w = kAgg ? weights + point * GP : nullptr;
    for (int64_t g = 0; g < d.groups; ++g) {
      const int64_t t0 = s.first(g * P), t1 = s.first(g * P + P), m = t1 - t0;
      T* dw = sc.logits.data();  // per p: the weights' gradient, then the logits'
      if (kAgg) {
        TapRows<T>(s, t0, t1, value + g * Cg, d.channels, sc.rows.data());
        DotRows<T>(grad + point * d.channels + g * Cg, sc.rows.data() + t0, m, Cg,
                   sc.dots2.data() + t0);
        T inner = 0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = g * P + p;
          T by_w, by_h;
          TapSums<T>(s, k, sc.dots2.data(), &dw[p], &by_w, &by_h);
          doff[2 * k] = w[k] * by_w;
          doff[2 * k + 1] = w[k] * by_h;
          inner += w[k] * dw[p];
        }
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = g * P + p;
          if (!kSim) {
            dlp[k] = dw[p];
          } else {
            dw[p] = s.valid(k) ? w[k] * (dw[p] - inner) : T(0);
            dlp[k] = dw[p];
          }
        }
      } else {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = g * P + p;
          dw[p] = s.valid(k) ? dlp[k] : T(0);
          doff[2 * k] = 0;
          doff[2 * k + 1] = 0;
        }
      }
      if (kSim) {
        TapRows<T>(s, t0, t1, key + g * E, d.dim, sc.rows.data());
        const T* qg = q + point * d.dim + g * E;
        DotRows<T>(qg, sc.rows.data() + t0, m, E, sc.dots.data() + t0);
        for (int64_t p = 0; p < P; ++p) {
          const int64_t k = g * P + p;
          T unused, by_w, by_h;
          TapSums<T>(s, k, sc.dots.data(), &unused, &by_w, &by_h);
          doff[2 * k] += dw[p] * by_w;
          doff[2 * k + 1] += dw[p] * by_h;
        }
        for (int64_t t = t0; t < t1; ++t) sc.coef[t] = dw[s.owner()[t] - g * P] * s.weight()[t];
        WeightedRowSum<T>(sc.coef.data() + t0, sc.rows.data() + t0, m, 0, E,
                          dq + point * d.dim + g * E);
      }
    }
  });
}

// ---- Backward, pass 2: the key and value gradients -------------------------------------

// dkey  = sum over (point, k, tap) of key_coef[point, k] * weight(tap) * q[point, group]
// dvalue = sum over (point, k, tap) of value_coef[point, k] * weight(tap) * grad[point, group]
// each added to the tap's cell; either half is skipped when its coefficient is null.
template <typename T>
void DeformScatter(const ParallelFor& pool, const DeformShape& d, const T* offsets,
                   const T* key_coef, const T* q, T* dkey, const T* value_coef, const T* grad,
                   T* dvalue) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t E = d.group_dim(), Cg = d.group_channels(), P = d.points, GP = d.gp();
  const int64_t hh = d.high_height(), hw = d.high_width(), cells = d.height * d.width;
  const bool do_key = key_coef != nullptr, do_value = value_coef != nullptr;
  // Channel slices per group: enough units to keep a pool busy, slices of whole vectors.
  const int64_t key_vectors = do_key ? (E + L - 1) / L : 0;
  const int64_t value_vectors = do_value ? (Cg + L - 1) / L : 0;
  const int64_t most = std::max<int64_t>(1, std::max(key_vectors, value_vectors));
  const int64_t per_image = std::max<int64_t>(1, d.batch * d.groups);
  const int64_t parts = std::min(most, std::max<int64_t>(1, (16 + per_image - 1) / per_image));
  auto slice = [&](int64_t vectors, int64_t n, int64_t part, int64_t* c0, int64_t* c1) {
    *c0 = std::min(n, vectors * part / parts * L);
    *c1 = std::min(n, vectors * (part + 1) / parts * L);
  };
  const int64_t units = d.batch * d.groups * parts;
  const int64_t cost = hh * hw * P * (4 * ((E + Cg) / parts + 4) + 48);
  pool(units, cost, [&](int64_t begin, int64_t end) {
    int64_t row[4];
    T weight[4], d_w[4], d_h[4];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t part = u % parts;
      const int64_t g = (u / parts) % d.groups;
      const int64_t b = u / (parts * d.groups);
      int64_t k0 = 0, k1 = 0, v0 = 0, v1 = 0;
      if (do_key) slice(key_vectors, E, part, &k0, &k1);
      if (do_value) slice(value_vectors, Cg, part, &v0, &v1);
      const int64_t kn = k1 - k0, vn = v1 - v0;
      if (kn == 0 && vn == 0) continue;
      T* dk = do_key ? dkey + g * E + k0 : nullptr;
      T* dv = do_value ? dvalue + g * Cg + v0 : nullptr;
      for (int64_t cell = b * cells; cell < (b + 1) * cells; ++cell) {
        if (kn > 0) std::fill(dk + cell * d.dim, dk + cell * d.dim + kn, T(0));
        if (vn > 0) std::fill(dv + cell * d.channels, dv + cell * d.channels + vn, T(0));
      }
      for (int64_t i = 0; i < hh; ++i) {
        const T ah = static_cast<T>(i / d.up);
        for (int64_t j = 0; j < hw; ++j) {
          const T aw = static_cast<T>(j / d.up);
          const int64_t point = (b * hh + i) * hw + j;
          const T* o = offsets + point * 2 * GP;
          const T* qs = kn > 0 ? q + point * d.dim + g * E + k0 : nullptr;
          const T* gs = vn > 0 ? grad + point * d.channels + g * Cg + v0 : nullptr;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t k = g * P + p;
            const T a = kn > 0 ? key_coef[point * GP + k] : T(0);
            const T c = vn > 0 ? value_coef[point * GP + k] : T(0);
            if (a == T(0) && c == T(0)) continue;
            const int n = PointTaps<T>(ah + o[2 * k + 1], aw + o[2 * k], d.height, d.width, b,
                                       row, weight, d_w, d_h);
            for (int t = 0; t < n; ++t) {
              if (a != T(0)) Axpy<T>(a * weight[t], qs, kn, dk + row[t] * d.dim);
              if (c != T(0)) Axpy<T>(c * weight[t], gs, vn, dv + row[t] * d.channels);
            }
          }
        }
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
  DeformPointBackward<T, true, false>(pool, d, nullptr, q, key, nullptr, offsets, nullptr,
                                      const_cast<T*>(dlogits), dq, doffsets);
  DeformScatter<T>(pool, d, offsets, dlogits, q, dkey, nullptr, nullptr, nullptr);
}

// (dweights, dvalue, doffsets) of DeformAggregate for the output gradient grad.
template <typename T>
void DeformAggregateBackward(const ParallelFor& pool, const DeformShape& d, const T* grad,
                             const T* weights, const T* value, const T* offsets, T* dweights,
                             T* dvalue, T* doffsets) {
  DeformPointBackward<T, false, true>(pool, d, grad, nullptr, nullptr, value, offsets, weights,
                                      dweights, nullptr, doffsets);
  DeformScatter<T>(pool, d, offsets, nullptr, nullptr, nullptr, weights, grad, dvalue);
}

// (dq, dkey, dvalue, doffsets) of DeformForward for the output gradient grad, given the
// forward's softmax weights. dlogits (B, sH, sW, GP) is the caller's workspace.
template <typename T>
void DeformBackward(const ParallelFor& pool, const DeformShape& d, const T* grad, const T* q,
                    const T* key, const T* value, const T* offsets, const T* weights,
                    T* dlogits, T* dq, T* dkey, T* dvalue, T* doffsets) {
  DeformPointBackward<T, true, true>(pool, d, grad, q, key, value, offsets, weights, dlogits,
                                     dq, doffsets);
  DeformScatter<T>(pool, d, offsets, dlogits, q, dkey, weights, grad, dvalue);
}

}  // namespace deform
}  // namespace cpu
}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_CPU_SAPA_DEFORM_CPU_H_
