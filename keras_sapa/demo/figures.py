"""Figures of the demo (matplotlib, written with the ``Agg`` backend when no other is set).

- :func:`guided_figure` / :func:`save_figure`: the guided-upsampling result, crops side
  by side, a map of how many points each SAPA kernel mixes, and the kernels of four
  points across an edge.
- :func:`pick_crop`, :func:`boundary_points`, :func:`draw_kernels`: the pieces of that
  figure, for notebooks.
- :func:`deform_figure` / :func:`save_deform_figure`: SAPA-D on the same task, where the
  sampled points of four output pixels across an edge moved to (from
  :meth:`keras_sapa.SAPADeform.sampling_offsets`).
- :func:`training_figure` / :func:`save_training_figure`: held-out images, their masks
  and each model's prediction after :func:`keras_sapa.demo.train_and_evaluate`.
"""

import os

import numpy as np

from keras_sapa.demo import metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pick_crop(edges, size):
    """The ``size x size`` window ``(top, left, size)`` with the most pixels of the
    boolean ``edges`` map (chosen on the original only, never on a method's output)."""
    height, width = edges.shape
    size = min(size, height, width)
    integral = np.pad(edges.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = (
        integral[size:, size:]
        - integral[:-size, size:]
        - integral[size:, :-size]
        + integral[:-size, :-size]
    )
    top, left = np.unravel_index(np.argmax(counts), counts.shape)
    return int(top), int(left), size


def boundary_points(result, window=None, crop=128):
    """Four points on a line across the strongest edge near the centre of a window:
    two on each side, at 1 and ``scale`` pixels from the edge along its normal.

    Args:
        result: the dict of :func:`keras_sapa.demo.guided_upsampling`.
        window: ``(top, left, size)``; by default :func:`pick_crop` of ``crop``.

    Returns:
        ``((ey, ex), [(y, x)] * 4)``: the edge pixel and the four points (full-resolution
        pixel coordinates), or ``None`` when the window holds no edge.
    """
    from skimage import filters

    edges, reference, scale = result["edges"].edges, result["reference"], result["scale"]
    top, left, size = window or pick_crop(edges, crop)
    luminance = metrics.gray(reference)
    gy, gx = filters.sobel_h(luminance), filters.sobel_v(luminance)
    magnitude = np.hypot(gy, gx)
    yy, xx = np.mgrid[top : top + size, left : left + size]
    centre = (top + size / 2, left + size / 2)
    margin = 2 * scale + 2
    inside = (
        (yy >= top + margin)
        & (yy < top + size - margin)
        & (xx >= left + margin)
        & (xx < left + size - margin)
    )
    crop_edges = edges[top : top + size, left : left + size] & inside
    if not crop_edges.any():
        return None
    # Strong edges, preferring the centre.
    score = magnitude[top : top + size, left : left + size] * crop_edges
    score = score / (1.0 + np.hypot(yy - centre[0], xx - centre[1]) / size)
    py, px = np.unravel_index(np.argmax(score), score.shape)
    py, px = py + top, px + left
    ny, nx = gy[py, px], gx[py, px]
    norm = np.hypot(ny, nx) or 1.0
    ny, nx = ny / norm, nx / norm
    points = [
        (int(round(py + step * ny)), int(round(px + step * nx))) for step in (-scale, -1, 1, scale)
    ]
    return (int(py), int(px)), points


def draw_kernels(axes, result, points, labels="ABCD"):
    """Draws, in each of ``axes``, the ``K x K`` low-resolution window one of ``points``
    mixes, each pixel marked by a circle whose area is its SAPA weight."""
    scale, k = result["scale"], result["kernel_size"]
    r = (k - 1) // 2
    padded = np.pad(result["low"], ((r, r), (r, r), (0, 0)))
    yy, xx = np.mgrid[0:k, 0:k]
    for ax, label, (py, px) in zip(axes, labels, points, strict=False):
        cy, cx = py // scale, px // scale
        ax.imshow(padded[cy : cy + k, cx : cx + k], interpolation="nearest")
        kernel = result["weights"][py, px].reshape(k, k)
        ax.scatter(
            xx.ravel(),
            yy.ravel(),
            s=900 * kernel.ravel(),
            facecolors="none",
            edgecolors="white",
            linewidths=1.5,
        )
        ax.set_title(
            f"kernel at {label}: low-res window,\ncircle area = weight (max {kernel.max():.2f})",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_yticks([])


def _draw_edge_zoom(ax, result, picked, labels="ABCD"):
    from matplotlib.patches import Rectangle

    reference, scale, k = result["reference"], result["scale"], result["kernel_size"]
    (ey, ex), points = picked
    r = (k - 1) // 2
    # The K x K low-resolution window around the edge point, plus a margin.
    half = (r + 1) * scale
    zy0, zx0 = max(ey - half, 0), max(ex - half, 0)
    ax.imshow(reference[zy0 : ey + half, zx0 : ex + half], interpolation="nearest")
    ax.set_title("guide near the edge: points A-D,\nlow-res window of B (cyan)", fontsize=10)
    for label, (py, px) in zip(labels, points, strict=False):
        ax.plot(px - zx0, py - zy0, "o", ms=6, mfc="none", mec="yellow", mew=1.5)
        ax.text(px - zx0 + 1.5, py - zy0 - 1.5, label, color="yellow", fontsize=10, weight="bold")
    by, bx = points[1]
    wy, wx = (by // scale - r) * scale - zy0, (bx // scale - r) * scale - zx0
    ax.add_patch(
        Rectangle((wx - 0.5, wy - 0.5), k * scale, k * scale, fill=False, ec="cyan", lw=1.5)
    )


def guided_figure(result, crop=128):
    """The guided-upsampling figure of ``result`` (:func:`keras_sapa.demo.guided_upsampling`):
    crops of the original and every method (top row); the SAPA kernel spread and the
    kernels of four points across an edge (bottom row). Returns the matplotlib figure."""
    plt = _pyplot()
    reference, outputs = result["reference"], result["outputs"]
    scale, k = result["scale"], result["kernel_size"]
    top, left, size = pick_crop(result["edges"].edges, crop)
    window = (slice(top, top + size), slice(left, left + size))

    panels = [("original", reference)] + [(name, image) for name, image in outputs.items()]
    fig, axes = plt.subplots(2, len(panels), figsize=(3 * len(panels), 6.6), squeeze=False)
    for ax, (name, image) in zip(axes[0], panels, strict=False):
        ax.imshow(image[window], interpolation="nearest")
        title = name
        if name in result["metrics"]:
            title += f"\nPSNR {result['metrics'][name]['psnr']:.1f} dB"
        ax.set_title(title, fontsize=10)

    ax = axes[1, 0]
    shown = ax.imshow(
        metrics.kernel_spread(result["weights"][window]), cmap="viridis", vmin=1, vmax=k * k
    )
    ax.set_title("SAPA kernel spread\n(points mixed, exp entropy)", fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)

    kernel_axes = axes[1, 2:6]
    picked = boundary_points(result, window=(top, left, size))
    if picked is None:
        axes[1, 1].imshow(reference[window], interpolation="nearest")
        axes[1, 1].set_title("guide (no edge found in the crop)", fontsize=10)
        for ax in kernel_axes:
            ax.set_visible(False)
    else:
        _draw_edge_zoom(axes[1, 1], result, picked)
        draw_kernels(kernel_axes, result, picked[1])
    for ax in axes[1, 6:]:
        ax.set_visible(False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"x{scale} guided upsampling, K={k}: SAPA mixes many points inside regions "
        "and only the points on its own side at edges",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def _save(fig, path):
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_figure(result, path, crop=128):
    """Writes :func:`guided_figure` of ``result`` to ``path`` (PNG); returns ``path``."""
    return _save(guided_figure(result, crop), path)


def deform_figure(result, crop=128, labels="ABCD"):
    """Where SAPA-D samples, for ``result`` of :func:`keras_sapa.demo.guided_upsampling`
    with ``deform_steps``: the SAPA-D crop beside SAPA's, the guide near an edge with the
    sampled points of four output pixels across it (dots: the initial square; crosses:
    where the trained offsets put them, as :meth:`SAPADeform.sampling_offsets
    <keras_sapa.SAPADeform.sampling_offsets>` gives them), and the training loss.
    Returns the matplotlib figure."""
    from keras_sapa.demo import deform
    from keras_sapa.demo.guided import DEFORM_METHOD

    if "deform" not in result:
        raise ValueError(
            "deform_figure needs a guided_upsampling result with SAPA-D: pass "
            "deform_steps=... to guided_upsampling. Received a result without 'deform'."
        )
    plt = _pyplot()
    layer, scale = result["deform"]["layer"], result["scale"]
    reference = result["reference"]
    top, left, size = pick_crop(result["edges"].edges, crop)
    window = (slice(top, top + size), slice(left, left + size))
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, name in zip(axes[:2], ("SAPA", DEFORM_METHOD), strict=False):
        ax.imshow(result["outputs"][name][window], interpolation="nearest")
        ax.set_title(f"{name}\nPSNR {result['metrics'][name]['psnr']:.1f} dB", fontsize=10)

    ax = axes[2]
    picked = boundary_points(result, window=(top, left, size))
    if picked is None:
        ax.imshow(reference[window], interpolation="nearest")
        ax.set_title("guide (no edge found in the crop)", fontsize=10)
    else:
        (ey, ex), points = picked
        grid = int(round(layer.num_points**0.5))
        moved = deform.to_full_resolution(
            deform.sampling_positions(layer, result["low"], points), scale
        )
        # Wide enough for every point drawn (within the figure's sense: 6 low-res pixels).
        reach = np.abs(moved - np.array([ey, ex])).max()
        half = int(np.ceil(min(max(reach, (grid - 1) / 2 * scale + scale), 6 * scale))) + scale
        zy0, zx0 = max(ey - half, 0), max(ex - half, 0)
        ax.imshow(reference[zy0 : ey + half, zx0 : ex + half], interpolation="nearest")
        steps = np.arange(grid) - (grid - 1) / 2
        dy, dx = (v.ravel() * scale for v in np.meshgrid(steps, steps, indexing="ij"))
        colours = plt.get_cmap("tab10").colors
        for n, (label, (py, px)) in enumerate(zip(labels, points, strict=False)):
            colour = colours[n % len(colours)]
            ax.plot(px + dx - zx0, py + dy - zy0, ".", color=colour, ms=3, alpha=0.6)
            ax.plot(moved[n, :, 1] - zx0, moved[n, :, 0] - zy0, "x", color=colour, ms=6, mew=1.5)
            ax.plot(px - zx0, py - zy0, "o", ms=7, mfc="none", mec=colour, mew=2)
            ax.text(px - zx0 + 1.5, py - zy0 - 1.5, label, color=colour, fontsize=10)
        ax.set_title(
            "SAPA-D sampled points of A-D (o):\ninitial square (.), trained offsets (x)",
            fontsize=10,
        )
    ax = axes[3]
    losses = result["deform"]["losses"]
    if losses:
        ax.plot(np.arange(1, len(losses) + 1), losses)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("offset training loss (MSE,\nanother photograph)", fontsize=10)
    for ax in axes[:3]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"x{scale} guided upsampling with SAPA-D: P={layer.num_points} points per output "
        "pixel, fixed colour similarity, offsets learned",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def save_deform_figure(result, path, crop=128):
    """Writes :func:`deform_figure` of ``result`` to ``path`` (PNG); returns ``path``."""
    return _save(deform_figure(result, crop), path)


def training_figure(run, count=4):
    """Held-out images, true masks and each model's predicted masks (one row per image)
    of ``run`` (:func:`keras_sapa.demo.train_and_evaluate`). Returns the figure."""
    from keras_sapa.demo import data

    plt = _pyplot()
    images, masks = run["eval"]
    names = list(run["predictions"])
    count = min(count, len(images))
    columns = 2 + len(names)
    fig, axes = plt.subplots(count, columns, figsize=(2.4 * columns, 2.4 * count), squeeze=False)
    for i in range(count):
        axes[i, 0].imshow(images[i].astype(np.uint8))
        axes[i, 1].imshow(data.colorize(masks[i]), interpolation="nearest")
        for j, name in enumerate(names):
            axes[i, 2 + j].imshow(
                data.colorize(run["predictions"][name][i]), interpolation="nearest"
            )
    for j, title in enumerate(["image", "truth"] + names):
        axes[0, j].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_training_figure(run, path, count=4):
    """Writes :func:`training_figure` of ``run`` to ``path`` (PNG); returns ``path``."""
    return _save(training_figure(run, count), path)
