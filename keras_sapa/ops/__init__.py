"""Functional SAPA ops (channels last) on every Keras backend, and the one dispatch rule.

    similarity(query, key)      -> (B, sH, sW, K*K)
    aggregate(weights, value)   -> (B, sH, sW, C)
    sapa(query, key, value)     -> aggregate(softmax(similarity(query, key)), value)

Semantics are those of ``shared/SAPA_SPEC.md``: a window of K x K low-resolution
points around ``(i // s, j // s)``, row-major, zero padding *inside* the softmax.

Importing ``keras_sapa.ops`` imports no framework besides Keras. Per backend two modules
hold the code, over one native loader (:mod:`._native`): the builtin formulations
(:mod:`._tf_builtin`, :mod:`._jax_builtin`, :mod:`._torch_builtin`, and the ``keras.ops``
one every backend can run, :mod:`._patches`) and the compiled-kernel bindings
(:mod:`._tf_kernels`, :mod:`._jax_kernels`, :mod:`._torch_kernels`), which also state the
facts the rule below needs. What ``implementation`` means on each backend:

============  ===============================  ========================  =======================
              TensorFlow                       JAX                       PyTorch
============  ===============================  ========================  =======================
``patches``   ``tf.image.extract_patches``     stacked windows + einsum  stacked windows + einsum
              + einsum                         (``keras.ops``)           (``keras.ops``)
``xla``       shifted slices, builtin ops;     shifted slices + einsum,  stacked windows + bmm,
              compiles with                    ``jax.custom_vjp``        ``autograd.Function``
              ``jit_compile=True``
``compiled``  the fused C++/CUDA custom op;    the fused C++ CPU         the fused C++ CPU
              not inside ``jit_compile=True``  kernels as XLA FFI        kernels as
              (``ValueError``)                 custom calls, also in     ``torch.library`` ops,
                                               ``jax.jit``               also in torch.compile
============  ===============================  ========================  =======================

On JAX and PyTorch, ``"compiled"`` binds only the fused ``sapa``; ``similarity`` and
``aggregate`` use ``"xla"`` there. SAPA-D's ops (``sapa_deform``, ``deform_similarity``,
``deform_aggregate``, :mod:`._deform`) take the same rule; their compiled kernels (the
fused op and both halves, forward and backward) are bound on every backend. The dispatch
rule, one function for every backend (:func:`resolve_implementation`), decides what
``"auto"`` stands for, in this order:

====  ==========================================================  ===========================
step  when                                                        ``"auto"`` resolves to
====  ==========================================================  ===========================
1     :func:`use_implementation` set one in this thread           that one
2     the kernels are not available (not built, stale, other      the builtin: ``"xla"`` in a
      CPU or framework version, ``KERAS_SAPA_DISABLE_COMPILED``)  trace, eagerly ``"patches"``
                                                                  on TF and ``"xla"`` elsewhere
3     an export may be traced: on PyTorch exactly when            the builtin (as in 2)
      ``torch.onnx`` / ``torch.export`` traces; on TF and JAX,
      which have no public API for it, any trace (TF graph,
      JAX tracer) of a call that does not train
      (``training`` is not ``True``)
4     XLA compiles the trace and cannot hold the kernels (TF's    ``"xla"``
      ``jit_compile=True``)
5     otherwise (eager calls, training traces)                    ``"compiled"``
====  ==========================================================  ===========================

So ``fit`` uses the compiled kernels' fast backward, and exports made any standard way
hold builtin ops only. The price is inference inside a trace (``predict``, a
non-training ``tf.function``) on TensorFlow and JAX, which runs the builtin formulation.
**For inference that is not exported, opt in with one line:**
``keras_sapa.ops.set_implementation(model, "compiled")``. An explicit ``"compiled"`` (an
argument or :func:`use_implementation`) raises ``RuntimeError`` where the kernels are not
available, and ``ValueError`` inside TensorFlow's ``jit_compile=True`` (a SAPA layer with
``"compiled"`` reports ``supports_jit=False``, so Keras compiles such a model without XLA).

Inputs are checked once for every backend and implementation: shapes, and one floating
dtype for all tensors of a call (``ValueError`` naming the argument and its dtype).
Float16 and bfloat16 similarities and softmax run in float32. A layer saved with
``"auto"``, ``"patches"`` or ``"xla"`` loads on every backend; one saved with
``"compiled"`` loads with a warning where the compiled op is missing and runs on
``"auto"`` (see :meth:`keras_sapa.SAPA.from_config`).
"""

import contextlib
import threading

import keras
import numpy as np

from keras_sapa.ops import _checks
from keras_sapa.ops._deform import deform_aggregate
from keras_sapa.ops._deform import deform_similarity
from keras_sapa.ops._deform import sapa_deform

__all__ = [
    "similarity",
    "aggregate",
    "sapa",
    "deform_similarity",
    "deform_aggregate",
    "sapa_deform",
    "compiled_available",
    "load_compiled_library",
    "resolve_implementation",
    "set_implementation",
    "use_implementation",
]

_HALF_DTYPES = ("float16", "bfloat16")
_override = threading.local()


def _modules():
    """``(kernel bindings, builtin formulations)`` of the running backend; ``(None,
    None)`` on a backend without its own. Plain import statements: TensorFlow's autograph
    and PyTorch's Dynamo trace through them (not through ``importlib``)."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        from keras_sapa.ops import _tf_builtin as builtin
        from keras_sapa.ops import _tf_kernels as kernels
    elif backend == "jax":
        from keras_sapa.ops import _jax_builtin as builtin
        from keras_sapa.ops import _jax_kernels as kernels
    elif backend == "torch":
        from keras_sapa.ops import _torch_builtin as builtin
        from keras_sapa.ops import _torch_kernels as kernels
    else:
        return None, None
    return kernels, builtin


def _kernels():
    """The compiled-kernel bindings of the running backend (a module stating the
    dispatch facts), or None on a backend without them."""
    return _modules()[0]


def _builtin(implementation):
    """``(similarity, aggregate)`` of a builtin formulation (``"patches"``, ``"xla"``) on
    the running backend; the ``keras.ops`` one where the backend has none of its own."""
    from keras_sapa.ops import _patches

    module = _modules()[1]
    if module is None or not hasattr(module, f"similarity_{implementation}"):
        module = _patches
    return (
        getattr(module, f"similarity_{implementation}"),
        getattr(module, f"aggregate_{implementation}"),
    )


def compiled_available():
    """True when the compiled kernels are loaded and usable on the running backend.

    On TensorFlow the custom op library; on JAX and PyTorch the bindings of the same
    CPU kernels. False when they were not built, were built for another framework
    version or CPU, failed to load, or ``KERAS_SAPA_DISABLE_COMPILED`` is set (read at
    every call).
    """
    kernels = _kernels()
    return kernels is not None and kernels.available()


def load_compiled_library():
    """Loads the compiled kernels now (they are otherwise loaded on first use) and
    returns True when they are available.

    Call it before ``tf.saved_model.load`` of a SavedModel that was exported with the
    compiled op: TensorFlow must know the ``KerasSapa>...`` ops to rebuild its graph.
    """
    return compiled_available()


@contextlib.contextmanager
def use_implementation(implementation):
    """Within this context, ``implementation="auto"`` resolves to ``implementation``
    (step 1 of the rule in the module docs), on every backend.

    The choice is made when an op is called, which for a traced function is when it is
    traced: functions traced before keep their choice (see :func:`set_implementation`).
    Use ``use_implementation("compiled")`` around an export to keep the compiled op in a
    SavedModel (it then loads only after :func:`load_compiled_library`). The setting is
    per thread: the replicas of a ``tf.distribute`` strategy, for one, do not see it.
    """
    _checks.check_implementation(implementation)
    previous = getattr(_override, "value", None)
    _override.value = None if implementation == "auto" else implementation
    try:
        yield
    finally:
        _override.value = previous


def _unavailable(kernels):
    if kernels is None:
        return f"no compiled kernels exist for the {keras.config.backend()!r} backend"
    return kernels.unavailable_reason()


def resolve_implementation(implementation="auto", training=None, like=None):
    """The concrete implementation (``"patches"``, ``"xla"`` or ``"compiled"``) that
    ``implementation`` stands for on the running backend, here and now: the dispatch
    rule of the module docs, the one place it is written.

    Args:
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.
        training: whether the caller trains (a Keras layer's ``training`` argument; only
            a Python or NumPy ``True`` counts).
        like: a tensor of the call, where the backend tells a trace from its tensors
            (JAX); without one, JAX counts the call as traced.

    Raises:
        RuntimeError: ``"compiled"`` (asked for directly or through
            :func:`use_implementation`) where the kernels are not available.
        ValueError: ``"compiled"`` inside TensorFlow's ``jit_compile=True``.
    """
    _checks.check_implementation(implementation)
    if implementation == "auto":
        implementation = getattr(_override, "value", None) or "auto"
    kernels = _kernels()
    traced = kernels is None or kernels.traced(like)
    if implementation == "auto":
        builtin = "xla" if traced else kernels.EAGER_BUILTIN
        exporting = kernels.exporting() if kernels is not None else None
        if exporting is None:  # the framework cannot tell: any trace that does not train
            exporting = traced and not (isinstance(training, (bool, np.bool_)) and training)
        if exporting or kernels.in_xla_trace():
            return "xla" if kernels is not None and kernels.in_xla_trace() else builtin
        return "compiled" if kernels.available() else builtin
    if implementation == "compiled":
        if kernels is None or not kernels.available():
            raise RuntimeError(
                "implementation='compiled' was requested but the keras_sapa compiled "
                f"kernels are not available on the {keras.config.backend()!r} backend "
                f"({_unavailable(kernels)}). Build them with `python custom_ops/build.py`, "
                "or use implementation='auto'."
            )
        if kernels.in_xla_trace():
            raise ValueError(
                "implementation='compiled' cannot run inside a function that XLA compiles "
                "(jit_compile=True): XLA cannot compile the keras_sapa custom op. Use "
                "implementation='auto' (it takes the 'xla' formulation there) or 'xla', "
                "or compile without XLA (jit_compile=False; Keras does so by itself for "
                "a model whose SAPA layers use 'compiled'). Received: "
                "implementation='compiled' inside jit_compile=True"
            )
    return implementation


def layer_supports_jit(implementation="auto"):
    """The ``supports_jit`` of a SAPA layer with this ``implementation``: False on
    TensorFlow for ``"compiled"``, and for ``"auto"`` where the compiled GPU op runs (see
    :func:`keras_sapa.ops._tf_kernels.layer_supports_jit`); True elsewhere."""
    kernels = None if implementation in ("patches", "xla") else _kernels()
    return kernels is None or kernels.layer_supports_jit(implementation)


def _sapa_layers(model):
    """Every keras_sapa layer (one with an ``implementation`` setting) in ``model``,
    nested layers included.

    Keras 3 has no public way to list the layers nested in a layer; this uses
    ``Layer._flatten_layers`` (what Keras's own ``quantize`` and jit checks use), pinned
    by ``tests/test_ops.py::test_set_implementation_finds_nested_layers``.
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if type(layer).__module__.split(".")[0] == "keras_sapa"
        and isinstance(getattr(layer, "implementation", None), str)
        and layer.implementation in _checks.IMPLEMENTATIONS
    ]


def set_implementation(model, implementation):
    """Sets ``implementation`` on every SAPA layer of a Keras ``model`` (nested layers
    included) and drops the functions Keras has traced for it, so that the next
    ``fit``, ``evaluate`` or ``predict`` traces them again with the new choice.

    The implementation is chosen when a function is traced; Keras traces
    ``model.predict_function`` (and the train and test functions) once and reuses them.
    Call ``set_implementation(model, "auto")`` after changing
    ``KERAS_SAPA_DISABLE_COMPILED`` or a :func:`use_implementation` scope, too.

    ``set_implementation(model, "compiled")`` is the one-line opt-in to the compiled
    kernels for inference (``predict``, ``evaluate``, a serving ``tf.function``), which
    ``"auto"`` keeps builtin inside traces so that exports stay portable (an export
    made after it holds the custom op). On TensorFlow the layers then decline XLA
    (``supports_jit``), and a model compiled with ``jit_compile=True`` is switched to
    ``jit_compile=False`` (Keras warns).

    Args:
        model: a Keras model (or layer) holding SAPA layers.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.

    Returns:
        The number of SAPA layers set.

    Raises:
        ValueError: bad ``implementation``, or no SAPA layer in ``model``.
        RuntimeError: ``"compiled"`` without the library.
    """
    _checks.check_implementation(implementation)
    if implementation == "compiled":
        resolve_implementation("compiled")  # raises here, not at the next trace
    layers = _sapa_layers(model)
    if not layers:
        raise ValueError(f"`model` holds no SAPA layer. Received: model={model!r}")
    for layer in layers:
        layer.implementation = implementation
    if getattr(model, "_jit_compile", None) and not all(x.supports_jit for x in layers):
        model.jit_compile = False  # Keras's public setter; XLA cannot hold the kernels
    # Keras's public attributes; make_*_function() traces them again when None.
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    return len(layers)


def _prepare(tensors, kernel_size, up_factor, implementation):
    """The checks every op and backend shares: arguments, shapes and dtypes.

    ``tensors``: ``(name, tensor)`` pairs, the high-resolution one first. Returns the
    tensors, ``kernel_size`` and ``up_factor``."""
    _checks.check_implementation(implementation)
    kernel_size = _checks.check_kernel_size(kernel_size)
    up_factor = _checks.check_up_factor(up_factor)
    names = [name for name, _ in tensors]
    tensors = [keras.ops.convert_to_tensor(t) for _, t in tensors]
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in tensors]
    _checks.check_float_dtypes(list(zip(names, dtypes, strict=True)))
    high = tensors[0]
    for name, low in zip(names[1:], tensors[1:], strict=True):
        _checks.check_pair(
            names[0],
            tuple(high.shape),
            name,
            tuple(low.shape),
            up_factor,
            last_dim="equal" if name == "key" else None,
        )
        high = _checked_at_run_time(high, names[0], low, name, up_factor)
    return [high, *tensors[1:]], kernel_size, up_factor


def similarity(query, key, kernel_size=5, up_factor=2, implementation="auto", training=None):
    """Window similarity ``S[b, i, j, n] = <query[b, i, j], key[b, i//s + a, j//s + b']>``.

    Args:
        query: ``(B, s*H, s*W, d)`` high-resolution query.
        key: ``(B, H, W, d)`` low-resolution key, of ``query``'s dtype.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"`` (see
            the module docs for their meaning on each backend).
        training: whether the caller trains (steers ``"auto"``, see the module docs).

    Returns:
        ``(B, s*H, s*W, K*K)``; points outside the map contribute 0.
    """
    (query, key), kernel_size, up_factor = _prepare(
        (("query", query), ("key", key)), kernel_size, up_factor, implementation
    )
    fn, _ = _window_ops(resolve_implementation(implementation, training, like=query))
    return fn(query, key, kernel_size, up_factor)


def aggregate(weights, value, kernel_size=5, up_factor=2, implementation="auto", training=None):
    """Window aggregation ``out[b, i, j] = sum_n weights[b, i, j, n] * value[b, window_n]``.

    Args:
        weights: ``(B, s*H, s*W, K*K)`` mixing weights (usually a softmax).
        value: ``(B, H, W, C)`` low-resolution feature, of ``weights``' dtype.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.
        training: whether the caller trains (steers ``"auto"``, see the module docs).

    Returns:
        ``(B, s*H, s*W, C)``; points outside the map contribute 0.
    """
    (weights, value), kernel_size, up_factor = _prepare(
        (("weights", weights), ("value", value)), kernel_size, up_factor, implementation
    )
    _checks.check_weights_channels(tuple(weights.shape), kernel_size)
    _, fn = _window_ops(resolve_implementation(implementation, training, like=weights))
    return fn(weights, value, kernel_size, up_factor)


def _window_ops(resolved):
    """``(similarity, aggregate)`` for a resolved implementation: the compiled window
    ops where the backend binds them (TensorFlow), else the builtin ones."""
    kernels = _kernels() if resolved == "compiled" else None
    if kernels is not None and hasattr(kernels, "similarity"):
        return kernels.similarity, kernels.aggregate
    return _builtin("xla" if resolved == "compiled" else resolved)


def sapa(query, key, value, kernel_size=5, up_factor=2, implementation="auto", training=None):
    """``aggregate(softmax(similarity(query, key)), value)``.

    Args:
        query: ``(B, s*H, s*W, d)``; key: ``(B, H, W, d)``; value: ``(B, H, W, C)``, all
            of one floating dtype.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.
        training: whether the caller trains (a Keras layer passes its ``training``
            argument); steers ``"auto"``, see the module docs.

    Returns:
        ``(B, s*H, s*W, C)`` in the inputs' dtype. The similarity and the softmax run in
        float32 for float16 and bfloat16 inputs (large logits cannot overflow). Padded
        window points take part in the softmax with similarity 0, as in the official
        implementation.
    """
    (query, key, value), kernel_size, up_factor = _prepare(
        (("query", query), ("key", key), ("value", value)), kernel_size, up_factor, implementation
    )
    resolved = resolve_implementation(implementation, training, like=query)
    kernels = _kernels() if resolved == "compiled" else None
    if kernels is not None and kernels.usable(query, key, value):
        return kernels.sapa(query, key, value, kernel_size, up_factor)
    if keras.backend.standardize_dtype(query.dtype) in _HALF_DTYPES:
        query, key = keras.ops.cast(query, "float32"), keras.ops.cast(key, "float32")
    similarity_fn, aggregate_fn = _window_ops(resolved)
    weights = keras.ops.softmax(similarity_fn(query, key, kernel_size, up_factor), axis=-1)
    return aggregate_fn(keras.ops.cast(weights, value.dtype), value, kernel_size, up_factor)


def _checked_at_run_time(high, high_name, low, low_name, up_factor):
    """``high``, made to fail at run time when its batch and spatial sizes are not
    those of ``low`` (times ``up_factor``) and were unknown when it was traced. Only
    TensorFlow graphs have such sizes; elsewhere ``high`` is returned unchanged."""
    if keras.config.backend() != "tensorflow":
        return high
    import tensorflow as tf

    asserts = _checks.runtime_shape_asserts(high, high_name, low, low_name, up_factor)
    if not asserts:
        return high
    with tf.control_dependencies(asserts):
        return tf.identity(high)
