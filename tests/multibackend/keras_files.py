"""Helper of tests/test_backends.py (not a test module): the ``.keras`` file exchange
between backends.

``save(directory)`` builds a small functional model with two SAPA layers (one
channels_first; where the running backend has compiled kernels, the second one saved
with ``implementation="compiled"``), gives it random weights, and writes
``directory/model_<backend>.keras`` with its outputs ``directory/out_<backend>.npy`` on
fixed inputs. ``load(directory, others)`` reloads the files of the other backends
(waiting until they are written) and checks their outputs on the running backend; it
returns one ``"<other> -> <backend>: ok ..."`` line per file.

Every backend runs both in one process: the main (TensorFlow) pytest process, and the
JAX and PyTorch processes of ``run_backend.py``.
"""

import os
import time
import warnings

import keras
import numpy as np

from keras_sapa import SAPA
from keras_sapa import ops as sapa_ops


def _inputs():
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((2, 3, 5, 8)).astype(np.float32),
        rng.standard_normal((2, 6, 10, 6)).astype(np.float32),
    )


def _build():
    x_in = keras.Input((None, None, 8), name="x")
    guide_in = keras.Input((None, None, 6), name="guide")
    implementation = "compiled" if sapa_ops.compiled_available() else "auto"
    up = SAPA(kernel_size=3, embedding_dim=4, variant="gated", name="sapa_a")(x_in, guide_in)
    up = keras.layers.Permute((3, 1, 2))(up)
    guide_cf = keras.layers.Permute((3, 1, 2))(guide_in)
    x_cf = keras.layers.Permute((3, 1, 2))(x_in)
    up2 = SAPA(
        kernel_size=5,
        embedding_dim=4,
        variant="bilinear",
        output_dim=5,
        data_format="channels_first",
        implementation=implementation,
        name="sapa_b",
    )(x_cf, guide_cf)
    out = keras.layers.Concatenate(axis=1)([up, up2])
    return keras.Model([x_in, guide_in], keras.layers.Permute((2, 3, 1))(out))


def _paths(directory, backend):
    return (
        os.path.join(directory, f"model_{backend}.keras"),
        os.path.join(directory, f"out_{backend}.npy"),
    )


def save(directory):
    """Writes this backend's model and outputs; the outputs file last (renamed into
    place), so a reader that sees it finds both complete."""
    backend = keras.config.backend()
    model = _build()
    rng = np.random.default_rng(2)
    model.set_weights(
        [
            rng.standard_normal(w.shape).astype("float32") * 0.5
            + (1.0 if "gamma" in w.path else 0.0)
            for w in model.weights
        ]
    )
    out = model.predict(list(_inputs()), verbose=0)
    model_path, out_path = _paths(directory, backend)
    model.save(model_path)
    np.save(out_path + ".tmp.npy", out)
    os.replace(out_path + ".tmp.npy", out_path)
    return f"saved on {backend}: sapa_b runs {model.get_layer('sapa_b').implementation!r}"


def load(directory, others, timeout=1200):
    """Loads each backend's file in ``others`` here; raises if one is missing after
    ``timeout`` seconds or gives other outputs."""
    backend = keras.config.backend()
    lines = []
    for other in others:
        model_path, out_path = _paths(directory, other)
        deadline = time.monotonic() + timeout
        while not os.path.exists(out_path):
            failed = os.path.join(directory, f"failed_{other}")
            if os.path.exists(failed) or time.monotonic() > deadline:
                raise RuntimeError(f"no .keras file from the {other} backend in {directory}")
            time.sleep(0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(model_path)
        notes = [str(w.message)[:60] for w in caught if "compiled" in str(w.message)]
        out = model.predict(list(_inputs()), verbose=0)
        expected = np.load(out_path)
        np.testing.assert_allclose(
            out, expected, rtol=1e-5, atol=1e-5, err_msg=f"{other} file on {backend}"
        )
        lines.append(
            f"{other} -> {backend}: ok, max diff {np.abs(out - expected).max():.2e}, "
            f"warnings {notes}"
        )
    return lines
