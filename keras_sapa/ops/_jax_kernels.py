"""SAPA's compiled kernels on JAX: XLA FFI custom calls with a hand-written VJP.

:func:`sapa` computes ``aggregate(softmax(similarity(query, key)), value)`` (SAPA_SPEC.md)
with the fused kernels of ``custom_ops/sapa/kernels/``, called by XLA through the FFI
handlers of ``keras_sapa/_lib/_sapa_jax.so`` (built by ``custom_ops/build.py``):

- ``keras_sapa_forward``: ``(query, key, value) -> (out, weights)``, the window softmax
  ``weights`` kept for the backward;
- ``keras_sapa_backward``: ``(grad, query, key, value, weights) -> (dquery, dkey, dvalue)``.

Every op of the table is bound the same way (:func:`run`, which
:mod:`._jax_deform_kernels` uses too): its FFI target from the op table, the output
shapes from the table's shape symbols, the VJP from its ``gradient`` entry. The calls
work under ``jax.jit``, ``jax.grad`` (:func:`jax.custom_vjp`), ``jax.vmap`` (the handlers
treat every leading dimension as batch, so the calls are declared
``vmap_method="broadcast_all"``, and a ``custom_vmap`` rule folds vmapped axes into the
batch) and sharding (``keras.distribution.DataParallel``): each call is a
``custom_partitioning`` op that keeps the batch axis sharded (its sharding rule derived
from the table's shapes), so every device runs the kernels on its own shard instead of
XLA gathering the whole batch.

Platforms: the CPU handlers are always registered; the CUDA handlers (the FFI handler
symbol with ``Cuda`` appended, on XLA's stream through the CUDA launcher that
``_sapa_core.so`` opens) only when JAX has a CUDA backend and the launcher and its
kernel images load (:data:`._native.cuda`); a CPU-only JAX registers none.

The library goes through the checks of :mod:`._native` (disable switch, build record,
jaxlib version, CPU features) on the first call of :func:`available`, never at import.
The kernels are XLA custom calls, so ``"compiled"`` runs inside ``jax.jit`` as well.
float32 and float64 run natively, and so do float16 / bfloat16 for the ops whose core has
16-bit entry points (:func:`._native.stores_halves`: the fused SAPA and SAPA-D pairs):
the arrays go to the kernels as they are, converted to float32 as the kernels read them,
the ``weights`` output in float32. Other ops compute half types in float32, the result
rounded once to ``value``'s dtype.
"""

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning

from keras_sapa.ops import _native
from keras_sapa.ops import _optable

SAPA = _optable.op("Sapa")
FORWARD_TARGET, BACKWARD_TARGET = (o.bindings.xla_ffi[0] for o in (SAPA, _optable.op("SapaGrad")))

# ------------------------------------------------------------------ facts for the dispatch
EAGER_BUILTIN = "xla"  # the builtin formulation without the kernels


def traced(tensor=None):
    """Whether ``tensor`` is a tracer (``jax.jit``, ``jax.export``, Keras's symbolic
    build); without a tensor to look at, assumed so."""
    return tensor is None or isinstance(tensor, jax.core.Tracer)


def in_xla_trace():
    """False: the kernels are XLA custom calls, at home inside ``jax.jit``."""
    return False


def exporting():
    """None: ``jax.export`` offers no public way to tell an export from a jit trace."""
    return None


def layer_supports_jit(implementation="auto"):
    """True: a SAPA layer runs inside ``jax.jit`` with every implementation."""
    return True


def has_cuda():
    """Whether JAX has a CUDA backend with a device (public API: ``jax.devices``)."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:  # no such backend (a CPU-only jaxlib) or none initialised
        return False


def _load():
    """({"cuda": reason or None}, None) once SAPA's FFI targets are registered, else
    (None, reason)."""
    core, info = _native.load_core()
    if core is None:
        return None, _native.unavailable_reason()
    info, reason = _native.bindings_build_info("jaxlib", jaxlib.__version__)
    if info is None:
        return None, reason
    if not info.get("jax_library"):
        return None, f"the JAX library was not built ({info.get('jax_status')})"
    return register_ffi_targets([SAPA, _optable.op(SAPA.gradient)], "")


def register_ffi_targets(ops, what):
    """Registers the XLA FFI targets of the table's ``ops`` from ``_sapa_jax.so``: the
    CPU handlers, and where :func:`has_cuda` the CUDA handlers the library has (when the
    launcher opens). ``({"cuda": None or why not}, None)``, or ``(None, reason)`` when a
    CPU handler is missing or fails to register. ``what`` names the ops in the reason
    (``""`` for SAPA's, ``"SAPA-D "``)."""
    path = os.path.join(_native.bindings_dir(), _native.JAX_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        handlers = [getattr(lib, o.bindings.xla_ffi[1]) for o in ops]
    except (OSError, AttributeError) as exc:
        return (
            None,
            f"{path} failed to load or has no {what}handlers ({exc}); rebuild with "
            "`python custom_ops/build.py`",
        )
    try:
        for o, handler in zip(ops, handlers, strict=True):
            jax.ffi.register_ffi_target(
                o.bindings.xla_ffi[0], jax.ffi.pycapsule(handler), platform="cpu"
            )
    except Exception as exc:  # a JAX without these APIs, or a rejected registration
        return None, f"registering the {what}XLA FFI targets failed ({exc!r})"
    return {"cuda": _register_cuda(lib, ops, what)}, None


def _register_cuda(lib, ops, what):
    """Registers the CUDA handlers of ``ops``; None when done, else why not (no CUDA
    backend: nothing is registered)."""
    if not has_cuda():
        return "JAX has no CUDA backend"
    symbols = [o.bindings.xla_ffi[1] + "Cuda" for o in ops]
    if not all(hasattr(lib, s) for s in symbols):
        return f"the JAX library has no CUDA handlers for the {what}ops"
    if _native.cuda.get() is None:
        return _native.cuda.reason()
    try:
        for o, symbol in zip(ops, symbols, strict=True):
            jax.ffi.register_ffi_target(
                o.bindings.xla_ffi[0], jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA"
            )
    except Exception as exc:  # noqa: BLE001 - the CPU targets stay usable
        return f"registering the {what}CUDA targets failed ({exc!r})"
    return None


_library = _native.Library("JAX", _load)


def platform_problem(library):
    """Why the registered targets of ``library`` (a :class:`._native.Library` of
    :func:`register_ffi_targets`) cannot serve JAX's default backend; None when they
    can (the CPU, or CUDA with its targets registered)."""
    backend = jax.default_backend()
    if backend == "cpu":
        return None
    registered = library.get()
    if backend == "gpu" and registered is not None and registered["cuda"] is None:
        return None
    why = registered["cuda"] if registered is not None else library.reason()
    return f"no compiled kernels for JAX's default backend {backend!r} ({why})"


def available():
    """True when the compiled kernels are registered with JAX for its default backend
    (loads them on first call).

    False, after one ``RuntimeWarning``, when the library is missing, stale, built for
    another CPU or jaxlib, or fails to load; False without a warning when
    ``KERAS_SAPA_DISABLE_COMPILED`` is set or the default backend has no kernels.
    """
    return _library.get() is not None and platform_problem(_library) is None


def usable(query, key, value):
    """Whether :func:`sapa` can serve these tensors: the kernels are registered for
    JAX's default backend. The tensors may be tracers."""
    del query, key, value
    return available()


def unavailable_reason():
    """Why :func:`available` is False (None when it is True)."""
    return _library.reason() or platform_problem(_library)


def _reset():
    """Forgets the load attempt (tests only)."""
    _library.reset()
    _native.core.reset()


# ------------------------------------------------------------------ the calls
HALF_TYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def tensor_dtype(tensor, dtype):
    """The dtype of the table's ``tensor`` in a call whose element type (``T``) is
    ``dtype``: ``Tweights`` tensors (the saved softmax) are float32 for the half types."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if tensor.dtype == "Tweights" and dtype in HALF_TYPES else dtype


def _ffi_call(op, attrs, *arrays):
    """One custom call of the table's ``op``: outputs shaped by the table, typed as the
    first input (``Tweights`` ones by :func:`tensor_dtype`)."""
    shapes = _native.output_shapes(op, [a.shape for a in arrays], attrs)
    call = jax.ffi.ffi_call(
        op.bindings.xla_ffi[0],
        tuple(
            jax.ShapeDtypeStruct(s, tensor_dtype(t, arrays[0].dtype))
            for s, t in zip(shapes, op.outputs, strict=True)
        ),
        vmap_method="broadcast_all",
    )
    return tuple(call(*arrays, **{name: np.int64(v) for name, v in attrs.items()}))


def sharding_rule(op):
    """The op's ``custom_partitioning`` rule from its table shapes: one factor per
    distinct dimension (``b`` the batch), e.g. ``"b c d e, b f g e -> ..."``."""
    letters = iter("cdefghijklmnopqrstuvwxyz")
    factors = {"B": "b"}
    for tensor in (*op.inputs, *op.outputs):
        for dim in tensor.shape:
            if dim not in factors:
                factors[dim] = next(letters)

    def spec(tensors):
        return ", ".join(" ".join(factors[dim] for dim in t.shape) for t in tensors)

    return f"{spec(op.inputs)} -> {spec(op.outputs)}"


# Sharding. XLA cannot look into a custom call, so by itself it gathers sharded operands
# onto every device and runs the whole batch there. Each call is therefore wrapped in
# ``custom_partitioning``: every operand and result keeps the sharding of the query's
# batch axis, all other axes replicated, and each device runs the kernel on its shard.
# ``custom_partitioning`` has no batching rule, so ``custom_vmap`` folds a vmapped axis
# into the batch axis (broadcasting unbatched operands) before the call.
@functools.cache
def _partitioned(op_name, attr_items):
    op, attrs = _optable.op(op_name), dict(attr_items)

    def body(*arrays):
        return _ffi_call(op, attrs, *arrays)

    query = 0  # the first input, every op's high-resolution operand, shards the batch
    partitioned = custom_partitioning(body)

    def batch_sharding(mesh, arg_shapes):
        spec = arg_shapes[query].sharding.spec
        return jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(spec[0] if spec else None)
        )

    def partition(mesh, arg_shapes, result_shape):
        sharding = batch_sharding(mesh, arg_shapes)
        return (
            mesh,
            body,
            tuple(sharding for _ in result_shape),
            tuple(sharding for _ in arg_shapes),
        )

    def infer(mesh, arg_shapes, result_shape):
        sharding = batch_sharding(mesh, arg_shapes)
        return tuple(sharding for _ in result_shape)

    rule = sharding_rule(op)
    # Every factor but the batch must stay whole, listed in order of first appearance.
    factors = []
    for name in rule.replace(",", " ").replace("->", " ").split():
        if name != "b" and name not in factors:
            factors.append(name)
    partitioned.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=tuple(factors),
    )

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return partitioned(*arrays)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        arrays = [
            a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip(arrays, in_batched, strict=True)
        ]
        outs = call(*(a.reshape((-1,) + a.shape[2:]) for a in arrays))
        return (
            tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs),
            tuple(True for _ in outs),
        )

    return call


@functools.cache
def _fused(op_name, attr_items):
    """The table's fused ``op`` (first output) as a ``jax.custom_vjp`` whose backward is
    its ``gradient`` op: that op takes the output's gradient then ``gradient_inputs``
    (inputs and outputs by name) and returns the ``differentiable`` inputs' gradients."""
    op = _optable.op(op_name)
    forward = _partitioned(op_name, attr_items)
    backward = _partitioned(op.gradient, attr_items)
    names = [t.name for t in op.inputs] + [t.name for t in op.outputs]

    @jax.custom_vjp
    def fused(*inputs):
        return forward(*inputs)[0]

    def fused_fwd(*inputs):
        outs = forward(*inputs)
        named = dict(zip(names, (*inputs, *outs), strict=True))
        return outs[0], tuple(named[n] for n in op.gradient_inputs)

    def fused_bwd(residuals, grad):
        grads = iter(backward(grad.astype(residuals[0].dtype), *residuals))
        return tuple(next(grads) if t.name in op.differentiable else None for t in op.inputs)

    fused.defvjp(fused_fwd, fused_bwd)
    return fused


def compute_dtype(dtypes, stores_halves):
    """The element type the kernels run in for inputs of ``dtypes``: their one
    dtype where the kernels take it (a half type only where ``stores_halves``), else
    float64 when one input is float64, else float32 (the result is then rounded to
    ``value``'s dtype)."""
    dtypes = {jnp.dtype(d) for d in dtypes}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype in (jnp.float32, jnp.float64) or (dtype in HALF_TYPES and stores_halves):
            return dtype
    return jnp.dtype(jnp.float64 if jnp.float64 in dtypes else jnp.float32)


def run(op_name, tensors, attrs):
    """The table's fused op ``op_name`` on the compiled kernels, for inputs that the
    public op has checked (shapes, floating dtypes): differentiable, also under
    ``jax.jit``, ``jax.vmap`` and batch sharding. float16 / bfloat16 go to the kernels
    as they are where the core stores them (:func:`._native.stores_halves`), else they
    are computed in float32 (float64 inputs in float64), the result rounded once to
    ``value``'s dtype."""
    op = _optable.op(op_name)
    dtypes = [jnp.asarray(t).dtype for t in tensors]
    compute = compute_dtype(dtypes, _native.stores_halves(_native.core.get(), op))
    attr_items = tuple((a.name, int(attrs[a.name])) for a in op.attrs)
    out = _fused(op_name, attr_items)(*(jnp.asarray(t, compute) for t in tensors))
    names = [t.name for t in op.inputs]
    return out.astype(dtypes[names.index("value")]) if "value" in names else out


def sapa(query, key, value, kernel_size, up_factor):
    """``aggregate(softmax(similarity(query, key)), value)`` on the compiled kernels, for
    inputs that :func:`keras_sapa.ops.sapa` has checked (shapes, one floating dtype).

    Float16 and bfloat16 go to the kernels in their own storage (converted to float32 per
    tile inside them; with an older library, computed in float32 and rounded once to
    ``value``'s dtype). Differentiable in all three inputs (first order); works under ``jax.jit``,
    ``jax.vmap`` and batch sharding. Raises ``RuntimeError`` when the kernels are
    unavailable (see :func:`available`).
    """
    if not available():
        raise RuntimeError(
            "keras_sapa: the compiled SAPA kernels for JAX are unavailable: "
            f"{unavailable_reason()}"
        )
    return run("Sapa", (query, key, value), {"kernel_size": kernel_size, "up_factor": up_factor})
