"""SAPA-D's ops (dynamic point selection), channels last, on every Keras backend.

    deform_similarity(query, key, offsets)      -> logits  (B, sH, sW, G*P)
    deform_aggregate(weights, value, offsets)   -> out     (B, sH, sW, C)
    sapa_deform(query, key, value, offsets)     -> deform_aggregate(
                                                       softmax_per_group(deform_similarity))

Shapes: query ``(B, sH, sW, G*E)``, key ``(B, H, W, G*E)``, value ``(B, H, W, C)`` with
``C % G == 0``, offsets ``(B, sH, sW, 2*G*P)``. Point ``p`` of group ``g`` is
``k = g*P + p``; offset channel ``2k`` shifts it along the width, ``2k + 1`` along the
height, in low-resolution pixels, from the anchor ``(i // s, j // s)`` of output point
``(i, j)``. Key and value are sampled there bilinearly with zero padding, and a point
outside ``(-1, H) x (-1, W)`` (or with a NaN offset) is dropped: it keeps logit 0 in
the softmax and contributes a zero value. Semantics: ``shared/SAPA_SPEC.md``, section
"SAPA-D".

The builtin formulation here uses ``keras.ops`` only, so it runs on TensorFlow, JAX
and PyTorch, compiles under XLA (``tf.function(jit_compile=True)``, ``jax.jit``) and
exports with builtin ops (a gather, floors, multiplies, rank-3 batched matmuls: it
converts to LiteRT with builtin ops only). The four bilinear taps of every point become
flat indices into the feature viewed as ``(B*G*H*W, C/G)``, one ``take`` gathers them
and a batched matmul contracts them with the query (similarity) or the weights
(aggregation). Each backend's autodiff differentiates it, and its
derivative with respect to the offsets is the official kernels' one: ``floor`` is
taken outside the gradient, so a position's derivative is the one of the cell of
``floor`` (towards increasing coordinate at an integer position); a dropped point is
replaced by a constant before anything is computed from it, so its value and every
gradient are 0, NaN offsets included. It does gather ``P * 4`` copies of the key and
value per output point.

The compiled kernels (``custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h`` on the CPU,
``kernels/cuda/sapa_deform_kernels.cuh`` on a GPU: forwards and backwards that never
materialise those copies) serve all three ops: the fused :func:`sapa_deform`
(``KerasSapa>SapaDeform``) and the halves :func:`deform_similarity`
(``KerasSapa>DeformSimilarity``) and :func:`deform_aggregate`
(``KerasSapa>DeformAggregate``), each with a gradient op giving the gradients of all its
inputs, offsets included. They are custom ops on TensorFlow
(:mod:`._tf_deform_kernels`), XLA FFI custom calls on JAX
(:mod:`._jax_deform_kernels`) and ``torch.library`` ops on PyTorch
(:mod:`._torch_deform_kernels`). ``implementation`` is resolved for each of the three by
the one dispatch rule of :func:`keras_sapa.ops.resolve_implementation`, as for ``sapa``
and its halves: ``"auto"`` takes the compiled kernels for eager calls and training
traces where they are loaded, and this builtin formulation in exports and under XLA
(``"patches"`` and ``"xla"`` both name it). A library built before the halves' kernels
serves the fused op only; the halves then run the builtin formulation. The halves'
kernels take float32 and float64: half-precision inputs are computed in float32, as
here.
"""

import keras
from keras import ops

from keras_sapa.ops import _checks

_HALF_DTYPES = ("float16", "bfloat16")
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# ------------------------------------------------------------------ dispatch


def _deform_kernels():
    """The SAPA-D compiled-kernel bindings of the running backend, or None (another
    backend, or an op table without SAPA-D). Plain import statements: TensorFlow's
    autograph and PyTorch's Dynamo trace through them."""
    from keras_sapa.ops import _optable

    backend = keras.config.backend()
    if "SapaDeform" not in _optable.BY_NAME:
        return None
    if backend == "tensorflow":
        from keras_sapa.ops import _tf_deform_kernels as kernels
    elif backend == "jax":
        from keras_sapa.ops import _jax_deform_kernels as kernels
    elif backend == "torch":
        from keras_sapa.ops import _torch_deform_kernels as kernels
    else:
        return None
    return kernels


def resolve_deform_implementation(implementation="auto", training=None, like=None):
    """The formulation that ``implementation`` stands for in the SAPA-D ops here and
    now: ``"compiled"`` or ``"builtin"``.

    The decision is :func:`keras_sapa.ops.resolve_implementation`'s (the one dispatch
    rule, with the same ``training`` and ``like`` arguments): where it picks the
    compiled kernels, SAPA-D takes its own when the loaded library has them (a library
    built before SAPA-D serves SAPA only: ``"auto"`` then stays builtin, an explicit
    ``"compiled"`` raises ``RuntimeError``); ``"patches"`` and ``"xla"`` name the
    builtin formulation.

    Raises:
        RuntimeError: ``"compiled"`` where the SAPA-D kernels are not available.
        ValueError: ``"compiled"`` inside TensorFlow's ``jit_compile=True``.
    """
    from keras_sapa import ops as _ops  # the package imports this module

    resolved = _ops.resolve_implementation(implementation, training, like=like)
    if resolved != "compiled":
        return "builtin"
    kernels = _deform_kernels()
    if kernels is not None and kernels.available():
        return "compiled"
    if implementation == "compiled":
        reason = "no bindings" if kernels is None else kernels.unavailable_reason()
        raise RuntimeError(
            "implementation='compiled' was requested for a SAPA-D op, but the compiled "
            f"SAPA-D kernels are not available on the {keras.config.backend()!r} backend "
            f"({reason}). Build them with `python custom_ops/build.py`, or use "
            "implementation='auto'."
        )
    return "builtin"


def _compiled_halves(implementation, training, tensors):
    """The kernel bindings that run :func:`deform_similarity` / :func:`deform_aggregate`
    on ``tensors`` here and now (the rule picks ``"compiled"`` and the loaded library has
    the halves for these tensors' device), else None (the builtin formulation)."""
    if resolve_deform_implementation(implementation, training, like=tensors[0]) != "compiled":
        return None
    kernels = _deform_kernels()
    return kernels if kernels.halves_usable(*tensors) else None


# ------------------------------------------------------------------ checks


def _dtype(name, t):
    dtype = keras.backend.standardize_dtype(t.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"`{name}` must be a floating-point tensor ({', '.join(_FLOAT_DTYPES)}). "
            f"Received: {name}.dtype={dtype}"
        )
    return dtype


def _check_args(num_points, up_factor, groups):
    return (
        _checks.positive_int("num_points", num_points),
        _checks.check_up_factor(up_factor),
        _checks.positive_int("groups", groups),
    )


def _check_channels(name, shape, multiple_of, what, exact=None):
    dims = _checks._dims(shape)
    channels = None if dims is None else dims[3]
    if channels is None:
        return
    if exact is not None and channels != exact:
        raise ValueError(
            f"`{name}` must have {what}={exact} channels. Received: {name}.shape={dims}"
        )
    if multiple_of is not None and channels % multiple_of:
        raise ValueError(
            f"The channels of `{name}` must be divisible by groups={multiple_of} "
            f"({what}). Received: {name}.shape={dims}"
        )


def _check_offsets(offsets, high_name, high, num_points, groups):
    _dtype("offsets", offsets)
    offsets_shape, high_shape = tuple(offsets.shape), tuple(high.shape)
    _checks.check_rank4("offsets", offsets_shape)
    _check_channels(
        "offsets", offsets_shape, None, "2 * groups * num_points", exact=2 * groups * num_points
    )
    # Same batch and spatial size as the high-resolution operand (up_factor 1 between).
    _checks.check_pair("offsets", offsets_shape, high_name, high_shape, 1)


def _prepare_similarity(query, key, offsets, num_points, up_factor, groups):
    query, key, offsets = (ops.convert_to_tensor(t) for t in (query, key, offsets))
    q_dtype, k_dtype = _dtype("query", query), _dtype("key", key)
    if q_dtype != k_dtype:
        raise ValueError(
            "`query` and `key` must have the same dtype. Received: "
            f"query.dtype={q_dtype}, key.dtype={k_dtype}"
        )
    _checks.check_pair(
        "query", tuple(query.shape), "key", tuple(key.shape), up_factor, last_dim="equal"
    )
    _check_channels("key", tuple(key.shape), groups, "G * embedding_dim")
    _check_offsets(offsets, "query", query, num_points, groups)
    return query, key, offsets


def _prepare_aggregate(weights, value, offsets, num_points, up_factor, groups):
    weights, value, offsets = (ops.convert_to_tensor(t) for t in (weights, value, offsets))
    _dtype("weights", weights)
    _dtype("value", value)
    _checks.check_pair("weights", tuple(weights.shape), "value", tuple(value.shape), up_factor)
    _check_channels(
        "weights", tuple(weights.shape), None, "groups * num_points", exact=groups * num_points
    )
    _check_channels("value", tuple(value.shape), groups, "C / groups channels per group")
    _check_offsets(offsets, "weights", weights, num_points, groups)
    return weights, value, offsets


def _compute_dtype(*dtypes):
    """float32 when any operand is half (positions and sums in float32), else the
    widest of the operands' float dtypes."""
    if "float64" in dtypes:
        return "float64"
    return "float32"


# ------------------------------------------------------------------ the formulation


def _sampling(offsets, height, width, num_points, up_factor, groups, dtype):
    """Flat gather indices and masked bilinear tap weights of every point.

    Returns ``(index, tap_weights)``, both ``(B, sH, sW, G*P, 4)``: ``index`` int32
    into the feature viewed as ``(B*G*H*W, .)``, ``tap_weights`` in ``dtype``, zero
    for taps outside the map and for dropped points. The weights carry the gradient
    with respect to the offsets; the indices carry none. (No tensor here has rank
    above 5: LiteRT's builtin slices and broadcasts stop there.)
    """
    shape = ops.shape(offsets)
    batch, out_h, out_w = shape[0], shape[1], shape[2]
    points = groups * num_points
    o = ops.reshape(ops.cast(offsets, dtype), (batch, out_h, out_w, points, 2))
    anchor_h = ops.cast(ops.arange(out_h) // up_factor, dtype)
    anchor_w = ops.cast(ops.arange(out_w) // up_factor, dtype)
    ph = o[..., 1] + ops.reshape(anchor_h, (1, -1, 1, 1))
    pw = o[..., 0] + ops.reshape(anchor_w, (1, 1, -1, 1))
    h_f, w_f = ops.cast(height, dtype), ops.cast(width, dtype)
    keep = ops.logical_and(
        ops.logical_and(ph > -1.0, ph < h_f), ops.logical_and(pw > -1.0, pw < w_f)
    )
    zero = ops.zeros_like(ph)
    ph, pw = ops.where(keep, ph, zero), ops.where(keep, pw, zero)
    h0 = ops.floor(ops.stop_gradient(ph))
    w0 = ops.floor(ops.stop_gradient(pw))
    lh, lw = ph - h0, pw - w0
    hh, hw = 1.0 - lh, 1.0 - lw
    tap_w = ops.stack([hh * hw, hh * lw, lh * hw, lh * lw], axis=-1)

    # Tap coordinates are checked and clipped as floats (exact: small integers) and
    # cast once: LiteRT's builtins have no integer clip.
    rows = ops.stack([h0, h0, h0 + 1.0, h0 + 1.0], axis=-1)
    cols = ops.stack([w0, w0 + 1.0, w0, w0 + 1.0], axis=-1)
    valid = ops.logical_and(
        ops.logical_and(rows >= 0.0, rows < h_f), ops.logical_and(cols >= 0.0, cols < w_f)
    )
    valid = ops.logical_and(valid, ops.expand_dims(keep, -1))
    tap_w = tap_w * ops.cast(valid, dtype)

    rows = ops.cast(ops.clip(rows, 0.0, h_f - 1.0), "int32")
    cols = ops.cast(ops.clip(cols, 0.0, w_f - 1.0), "int32")
    # Plane of point k = g*P + p in batch b: b*G + g.
    plane = ops.expand_dims(ops.arange(batch, dtype="int32") * groups, 1) + ops.expand_dims(
        ops.arange(points, dtype="int32") // num_points, 0
    )
    plane = ops.reshape(plane * (height * width), (batch, 1, 1, points, 1))
    return plane + rows * width + cols, tap_w


def _gather(feature, index, groups):
    """``feature`` (B, H, W, G*c) sampled at ``index``: ``(index.size, c)``, rows in
    the order of ``index`` (so a group's P*4 taps of one output point are
    consecutive)."""
    shape = ops.shape(feature)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    per = channels // groups
    planes = ops.reshape(feature, (batch, height * width, groups, per))
    planes = ops.reshape(ops.transpose(planes, (0, 2, 1, 3)), (-1, per))
    return ops.take(planes, ops.reshape(index, (-1,)), axis=0)


def _similarity(query, key, index, tap_w, num_points, groups):
    shape = ops.shape(query)
    batch, out_h, out_w, channels = shape[0], shape[1], shape[2], shape[3]
    e = channels // groups
    sampled = _gather(key, index, groups)  # (B*sH*sW*G*P*4, E)
    # Rank-3 batched products (LiteRT's builtin BatchMatMul stops below rank 6), as
    # einsums: keras.ops.matmul computes float64 in float32 on PyTorch.
    dots = ops.einsum(
        "nte,nek->ntk",
        ops.reshape(sampled, (-1, num_points * 4, e)),
        ops.reshape(query, (-1, e, 1)),
    )
    dots = ops.reshape(dots, (batch, out_h, out_w, groups * num_points, 4))
    return ops.sum(dots * tap_w, axis=-1)


def _aggregate(weights, value, index, tap_w, num_points, groups):
    shape = ops.shape(weights)
    batch, out_h, out_w = shape[0], shape[1], shape[2]
    channels = ops.shape(value)[3]
    w = ops.expand_dims(weights, -1) * tap_w  # (B, sH, sW, G*P, 4)
    sampled = _gather(value, index, groups)  # (B*sH*sW*G*P*4, C/G)
    out = ops.einsum(
        "nkt,ntc->nkc",
        ops.reshape(w, (-1, 1, num_points * 4)),
        ops.reshape(sampled, (-1, num_points * 4, ops.shape(sampled)[1])),
    )
    return ops.reshape(out, (batch, out_h, out_w, channels))


def _group_softmax(logits, num_points, groups):
    shape = ops.shape(logits)
    z = ops.reshape(logits, (shape[0], shape[1], shape[2], groups, num_points))
    return ops.reshape(ops.softmax(z, axis=-1), shape)


def _low_size(t):
    shape = ops.shape(t)
    return shape[1], shape[2]


# ------------------------------------------------------------------ public ops


def deform_similarity(
    query, key, offsets, num_points=9, up_factor=2, groups=4, implementation="auto", training=None
):
    """SAPA-D's similarity: ``logits[b, i, j, g*P + p] = <query[b, i, j, group g],
    bilinear(key[b, ..., group g], position of point (g, p))>``.

    Args:
        query: ``(B, s*H, s*W, G*E)`` high-resolution query.
        key: ``(B, H, W, G*E)`` low-resolution key; group ``g`` is channels
            ``g*E .. (g+1)*E - 1`` of both.
        offsets: ``(B, s*H, s*W, 2*G*P)``: channel ``2k`` the width shift, ``2k + 1``
            the height shift of point ``k = g*P + p``, in low-resolution pixels.
        num_points: points per group ``P``.
        up_factor: integer upsampling factor ``s``.
        groups: ``G``.
        implementation: ``"auto"``, ``"xla"``, ``"patches"`` or ``"compiled"``, resolved
            by the dispatch rule (see the module docs): the compiled kernels (forward and
            backward) or this module's builtin formulation.
        training: whether the caller trains (a Keras layer's argument), as for
            :func:`keras_sapa.ops.sapa`.

    Returns:
        ``(B, s*H, s*W, G*P)`` logits, in float32 for float16/bfloat16 inputs (so the
        softmax that follows cannot overflow), else in the inputs' dtype. A dropped
        point's logit is 0.
    """
    num_points, up_factor, groups = _check_args(num_points, up_factor, groups)
    _checks.check_implementation(implementation)
    query, key, offsets = _prepare_similarity(query, key, offsets, num_points, up_factor, groups)
    kernels = _compiled_halves(implementation, training, (query, key, offsets))
    dtype = _compute_dtype(_dtype("query", query), _dtype("offsets", offsets))
    if kernels is not None:
        tensors = (ops.cast(t, dtype) for t in (query, key, offsets))
        return kernels.deform_similarity(*tensors, num_points, up_factor, groups)
    height, width = _low_size(key)
    index, tap_w = _sampling(offsets, height, width, num_points, up_factor, groups, dtype)
    return _similarity(
        ops.cast(query, dtype), ops.cast(key, dtype), index, tap_w, num_points, groups
    )


def deform_aggregate(
    weights,
    value,
    offsets,
    num_points=9,
    up_factor=2,
    groups=4,
    implementation="auto",
    training=None,
):
    """SAPA-D's aggregation: ``out[b, i, j, c] = sum_p weights[b, i, j, g*P + p] *
    bilinear(value[b, ..., c], position of point (g, p))`` with ``g = c // (C / G)``.

    Args:
        weights: ``(B, s*H, s*W, G*P)`` mixing weights (usually a softmax per group).
        value: ``(B, H, W, C)``, ``C`` divisible by ``G``.
        offsets: ``(B, s*H, s*W, 2*G*P)``, as in :func:`deform_similarity`.
        num_points, up_factor, groups, implementation, training: as in
            :func:`deform_similarity`.

    Returns:
        ``(B, s*H, s*W, C)`` in ``value``'s dtype (computed in float32 for half
        inputs).
    """
    num_points, up_factor, groups = _check_args(num_points, up_factor, groups)
    _checks.check_implementation(implementation)
    weights, value, offsets = _prepare_aggregate(
        weights, value, offsets, num_points, up_factor, groups
    )
    kernels = _compiled_halves(implementation, training, (weights, value, offsets))
    out_dtype = _dtype("value", value)
    dtype = _compute_dtype(out_dtype, _dtype("weights", weights), _dtype("offsets", offsets))
    if kernels is not None:
        tensors = (ops.cast(t, dtype) for t in (weights, value, offsets))
        out = kernels.deform_aggregate(*tensors, num_points, up_factor, groups)
        return ops.cast(out, out_dtype)
    height, width = _low_size(value)
    index, tap_w = _sampling(offsets, height, width, num_points, up_factor, groups, dtype)
    out = _aggregate(
        ops.cast(weights, dtype), ops.cast(value, dtype), index, tap_w, num_points, groups
    )
    return ops.cast(out, out_dtype)


def sapa_deform(
    query,
    key,
    value,
    offsets,
    num_points=9,
    up_factor=2,
    groups=4,
    implementation="auto",
    training=None,
):
    """SAPA-D, fused: ``deform_aggregate(softmax_per_group(deform_similarity(query, key,
    offsets)), value, offsets)``.

    The softmax runs over the ``P`` points of each group, with no ``1/sqrt(E)``
    scaling; dropped points take part with logit 0 and contribute a zero value (the
    official kernels' border rule). Similarity and softmax run in float32 when the
    inputs are float16 or bfloat16; the result has ``value``'s dtype. Shapes and
    arguments as in :func:`deform_similarity` and :func:`deform_aggregate`; the
    bilinear sampling positions are computed once for both halves. Where the dispatch
    rule picks ``"compiled"`` (see the module docs) the fused kernels run instead,
    forward and backward (gradients of query, key, value and offsets).
    """
    num_points, up_factor, groups = _check_args(num_points, up_factor, groups)
    _checks.check_implementation(implementation)
    query, key, offsets = _prepare_similarity(query, key, offsets, num_points, up_factor, groups)
    value = ops.convert_to_tensor(value)
    out_dtype = _dtype("value", value)
    _checks.check_pair("query", tuple(query.shape), "value", tuple(value.shape), up_factor)
    _check_channels("value", tuple(value.shape), groups, "C / groups channels per group")
    dtype = _compute_dtype(_dtype("query", query), out_dtype, _dtype("offsets", offsets))
    if resolve_deform_implementation(implementation, training, like=query) == "compiled":
        kernels = _deform_kernels()
        tensors = (query, key, value, offsets)
        if kernels.usable(*tensors):
            if len({_dtype("", t) for t in tensors}) > 1:  # one dtype for the kernels
                tensors = tuple(ops.cast(t, dtype) for t in tensors)
            out = kernels.sapa_deform(*tensors, num_points, up_factor, groups)
            return ops.cast(out, out_dtype)
    height, width = _low_size(key)
    index, tap_w = _sampling(offsets, height, width, num_points, up_factor, groups, dtype)
    logits = _similarity(
        ops.cast(query, dtype), ops.cast(key, dtype), index, tap_w, num_points, groups
    )
    weights = _group_softmax(logits, num_points, groups)
    out = _aggregate(weights, ops.cast(value, dtype), index, tap_w, num_points, groups)
    return ops.cast(out, out_dtype)
