"""The compiled CPU kernels bound to JAX (XLA FFI) and PyTorch (torch.library), against
the float64 NumPy loop reference (tests/reference.py).

Every check runs in a subprocess (this file run as a script: ``python
tests/test_jax_torch_kernels.py <jax|torch> <group>``) with its own ``KERAS_BACKEND``, so
neither framework, nor JAX's x64 mode, nor the 2 forced host devices leak into the
TensorFlow test session. A worker prints one JSON line of measured errors; the tests
assert on them. Tests skip when the framework is missing or the libraries are not built
(``python custom_ops/build.py --only bindings``), except the fallback tests, which need neither.
"""

import importlib.util
import json
import os
import subprocess
import sys

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
F64_TOL = 1e-10
F32_TOL = 1e-5  # relative to max(1, max |reference|)


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


def _reference(case):
    import reference

    q, key, v, g, k, s = _inputs(case)
    return reference.sapa(q, key, v, k, s), reference.sapa_vjp(q, key, v, g, k, s)


def _errors_value(fn):
    """The message of the ValueError fn raises (None when it raises nothing)."""
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def _worker_jax_numerics():
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from keras_sapa.ops import _jax_kernels as jk

    if not jk.available():
        return {"skip": jk.unavailable_reason()}
    out = {}
    for case in CASES:
        q, key, v, g, k, s = _inputs(case)
        ref_out, ref_grads = _reference(case)
        for dtype in ("float64", "float32"):
            args = [jnp.asarray(t, dtype) for t in (q, key, v)]
            gd = jnp.asarray(g, dtype)
            fwd = jax.jit(lambda a, b, c, k=k, s=s: jk.sapa(a, b, c, k, s))(*args)

            def loss(a, b, c, k=k, s=s, gd=gd):
                return jnp.sum(jk.sapa(a, b, c, k, s) * gd)

            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
            out[f"{case}/{dtype}"] = {
                "dtype": str(fwd.dtype),
                "forward": _err(fwd, ref_out),
                "grads": max(_err(a, b) for a, b in zip(grads, ref_grads, strict=False)),
            }
    # vmap: a batched query with an unbatched key and value, and all batched.
    q, key, v, g, k, s = _inputs("small")
    qs = np.stack([q, 2 * q, -q])
    got = jax.jit(jax.vmap(lambda a: jk.sapa(a, key, v, k, s)))(qs)
    import reference

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
    # Half types compute in float32 and come back in value's dtype.
    ref_out, _ = _reference("small")
    half = jk.sapa(*(jnp.asarray(t, jnp.bfloat16) for t in (q, key, v)), k, s)
    out["bfloat16"] = {"dtype": str(half.dtype), "forward": _err(half, ref_out)}
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


def _worker_keras_step(framework):
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
    return {
        "loss": abs(loss - loss_pure) / max(1.0, abs(loss_pure)),
        "weights": max(
            _err(a, b) for a, b in zip(compiled.get_weights(), pure.get_weights(), strict=False)
        ),
        "moved": max(_err(a, b) for a, b in zip(pure.get_weights(), start, strict=False)),
        "predict": _err(pred, pure.predict(inputs, verbose=0)),
    }


def _worker_jax_distributed():
    """keras.distribution.DataParallel on 2 host devices: one training step of a model
    whose upsampler runs the compiled kernels equals the same step on one device."""
    import jax
    import keras

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
    # At the JAX level: with the batch sharded over the 2 devices, each device runs the
    # forward and backward kernels on its half (no gather), with the single-device result.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    q, key, v, g, k, s = _inputs("small")  # B=2
    grad_fn = jax.grad(lambda a, b, c: (jk.sapa(a, b, c, k, s) * g).sum(), argnums=(0, 1, 2))
    sharded = [jax.device_put(t.astype("float32"), sharding) for t in (q, key, v)]
    hlo = jax.jit(grad_fn).lower(*sharded).compile().as_text()
    calls = [x for x in hlo.splitlines() if 'custom_call_target="keras_sapa_' in x]
    per_shard = [x.split("=", 1)[1].split("custom-call")[0].strip() for x in calls]
    grads = jax.jit(grad_fn)(*sharded)
    import reference

    ref_grads = reference.sapa_vjp(q, key, v, g, k, s)
    return {
        "custom_calls": per_shard,
        "gathers": "all-gather" in hlo,
        "sharded_grads": max(_err(a, b) for a, b in zip(grads, ref_grads, strict=False)),
        "devices": len(jax.devices()),
        "weight_devices": shards,
        "loss": abs(loss_single - loss_dp) / max(1.0, abs(loss_single)),
        "weights": max(
            _err(a, b) for a, b in zip(dp.get_weights(), single.get_weights(), strict=False)
        ),
        "moved": max(_err(a, b) for a, b in zip(single.get_weights(), start, strict=False)),
    }


def _worker_fallback(framework):
    """Libraries missing (an empty directory): one RuntimeWarning, available() False,
    sapa() a RuntimeError; KERAS_SAPA_DISABLE_COMPILED=1: False without a warning."""
    import warnings

    if framework == "jax":
        import jax.numpy as xp

        from keras_sapa.ops import _jax_kernels as mod
    else:
        import torch as xp

        from keras_sapa.ops import _torch_kernels as mod
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
    import tempfile

    stale = tempfile.mkdtemp()
    with open(os.path.join(stale, "bindings_build_info.json"), "w") as f:
        json.dump(
            {
                "core_abi": 1,
                "cpu_features": ["no_such_cpu_feature"],
                "core_library": "_sapa_core.so",
                "jax_library": "_sapa_jax.so",
            },
            f,
        )
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


def _worker_torch_numerics():
    import threading

    import torch

    from keras_sapa.ops import _native
    from keras_sapa.ops import _torch_kernels as tk

    if not tk.available():
        return {"skip": tk.unavailable_reason()}
    out = {}
    for case in CASES:
        q, key, v, g, k, s = _inputs(case)
        ref_out, ref_grads = _reference(case)
        for dtype in (torch.float64, torch.float32):
            args = [torch.tensor(t, dtype=dtype, requires_grad=True) for t in (q, key, v)]
            fwd = tk.sapa(*args, k, s)
            (fwd * torch.tensor(g, dtype=dtype)).sum().backward()
            out[f"{case}/{str(dtype)[6:]}"] = {
                "dtype": str(fwd.dtype)[6:],
                "forward": _err(fwd.detach(), ref_out),
                "grads": max(_err(a.grad, b) for a, b in zip(args, ref_grads, strict=False)),
            }
    # torch.compile(fullgraph=True): forward and backward through the custom ops.
    q, key, v, g, k, s = _inputs("s3_k5")
    ref_out, ref_grads = _reference("s3_k5")
    args = [torch.tensor(t, requires_grad=True) for t in (q, key, v)]
    gt = torch.tensor(g)
    compiled = torch.compile(lambda a, b, c: tk.sapa(a, b, c, k, s), fullgraph=True)
    fwd = compiled(*args)
    (fwd * gt).sum().backward()
    out["compile"] = {
        "forward": _err(fwd.detach(), ref_out),
        "grads": max(_err(a.grad, b) for a, b in zip(args, ref_grads, strict=False)),
    }
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
    # Half types compute in float32 and come back in value's dtype.
    q, key, v, g, k, s = _inputs("small")
    ref_out, _ = _reference("small")
    half = tk.sapa(*(torch.tensor(t, dtype=torch.bfloat16) for t in (q, key, v)), k, s)
    out["bfloat16"] = {"dtype": str(half.dtype)[6:], "forward": _err(half.float(), ref_out)}
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
        "serial_equal": all(torch.equal(a, b) for a, b in zip(serial, expected, strict=False)),
        "pool3_equal": all(torch.equal(a, b) for a, b in zip(pooled, expected, strict=False)),
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
    out["concurrent_equal"] = all(
        all(torch.equal(a, b) for a, b in zip(r, w, strict=False))
        for r, w in zip(results, wanted, strict=False)
    )
    return out


WORKERS = {
    ("jax", "numerics"): _worker_jax_numerics,
    ("jax", "distributed"): _worker_jax_distributed,
    ("jax", "fallback"): lambda: _worker_fallback("jax"),
    ("jax", "keras"): lambda: _worker_keras_step("jax"),
    ("torch", "keras"): lambda: _worker_keras_step("torch"),
    ("torch", "numerics"): _worker_torch_numerics,
    ("torch", "fallback"): lambda: _worker_fallback("torch"),
}


# ----------------------------------------------------------------------------- test side

import pytest  # noqa: E402  (the worker side above does not need pytest)

_results = {}


def _run(framework, group, env=None, timeout=900):
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    key = (framework, group)
    if key not in _results:
        full_env = dict(os.environ, KERAS_BACKEND=framework, **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join(
            [ROOT, HERE] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        )
        full_env.pop("KERAS_SAPA_DISABLE_COMPILED", None)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), framework, group],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, (
            f"worker {framework}/{group} failed (rc={proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
        _results[key] = json.loads(lines[-1][len("RESULT ") :])
    result = _results[key]
    if "skip" in result:
        pytest.skip(f"compiled kernels unavailable: {result['skip']}")
    return result


def _check_case(result, case, dtype):
    entry = result[f"{case}/{dtype}"]
    tol = F64_TOL if dtype == "float64" else F32_TOL
    assert entry["dtype"] == dtype
    assert entry["forward"] <= tol, entry
    assert entry["grads"] <= tol, entry


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_jax_matches_reference(case, dtype):
    _check_case(_run("jax", "numerics"), case, dtype)


def test_jax_vmap_half_and_bad_input():
    r = _run("jax", "numerics")
    assert r["vmap_query"] <= F64_TOL and r["vmap_all"] <= F64_TOL and r["vmap_grad"] <= F64_TOL
    assert r["bfloat16"]["dtype"] == "bfloat16" and r["bfloat16"]["forward"] <= 2e-2
    assert "kernel_size" in r["bad_kernel"] and "4" in r["bad_kernel"]
    assert r["bad_shape"] is not None and "query" in r["bad_shape"]
    assert r["hlo_has_custom_call"]


def test_jax_data_parallel_two_devices():
    r = _run("jax", "distributed", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert r["devices"] == 2 and r["weight_devices"] == 2, r
    assert r["moved"] > 1e-4, r  # the step changed the weights
    assert r["loss"] <= 1e-5 and r["weights"] <= 1e-5, r
    # Partitioned along the batch: two kernel calls (forward, backward) on B/2 = 1 each.
    assert len(r["custom_calls"]) == 2 and not r["gathers"], r
    assert all(c.startswith("(f32[1,") for c in r["custom_calls"]), r
    assert r["sharded_grads"] <= F32_TOL, r


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_keras_model_trains_through_kernels(framework):
    r = _run(framework, "keras")
    assert r["moved"] > 1e-4, r
    assert r["loss"] <= 1e-5 and r["weights"] <= 1e-5 and r["predict"] <= 1e-5, r


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_fallback_when_library_missing(framework, tmp_path):
    r = _run(framework, "fallback", env={"KERAS_SAPA_BINDINGS_DIR": str(tmp_path)})
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


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_reference(case, dtype):
    _check_case(_run("torch", "numerics"), case, dtype)


def test_torch_compile_autograd_and_pool():
    r = _run("torch", "numerics")
    assert r["compile"]["forward"] <= F64_TOL and r["compile"]["grads"] <= F64_TOL
    assert r["gradcheck"] and r["opcheck"]
    assert r["bfloat16"]["dtype"] == "bfloat16" and r["bfloat16"]["forward"] <= 2e-2
    assert r["noncontiguous"] <= F64_TOL
    assert "kernel_size" in r["bad_kernel"] and "4" in r["bad_kernel"]
    assert r["bad_shape"] is not None and "query" in r["bad_shape"]
    threads = r["threads"]
    assert threads["default"] >= 1 and threads["restored"] == threads["default"]
    assert threads["serial_equal"] and threads["pool3_equal"]
    assert r["concurrent_equal"]


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    print("RESULT " + json.dumps(WORKERS[(sys.argv[1], sys.argv[2])]()), flush=True)
