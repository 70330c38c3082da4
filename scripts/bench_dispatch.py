"""What the "auto" dispatch rule costs inference on CPU (``python scripts/bench_dispatch.py``).

In a traced graph that does not train (``predict``, ``evaluate``, exports), ``"auto"``
uses a builtin-op formulation; eagerly and in training graphs it uses the compiled op.
This script measures, in one process and interleaved round by round, the forward pass of
``ops.sapa`` in a ``tf.function`` with each implementation, and ``model.predict`` of a
one-layer SAPA model whose layers are set to each implementation with
``set_implementation``. It prints median milliseconds and the ratio of each builtin
path to the compiled op (the price of portable inference graphs).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# name: (batch, low height, low width, channels C, embedding d, kernel K, up factor s)
WORKLOADS = {
    "W1": (2, 32, 32, 256, 64, 5, 2),
    "M1": (4, 64, 64, 256, 64, 5, 2),
}


def _median_ms(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    args = parser.parse_args(argv)

    import keras

    import keras_sapa
    from keras_sapa import ops

    implementations = ["patches", "xla"]
    if ops.compiled_available():
        implementations.insert(0, "compiled")
    else:
        print("compiled op unavailable: ratios are against 'patches'", file=sys.stderr)
    base = implementations[0]
    for name in args.workloads:
        b, h, w, c, d, k, s = WORKLOADS[name]
        rng = np.random.default_rng(0)
        q = tf.constant(rng.standard_normal((b, s * h, s * w, d)), tf.float32)
        key = tf.constant(rng.standard_normal((b, h, w, d)), tf.float32)
        v = tf.constant(rng.standard_normal((b, h, w, c)), tf.float32)
        graphs = {
            impl: tf.function(lambda q, key, v, impl=impl: ops.sapa(q, key, v, k, s, impl))
            for impl in implementations
        }
        x_in = keras.Input((h, w, c))
        g_in = keras.Input((s * h, s * w, c))
        out = keras_sapa.SAPA(kernel_size=k, up_factor=s, embedding_dim=d)(x_in, g_in)
        model = keras.Model([x_in, g_in], out)
        x = rng.standard_normal((b, h, w, c)).astype("float32")
        g = rng.standard_normal((b, s * h, s * w, c)).astype("float32")
        models = {}
        for impl in implementations:
            clone = keras.Model.from_config(model.get_config())
            clone.set_weights(model.get_weights())
            ops.set_implementation(clone, impl)
            models[impl] = clone
        cases = {}
        for impl in implementations:
            cases[("ops.sapa in tf.function", impl)] = lambda f=graphs[impl]: f(q, key, v).numpy()
            cases[("model.predict", impl)] = lambda m=models[impl]: m.predict(
                [x, g], batch_size=b, verbose=0
            )
        for fn in cases.values():  # trace and warm up
            fn()
        times = {key_: [] for key_ in cases}
        for _ in range(args.rounds):
            for key_, fn in cases.items():
                times[key_].append(_median_ms(fn, 1))
        print(f"{name}: B={b} {h}x{w} -> {s * h}x{s * w}, C={c}, d={d}, K={k}")
        for what in ("ops.sapa in tf.function", "model.predict"):
            ref_ms = float(np.median(times[(what, base)]))
            for impl in implementations:
                ms = float(np.median(times[(what, impl)]))
                print(f"  {what:26s} {impl:9s} {ms:9.1f} ms  x{ms / ref_ms:5.2f} vs {base}")


if __name__ == "__main__":
    main()
