"""Images for the guided-upsampling demo: loading, cropping, block-mean downsampling
and the plain resizers SAPA is compared with.

Everything here is NumPy (plus ``keras.ops.image.resize`` for bilinear and bicubic),
float32 ``(H, W, 3)`` images in [0, 1].
"""

import os

import numpy as np

#: scikit-image's bundled sample photographs (nothing is downloaded).
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
#: The smallest low-resolution image the demo accepts (pixels per side).
MIN_LOW_RES = 8


class DemoError(ValueError):
    """A bad argument the user can fix (bad image path, scale too large, ...)."""


def load_image(spec):
    """An RGB image, float32 ``(H, W, 3)`` in [0, 1].

    Args:
        spec: the name of a scikit-image sample (:data:`SAMPLE_IMAGES`), the path of an
            image file, or an array (``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``;
            integers are scaled by their dtype's maximum, floats are taken as [0, 1]).

    Raises:
        DemoError: a missing or unreadable file, or an array of another shape.
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


def image_name(spec):
    """A short name for ``spec`` (the sample's name or the file's base name)."""
    if isinstance(spec, str) and spec in SAMPLE_IMAGES:
        return spec
    return os.path.basename(os.fspath(spec))


def center_crop(image, size):
    """The centred ``size x size`` crop (or the whole image where it is smaller)."""
    height, width = image.shape[:2]
    h, w = min(size, height), min(size, width)
    top, left = (height - h) // 2, (width - w) // 2
    return image[top : top + h, left : left + w]


def check_scale(scale, image_shape):
    """``scale`` as an int, if it is an integer >= 2 that leaves the low-resolution
    image at least :data:`MIN_LOW_RES` pixels a side; else a :class:`DemoError`."""
    from keras_sapa.ops import _checks

    try:
        scale = _checks.integer("--scale", scale, "an integer >= 2", minimum=2)
    except ValueError as error:
        raise DemoError(str(error)) from None
    limit = min(image_shape[:2]) // MIN_LOW_RES
    if scale > limit:
        raise DemoError(
            f"--scale {scale} is too large for a {image_shape[0]}x{image_shape[1]} image: "
            f"the low-resolution image would be smaller than {MIN_LOW_RES} pixels "
            f"(largest scale for this image: {limit})"
        )
    return scale


def downsample(image, scale):
    """Block-mean downsampling: crop to a multiple of ``scale``, average each block.

    Returns:
        ``(low, reference)``: the ``(H, W, 3)`` low-resolution image and the cropped
        original ``(scale*H, scale*W, 3)`` it is compared against.
    """
    height, width = (d // scale for d in image.shape[:2])
    reference = image[: height * scale, : width * scale]
    low = reference.reshape(height, scale, width, scale, -1).mean(axis=(1, 3))
    return low.astype(np.float32), reference


def upsample_nearest(low, scale):
    """Each low-resolution pixel repeated ``scale x scale`` times."""
    return np.repeat(np.repeat(low, scale, axis=0), scale, axis=1)


def upsample_resize(low, scale, method):
    """``keras.ops.image.resize`` by ``scale`` with ``method`` (``"bilinear"``,
    ``"bicubic"``, ...), clipped to [0, 1]. Half-pixel centres, which match the pixels
    of :func:`downsample`."""
    import keras

    height, width = low.shape[:2]
    out = keras.ops.image.resize(
        low[None], (height * scale, width * scale), interpolation=method, antialias=False
    )
    return np.clip(keras.ops.convert_to_numpy(out)[0], 0.0, 1.0)
