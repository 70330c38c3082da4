"""JAX formulation of SAPA's primitive ops (the ``"xla"`` implementation on JAX).

The low-resolution tensor is padded once and read through K*K shifted slices; the
high-resolution tensor is viewed as ``(B, H, s, W, s, .)`` so that the s x s output
points of one anchor share its window, and no upsampled copy is made. The aggregation
accumulates one window offset at a time (XLA fuses the loop into one elementwise
kernel); the similarity contracts the K*K stacked windows of its low-resolution input
with one einsum (per-offset reductions over the minor channel axis ran about 2x slower
on XLA's CPU backend). The only Python loop is over the K*K window offsets (fixed by
``kernel_size``), so the traced program does not grow with the image.

Measured at W1 on a shared 2-core CPU (``python -m keras_sapa bench --backend jax``):
the forward is about as fast as ``jax.image.resize``; the backward is the weak part
(``similarity(grad, value)`` over C channels and the scatters), see the README.

Gradients are written by hand with :func:`jax.custom_vjp`. Both ops are bilinear in
their two inputs, and their gradients are three window primitives:

- ``_similarity(hi, lo)``: ``S[i, j, n] = <hi[i, j], lo[window_n(i, j)]>``;
- ``_aggregate(w, lo)``: ``out[i, j] = sum_n w[i, j, n] * lo[window_n(i, j)]``;
- ``_scatter(w, hi)``: the adjoint of both with respect to ``lo``:
  ``d_lo[p] = sum over (i, j, n) whose window point n is p of w[i, j, n] * hi[i, j]``.

so that ``d similarity = (aggregate(g, key), scatter(g, query))`` and
``d aggregate = (similarity(g, value), scatter(weights, g))``. Differentiating the
slice loops automatically would give the same numbers with K*K broadcast temporaries
kept alive for the backward pass.
"""

import functools

import jax
import jax.numpy as jnp

from keras_sapa.ops._patches import SIMILARITY_EQUATION
from keras_sapa.ops._patches import high4
from keras_sapa.ops._patches import high6
from keras_sapa.ops._patches import weighted_window_sum
from keras_sapa.ops._patches import window_op_pair


def _split_high(t, s):
    return t.reshape(high6(t.shape, s))


def _merge_high(t6):
    return t6.reshape(high4(t6.shape))


def _shifted(lo, kernel_size):
    """Yields (n, slice_n): slice_n[:, p, q] = lo[:, p + a, q + b] (0 outside the map),
    for the window offsets in row-major order."""
    r = kernel_size // 2
    height, width = lo.shape[1], lo.shape[2]
    padded = jnp.pad(lo, ((0, 0), (r, r), (r, r), (0, 0)))
    for row in range(kernel_size):
        for col in range(kernel_size):
            yield row * kernel_size + col, padded[:, row : row + height, col : col + width, :]


def _similarity(hi, lo, kernel_size, s):
    # One einsum against the stacked windows (K*K copies of ``lo``): XLA's CPU
    # reductions over the minor channel axis, one per window offset, ran 2x slower.
    windows = jnp.stack([window for _, window in _shifted(lo, kernel_size)], axis=3)
    return _merge_high(jnp.einsum(SIMILARITY_EQUATION, _split_high(hi, s), windows))


def _aggregate(w, lo, kernel_size, s):
    return _merge_high(weighted_window_sum(_split_high(w, s), _shifted(lo, kernel_size)))


def _scatter(w, hi, kernel_size, s):
    w6 = _split_high(w, s)
    hi6 = _split_high(hi, s)
    r = kernel_size // 2
    height, width = w6.shape[1], w6.shape[3]
    acc = None
    for row in range(kernel_size):
        for col in range(kernel_size):
            n = row * kernel_size + col
            term = jnp.sum(w6[..., n : n + 1] * hi6, axis=(2, 4))
            term = jnp.pad(term, ((0, 0), (row, 2 * r - row), (col, 2 * r - col), (0, 0)))
            acc = term if acc is None else acc + term
    return acc[:, r : r + height, r : r + width, :]


def _window_op(forward, transpose, grad_is_window, doc):
    """``forward(high, low, kernel_size, up_factor)`` with its hand-written VJP:
    ``d high = transpose(grad, low)`` and ``d low`` the scatter of the K*K-channel tensor
    (``grad`` when ``grad_is_window``, else ``high``) with the other."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
    def op(high, low, kernel_size, up_factor):
        return forward(high, low, kernel_size, up_factor)

    def fwd(high, low, kernel_size, up_factor):
        return forward(high, low, kernel_size, up_factor), (high, low)

    def bwd(kernel_size, up_factor, residuals, grad):
        high, low = residuals
        window, other = (grad, high) if grad_is_window else (high, grad)
        return (
            transpose(grad, low, kernel_size, up_factor).astype(high.dtype),
            _scatter(window, other, kernel_size, up_factor).astype(low.dtype),
        )

    op.defvjp(fwd, bwd)
    op.__doc__ = doc
    return op


similarity_xla, aggregate_xla = window_op_pair(_window_op, _similarity, _aggregate)
