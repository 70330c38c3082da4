"""PyTorch formulation of SAPA's primitive ops (the ``"xla"`` implementation on the
torch backend: the same formulation with hand-written gradients that the other
backends compile, written in torch ops; it runs eagerly and under ``torch.compile``).

The K x K windows of the low-resolution tensor are stacked from shifted slices of a
zero-padded copy, and the high-resolution tensor is viewed as ``(B, H, s, W, s, .)``
so that the s x s output points of one anchor share one window: each op is then one
batched matrix product (``torch.einsum`` lowers it to ``bmm``). The stacked windows
cost K*K times the low-resolution tensor's memory, as the official unfold reference
does.

Gradients are written by hand in :class:`torch.autograd.Function` subclasses, from
three window primitives (see :mod:`keras_sapa.ops._jax_builtin` for the algebra):
``d similarity = (aggregate(g, key), scatter(g, query))`` and
``d aggregate = (similarity(g, value), scatter(weights, g))``, where ``scatter`` is
the adjoint of both ops with respect to their low-resolution input. Autograd through
the einsums would give the same numbers, but keep the stacked windows of both inputs
alive until the backward pass; here only the op's two inputs are saved.
"""

import torch
import torch.nn.functional as F


def _split_high(t, s):
    batch, height, width, channels = t.shape
    return t.reshape(batch, height // s, s, width // s, s, channels)


def _merge_high(t6):
    batch, height, s1, width, s2, channels = t6.shape
    return t6.reshape(batch, height * s1, width * s2, channels)


def _windows(lo, kernel_size):
    """(B, H, W, C) -> (B, H, W, K*K, C), zero outside the map, row-major offsets."""
    r = kernel_size // 2
    height, width = lo.shape[1], lo.shape[2]
    padded = F.pad(lo, (0, 0, r, r, r, r))
    return torch.stack(
        [
            padded[:, row : row + height, col : col + width, :]
            for row in range(kernel_size)
            for col in range(kernel_size)
        ],
        dim=3,
    )


def _similarity(hi, lo, kernel_size, s):
    return _merge_high(
        torch.einsum("bhiwjd,bhwnd->bhiwjn", _split_high(hi, s), _windows(lo, kernel_size))
    )


def _aggregate(w, lo, kernel_size, s):
    return _merge_high(
        torch.einsum("bhiwjn,bhwnc->bhiwjc", _split_high(w, s), _windows(lo, kernel_size))
    )


def _scatter(w, hi, kernel_size, s):
    """Adjoint of both ops with respect to the low-resolution input: the gradient of
    every stacked window, added back to the points it was read from."""
    d_windows = torch.einsum("bhiwjn,bhiwjc->bhwnc", _split_high(w, s), _split_high(hi, s))
    batch, height, width, _, channels = d_windows.shape
    r = kernel_size // 2
    padded = d_windows.new_zeros((batch, height + 2 * r, width + 2 * r, channels))
    for row in range(kernel_size):
        for col in range(kernel_size):
            padded[:, row : row + height, col : col + width, :] += d_windows[
                :, :, :, row * kernel_size + col, :
            ]
    return padded[:, r : r + height, r : r + width, :]


class _Similarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, kernel_size, up_factor):
        ctx.save_for_backward(query, key)
        ctx.window = (kernel_size, up_factor)
        return _similarity(query, key, kernel_size, up_factor)

    @staticmethod
    def backward(ctx, grad):
        query, key = ctx.saved_tensors
        kernel_size, up_factor = ctx.window
        grad = grad.contiguous()
        d_query = d_key = None
        if ctx.needs_input_grad[0]:
            d_query = _aggregate(grad, key, kernel_size, up_factor)
        if ctx.needs_input_grad[1]:
            d_key = _scatter(grad, query, kernel_size, up_factor)
        return d_query, d_key, None, None


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, value, kernel_size, up_factor):
        ctx.save_for_backward(weights, value)
        ctx.window = (kernel_size, up_factor)
        return _aggregate(weights, value, kernel_size, up_factor)

    @staticmethod
    def backward(ctx, grad):
        weights, value = ctx.saved_tensors
        kernel_size, up_factor = ctx.window
        grad = grad.contiguous()
        d_weights = d_value = None
        if ctx.needs_input_grad[0]:
            d_weights = _similarity(grad, value, kernel_size, up_factor)
        if ctx.needs_input_grad[1]:
            d_value = _scatter(weights, grad, kernel_size, up_factor)
        return d_weights, d_value, None, None


def similarity_xla(query, key, kernel_size, up_factor):
    """``(B, sH, sW, d) x (B, H, W, d) -> (B, sH, sW, K*K)``."""
    return _Similarity.apply(query, key, kernel_size, up_factor)


def aggregate_xla(weights, value, kernel_size, up_factor):
    """``(B, sH, sW, K*K) x (B, H, W, C) -> (B, sH, sW, C)``."""
    return _Aggregate.apply(weights, value, kernel_size, up_factor)
