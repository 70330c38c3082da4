"""What a LiteRT export of a SAPA layer costs (``python scripts/bench_export.py``).

One SAPA layer (bilinear, K=5, d=64) at workload W1 (x: 2x32x32x256, guide 2x64x64x256
by default), exported with ``model.export(format="litert")``. Prints the ``.tflite``
size against the layer's float32 weights, and the median time of one call, interleaved
round by round in one process, of: the LiteRT interpreter (its default CPU delegate,
XNNPACK), the same model's ``tf.function`` (TensorFlow graph, builtin ``xla``
formulation: what a SavedModel serves) and the eager Keras call (``"auto"``: the
compiled op when built). Ratios are against the TensorFlow graph.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--low", type=int, default=32, help="low-resolution height/width")
    parser.add_argument("--channels", type=int, default=256)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    import keras_sapa

    b, h, c = args.batch, args.low, args.channels
    x_in = keras.Input((h, h, c), batch_size=b)
    g_in = keras.Input((2 * h, 2 * h, c), batch_size=b)
    model = keras.Model([x_in, g_in], keras_sapa.SAPA(kernel_size=5, embedding_dim=64)(x_in, g_in))
    rng = np.random.default_rng(0)
    for weight in model.weights:  # distinct kernels, so none is stored once for two
        if weight.path.endswith("kernel"):
            weight.assign(rng.standard_normal(weight.shape).astype("float32") * 0.05)
    x = rng.standard_normal((b, h, h, c)).astype("float32")
    g = rng.standard_normal((b, 2 * h, 2 * h, c)).astype("float32")
    eager_out = model([x, g]).numpy()

    path = os.path.join(tempfile.mkdtemp(), "sapa.tflite")
    start = time.perf_counter()
    model.export(path, format="litert", verbose=False)
    convert_s = time.perf_counter() - start
    runner = Interpreter(model_path=path).get_signature_runner()
    feeds = {}
    for name, spec in runner.get_input_details().items():  # batch is dynamic: match the rest
        feeds[name] = x if tuple(spec["shape"][1:]) == x.shape[1:] else g
    litert_out = list(runner(**feeds).values())[0]
    graph = tf.function(lambda x, g: model([x, g]))
    graph_out = graph(x, g).numpy()

    cases = {
        "LiteRT interpreter": lambda: runner(**feeds),
        "TF graph (builtin)": lambda: graph(x, g).numpy(),
        "Keras eager (auto)": lambda: model([x, g]).numpy(),
    }
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    print(f"SAPA bilinear K=5 d=64: x {x.shape}, guide {g.shape}")
    print(
        f"  .tflite size {os.path.getsize(path) / 1024:.1f} KiB "
        f"(float32 weights {weights / 1024:.1f} KiB), conversion {convert_s:.1f} s"
    )
    print(
        f"  max |LiteRT - eager| {np.abs(litert_out - eager_out).max():.2e}, "
        f"max |graph - eager| {np.abs(graph_out - eager_out).max():.2e}"
    )
    base = float(np.median(times["TF graph (builtin)"]))
    for name, values in times.items():
        ms = 1e3 * float(np.median(values))
        print(f"  {name:20s} {ms:8.1f} ms  x{ms / (1e3 * base):5.2f} vs TF graph")


if __name__ == "__main__":
    main()
