"""Image measures of the guided-upsampling demo, and the table that prints them.

- :func:`psnr`: peak signal-to-noise ratio for images in [0, 1], optionally over a mask.
- :class:`EdgeReference`: the edges of the original (Canny, sigma 2, on the luminance)
  and, for a result, PSNR within 1 px of them, edge sharpness (mean gradient magnitude
  on those edge pixels relative to the original's) and edge F1 (Canny edges of the
  result against the original's, 1 px tolerance).
- :func:`kernel_spread`: how many points each SAPA kernel mixes (``exp`` of its entropy).

The segmentation metrics (mIoU, boundary F-score) are those of the shapes task:
:func:`keras_sapa.demo.data.mean_iou` and
:func:`keras_sapa.demo.data.boundary_f_score`, re-exported here.
"""

import numpy as np

from keras_sapa.demo.data import boundary_f_score  # noqa: F401  re-exported
from keras_sapa.demo.data import mean_iou  # noqa: F401  re-exported


def gray(image):
    """Luminance (ITU-R BT.709 weights, scikit-image's ``rgb2gray``) of an RGB image."""
    from skimage import color

    return color.rgb2gray(np.clip(image, 0.0, 1.0))


def psnr(image, reference, mask=None):
    """PSNR in dB of ``image`` against ``reference`` (data range 1), over the pixels of
    the boolean ``mask`` (``(H, W)``) when given; ``inf`` for identical images."""
    err = (np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2
    if mask is not None:
        err = err[mask]
    mse = float(err.mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def kernel_spread(weights):
    """The effective number of points each kernel mixes: ``exp(entropy)`` of the
    weights along the last axis, from 1 (one point) to ``K*K`` (a plain average)."""
    w = np.clip(np.asarray(weights, np.float64), 1e-12, 1.0)
    return np.exp(-(w * np.log(w)).sum(-1))


class EdgeReference:
    """Edges of the original: Canny (``canny_sigma``) on its luminance, and their
    gradient; :meth:`measure` scores a result against them."""

    def __init__(self, reference, canny_sigma=2.0, tolerance=1):
        from scipy import ndimage
        from skimage import feature
        from skimage import filters

        self.reference = reference
        self.canny_sigma = canny_sigma
        self.tolerance = tolerance
        luminance = gray(reference)
        self.edges = feature.canny(luminance, sigma=canny_sigma)
        self.band = ndimage.binary_dilation(self.edges, iterations=max(tolerance, 1))
        self.gradient = filters.sobel(luminance)
        self.edge_gradient = float(self.gradient[self.edges].mean()) if self.edges.any() else 0.0

    def measure(self, image):
        """``{"psnr", "psnr_edges", "sharpness", "edge_f1"}`` of ``image``."""
        from scipy import ndimage
        from skimage import feature
        from skimage import filters

        luminance = gray(image)
        result = {"psnr": psnr(image, self.reference)}
        result["psnr_edges"] = (
            psnr(image, self.reference, self.band) if self.band.any() else float("nan")
        )
        if not self.edges.any():
            result["sharpness"] = result["edge_f1"] = float("nan")
            return result
        result["sharpness"] = (
            float(filters.sobel(luminance)[self.edges].mean()) / self.edge_gradient
        )
        found = feature.canny(luminance, sigma=self.canny_sigma)
        found_band = ndimage.binary_dilation(found, iterations=max(self.tolerance, 1))
        precision = (found & self.band).sum() / max(found.sum(), 1)
        recall = (self.edges & found_band).sum() / max(self.edges.sum(), 1)
        result["edge_f1"] = (
            0.0
            if precision + recall == 0
            else float(2 * precision * recall / (precision + recall))
        )
        return result


#: (key, column header, format) of the columns of :func:`format_table`.
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
