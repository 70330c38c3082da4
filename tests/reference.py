"""Independent NumPy reference of SAPA, written with plain loops from the spec.

Nothing here is vectorised the way the package is: every output point walks its
K x K window explicitly (``_windows``), computing in float64. Slow, so tests keep
shapes small.
"""

import numpy as np

LN_EPS = 1e-5


def _windows(kernel_size, up_factor, height, width, i, j):
    """(n, p, t) for the points of output point (i, j)'s ``K x K`` window around its
    anchor ``(i // s, j // s)`` that lie inside the ``height x width`` map (the others
    are zero padding)."""
    s, r = up_factor, kernel_size // 2
    for a in range(-r, r + 1):
        for c in range(-r, r + 1):
            p, t = i // s + a, j // s + c
            if 0 <= p < height and 0 <= t < width:
                yield (a + r) * kernel_size + (c + r), p, t


def similarity(query, key, kernel_size, up_factor):
    q = np.asarray(query, np.float64)
    k = np.asarray(key, np.float64)
    height, width = k.shape[1:3]
    out = np.zeros(q.shape[:3] + (kernel_size * kernel_size,))
    for b, i, j in np.ndindex(q.shape[:3]):
        for n, p, t in _windows(kernel_size, up_factor, height, width, i, j):
            out[b, i, j, n] = np.dot(q[b, i, j], k[b, p, t])
    return out


def aggregate(weights, value, kernel_size, up_factor):
    w = np.asarray(weights, np.float64)
    v = np.asarray(value, np.float64)
    height, width = v.shape[1:3]
    out = np.zeros(w.shape[:3] + v.shape[3:])
    for b, i, j in np.ndindex(w.shape[:3]):
        for n, p, t in _windows(kernel_size, up_factor, height, width, i, j):
            out[b, i, j] += w[b, i, j, n] * v[b, p, t]
    return out


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def sapa(query, key, value, kernel_size, up_factor):
    weights = softmax(similarity(query, key, kernel_size, up_factor))
    return aggregate(weights, value, kernel_size, up_factor)


def layer_norm(t, gamma, beta, eps=LN_EPS):
    t = np.asarray(t, np.float64)
    mean = t.mean(axis=-1, keepdims=True)
    var = ((t - mean) ** 2).mean(axis=-1, keepdims=True)
    return (t - mean) / np.sqrt(var + eps) * gamma + beta


def group_norm(t, groups, gamma, beta, eps=LN_EPS):
    """GroupNorm over channels-last ``t``: statistics per sample and group of
    consecutive channels, over all spatial positions (torch.nn.GroupNorm)."""
    t = np.asarray(t, np.float64)
    out = np.empty_like(t)
    channels = t.shape[-1]
    per = channels // groups
    for b in range(t.shape[0]):
        for g in range(groups):
            block = t[b, :, :, g * per : (g + 1) * per]
            mean = block.mean()
            var = ((block - mean) ** 2).mean()
            out[b, :, :, g * per : (g + 1) * per] = (block - mean) / np.sqrt(var + eps)
    return out * gamma + beta


def dense(t, kernel, bias=None):
    out = np.asarray(t, np.float64) @ np.asarray(kernel, np.float64)
    return out if bias is None else out + bias


def nearest_up(t, s):
    t = np.asarray(t, np.float64)
    out = np.empty((t.shape[0], t.shape[1] * s, t.shape[2] * s, t.shape[3]))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = t[:, i // s, j // s]
    return out


def sigmoid(t):
    return 1.0 / (1.0 + np.exp(-np.asarray(t, np.float64)))


def sapa_layer(
    x, y, params, variant, kernel_size, up_factor, norm="layer", groups=32, value_projection=False
):
    """The SAPA module of the spec on channels-last ``x`` (low-res) and ``y`` (guide).

    ``params`` maps official parameter names (``norm_x.weight``, ``q.weight`` with
    the Keras (in, out) layout, ...) to arrays; biases may be absent.
    """

    def lin(name, t):
        return dense(t, params[f"{name}.weight"], params.get(f"{name}.bias"))

    def nrm(name, t):
        if norm is None:
            return np.asarray(t, np.float64)
        gamma, beta = params[f"{name}.weight"], params[f"{name}.bias"]
        if norm == "layer":
            return layer_norm(t, gamma, beta)
        return group_norm(t, groups, gamma, beta)

    s = up_factor
    x_n, y_n = nrm("norm_x", x), nrm("norm_y", y)
    if variant == "identity":
        q, k = y_n, x_n
    else:
        k = lin("k", x_n)
        if variant == "bilinear":
            q = lin("q", y_n)
        elif variant == "gated":
            g = nearest_up(sigmoid(lin("gate", x_n)), s)
            q = g * lin("qy", y_n) + (1 - g) * lin("qx", nearest_up(x, s))
        elif variant == "concat":
            q = lin("q", np.concatenate([y_n, nearest_up(x, s)], axis=-1))
        else:
            raise ValueError(variant)
    v = lin("v", x_n) if value_projection else np.asarray(x, np.float64)
    return sapa(q, k, v, kernel_size, up_factor)


# ------------------------------------------------------------------ reference gradients
# Vector-Jacobian products of the three ops, written from the chain rule with the same
# explicit window loops (not by differentiating the functions above): given the
# cotangent ``grad`` of the output, the gradients with respect to every input. Each op
# is bilinear, so half of each VJP is the other op's loop (``similarity`` of the
# cotangent with the values, ``aggregate`` of the keys weighted by the cotangent) and the
# other half is the window's adjoint, ``window_scatter``.


def window_scatter(weights, high, kernel_size, up_factor, low_hw):
    """Adjoint of the window gather: every output point (i, j) adds
    ``weights[i, j, n] * high[i, j]`` into each in-map point n of its window. Returns
    ``(B, H, W, C)`` for ``low_hw = (H, W)``: d key of ``similarity`` (with the logits'
    cotangent and the query) and d value of ``aggregate`` (with the weights and the
    output's cotangent)."""
    w, h = np.asarray(weights, np.float64), np.asarray(high, np.float64)
    height, width = low_hw
    out = np.zeros((h.shape[0], height, width, h.shape[3]))
    for b, i, j in np.ndindex(h.shape[:3]):
        for n, p, t in _windows(kernel_size, up_factor, height, width, i, j):
            out[b, p, t] += w[b, i, j, n] * h[b, i, j]
    return out


def similarity_vjp(query, key, grad, kernel_size, up_factor):
    """(d query, d key) of ``similarity`` for the cotangent ``grad`` (B, sH, sW, K*K):
    ``d query[i, j] = sum_n grad[i, j, n] * key[window n]``, the aggregation of the keys
    with ``grad`` as weights; ``d key`` gathers ``grad[i, j, n] * query[i, j]`` back
    into the window points."""
    d_query = aggregate(grad, key, kernel_size, up_factor)
    d_key = window_scatter(grad, query, kernel_size, up_factor, np.shape(key)[1:3])
    return d_query, d_key


def aggregate_vjp(weights, value, grad, kernel_size, up_factor):
    """(d weights, d value) of ``aggregate`` for the cotangent ``grad`` (B, sH, sW, C):
    ``d weights[i, j, n] = <grad[i, j], value[window n]>``, the similarity of ``grad``
    with the values; ``d value`` gathers ``weights[i, j, n] * grad[i, j]`` back."""
    d_weights = similarity(grad, value, kernel_size, up_factor)
    d_value = window_scatter(weights, grad, kernel_size, up_factor, np.shape(value)[1:3])
    return d_weights, d_value


def sapa_vjp(query, key, value, grad, kernel_size, up_factor):
    """(d query, d key, d value) of ``sapa``: through the aggregation, the softmax
    (d logits = w * (d w - sum(w * d w))) and the similarity."""
    weights = softmax(similarity(query, key, kernel_size, up_factor))
    d_weights, d_value = aggregate_vjp(weights, value, grad, kernel_size, up_factor)
    d_logits = weights * (d_weights - (weights * d_weights).sum(axis=-1, keepdims=True))
    d_query, d_key = similarity_vjp(query, key, d_logits, kernel_size, up_factor)
    return d_query, d_key, d_value
