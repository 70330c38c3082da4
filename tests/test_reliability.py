"""Reliability: property-based tests over shapes, dtypes and implementations against the
NumPy reference (forward and gradient), determinism, odd inputs, threads.

The number of generated cases is set by the hypothesis profile: ``ci`` (default,
several hundred cases in all) or ``nightly`` (``HYPOTHESIS_PROFILE=nightly``, ten times
more).
"""

import collections
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import reference as ref
from keras_sapa import ops

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "nightly",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

IMPLEMENTATIONS = ["patches", "xla"] + (["compiled"] if ops.compiled_available() else [])
TOLERANCE = {"float64": 1e-9, "float32": 2e-5, "float16": 3e-2, "bfloat16": 2e-1}


Problem = collections.namedtuple(
    "Problem", "query key value kernel_size up_factor dtype implementation"
)


@st.composite
def problems(draw, dtypes=("float32", "float64", "float16")):
    """A random SAPA problem: sizes including 1 and an empty batch."""
    up_factor = draw(st.integers(1, 3))
    kernel_size = draw(st.sampled_from([1, 3, 5]))
    batch = draw(st.integers(0, 2))
    height, width = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(dtypes))
    implementation = draw(st.sampled_from(IMPLEMENTATIONS))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((batch, up_factor * height, up_factor * width, d))
    key = rng.standard_normal((batch, height, width, d))
    value = rng.standard_normal((batch, height, width, c))
    return Problem(query, key, value, kernel_size, up_factor, dtype, implementation)


def _cast(array, dtype):
    return (
        tf.constant(array.astype(np.float32), tf.float32)
        if dtype == "bfloat16"
        else tf.constant(array.astype(dtype))
    )


@given(problems(dtypes=("float32", "float64", "float16", "bfloat16")))
def test_forward_property(p):
    k, s, impl, dtype = p.kernel_size, p.up_factor, p.implementation, p.dtype
    tf_dtype = tf.as_dtype(dtype)
    q, key, v = (tf.cast(_cast(a, dtype), tf_dtype) for a in (p.query, p.key, p.value))
    # The reference sees exactly the rounded inputs the op sees.
    q64, k64, v64 = (t.numpy().astype(np.float64) for t in (q, key, v))
    tol = TOLERANCE[dtype]

    sim = ops.similarity(q, key, k, s, impl)
    assert sim.dtype == tf_dtype and sim.shape == q.shape[:3] + (k * k,)
    expected = ref.similarity(q64, k64, k, s)
    np.testing.assert_allclose(
        sim.numpy().astype(np.float64),
        expected,
        rtol=tol,
        atol=tol * (1 + np.abs(expected).max(initial=0)),
    )

    out = ops.sapa(q, key, v, k, s, impl)
    assert out.dtype == tf_dtype and out.shape == q.shape[:3] + v.shape[3:]
    expected = ref.sapa(q64, k64, v64, k, s)
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=tol, atol=tol * 4)


@settings(max_examples=max(20, settings().max_examples // 3))
@given(problems(dtypes=("float64",)))
def test_gradient_property(p):
    """Gradients of every implementation against the reference's analytic VJP (itself
    checked against central differences in test_real_sizes)."""
    k, s, impl = p.kernel_size, p.up_factor, p.implementation
    args = [p.query, p.key, p.value]
    rng = np.random.default_rng(0)
    cotangent = rng.standard_normal(p.query.shape[:3] + p.value.shape[3:])
    tensors = [tf.constant(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        out = ops.sapa(*tensors, k, s, impl)
        loss = tf.reduce_sum(out * cotangent)
    got = tape.gradient(loss, tensors)
    expected = ref.sapa_vjp(*args, cotangent, k, s)
    for g, e in zip(got, expected, strict=True):
        g = np.zeros_like(e) if g is None else g.numpy()
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nan_and_inf_propagate_without_crash(implementation):
    rng = np.random.default_rng(1)
    query = rng.standard_normal((1, 8, 8, 2)).astype(np.float32)
    key = rng.standard_normal((1, 4, 4, 2)).astype(np.float32)
    value = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
    value[0, 0, 0, 1] = np.nan
    value[0, 3, 3, 2] = np.inf
    out = ops.sapa(query, key, value, 3, 2, implementation).numpy()
    expected = ref.sapa(query, key, value, 3, 2)
    # Same non-finite pattern as the reference: exactly the windows that hold them.
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(expected))
    finite = np.isfinite(expected)
    assert finite.any() and (~finite).any()
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_concurrent_calls_from_threads(implementation):
    rng = np.random.default_rng(2)
    cases = []
    for i in range(6):
        h, w = 2 + i % 3, 3 + i % 2
        cases.append(
            (
                rng.standard_normal((1, 2 * h, 2 * w, 3)).astype(np.float32),
                rng.standard_normal((1, h, w, 3)).astype(np.float32),
                rng.standard_normal((1, h, w, 4)).astype(np.float32),
            )
        )
    results, errors = [None] * len(cases), []

    def work(index):
        try:
            for _ in range(3):
                results[index] = ops.sapa(*cases[index], 3, 2, implementation).numpy()
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for case, result in zip(cases, results, strict=False):
        np.testing.assert_allclose(result, ref.sapa(*case, 3, 2), rtol=1e-5, atol=1e-5)


def _run_script(script, timeout=300, env=None):
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


# One fresh process for two checks that need one (logical devices are set before
# TensorFlow starts; op determinism is process-wide): the MirroredStrategy run first, then
# op determinism switched on for the bitwise check.
FRESH_SCRIPT = f"""
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, keras_sapa
from keras_sapa import ops

def build():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((4, 4, 8)); g_in = keras.Input((8, 8, 6))
    h = keras_sapa.SAPA(kernel_size=3, embedding_dim=4, variant="gated")(x_in, g_in)
    model = keras.Model([x_in, g_in], keras.layers.Conv2D(2, 1)(h))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model

rng = np.random.default_rng(0)
x = rng.standard_normal((8, 4, 4, 8)).astype("float32")
g = rng.standard_normal((8, 8, 8, 6)).astype("float32")
y = rng.standard_normal((8, 8, 8, 2)).astype("float32")
single = build()
single.fit([x, g], y, batch_size=4, epochs=3, shuffle=False, verbose=0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    mirrored = build()
mirrored.fit([x, g], y, batch_size=4, epochs=3, shuffle=False, verbose=0)
initial = build()
moved = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), initial.get_weights()))
assert moved > 1e-4, moved
diff = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), mirrored.get_weights()))
print("max weight difference", diff, "moved", moved)
assert diff < 1e-5, diff

tf.config.experimental.enable_op_determinism()
q = tf.constant(rng.standard_normal((2, 16, 12, 8)), tf.float32)
k = tf.constant(rng.standard_normal((2, 8, 6, 8)), tf.float32)
v = tf.constant(rng.standard_normal((2, 8, 6, 16)), tf.float32)
for impl in {IMPLEMENTATIONS!r}:
    runs = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = ops.sapa(q, k, v, 5, 2, impl)
            loss = tf.reduce_sum(tf.sin(out))
        grads = tape.gradient(loss, [q, k, v])
        runs.append([out.numpy()] + [g.numpy() for g in grads])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert a.tobytes() == b.tobytes(), impl
    print("deterministic", impl)
"""


@pytest.fixture(scope="module")
def fresh_process_output():
    return _run_script(FRESH_SCRIPT)


def test_op_determinism_bitwise(fresh_process_output):
    """With op determinism on, repeated runs give bitwise-equal outputs and gradients."""
    for impl in IMPLEMENTATIONS:
        assert f"deterministic {impl}" in fresh_process_output


def test_mirrored_strategy_matches_single_device(fresh_process_output):
    """Two logical CPU replicas reach the weights of one device on the same global
    batch."""
    assert "max weight difference" in fresh_process_output


MULTI_WORKER_SCRIPT = """
import numpy as np, tensorflow as tf
import keras, keras_sapa
strategy = tf.distribute.MultiWorkerMirroredStrategy()
GLOBAL = 4
def build():
    keras.utils.set_random_seed(0)
    x_in = keras.Input((4, 4, 8)); g_in = keras.Input((8, 8, 6))
    h = keras_sapa.SAPA(kernel_size=3, embedding_dim=4, variant="gated")(x_in, g_in)
    return keras.Model([x_in, g_in], keras.layers.Conv2D(2, 1)(h))
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 4, 4, 8)).astype("float32")
g = rng.standard_normal((8, 8, 8, 6)).astype("float32")
y = rng.standard_normal((8, 8, 8, 2)).astype("float32")
def dataset_fn(ctx):
    per = ctx.get_per_replica_batch_size(GLOBAL)
    i, n = ctx.input_pipeline_id, ctx.num_input_pipelines
    # Worker i takes its slice of every global batch, so the union is the global batch.
    idx = np.concatenate([np.arange(b * GLOBAL + i * per, b * GLOBAL + (i + 1) * per)
                          for b in range(len(x) // GLOBAL)])
    return tf.data.Dataset.from_tensor_slices(((x[idx], g[idx]), y[idx])).batch(per)
with strategy.scope():
    model = build()
    optimizer = keras.optimizers.SGD(0.05)
    optimizer.build(model.trainable_variables)
@tf.function
def step(batch):
    def replica_fn(batch):
        (xb, gb), yb = batch
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model([xb, gb], training=True) - yb),
                                         axis=[1, 2, 3])
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    strategy.run(replica_fn, args=(batch,))
for epoch in range(3):
    for batch in strategy.distribute_datasets_from_function(dataset_fn):
        step(batch)
# single-device reference of the same global batches
ref = build(); opt = keras.optimizers.SGD(0.05)
for epoch in range(3):
    for b in range(2):
        sl = slice(b * GLOBAL, (b + 1) * GLOBAL)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(ref([x[sl], g[sl]], training=True) - y[sl]))
        opt.apply_gradients(zip(tape.gradient(loss, ref.trainable_variables),
                                ref.trainable_variables))
diff = max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(model.weights, ref.weights))
moved = max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(ref.weights, build().weights))
print("replicas", strategy.num_replicas_in_sync, "diff", diff, "moved", moved)
"""


def test_multi_worker_mirrored_strategy_on_localhost(tmp_path):
    """Two worker processes on 127.0.0.1 (MultiWorkerMirroredStrategy, custom loop:
    Keras 3's fit cannot take MultiWorker per-replica batches) reach the weights of a
    single-device run of the same global batches."""
    import json
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(MULTI_WORKER_SCRIPT)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
            outputs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for stdout in outputs:
        line = [x for x in stdout.splitlines() if x.startswith("replicas")][-1]
        _, replicas, _, diff, _, moved = line.split()
        assert int(replicas) == 2
        assert float(moved) > 1e-4 and float(diff) < 1e-5, line
