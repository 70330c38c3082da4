"""TensorFlow implementations of the SAPA ops and their dispatch (moved from
``keras_sapa/ops/__init__.py``; the public docs live there).

Functional SAPA ops (channels last), with a choice of implementation.

    similarity(query, key)      -> (B, sH, sW, K*K)
    aggregate(weights, value)   -> (B, sH, sW, C)
    sapa(query, key, value)     -> aggregate(softmax(similarity(query, key)), value)

Semantics are those of ``shared/SAPA_SPEC.md``: window of K x K low-resolution points
around ``(i // s, j // s)``, row-major, zero padding *inside* the softmax.

``implementation``:

- ``"patches"``: ``tf.image.extract_patches`` + einsum (K*K copies of key/value).
- ``"xla"``: pad and shifted slices, builtin ops only; compiles and trains under
  ``jit_compile=True`` and exports portable SavedModels.
- ``"compiled"``: the fused C++/CUDA custom op from ``custom_ops/`` (no window
  tensors); raises ``RuntimeError`` when the library is not available.
- ``"auto"``: what :func:`use_implementation` set, if anything; else ``"xla"`` inside
  an XLA-compiled function and while a SavedModel is being traced (``model.export``,
  ``tf.saved_model.save``), so that exports hold builtin ops only and load without the
  library; else ``"compiled"`` when the library loaded, else ``"patches"``.
"""

import contextlib
import os
import sys
import threading

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
    load, or the environment variable ``KERAS_SAPA_DISABLE_COMPILED=1`` is set.
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
    """True while tracing inside ``tf.function(jit_compile=True)`` (or XLA rewrite)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private API moved
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


_EXPORT_MODULE_PREFIX = "keras.src.export"


def in_export_trace():
    """True while a function is traced to be written to a SavedModel: inside
    ``tf.saved_model.save``, or called from Keras's export code (``model.export``
    traces its endpoints before it saves them)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover - private API moved
        save_context = None
    if save_context is not None and save_context.in_save_context():
        return True
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(_EXPORT_MODULE_PREFIX):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def use_implementation(implementation):
    """Within this context, ``implementation="auto"`` resolves to ``implementation``.

    Exports already use the builtin-op ``"xla"`` path by themselves; use
    ``use_implementation("compiled")`` around an export to keep the compiled op in the
    SavedModel (it then loads only after :func:`load_compiled_library`).

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


def resolve_implementation(implementation="auto"):
    """The concrete implementation (``"patches"``, ``"xla"`` or ``"compiled"``) that
    ``implementation`` stands for in the current context."""
    _checks.check_implementation(implementation)
    if implementation == "auto":
        override = getattr(_override, "value", None)
        if override is not None:
            implementation = override
        elif in_xla_context() or in_export_trace():
            return "xla"
        elif compiled_available():
            return "compiled"
        else:
            return "patches"
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


def similarity(query, key, kernel_size=5, up_factor=2, implementation="auto"):
    """Window similarity ``S[b, i, j, n] = <query[b, i, j], key[b, i//s + a, j//s + b']>``.

    Args:
        query: ``(B, s*H, s*W, d)`` high-resolution query.
        key: ``(B, H, W, d)`` low-resolution key.
        kernel_size: odd window size K.
        up_factor: integer upsampling factor s.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``.

    Returns:
        ``(B, s*H, s*W, K*K)``; points outside the map contribute 0.
    """
    implementation = _checks.check_implementation(implementation)
    query, key, kernel_size, up_factor = _prepare(
        query, "query", key, "key", kernel_size, up_factor, equal_last=True
    )
    impl = resolve_implementation(implementation)
    if impl == "compiled":
        return _compiled_module().similarity(query, key, kernel_size, up_factor)
    if impl == "xla":
        return _tf_formulations.similarity_xla(query, key, kernel_size, up_factor)
    return _tf_formulations.similarity_patches(query, key, kernel_size, up_factor)


def aggregate(weights, value, kernel_size=5, up_factor=2, implementation="auto"):
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
    implementation = _checks.check_implementation(implementation)
    weights, value, kernel_size, up_factor = _prepare(
        weights, "weights", value, "value", kernel_size, up_factor, equal_last=False
    )
    _checks.check_weights_channels(weights.shape, kernel_size)
    impl = resolve_implementation(implementation)
    if impl == "compiled":
        return _compiled_module().aggregate(weights, value, kernel_size, up_factor)
    if impl == "xla":
        return _tf_formulations.aggregate_xla(weights, value, kernel_size, up_factor)
    return _tf_formulations.aggregate_patches(weights, value, kernel_size, up_factor)


def sapa(query, key, value, kernel_size=5, up_factor=2, implementation="auto"):
    """``aggregate(softmax(similarity(query, key)), value)``.

    The similarity and the softmax run in float32 when the inputs are float16 or
    bfloat16 (so large logits cannot overflow); the result has ``value``'s dtype.
    Padded window points take part in the softmax with similarity 0, as in the
    official implementation.
    """
    implementation = _checks.check_implementation(implementation)
    query = tf.convert_to_tensor(query)
    key = tf.convert_to_tensor(key, dtype_hint=query.dtype)
    value = tf.convert_to_tensor(value)
    _static_checks("query", query, "key", key, kernel_size, up_factor, True)
    _checks.check_pair(
        "query", query.shape, "value", value.shape, _checks.check_up_factor(up_factor)
    )
    if query.dtype in _HALF_DTYPES:
        query = tf.cast(query, tf.float32)
        key = tf.cast(key, tf.float32)
    logits = similarity(query, key, kernel_size, up_factor, implementation)
    weights = tf.nn.softmax(logits, axis=-1)
    weights = tf.cast(weights, value.dtype)
    return aggregate(weights, value, kernel_size, up_factor, implementation)
