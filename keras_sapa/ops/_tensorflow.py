"""TensorFlow implementations of the SAPA ops and their dispatch (the public docs of
the ops live in :mod:`keras_sapa.ops`).

    similarity(query, key)      -> (B, sH, sW, K*K)
    aggregate(weights, value)   -> (B, sH, sW, C)
    sapa(query, key, value)     -> aggregate(softmax(similarity(query, key)), value)

Semantics are those of ``shared/SAPA_SPEC.md``: window of K x K low-resolution points
around ``(i // s, j // s)``, row-major, zero padding *inside* the softmax.

``implementation``:

- ``"patches"``: ``tf.image.extract_patches`` + einsum (K*K copies of key/value).
- ``"xla"``: pad and shifted slices, builtin ops only; compiles and trains under
  ``jit_compile=True`` and converts to ONNX and LiteRT builtins.
- ``"compiled"``: the fused C++/CUDA custom op from ``custom_ops/`` (no window
  tensors); raises ``RuntimeError`` when the library is not available.
- ``"auto"``: chosen when the op is called (for a traced function: when it is traced),
  by :func:`resolve_implementation`:

  1. what :func:`use_implementation` set in this thread, if anything;
  2. in a traced graph (``tf.function``, Keras's ``predict_function``, an export) that
     does not train (``training`` is not ``True``): ``"xla"``, builtin ops only. Such a
     graph may be written to a SavedModel by any route (``model.export``,
     ``tf.saved_model.save(model)``, or a concrete function traced earlier and passed
     as a signature), and then loads without the library;
  3. in a training graph compiled by XLA (``jit_compile=True``): ``"xla"``;
  4. otherwise (eager calls, training graphs): ``"compiled"`` when the library loaded,
     else ``"patches"`` eagerly and ``"xla"`` in a graph.

  So ``model.fit`` uses the compiled op's fast backward, ``model.predict`` and every
  export use builtin ops. A graph that has been traced keeps its choice: after changing
  the implementation (or ``KERAS_SAPA_DISABLE_COMPILED``) for a model Keras has already
  run, call :func:`keras_sapa.ops.set_implementation`, which drops Keras's traced
  functions.
"""

import contextlib
import os
import threading

import numpy as np
import tensorflow as tf

from keras_sapa.ops import _checks
from keras_sapa.ops import _tf_formulations

__all__ = [
    "similarity",
    "aggregate",
    "sapa",
    "compiled_available",
    "load_compiled_library",
    "resolve_implementation",
    "use_implementation",
]

_HALF_DTYPES = (tf.float16, tf.bfloat16)
_override = threading.local()


def _compiled_module():
    # Imported lazily: importing keras_sapa never touches the shared library.
    from keras_sapa.ops import _compiled

    return _compiled


def compiled_available():
    """True when the compiled custom op library is loaded and usable.

    False when it was not built, was built for another TensorFlow version, failed to
    load, or the environment variable ``KERAS_SAPA_DISABLE_COMPILED=1`` is set (read at
    every call, so at the next trace).
    """
    if os.environ.get("KERAS_SAPA_DISABLE_COMPILED", "") not in ("", "0"):
        return False
    return _compiled_module().available()


def load_compiled_library():
    """Loads the compiled custom op library now (it is otherwise loaded on first use)
    and returns True when it is available.

    Call it before ``tf.saved_model.load`` of a SavedModel that was exported with the
    compiled op: TensorFlow must know the ``KerasSapa>...`` ops to rebuild its graph.
    """
    return compiled_available()


def in_xla_context():
    """True while tracing a function that XLA compiles (``tf.function(jit_compile=True)``,
    including functions nested in one), where the compiled custom op cannot run.

    TensorFlow has no public API for this; ``tf.__internal__.get_enclosing_xla_context``
    (exported for Keras's own use) is the one non-public call of the package, confined
    to this function and pinned by ``tests/test_ops.py::test_in_xla_context_tracks_tensorflow``.
    Should TensorFlow remove it, every graph counts as XLA-compiled: the builtin path,
    which is always correct.
    """
    if tf.executing_eagerly():
        return False
    internal = getattr(tf, "__internal__", None)
    get_context = getattr(internal, "get_enclosing_xla_context", None)
    if get_context is None:  # pragma: no cover - depends on the TensorFlow version
        return True
    return get_context() is not None


def _is_training(training):
    """Only a Python or NumPy ``True`` counts; ``None`` and tensors do not."""
    return isinstance(training, (bool, np.bool_)) and bool(training)


@contextlib.contextmanager
def use_implementation(implementation):
    """Within this context, ``implementation="auto"`` resolves to ``implementation``.

    The choice is made when an op is called, which for a traced function is when it
    is traced: functions traced before the context keep their choice. For a Keras model
    that has already run ``fit``/``predict``/``evaluate``, use
    :func:`keras_sapa.ops.set_implementation`.

    Use ``use_implementation("compiled")`` around an export (``model.export``,
    ``tf.saved_model.save``, or the tracing of a concrete function) to keep the compiled
    op in the SavedModel: it then loads only after :func:`load_compiled_library`.

    The setting is per thread: functions traced in other threads (the replicas of a
    ``tf.distribute`` strategy, for example) do not see it.
    """
    _checks.check_implementation(implementation)
    previous = getattr(_override, "value", None)
    _override.value = None if implementation == "auto" else implementation
    try:
        yield
    finally:
        _override.value = previous


def resolve_implementation(implementation="auto", training=None):
    """The concrete implementation (``"patches"``, ``"xla"`` or ``"compiled"``) that
    ``implementation`` stands for in the current context.

    Args:
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.
        training: whether the caller trains (a Keras layer's ``training`` argument).
            In a traced graph, ``"auto"`` uses the compiled op only when it is
            ``True``; eagerly it makes no difference.

    Raises:
        RuntimeError: ``"compiled"`` is asked for (directly or through
            :func:`use_implementation`) and the library is not available.
    """
    _checks.check_implementation(implementation)
    if implementation == "auto":
        override = getattr(_override, "value", None)
        if override is not None:
            implementation = override
        else:
            eager = tf.executing_eagerly()
            if not eager and not _is_training(training):
                return "xla"
            if not eager and in_xla_context():
                return "xla"
            if compiled_available():
                return "compiled"
            return "patches" if eager else "xla"
    if implementation == "compiled" and not compiled_available():
        reason = "disabled by KERAS_SAPA_DISABLE_COMPILED"
        if os.environ.get("KERAS_SAPA_DISABLE_COMPILED", "") in ("", "0"):
            reason = _compiled_module().unavailable_reason()
        raise RuntimeError(
            "implementation='compiled' was requested but the keras_sapa custom op "
            f"library is not available ({reason}). Build it with "
            "`python custom_ops/build.py`, or use implementation='auto'."
        )
    return implementation


def _static_checks(high_name, high, low_name, low, kernel_size, up_factor, equal_last):
    kernel_size = _checks.check_kernel_size(kernel_size)
    up_factor = _checks.check_up_factor(up_factor)
    _checks.check_pair(
        high_name, high.shape, low_name, low.shape, up_factor,
        last_dim="equal" if equal_last else None,
    )
    return kernel_size, up_factor


def _with_runtime_checks(high, high_name, low, low_name, up_factor):
    asserts = _checks.runtime_shape_asserts(high, high_name, low, low_name, up_factor)
    if not asserts:
        return high
    with tf.control_dependencies(asserts):
        return tf.identity(high)


def _prepare(high, high_name, low, low_name, kernel_size, up_factor, equal_last):
    high = tf.convert_to_tensor(high)
    low = tf.convert_to_tensor(low, dtype_hint=high.dtype)
    kernel_size, up_factor = _static_checks(
        high_name, high, low_name, low, kernel_size, up_factor, equal_last
    )
    if high.dtype != low.dtype:
        raise ValueError(
            f"`{high_name}` and `{low_name}` must have the same dtype. Received: "
            f"{high_name}.dtype={high.dtype.name}, {low_name}.dtype={low.dtype.name}"
        )
    high = _with_runtime_checks(high, high_name, low, low_name, up_factor)
    return high, low, kernel_size, up_factor


def similarity(query, key, kernel_size=5, up_factor=2, implementation="auto",
               training=None):
    """TensorFlow side of :func:`keras_sapa.ops.similarity` (same arguments and
    result). ``training``: in a traced graph, ``"auto"`` uses the compiled op only when
    it is ``True``; see :func:`resolve_implementation`."""
    implementation = _checks.check_implementation(implementation)
    query, key, kernel_size, up_factor = _prepare(
        query, "query", key, "key", kernel_size, up_factor, equal_last=True
    )
    impl = resolve_implementation(implementation, training)
    if impl == "compiled":
        return _compiled_module().similarity(query, key, kernel_size, up_factor)
    if impl == "xla":
        return _tf_formulations.similarity_xla(
            query, key, kernel_size, up_factor, fused=in_xla_context()
        )
    return _tf_formulations.similarity_patches(query, key, kernel_size, up_factor)


def aggregate(weights, value, kernel_size=5, up_factor=2, implementation="auto",
              training=None):
    """TensorFlow side of :func:`keras_sapa.ops.aggregate` (same arguments and
    result). ``training``: in a traced graph, ``"auto"`` uses the compiled op only when
    it is ``True``; see :func:`resolve_implementation`."""
    implementation = _checks.check_implementation(implementation)
    weights, value, kernel_size, up_factor = _prepare(
        weights, "weights", value, "value", kernel_size, up_factor, equal_last=False
    )
    _checks.check_weights_channels(weights.shape, kernel_size)
    impl = resolve_implementation(implementation, training)
    if impl == "compiled":
        return _compiled_module().aggregate(weights, value, kernel_size, up_factor)
    if impl == "xla":
        return _tf_formulations.aggregate_xla(
            weights, value, kernel_size, up_factor, fused=in_xla_context()
        )
    return _tf_formulations.aggregate_patches(weights, value, kernel_size, up_factor)


def sapa(query, key, value, kernel_size=5, up_factor=2, implementation="auto",
         training=None):
    """``aggregate(softmax(similarity(query, key)), value)``.

    The similarity and the softmax run in float32 when the inputs are float16 or
    bfloat16 (so large logits cannot overflow); the result has ``value``'s dtype.
    Padded window points take part in the softmax with similarity 0, as in the
    official implementation.

    Args:
        query: ``(B, s*H, s*W, d)``; key: ``(B, H, W, d)``; value: ``(B, H, W, C)``.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.
        training: whether the caller trains (a Keras layer passes its ``training``
            argument). In a traced graph, ``"auto"`` uses the compiled op only when
            it is ``True``; see :func:`resolve_implementation`.

    Returns:
        ``(B, s*H, s*W, C)`` with ``value``'s dtype.
    """
    implementation = _checks.check_implementation(implementation)
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key, dtype_hint=query.dtype)
    value = tf.convert_to_tensor(value)
    kernel_size, up_factor = _static_checks(
        "query", query, "key", key, kernel_size, up_factor, True
    )
    _checks.check_pair("query", query.shape, "value", value.shape, up_factor)
    # One choice for both halves (similarity and aggregation).
    impl = resolve_implementation(implementation, training)
    if impl == "compiled" and _compiled_module().fused_usable(query, key, value):
        # The fused op (KerasSapa>Sapa): one pass per tile of anchors on CPU, one launch
        # on GPU; float32 logits and softmax for half inputs, the softmax kept for the
        # backward.
        return _compiled_module().sapa(query, key, value, kernel_size, up_factor)
    if query.dtype in _HALF_DTYPES:
        query = tf.cast(query, tf.float32)
        key = tf.cast(key, tf.float32)
    logits = similarity(query, key, kernel_size, up_factor, impl)
    weights = tf.nn.softmax(logits, axis=-1)
    weights = tf.cast(weights, value.dtype)
    return aggregate(weights, value, kernel_size, up_factor, impl)

