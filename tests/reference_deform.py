"""Independent NumPy reference of SAPA-D (the spec's section "SAPA-D"), with plain loops.

Every output point walks its sampled points one by one and every bilinear sample its
four taps, in float64. Nothing is vectorised the way the package is, so tests keep the
shapes small (real channel counts, few pixels).

Layouts are channels last, as in ``keras_sapa.ops``:

- query ``(B, sH, sW, G*E)``, key ``(B, H, W, G*E)``, value ``(B, H, W, C)``;
- offsets ``(B, sH, sW, 2*G*P)``: point ``p`` of group ``g`` is ``k = g*P + p``, channel
  ``2k`` its shift along the width, ``2k + 1`` along the height, in low-resolution pixels;
- logits and weights ``(B, sH, sW, G*P)``, channel ``g*P + p``.

The gradients (``*_vjp``) are written from the chain rule with the same loops, following
the official kernels' rule: the derivative with respect to a position is taken in the
cell of ``floor`` (towards increasing coordinate at an integer position), and a dropped
point (outside ``(-1, H) x (-1, W)``, or NaN) has zero value and zero gradients.
``numeric_gradient`` gives float64 central differences to check them (and the package)
away from integer positions.
"""

import math

import numpy as np

from reference import dense
from reference import group_norm
from reference import nearest_up

GN_GROUPS = 32


# ------------------------------------------------------------------ sampling


def sample_position(offsets, b, i, j, k, up_factor):
    """(ph, pw) of point ``k`` (= g*P + p) of output point (i, j): the anchor
    ``(i // s, j // s)`` plus the offset, in low-resolution pixel coordinates."""
    pw = j // up_factor + float(offsets[b, i, j, 2 * k])
    ph = i // up_factor + float(offsets[b, i, j, 2 * k + 1])
    return ph, pw


def dropped(ph, pw, height, width):
    """True when the point is sampled as 0 outright (NaN fails every comparison)."""
    return not (ph > -1 and ph < height and pw > -1 and pw < width)


def taps(ph, pw, height, width):
    """The in-map bilinear taps of a kept point, as
    ``(row, col, weight, d weight / d ph, d weight / d pw)``, in the cell of
    ``floor(ph), floor(pw)``; taps outside the map are left out (zero padding)."""
    h0, w0 = math.floor(ph), math.floor(pw)
    lh, lw = ph - h0, pw - w0
    hh, hw = 1.0 - lh, 1.0 - lw
    candidates = (
        (h0, w0, hh * hw, -hw, -hh),
        (h0, w0 + 1, hh * lw, -lw, hh),
        (h0 + 1, w0, lh * hw, hw, -lh),
        (h0 + 1, w0 + 1, lh * lw, lw, lh),
    )
    return [t for t in candidates if 0 <= t[0] < height and 0 <= t[1] < width]


def _check(offsets, groups, num_points):
    if offsets.shape[-1] != 2 * groups * num_points:
        raise ValueError(f"offsets need 2*G*P channels, got {offsets.shape}")


def _kept_points(offsets, num_points, up_factor, groups, height, width):
    """``(b, i, j, g, k, taps)`` for every sampled point that is not dropped, one by
    one: output point (i, j), group ``g``, point index ``k = g*P + p`` and the in-map
    bilinear taps of its position. Dropped points contribute nothing, to the outputs or
    to the gradients."""
    o = np.asarray(offsets, np.float64)
    _check(o, groups, num_points)
    for b, i, j in np.ndindex(o.shape[:3]):
        for g in range(groups):
            for p in range(num_points):
                k = g * num_points + p
                ph, pw = sample_position(o, b, i, j, k, up_factor)
                if not dropped(ph, pw, height, width):
                    yield b, i, j, g, k, taps(ph, pw, height, width)


def _group(channels, groups, g):
    """The channel slice of group ``g`` in a tensor of ``channels`` channels."""
    per = channels // groups
    return slice(g * per, (g + 1) * per)


# ------------------------------------------------------------------ forward


def deform_similarity(query, key, offsets, num_points, up_factor, groups):
    """logits (B, sH, sW, G*P): ``<q[i, j, group g], bilinear(key[group g], pos(k))>``."""
    q, kk = np.asarray(query, np.float64), np.asarray(key, np.float64)
    height, width, channels = kk.shape[1:]
    out = np.zeros(q.shape[:3] + (groups * num_points,))
    for b, i, j, g, k, point_taps in _kept_points(
        offsets, num_points, up_factor, groups, height, width
    ):
        c = _group(channels, groups, g)
        for r, col, w, _, _ in point_taps:
            out[b, i, j, k] += w * np.dot(q[b, i, j, c], kk[b, r, col, c])
    return out


def deform_aggregate(weights, value, offsets, num_points, up_factor, groups):
    """out (B, sH, sW, C): ``sum_p w[i, j, g(c), p] * bilinear(value[..., c], pos(g(c), p))``
    with ``g(c) = c // (C / G)``."""
    wt, v = np.asarray(weights, np.float64), np.asarray(value, np.float64)
    height, width, channels = v.shape[1:]
    out = np.zeros(wt.shape[:3] + (channels,))
    for b, i, j, g, k, point_taps in _kept_points(
        offsets, num_points, up_factor, groups, height, width
    ):
        c = _group(channels, groups, g)
        for r, col, w, _, _ in point_taps:
            out[b, i, j, c] += wt[b, i, j, k] * w * v[b, r, col, c]
    return out


def group_softmax(logits, groups):
    """Softmax over the P points of each group, channel g*P + p."""
    z = np.asarray(logits, np.float64)
    shape = z.shape
    z = z.reshape(shape[:-1] + (groups, shape[-1] // groups))
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).reshape(shape)


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused op: aggregate(group_softmax(similarity)) (no 1/sqrt(E) scaling)."""
    logits = deform_similarity(query, key, offsets, num_points, up_factor, groups)
    weights = group_softmax(logits, groups)
    return deform_aggregate(weights, value, offsets, num_points, up_factor, groups)


# ------------------------------------------------------------------ gradients


def _pairing_grads(high, low, coef, offsets, num_points, up_factor, groups):
    """Gradients of ``F = sum over kept points (b, i, j, k) of coef[b, i, j, k] *
    <high[b, i, j, group g], bilinear(low[group g], position k)>`` with respect to
    ``high``, ``low``, ``coef`` and the offsets (through the taps' weights), with the same
    loops. Both halves' VJPs are derivatives of this form: ``deform_similarity``'s with
    ``coef`` the cotangent (F = <grad, logits>), ``deform_aggregate``'s with ``high`` the
    cotangent (F = <grad, out>)."""
    hi, lo, cf = (np.asarray(t, np.float64) for t in (high, low, coef))
    height, width, channels = lo.shape[1:]
    d_hi, d_lo, d_cf = np.zeros_like(hi), np.zeros_like(lo), np.zeros_like(cf)
    d_o = np.zeros(np.shape(offsets))
    for b, i, j, g, k, point_taps in _kept_points(
        offsets, num_points, up_factor, groups, height, width
    ):
        c, a = _group(channels, groups, g), cf[b, i, j, k]
        for r, col, w, dwh, dww in point_taps:
            dot = np.dot(hi[b, i, j, c], lo[b, r, col, c])
            d_hi[b, i, j, c] += a * w * lo[b, r, col, c]
            d_lo[b, r, col, c] += a * w * hi[b, i, j, c]
            d_cf[b, i, j, k] += w * dot
            d_o[b, i, j, 2 * k] += a * dww * dot
            d_o[b, i, j, 2 * k + 1] += a * dwh * dot
    return d_hi, d_lo, d_cf, d_o


def deform_similarity_vjp(query, key, offsets, grad, num_points, up_factor, groups):
    """(d query, d key, d offsets) of ``deform_similarity`` for the cotangent ``grad``."""
    d_q, d_k, _, d_o = _pairing_grads(query, key, grad, offsets, num_points, up_factor, groups)
    return d_q, d_k, d_o


def deform_aggregate_vjp(weights, value, offsets, grad, num_points, up_factor, groups):
    """(d weights, d value, d offsets) of ``deform_aggregate`` for the cotangent ``grad``."""
    _, d_v, d_w, d_o = _pairing_grads(grad, value, weights, offsets, num_points, up_factor, groups)
    return d_w, d_v, d_o


def sapa_deform_vjp(query, key, value, offsets, grad, num_points, up_factor, groups):
    """(d query, d key, d value, d offsets) of ``sapa_deform``; the offsets get the sum
    of the similarity's and the aggregation's contributions."""
    logits = deform_similarity(query, key, offsets, num_points, up_factor, groups)
    weights = group_softmax(logits, groups)
    d_w, d_v, d_o_agg = deform_aggregate_vjp(
        weights, value, offsets, grad, num_points, up_factor, groups
    )
    shape = weights.shape
    wg = weights.reshape(shape[:-1] + (groups, num_points))
    dg = d_w.reshape(wg.shape)
    d_logits = (wg * (dg - (wg * dg).sum(axis=-1, keepdims=True))).reshape(shape)
    d_q, d_k, d_o_sim = deform_similarity_vjp(
        query, key, offsets, d_logits, num_points, up_factor, groups
    )
    return d_q, d_k, d_v, d_o_sim + d_o_agg


def numeric_gradient(fn, arrays, index, grad, eps=1e-6):
    """Central-difference gradient of ``sum(fn(*arrays) * grad)`` with respect to
    ``arrays[index]``, in float64 (``fn`` must accept float64 arrays)."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grad = np.asarray(grad, np.float64)
    target = arrays[index]
    out = np.zeros_like(target)
    flat, out_flat = target.reshape(-1), out.reshape(-1)
    for n in range(flat.size):
        keep = flat[n]
        flat[n] = keep + eps
        plus = np.sum(np.asarray(fn(*arrays), np.float64) * grad)
        flat[n] = keep - eps
        minus = np.sum(np.asarray(fn(*arrays), np.float64) * grad)
        flat[n] = keep
        out_flat[n] = (plus - minus) / (2 * eps)
    return out


def offsets_away_from_integers(rng, shape, spread=1.5, margin=0.05, up_factor=1):
    """Random offsets whose sample positions stay at least ``margin`` from every integer
    (so numeric gradients do not straddle a cell edge or the drop boundary). Anchors are
    integers, so it is enough that the offsets themselves keep off integers."""
    del up_factor  # anchors are integers for every factor
    o = rng.uniform(-spread, spread, size=shape)
    frac = o - np.floor(o)
    frac = np.clip(frac, margin, 1 - margin)
    return np.floor(o) + frac


# ------------------------------------------------------------------ the layer


def pixel_shuffle(t, s):
    """PyTorch's pixel_shuffle on channels-last ``t`` (B, H, W, C*s*s): output channel
    ``c`` at ``(h*s + a, w*s + b)`` is input channel ``c*s*s + a*s + b`` at ``(h, w)``."""
    t = np.asarray(t, np.float64)
    batch, height, width, channels = t.shape
    c_out = channels // (s * s)
    out = np.empty((batch, height * s, width * s, c_out))
    for h in range(height):
        for w in range(width):
            for a in range(s):
                for bb in range(s):
                    for c in range(c_out):
                        out[:, h * s + a, w * s + bb, c] = t[:, h, w, c * s * s + a * s + bb]
    return out


def layer_offsets(x_n, params, up_factor, high_offset):
    """The per-output-point offsets (B, sH, sW, 2*G*P) of the layer."""
    o = dense(x_n, params["offset.weight"], params.get("offset.bias"))
    return pixel_shuffle(o, up_factor) if high_offset else nearest_up(o, up_factor)


def sapa_deform_layer(
    x, y, params, num_points=9, up_factor=2, groups=4, high_offset=True, norm=False
):
    """The SAPADeform module of the spec on channels-last ``x`` (low-res) and ``y`` (guide).

    ``params`` maps official names (``q.weight`` in the Keras (in, out) layout,
    ``q.bias``, ``k.*``, ``offset.*``, ``norm_x.*``, ``norm_y.*``) to arrays; biases may
    be absent. The offset conv's output channels are in the official order (the one
    ``pixel_shuffle`` reads).
    """
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if norm:
        x_n = group_norm(x64, GN_GROUPS, params["norm_x.weight"], params["norm_x.bias"])
        y_n = group_norm(y64, GN_GROUPS, params["norm_y.weight"], params["norm_y.bias"])
    else:
        x_n, y_n = x64, y64
    q = dense(y_n, params["q.weight"], params.get("q.bias"))
    k = dense(x_n, params["k.weight"], params.get("k.bias"))
    offsets = layer_offsets(x_n, params, up_factor, high_offset)
    return sapa_deform(q, k, x64, offsets, num_points, up_factor, groups)
