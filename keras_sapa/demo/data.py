"""A built-in segmentation task generated in code, and its metrics.

``make_shapes(num_images, image_size, seed)`` draws textured shapes (ellipses,
rectangles, triangles) on a textured background, with a per-pixel class mask. It is
small enough to train a segmentation network on a CPU in minutes, and built so that
the boundaries are what a model gets wrong:

- boundaries are exact (no anti-aliasing): every pixel belongs to one class;
- the class is the region's *mean* colour family (1 red, 2 green, 3 blue, 0 an
  unsaturated background), but no single pixel tells it: every region carries a strong
  texture (stripes, checkers, smooth blobs or fine noise, of random period,
  orientation and amplitude) with a random tint per channel, plus pixel noise, so
  deciding a pixel's class needs an average over its neighbourhood: the averaging
  that blurs a low-resolution decoder's boundaries. The shape is random and says
  nothing about the class;
- shapes overlap (later ones on top) and may leave the frame.

Everything is NumPy and deterministic: the same ``seed`` gives the same arrays on any
machine. ``mean_iou`` and ``boundary_f_score`` are the metrics the demo and the
segmentation notebook report.
"""

import numpy as np

CLASS_NAMES = ("background", "red", "green", "blue")
NUM_CLASSES = len(CLASS_NAMES)
# Display colour of each class, for plots of masks (see colorize).
CLASS_COLORS = np.array(
    [[0.55, 0.55, 0.55], [0.85, 0.15, 0.15], [0.15, 0.65, 0.15], [0.15, 0.3, 0.9]], np.float32
)
# Hue (degrees) of each object class; the background is unsaturated.
_CLASS_HUES = {1: 0.0, 2: 120.0, 3: 240.0}


def _texture(rng, height, width, kind):
    """A random texture in about [-1, 1]: ``kind`` 0 stripes, 1 checkers, 2 smooth
    blobs, 3 fine noise; frequency, orientation and phase are random."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 0:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(5.0, 12.0)
        phase = rng.uniform(0, 2 * np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        return np.sin(2 * np.pi * u / period + phase)
    if kind == 1:  # checkers
        period = rng.uniform(5.0, 12.0)
        theta = rng.uniform(0, np.pi / 2)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        return np.where((np.floor(u / period) + np.floor(v / period)) % 2 == 0, 1.0, -1.0)
    if kind == 2:  # smooth blobs: a few random sinusoids summed
        out = np.zeros((height, width), np.float32)
        for _ in range(3):
            theta = rng.uniform(0, 2 * np.pi)
            period = rng.uniform(8.0, 24.0)
            u = xx * np.cos(theta) + yy * np.sin(theta)
            out += np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        return out / 3.0
    return rng.uniform(-1.0, 1.0, size=(height, width))  # fine noise


def _fill(rng, height, width, label):
    """A textured colour field (H, W, 3) in [0, 255] for class ``label``.

    The mean colour carries the class (hue within 25 degrees of the class hue, or
    low saturation for the background), brightness is random, and a strong texture
    of a random kind with a random tint per channel perturbs both brightness and hue
    from pixel to pixel.
    """
    import colorsys

    if label == 0:
        hue, saturation = rng.uniform(0.0, 360.0), rng.uniform(0.0, 0.15)
    else:
        hue = (_CLASS_HUES[label] + rng.uniform(-25.0, 25.0)) % 360.0
        saturation = rng.uniform(0.45, 0.9)
    value = rng.uniform(0.45, 0.85)
    base = 255.0 * np.array(colorsys.hsv_to_rgb(hue / 360.0, saturation, value))
    amplitude = rng.uniform(30.0, 70.0)
    tint = rng.uniform(0.2, 1.0, size=3)
    texture = _texture(rng, height, width, int(rng.integers(4)))
    return (base + amplitude * texture[..., None] * tint).astype(np.float32)


def _shape_mask(rng, kind, height, width):
    """Boolean mask of one random shape: ``kind`` 0 ellipse, 1 rectangle, 2 triangle."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    size = min(height, width)
    cy, cx = rng.uniform(0.1, 0.9, size=2) * (height, width)
    theta = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    if kind == 0:  # ellipse
        a, b = rng.uniform(0.1, 0.28, size=2) * size
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 1:  # rectangle
        a, b = rng.uniform(0.1, 0.25, size=2) * size
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    # triangle: three vertices at random angles around the centre
    radius = rng.uniform(0.15, 0.35) * size
    angles = theta + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, size=3)
    vy = cy + radius * np.sin(angles)
    vx = cx + radius * np.cos(angles)
    inside = np.ones((height, width), bool)
    sign = None
    for i in range(3):
        j = (i + 1) % 3
        cross = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
        if sign is None:
            # orientation of the triangle: the sign every interior point shares
            k = (i + 2) % 3
            sign = np.sign((vx[j] - vx[i]) * (vy[k] - vy[i]) - (vy[j] - vy[i]) * (vx[k] - vx[i]))
        inside &= cross * sign >= 0
    return inside


def make_shapes(num_images, image_size=64, seed=0, max_shapes=5, noise=8.0):
    """Images of textured shapes on a textured background, and their class masks.

    Args:
        num_images: number of images.
        image_size: side of the square images (an int), or ``(height, width)``.
        seed: the random seed; the output depends on nothing else.
        max_shapes: each image has between 1 and ``max_shapes`` shapes.
        noise: standard deviation of the Gaussian pixel noise, in 0-255 units.

    Returns:
        ``(images, masks)``: ``images`` float32 ``(N, H, W, 3)`` in [0, 255],
        ``masks`` int32 ``(N, H, W)`` with values in ``range(NUM_CLASSES)``
        (:data:`CLASS_NAMES`).
    """
    from keras_sapa.ops import _checks

    num_images = _checks.integer("num_images", num_images, "a non-negative integer", minimum=0)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        height, width = (
            _checks.integer("image_size", v, "an integer >= 8 or a pair of them", minimum=8)
            for v in image_size
        )
    else:
        height = width = _checks.integer(
            "image_size", image_size, "an integer >= 8 or a pair of them", minimum=8
        )
    max_shapes = _checks.positive_int("max_shapes", max_shapes)
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, height, width, 3), np.float32)
    masks = np.empty((num_images, height, width), np.int32)
    for n in range(num_images):
        image = _fill(rng, height, width, 0)
        mask = np.zeros((height, width), np.int32)
        for _ in range(rng.integers(1, max_shapes + 1)):
            label = int(rng.integers(1, NUM_CLASSES))
            inside = _shape_mask(rng, int(rng.integers(3)), height, width)
            image[inside] = _fill(rng, height, width, label)[inside]
            mask[inside] = label
        image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
        images[n] = np.clip(image, 0.0, 255.0)
        masks[n] = mask
    return images, masks


def colorize(mask):
    """An RGB picture ``(..., 3)`` in [0, 1] of a class mask, for plots."""
    return CLASS_COLORS[np.asarray(mask)]


# ----------------------------------------------------------------------- metrics
def confusion_matrix(y_true, y_pred, num_classes=NUM_CLASSES):
    """``(num_classes, num_classes)`` counts, rows the true class."""
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def mean_iou(y_true, y_pred, num_classes=NUM_CLASSES):
    """Mean intersection over union over the classes present in ``y_true`` or
    ``y_pred`` (classes absent from both are left out, as in most benchmarks).

    Returns ``(miou, per_class)``; ``per_class`` holds NaN for the absent classes.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, inter / union, np.nan)
    return float(np.nanmean(per_class)), per_class


def boundaries(mask):
    """Boolean map of the pixels whose label differs from their right or lower
    neighbour (or that neighbour's), i.e. both sides of every label boundary."""
    mask = np.asarray(mask)
    edge = np.zeros(mask.shape, bool)
    dy = mask[..., 1:, :] != mask[..., :-1, :]
    dx = mask[..., :, 1:] != mask[..., :, :-1]
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    return edge


def _dilate(edge, radius):
    """Binary dilation by a (2 * radius + 1) square, over the last two axes."""
    if radius <= 0:
        return edge
    out = edge.copy()
    height, width = edge.shape[-2:]
    padded = np.pad(edge, [(0, 0)] * (edge.ndim - 2) + [(radius, radius)] * 2)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[..., dy : dy + height, dx : dx + width]
    return out


def boundary_band(mask, tolerance=1):
    """Boolean map of the pixels within ``tolerance`` pixels (chessboard distance) of a
    label boundary of ``mask`` (:func:`boundaries`), over the last two axes: the pixels
    :func:`boundary_f_score` looks at."""
    return _dilate(boundaries(mask), tolerance)


def boundary_f_score(y_true, y_pred, tolerance=1):
    """Boundary F-score (as in the DAVIS and Cityscapes boundary metrics).

    A predicted boundary pixel is correct when a true boundary pixel lies within
    ``tolerance`` pixels (chessboard distance), and conversely for recall.
    Boundaries are those of :func:`boundaries`. Counts are pooled over the batch.

    Returns ``(f_score, precision, recall)``; 1.0 for both empty.
    """
    true_edge = boundaries(y_true)
    pred_edge = boundaries(y_pred)
    n_pred, n_true = pred_edge.sum(), true_edge.sum()
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0, 1.0
    precision = (pred_edge & _dilate(true_edge, tolerance)).sum() / max(n_pred, 1)
    recall = (true_edge & _dilate(pred_edge, tolerance)).sum() / max(n_true, 1)
    if precision + recall == 0:
        return 0.0, float(precision), float(recall)
    f = 2 * precision * recall / (precision + recall)
    return float(f), float(precision), float(recall)
