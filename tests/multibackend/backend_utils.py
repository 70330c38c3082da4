"""Small backend-neutral helpers for the tests in this folder: NumPy conversion,
gradients through each backend's own autodiff, float64 directional finite differences,
the layer-weight randomisation and the SAPA-D layer of a test case, shared with
``tests/test_export.py``, ``tests/test_deform.py`` and ``tests/test_convert_deform.py``."""

import keras
import numpy as np

# The sublayers of SAPA (norms, projections) and SAPA-D (norms, q, k, the offset conv),
# by their names in the official modules.
PARAM_NAMES = ("norm_x", "norm_y", "q", "k", "qy", "qx", "gate", "v", "offset")


def to_numpy(t):
    return keras.ops.convert_to_numpy(t)


def randomise(layer, rng, scale=0.5):
    """Gives every weight of a built SAPA or SAPADeform layer a random value (initial
    weights are too tame to test with) and returns them as reference params in the
    official naming, Keras layouts. Norm scales are centred on 1; SAPA-D's offset conv
    gets twice the scale (offsets of a few pixels: many points move across cells or are
    dropped). Shared by the layer, backend and export tests."""
    params = {}
    for name in PARAM_NAMES:
        sub = getattr(layer, name, None)
        if sub is None:
            continue
        new = []
        for weight, suffix in zip(sub.weights, ("weight", "bias"), strict=False):
            value = rng.standard_normal(weight.shape) * scale
            if name.startswith("norm") and suffix == "weight":
                value += 1.0
            if name == "offset":
                value = value * 2.0
            value = value.astype(weight.dtype)
            new.append(value)
            params[f"{name}.{suffix}"] = value  # exactly what the layer holds
        sub.set_weights(new)
    return params


# A SAPA-D layer test case: these SAPADeform arguments, in this order (``norm`` a bool:
# GroupNorm or none). ``official_deform_torch.random_module`` reads the same tuples.
DEFORM_CASE = ("num_points", "groups", "up_factor", "high_offset", "norm", "data_format")


def deform_layer(case, embedding_dim=4):
    """The (unbuilt) SAPADeform layer of a test case (``DEFORM_CASE``)."""
    from keras_sapa.deform import SAPADeform

    settings = dict(zip(DEFORM_CASE, case, strict=True))
    settings["norm"] = "group" if settings["norm"] else None
    return SAPADeform(embedding_dim=embedding_dim, **settings)


def value_and_vjp(fn, args, cotangent):
    """``(fn(*args), gradients of sum(fn(*args) * cotangent))`` with respect to every
    array in ``args``, through the running backend's autodiff, as NumPy arrays: the
    forward of the same call (on JAX, one ``jax.jit`` of the forward and backward: op by
    op, a second eager forward compiled each of its ops again)."""
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        @jax.jit
        def run(arrays, cot):
            out, pull = jax.vjp(fn, *arrays)
            return out, pull(cot)

        arrays = [jax.numpy.asarray(a) for a in args]
        out, grads = run(arrays, jax.numpy.asarray(cotangent))
        return np.asarray(out), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        out = fn(*tensors)
        grads = torch.autograd.grad(out, tensors, torch.as_tensor(cotangent))
        return out.detach().cpu().numpy(), [g.detach().cpu().numpy() for g in grads]
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = fn(*tensors)
        grads = tape.gradient(out, tensors, tf.constant(cotangent))
        return out.numpy(), [g.numpy() for g in grads]
    raise NotImplementedError(f"no autodiff on the {backend!r} backend")


def vjp(fn, args, cotangent):
    """The gradients of :func:`value_and_vjp`."""
    return value_and_vjp(fn, args, cotangent)[1]


def _compiled(fn):
    """``fn`` jitted on JAX, where op-by-op dispatch makes the many calls of a finite
    difference slow; unchanged elsewhere."""
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def directional_derivative(fn, args, directions, cotangent, eps=1e-5, jit=True):
    """``d/dt sum(fn(args + t * directions) * cotangent)`` at 0 by central
    differences in float64. ``jit=False`` for a NumPy ``fn`` (the loop reference),
    which is never jitted."""
    if jit:
        fn = _compiled(fn)
    plus = [a + eps * d for a, d in zip(args, directions, strict=True)]
    minus = [a - eps * d for a, d in zip(args, directions, strict=True)]
    return float(np.sum((to_numpy(fn(*plus)) - to_numpy(fn(*minus))) * cotangent) / (2 * eps))
