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

from keras_sapa.ops._patches import AGGREGATE_EQUATION
from keras_sapa.ops._patches import SIMILARITY_EQUATION
from keras_sapa.ops._patches import high4
from keras_sapa.ops._patches import high6
from keras_sapa.ops._patches import window_op_pair


def _split_high(t, s):
    return t.reshape(high6(t.shape, s))


def _merge_high(t6):
    return t6.reshape(high4(t6.shape))


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


def _window_contraction(equation):
    """``(high, low, kernel_size, s) -> (B, sH, sW, .)``: ``equation`` between the
    high-resolution tensor and the stacked windows of the low-resolution one."""

    def contract(hi, lo, kernel_size, s):
        return _merge_high(torch.einsum(equation, _split_high(hi, s), _windows(lo, kernel_size)))

    return contract


_similarity = _window_contraction(SIMILARITY_EQUATION)
_aggregate = _window_contraction(AGGREGATE_EQUATION)


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


def _window_op(forward, transpose, grad_is_window, doc):
    """``forward(high, low, kernel_size, up_factor)`` as an ``autograd.Function`` with
    ``d high = transpose(grad, low)`` and ``d low`` the scatter of the K*K-channel tensor
    (``grad`` when ``grad_is_window``, else ``high``) with the other."""

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, high, low, kernel_size, up_factor):
            ctx.save_for_backward(high, low)
            ctx.window = (kernel_size, up_factor)
            return forward(high, low, kernel_size, up_factor)

        @staticmethod
        def backward(ctx, grad):
            high, low = ctx.saved_tensors
            kernel_size, up_factor = ctx.window
            grad = grad.contiguous()
            d_high = d_low = None
            if ctx.needs_input_grad[0]:
                d_high = transpose(grad, low, kernel_size, up_factor)
            if ctx.needs_input_grad[1]:
                window, other = (grad, high) if grad_is_window else (high, grad)
                d_low = _scatter(window, other, kernel_size, up_factor)
            return d_high, d_low, None, None

    def op(high, low, kernel_size, up_factor):
        return Op.apply(high, low, kernel_size, up_factor)

    op.__doc__ = doc
    return op


similarity_xla, aggregate_xla = window_op_pair(_window_op, _similarity, _aggregate)
