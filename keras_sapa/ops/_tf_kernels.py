"""SAPA's compiled kernels on TensorFlow: the custom op library ``custom_ops/`` builds,
its Python wrappers and gradients, and the facts the dispatch rule of
:mod:`keras_sapa.ops` asks of this backend.

``_sapa_ops.so`` is loaded through :mod:`._native` (the checks every backend shares:
disable switch, build record, TensorFlow version, CPU features) on the first call of
:func:`available`, never at import. The GPU kernels live in a second library,
``_sapa_ops_gpu.so`` (a thin adapter over the driver-API launcher and the NVRTC-built
kernel images beside it), loaded after the CPU one when a GPU is visible. At that first
use the launcher's own self-test runs every launch configuration it can choose on the GPU
against its float64 CPU reference (:mod:`._gpu_check`), then a tiny case of every op runs
through TensorFlow on the GPU and on the CPU and must agree (and must have run on the
GPU); a load failure or any disagreement gives one warning, and the compiled ops are then
not used at all, since TensorFlow would otherwise place them on the GPU.

SavedModels: a SavedModel traced with the compiled ops contains ``KerasSapa>...`` nodes.
To reload it, make the ops known first (:func:`keras_sapa.ops.load_compiled_library`),
then ``tf.saved_model.load``. Exports get the compiled ops only when asked for
(``use_implementation("compiled")`` or ``implementation="compiled"``).
"""

import os
import warnings

import tensorflow as tf

from keras_sapa.ops import _gpu_check
from keras_sapa.ops import _native
from keras_sapa.ops import _optable
from keras_sapa.ops._tf_builtin import in_xla_context

ENV_LIBRARY = "KERAS_SAPA_OPS_LIBRARY"
CPU_LIBRARY = "_sapa_ops.so"
GPU_LIBRARY = "_sapa_ops_gpu.so"
BUILD_INFO = "build_info.json"


def _python_name(op_name):
    """The Python wrapper TensorFlow generates for ``KerasSapa>SimilarityGrad``:
    ``keras_sapa_similarity_grad``."""
    return "keras_sapa" + "".join(f"_{c.lower()}" if c.isupper() else c for c in op_name)


# The ops this module wraps (other op families, SAPA-D's, are loaded by their own module).
_FAMILIES = ("similarity", "aggregate", "sapa")
_WRAPPERS = [_python_name(op.name) for op in _optable.OPS if op.family in _FAMILIES]
_loaded_modules = {}  # path -> module; a library is never dlopen'ed twice
_gpu = {"status": None}

# ------------------------------------------------------------------ facts for the dispatch
EAGER_BUILTIN = "patches"  # the builtin formulation of eager calls without the kernels


def traced(tensor=None):
    """Whether the op is being traced into a graph (which any route may export)."""
    return not tf.executing_eagerly()


def in_xla_trace():
    """Whether XLA compiles the graph being traced (the custom op cannot be in it)."""
    return in_xla_context()


def exporting():
    """None: TensorFlow has no public API telling an export from another trace."""
    return None


def library_path():
    """Path of the CPU library that will be loaded."""
    return os.environ.get(ENV_LIBRARY) or os.path.join(_native.LIB_DIR, CPU_LIBRARY)


def _load():
    """(op module, None) or (None, reason)."""
    lib_path = library_path()
    if not os.path.isfile(lib_path):
        return None, f"no library at {lib_path} (build it with `python custom_ops/build.py`)"
    info, reason = _native.read_build_info(
        os.path.join(os.path.dirname(lib_path), BUILD_INFO), "tensorflow", tf.__version__
    )
    if info is None:
        return None, reason
    real = os.path.realpath(lib_path)
    if real not in _loaded_modules:
        try:
            module = tf.load_op_library(real)
        except Exception as exc:  # noqa: BLE001 - any load failure means fall back
            text = str(exc).strip()
            return None, f"loading {lib_path} failed: {text.splitlines()[0] if text else exc!r}"
        missing = [name for name in _WRAPPERS if not hasattr(module, name)]
        if missing:
            return None, f"{lib_path} does not define the ops {missing}"
        _loaded_modules[real] = module
    module = _loaded_modules[real]
    _gpu["status"] = _try_load_gpu(lib_path)
    if _gpu["status"] == "loaded":
        problem = _gpu_self_test(module, os.path.dirname(lib_path))
        if problem is not None:
            _gpu["status"] = f"failed: {problem}"
            return None, f"the GPU kernels failed their first-use check: {problem}"
    return module, None


_library = _native.Library("TensorFlow", tf.autograph.experimental.do_not_convert(_load))


def _try_load_gpu(lib_path):
    gpu_path = os.path.join(os.path.dirname(lib_path), GPU_LIBRARY)
    if not os.path.isfile(gpu_path):
        return None
    try:
        if not tf.config.list_physical_devices("GPU"):
            return None
    except Exception:  # noqa: BLE001
        return None
    try:
        tf.load_library(os.path.realpath(gpu_path))
        return "loaded"
    except Exception as exc:  # noqa: BLE001
        warnings.warn(
            f"keras_sapa: the GPU kernels ({gpu_path}) failed to load ({exc}); the "
            "compiled ops will run on CPU.",
            RuntimeWarning,
            stacklevel=4,
        )
        return f"failed: {exc}"


def load_library():
    """The custom op module, loaded on first call (thread-safe), or None."""
    return _library.get()


def _self_test_results(module, device):
    """Every compiled op on a tiny case (B=1, 3x3 -> 6x6, d=5, C=4, K=3, s=2; SAPA-D: G=2,
    P=2, E=3, standard normal offsets) placed on ``device``; returns a list of (name,
    tensor)."""
    import numpy as np

    rng = np.random.default_rng(1234)
    high, low = (1, 6, 6), (1, 3, 3)
    shapes = [high + (5,), low + (5,), low + (4,), high + (4,)]  # q, k, v, g
    shapes += [high + (6,), low + (6,), high + (8,)]  # SAPA-D's q, k, offsets
    q, k, v, g, dq, dk, off = (
        tf.constant(rng.standard_normal(shape).astype(np.float32)) for shape in shapes
    )
    attrs = {"kernel_size": 3, "up_factor": 2}
    with tf.init_scope(), tf.device(device):
        sim = module.keras_sapa_similarity(q, k, **attrs)
        w = tf.nn.softmax(sim, axis=-1)
        out = module.keras_sapa_aggregate(w, v, **attrs)
        gw, gv = module.keras_sapa_aggregate_grad(g, w, v, **attrs)
        gq, gk = module.keras_sapa_similarity_grad(gw, q, k, **attrs)
        results = [
            ("similarity", sim),
            ("aggregate", out),
            ("aggregate_grad.weights", gw),
            ("aggregate_grad.value", gv),
            ("similarity_grad.query", gq),
            ("similarity_grad.key", gk),
        ]
        if hasattr(module, "keras_sapa_sapa"):
            fused, weights = module.keras_sapa_sapa(q, k, v, Tweights=tf.float32, **attrs)
            fq, fk, fv = module.keras_sapa_sapa_grad(g, q, k, v, weights, **attrs)
            results += [
                ("sapa", fused),
                ("sapa.weights", weights),
                ("sapa_grad.query", fq),
                ("sapa_grad.key", fk),
                ("sapa_grad.value", fv),
            ]
        if hasattr(module, "keras_sapa_sapa_deform"):
            deform = {"num_points": 2, "up_factor": 2, "groups": 2}
            out, weights = module.keras_sapa_sapa_deform(
                dq, dk, v, off, Tweights=tf.float32, **deform
            )
            grads = module.keras_sapa_sapa_deform_grad(g, dq, dk, v, off, weights, **deform)
            results += [("sapa_deform", out), ("sapa_deform.weights", weights)]
            results += [
                (f"sapa_deform_grad.{name}", grad)
                for name, grad in zip(("query", "key", "value", "offsets"), grads, strict=True)
            ]
    return results


def compare_self_test(gpu_results, cpu_results, rtol=1e-4, atol=1e-4):
    """None when every GPU result ran on a GPU and matches the CPU one, else why."""
    import numpy as np

    if len(gpu_results) != len(cpu_results):
        return "the GPU and CPU runs returned different numbers of results"
    for (name, got), (_, want) in zip(gpu_results, cpu_results, strict=True):
        device = getattr(got, "device", "") or ""
        if "GPU" not in device.upper():
            return f"{name} ran on {device or 'an unknown device'}, not on the GPU"
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            return f"{name} has shape {got.shape} on the GPU, {want.shape} on the CPU"
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            error = float(np.max(np.abs(got.astype(np.float64) - want)))
            return f"{name} differs from the CPU kernel (max abs error {error:.3g})"
    return None


def _gpu_self_test(module, lib_dir):
    """The launcher's self-test on the first GPU (:func:`._gpu_check.self_test`, the
    kernel images of ``lib_dir``), then the tiny case through TensorFlow on that GPU and on
    the CPU; None when everything agrees, else why."""
    _, problem = _gpu_check.self_test(lib_dir)
    if problem is not None:
        return problem
    try:
        gpu = _self_test_results(module, "/GPU:0")
        cpu = _self_test_results(module, "/CPU:0")
        return compare_self_test(gpu, cpu)
    except Exception as exc:  # noqa: BLE001 - any failure means the GPU path is unsafe
        text = str(exc).strip()
        return text.splitlines()[0] if text else repr(exc)


def gpu_op_usable():
    """True when the compiled ops run on a GPU here: a GPU is visible and the GPU kernel
    library loaded and passed its first-use check against the CPU kernels."""
    return load_library() is not None and _gpu["status"] == "loaded"


def layer_supports_jit(implementation="auto"):
    """The ``supports_jit`` of a SAPA layer with this ``implementation`` (read by Keras
    when a model is compiled, never by the layer's constructor).

    XLA cannot compile the custom op. So it is False for ``"compiled"``: Keras then runs
    the model without XLA (``jit_compile=True`` is turned off with Keras's warning)
    instead of failing inside XLA. For ``"auto"`` it is False only where the compiled GPU
    op runs (:func:`gpu_op_usable`): Keras's ``jit_compile="auto"`` turns XLA on whenever
    a GPU is visible, where the layer would take its ``xla`` formulation, whose backward
    holds K*K window stacks; declining XLA lets the default ``fit`` reach the fused
    kernels, at the cost of XLA fusion for the rest of the model. True everywhere else."""
    if implementation == "compiled":
        return False
    if implementation != "auto" or _native.disabled():
        return True
    if not tf.config.list_physical_devices("GPU"):
        return True  # no GPU: nothing to decide, and the library is not loaded for it
    return not gpu_op_usable()


def available():
    """True when the custom op library is loaded (loading it on first call)."""
    return load_library() is not None


def unavailable_reason():
    """Why the library is unavailable (None when it is available)."""
    return _library.reason()


def gpu_status():
    """None (no GPU library or no GPU), ``"loaded"``, or ``"failed: ..."``."""
    load_library()
    return _gpu["status"]


def _reset():
    """Forgets the load attempt, so the next call reloads (honouring the environment
    variables again). For tests; already-loaded libraries stay loaded."""
    _library.reset()
    _gpu["status"] = None


def _ops():
    module = load_library()
    if module is None:
        raise RuntimeError(
            f"the keras_sapa custom op library is not available ({unavailable_reason()})"
        )
    return module


def similarity(query, key, kernel_size, up_factor):
    """``KerasSapa>Similarity``: (B,sH,sW,d), (B,H,W,d) -> (B,sH,sW,K*K)."""
    return _ops().keras_sapa_similarity(
        query, key, kernel_size=int(kernel_size), up_factor=int(up_factor)
    )


def aggregate(weights, value, kernel_size, up_factor):
    """``KerasSapa>Aggregate``: (B,sH,sW,K*K), (B,H,W,C) -> (B,sH,sW,C)."""
    return _ops().keras_sapa_aggregate(
        weights, value, kernel_size=int(kernel_size), up_factor=int(up_factor)
    )


def fused_available():
    """True when the loaded library has the fused ``KerasSapa>Sapa`` op (libraries built
    before it existed still serve the four window ops)."""
    module = load_library()
    return module is not None and hasattr(module, "keras_sapa_sapa")


def usable(query, key, value):
    """Whether :func:`sapa` (the fused op, CPU and GPU kernels) serves these tensors of
    one dtype (the dispatch has checked that)."""
    del query, key, value
    return fused_available()


def _weights_dtype(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def sapa_with_weights(query, key, value, kernel_size, up_factor):
    """``KerasSapa>Sapa`` -> (output, weights): the fused forward and its softmax
    ``(B, sH, sW, K*K)`` (float32 for half, bfloat16 and float32 inputs, float64 for
    float64), which its gradient reuses. ``weights`` is not differentiable."""
    return _ops().keras_sapa_sapa(
        query,
        key,
        value,
        kernel_size=int(kernel_size),
        up_factor=int(up_factor),
        Tweights=_weights_dtype(tf.as_dtype(query.dtype)),
    )


def sapa(query, key, value, kernel_size, up_factor):
    """``KerasSapa>Sapa``: ``aggregate(softmax(similarity(query, key)), value)`` in one
    fused CPU pass; (B,sH,sW,d), (B,H,W,d), (B,H,W,C) -> (B,sH,sW,C). The logits and the
    softmax are computed in float32 for half and bfloat16 inputs."""
    return sapa_with_weights(query, key, value, kernel_size, up_factor)[0]


def sapa_grad(grad, query, key, value, weights, kernel_size, up_factor):
    """``KerasSapa>SapaGrad`` -> (grad_query, grad_key, grad_value)."""
    return _ops().keras_sapa_sapa_grad(
        grad,
        query,
        key,
        value,
        weights,
        kernel_size=int(kernel_size),
        up_factor=int(up_factor),
    )


def similarity_grad(grad, query, key, kernel_size, up_factor):
    """``KerasSapa>SimilarityGrad`` -> (grad_query, grad_key)."""
    return _ops().keras_sapa_similarity_grad(
        grad, query, key, kernel_size=int(kernel_size), up_factor=int(up_factor)
    )


def aggregate_grad(grad, weights, value, kernel_size, up_factor):
    """``KerasSapa>AggregateGrad`` -> (grad_weights, grad_value)."""
    return _ops().keras_sapa_aggregate_grad(
        grad, weights, value, kernel_size=int(kernel_size), up_factor=int(up_factor)
    )


# ---------------------------------------------------------------------------------------
# Gradients. The ops are built from three mutually adjoint window primitives (see
# custom_ops/sapa/cc/kernels/sapa_kernels.h): Dot, Gather and Scatter, with
#   Similarity(q, k) = Dot(q, k)           SimilarityGrad(g, q, k) = (Gather(g, k), Scatter(g, q))
#   Aggregate(w, v)  = Gather(w, v)        AggregateGrad(g, w, v)  = (Dot(g, v), Scatter(w, g))
# so the gradients of the gradient ops (second order) are compositions of the four ops.
# Registered at import (the registry only records names; no library is needed).


def _attrs(op):
    return op.get_attr("kernel_size"), op.get_attr("up_factor")


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _register_first_order_gradient(spec):
    """Registers ``spec``'s gradient as the op table states it: its gradient op takes
    the upstream gradient of the first output and the tensors ``gradient_inputs`` names
    (inputs or outputs of the forward op, e.g. the saved softmax ``weights``), with the
    forward's attributes; later outputs (that softmax) are not differentiable."""
    names = [t.name for t in spec.inputs + spec.outputs]

    @tf.RegisterGradient(spec.tf_name)
    def _gradient(op, grad, *unused_output_grads):
        if grad is None:
            return [None] * len(spec.inputs)
        tensors = dict(zip(names, list(op.inputs) + list(op.outputs), strict=True))
        return getattr(_ops(), _python_name(spec.gradient))(
            grad,
            *(tensors[name] for name in spec.gradient_inputs),
            **{a.name: op.get_attr(a.name) for a in spec.attrs},
        )


# Every forward op of the table, SAPA-D's included (the registry only records names).
for _spec in _optable.OPS:
    if _spec.gradient is not None:
        _register_first_order_gradient(_spec)


def _register_gradient_of_window_gradient(name, first, second):
    """Registers the gradient of the window gradient op ``name``, whose inputs are (g, a,
    b) and whose outputs are bilinear: ``first(up, g, a, b)`` gives the (g, b) parts of the
    vector-Jacobian product of its first output, ``second(up, g, a, b)`` the (g, a) parts
    of its second's (each a composition of the four window ops)."""

    @tf.RegisterGradient(name)
    def _gradient(op, up_first, up_second):
        kernel_size, up_factor = _attrs(op)
        g, a, b = op.inputs
        d_g = d_a = d_b = None
        if up_first is not None:
            d_g, d_b = first(up_first, g, a, b, kernel_size, up_factor)
        if up_second is not None:
            extra, d_a = second(up_second, g, a, b, kernel_size, up_factor)
            d_g = _add(d_g, extra)
        return d_g, d_a, d_b


# SimilarityGrad(g, q, k) = (Gather(g, k), Scatter(g, q)). Gather is bilinear: d g =
# Dot(up, k), d k = Scatter(g, up); Scatter(g, q): d g = Dot(q, up), d q = Gather(g, up).
_register_gradient_of_window_gradient(
    "KerasSapa>SimilarityGrad",
    lambda up, g, q, k, K, s: aggregate_grad(up, g, k, K, s),
    lambda up, g, q, k, K, s: (similarity(q, up, K, s), aggregate(g, up, K, s)),
)
# AggregateGrad(g, w, v) = (Dot(g, v), Scatter(w, g)). Dot: d g = Gather(up, v), d v =
# Scatter(up, g); Scatter(w, g): d g = Gather(w, up), d w = Dot(g, up).
_register_gradient_of_window_gradient(
    "KerasSapa>AggregateGrad",
    lambda up, g, w, v, K, s: similarity_grad(up, g, v, K, s),
    lambda up, g, w, v, K, s: (aggregate(w, up, K, s), similarity(g, up, K, s)),
)


def _unfused_sapa(query, key, value, kernel_size, up_factor):
    logits = similarity(query, key, kernel_size, up_factor)
    weights = tf.cast(
        tf.nn.softmax(tf.cast(logits, _weights_dtype(logits.dtype)), axis=-1), value.dtype
    )
    return aggregate(weights, value, kernel_size, up_factor)


@tf.RegisterGradient("KerasSapa>SapaGrad")
def _sapa_grad_grad(op, up_query, up_key, up_value):
    # Second order: SapaGrad(g, q, k, v, w) is the vector-Jacobian product of the
    # composition of the window ops (whose gradients of gradients are registered above),
    # so differentiate that composition's first-order gradient. w depends on (q, k) only
    # through the forward, so it gets no gradient of its own.
    kernel_size, up_factor = _attrs(op)
    grad, query, key, value, _ = op.inputs
    compute = _weights_dtype(grad.dtype)
    inputs = [tf.cast(t, compute) for t in (grad, query, key, value)]
    ups = [
        tf.zeros_like(t) if u is None else tf.cast(u, compute)
        for t, u in zip(inputs[1:], (up_query, up_key, up_value), strict=True)
    ]
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs[1:])
            out = _unfused_sapa(*inputs[1:], kernel_size, up_factor)
        first = inner.gradient(out, inputs[1:], output_gradients=inputs[0])
    second = outer.gradient(first, inputs, output_gradients=ups)
    second = [tf.zeros_like(t) if d is None else d for t, d in zip(inputs, second, strict=True)]
    return [tf.cast(d, t.dtype) for d, t in zip(second, op.inputs[:4], strict=True)] + [None]
