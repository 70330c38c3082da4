"""SAPA-D (:class:`keras_sapa.SAPADeform`) on the guided upsampling task.

SAPA-B's demo needs no training: a fixed colour-and-position embedding makes its
similarity a Gaussian of colour and position distance over a fixed ``K x K`` window.
SAPA-D samples ``P`` points per output pixel wherever its offset branch says, so the
offsets are what it learns. Here the similarity stays fixed and only the offsets are
trained:

- ``x`` (the feature to upsample) holds, per low-resolution pixel, its colour ``c``,
  ``-|c|^2 / 2``, a constant 1 and the Sobel gradient of its luminance (7 channels);
  ``guide`` holds the full-resolution colour ``y``, 1 and ``-|y|^2 / 2`` (5 channels).
- ``q`` and ``k`` are fixed (not trained) so that the logit of a sampled point is
  ``BORDER_OFFSET - |y - c|^2 / (2 color_sigma^2)``: the colour Gaussian of the SAPA-B
  demo (the spatial term is the sampling pattern itself). Points that fall outside the
  image keep logit 0, far below, as in the SAPA-B demo.
- the offsets start as a ``grid x grid`` square of spacing 1 centred on each output
  pixel's own position (``high_offset`` lets every sub-pixel position have its own
  offsets), and the offset branch (a 1x1 convolution of ``x``, as in SAPA-D) is
  trained with ``fit`` on a *different* photograph: it learns where to look from a
  pixel's colour and the local gradient.
- the value is ``x`` itself, whose first three channels are the colour: the first
  three output channels are the upsampled image.

:func:`sampling_positions` reads where the points of given output pixels land, from
:meth:`SAPADeform.sampling_offsets <keras_sapa.SAPADeform.sampling_offsets>`, for the
figure of :func:`keras_sapa.demo.figures.deform_figure`.
"""

import numpy as np

from keras_sapa.demo import images
from keras_sapa.demo import metrics

#: Side of the initial square of sampled points (``P = DEFAULT_GRID**2``).
DEFAULT_GRID = 3
#: Training steps of the offset branch in :func:`guided_upsampling(deform_steps=...)
#: <keras_sapa.demo.guided_upsampling>` when the command line asks for SAPA-D.
DEFAULT_STEPS = 150
#: The photograph the offsets are trained on (never the one evaluated, by default).
DEFAULT_TRAIN_IMAGE = "chelsea"
#: The largest centred crop of the training photograph used (keeps training short).
TRAIN_CROP = 192
LEARNING_RATE = 0.02
#: Logit of a real point relative to a padded one (as ``guided.BORDER_OFFSET``).
BORDER_OFFSET = 100.0
X_CHANNELS, GUIDE_CHANNELS, EMBED = 7, 5, 5


def deform_inputs(low, guide):
    """The SAPA-D inputs for a low-resolution image and its full-resolution guide.

    Args:
        low: ``(H, W, 3)`` colour in [0, 1].
        guide: ``(s*H, s*W, 3)`` colour in [0, 1].

    Returns:
        ``(x (1, H, W, 7), guide (1, s*H, s*W, 5))`` float32 (see the module docstring).
    """
    from skimage import filters

    low = np.asarray(low, np.float64)
    guide = np.asarray(guide, np.float64)
    luminance = metrics.gray(low)
    x = np.concatenate(
        [
            low,
            -0.5 * (low**2).sum(-1, keepdims=True),
            np.ones(low.shape[:2] + (1,)),
            filters.sobel_h(luminance)[..., None],
            filters.sobel_v(luminance)[..., None],
        ],
        axis=-1,
    )
    g = np.concatenate(
        [guide, np.ones(guide.shape[:2] + (1,)), -0.5 * (guide**2).sum(-1, keepdims=True)],
        axis=-1,
    )
    return x[None].astype(np.float32), g[None].astype(np.float32)


def grid_offsets(scale, grid=DEFAULT_GRID):
    """The initial offset-convolution bias: ``grid x grid`` points of spacing 1 centred on
    each output pixel's position, laid out as SAPA-D's ``high_offset`` expects (channel
    ``c*s*s + a*s + b`` of the low-resolution map becomes channel ``c`` of sub-pixel
    ``(a, b)``; channel ``2p`` the width, ``2p + 1`` the height shift of point ``p``).

    Returns:
        ``(2 * grid**2 * scale**2,)`` float32.
    """
    r = (grid - 1) / 2
    steps = np.arange(grid) - r
    dy, dx = (v.ravel() for v in np.meshgrid(steps, steps, indexing="ij"))
    # Centre of high-resolution pixel a*... within its low-resolution pixel.
    sub = (np.arange(scale) + 0.5) / scale - 0.5
    bias = np.zeros((2 * grid * grid, scale, scale))
    bias[0::2] = dx[:, None, None] + sub[None, None, :]
    bias[1::2] = dy[:, None, None] + sub[None, :, None]
    return bias.reshape(-1).astype(np.float32)


def build_deform_upsampler(scale, grid=DEFAULT_GRID, color_sigma=0.03):
    """A built :class:`keras_sapa.SAPADeform` (``up_factor=scale``, ``P = grid**2``, one
    group) with the fixed colour similarity and the grid offsets of the module
    docstring; only its offset branch is trainable."""
    from keras_sapa import SAPADeform

    layer = SAPADeform(
        up_factor=scale,
        num_points=grid * grid,
        groups=1,
        embedding_dim=EMBED,
        high_offset=True,
        name="sapa_d",
    )
    layer.build((None, None, None, X_CHANNELS), (None, None, None, GUIDE_CHANNELS))
    inv = 1.0 / color_sigma**2
    q_bias = np.zeros(EMBED, np.float32)
    q_bias[4] = BORDER_OFFSET
    layer.q.set_weights([np.eye(GUIDE_CHANNELS, EMBED, dtype=np.float32) * inv, q_bias])
    layer.k.set_weights([np.eye(X_CHANNELS, EMBED, dtype=np.float32), np.zeros(EMBED, np.float32)])
    layer.offset.set_weights(
        [
            np.zeros((X_CHANNELS, layer.offset_channels), np.float32),
            grid_offsets(scale, grid),
        ]
    )
    layer.q.trainable = False
    layer.k.trainable = False
    return layer


def _model(layer):
    import keras

    x = keras.Input((None, None, X_CHANNELS))
    g = keras.Input((None, None, GUIDE_CHANNELS))
    return keras.Model([x, g], layer(x, g)[..., :3])


def fit_deform_upsampler(layer, image, scale, steps, learning_rate=LEARNING_RATE):
    """Trains the offset branch of ``layer`` for ``steps`` Adam steps to bring
    ``image`` (``(H, W, 3)``, cropped to its centred :data:`TRAIN_CROP` square) back
    from its ``scale``-times shrunk version. Returns the per-step losses (mean squared
    error)."""
    import keras

    if steps < 1:
        return []
    image = images.center_crop(image, min(TRAIN_CROP, *image.shape[:2]))
    low, reference = images.downsample(image, scale)
    x, g = deform_inputs(low, reference)
    model = _model(layer)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    history = model.fit(
        [x, g], reference[None].astype(np.float32), epochs=steps, batch_size=1, verbose=0
    )
    return [float(v) for v in history.history["loss"]]


def deform_upsample(layer, low, guide):
    """``low`` (``(H, W, 3)``) upsampled by ``layer`` guided by ``guide``: ``(sH, sW, 3)``
    float32 in [0, 1]."""
    import keras

    x, g = deform_inputs(low, guide)
    out = keras.ops.convert_to_numpy(layer(x, g))[0, ..., :3]
    return np.clip(out, 0.0, 1.0)


def sampling_positions(layer, low, points):
    """Where the points of some output pixels are sampled.

    Args:
        layer: the :class:`keras_sapa.SAPADeform` of :func:`build_deform_upsampler`.
        low: ``(H, W, 3)`` the low-resolution image.
        points: ``[(i, j), ...]`` full-resolution pixel coordinates.

    Returns:
        ``(len(points), P, 2)``: ``(row, column)`` of every sampled point in
        low-resolution pixel coordinates (the anchor ``(i // s, j // s)`` plus the offsets
        of :meth:`SAPADeform.sampling_offsets`; group 0).
    """
    import keras

    s = layer.up_factor
    x, _ = deform_inputs(low, np.zeros((low.shape[0] * s, low.shape[1] * s, 3)))
    offsets = keras.ops.convert_to_numpy(layer.sampling_offsets(x))[0]
    p = layer.num_points
    out = np.zeros((len(points), p, 2))
    for n, (i, j) in enumerate(points):
        shift = offsets[i, j, : 2 * p].reshape(p, 2)
        out[n, :, 0] = i // s + shift[:, 1]
        out[n, :, 1] = j // s + shift[:, 0]
    return out


def to_full_resolution(positions, scale):
    """Low-resolution ``(row, column)`` positions as full-resolution pixel coordinates
    (the centre of low-resolution pixel ``h`` is at ``(h + 0.5) * scale - 0.5``)."""
    return (np.asarray(positions, np.float64) + 0.5) * scale - 0.5
