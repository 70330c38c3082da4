#!/usr/bin/env python3
"""SAPA-D against SAPA-B on the running Keras backend, compiled and builtin, at W1.

    KERAS_BACKEND=jax python scripts/bench_deform.py [--rounds 7]

W1: B=2, 32x32 -> 64x64, C=256, float32; SAPA-D with the official defaults (P=9, G=4,
E=32, offsets uniform in +-1.5 pixels), SAPA-B with K=5, d=64. Cases, each through
``keras_sapa.ops`` as users call it: SAPA-B compiled forward and forward+backward,
SAPA-D compiled and builtin (``"xla"``) forward and forward+backward, and bilinear
resizing of the value. TensorFlow runs eagerly (the custom ops), JAX under ``jax.jit``,
PyTorch eagerly. ``fwd+bwd`` is the forward and the gradients of every input for a
fixed upstream gradient. Rounds interleave the cases (``bench_bindings.time_rounds``);
each ratio is taken within a round and the median over rounds printed (with the min-max
spread), so the ratios compare cases measured under the same load. Targets (issue 22):
SAPA-D compiled forward within 2x of SAPA-B's, its forward+backward within 3.5x of its
forward.
"""

import argparse
import os
import sys

import keras
import numpy as np

from keras_sapa import ops as sapa_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bindings  # noqa: E402  (the interleaved timing loop and the ratio table)

B, H, W, C, S = 2, 32, 32, 256, 2
P, G, E, K, D = 9, 4, 32, 5, 64


def _data():
    rng = np.random.default_rng(0)

    def f(*shape):
        return rng.standard_normal(shape).astype("float32")

    return {
        "sapa_b": (f(B, S * H, S * W, D), f(B, H, W, D), f(B, H, W, C)),
        "sapa_d": (
            f(B, S * H, S * W, G * E),
            f(B, H, W, G * E),
            f(B, H, W, C),
            rng.uniform(-1.5, 1.5, (B, S * H, S * W, 2 * G * P)).astype("float32"),
        ),
        "grad": f(B, S * H, S * W, C),
    }


def _functions():
    def sapa_d(implementation):
        def fn(q, k, v, o):
            return sapa_ops.sapa_deform(
                q, k, v, o, num_points=P, up_factor=S, groups=G,
                implementation=implementation, training=True,
            )  # fmt: skip

        return fn

    def sapa_b(q, k, v):
        return sapa_ops.sapa(q, k, v, K, S, implementation="compiled", training=True)

    def bilinear(v):
        return keras.ops.image.resize(v, (S * H, S * W), interpolation="bilinear")

    return sapa_b, sapa_d("compiled"), sapa_d("xla"), bilinear


def _runners(grad):
    """(forward runner, forward+backward runner) factories for the running backend."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        g = tf.constant(grad)

        def fwd(fn, *args):
            args = [tf.constant(a) for a in args]
            return lambda: fn(*args).numpy()

        def fwd_bwd(fn, *args):
            args = [tf.constant(a) for a in args]

            def run():
                with tf.GradientTape() as tape:
                    tape.watch(args)
                    out = fn(*args)
                return [t.numpy() for t in tape.gradient(out, args, g)]

            return run

    elif backend == "jax":
        import jax

        g = jax.numpy.asarray(grad)

        def fwd(fn, *args):
            jitted, args = jax.jit(fn), [jax.numpy.asarray(a) for a in args]
            return lambda: jitted(*args).block_until_ready()

        def fwd_bwd(fn, *args):
            jitted = jax.jit(lambda *a: jax.vjp(fn, *a)[1](g))
            args = [jax.numpy.asarray(a) for a in args]
            return lambda: jax.block_until_ready(jitted(*args))

    else:
        import torch

        g = torch.tensor(grad)

        def fwd(fn, *args):
            args = [torch.tensor(a) for a in args]

            def run():
                with torch.no_grad():
                    return fn(*args)

            return run

        def fwd_bwd(fn, *args):
            args = [torch.tensor(a, requires_grad=True) for a in args]
            return lambda: torch.autograd.grad(fn(*args), args, g)

    return fwd, fwd_bwd


# (label, (numerator case, phase), (denominator case, phase)); phase "fwd" or "fb".
RATIOS = [
    ("D compiled fwd / B compiled fwd", ("D compiled", "fwd"), ("B compiled", "fwd")),
    ("D compiled fwd+bwd / D compiled fwd", ("D compiled", "fb"), ("D compiled", "fwd")),
    ("B compiled fwd+bwd / B compiled fwd", ("B compiled", "fb"), ("B compiled", "fwd")),
    ("D builtin fwd / D compiled fwd", ("D builtin", "fwd"), ("D compiled", "fwd")),
    ("D builtin fwd+bwd / D compiled fwd+bwd", ("D builtin", "fb"), ("D compiled", "fb")),
    ("D compiled fwd / bilinear", ("D compiled", "fwd"), ("bilinear", "fwd")),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    data = _data()
    fwd, fwd_bwd = _runners(data["grad"])
    sapa_b, sapa_d, sapa_d_builtin, bilinear = _functions()
    cases = {  # label: (forward, forward+backward)
        label: (fwd(fn, *inputs), fwd_bwd(fn, *inputs))
        for label, fn, inputs in (
            ("B compiled", sapa_b, data["sapa_b"]),
            ("D compiled", sapa_d, data["sapa_d"]),
            ("D builtin", sapa_d_builtin, data["sapa_d"]),
            ("bilinear", bilinear, data["sapa_d"][2:3]),
        )
    }
    samples = bench_bindings.time_rounds(cases, args.rounds, calls=1)
    print(
        f"W1 on {keras.config.backend()}, {args.rounds} rounds, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    bench_bindings.print_table(cases, samples)
    for label, num, den in RATIOS:
        print(f"  {label:40s} {bench_bindings.fmt(bench_bindings.ratio(samples, num, den))}")


if __name__ == "__main__":
    main()
