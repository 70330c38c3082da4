#!/usr/bin/env python3
"""SAPA's compiled CPU kernels against the peers a user would otherwise run, in one process.

    python scripts/bench_peers.py [--rounds 7] [--calls 3] [--size B,H,W,s,K,d,C]

At W1 by default (B=2, 32x32 -> 64x64, C=256, d=64, K=5, s=2, float32), forward and
forward+backward (the gradients of query, key and value for a fixed upstream gradient):

- ``tf compiled`` and ``torch compiled``: this package's fused kernels (the TensorFlow op
  in a ``tf.function``; the PyTorch custom op, eager), as ``scripts/bench_bindings.py``
  builds them;
- ``torch unfold``: the formulation of the official PyTorch code's reference path
  (``F.unfold`` + einsum), written here from the spec (shared/SAPA_SPEC.md), not copied:
  channels first, the key and the value unfolded at low resolution into K*K windows, the
  query viewed as the s x s children of each anchor, both products as einsums, softmax
  between. It materialises the (B, c, K*K, H, W) windows, the memory the fused kernels
  avoid. Its output is checked against the compiled op before timing;
- ``torch bilinear`` and ``tf bilinear``: a bilinear resize of the value, for scale.

segme's ``LocalAttention`` (a Keras layer of the segme project, not on PyPI) is timed
when ``import segme`` works (a checkout on ``PYTHONPATH``; see
docs/cpu-kernels-profile.md), else reported as not run.

Rounds interleave every case (``bench_bindings.time_rounds``); every ratio is taken
within a round before the median, so each compares cases measured under the same load.
The machine this was written on is shared: read the ratios, not the milliseconds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_bindings  # noqa: E402  (the timing loop, the compiled cases, the table)


def unfold_sapa(q, k, v, kernel_size, up_factor):
    """The official unfold formulation, channels first: q (B, d, sH, sW), k (B, d, H, W),
    v (B, C, H, W) -> (B, C, sH, sW). Key and value are unfolded at low resolution into
    (B, c, K*K, H, W) windows (K*K times their memory), the query viewed as the s x s
    children of each anchor, and both products are einsums; padded window points enter
    the softmax with logit 0 and contribute 0 (F.unfold's zero padding), as the spec says."""
    import torch
    import torch.nn.functional as F

    kk, s = kernel_size * kernel_size, up_factor
    b, d, h, w = k.shape

    def windows(x):  # (B, c, H, W) -> (B, c, K*K, H, W)
        return F.unfold(x, kernel_size, padding=kernel_size // 2).view(b, x.shape[1], kk, h, w)

    children = q.reshape(b, d, h, s, w, s)  # (anchor row, child row, anchor col, child col)
    logits = torch.einsum("bcyiwj,bcnyw->bnyiwj", children, windows(k))
    weights = torch.softmax(logits, dim=1)
    out = torch.einsum("bnyiwj,bcnyw->bcyiwj", weights, windows(v))
    return out.reshape(b, v.shape[1], h * s, w * s)


def unfold_cases(arrays, k, s):
    import torch

    q, key, v, g = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in arrays)
    leaves = [t.clone().requires_grad_(True) for t in (q, key, v)]

    def fwd():
        with torch.no_grad():
            unfold_sapa(q, key, v, k, s)

    def fb():
        for t in leaves:
            t.grad = None
        unfold_sapa(*leaves, k, s).backward(g)

    return {"torch unfold": (fwd, fb)}


def segme_cases(arrays, k, s):
    """segme's LocalAttention (NHWC TensorFlow, called on [query, key, value]) on the same
    tensors, where a segme checkout imports."""
    import importlib

    problems = []
    for module in ("segme.policy.align.sapa", "segme.common.align.sapa"):  # 3.x, 2.x
        try:
            LocalAttention = importlib.import_module(module).LocalAttention  # noqa: N806
            break
        except Exception as exc:  # not installed, or a Keras 2 checkout under Keras 3
            problems.append(f"{module}: {type(exc).__name__}: {exc}")
    else:
        print(f"# segme LocalAttention not run: {'; '.join(problems)}")
        return {}
    import tensorflow as tf

    q, key, v, g = (tf.constant(a) for a in arrays)
    layer = LocalAttention(k)
    fwd = tf.function(lambda *a: layer(list(a)))

    @tf.function
    def fb(*a):
        with tf.GradientTape() as tape:
            tape.watch(a)
            out = layer(list(a))
        return tape.gradient(out, a, output_gradients=g)

    return {
        "segme local": (
            lambda: fwd(q, key, v).numpy(),
            lambda: [t.numpy() for t in fb(q, key, v)],
        )
    }


def check_unfold(arrays, k, s):
    """The unfold formulation against the compiled PyTorch op (max abs difference)."""
    import torch

    from keras_sapa.ops import _torch_kernels

    q, key, v, _ = (torch.from_numpy(a) for a in arrays)
    ours = _torch_kernels.sapa(q, key, v, k, s)
    theirs = unfold_sapa(*(t.permute(0, 3, 1, 2) for t in (q, key, v)), k, s)
    return float((ours - theirs.permute(0, 2, 3, 1)).abs().max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--size", default="2,32,32,2,5,64,256", help="B,H,W,s,K,d,C")
    args = parser.parse_args(argv)
    b, h, w, s, k, d, c = (int(x) for x in args.size.split(","))
    arrays = bench_bindings._inputs(b, h, w, s, k, d, c)

    cases = {}
    cases.update(bench_bindings.tf_cases(arrays, k, s))
    cases.update(bench_bindings.torch_cases(arrays, k, s, skip_pure=True))
    print(f"# unfold vs torch compiled, max abs difference: {check_unfold(arrays, k, s):.2e}")
    cases.update(unfold_cases(arrays, k, s))
    cases.update(segme_cases(arrays, k, s))
    print(
        f"# B={b} {h}x{w} -> {h * s}x{w * s}, C={c}, d={d}, K={k}, s={s}, float32; "
        f"{args.rounds} rounds x {args.calls} calls; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (before timing)"
    )
    samples = bench_bindings.time_rounds(cases, args.rounds, args.calls)
    print(f"# load average after timing: {os.getloadavg()[0]:.1f}")
    bench_bindings.print_table(cases, samples)
    print("\npeer / ours (per round, median (min-max); > 1: ours is faster):")
    for peer in [label for label in cases if "compiled" not in label]:
        for ours in [label for label in cases if "compiled" in label]:
            parts = []
            for name, ph in (("fwd", "fwd"), ("fwd+bwd", "fb")):
                stats = bench_bindings.ratio(samples, (peer, ph), (ours, ph))
                parts.append(f"{name} {bench_bindings.fmt(stats, 'x')}")
            print(f"  {peer:<15} / {ours:<15} " + "   ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
