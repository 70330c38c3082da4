"""``python -m keras_sapa demo``: what SAPA does, on real photographs, in a minute.

Guided upsampling, no training. A photograph (one of scikit-image's bundled samples,
or a file) is shrunk by ``--scale`` (the mean of each ``scale x scale`` block) and
brought back to full size by nearest, bilinear and bicubic resizing, and by SAPA
guided by the full-resolution photograph. The demo prints PSNR and edge measures
against the original and writes a figure with crops side by side and the SAPA kernels
at a boundary.

How SAPA works here without learned weights. SAPA mixes, for every output pixel, the
``K x K`` low-resolution pixels around it with softmax weights given by the dot product
of a query (from the guide pixel) and a key (from each low-resolution pixel). A fixed
embedding makes that dot product, exactly, a Gaussian of colour and position
distance (the identity ``-|q - k|^2 = 2 q.k - |q|^2 - |k|^2``, the squared norms going
into two extra channels):

    logit = C - |colour(guide pixel) - colour(low-res pixel)|^2 / (2 color_sigma^2)
              - |position(guide pixel) - position(low-res pixel)|^2 / (2 space_sigma^2)

(``C`` = 100 keeps SAPA's zero-padded border points out of the softmax.) Each output
pixel thus takes the colour of the low-resolution pixels *like itself*, near it: inside
a region those are all its neighbours (a smooth interpolation), at a boundary only
those on its own side (a sharp edge). That is the paper's point affiliation, with the
learned embedding replaced by colour; with this embedding the operator is joint
bilateral upsampling (Kopf et al., 2007). One SAPA step with ``up_factor=scale`` is
used, for any integer scale: the full-resolution guide is what decides affiliation,
and repeated 2x steps would need intermediate guides (the photograph downsampled)
and would smooth once per step.

Be careful reading the table: SAPA sees the full-resolution photograph, and nearest,
bilinear and bicubic do not, so this is not a fair super-resolution benchmark. It
shows what a guide lets SAPA do. The "gray guide" row gives SAPA the luminance only.

``--train`` adds a small learned comparison: KerasCV's DeepLabV3Plus (8x bilinear
decoder upsampling) against :class:`keras_sapa.models.SAPADeepLabV3Plus` (three SAPA-G
stages), same backbone, seed, data and steps, on the synthetic shapes task of
:mod:`keras_sapa.data` (textured shapes whose class is their colour family), reporting
mIoU and a boundary F-score.
"""

import argparse
import os
import sys
import time

import numpy as np

SAMPLE_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
DEFAULT_IMAGE = "astronaut"
DEFAULT_SCALE = 4
DEFAULT_KERNEL_SIZE = 5
DEFAULT_COLOR_SIGMA = 0.03
DEFAULT_SPACE_SIGMA = 1.0
DEFAULT_OUT = "sapa_demo_out"
# Logit offset of the real window points: SAPA's padded border points enter the
# softmax with logit 0, so they get a weight of about exp(-C) relative to the best
# real point.
_BORDER_OFFSET = 100.0
# The smallest low-resolution image the demo accepts (pixels per side).
_MIN_LOW_RES = 8


class DemoError(ValueError):
    """A bad argument the user can fix (bad image path, scale too large, ...)."""


# ------------------------------------------------------------------------ images
def load_image(spec):
    """An RGB image, float32 ``(H, W, 3)`` in [0, 1].

    ``spec`` is the name of a scikit-image sample (:data:`SAMPLE_IMAGES`), a path to
    an image file, or an array (``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``; integers
    are scaled by their dtype's maximum, floats are taken as [0, 1]).
    """
    if isinstance(spec, np.ndarray):
        image = spec
    elif isinstance(spec, str) and spec in SAMPLE_IMAGES:
        from skimage import data

        image = getattr(data, spec)()
    else:
        path = os.fspath(spec)
        if not os.path.exists(path):
            raise DemoError(
                f"--image: {path!r} is neither a file nor a sample image name "
                f"(samples: {', '.join(SAMPLE_IMAGES)})"
            )
        if os.path.isdir(path):
            raise DemoError(f"--image: {path!r} is a directory, not an image file")
        from skimage import io

        try:
            image = io.imread(path)
        except Exception as error:  # noqa: BLE001 - any reader failure is the user's file
            raise DemoError(f"--image: cannot read {path!r} as an image ({error})") from None
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DemoError(
            f"--image: expected a grayscale, RGB or RGBA image. Received an array of "
            f"shape {image.shape}"
        )
    if np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    elif image.dtype == bool:
        image = image.astype(np.float32)
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def center_crop(image, size):
    """The centred ``size x size`` crop (or the whole image where it is smaller)."""
    height, width = image.shape[:2]
    h, w = min(size, height), min(size, width)
    top, left = (height - h) // 2, (width - w) // 2
    return image[top : top + h, left : left + w]


def downsample(image, scale):
    """Block-mean downsampling: crop to a multiple of ``scale``, average each block.

    Returns ``(low, reference)``: the ``(H, W, 3)`` low-resolution image and the
    cropped original ``(scale*H, scale*W, 3)`` it is compared against.
    """
    height, width = (d // scale for d in image.shape[:2])
    reference = image[: height * scale, : width * scale]
    low = reference.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    return low.astype(np.float32), reference


def upsample_nearest(low, scale):
    return np.repeat(np.repeat(low, scale, axis=0), scale, axis=1)


def upsample_resize(low, scale, method):
    """``tf.image.resize`` (half-pixel centres, which match block-mean pixels)."""
    import tensorflow as tf

    height, width = low.shape[:2]
    out = tf.image.resize(low[None], (height * scale, width * scale), method=method)
    return np.clip(out.numpy()[0], 0.0, 1.0)


def colour_embedding(guide, low, scale, color_sigma, space_sigma):
    """The fixed query/key embedding under which SAPA's dot product is a Gaussian.

    ``query . key = C - |g - l|^2 / (2 color_sigma^2) - |p_g - p_l|^2 / (2 space_sigma^2)``
    for a guide pixel of colour ``g`` at position ``p_g`` and a low-resolution pixel of
    colour ``l`` at ``p_l`` (positions in low-resolution pixels, centred on the image
    so the numbers stay small in float32).

    Args:
        guide: ``(sH, sW, c)`` full-resolution guide.
        low: ``(H, W, c)`` low-resolution image in the guide's colour space.

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
    guide = guide.astype(np.float64)
    low = low.astype(np.float64)
    inv_c, inv_s = 1.0 / color_sigma**2, 1.0 / space_sigma**2

    def half_sq(colour, pos):
        return (
            0.5 * inv_c * (colour**2).sum(-1, keepdims=True)
            + 0.5 * inv_s * (pos**2).sum(-1, keepdims=True)
        )

    key = np.concatenate(
        [low, pos_key, -half_sq(low, pos_key), np.ones((height, width, 1))], axis=-1
    )
    query = np.concatenate(
        [
            guide * inv_c,
            pos_query * inv_s,
            np.ones(guide.shape[:2] + (1,)),
            _BORDER_OFFSET - half_sq(guide, pos_query),
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
        guide_low: ``(H, W, c)``, the low-resolution counterpart of the guide; defaults
            to ``low`` (then ``c`` must equal ``C``).
        return_weights: also return the SAPA weights ``(scale*H, scale*W, K*K)``.

    Returns:
        ``(scale*H, scale*W, C)`` float32, and the weights when asked for.
    """
    import tensorflow as tf

    from keras_sapa import ops

    guide_low = low if guide_low is None else guide_low
    query, key = colour_embedding(guide, guide_low, scale, color_sigma, space_sigma)
    value = low[None].astype(np.float32)
    if not return_weights:
        out = ops.sapa(query, key, value, kernel_size, scale)
        return np.clip(out.numpy()[0], 0.0, 1.0)
    weights = tf.nn.softmax(ops.similarity(query, key, kernel_size, scale), axis=-1)
    out = ops.aggregate(weights, value, kernel_size, scale)
    return np.clip(out.numpy()[0], 0.0, 1.0), weights.numpy()[0]


# ----------------------------------------------------------------------- metrics
def _gray(image):
    from skimage import color

    return color.rgb2gray(np.clip(image, 0.0, 1.0))


def psnr(image, reference, mask=None):
    err = (np.asarray(image, np.float64) - reference) ** 2
    if mask is not None:
        err = err[mask]
    mse = float(err.mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


class EdgeReference:
    """Edges of the original: Canny (sigma 2) on its luminance, and their gradient."""

    def __init__(self, reference, canny_sigma=2.0, tolerance=1):
        from scipy import ndimage
        from skimage import feature, filters

        self.reference = reference
        self.canny_sigma = canny_sigma
        self.tolerance = tolerance
        gray = _gray(reference)
        self.edges = feature.canny(gray, sigma=canny_sigma)
        self.band = ndimage.binary_dilation(self.edges, iterations=max(tolerance, 1))
        self.gradient = filters.sobel(gray)
        self.edge_gradient = float(self.gradient[self.edges].mean()) if self.edges.any() else 0.0

    def measure(self, image):
        """``{"psnr", "psnr_edges", "sharpness", "edge_f1"}`` of ``image``."""
        from scipy import ndimage
        from skimage import feature, filters

        gray = _gray(image)
        result = {"psnr": psnr(image, self.reference)}
        result["psnr_edges"] = psnr(image, self.reference, self.band) if self.band.any() else float("nan")
        if not self.edges.any():
            result["sharpness"] = result["edge_f1"] = float("nan")
            return result
        result["sharpness"] = float(filters.sobel(gray)[self.edges].mean()) / self.edge_gradient
        found = feature.canny(gray, sigma=self.canny_sigma)
        found_band = ndimage.binary_dilation(found, iterations=max(self.tolerance, 1))
        precision = (found & self.band).sum() / max(found.sum(), 1)
        recall = (self.edges & found_band).sum() / max(self.edges.sum(), 1)
        result["edge_f1"] = (
            0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))
        )
        return result


METRIC_HEADERS = (
    ("psnr", "PSNR dB", "{:.2f}"),
    ("psnr_edges", "PSNR@edges dB", "{:.2f}"),
    ("sharpness", "edge sharpness", "{:.0%}"),
    ("edge_f1", "edge F1", "{:.3f}"),
)


def format_table(rows, first_header="method"):
    """A plain-text table of ``rows`` (a dict: method name -> metric dict)."""
    names = list(rows)
    width = max(len(first_header), *(len(n) for n in names))
    header = f"{first_header:<{width}}  " + "  ".join(f"{h:>14}" for _, h, _ in METRIC_HEADERS)
    lines = [header, "-" * len(header)]
    for name in names:
        cells = [fmt.format(rows[name][key]).rjust(14) for key, _, fmt in METRIC_HEADERS]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------ guided demo
def guided_upsampling(
    image,
    scale=DEFAULT_SCALE,
    kernel_size=DEFAULT_KERNEL_SIZE,
    color_sigma=DEFAULT_COLOR_SIGMA,
    space_sigma=DEFAULT_SPACE_SIGMA,
):
    """Run every method on ``image`` (float ``(H, W, 3)`` in [0, 1]).

    Returns a dict with ``reference``, ``low``, ``outputs`` (method -> image),
    ``metrics`` (method -> dict of :meth:`EdgeReference.measure`), ``weights`` (the
    SAPA weights, ``(sH, sW, K*K)``) and ``edges`` (:class:`EdgeReference`).
    """
    scale = check_scale(scale, image.shape)
    low, reference = downsample(image, scale)
    outputs = {
        "nearest": upsample_nearest(low, scale),
        "bilinear": upsample_resize(low, scale, "bilinear"),
        "bicubic": upsample_resize(low, scale, "bicubic"),
    }
    gray_guide, gray_low = _gray(reference)[..., None], _gray(low)[..., None]
    outputs["SAPA, gray guide"] = sapa_upsample(
        low, gray_guide, scale, kernel_size, color_sigma, space_sigma, guide_low=gray_low
    )
    outputs["SAPA"], weights = sapa_upsample(
        low, reference, scale, kernel_size, color_sigma, space_sigma, return_weights=True
    )
    edges = EdgeReference(reference)
    metrics = {name: edges.measure(out) for name, out in outputs.items()}
    return {
        "reference": reference,
        "low": low,
        "outputs": outputs,
        "metrics": metrics,
        "weights": weights,
        "edges": edges,
        "scale": scale,
        "kernel_size": kernel_size,
    }


def check_scale(scale, image_shape):
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 2:
        raise DemoError(f"--scale must be an integer >= 2. Received: {scale!r}")
    limit = min(image_shape[:2]) // _MIN_LOW_RES
    if scale > limit:
        raise DemoError(
            f"--scale {scale} is too large for a {image_shape[0]}x{image_shape[1]} image: "
            f"the low-resolution image would be smaller than {_MIN_LOW_RES} pixels "
            f"(largest scale for this image: {limit})"
        )
    return int(scale)


def _pick_crop(edges, size):
    """The ``size x size`` window (top, left) with the most edge pixels of the original
    (a choice made on the original only, never on any method's output)."""
    height, width = edges.shape
    size = min(size, height, width)
    integral = np.pad(edges.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = (
        integral[size:, size:] - integral[:-size, size:]
        - integral[size:, :-size] + integral[:-size, :-size]
    )
    top, left = np.unravel_index(np.argmax(counts), counts.shape)
    return int(top), int(left), size


def _pick_boundary_points(edges, gradient_image, top, left, size, scale):
    """Four points on a line across the strongest edge near the crop's centre:
    two on each side, at 1 and ``scale`` pixels from the edge along its normal."""
    from skimage import filters

    gray = _gray(gradient_image)
    gy, gx = filters.sobel_h(gray), filters.sobel_v(gray)
    magnitude = np.hypot(gy, gx)
    yy, xx = np.mgrid[top : top + size, left : left + size]
    centre = (top + size / 2, left + size / 2)
    margin = 2 * scale + 2
    inside = (
        (yy >= top + margin) & (yy < top + size - margin)
        & (xx >= left + margin) & (xx < left + size - margin)
    )
    crop_edges = edges[top : top + size, left : left + size] & inside
    if not crop_edges.any():
        return None
    # strong edges, preferring the centre
    score = magnitude[top : top + size, left : left + size] * crop_edges
    score = score / (1.0 + np.hypot(yy - centre[0], xx - centre[1]) / size)
    py, px = np.unravel_index(np.argmax(score), score.shape)
    py, px = py + top, px + left
    ny, nx = gy[py, px], gx[py, px]
    norm = np.hypot(ny, nx) or 1.0
    ny, nx = ny / norm, nx / norm
    points = []
    for step in (-scale, -1, 1, scale):
        points.append((int(round(py + step * ny)), int(round(px + step * nx))))
    return (int(py), int(px)), points


def save_figure(result, path, crop=128):
    """The figure: crops side by side (top row); the SAPA kernels at a boundary and a
    map of how many low-resolution points each kernel mixes (bottom row)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    reference, outputs, weights = result["reference"], result["outputs"], result["weights"]
    scale, k = result["scale"], result["kernel_size"]
    edges = result["edges"]
    top, left, size = _pick_crop(edges.edges, crop)
    window = (slice(top, top + size), slice(left, left + size))

    panels = [("original", reference)] + [
        (name, outputs[name]) for name in ("nearest", "bilinear", "bicubic", "SAPA, gray guide", "SAPA")
    ]
    fig, axes = plt.subplots(2, 6, figsize=(18, 6.6))
    for ax, (name, image) in zip(axes[0], panels):
        ax.imshow(image[window], interpolation="nearest")
        title = name
        if name in result["metrics"]:
            title += f"\nPSNR {result['metrics'][name]['psnr']:.1f} dB"
        ax.set_title(title, fontsize=10)

    # Effective number of points each kernel mixes: exp(entropy), 1 to K*K.
    w = np.clip(weights[window], 1e-12, 1.0)
    spread = np.exp(-(w * np.log(w)).sum(-1))
    ax = axes[1, 0]
    shown = ax.imshow(spread, cmap="viridis", vmin=1, vmax=k * k)
    ax.set_title("SAPA kernel spread\n(points mixed, exp entropy)", fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)

    ax = axes[1, 1]
    labels = "ABCD"
    kernel_axes = axes[1, 2:]
    picked = _pick_boundary_points(edges.edges, reference, top, left, size, scale)
    if picked is None:
        ax.imshow(reference[window], interpolation="nearest")
        ax.set_title("guide (no edge found in the crop)", fontsize=10)
        for axk in kernel_axes:
            axk.set_visible(False)
    else:
        (ey, ex), points = picked
        r = (k - 1) // 2
        # Zoom on the edge point: the K x K low-resolution window around it, plus a margin.
        half = (r + 1) * scale
        zy0, zx0 = max(ey - half, 0), max(ex - half, 0)
        zoom = reference[zy0 : ey + half, zx0 : ex + half]
        ax.imshow(zoom, interpolation="nearest")
        ax.set_title("guide near the edge: points A-D,\nlow-res window of B (cyan)", fontsize=10)
        for label, (py, px) in zip(labels, points):
            ax.plot(px - zx0, py - zy0, "o", ms=6, mfc="none", mec="yellow", mew=1.5)
            ax.text(px - zx0 + 1.5, py - zy0 - 1.5, label, color="yellow", fontsize=10, weight="bold")
        by, bx = points[1]
        wy, wx = (by // scale - r) * scale - zy0, (bx // scale - r) * scale - zx0
        ax.add_patch(Rectangle((wx - 0.5, wy - 0.5), k * scale, k * scale, fill=False, ec="cyan", lw=1.5))
        low = result["low"]
        padded = np.pad(low, ((r, r), (r, r), (0, 0)))
        for axk, label, (py, px) in zip(kernel_axes, labels, points):
            # The K x K low-resolution pixels the point mixes, each circle's area the weight.
            cy, cx = py // scale, px // scale
            axk.imshow(padded[cy : cy + k, cx : cx + k], interpolation="nearest")
            kernel = weights[py, px].reshape(k, k)
            yy, xx = np.mgrid[0:k, 0:k]
            axk.scatter(xx.ravel(), yy.ravel(), s=900 * kernel.ravel(), facecolors="none",
                        edgecolors="white", linewidths=1.5)
            axk.set_title(f"kernel at {label}: low-res window,\ncircle area = weight (max {kernel.max():.2f})", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"x{scale} guided upsampling, K={k}: SAPA mixes many points inside regions "
        "and only the points on its own side at edges",
        fontsize=11,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------- training
def _train_backbone(image_size):
    import keras_cv

    # Two bottleneck blocks per stack (KerasCV's ResNetV2 fails with one): P2..P5 have
    # 32, 64, 128 and 256 channels at strides 4, 8, 16 and 32.
    return keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 16, 32, 64],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=True,
        input_shape=(image_size, image_size, 3),
    )


def build_segmentation_models(image_size=64, num_classes=None, seed=0, variant="gated"):
    """The two models of the training comparison, built from the same seed.

    Returns ``{"bilinear (stock)": keras_cv DeepLabV3Plus, "SAPA": SAPADeepLabV3Plus}``,
    each with a freshly built small ResNetV2 backbone (identical initial weights) and
    a 64-channel spatial pyramid pooling (dilations 1, 2, 3: at 64 x 64 the P5 map is
    2 x 2, so DeepLab's 6, 12, 18 would only see padding).
    """
    import keras
    import keras_cv

    from keras_sapa import data
    from keras_sapa.models import SAPADeepLabV3Plus

    num_classes = num_classes or data.NUM_CLASSES

    def spp():
        return keras_cv.layers.SpatialPyramidPooling(dilation_rates=[1, 2, 3], num_channels=64)

    keras.utils.set_random_seed(seed)
    stock = keras_cv.models.DeepLabV3Plus(
        _train_backbone(image_size), num_classes, spatial_pyramid_pooling=spp()
    )
    keras.utils.set_random_seed(seed)
    sapa = SAPADeepLabV3Plus(
        _train_backbone(image_size), num_classes, variant=variant, spatial_pyramid_pooling=spp()
    )
    return {"bilinear (stock)": stock, "SAPA": sapa}


def train_batch(step, batch_size, image_size, seed):
    """The training batch of ``step``: the same for every model."""
    from keras_sapa import data

    return data.make_shapes(batch_size, image_size, seed=[seed, 1, step])


def train_and_evaluate(
    steps=400,
    batch_size=16,
    image_size=64,
    seed=0,
    eval_images=64,
    learning_rate=3e-3,
    progress=True,
    history_every=0,
):
    """Train both models for ``steps`` on identical batches and evaluate them on
    ``eval_images`` held-out images (another seed).

    Returns a dict: ``results`` (name -> ``{"miou", "boundary_f", "params",
    "seconds"}``), ``history`` (name -> ``{"loss": [per step], "eval_step": [...],
    "miou": [...], "boundary_f": [...]}``, evaluated every ``history_every`` steps
    when > 0), ``models``, ``eval`` (images, masks) and ``predictions`` (name ->
    masks). ``seconds`` is training time only (evaluations excluded).
    """
    import keras
    from tqdm import tqdm

    from keras_sapa import data

    models = build_segmentation_models(image_size, seed=seed)
    eval_x, eval_y = data.make_shapes(eval_images, image_size, seed=[seed, 2])
    results, history, predictions = {}, {}, {}
    for name, model in models.items():
        keras.utils.set_random_seed(seed)
        model.compile(
            # Cosine decay to 0: the last steps settle the weights and the batch-norm
            # statistics, so the held-out numbers are not a snapshot of a noisy step.
            optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
            loss="sparse_categorical_crossentropy",
        )
        log = history[name] = {"loss": [], "eval_step": [], "miou": [], "boundary_f": []}
        seconds = 0.0
        bar = tqdm(range(steps), desc=f"{name:>16}", unit="step", disable=not progress, leave=True)
        for step in bar:
            x, y = train_batch(step, batch_size, image_size, seed)
            start = time.perf_counter()
            loss = float(model.train_on_batch(x, y))
            seconds += time.perf_counter() - start
            log["loss"].append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if history_every and ((step + 1) % history_every == 0 or step + 1 == steps):
                pred = model.predict(eval_x, batch_size=32, verbose=0).argmax(-1)
                log["eval_step"].append(step + 1)
                log["miou"].append(data.mean_iou(eval_y, pred)[0])
                log["boundary_f"].append(data.boundary_f_score(eval_y, pred)[0])
        pred = model.predict(eval_x, batch_size=32, verbose=0).argmax(-1)
        predictions[name] = pred
        results[name] = {
            "miou": data.mean_iou(eval_y, pred)[0],
            "boundary_f": data.boundary_f_score(eval_y, pred, tolerance=1)[0],
            "params": model.count_params(),
            "seconds": seconds,
        }
    return {
        "results": results,
        "history": history,
        "models": models,
        "eval": (eval_x, eval_y),
        "predictions": predictions,
    }


def format_training_table(results):
    width = max(len("model"), *(len(n) for n in results))
    header = f"{'model':<{width}}  {'mIoU':>6}  {'boundary F':>10}  {'params':>9}  {'train s':>8}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(
            f"{name:<{width}}  {r['miou']:>6.3f}  {r['boundary_f']:>10.3f}  "
            f"{r['params']:>9,}  {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def save_training_figure(run, path, count=4):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from keras_sapa import data

    images, masks = run["eval"]
    names = list(run["predictions"])
    count = min(count, len(images))
    fig, axes = plt.subplots(count, 2 + len(names), figsize=(2.4 * (2 + len(names)), 2.4 * count), squeeze=False)
    for i in range(count):
        axes[i, 0].imshow(images[i].astype(np.uint8))
        axes[i, 1].imshow(data.colorize(masks[i]), interpolation="nearest")
        for j, name in enumerate(names):
            axes[i, 2 + j].imshow(data.colorize(run["predictions"][name][i]), interpolation="nearest")
    for j, title in enumerate(["image", "truth"] + names):
        axes[0, j].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------- CLI
def _integer_type(requirement, accept):
    """An argparse type: an integer for which ``accept(value)`` holds, else a usage
    error saying it ``must be {requirement}``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {value}")
        return value

    return parse


_positive_int = _integer_type("a positive integer", lambda v: v >= 1)
_scale = _integer_type("an integer >= 2", lambda v: v >= 2)
_kernel_size = _integer_type("an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_sapa demo",
        description=(
            "SAPA against nearest, bilinear and bicubic upsampling on a photograph, "
            "with no training: the photo is shrunk by --scale (block mean) and brought "
            "back to full size; SAPA is guided by the full-resolution photo through a "
            "fixed colour-and-position embedding (each output pixel mixes the "
            "low-resolution pixels that look like it). Prints PSNR and edge measures "
            "against the original and writes a figure to --out. With --train, also "
            "trains KerasCV's DeepLabV3Plus and the SAPA one on a synthetic shapes task "
            "and prints mIoU and boundary F-score."
        ),
        epilog=(
            "Columns: PSNR over the image and within 1 px of the original's edges (Canny, "
            "sigma 2); edge sharpness = mean gradient magnitude on the original's edge "
            "pixels, relative to the original (100% = as sharp); edge F1 = Canny edges "
            "of the result against those of the original, 1 px tolerance. SAPA sees the "
            "full-resolution photo and the resizers do not: a demonstration of what the "
            "guide does, not a fair super-resolution benchmark."
        ),
    )
    parser.add_argument(
        "--image", default=DEFAULT_IMAGE,
        help=f"a scikit-image sample ({', '.join(SAMPLE_IMAGES)}) or the path of an image file (default: %(default)s)",
    )
    parser.add_argument(
        "--scale", type=_scale, default=DEFAULT_SCALE,
        help="integer downsampling factor >= 2 (any integer: SAPA upsamples in one step "
        "with up_factor=scale); the low-resolution image must keep at least 8 pixels a side "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--kernel-size", type=_kernel_size, default=DEFAULT_KERNEL_SIZE,
        help="SAPA window K (odd): each output pixel mixes K x K low-resolution pixels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--color-sigma", type=_positive_float, default=DEFAULT_COLOR_SIGMA,
        help="colour temperature of the SAPA similarity (RGB in [0, 1]); smaller = sharper "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--space-sigma", type=_positive_float, default=DEFAULT_SPACE_SIGMA,
        help="spatial temperature of the SAPA similarity, in low-resolution pixels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--crop", type=_positive_int, default=None,
        help="use the centred CROP x CROP part of the image (default: the whole image)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory for the figures (default: %(default)s)")
    parser.add_argument(
        "--train", action="store_true",
        help="also train stock DeepLabV3Plus (bilinear) and SAPA DeepLabV3Plus (SAPA-G) on "
        "the built-in shapes task and report mIoU and boundary F-score (a few minutes on "
        "2 CPU cores)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="with --train: a short smoke run (about a minute; numbers not meaningful)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=None,
        help="with --train: training steps per model (default 400, --quick 15)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="with --train: batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="with --train: seed of data and weights (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def run(args, parser=None):
    """Run the demo for parsed ``args``; returns an exit code."""
    parser = parser or build_parser()
    try:
        image = load_image(args.image)
        if args.crop is not None:
            image = center_crop(image, args.crop)
        check_scale(args.scale, image.shape)
    except DemoError as error:
        parser.error(str(error))
    name = args.image if args.image in SAMPLE_IMAGES else os.path.basename(args.image)
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    result = guided_upsampling(
        image, args.scale, args.kernel_size, args.color_sigma, args.space_sigma
    )
    ref = result["reference"]
    print(
        f"Guided upsampling of {name!r} ({ref.shape[1]}x{ref.shape[0]}), x{args.scale}, "
        f"SAPA K={args.kernel_size}, color_sigma={args.color_sigma}, "
        f"space_sigma={args.space_sigma}, no training:"
    )
    print(format_table(result["metrics"]))
    figure = save_figure(result, os.path.join(args.out, f"guided_{os.path.splitext(name)[0]}_x{args.scale}.png"))
    print(
        "SAPA sees the full-resolution photo (the guide); nearest, bilinear and bicubic do "
        "not.\nSo this shows what the guide lets SAPA do, not a fair super-resolution "
        "benchmark."
    )
    print(f"figure: {figure}  ({time.perf_counter() - start:.1f} s)")

    if args.train:
        steps = args.steps or (15 if args.quick else 400)
        batch = min(args.batch_size, 8) if args.quick else args.batch_size
        print(
            f"\nTraining DeepLabV3Plus (bilinear) and SAPA DeepLabV3Plus (SAPA-G) on the "
            f"shapes task: {steps} steps of {batch} images (64 x 64), seed {args.seed}"
        )
        run_ = train_and_evaluate(
            steps=steps, batch_size=batch, seed=args.seed, eval_images=32 if args.quick else 64,
            progress=not args.no_progress,
        )
        print(format_training_table(run_["results"]))
        print(
            "mIoU over the 4 classes and boundary F-score (1 px tolerance) on held-out images."
            + (" --quick: too few steps for the numbers to mean anything." if args.quick else "")
        )
        figure = save_training_figure(run_, os.path.join(args.out, "train_predictions.png"))
        print(f"figure: {figure}")
    return 0


def main(argv=None):
    """Entry point of ``python -m keras_sapa demo``; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return run(args, parser)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
