"""Functional SAPA ops (channels last) on every Keras backend.

    similarity(query, key)      -> (B, sH, sW, K*K)
    aggregate(weights, value)   -> (B, sH, sW, C)
    sapa(query, key, value)     -> aggregate(softmax(similarity(query, key)), value)

Semantics are those of ``shared/SAPA_SPEC.md``: a window of K x K low-resolution
points around ``(i // s, j // s)``, row-major, zero padding *inside* the softmax.

This module is the one dispatch point on ``keras.config.backend()``; each backend's
module is imported on first use, so importing ``keras_sapa.ops`` imports no
framework besides Keras. What ``implementation`` means on each backend:

============  ==============================  ==============================  ============================
              TensorFlow                      JAX                             PyTorch
============  ==============================  ==============================  ============================
``patches``   ``tf.image.extract_patches`` +  stacked windows + einsum        stacked windows + einsum
              einsum                          (``keras.ops``, autodiff)       (``keras.ops``, autodiff)
``xla``       shifted slices, builtin ops;    shifted slices + einsum,        stacked windows + ``bmm``,
              compiles with                   hand-written gradient           hand-written gradient
              ``jit_compile=True``            (``jax.custom_vjp``), jit-able  (``autograd.Function``),
                                                                              eager and ``torch.compile``
``compiled``  the fused C++/CUDA custom op    the fused C++ CPU kernels as     the fused C++ CPU kernels as
                                              XLA FFI custom calls            ``torch.library`` custom ops
``auto``      see :mod:`._tensorflow`         ``compiled`` when training      ``compiled`` (``xla`` while
                                              (``training=True``) and the     exporting, for CUDA tensors
                                              kernels are built, else         or where the kernels are not
                                              ``xla``                         built)
============  ==============================  ==============================  ============================

So ``"xla"`` names the formulation with hand-written gradients that each backend
compiles well, and ``"patches"`` the plain one that the backend's autodiff
differentiates. On JAX and PyTorch, ``"compiled"`` runs only the fused ``sapa`` (the
JAX/PyTorch bindings of ``custom_ops/sapa/kernels/cpu``, built by
``custom_ops/build_bindings.py``; :mod:`._native`); ``similarity`` and ``aggregate`` use
``"xla"`` there. As on TensorFlow, ``"auto"`` keeps the kernels out of anything exported:
on JAX it takes them for training calls only (a jitted function cannot tell that it is
being exported), on PyTorch whenever ``torch.onnx`` / ``torch.export`` is not tracing. A layer saved with ``"auto"``, ``"patches"`` or ``"xla"`` loads on
every backend; one saved with ``"compiled"`` loads with a warning where the compiled
op is missing and runs on ``"auto"`` (see :meth:`keras_sapa.SAPA.from_config`).
"""

import contextlib
import threading

import keras

from keras_sapa.ops import _checks

__all__ = [
    "similarity",
    "aggregate",
    "sapa",
    "compiled_available",
    "load_compiled_library",
    "resolve_implementation",
    "set_implementation",
    "use_implementation",
]

_HALF_DTYPES = ("float16", "bfloat16")
_override = threading.local()


def _on_tensorflow():
    return keras.config.backend() == "tensorflow"


def _tf():
    from keras_sapa.ops import _tensorflow

    return _tensorflow


def _kernel_module():
    """The module binding the compiled CPU kernels to the running backend
    (:mod:`._jax_kernels`, :mod:`._torch_kernels`), or None on TensorFlow (whose custom
    op is dispatched by :mod:`._tensorflow`)."""
    backend = keras.config.backend()
    if backend == "jax":
        from keras_sapa.ops import _jax_kernels

        return _jax_kernels
    if backend == "torch":
        from keras_sapa.ops import _torch_kernels

        return _torch_kernels
    return None


def _backend_kernels():
    """The kernel module of the running backend (JAX or PyTorch) when its kernels load,
    else None. Both offer ``usable(query, key, value)`` and ``sapa(query, key, value,
    kernel_size, up_factor)``. ``KERAS_SAPA_DISABLE_COMPILED`` is read at every call, as
    on TensorFlow."""
    from keras_sapa.ops import _native

    module = _kernel_module()
    if _native.disabled() or module is None:
        return None
    return module if module.available() else None


def _backend_kernels_reason():
    """Why :func:`_backend_kernels` is None (a sentence)."""
    from keras_sapa.ops import _native

    module = _kernel_module()
    if module is None:
        return f"no compiled kernel bindings for the {keras.config.backend()!r} backend"
    if _native.disabled():
        return f"{_native.ENV_DISABLE} is set"
    module.available()
    return module.unavailable_reason() or "available"


def _torch_exporting():
    import torch

    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def _auto_choice(training):
    """What ``"auto"`` means on JAX and PyTorch (see the module docs)."""
    if _backend_kernels() is None:
        return "xla"
    if keras.config.backend() == "jax":
        return "compiled" if training is True else "xla"
    return "xla" if _torch_exporting() else "compiled"


def _formulation(implementation):
    """The module holding ``similarity`` / ``aggregate`` for a resolved
    implementation on a backend other than TensorFlow (``"compiled"`` binds only the
    fused ``sapa``: the window ops use ``"xla"``)."""
    backend = keras.config.backend()
    if implementation == "compiled":
        implementation = "xla"
    if implementation == "xla" and backend == "jax":
        from keras_sapa.ops import _jax

        return _jax
    if implementation == "xla" and backend == "torch":
        from keras_sapa.ops import _torch

        return _torch
    from keras_sapa.ops import _pure

    return _pure


def compiled_available():
    """True when the compiled custom op library is loaded and usable.

    On TensorFlow the custom op library; on JAX and PyTorch the bindings of the same
    CPU kernels. False when it was not built, was built for another framework version
    or CPU, failed to load, or ``KERAS_SAPA_DISABLE_COMPILED=1`` is set.
    """
    if not _on_tensorflow():
        return _backend_kernels() is not None
    return _tf().compiled_available()


def load_compiled_library():
    """Loads the compiled custom op library now (it is otherwise loaded on first use)
    and returns True when it is available (on JAX and PyTorch: their kernel bindings).

    Call it before ``tf.saved_model.load`` of a SavedModel that was exported with the
    compiled op: TensorFlow must know the ``KerasSapa>...`` ops to rebuild its graph.
    """
    if not _on_tensorflow():
        return compiled_available()
    return _tf().load_compiled_library()


@contextlib.contextmanager
def use_implementation(implementation):
    """Within this context, ``implementation="auto"`` resolves to ``implementation``
    (on every backend). The setting is per thread.

    On TensorFlow, exports already use the builtin-op ``"xla"`` path by themselves;
    use ``use_implementation("compiled")`` around an export to keep the compiled op
    in the SavedModel (it then loads only after :func:`load_compiled_library`).
    """
    if _on_tensorflow():
        with _tf().use_implementation(implementation):
            yield
        return
    _checks.check_implementation(implementation)
    previous = getattr(_override, "value", None)
    _override.value = None if implementation == "auto" else implementation
    try:
        yield
    finally:
        _override.value = previous


def resolve_implementation(implementation="auto", training=None):
    """The concrete implementation (``"patches"``, ``"xla"`` or ``"compiled"``) that
    ``implementation`` stands for on the current backend and in the current context.

    Raises ``RuntimeError`` for ``"compiled"`` where the compiled kernels are not
    available. ``training`` (a Keras layer's argument) steers ``"auto"``: on TensorFlow,
    in a traced graph, the compiled op is used only when it is ``True`` (see
    :func:`keras_sapa.ops._tensorflow.resolve_implementation`); on JAX likewise.
    """
    if _on_tensorflow():
        return _tf().resolve_implementation(implementation, training)
    _checks.check_implementation(implementation)
    if implementation == "auto":
        implementation = getattr(_override, "value", None) or _auto_choice(training)
    if implementation == "compiled" and _backend_kernels() is None:
        raise RuntimeError(
            "implementation='compiled' was requested but the keras_sapa compiled "
            f"kernels are not available on the {keras.config.backend()!r} backend "
            f"({_backend_kernels_reason()}). Build them with "
            "`python custom_ops/build_bindings.py`, or use implementation='auto'."
        )
    return implementation


def layer_supports_jit(implementation="auto"):
    """The ``supports_jit`` of a SAPA layer with this ``implementation``.

    False only on TensorFlow when a GPU is visible and the compiled GPU op is usable:
    Keras's ``jit_compile="auto"`` then leaves XLA off, so that the default ``fit``
    reaches the fused kernels instead of the builtin formulation XLA would compile
    (see :func:`keras_sapa.ops._compiled.layer_supports_jit` for the trade-off)."""
    if not _on_tensorflow():
        return True
    from keras_sapa.ops import _compiled

    return _compiled.layer_supports_jit(implementation)


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
    # Keras's public attributes; make_*_function() traces them again when None.
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    return len(layers)


def _prepare(high, high_name, low, low_name, kernel_size, up_factor, equal_last):
    """Validated tensors and window sizes (backends other than TensorFlow)."""
    kernel_size = _checks.check_kernel_size(kernel_size)
    up_factor = _checks.check_up_factor(up_factor)
    high = keras.ops.convert_to_tensor(high)
    low = keras.ops.convert_to_tensor(low)
    _checks.check_pair(
        high_name, tuple(high.shape), low_name, tuple(low.shape), up_factor,
        last_dim="equal" if equal_last else None,
    )
    high_dtype = keras.backend.standardize_dtype(high.dtype)
    low_dtype = keras.backend.standardize_dtype(low.dtype)
    if high_dtype != low_dtype:
        raise ValueError(
            f"`{high_name}` and `{low_name}` must have the same dtype. Received: "
            f"{high_name}.dtype={high_dtype}, {low_name}.dtype={low_dtype}"
        )
    return high, low, kernel_size, up_factor


def similarity(query, key, kernel_size=5, up_factor=2, implementation="auto",
               training=None):
    """Window similarity ``S[b, i, j, n] = <query[b, i, j], key[b, i//s + a, j//s + b']>``.

    Args:
        query: ``(B, s*H, s*W, d)`` high-resolution query.
        key: ``(B, H, W, d)`` low-resolution key.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"`` (see
            the module docs for their meaning on each backend).
        training: whether the caller trains; used by TensorFlow's ``"auto"`` only.

    Returns:
        ``(B, s*H, s*W, K*K)``; points outside the map contribute 0.
    """
    if _on_tensorflow():
        return _tf().similarity(query, key, kernel_size, up_factor, implementation,
                                training=training)
    _checks.check_implementation(implementation)
    query, key, kernel_size, up_factor = _prepare(
        query, "query", key, "key", kernel_size, up_factor, equal_last=True
    )
    module = _formulation(resolve_implementation(implementation, training))
    return module.similarity(query, key, kernel_size, up_factor)


def aggregate(weights, value, kernel_size=5, up_factor=2, implementation="auto",
              training=None):
    """Window aggregation ``out[b, i, j] = sum_n weights[b, i, j, n] * value[b, window_n]``.

    Args:
        weights: ``(B, s*H, s*W, K*K)`` mixing weights (usually a softmax).
        value: ``(B, H, W, C)`` low-resolution feature.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.

    Returns:
        ``(B, s*H, s*W, C)``; points outside the map contribute 0.
    """
    if _on_tensorflow():
        return _tf().aggregate(weights, value, kernel_size, up_factor, implementation,
                               training=training)
    _checks.check_implementation(implementation)
    weights, value, kernel_size, up_factor = _prepare(
        weights, "weights", value, "value", kernel_size, up_factor, equal_last=False
    )
    _checks.check_weights_channels(tuple(weights.shape), kernel_size)
    module = _formulation(resolve_implementation(implementation, training))
    return module.aggregate(weights, value, kernel_size, up_factor)


def sapa(query, key, value, kernel_size=5, up_factor=2, implementation="auto",
         training=None):
    """``aggregate(softmax(similarity(query, key)), value)``.

    The similarity and the softmax run in float32 when the inputs are float16 or
    bfloat16 (so large logits cannot overflow); the result has ``value``'s dtype.
    Padded window points take part in the softmax with similarity 0, as in the
    official implementation.
    """
    if _on_tensorflow():
        return _tf().sapa(query, key, value, kernel_size, up_factor, implementation,
                          training=training)
    _checks.check_implementation(implementation)
    query, key, kernel_size, up_factor = _prepare(
        query, "query", key, "key", kernel_size, up_factor, equal_last=True
    )
    value = keras.ops.convert_to_tensor(value)
    _checks.check_pair("query", tuple(query.shape), "value", tuple(value.shape), up_factor)
    if keras.backend.standardize_dtype(query.dtype) in _HALF_DTYPES:
        query = keras.ops.cast(query, "float32")
        key = keras.ops.cast(key, "float32")
    resolved = resolve_implementation(implementation, training)
    if resolved == "compiled":
        kernels = _backend_kernels()
        if kernels is not None and kernels.usable(query, key, value):
            return kernels.sapa(query, key, value, kernel_size, up_factor)
    module = _formulation(resolved)
    logits = module.similarity(query, key, kernel_size, up_factor)
    weights = keras.ops.softmax(logits, axis=-1)
    weights = keras.ops.cast(weights, value.dtype)
    return module.aggregate(weights, value, kernel_size, up_factor)


def _checked_at_run_time(high, high_name, low, low_name, up_factor):
    """``high``, made to fail at run time when its batch and spatial sizes are not
    those of ``low`` (times ``up_factor``) and were unknown when it was traced. Only
    TensorFlow graphs have such sizes; elsewhere ``high`` is returned unchanged."""
    if not _on_tensorflow():
        return high
    return _tf()._with_runtime_checks(high, high_name, low, low_name, up_factor)
