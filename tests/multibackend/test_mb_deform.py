"""SAPA-D on the running backend (TensorFlow in the main run, JAX and PyTorch through
``tests/test_backends.py``): the builtin ops against the NumPy loop reference, forward
and backward (the kernels' rule at integer positions and dropped points included),
and the SAPADeform layer against the PyTorch stand-in of the official module, forward
and gradients of both inputs and every weight."""

import keras
import numpy as np
import pytest

import reference_deform as ref
from backend_utils import deform_layer
from backend_utils import to_numpy
from backend_utils import vjp
from keras_sapa.ops import _deform as deform_ops


def _inputs(
    rng, batch, height, width, groups, e, points, s, channels, dtype=np.float32, away=False
):
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    out = (batch, s * height, s * width)
    if away:
        o = ref.offsets_away_from_integers(rng, out + (2 * groups * points,), spread=2.5)
    else:
        o = rng.uniform(-2.5, 2.5, out + (2 * groups * points,))
        o[0, 0, 0, : 2 * min(points * groups, 4)] = [
            0.0,
            1.0,
            -1.0,
            0.5,
            float(width),
            0.0,
            2.0,
            float(height),
        ][: 2 * min(points * groups, 4)]
        if points * groups > 5:
            o[0, 0, 1, 10] = np.nan  # point 5 of output point (0, 1) is dropped
    return (
        f(*out, groups * e) * 0.5,
        f(batch, height, width, groups * e),
        f(batch, height, width, channels),
        o.astype(dtype),
    )


def _compiled(fn):
    """``fn`` under ``jax.jit`` / ``tf.function`` (eager op-by-op dispatch makes the many
    small calls of these tests slow there); unchanged on PyTorch."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


def _numeric_vjp(fn, args, cotangent, eps=1e-6):
    """Central differences of ``sum(fn(*args) * cotangent)`` for every element of
    every argument, float64 (tiny arrays only)."""
    fn = _compiled(fn)
    grads = []
    for index, arg in enumerate(args):
        grad = np.zeros_like(arg)
        for position in np.ndindex(arg.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[index][position] += eps
            minus[index][position] -= eps
            grad[position] = np.sum((to_numpy(fn(*plus)) - to_numpy(fn(*minus))) * cotangent) / (
                2 * eps
            )
        grads.append(grad)
    return grads


@pytest.mark.parametrize(
    "case",
    [(2, 3, 4, 2, 3, 3, 2, 4), (1, 4, 4, 4, 32, 9, 2, 256), (1, 2, 3, 1, 2, 4, 3, 3)],
    ids=["small", "real-C256-E32-P9-G4", "odd-s3"],
)
def test_ops_match_reference(case):
    _, height, width, groups, _, points, s, _ = case
    rng = np.random.default_rng(sum(case))
    q, k, v, o = _inputs(rng, *case)
    w = rng.standard_normal(q.shape[:3] + (groups * points,)).astype(np.float32)
    args = dict(num_points=points, up_factor=s, groups=groups)
    # Eager on TensorFlow and PyTorch; jitted on JAX (the way JAX code runs).
    jit = _compiled if keras.config.backend() == "jax" else (lambda f: f)
    sapa_deform = jit(lambda *a: deform_ops.sapa_deform(*a, **args))
    similarity = jit(lambda *a: deform_ops.deform_similarity(*a, **args))
    aggregate = jit(lambda *a: deform_ops.deform_aggregate(*a, **args))
    np.testing.assert_allclose(
        to_numpy(sapa_deform(q, k, v, o)),
        ref.sapa_deform(q, k, v, o, points, s, groups),
        rtol=1e-5,
        atol=2e-5,
    )
    np.testing.assert_allclose(
        to_numpy(similarity(q, k, o)),
        ref.deform_similarity(q, k, o, points, s, groups),
        rtol=1e-5,
        atol=2e-5,
    )
    np.testing.assert_allclose(
        to_numpy(aggregate(w, v, o)),
        ref.deform_aggregate(w, v, o, points, s, groups),
        rtol=1e-5,
        atol=2e-5,
    )


def test_gradients_match_reference_and_numeric():
    """float64 gradients of all four inputs: against the reference's chain-rule VJP
    (integer positions and dropped points included: the kernels' rule), and against
    central differences of the op itself where no position is near an integer."""
    rng = np.random.default_rng(5)
    groups, points, s = 2, 4, 2
    args = dict(num_points=points, up_factor=s, groups=groups)

    def fn(*a):
        return deform_ops.sapa_deform(*a, **args)

    q, k, v, o = _inputs(rng, 1, 3, 3, groups, 2, points, s, 4, dtype=np.float64)
    o[0, 1] = np.round(o[0, 1])  # a row of output points on integer positions
    g = rng.standard_normal(q.shape[:3] + (4,))
    grads = vjp(fn, [q, k, v, o], g)
    assert all(np.isfinite(grad).all() for grad in grads)
    expected = ref.sapa_deform_vjp(q, k, v, o, g, points, s, groups)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)

    q, k, v, o = _inputs(rng, 1, 1, 2, 1, 1, 2, s, 2, dtype=np.float64, away=True)
    args.update(num_points=2, groups=1)
    g = rng.standard_normal(q.shape[:3] + (2,))
    for got, want in zip(vjp(fn, [q, k, v, o], g), _numeric_vjp(fn, [q, k, v, o], g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_compiled_raises_where_the_kernels_are_unavailable(monkeypatch):
    """The compiled kernels themselves: tests/multibackend/test_mb_deform_compiled.py."""
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    rng = np.random.default_rng(6)
    q, k, v, o = _inputs(rng, 1, 2, 2, 1, 2, 2, 2, 2)
    with pytest.raises(RuntimeError, match="compiled"):
        deform_ops.sapa_deform(q, k, v, o, num_points=2, groups=1, implementation="compiled")


# ------------------------------------------------------------------ official parity


def _layer_grads(layer, x, y, cotangent):
    """(output, [d x, d y, d weight for each trainable weight]) on the running backend."""
    backend = keras.config.backend()
    weights = layer.trainable_weights
    if backend == "jax":
        import jax

        non_trainable = [w.value for w in layer.non_trainable_weights]

        def run(trainable, xi, yi):
            return layer.stateless_call(trainable, non_trainable, xi, yi)[0]

        @jax.jit
        def forward_backward(trainable, xi, yi, cot):
            out, pull = jax.vjp(run, trainable, xi, yi)
            return out, pull(cot)

        out, (d_weights, d_x, d_y) = forward_backward(
            [w.value for w in weights], x, y, jax.numpy.asarray(cotangent)
        )
        return np.asarray(out), [np.asarray(d_x), np.asarray(d_y)] + [
            np.asarray(d) for d in d_weights
        ]
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        yt = torch.tensor(y, requires_grad=True)
        out = layer(xt, yt)
        grads = torch.autograd.grad(
            out, [xt, yt] + [w.value for w in weights], torch.as_tensor(cotangent)
        )
        return out.detach().cpu().numpy(), [g.detach().cpu().numpy() for g in grads]
    import tensorflow as tf

    xt, yt = tf.constant(x), tf.constant(y)
    with tf.GradientTape() as tape:
        tape.watch([xt, yt])
        out = layer(xt, yt)
    grads = tape.gradient(out, [xt, yt] + weights, tf.constant(cotangent))
    return out.numpy(), [g.numpy() for g in grads]


@pytest.mark.parametrize(
    "case",
    [(9, 4, 2, True, False, "channels_last"), (4, 1, 3, False, True, "channels_first")],
    ids=["p9-g4-s2-high-nonorm-nhwc", "p4-g1-s3-low-gn-nchw"],
)
def test_layer_matches_official_module(case):
    torch = pytest.importorskip("torch")
    import official_deform_torch as official
    from keras_sapa import convert

    points, groups, s, high, norm, fmt = case
    module, cx, cy = official.random_module(case, seed=points)
    rng = np.random.default_rng(points)
    x = rng.standard_normal((2, cx, 3, 2))
    y = rng.standard_normal((2, cy, 3 * s, 2 * s))
    cot = rng.standard_normal((2, cx, 3 * s, 2 * s))
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    out_t = module(ty, tx)
    (out_t * torch.tensor(cot)).sum().backward()

    layer = deform_layer(case)
    last = fmt == "channels_last"
    to_layer = (lambda t: np.ascontiguousarray(t.transpose(0, 2, 3, 1))) if last else (lambda t: t)
    layer.build(to_layer(x).shape, to_layer(y).shape)
    convert.load_torch_state_dict(layer, module.state_dict())
    out, grads = _layer_grads(
        layer,
        to_layer(x).astype(np.float32),
        to_layer(y).astype(np.float32),
        to_layer(cot).astype(np.float32),
    )
    np.testing.assert_allclose(out, to_layer(out_t.detach().numpy()), rtol=1e-5, atol=1e-5)

    def close(got, expected, what):
        np.testing.assert_allclose(
            got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=what
        )

    close(grads[0], to_layer(tx.grad.numpy()), "d x")
    close(grads[1], to_layer(ty.grad.numpy()), "d guide")
    params = dict(module.named_parameters())
    names = {id(variable): name for name, variable, _ in convert._slots(layer)}
    for variable, grad in zip(layer.trainable_weights, grads[2:], strict=True):
        name = names[id(variable)]
        got = grad.T[:, :, None, None] if grad.ndim == 2 else grad
        close(got, params[name].grad.numpy(), f"d {name}")
