"""A PyTorch CPU stand-in for the official SAPA-D module (tiny-smart/sapa,
``sapa_deform.py``), the parity reference of the SAPADeform tests.

The official module runs two CUDA extensions, ``deform_qk`` and ``deform_av``, and
raises ``NotImplementedError`` on CPU. This file is our own rewrite, from the spec
(``shared/SAPA_SPEC.md``, "SAPA-D") and from reading the official kernels, of what they
compute, in PyTorch on CPU, with the official layouts (channels first):

- ``deform_qk(query (B, G*E, sH, sW), key (B, G*E, H, W), offset (B, 2*G*P, sH, sW))``
  -> ``(B, G, P, sH, sW)``;
- ``deform_av(attn (B, G, P, sH, sW), value (B, C, H, W), offset)`` -> ``(B, C, sH, sW)``;

each an ``autograd.Function`` whose backward is written out like the kernels' (the
position derivative in the cell of ``floor``, scatter-adds into key and value, dropped
points skipped), not left to autograd: so it checks the package's autodiff from an
independent derivation. ``SAPADeformTorch`` is the module around them, with the
official parameter names (``q``, ``k``, ``offset``, ``norm_y``, ``norm_x``), layouts,
defaults and forward (``pixel_shuffle`` or ``F.interpolate`` of the offsets, softmax
over the points).
"""

import torch
import torch.nn.functional as F
from torch import nn


def _positions(offset, num_point, up_factor, groups, height, width):
    """Sampling rows/cols (B, G, P, sH, sW) and the keep mask of every point."""
    batch, _, out_h, out_w = offset.shape
    off = offset.view(batch, groups, num_point, 2, out_h, out_w)
    rows = torch.div(torch.arange(out_h), up_factor, rounding_mode="floor").to(offset.dtype)
    cols = torch.div(torch.arange(out_w), up_factor, rounding_mode="floor").to(offset.dtype)
    kh = rows.view(1, 1, 1, -1, 1) + off[:, :, :, 1]
    kw = cols.view(1, 1, 1, 1, -1) + off[:, :, :, 0]
    keep = (kh > -1) & (kh < height) & (kw > -1) & (kw < width)
    return kh, kw, keep


def _taps(kh, kw, keep, height, width):
    """The four taps: [(flat index, weight, d weight/d h, d weight/d w, valid)]."""
    kh = torch.where(keep, kh, torch.zeros_like(kh))
    kw = torch.where(keep, kw, torch.zeros_like(kw))
    h_low, w_low = torch.floor(kh), torch.floor(kw)
    lh, lw = kh - h_low, kw - w_low
    hh, hw = 1 - lh, 1 - lw
    h_low, w_low = h_low.long(), w_low.long()
    out = []
    for dr, dc, w, dwh, dww in (
        (0, 0, hh * hw, -hw, -hh),
        (0, 1, hh * lw, -lw, hh),
        (1, 0, lh * hw, hw, -lh),
        (1, 1, lh * lw, lw, lh),
    ):
        r, c = h_low + dr, w_low + dc
        valid = keep & (r >= 0) & (r < height) & (c >= 0) & (c < width)
        index = r.clamp(0, height - 1) * width + c.clamp(0, width - 1)
        out.append((index, w * valid, dwh * valid, dww * valid, valid))
    return out


def _gather(feature, index):
    """``feature`` (B, G, c, H*W) at ``index`` (B, G, P, sH, sW) -> (B, G, c, P, sH, sW)."""
    batch, groups, per, _ = feature.shape
    flat = index.reshape(batch, groups, 1, -1).expand(batch, groups, per, -1)
    return torch.gather(feature, 3, flat).view((batch, groups, per) + tuple(index.shape[2:]))


def _scatter(shape, index, values):
    """Adjoint of :func:`_gather`: ``values`` (B, G, c, P, sH, sW) added at ``index``."""
    batch, groups, per, _ = shape
    out = values.new_zeros(shape)
    flat = index.reshape(batch, groups, 1, -1).expand(batch, groups, per, -1)
    return out.scatter_add_(3, flat, values.reshape(batch, groups, per, -1))


def _sampling(feature, offset, num_point, up_factor, groups):
    """``feature`` (B, C, H, W) grouped as (B, G, C/G, H*W), and the four taps of every
    point's position in it (:func:`_taps`)."""
    batch, channels, height, width = feature.shape
    kh, kw, keep = _positions(offset, num_point, up_factor, groups, height, width)
    grouped = feature.reshape(batch, groups, channels // groups, height * width)
    return grouped, _taps(kh, kw, keep, height, width)


def _saved_sampling(ctx, high, feature, offset, num_point, up_factor, groups):
    """A forward's start: saves its tensors and arguments for the backward, and returns
    :func:`_sampling` of ``feature`` (the key or the value)."""
    ctx.save_for_backward(high, feature, offset)
    ctx.args = (num_point, up_factor, groups)
    return _sampling(feature, offset, num_point, up_factor, groups)


class DeformQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, offset, num_point, up_factor, groups):
        k, taps = _saved_sampling(ctx, query, key, offset, num_point, up_factor, groups)
        q = query.view(k.shape[:3] + (1,) + query.shape[2:])
        out = 0
        for index, w, _, _, _ in taps:
            out = out + w * (q * _gather(k, index)).sum(2)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, offset = ctx.saved_tensors
        num_point = ctx.args[0]
        k, taps = _sampling(key, offset, *ctx.args)
        q = query.view(k.shape[:3] + (1,) + query.shape[2:])
        g = grad.unsqueeze(2)  # (B, G, 1, P, sH, sW)
        d_q = torch.zeros_like(q.expand(-1, -1, -1, num_point, -1, -1))
        d_k = torch.zeros_like(k)
        d_h, d_w = torch.zeros_like(grad), torch.zeros_like(grad)
        for index, w, dwh, dww, _ in taps:
            sampled = _gather(k, index)
            d_q = d_q + g * w.unsqueeze(2) * sampled
            d_k = d_k + _scatter(k.shape, index, g * w.unsqueeze(2) * q)
            dot = (q * sampled).sum(2)
            d_h = d_h + grad * dwh * dot
            d_w = d_w + grad * dww * dot
        d_query = d_q.sum(3).reshape(query.shape)
        d_offset = torch.stack([d_w, d_h], dim=3).reshape(offset.shape)
        return d_query, d_k.reshape(key.shape), d_offset, None, None, None


class DeformAV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, value, offset, num_point, up_factor, groups):
        v, taps = _saved_sampling(ctx, attn, value, offset, num_point, up_factor, groups)
        a = attn.unsqueeze(2)  # (B, G, 1, P, sH, sW)
        out = 0
        for index, w, _, _, _ in taps:
            out = out + (a * w.unsqueeze(2) * _gather(v, index)).sum(3)
        return out.reshape(value.shape[:2] + attn.shape[3:])

    @staticmethod
    def backward(ctx, grad):
        attn, value, offset = ctx.saved_tensors
        v, taps = _sampling(value, offset, *ctx.args)
        g = grad.reshape(v.shape[:3] + (1,) + grad.shape[2:])
        d_attn = torch.zeros_like(attn)
        d_v = torch.zeros_like(v)
        d_h, d_w = torch.zeros_like(attn), torch.zeros_like(attn)
        for index, w, dwh, dww, _ in taps:
            dot = (g * _gather(v, index)).sum(2)  # (B, G, P, sH, sW)
            d_attn = d_attn + w * dot
            d_v = d_v + _scatter(v.shape, index, g * (attn * w).unsqueeze(2))
            d_h = d_h + attn * dwh * dot
            d_w = d_w + attn * dww * dot
        d_offset = torch.stack([d_w, d_h], dim=3).reshape(offset.shape)
        return d_attn, d_v.reshape(value.shape), d_offset, None, None, None


def deform_qk(query, key, offset, num_point, up_factor, groups):
    return DeformQK.apply(query, key, offset, num_point, up_factor, groups)


def deform_av(attn, value, offset, num_point, up_factor, groups):
    return DeformAV.apply(attn, value, offset, num_point, up_factor, groups)


class SAPADeformTorch(nn.Module):
    """The official ``SAPADeform`` module (same arguments, parameter names, init and
    forward), running :func:`deform_qk` / :func:`deform_av` on CPU."""

    def __init__(
        self,
        dim_y,
        dim_x=None,
        up_factor=2,
        num_point=9,
        groups=4,
        embedding_dim=32,
        qkv_bias=True,
        high_offset=True,
        norm=False,
    ):
        super().__init__()
        dim_x = dim_y if dim_x is None else dim_x
        self.up_factor, self.num_point, self.groups = up_factor, num_point, groups
        self.high_offset, self.norm = high_offset, norm
        if norm:
            self.norm_y = nn.GroupNorm(32, dim_y)
            self.norm_x = nn.GroupNorm(32, dim_x)
        self.q = nn.Conv2d(dim_y, groups * embedding_dim, 1, bias=qkv_bias)
        self.k = nn.Conv2d(dim_x, groups * embedding_dim, 1, bias=qkv_bias)
        per_point = groups * num_point * 2
        self.offset = nn.Conv2d(
            dim_x, per_point * up_factor**2 if high_offset else per_point, 1, bias=qkv_bias
        )
        for conv in (self.q, self.k, self.offset):
            nn.init.normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def offsets(self, x_n):
        raw = self.offset(x_n)
        if self.high_offset:
            return F.pixel_shuffle(raw, self.up_factor)
        return F.interpolate(raw, scale_factor=self.up_factor)

    def forward(self, y, x):
        if self.norm:
            x_n, y = self.norm_x(x), self.norm_y(y)
        else:
            x_n = x
        q, k = self.q(y), self.k(x_n)
        offset = self.offsets(x_n)
        args = (self.num_point, self.up_factor, self.groups)
        attn = F.softmax(deform_qk(q, k, offset, *args), dim=2)
        return deform_av(attn, x, offset, *args)


def random_module(case, seed):
    """A float64 ``SAPADeformTorch`` for a test case ``(points, groups, up_factor,
    high_offset, norm, data_format)`` (``backend_utils.DEFORM_CASE``) with random
    weights (offsets large enough to move points across cells, norm scales around 1),
    and its ``(cx, cy)`` channel counts."""
    points, groups, s, high, norm, _ = case
    cx, cy = (64, 32) if norm else (8, 6)
    torch.manual_seed(seed)
    # The official positional order: dim_y, dim_x, up_factor, num_point, groups,
    # embedding_dim, qkv_bias, high_offset, norm.
    module = SAPADeformTorch(cy, cx, s, points, groups, 4, True, high, norm).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
            p.copy_(base + (0.6 if name.startswith("offset") else 0.3) * torch.randn_like(p))
    return module, cx, cy
