"""Loader and Python wrappers of the compiled SAPA custom ops (``custom_ops/``).

The library is loaded lazily, on the first call of :func:`available` (which the ops'
dispatch makes on first use), never at import: importing ``keras_sapa`` or loading a
model never requires it. Before loading, the TensorFlow version recorded by the build
(``keras_sapa/_lib/build_info.json``) is compared with the running one, since a custom op
library only works with the TensorFlow it was compiled against.

A missing, stale or broken library gives exactly one ``RuntimeWarning`` and
``available()`` is then False; :func:`unavailable_reason` says why, and the ops use a pure
TensorFlow path (``implementation="auto"``) or raise (``implementation="compiled"``).

Environment variables:

- ``KERAS_SAPA_OPS_LIBRARY``: path of the CPU library to load instead of
  ``keras_sapa/_lib/_sapa_ops.so``; its ``build_info.json`` is looked up beside it.
- ``KERAS_SAPA_DISABLE_COMPILED=1``: never use the library (handled in
  :mod:`keras_sapa.ops`).

The library also records the CPU features its build used (``cpu_features`` in
``build_info.json``, e.g. ``avx2``, ``fma``); a library copied to a CPU that lacks one is
not loaded (it would die with SIGILL): one warning, and the pure path.

The GPU kernels live in a second library, ``_sapa_ops_gpu.so`` (a thin TensorFlow adapter
over the driver-API launcher and the NVRTC-built kernel images beside it), loaded after
the CPU one when a GPU is visible. At that first use a tiny case runs on the GPU and on
the CPU and must agree (and must have run on the GPU); a load failure or any
disagreement gives one warning, and the compiled ops are then not used at all (the pure
TensorFlow path runs), since TensorFlow would otherwise place them on the GPU.
:func:`gpu_op_usable` says whether the GPU kernels passed.

SavedModels: a SavedModel traced with the compiled ops contains ``KerasSapa>...`` nodes.
To reload it, make the ops known first (``keras_sapa.ops._compiled.load_library()`` or any
call that resolves ``implementation="compiled"``), then ``tf.saved_model.load``. Exports
get the compiled ops only when asked for (``use_implementation("compiled")`` or
``implementation="compiled"``): ``"auto"`` traces builtin ops for a SavedModel.
"""

import json
import os
import threading
import warnings

import tensorflow as tf

ENV_LIBRARY = "KERAS_SAPA_OPS_LIBRARY"
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lib")
CPU_LIBRARY = "_sapa_ops.so"
GPU_LIBRARY = "_sapa_ops_gpu.so"
BUILD_INFO = "build_info.json"
OP_NAMES = (
    "KerasSapa>Similarity",
    "KerasSapa>SimilarityGrad",
    "KerasSapa>Aggregate",
    "KerasSapa>AggregateGrad",
)
_WRAPPERS = (
    "keras_sapa_similarity",
    "keras_sapa_similarity_grad",
    "keras_sapa_aggregate",
    "keras_sapa_aggregate_grad",
)

_lock = threading.RLock()
_state = {"tried": False, "module": None, "reason": None, "gpu": None}
CPUINFO = "/proc/cpuinfo"  # where the running CPU's features are read (Linux)
_loaded_modules = {}  # path -> module; a library is never dlopen'ed twice


def library_path():
    """Path of the CPU library that will be loaded."""
    return os.environ.get(ENV_LIBRARY) or os.path.join(LIB_DIR, CPU_LIBRARY)


def _read_build_info(lib_path):
    info_path = os.path.join(os.path.dirname(lib_path), BUILD_INFO)
    if not os.path.isfile(info_path):
        return None, f"{info_path} is missing, so the TensorFlow version of the build is unknown"
    try:
        with open(info_path) as f:
            info = json.load(f)
        version = info["tensorflow_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{info_path} is unreadable ({exc!r})"
    return info, None if isinstance(version, str) else f"{info_path} is malformed"


def _try_load(lib_path):
    """Returns (module, None) or (None, reason)."""
    if not os.path.isfile(lib_path):
        return None, (
            f"no library at {lib_path} (build it with `python custom_ops/build.py`)"
        )
    info, problem = _read_build_info(lib_path)
    if problem:
        return None, problem
    if info["tensorflow_version"] != tf.__version__:
        return None, (
            f"the library was built for TensorFlow {info['tensorflow_version']} but "
            f"TensorFlow {tf.__version__} is running (rebuild with "
            "`python custom_ops/build.py`)"
        )
    lacking = missing_cpu_features(info.get("cpu_features") or [])
    if lacking:
        return None, (
            f"the library was built for CPU features {sorted(lacking)} that this CPU "
            "lacks (rebuild here with `python custom_ops/build.py`, or build a portable "
            'library with KERAS_SAPA_CPU_FLAGS="")'
        )
    real = os.path.realpath(lib_path)
    if real in _loaded_modules:
        return _loaded_modules[real], None
    try:
        module = tf.load_op_library(real)
    except Exception as exc:  # noqa: BLE001 - any load failure means fall back
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return None, f"loading {lib_path} failed: {first_line}"
    missing = [name for name in _WRAPPERS if not hasattr(module, name)]
    if missing:
        return None, f"{lib_path} does not define the ops {missing}"
    _loaded_modules[real] = module
    return module, None


def cpu_features():
    """The running CPU's feature flags (``/proc/cpuinfo`` names such as ``avx2``), or
    None where they cannot be read (not Linux)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_cpu_features(required):
    """The features in ``required`` (recorded by the build) that the running CPU lacks.
    Where the CPU's features cannot be read, a library that needs any is not trusted:
    the whole list is returned."""
    required = [str(feature) for feature in required]
    if not required:
        return []
    have = cpu_features()
    if have is None:
        return required
    return [feature for feature in required if feature not in have]


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


@tf.autograph.experimental.do_not_convert
def load_library():
    """Loads the library once (thread-safe) and returns its op module or None.

    The first failure emits one ``RuntimeWarning``; later calls return None silently.
    """
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            lib_path = library_path()
            module, reason = _try_load(lib_path)
            _state["module"], _state["reason"] = module, reason
            if module is None:
                warnings.warn(
                    f"keras_sapa: the compiled SAPA ops are unavailable ({reason}); "
                    "using the pure TensorFlow implementation.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            else:
                _state["gpu"] = _try_load_gpu(lib_path)
                if _state["gpu"] == "loaded":
                    problem = _gpu_self_test(module)
                    if problem is not None:
                        _state["gpu"] = f"failed: {problem}"
                        _state["module"] = None
                        _state["reason"] = (
                            f"the GPU kernels failed their first-use check: {problem}"
                        )
                        warnings.warn(
                            f"keras_sapa: {_state['reason']}; the compiled ops are disabled "
                            "and the pure TensorFlow implementation is used.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
        return _state["module"]


def _self_test_results(module, device):
    """Every compiled op on a tiny case (B=1, 3x3 -> 6x6, d=5, C=4, K=3, s=2) placed on
    ``device``; returns a list of (name, tensor)."""
    import numpy as np

    rng = np.random.default_rng(1234)
    q, k, v, g = (tf.constant(rng.standard_normal(shape).astype(np.float32))
                  for shape in ((1, 6, 6, 5), (1, 3, 3, 5), (1, 3, 3, 4), (1, 6, 6, 4)))
    attrs = {"kernel_size": 3, "up_factor": 2}
    with tf.init_scope(), tf.device(device):
        sim = module.keras_sapa_similarity(q, k, **attrs)
        w = tf.nn.softmax(sim, axis=-1)
        out = module.keras_sapa_aggregate(w, v, **attrs)
        gw, gv = module.keras_sapa_aggregate_grad(g, w, v, **attrs)
        gq, gk = module.keras_sapa_similarity_grad(gw, q, k, **attrs)
        results = [("similarity", sim), ("aggregate", out), ("aggregate_grad.weights", gw),
                   ("aggregate_grad.value", gv), ("similarity_grad.query", gq),
                   ("similarity_grad.key", gk)]
        if hasattr(module, "keras_sapa_sapa"):
            fused, weights = module.keras_sapa_sapa(q, k, v, Tweights=tf.float32, **attrs)
            fq, fk, fv = module.keras_sapa_sapa_grad(g, q, k, v, weights, **attrs)
            results += [("sapa", fused), ("sapa.weights", weights), ("sapa_grad.query", fq),
                        ("sapa_grad.key", fk), ("sapa_grad.value", fv)]
    return results


def compare_self_test(gpu_results, cpu_results, rtol=1e-4, atol=1e-4):
    """None when every GPU result ran on a GPU and matches the CPU one, else why."""
    import numpy as np

    if len(gpu_results) != len(cpu_results):
        return "the GPU and CPU runs returned different numbers of results"
    for (name, got), (_, want) in zip(gpu_results, cpu_results):
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


def _gpu_self_test(module):
    """Runs the tiny case on the first GPU and on the CPU; None when they agree."""
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
    return load_library() is not None and _state["gpu"] == "loaded"


def layer_supports_jit(implementation="auto"):
    """The value for a SAPA layer's ``supports_jit``.

    Keras's ``compile(jit_compile="auto")`` turns XLA on whenever a GPU is visible and
    every layer's ``supports_jit`` is True; inside XLA the layer must use its ``xla``
    formulation (the custom op cannot be compiled), whose backward holds K*K window
    stacks. So this is False when the layer would run the compiled GPU op
    (``implementation`` ``"auto"`` or ``"compiled"`` and :func:`gpu_op_usable`): the
    default ``fit`` then runs without XLA and reaches the fused kernels. Trade-off: the
    rest of the model loses XLA fusion as well, and an explicit ``jit_compile=True`` is
    turned off by Keras with a warning. True everywhere else."""
    if implementation not in ("auto", "compiled"):
        return True
    if os.environ.get("KERAS_SAPA_DISABLE_COMPILED", "") not in ("", "0"):
        return True
    if not tf.config.list_physical_devices("GPU"):
        return True  # no GPU: nothing to decide, and the library is not loaded for it
    return not gpu_op_usable()


def available():
    """True when the custom op library is loaded (loading it on first call)."""
    return load_library() is not None


def unavailable_reason():
    """Why the library is unavailable (None when it is available)."""
    load_library()
    return _state["reason"]


def gpu_status():
    """None (no GPU library or no GPU), ``"loaded"``, or ``"failed: ..."``."""
    load_library()
    return _state["gpu"]


def _reset():
    """Forgets the load attempt, so the next call reloads (honouring the environment
    variables again). For tests; already-loaded libraries stay loaded."""
    with _lock:
        _state.update(tried=False, module=None, reason=None, gpu=None)


def _ops():
    module = load_library()
    if module is None:
        raise RuntimeError(
            f"the keras_sapa custom op library is not available ({_state['reason']})"
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


def fused_usable(query, key, value):
    """Whether :func:`sapa` (the fused op) can serve these tensors: the library has it
    and the three dtypes agree. The GPU library registers GPU kernels for it as well
    (``custom_ops/sapa/cc/kernels/sapa_kernels_gpu.cc``)."""
    return fused_available() and query.dtype == key.dtype == value.dtype


def _weights_dtype(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def sapa_with_weights(query, key, value, kernel_size, up_factor):
    """``KerasSapa>Sapa`` -> (output, weights): the fused forward and its softmax
    ``(B, sH, sW, K*K)`` (float32 for half, bfloat16 and float32 inputs, float64 for
    float64), which its gradient reuses. ``weights`` is not differentiable."""
    return _ops().keras_sapa_sapa(
        query, key, value, kernel_size=int(kernel_size), up_factor=int(up_factor),
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
        grad, query, key, value, weights, kernel_size=int(kernel_size),
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


@tf.RegisterGradient("KerasSapa>Similarity")
def _similarity_grad(op, grad):
    kernel_size, up_factor = _attrs(op)
    query, key = op.inputs
    grad_query, grad_key = similarity_grad(grad, query, key, kernel_size, up_factor)
    return grad_query, grad_key


@tf.RegisterGradient("KerasSapa>Aggregate")
def _aggregate_grad(op, grad):
    kernel_size, up_factor = _attrs(op)
    weights, value = op.inputs
    grad_weights, grad_value = aggregate_grad(grad, weights, value, kernel_size, up_factor)
    return grad_weights, grad_value


@tf.RegisterGradient("KerasSapa>SimilarityGrad")
def _similarity_grad_grad(op, up_query, up_key):
    # Outputs: grad_query = Gather(g, k), grad_key = Scatter(g, q).
    kernel_size, up_factor = _attrs(op)
    g, query, key = op.inputs
    d_g = d_query = d_key = None
    if up_query is not None:
        # Gather(g, k) is bilinear: d g = Dot(up_q, k), d k = Scatter(g, up_q).
        d_g, d_key = aggregate_grad(up_query, g, key, kernel_size, up_factor)
    if up_key is not None:
        # Scatter(g, q): d g = Dot(q, up_k), d q = Gather(g, up_k).
        d_g = _add(d_g, similarity(query, up_key, kernel_size, up_factor))
        d_query = aggregate(g, up_key, kernel_size, up_factor)
    return d_g, d_query, d_key


@tf.RegisterGradient("KerasSapa>AggregateGrad")
def _aggregate_grad_grad(op, up_weights, up_value):
    # Outputs: grad_weights = Dot(g, v), grad_value = Scatter(w, g).
    kernel_size, up_factor = _attrs(op)
    g, weights, value = op.inputs
    d_g = d_weights = d_value = None
    if up_weights is not None:
        # Dot(g, v): d g = Gather(up_w, v), d v = Scatter(up_w, g).
        d_g, d_value = similarity_grad(up_weights, g, value, kernel_size, up_factor)
    if up_value is not None:
        # Scatter(w, g): d w = Dot(g, up_v), d g = Gather(w, up_v).
        d_weights = similarity(g, up_value, kernel_size, up_factor)
        d_g = _add(d_g, aggregate(weights, up_value, kernel_size, up_factor))
    return d_g, d_weights, d_value


@tf.RegisterGradient("KerasSapa>Sapa")
def _sapa_grad(op, grad, unused_grad_weights):
    # The weights output is the saved softmax, not a differentiable result.
    del unused_grad_weights
    kernel_size, up_factor = _attrs(op)
    query, key, value = op.inputs
    return sapa_grad(grad, query, key, value, op.outputs[1], kernel_size, up_factor)


def _unfused_sapa(query, key, value, kernel_size, up_factor):
    logits = similarity(query, key, kernel_size, up_factor)
    weights = tf.cast(tf.nn.softmax(tf.cast(logits, _weights_dtype(logits.dtype)), axis=-1),
                      value.dtype)
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
    ups = [tf.zeros_like(t) if u is None else tf.cast(u, compute)
           for t, u in zip(inputs[1:], (up_query, up_key, up_value))]
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs[1:])
            out = _unfused_sapa(*inputs[1:], kernel_size, up_factor)
        first = inner.gradient(out, inputs[1:], output_gradients=inputs[0])
    second = outer.gradient(first, inputs, output_gradients=ups)
    second = [tf.zeros_like(t) if d is None else d for t, d in zip(inputs, second)]
    return [tf.cast(d, t.dtype) for d, t in zip(second, op.inputs[:4])] + [None]
