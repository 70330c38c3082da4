"""Guided upsampling with SAPA and no learned weights: the bilateral embedding.

SAPA mixes, for every output pixel, the ``K x K`` low-resolution pixels around it with
softmax weights given by the dot product of a query (from the guide pixel) and a key
(from each low-resolution pixel). A fixed embedding makes that dot product, exactly, a
Gaussian of colour and position distance (the identity
``-|q - k|^2 = 2 q.k - |q|^2 - |k|^2``, the squared norms going into two extra
channels)::

    logit = C - |colour(guide pixel) - colour(low-res pixel)|^2 / (2 color_sigma^2)
              - |position(guide pixel) - position(low-res pixel)|^2 / (2 space_sigma^2)

(``C`` = :data:`BORDER_OFFSET` keeps SAPA's zero-padded border points out of the
softmax.) Each output pixel thus takes the colour of the low-resolution pixels *like
itself*, near it: inside a region those are all its neighbours (a smooth
interpolation), at a boundary only those on its own side (a sharp edge). That is the
paper's point affiliation with the learned embedding replaced by colour; with this
embedding the operator is joint bilateral upsampling (Kopf et al., 2007). One SAPA step
with ``up_factor=scale`` is used for any integer scale: the full-resolution guide
decides affiliation, and repeated 2x steps would need intermediate guides and would
smooth once per step.
"""

import numpy as np

from keras_sapa.demo import images
from keras_sapa.demo import metrics

DEFAULT_SCALE = 4
DEFAULT_KERNEL_SIZE = 5
DEFAULT_COLOR_SIGMA = 0.03
DEFAULT_SPACE_SIGMA = 1.0
#: Logit offset of the real window points: SAPA's padded border points enter the
#: softmax with logit 0, so they get a weight of about ``exp(-BORDER_OFFSET)``
#: relative to the best real point.
BORDER_OFFSET = 100.0
#: The methods of :func:`guided_upsampling`, in table order.
METHODS = ("nearest", "bilinear", "bicubic", "SAPA, gray guide", "SAPA")
#: The method :func:`guided_upsampling` adds with ``deform_steps`` (after :data:`METHODS`).
DEFORM_METHOD = "SAPA-D"


def colour_embedding(guide, low, scale, color_sigma, space_sigma):
    """The fixed query/key embedding under which SAPA's dot product is a Gaussian.

    ``query . key = BORDER_OFFSET - |g - l|^2 / (2 color_sigma^2)
    - |p_g - p_l|^2 / (2 space_sigma^2)`` for a guide pixel of colour ``g`` at position
    ``p_g`` and a low-resolution pixel of colour ``l`` at ``p_l`` (positions in
    low-resolution pixels, centred on the image so the numbers stay small in float32).

    Args:
        guide: ``(sH, sW, c)`` full-resolution guide.
        low: ``(H, W, c)`` low-resolution image in the guide's colour space.
        scale: the integer ``s``.
        color_sigma: colour temperature (colour units).
        space_sigma: spatial temperature (low-resolution pixels).

    Returns:
        ``(query (1, sH, sW, c + 4), key (1, H, W, c + 4))``, float32.
    """
    height, width = low.shape[:2]
    ly, lx = np.meshgrid(
        np.arange(height) - height / 2, np.arange(width) - width / 2, indexing="ij"
    )
    # Centre of high-resolution pixel i in low-resolution coordinates: (i + 0.5)/s - 0.5.
    gy, gx = np.meshgrid(
        (np.arange(height * scale) + 0.5) / scale - 0.5 - height / 2,
        (np.arange(width * scale) + 0.5) / scale - 0.5 - width / 2,
        indexing="ij",
    )
    pos_key = np.stack([ly, lx], axis=-1)
    pos_query = np.stack([gy, gx], axis=-1)
    guide = np.asarray(guide, np.float64)
    low = np.asarray(low, np.float64)
    inv_c, inv_s = 1.0 / color_sigma**2, 1.0 / space_sigma**2

    def half_sq(colour, pos):
        return 0.5 * inv_c * (colour**2).sum(-1, keepdims=True) + 0.5 * inv_s * (pos**2).sum(
            -1, keepdims=True
        )

    key = np.concatenate(
        [low, pos_key, -half_sq(low, pos_key), np.ones((height, width, 1))], axis=-1
    )
    query = np.concatenate(
        [
            guide * inv_c,
            pos_query * inv_s,
            np.ones(guide.shape[:2] + (1,)),
            BORDER_OFFSET - half_sq(guide, pos_query),
        ],
        axis=-1,
    )
    return query[None].astype(np.float32), key[None].astype(np.float32)


def sapa_upsample(
    low,
    guide,
    scale,
    kernel_size=DEFAULT_KERNEL_SIZE,
    color_sigma=DEFAULT_COLOR_SIGMA,
    space_sigma=DEFAULT_SPACE_SIGMA,
    guide_low=None,
    return_weights=False,
):
    """Upsample ``low`` by ``scale`` with SAPA guided by ``guide`` (no learned weights).

    Args:
        low: ``(H, W, C)`` image to upsample (the value).
        guide: ``(scale*H, scale*W, c)`` guide; its colour is compared with
            ``guide_low``.
        scale: the integer up factor.
        kernel_size: SAPA's window ``K`` (odd).
        color_sigma, space_sigma: temperatures of :func:`colour_embedding`.
        guide_low: ``(H, W, c)``, the low-resolution counterpart of the guide; defaults
            to ``low`` (then ``c`` must equal ``C``).
        return_weights: also return the SAPA weights ``(scale*H, scale*W, K*K)``.

    Returns:
        ``(scale*H, scale*W, C)`` float32 in [0, 1], and the weights when asked for.
    """
    import keras

    from keras_sapa import ops

    guide_low = low if guide_low is None else guide_low
    query, key = colour_embedding(guide, guide_low, scale, color_sigma, space_sigma)
    value = np.asarray(low, np.float32)[None]
    if not return_weights:
        out = ops.sapa(query, key, value, kernel_size, scale)
        return np.clip(keras.ops.convert_to_numpy(out)[0], 0.0, 1.0)
    weights = keras.ops.softmax(ops.similarity(query, key, kernel_size, scale), axis=-1)
    out = ops.aggregate(weights, value, kernel_size, scale)
    return (
        np.clip(keras.ops.convert_to_numpy(out)[0], 0.0, 1.0),
        keras.ops.convert_to_numpy(weights)[0],
    )


def guided_upsampling(
    image,
    scale=DEFAULT_SCALE,
    kernel_size=DEFAULT_KERNEL_SIZE,
    color_sigma=DEFAULT_COLOR_SIGMA,
    space_sigma=DEFAULT_SPACE_SIGMA,
    deform_steps=None,
    deform_image=None,
):
    """Shrink ``image`` by ``scale`` and bring it back with every method of
    :data:`METHODS`, measuring each against the original.

    Args:
        image: float ``(H, W, 3)`` in [0, 1] (see :func:`~keras_sapa.demo.load_image`).
        deform_steps: ``None`` (default) leaves SAPA-D out; an integer adds the method
            :data:`DEFORM_METHOD` (:mod:`keras_sapa.demo.deform`): a
            :class:`keras_sapa.SAPADeform` with a fixed colour similarity whose offset
            branch is first trained for that many steps on ``deform_image``.
        deform_image: the photograph (``(H, W, 3)``) the SAPA-D offsets are trained on;
            default :data:`keras_sapa.demo.deform.DEFAULT_TRAIN_IMAGE`.

    Returns:
        A dict with ``reference`` (the cropped original), ``low``, ``outputs`` (method
        -> image), ``metrics`` (method -> dict of :meth:`EdgeReference.measure
        <keras_sapa.demo.metrics.EdgeReference.measure>`), ``weights`` (the SAPA
        weights, ``(sH, sW, K*K)``), ``edges`` (the :class:`EdgeReference`), ``scale``
        and ``kernel_size``; with ``deform_steps``, also ``deform``: a dict with the
        trained ``layer``, its training ``losses`` and ``steps``.
    """
    scale = images.check_scale(scale, image.shape)
    low, reference = images.downsample(image, scale)
    outputs = {
        "nearest": images.upsample_nearest(low, scale),
        "bilinear": images.upsample_resize(low, scale, "bilinear"),
        "bicubic": images.upsample_resize(low, scale, "bicubic"),
    }
    gray_guide, gray_low = metrics.gray(reference)[..., None], metrics.gray(low)[..., None]
    outputs["SAPA, gray guide"] = sapa_upsample(
        low, gray_guide, scale, kernel_size, color_sigma, space_sigma, guide_low=gray_low
    )
    outputs["SAPA"], weights = sapa_upsample(
        low, reference, scale, kernel_size, color_sigma, space_sigma, return_weights=True
    )
    deform_result = None
    if deform_steps is not None:
        from keras_sapa.demo import deform

        if deform_image is None:
            deform_image = images.load_image(deform.DEFAULT_TRAIN_IMAGE)
        layer = deform.build_deform_upsampler(scale, color_sigma=color_sigma)
        losses = deform.fit_deform_upsampler(layer, deform_image, scale, deform_steps)
        outputs[DEFORM_METHOD] = deform.deform_upsample(layer, low, reference)
        deform_result = {"layer": layer, "losses": losses, "steps": deform_steps}
    edges = metrics.EdgeReference(reference)
    result = {
        "reference": reference,
        "low": low,
        "outputs": outputs,
        "metrics": {name: edges.measure(out) for name, out in outputs.items()},
        "weights": weights,
        "edges": edges,
        "scale": scale,
        "kernel_size": kernel_size,
    }
    if deform_result is not None:
        result["deform"] = deform_result
    return result
