"""The compiled kernels bound to JAX (XLA FFI) and PyTorch (torch.library), against the
float64 NumPy loop reference (tests/reference.py).

Every check runs in ONE worker process per framework (this file run as a script:
``python tests/test_jax_torch_kernels.py <jax|torch>``, both started together on first
use) with its own ``KERAS_BACKEND``, so neither framework, nor JAX's x64 mode, nor the 2
forced host devices leak into the TensorFlow test session. A worker runs its groups of
checks in order (numerics, Keras, data parallelism, CUDA registration, and last the
fallbacks, which reset the loader) and prints one JSON line of measured errors per
group; the tests assert on them. Tests skip when the framework is missing or the
libraries are not built (``python custom_ops/build.py --only bindings``), except the
fallback tests, which need neither.

CUDA without a GPU: the PyTorch CUDA implementation's body (``run_cuda``) runs on CPU
tensors through the real launcher and the emulated driver of tests/test_launcher.py
(device pointers are host pointers there); JAX's CUDA targets are registered only where
JAX has a CUDA backend, and the CPU-only JAX here must skip them cleanly.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (B, H, W, s, K, d, C): odd sizes (H or W 1, K 1..7, s 1..3, C=257, d=65) and the
# production channel sizes (C=256, d=64) at a spatial size the loop reference can afford.
CASES = {
    "all_one": (1, 1, 1, 1, 1, 1, 1),
    "small": (2, 3, 4, 2, 3, 5, 6),
    "s3_k5": (1, 4, 5, 3, 5, 3, 7),
    "h1_k7": (1, 1, 6, 2, 7, 4, 3),
    "w1_s3": (2, 5, 1, 3, 3, 2, 2),
    "k1_s3": (1, 2, 3, 3, 1, 8, 9),
    "odd_c257_d65": (1, 3, 4, 1, 7, 65, 257),
    "prod_c256_d64": (2, 12, 10, 2, 5, 64, 256),
}
CUDA_CASES = ("small", "k1_s3", "w1_s3")  # under emulation: one std::thread per CUDA thread
F64_TOL = 1e-10
F32_TOL = 1e-5  # relative to max(1, max |reference|)
# float16 / bfloat16 (issue 24: handed to the kernels in 16-bit storage, weights float32):
# odd sizes and the production channels once. The reference sees the inputs rounded to
# the type; each result is rounded once (at most 2^-11, 2^-8 of max |reference|) after
# float accumulation: twice that bound.
HALF_CASES = ("small", "s3_k5", "odd_c257_d65", "prod_c256_d64")
HALF_TOL = {"float16": 1e-3, "bfloat16": 8e-3}
# SAPA-D in float16 / bfloat16 (same tolerances), (B, H, W, G, E, P, s, C): odd sizes and
# the real ones.
DEFORM_HALF_CASES = {"odd": (2, 3, 5, 3, 3, 5, 3, 6), "real": (1, 4, 4, 4, 32, 9, 2, 256)}


# ----------------------------------------------------------------------------- worker side


def _inputs(case, seed=0):
    b, h, w, s, k, d, c = CASES[case]
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(np.sqrt(d))  # logits of order 1 at every d
    q = rng.normal(size=(b, h * s, w * s, d)) * scale
    key = rng.normal(size=(b, h, w, d)) * scale
    v = rng.normal(size=(b, h, w, c))
    g = rng.normal(size=(b, h * s, w * s, c))
    return q, key, v, g, k, s


def _err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(
        np.max(np.abs(got - want), initial=0.0) / max(1.0, np.max(np.abs(want), initial=0.0))
    )


def _max_err(got, want):
    return max(_err(a, b) for a, b in zip(got, want, strict=True))


def _reference(case):
    import reference

    q, key, v, g, k, s = _inputs(case)
    return reference.sapa(q, key, v, k, s), reference.sapa_vjp(q, key, v, g, k, s)


def _entry(out, grads, ref, dtype):
    """One case's measured errors: the result's dtype, forward and gradient errors."""
    ref_out, ref_grads = ref
    return {"dtype": dtype, "forward": _err(out, ref_out), "grads": _max_err(grads, ref_grads)}


def _cases(run, cases=CASES):
    """Each case in float64 and float32 through ``run(q, key, v, g, k, s, dtype) -> (out,
    grads, dtype of out)``: its errors against the reference, by ``"<case>/<dtype>"``."""
    out = {}
    for case in cases:
        ref = _reference(case)
        for dtype in ("float64", "float32"):
            fwd, grads, got = run(*_inputs(case), dtype)
            out[f"{case}/{dtype}"] = _entry(fwd, grads, ref, got)
    return out


def _rounded(case, dtype):
    """The case's inputs rounded to ``dtype`` (float16, bfloat16), as float64: what the
    kernels see."""
    import ml_dtypes

    q, key, v, g, k, s = _inputs(case)
    storage = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    return (*(t.astype(storage).astype(np.float64) for t in (q, key, v, g)), k, s)


def _half_cases(run, cases=HALF_CASES):
    """Each case in float16 and bfloat16 through ``run(q, key, v, g, k, s, dtype) ->
    (out, grads, weights, dtypes)`` (``dtypes``: those of out, the three gradients and
    weights): their errors against the reference of the rounded inputs."""
    import reference

    out = {}
    for case in cases:
        for dtype in HALF_TOL:
            q, key, v, g, k, s = args = _rounded(case, dtype)
            fwd, grads, weights, dtypes = run(*args, dtype)
            out[f"{case}/{dtype}"] = {
                "dtypes": dtypes,
                "forward": _err(fwd, reference.sapa(q, key, v, k, s)),
                "grads": _max_err(grads, reference.sapa_vjp(q, key, v, g, k, s)),
                "weights": _err(weights, reference.softmax(reference.similarity(q, key, k, s))),
            }
    return out


def _deform_half_cases(run):
    """SAPA-D's fused op in float16 and bfloat16 through ``run(q, k, v, offsets, g, points,
    s, groups, dtype) -> (out, grads, weights, dtypes)``, as :func:`_half_cases`: errors
    against the reference of the rounded inputs (offsets away from integer positions, where
    the position derivative is defined)."""
    import ml_dtypes

    import reference_deform as ref

    out = {}
    for case, (b, h, w, groups, e, p, s, c) in DEFORM_HALF_CASES.items():
        rng = np.random.default_rng(7)
        high = (b, h * s, w * s)
        arrays = [
            0.5 * rng.standard_normal(high + (groups * e,)),
            rng.standard_normal((b, h, w, groups * e)),
            rng.standard_normal((b, h, w, c)),
            ref.offsets_away_from_integers(rng, high + (2 * groups * p,), spread=2.5),
            rng.standard_normal(high + (c,)),
        ]
        for dtype in HALF_TOL:
            storage = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
            q, k, v, o, g = (a.astype(storage).astype(np.float64) for a in arrays)
            fwd, grads, weights, dtypes = run(q, k, v, o, g, p, s, groups, dtype)
            logits = ref.deform_similarity(q, k, o, p, s, groups)
            out[f"deform_{case}/{dtype}"] = {
                "dtypes": dtypes,
                "forward": _err(fwd, ref.sapa_deform(q, k, v, o, p, s, groups)),
                "grads": _max_err(grads, ref.sapa_deform_vjp(q, k, v, o, g, p, s, groups)),
                "weights": _err(weights, ref.group_softmax(logits, groups)),
            }
    return out


def _errors_value(fn):
    """The message of the ValueError fn raises (None when it raises nothing)."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def _jax_numerics():
    import jax
    import jax.numpy as jnp

    from keras_sapa.ops import _jax_kernels as jk

    if not jk.available():
        return {"skip": jk.unavailable_reason()}

    def run(q, key, v, g, k, s, dtype):  # forward and VJP in one compilation
        def both(a, b, c):
            fwd, vjp = jax.vjp(lambda *x: jk.sapa(*x, k, s), a, b, c)
            return fwd, vjp(jnp.asarray(g, dtype))

        fwd, grads = jax.jit(both)(*(jnp.asarray(t, dtype) for t in (q, key, v)))
        return fwd, grads, str(fwd.dtype)

    out = _cases(run)
    # vmap: a batched query with an unbatched key and value, and all batched.
    import reference

    q, key, v, g, k, s = _inputs("small")
    qs = np.stack([q, 2 * q, -q])
    got = jax.jit(jax.vmap(lambda a: jk.sapa(a, key, v, k, s)))(qs)
    out["vmap_query"] = max(_err(got[i], reference.sapa(qs[i], key, v, k, s)) for i in range(3))
    vs = np.stack([v, v * 0.5])
    keys = np.stack([key, -key])
    got = jax.vmap(lambda a, b, c: jk.sapa(a, b, c, k, s))(np.stack([q, q]), keys, vs)
    out["vmap_all"] = max(_err(got[i], reference.sapa(q, keys[i], vs[i], k, s)) for i in range(2))
    grads = jax.vmap(
        jax.grad(lambda a, b, c: jnp.sum(jk.sapa(a, b, c, k, s) * g), argnums=(0, 1, 2))
    )(np.stack([q, q]), keys, vs)
    out["vmap_grad"] = max(
        _err(grads[j][i], reference.sapa_vjp(q, keys[i], vs[i], g, k, s)[j])
        for i in range(2)
        for j in range(3)
    )

    # Half types: the arrays go to the kernels as they are (no convert in the program),
    # gradients in the same type, the saved weights in float32.
    def run_half(q, key, v, g, k, s, dtype):
        attrs = (("kernel_size", k), ("up_factor", s))

        def both(a, b, c, gg):
            fwd, vjp = jax.vjp(lambda *x: jk.sapa(*x, k, s), a, b, c)
            return fwd, vjp(gg), jk._partitioned("Sapa", attrs)(a, b, c)[1]

        fwd, grads, weights = jax.jit(both)(*(jnp.asarray(t, dtype) for t in (q, key, v, g)))
        return fwd, grads, weights, [str(t.dtype) for t in (fwd, *grads, weights)]

    out["half"] = _half_cases(run_half)
    half = [jnp.asarray(t, jnp.float16) for t in (q, key, v)]
    program = jax.jit(lambda a, b, c: jk.sapa(a, b, c, k, s)).lower(*half).as_text()
    out["half_program"] = {"custom_call": "keras_sapa_forward" in program}
    out["half_program"]["convert"] = "convert" in program
    # The handler checks each tensor's type by the table: float16 weights are refused.
    weights = jnp.zeros(q.shape[:-1] + (k * k,), jnp.float16)
    backward = jk._partitioned("SapaGrad", (("kernel_size", k), ("up_factor", s)))
    try:
        backward(jnp.asarray(g, jnp.float16), *half, weights)
        out["half_bad_weights"] = None
    except Exception as exc:  # noqa: BLE001 - XLA's runtime error type varies by version
        out["half_bad_weights"] = str(exc)
    # SAPA-D, where the core has its 16-bit entry points.
    from keras_sapa.ops import _jax_deform_kernels as jdk
    from keras_sapa.ops import _native
    from keras_sapa.ops import _optable

    deform = _optable.op("SapaDeform")
    out["deform_stores_halves"] = _native.stores_halves(_native.core.get(), deform)
    if jdk.available() and out["deform_stores_halves"]:

        def run_deform(q, key, v, o, g, p, s, groups, dtype):
            attrs = (("num_points", p), ("up_factor", s), ("groups", groups))

            def both(*x):
                fwd, vjp = jax.vjp(lambda *y: jdk.sapa_deform(*y, p, s, groups), *x[:4])
                return fwd, vjp(x[4]), jk._partitioned("SapaDeform", attrs)(*x[:4])[1]

            fwd, grads, weights = jax.jit(both)(
                *(jnp.asarray(t, dtype) for t in (q, key, v, o, g))
            )
            return fwd, grads, weights, [str(t.dtype) for t in (fwd, *grads, weights)]

        out["half"].update(_deform_half_cases(run_deform))
    # Bad input: ValueError naming the argument.
    from keras_sapa import ops

    out["bad_kernel"] = _errors_value(lambda: ops.sapa(q, key, v, 4, s, "compiled"))
    out["bad_shape"] = _errors_value(lambda: ops.sapa(q[:, :-1], key, v, k, s, "compiled"))
    out["hlo_has_custom_call"] = (
        "keras_sapa_forward"
        in jax.jit(lambda a, b, c: jk.sapa(a, b, c, k, s)).lower(q, key, v).as_text()
    )
    return out


def _keras_model(use_kernels):
    """A functional model whose upsampler is SAPA on the compiled kernels of the running
    backend (``use_kernels``) or on the pure ``"xla"`` formulation of keras_sapa.ops."""
    import keras

    from keras_sapa import ops

    class Upsample(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.q = keras.layers.Dense(8)
            self.k = keras.layers.Dense(8)

        def call(self, x, y):
            q, k = self.q(y), self.k(x)
            return ops.sapa(q, k, x, 5, 2, implementation="compiled" if use_kernels else "xla")

        def compute_output_shape(self, x_shape, y_shape):
            return tuple(y_shape[:3]) + (x_shape[-1],)

    keras.utils.set_random_seed(1)
    x = keras.Input((6, 6, 4))
    y = keras.Input((12, 12, 4))
    out = keras.layers.Dense(2)(Upsample()(x, y))
    model = keras.Model([x, y], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _keras_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 6, 4)).astype("float32")
    y = rng.normal(size=(4, 12, 12, 4)).astype("float32")
    t = rng.normal(size=(4, 12, 12, 2)).astype("float32")
    return [x, y], t


def _weights_moved(model, start, other):
    """(largest difference to ``other``'s weights, largest step from ``start``)."""
    weights = model.get_weights()
    return _max_err(weights, other.get_weights()), _max_err(other.get_weights(), start)


def _keras_step(framework):
    """One training step of a Keras model through the compiled kernels equals the same
    step through the pure formulation (same initial weights and batch)."""
    from keras_sapa import ops
    from keras_sapa.ops import _native

    if not ops.compiled_available():
        return {"skip": _native.unavailable_reason() or f"no kernels on {framework}"}
    inputs, target = _keras_batch()
    pure = _keras_model(use_kernels=False)
    start = [w.copy() for w in pure.get_weights()]
    loss_pure = float(pure.train_on_batch(inputs, target))
    compiled = _keras_model(use_kernels=True)
    compiled.set_weights(start)
    loss = float(compiled.train_on_batch(inputs, target))
    pred = compiled.predict(inputs, verbose=0)
    weights, moved = _weights_moved(compiled, start, pure)
    return {
        "loss": abs(loss - loss_pure) / max(1.0, abs(loss_pure)),
        "weights": weights,
        "moved": moved,
        "predict": _err(pred, pure.predict(inputs, verbose=0)),
    }


def _jax_distributed():
    """keras.distribution.DataParallel on 2 host devices: one training step of a model
    whose upsampler runs the compiled kernels equals the same step on one device; SAPA
    and SAPA-D sharded along the batch run their kernels per shard (no gather)."""
    import jax
    import keras

    from keras_sapa.ops import _jax_deform_kernels as jdk
    from keras_sapa.ops import _jax_kernels as jk

    if not jk.available():
        return {"skip": jk.unavailable_reason()}
    inputs, target = _keras_batch()
    single = _keras_model(use_kernels=True)
    start = [w.copy() for w in single.get_weights()]
    loss_single = float(single.train_on_batch(inputs, target))
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    )
    dp = _keras_model(use_kernels=True)
    dp.set_weights(start)
    loss_dp = float(dp.train_on_batch(inputs, target))
    shards = len(dp.weights[0].value.sharding.device_set)
    weights, moved = _weights_moved(dp, start, single)
    keras.distribution.set_distribution(None)
    # At the JAX level: with the batch sharded over the 2 devices, each device runs the
    # forward and backward kernels on its half (no gather), with the reference result.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    def sharded_grads(fn, arrays, g):
        grad_fn = jax.grad(lambda *a: (fn(*a) * g).sum(), argnums=tuple(range(len(arrays))))
        placed = [jax.device_put(t.astype("float32"), sharding) for t in arrays]
        hlo = jax.jit(grad_fn).lower(*placed).compile().as_text()
        calls = [x for x in hlo.splitlines() if 'custom_call_target="keras_sapa_' in x]
        shapes = [x.split("=", 1)[1].split("custom-call")[0].strip() for x in calls]
        return jax.jit(grad_fn)(*placed), shapes, "all-gather" in hlo

    import reference
    import reference_deform

    q, key, v, g, k, s = _inputs("small")  # B=2
    grads, per_shard, gathers = sharded_grads(lambda *a: jk.sapa(*a, k, s), (q, key, v), g)
    out = {
        "custom_calls": per_shard,
        "gathers": gathers,
        "sharded_grads": _max_err(grads, reference.sapa_vjp(q, key, v, g, k, s)),
        "devices": len(jax.devices()),
        "weight_devices": shards,
        "loss": abs(loss_single - loss_dp) / max(1.0, abs(loss_single)),
        "weights": weights,
        "moved": moved,
    }
    if jdk.available():
        rng = np.random.default_rng(3)
        p, groups = 3, 2  # B=2, 3x4 -> 6x8, E=2, C=4
        dq, dk, dv = (rng.normal(size=sh) for sh in ((2, 6, 8, 4), (2, 3, 4, 4), (2, 3, 4, 4)))
        off = reference_deform.offsets_away_from_integers(rng, (2, 6, 8, 2 * groups * p))
        gd = rng.normal(size=(2, 6, 8, 4))
        grads, calls, gathers = sharded_grads(
            lambda *a: jdk.sapa_deform(*a, p, 2, groups), (dq, dk, dv, off), gd
        )
        want = reference_deform.sapa_deform_vjp(dq, dk, dv, off, gd, p, 2, groups)
        out["deform"] = {"calls": calls, "gathers": gathers, "grads": _max_err(grads, want)}
    return out


def _jax_cuda_registration():
    """On a JAX without a CUDA backend nothing is registered for CUDA, and the CPU
    targets serve; the CUDA handlers are compiled into the library all the same."""
    import ctypes

    from keras_sapa.ops import _jax_deform_kernels as jdk
    from keras_sapa.ops import _jax_kernels as jk
    from keras_sapa.ops import _native

    if not jk.available():
        return {"skip": jk.unavailable_reason()}
    lib = ctypes.CDLL(os.path.join(_native.bindings_dir(), _native.JAX_LIBRARY))
    return {
        "has_cuda": jk.has_cuda(),
        "cuda": jk._library.get()["cuda"],
        "deform_cuda": (jdk._library.get() or {}).get("cuda"),
        "available": [jk.available(), jdk.available()],
        "handlers": [hasattr(lib, n) for n in ("KerasSapaForwardCuda", "KerasSapaBackwardCuda")],
    }


def _fallback(framework):
    """Libraries missing (an empty directory): one RuntimeWarning, available() False,
    sapa() a RuntimeError; KERAS_SAPA_DISABLE_COMPILED=1: False without a warning.
    Runs last: it points the loader elsewhere."""
    import tempfile
    import warnings

    if framework == "jax":
        import jax.numpy as xp

        from keras_sapa.ops import _jax_kernels as mod
    else:
        import torch as xp

        from keras_sapa.ops import _torch_kernels as mod
    os.environ["KERAS_SAPA_BINDINGS_DIR"] = tempfile.mkdtemp()
    mod._reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = mod.available(), mod.available()
        try:
            mod.sapa(xp.zeros((1, 4, 4, 2)), xp.zeros((1, 2, 2, 2)), xp.zeros((1, 2, 2, 3)), 3, 2)
            raised = None
        except RuntimeError as exc:
            raised = str(exc)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    # A build record asking for a CPU feature this CPU lacks: refused before any dlopen.
    stale = tempfile.mkdtemp()
    record = {
        "core_abi": 1,
        "cpu_features": ["no_such_cpu_feature"],
        "core_library": "_sapa_core.so",
        "jax_library": "_sapa_jax.so",
    }
    with open(os.path.join(stale, "bindings_build_info.json"), "w") as f:
        json.dump(record, f)
    os.environ["KERAS_SAPA_BINDINGS_DIR"] = stale
    mod._reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stale_available = mod.available()
    stale_warnings = [str(w.message) for w in caught]
    os.environ["KERAS_SAPA_DISABLE_COMPILED"] = "1"
    mod._reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        disabled = mod.available()
    return {
        "available": [first, second],
        "warnings": warned,
        "raised": raised,
        "stale_available": stale_available,
        "stale_warnings": stale_warnings,
        "disabled": disabled,
        "disabled_warnings": len(caught),
        "reason": mod.unavailable_reason(),
    }


def _torch_numerics():
    import threading

    import torch

    from keras_sapa.ops import _native
    from keras_sapa.ops import _torch_kernels as tk

    if not tk.available():
        return {"skip": tk.unavailable_reason()}

    def run(q, key, v, g, k, s, dtype):
        args = [
            torch.tensor(t, dtype=getattr(torch, dtype), requires_grad=True) for t in (q, key, v)
        ]
        fwd = tk.sapa(*args, k, s)
        (fwd * torch.tensor(g, dtype=fwd.dtype)).sum().backward()
        return fwd.detach(), [a.grad for a in args], str(fwd.dtype)[6:]

    out = _cases(run)
    # torch.compile(fullgraph=True): forward and backward through the custom ops, the
    # library loaded for the first time inside the compiled function.
    tk._reset()
    q, key, v, g, k, s = _inputs("s3_k5")
    args = [torch.tensor(t, requires_grad=True) for t in (q, key, v)]
    compiled = torch.compile(lambda a, b, c: tk.sapa(a, b, c, k, s), fullgraph=True)
    fwd = compiled(*args)
    (fwd * torch.tensor(g)).sum().backward()
    out["compile"] = _entry(fwd.detach(), [a.grad for a in args], _reference("s3_k5"), "float64")
    # gradcheck (float64 numeric differences) and the op registrations (opcheck).
    small = [torch.tensor(t, requires_grad=True) for t in _inputs("small")[:3]]
    out["gradcheck"] = bool(
        torch.autograd.gradcheck(lambda a, b, c: tk.sapa(a, b, c, 3, 2), small)
    )
    weights = torch.ops.keras_sapa.sapa_forward(*small, 3, 2)[1].detach()
    grad = torch.randn(small[0].shape[:-1] + (small[2].shape[-1],), dtype=torch.float64)
    torch.library.opcheck(torch.ops.keras_sapa.sapa_forward, (*small, 3, 2))
    torch.library.opcheck(
        torch.ops.keras_sapa.sapa_backward, (grad, *(t.detach() for t in small), weights, 3, 2)
    )
    out["opcheck"] = True
    # Half types: the tensors go to the custom ops as they are (the output's autograd
    # node is the op's, no conversion), gradients in the same type, weights in float32.
    grad_fns = set()

    def run_half(q, key, v, g, k, s, dtype):
        dtype = getattr(torch, dtype)
        args = [torch.tensor(t, dtype=dtype, requires_grad=True) for t in (q, key, v)]
        fwd = tk.sapa(*args, k, s)
        grad_fns.add(fwd.grad_fn.name())
        fwd.backward(torch.tensor(g, dtype=dtype))
        weights = torch.ops.keras_sapa.sapa_forward(*(a.detach() for a in args), k, s)[1]
        grads = [a.grad for a in args]
        dtypes = [str(t.dtype)[6:] for t in (fwd, *grads, weights)]
        return fwd.detach().double(), [t.double() for t in grads], weights.double(), dtypes

    out["half"] = _half_cases(run_half)
    # The fake implementations type the outputs as the kernels do (autograd and the
    # schema are checked in float64 above).
    for dtype in (torch.float16, torch.bfloat16):
        small = [torch.tensor(t, dtype=dtype) for t in _inputs("small")[:3]]
        weights = torch.ops.keras_sapa.sapa_forward(*small, 3, 2)[1]
        grad = torch.randn(small[0].shape[:-1] + (small[2].shape[-1],)).to(dtype)
        fake = ("test_schema", "test_faketensor")
        torch.library.opcheck(torch.ops.keras_sapa.sapa_forward, (*small, 3, 2), test_utils=fake)
        torch.library.opcheck(
            torch.ops.keras_sapa.sapa_backward, (grad, *small, weights, 3, 2), test_utils=fake
        )
    out["half_opcheck"] = True
    half = [torch.zeros(1, 4, 4, 2, dtype=torch.float16), torch.zeros(1, 2, 2, 2)]
    # SAPA-D, where the core has its 16-bit entry points.
    from keras_sapa.ops import _optable
    from keras_sapa.ops import _torch_deform_kernels as tdk

    deform = _optable.op("SapaDeform")
    out["deform_stores_halves"] = _native.stores_halves(_native.core.get(), deform)
    if tdk.available() and out["deform_stores_halves"]:

        def run_deform(q, key, v, o, g, p, s, groups, dtype):
            dtype = getattr(torch, dtype)
            args = [torch.tensor(t, dtype=dtype, requires_grad=True) for t in (q, key, v, o)]
            fwd = tdk.sapa_deform(*args, p, s, groups)
            grad_fns.add(fwd.grad_fn.name())
            fwd.backward(torch.tensor(g, dtype=dtype))
            detached = [a.detach() for a in args]
            weights = torch.ops.keras_sapa.sapa_deform_forward(*detached, p, s, groups)[1]
            grads = [a.grad for a in args]
            dtypes = [str(t.dtype)[6:] for t in (fwd, *grads, weights)]
            return fwd.detach().double(), [t.double() for t in grads], weights.double(), dtypes

        out["half"].update(_deform_half_cases(run_deform))
    out["half_grad_fns"] = sorted(grad_fns)
    out["half_mixed"] = _errors_value(
        lambda: torch.ops.keras_sapa.sapa_forward(half[0], half[1], half[1], 3, 2)
    )
    q, key, v, g, k, s = _inputs("small")
    ref_out, _ = _reference("small")
    # Non-contiguous inputs are made contiguous.
    qt = torch.tensor(q).transpose(1, 2).contiguous().transpose(1, 2)
    out["noncontiguous"] = _err(tk.sapa(qt, torch.tensor(key), torch.tensor(v), k, s), ref_out)
    from keras_sapa import ops

    out["bad_kernel"] = _errors_value(
        lambda: ops.sapa(torch.tensor(q), torch.tensor(key), torch.tensor(v), 4, s, "compiled")
    )
    out["bad_shape"] = _errors_value(
        lambda: ops.sapa(
            torch.tensor(q[:, :-1]), torch.tensor(key), torch.tensor(v), k, s, "compiled"
        )
    )
    # The pool: results do not depend on the thread count (every output is written by
    # one thread), and concurrent callers each get their own right answer.
    q, key, v, g, k, s = _inputs("prod_c256_d64")
    tq, tkey, tv, tg = (torch.tensor(t, dtype=torch.float32) for t in (q, key, v, g))

    def run(scale):
        fwd, w = torch.ops.keras_sapa.sapa_forward(tq * scale, tkey, tv, k, s)
        return [fwd, *torch.ops.keras_sapa.sapa_backward(tg, tq * scale, tkey, tv, w, k, s)]

    def equal(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    lib, _ = _native.load_core()
    default_threads = lib.keras_sapa_num_threads()
    expected = run(1.0)
    lib.keras_sapa_set_num_threads(1)
    serial = run(1.0)
    lib.keras_sapa_set_num_threads(3)
    pooled = run(1.0)
    lib.keras_sapa_set_num_threads(0)
    out["threads"] = {
        "default": default_threads,
        "restored": lib.keras_sapa_num_threads(),
        "serial_equal": equal(serial, expected),
        "pool3_equal": equal(pooled, expected),
    }
    scales = [1.0, 0.5, -1.0, 2.0]
    wanted = [run(c) for c in scales]
    results = [None] * len(scales)

    def worker(i):
        results[i] = run(scales[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(scales))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent_equal"] = all(equal(r, w) for r, w in zip(results, wanted, strict=True))
    return out


def _torch_cuda_emulated():
    """The CUDA implementation's body on CPU tensors, through the real launcher on the
    emulated driver (tests/test_launcher.py's, built by the test side), forward and
    backward against the reference; and no CUDA registration on a CPU-only PyTorch."""
    import tempfile

    import torch

    from keras_sapa.ops import _native
    from keras_sapa.ops import _optable
    from keras_sapa.ops import _torch_kernels as tk

    out = {
        "registered": tk.CUDA_REGISTERED,
        "cuda_built": torch.backends.cuda.is_built(),
        "meta_served": tk.serves(tk._OPS, [torch.empty(1, device="meta")]),
    }
    paths = os.environ.get("KERAS_SAPA_TEST_EMULATED_CUDA", "")
    lib = _native.core.get()
    if not tk.available() or ":" not in paths or not hasattr(lib, "keras_sapa_cuda_open"):
        return {**out, "skip": tk.unavailable_reason() or paths or "no CUDA entry points"}
    import test_launcher

    directory = tempfile.mkdtemp()
    test_launcher.Launcher(*paths.split(":"), directory)  # the emulated driver and images
    launcher = os.path.join(directory, "libsapa_launcher.so").encode()
    out["open"] = lib.keras_sapa_cuda_open(launcher, None)
    forward, backward = _optable.op("Sapa"), _optable.op("SapaGrad")

    def run(q, key, v, g, k, s, dtype):
        attrs = {"kernel_size": k, "up_factor": s}
        t = [torch.tensor(a, dtype=getattr(torch, dtype)) for a in (q, key, v, g)]
        fwd, weights = tk.run_cuda(forward, t[:3], attrs, None)
        grads = tk.run_cuda(backward, [t[3], *t[:3], weights], attrs, None)
        return fwd, grads, str(fwd.dtype)[6:]

    out.update(_cases(run, CUDA_CASES))

    def run_half(q, key, v, g, k, s, dtype):  # the launcher's 16-bit dtypes
        attrs = {"kernel_size": k, "up_factor": s}
        t = [torch.tensor(a, dtype=getattr(torch, dtype)) for a in (q, key, v, g)]
        fwd, weights = tk.run_cuda(forward, t[:3], attrs, None)
        grads = tk.run_cuda(backward, [t[3], *t[:3], weights], attrs, None)
        dtypes = [str(x.dtype)[6:] for x in (fwd, *grads, weights)]
        return fwd.double(), [x.double() for x in grads], weights.double(), dtypes

    out["half"] = _half_cases(run_half, ("small",))
    # SAPA-D: B=1, 3x4 -> 6x8, P=3, G=2, E=2, C=4, offsets kept off integer positions.
    import reference_deform

    rng = np.random.default_rng(5)
    p, s, groups = 3, 2, 2
    arrays = [rng.normal(size=sh) for sh in ((1, 6, 8, 4), (1, 3, 4, 4), (1, 3, 4, 4))]
    arrays.append(reference_deform.offsets_away_from_integers(rng, (1, 6, 8, 2 * groups * p)))
    g = rng.normal(size=(1, 6, 8, 4))
    ref = (
        reference_deform.sapa_deform(*arrays, p, s, groups),
        reference_deform.sapa_deform_vjp(*arrays, g, p, s, groups),
    )
    attrs = {"num_points": p, "up_factor": s, "groups": groups}
    forward, backward = _optable.op("SapaDeform"), _optable.op("SapaDeformGrad")
    if _native.entry_point(lib, forward, "cuda") is None:
        out["deform_missing"] = "the core library has no SAPA-D CUDA entry points"
        return out
    for dtype in (torch.float64, torch.float32):
        t = [torch.tensor(a, dtype=dtype) for a in (*arrays, g)]
        try:
            fwd, weights = tk.run_cuda(forward, t[:4], attrs, None)
        except RuntimeError as exc:  # a launcher without SAPA-D's entry points
            out["deform_missing"] = str(exc)
            break
        grads = tk.run_cuda(backward, [t[4], *t[:4], weights], attrs, None)
        out[f"deform/{str(dtype)[6:]}"] = _entry(fwd, grads, ref, str(fwd.dtype)[6:])
    return out


WORKERS = {
    "jax": {
        "numerics": _jax_numerics,
        "keras": lambda: _keras_step("jax"),
        "distributed": _jax_distributed,
        "cuda": _jax_cuda_registration,
        "fallback": lambda: _fallback("jax"),
    },
    "torch": {
        "numerics": _torch_numerics,
        "keras": lambda: _keras_step("torch"),
        "cuda": _torch_cuda_emulated,
        "fallback": lambda: _fallback("torch"),
    },
}


def _worker(framework):
    """Runs the framework's groups in order; a group that raises reports its traceback
    instead of ending the others."""
    if framework == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    for group, fn in WORKERS[framework].items():
        start = time.perf_counter()
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - reported by the group's tests
            result = {"error": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(f"RESULT {group} " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- test side

import pytest  # noqa: E402  (the worker side above does not need pytest)

from test_launcher import emulated_build  # noqa: E402,F401  (fixtures for the CUDA group)
from test_launcher import launcher_build  # noqa: E402,F401

_processes = {}  # framework -> Popen, then its parsed results
TIMEOUT = 900


def _start(framework, emulated_cuda):
    env = dict(os.environ, KERAS_BACKEND=framework, KERAS_SAPA_TEST_EMULATED_CUDA=emulated_cuda)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    env.pop("KERAS_SAPA_DISABLE_COMPILED", None)
    env.pop("KERAS_SAPA_BINDINGS_DIR", None)
    if framework == "jax":  # two host devices for the data-parallel group
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), framework],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def workers(request):
    """Starts one worker per installed framework, together (they overlap on two cores);
    the CUDA group gets the emulated launcher when it builds here."""
    if not _processes:
        try:
            emulated_cuda = ":".join(
                request.getfixturevalue(n) for n in ("launcher_build", "emulated_build")
            )
        except pytest.skip.Exception as exc:
            emulated_cuda = f"emulated driver unavailable: {exc}"
        for framework in WORKERS:
            if importlib.util.find_spec(framework) is not None:
                _processes[framework] = _start(framework, emulated_cuda)
    return _processes


def _group(workers, framework, group):
    if framework not in workers:
        pytest.skip(f"{framework} is not installed")
    proc = workers[framework]
    if isinstance(proc, subprocess.Popen):
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results = {}
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                name, text = line[len("RESULT ") :].split(" ", 1)
                results[name] = json.loads(text)
        results["_log"] = f"rc={proc.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
        workers[framework] = proc = results
    assert group in proc, f"worker {framework} did not report {group}:\n{proc['_log']}"
    result = proc[group]
    assert "error" not in result, f"{framework}/{group} raised:\n{result['error']}"
    if "skip" in result:
        pytest.skip(f"{framework}/{group}: {result['skip']}")
    return result


def _check_case(result, case, dtype):
    entry = result[f"{case}/{dtype}"]
    tol = F64_TOL if dtype == "float64" else F32_TOL
    assert entry["dtype"] == dtype
    assert entry["forward"] <= tol, entry
    assert entry["grads"] <= tol, entry


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_matches_reference(workers, framework, case, dtype):
    _check_case(_group(workers, framework, "numerics"), case, dtype)


def _check_half(result, cases=HALF_CASES):
    """float16 / bfloat16: results and gradients in the type, weights in float32, all
    within the type's tolerance of the reference."""
    for case in cases:
        for dtype, tol in HALF_TOL.items():
            entry = result[f"{case}/{dtype}"]
            *values, weights = entry["dtypes"]  # out and each gradient, then weights
            assert values == [dtype] * len(values) and weights == "float32", (case, entry)
            assert entry["forward"] <= tol and entry["grads"] <= tol, (case, entry)
            assert entry["weights"] <= tol, (case, entry)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_half_types_in_their_own_storage(workers, framework):
    """Issue 24: float16 and bfloat16 reach the kernels without a float32 copy, forward
    and gradients against the reference, weights float32."""
    r = _group(workers, framework, "numerics")
    _check_half(r["half"])
    if r["deform_stores_halves"]:  # SAPA-D's fused op, likewise
        _check_half(r["half"], [f"deform_{c}" for c in DEFORM_HALF_CASES])
    if framework == "jax":  # no convert around the custom call
        assert r["half_program"] == {"custom_call": True, "convert": False}, r["half_program"]
        bad = r["half_bad_weights"]
        assert bad is not None and "weights" in bad and "float32" in bad, bad
    else:  # the output comes from the custom op's autograd node, not a conversion
        assert all(
            n.startswith("GeneratedBackwardFor_keras_sapa_sapa_") for n in r["half_grad_fns"]
        ), r["half_grad_fns"]
        assert r["half_opcheck"]
        assert "float32" in r["half_mixed"] and "weights" in r["half_mixed"], r["half_mixed"]


def test_jax_vmap_half_and_bad_input(workers):
    r = _group(workers, "jax", "numerics")
    assert r["vmap_query"] <= F64_TOL and r["vmap_all"] <= F64_TOL and r["vmap_grad"] <= F64_TOL
    assert "kernel_size" in r["bad_kernel"] and "4" in r["bad_kernel"]
    assert r["bad_shape"] is not None and "query" in r["bad_shape"]
    assert r["hlo_has_custom_call"]


def test_jax_data_parallel_two_devices(workers):
    r = _group(workers, "jax", "distributed")
    assert r["devices"] == 2 and r["weight_devices"] == 2, r
    assert r["moved"] > 1e-4, r  # the step changed the weights
    assert r["loss"] <= 1e-5 and r["weights"] <= 1e-5, r
    # Partitioned along the batch: two kernel calls (forward, backward) on B/2 = 1 each.
    assert len(r["custom_calls"]) == 2 and not r["gathers"], r
    assert all(c.startswith("(f32[1,") for c in r["custom_calls"]), r
    assert r["sharded_grads"] <= F32_TOL, r
    deform = r.get("deform")
    if deform is not None:  # SAPA-D, partitioned by the same table-derived rule
        assert len(deform["calls"]) == 2 and not deform["gathers"], deform
        assert all(c.startswith("(f32[1,") for c in deform["calls"]), deform
        assert deform["grads"] <= F32_TOL, deform


def test_jax_cuda_targets_skipped_without_cuda(workers):
    r = _group(workers, "jax", "cuda")
    assert r["handlers"] == [True, True], r  # compiled into the library
    if not r["has_cuda"]:
        assert r["cuda"] == "JAX has no CUDA backend" == r["deform_cuda"], r
        assert r["available"] == [True, True], r  # the CPU targets serve


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_keras_model_trains_through_kernels(workers, framework):
    r = _group(workers, framework, "keras")
    assert r["moved"] > 1e-4, r
    assert r["loss"] <= 1e-5 and r["weights"] <= 1e-5 and r["predict"] <= 1e-5, r


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fallback_when_library_missing(workers, framework):
    r = _group(workers, framework, "fallback")
    assert r["available"] == [False, False]
    assert len(r["warnings"]) == 1 and "bindings_build_info.json" in r["warnings"][0], r
    assert r["raised"] is not None and "unavailable" in r["raised"]
    assert r["stale_available"] is False and len(r["stale_warnings"]) == 1, r
    assert "no_such_cpu_feature" in r["stale_warnings"][0]
    assert r["disabled"] is False and r["disabled_warnings"] == 0
    assert "KERAS_SAPA_DISABLE_COMPILED" in r["reason"]


def test_build_script_is_never_fatal(tmp_path):
    """Without a compiler nothing is built (and nothing removed): exit 0, or 1 with
    --strict, and a message saying why."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"))
    script = os.path.join(ROOT, "custom_ops", "build.py")
    for extra, rc in (([], 0), (["--strict"], 1)):
        proc = subprocess.run(
            [sys.executable, script, "--only", "bindings", *extra],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == rc, out
        assert "not built" in out and "no-such-compiler" in out


def test_torch_compile_autograd_and_pool(workers):
    r = _group(workers, "torch", "numerics")
    assert r["compile"]["forward"] <= F64_TOL and r["compile"]["grads"] <= F64_TOL
    assert r["gradcheck"] and r["opcheck"]
    assert r["noncontiguous"] <= F64_TOL
    assert "kernel_size" in r["bad_kernel"] and "4" in r["bad_kernel"]
    assert r["bad_shape"] is not None and "query" in r["bad_shape"]
    threads = r["threads"]
    assert threads["default"] >= 1 and threads["restored"] == threads["default"]
    assert threads["serial_equal"] and threads["pool3_equal"]
    assert r["concurrent_equal"]


def test_torch_cuda_implementation_under_emulation(workers):
    """PyTorch's CUDA implementation (the launcher's entry points on the current stream)
    marshals tensors, sizes, dtype and scratch right: its body against the reference on
    the emulated driver. A CPU-only PyTorch registers no CUDA implementation."""
    r = _group(workers, "torch", "cuda")
    assert r["registered"] == r["cuda_built"] and not r["meta_served"], r
    assert r["open"] == 0, r
    for case in CUDA_CASES:
        for dtype in ("float64", "float32"):
            _check_case(r, case, dtype)
    _check_half(r["half"], ("small",))  # float16 / bfloat16 with float32 weights
    if "deform_missing" in r:
        assert "SAPA-D" in r["deform_missing"], r["deform_missing"]
        pytest.skip(f"SAPA-D under emulation: {r['deform_missing']}")
    for dtype in ("float64", "float32"):  # SAPA-D's CUDA implementation
        _check_case(r, "deform", dtype)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    _worker(sys.argv[1])
