"""SAPA-D's compiled kernels on JAX: XLA FFI custom calls with a hand-written VJP.

The handlers live in ``keras_sapa/_lib/_sapa_jax.so`` beside SAPA's (the FFI targets of
the op table's ``SapaDeform`` / ``SapaDeformGrad`` entries):

- ``keras_sapa_deform_forward``: ``(query, key, value, offsets) -> (out, weights)``, the
  per-group softmax ``weights`` kept for the backward;
- ``keras_sapa_deform_backward``: ``(grad, query, key, value, offsets, weights) ->
  (dquery, dkey, dvalue, doffsets)``;

and the halves: ``keras_sapa_deform_similarity`` ``(query, key, offsets) -> logits`` and
``keras_sapa_deform_aggregate`` ``(weights, value, offsets) -> out``, each with its
``_backward`` (the gradients of all three inputs).

They are bound as every op of the table is (:func:`._jax_kernels.run`): under
``jax.jit``, ``jax.grad``, ``jax.vmap`` and batch sharding. The library is loaded and
checked by :mod:`._jax_kernels` (disable switch, build record, jaxlib version, CPU
features); this module only registers the SAPA-D targets (CPU, and CUDA where JAX has
it): the fused pair's, and the halves' apart (a library built before the halves still
serves the fused op). float32 and float64 natively; the fused op also takes float16 /
bfloat16 in their own storage (converted row by row inside the kernels, weights in
float32); the public halves cast those to float32 before calling theirs.
"""

from keras_sapa.ops import _jax_kernels
from keras_sapa.ops import _native
from keras_sapa.ops import _optable

_OPS = (_optable.op("SapaDeform"), _optable.op("SapaDeformGrad"))
_HALVES = tuple(map(_optable.op, _optable.DEFORM_HALVES))


def _load(ops, what):
    """The registration (see :func:`._jax_kernels.register_ffi_targets`) of the targets of
    ``ops``, else (None, reason)."""
    if _jax_kernels._library.get() is None:
        return None, _jax_kernels.unavailable_reason()
    return _jax_kernels.register_ffi_targets(ops, what)


# SAPA's loader warns about a missing or stale library; an older library without the
# SAPA-D handlers (or without the halves') just leaves them on the builtin formulation.
_library = _native.Library("JAX (SAPA-D)", lambda: _load(_OPS, "SAPA-D "), warn=False)
_halves = _native.Library(
    "JAX (SAPA-D halves)", lambda: _load(_HALVES, "SAPA-D halves' "), warn=False
)


def available():
    """True when the SAPA-D FFI targets are registered for JAX's default backend (loads
    them on first call)."""
    return _library.get() is not None and _jax_kernels.platform_problem(_library) is None


def unavailable_reason():
    return _library.reason() or _jax_kernels.platform_problem(_library)


def usable(*tensors):
    """Whether :func:`sapa_deform` serves these tensors (JAX's default backend)."""
    del tensors
    return available()


def halves_usable(*tensors):
    """Whether :func:`deform_similarity` and :func:`deform_aggregate` serve these tensors
    (their targets registered for JAX's default backend; the tensors may be tracers)."""
    del tensors
    return (
        available()
        and _halves.get() is not None
        and _jax_kernels.platform_problem(_halves) is None
    )


def _half(name, tensors, num_points, up_factor, groups):
    """The table's op ``name`` (tensors of one dtype, float32 or float64) as a
    ``jax.custom_vjp`` of its forward and gradient targets (:func:`._jax_kernels._fused`)."""
    attrs = (
        ("num_points", int(num_points)),
        ("up_factor", int(up_factor)),
        ("groups", int(groups)),
    )
    return _jax_kernels._fused(name, attrs)(*tensors)


def deform_similarity(query, key, offsets, num_points, up_factor, groups):
    """SAPA-D's similarity on the compiled kernels -> logits ``(B, sH, sW, G*P)``, for
    float32 or float64 arrays of one dtype that :func:`keras_sapa.ops.deform_similarity`
    has checked; differentiable in all three (first order), also inside ``jax.jit`` and
    ``jax.vmap``."""
    return _half("DeformSimilarity", (query, key, offsets), num_points, up_factor, groups)


def deform_aggregate(weights, value, offsets, num_points, up_factor, groups):
    """SAPA-D's aggregation on the compiled kernels -> ``(B, sH, sW, C)``, for float32 or
    float64 arrays of one dtype that :func:`keras_sapa.ops.deform_aggregate` has checked;
    differentiable in all three (first order)."""
    return _half("DeformAggregate", (weights, value, offsets), num_points, up_factor, groups)


def sapa_deform(query, key, value, offsets, num_points, up_factor, groups):
    """The fused SAPA-D forward on the compiled kernels, for inputs that
    :func:`keras_sapa.ops.sapa_deform` has checked; differentiable in all four inputs
    (first order), also inside ``jax.jit`` and ``jax.vmap``. The result has ``value``'s
    dtype (half types stored as they are, computed in float32)."""
    if not available():
        raise RuntimeError(
            f"keras_sapa: the compiled SAPA-D kernels for JAX are unavailable: "
            f"{unavailable_reason()}"
        )
    attrs = {"num_points": num_points, "up_factor": up_factor, "groups": groups}
    return _jax_kernels.run("SapaDeform", (query, key, value, offsets), attrs)
