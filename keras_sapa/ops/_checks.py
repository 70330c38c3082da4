"""Argument and shape checks shared by the ops and the layer.

Every check raises ``ValueError`` naming the argument and the value received, in the
style of Keras's own layers. Shape checks run on static shapes (Python ints or
``None``); dimensions that are unknown at trace time are checked at run time by
:func:`runtime_shape_asserts`.
"""

import operator

IMPLEMENTATIONS = ("auto", "patches", "xla", "compiled")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def integer(name, value, requirement="an integer", minimum=None):
    """``value`` as a Python int, or a ``ValueError`` naming ``name`` and the value.

    The one integer validator of the package (the layer, the ops, the models and the
    demo's command line all use it): Python ints and NumPy integer scalars are
    accepted (``np.int64(5)`` is 5); bools, floats (even ``5.0``), strings and
    ``None`` are not. With ``minimum``, smaller values are rejected too.
    """
    as_int = None
    if not isinstance(value, bool):
        try:
            as_int = operator.index(value)
        except TypeError:
            as_int = None
    if as_int is None or (minimum is not None and as_int < minimum):
        raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")
    return as_int


def positive_int(name, value):
    """An integer >= 1 (``embedding_dim``, ``num_classes``, ``--steps``, ...)."""
    return integer(name, value, "a positive integer", minimum=1)


def check_kernel_size(kernel_size):
    value = integer("kernel_size", kernel_size, "a positive odd integer")
    if value < 1 or value % 2 == 0:
        raise ValueError(
            f"`kernel_size` must be a positive odd integer. Received: kernel_size={value}"
        )
    return value


def check_up_factor(up_factor):
    return integer("up_factor", up_factor, "an integer >= 1", minimum=1)


def check_implementation(implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {IMPLEMENTATIONS}. "
            f"Received: implementation={implementation!r}"
        )
    return implementation


def check_float_dtypes(named_dtypes):
    """``named_dtypes``: ``(argument name, dtype name)`` pairs of one op call. Each must be
    a floating dtype, all the same one (no silent casts)."""
    first, first_dtype = named_dtypes[0]
    for name, dtype in named_dtypes:
        if dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"`{name}` must be a floating-point tensor "
                f"({', '.join(FLOAT_DTYPES)}). Received: {name}.dtype={dtype}"
            )
        if dtype != first_dtype:
            raise ValueError(
                f"`{name}` must have the dtype of `{first}` ({first_dtype}); cast the inputs "
                f"to one dtype. Received: {name}.dtype={dtype}, {first}.dtype={first_dtype}"
            )


def _dims(shape):
    """Static shape as a tuple of ints/None, or None when the rank is unknown."""
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except (TypeError, ValueError):  # tf.TensorShape of unknown rank
        return None
    return tuple(_static_dim(d) for d in dims)


def _static_dim(dim):
    """A dimension as an int, or None when it is not known statically: ``None``, a
    TensorFlow ``Dimension`` of unknown value, or a symbolic size such as the batch
    dimension JAX gives while Keras builds a functional model."""
    if dim is None:
        return None
    try:
        return operator.index(dim)
    except TypeError:
        value = getattr(dim, "value", None)  # tf.compat.v1 Dimension
        return value if isinstance(value, int) else None


def check_rank4(name, shape):
    dims = _dims(shape)
    if dims is not None and len(dims) != 4:
        raise ValueError(
            f"`{name}` must be a rank-4 tensor (batch, height, width, channels). "
            f"Received: {name}.shape={dims}"
        )
    return dims


def _mismatch(what, expected, got):
    return expected is not None and got is not None and expected != got


def check_pair(high_name, high_shape, low_name, low_shape, up_factor, last_dim=None):
    """Checks a (high-resolution, low-resolution) pair of channels-last shapes.

    The high-resolution spatial size must be exactly ``up_factor`` times the low one
    and the batch sizes must agree. With ``last_dim`` (``"equal"``), the channel counts
    must agree as well (the query and key of the similarity).
    """
    high = check_rank4(high_name, high_shape)
    low = check_rank4(low_name, low_shape)
    if high is None or low is None:
        return
    if _mismatch("batch", high[0], low[0]):
        raise ValueError(
            f"`{high_name}` and `{low_name}` must have the same batch size. "
            f"Received: {high_name}.shape={high}, {low_name}.shape={low}"
        )
    for axis, axis_name in ((1, "height"), (2, "width")):
        if _mismatch(axis_name, None if low[axis] is None else up_factor * low[axis], high[axis]):
            raise ValueError(
                f"The {axis_name} of `{high_name}` must be exactly up_factor={up_factor} "
                f"times the {axis_name} of `{low_name}` "
                f"(expected {up_factor * low[axis]}, no cropping or resizing is done). "
                f"Received: {high_name}.shape={high}, {low_name}.shape={low}"
            )
    if last_dim == "equal" and _mismatch("channels", high[3], low[3]):
        raise ValueError(
            f"`{high_name}` and `{low_name}` must have the same number of channels. "
            f"Received: {high_name}.shape={high}, {low_name}.shape={low}"
        )


def check_weights_channels(weights_shape, kernel_size):
    dims = _dims(weights_shape)
    if dims is not None and dims[3] is not None and dims[3] != kernel_size * kernel_size:
        raise ValueError(
            f"`weights` must have kernel_size**2={kernel_size * kernel_size} channels "
            f"for kernel_size={kernel_size}. Received: weights.shape={dims}"
        )


def runtime_shape_asserts(high, high_name, low, low_name, up_factor):
    """Graph-mode assertions for dimensions unknown at trace time.

    Returns a list of assert ops (empty when everything was checked statically).
    They raise ``InvalidArgumentError`` with a message naming both arguments.
    """
    import tensorflow as tf

    hs, ls = high.shape, low.shape
    static_ok = all(d is not None for d in list(hs[:3]) + list(ls[:3]))
    if static_ok:
        return []
    high_shape = tf.shape(high)
    low_shape = tf.shape(low)
    msg = (
        f"`{high_name}` must have the batch size of `{low_name}` and exactly "
        f"up_factor={up_factor} times its height and width"
    )
    expected = tf.stack([low_shape[0], low_shape[1] * up_factor, low_shape[2] * up_factor])
    return [tf.debugging.assert_equal(high_shape[:3], expected, message=msg, summarize=4)]
