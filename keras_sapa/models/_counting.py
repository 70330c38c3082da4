"""What SAPA costs inside a model: parameters and analytic multiply-adds.

The count follows ``shared/SAPA_SPEC.md``: per output (high-resolution) point,
``K*K*d`` multiply-adds for the similarity and ``K*K*C`` for the aggregation, plus the
1x1 projections at the resolution they run at. Norms, the softmax, the sigmoid and
other elementwise work are not multiply-adds of a product and are left out, as FLOP
counters for convolutional networks usually do.
"""

import math

__all__ = ["layer_macs", "sapa_deform_layer_macs", "sapa_layer_macs", "sapa_overhead"]


def sapa_layer_macs(layer, low_res_hw, x_channels, guide_channels):
    """Analytic multiply-adds of one SAPA layer for one image.

    Args:
        layer: a built or unbuilt :class:`keras_sapa.SAPA` (only its configuration is
            read).
        low_res_hw: ``(h, w)`` of the low-resolution input ``x``.
        x_channels: channels of ``x`` (``Cx``).
        guide_channels: channels of the guide (``Cy``).

    Returns:
        A dict of multiply-adds by part (``similarity``, ``aggregation``, and one entry
        per projection present: ``q``, ``qy``, ``qx``, ``gate``, ``gate_mix``, ``k``,
        ``v``) and their sum under ``total``.
    """
    h, w = (int(v) for v in low_res_hw)
    s = layer.up_factor
    kk = layer.kernel_size * layer.kernel_size
    n_lo = h * w
    n_hi = n_lo * s * s
    cx, cy = int(x_channels), int(guide_channels)
    has_v = layer.value_projection or (layer.output_dim is not None and layer.output_dim != cx)
    c_out = (layer.output_dim or cx) if has_v else cx
    d = cx if layer.variant == "identity" else layer.embedding_dim

    parts = {
        "similarity": n_hi * kk * d,
        "aggregation": n_hi * kk * c_out,
    }
    if layer.variant == "bilinear":
        parts["q"] = n_hi * cy * d
    elif layer.variant == "concat":
        parts["q"] = n_hi * (cy + cx) * d
    elif layer.variant == "gated":
        parts["qy"] = n_hi * cy * d
        # The official module projects the nearest-upsampled x, i.e. at high resolution.
        parts["qx"] = n_hi * cx * d
        parts["gate"] = n_lo * cx
        # g * qy + (1 - g) * qx: two products per query channel.
        parts["gate_mix"] = n_hi * 2 * d
    if layer.variant != "identity":
        parts["k"] = n_lo * cx * d
    if has_v:
        parts["v"] = n_lo * cx * c_out
    parts["total"] = sum(parts.values())
    return parts


def sapa_deform_layer_macs(layer, low_res_hw, x_channels, guide_channels):
    """Analytic multiply-adds of one :class:`keras_sapa.SAPADeform` (SAPA-D) layer for
    one image, as the official module computes it (``shared/SAPA_SPEC.md``, SAPA-D).

    With ``s`` the factor, ``G`` groups, ``P`` points, ``E`` the embedding per group and
    4 bilinear taps per sample, per output (high-resolution) point: ``G*P*4*E`` for
    interpolating the key at the sampled points and ``G*P*E`` for the dot products
    (``similarity``), ``P*4*Cx`` for interpolating and weighting the values
    (``aggregation``, each channel reads the ``P`` points of its group). The 1x1
    projections at the resolution the official module runs them: ``q`` (``Cy -> G*E``)
    on the guide at high resolution, ``k`` (``Cx -> G*E``) and ``offset``
    (``Cx -> G*P*2*s*s`` with ``high_offset``, else ``Cx -> G*P*2``) on ``x`` at low
    resolution. The offset rearrangement (pixel shuffle or nearest), the norms and the
    softmax are not multiply-adds of a product and are left out, as for SAPA.

    Returns:
        A dict of multiply-adds by part (``similarity``, ``aggregation``, ``q``, ``k``,
        ``offset``) and their sum under ``total``.
    """
    h, w = (int(v) for v in low_res_hw)
    s = layer.up_factor
    g, p, e = layer.groups, layer.num_points, layer.embedding_dim
    n_lo = h * w
    n_hi = n_lo * s * s
    cx, cy = int(x_channels), int(guide_channels)
    offset_channels = g * p * 2 * (s * s if layer.high_offset else 1)
    parts = {
        "similarity": n_hi * g * p * 5 * e,
        "aggregation": n_hi * p * 4 * cx,
        "q": n_hi * cy * g * e,
        "k": n_lo * cx * g * e,
        "offset": n_lo * cx * offset_channels,
    }
    parts["total"] = sum(parts.values())
    return parts


def _cost_models():
    """Layer class -> its multiply-add count ``fn(layer, low_res_hw, x_channels,
    guide_channels)``: one entry per upsampler class the models can count."""
    from keras_sapa.deform import SAPADeform
    from keras_sapa.layers import SAPA

    return {SAPA: sapa_layer_macs, SAPADeform: sapa_deform_layer_macs}


def layer_macs(layer, low_res_hw, x_channels, guide_channels):
    """Multiply-adds of one upsampling layer for one image, by its class's cost model
    (:func:`sapa_layer_macs` for :class:`keras_sapa.SAPA`, :func:`sapa_deform_layer_macs`
    for :class:`keras_sapa.SAPADeform`); ``ValueError`` for a layer class without one."""
    for cls, count in _cost_models().items():
        if isinstance(layer, cls):
            return count(layer, low_res_hw, x_channels, guide_channels)
    raise ValueError(
        f"No multiply-add count for the upsampler {layer.name!r} of class "
        f"{type(layer).__name__}; sapa_overhead counts "
        f"{sorted(cls.__name__ for cls in _cost_models())}."
    )


def _image_hw(model, input_shape):
    if input_shape is None:
        shape = model.input_shape
        if isinstance(shape, dict):
            shape = next(iter(shape.values()))
        if isinstance(shape, list):
            shape = shape[0]
        shape = tuple(shape)[1:]
    else:
        shape = tuple(input_shape)
        if len(shape) == 4:
            shape = shape[1:]
    if len(shape) != 3 or shape[0] is None or shape[1] is None:
        raise ValueError(
            "sapa_overhead needs the image height and width: pass "
            "`input_shape=(height, width, channels)` when the model's input shape has "
            f"unknown dimensions. Received: input_shape={input_shape!r}, model input "
            f"shape={getattr(model, 'input_shape', None)!r}"
        )
    return int(shape[0]), int(shape[1])


def _find_stage_owner(model):
    # The model itself, its feature pyramid, its backbone (KerasHub tasks) or the
    # backbone's pyramid (KerasHub RetinaNet).
    backbone = getattr(model, "backbone", None)
    candidates = [
        model,
        getattr(model, "feature_pyramid", None),
        backbone,
        getattr(backbone, "feature_pyramid", None),
    ]
    for candidate in candidates:
        if candidate is not None and hasattr(candidate, "sapa_stages"):
            return candidate
    raise ValueError(
        "sapa_overhead takes a keras_sapa model (SAPADeepLabV3Plus, SAPARetinaNet, "
        "SAPASegFormer, a SAPA KerasHub backbone) or a model whose `feature_pyramid` "
        f"or `backbone` is one. Received: {type(model).__name__}"
    )


def sapa_overhead(model, input_shape=None):
    """Parameters and multiply-adds that SAPA adds over the stock KerasCV or KerasHub model.

    The keras_sapa models keep every stock part (backbone, spatial pyramid pooling,
    projections, heads, lateral and output convolutions) and change only the
    upsamplers, so what SAPA adds is exactly its layers' parameters, and its
    multiply-adds less those of the fixed upsampling it replaces (bilinear: counted as
    4 multiply-adds per output value, nearest: 0).

    Args:
        model: a :class:`SAPADeepLabV3Plus`, a :class:`SAPARetinaNet`, a
            :class:`SAPASegFormer`, a SAPA KerasHub backbone, a KerasHub task holding
            one, or any model whose ``feature_pyramid`` is a SAPA pyramid.
        input_shape: ``(height, width, channels)`` of one image; defaults to the
            model's input shape (needed when that has unknown height or width).

    Returns:
        A dict for one image: ``params`` (parameters SAPA adds), ``model_params`` (the
        whole model), ``stock_params`` (``model_params - params``), ``macs`` (SAPA's
        multiply-adds), ``replaced_macs`` (those of the stock upsampling it replaces),
        ``net_macs`` (``macs - replaced_macs``) and ``stages``: per SAPA layer its
        ``name``, ``level`` (output pyramid level), ``low_res_hw``, ``x_channels``,
        ``guide_channels``, ``params`` and ``macs`` (a per-part dict as from
        :func:`sapa_layer_macs`).
    """
    height, width = _image_hw(model, input_shape)
    owner = _find_stage_owner(model)
    stages = []
    params = 0
    macs = 0
    for stage in owner.sapa_stages():
        layer = stage["layer"]
        level = stage["level"]
        out_hw = (math.ceil(height / 2**level), math.ceil(width / 2**level))
        s = getattr(layer, "up_factor", 2)
        if out_hw[0] % s or out_hw[1] % s:
            raise ValueError(
                f"An image of {height}x{width} gives level P{level} a size of "
                f"{out_hw}, not a multiple of the SAPA factor {s}. Use sizes divisible "
                "by the backbone's largest stride."
            )
        low_hw = (out_hw[0] // s, out_hw[1] // s)
        part = layer_macs(layer, low_hw, stage["x_channels"], stage["guide_channels"])
        layer_params = int(layer.count_params()) if layer.built else 0
        stages.append(
            {
                "name": layer.name,
                "level": level,
                "low_res_hw": low_hw,
                "x_channels": stage["x_channels"],
                "guide_channels": stage["guide_channels"],
                "params": layer_params,
                "macs": part,
            }
        )
        params += layer_params
        macs += part["total"]
    replaced = int(owner.replaced_upsampling_macs((height, width)))
    model_params = int(model.count_params())
    return {
        "params": params,
        "model_params": model_params,
        "stock_params": model_params - params,
        "macs": macs,
        "replaced_macs": replaced,
        "net_macs": macs - replaced,
        "stages": stages,
    }
