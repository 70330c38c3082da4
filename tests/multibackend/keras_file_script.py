"""Helper of tests/test_backends.py (not a test module): run as
``KERAS_BACKEND=<b> python keras_file_script.py DIR save|load ...``.

``save`` builds a small functional model with two SAPA layers (one channels_first;
on TensorFlow with the compiled op built, the second one saved with
``implementation="compiled"``), gives it random weights, and writes
``DIR/model_<backend>.keras`` and its outputs ``DIR/out_<backend>.npy`` on the shared
inputs ``DIR/inputs.npz`` (written by the first saver). ``load`` reloads the files of
the backends named on the command line and checks their outputs here.
"""

import os
import sys
import warnings

import keras
import numpy as np

from keras_sapa import SAPA
from keras_sapa import ops as sapa_ops


def build():
    x_in = keras.Input((None, None, 8), name="x")
    guide_in = keras.Input((None, None, 6), name="guide")
    implementation = "compiled" if sapa_ops.compiled_available() else "auto"
    up = SAPA(kernel_size=3, embedding_dim=4, variant="gated", name="sapa_a")(x_in, guide_in)
    up = keras.layers.Permute((3, 1, 2))(up)
    guide_cf = keras.layers.Permute((3, 1, 2))(guide_in)
    x_cf = keras.layers.Permute((3, 1, 2))(x_in)
    up2 = SAPA(kernel_size=5, embedding_dim=4, variant="bilinear", output_dim=5,
               data_format="channels_first", implementation=implementation,
               name="sapa_b")(x_cf, guide_cf)
    out = keras.layers.Concatenate(axis=1)([up, up2])
    return keras.Model([x_in, guide_in], keras.layers.Permute((2, 3, 1))(out))


def main(directory, mode, *others):
    backend = keras.config.backend()
    inputs_path = os.path.join(directory, "inputs.npz")
    if mode == "save":
        if not os.path.exists(inputs_path):
            rng = np.random.default_rng(0)
            np.savez(inputs_path,
                     x=rng.standard_normal((2, 3, 5, 8)).astype(np.float32),
                     guide=rng.standard_normal((2, 6, 10, 6)).astype(np.float32))
        keras.utils.set_random_seed(1)
        model = build()
        rng = np.random.default_rng(2)
        model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.5 + (
            1.0 if "gamma" in w.path else 0.0) for w in model.weights])
        data = np.load(inputs_path)
        out = model.predict([data["x"], data["guide"]], verbose=0)
        model.save(os.path.join(directory, f"model_{backend}.keras"))
        np.save(os.path.join(directory, f"out_{backend}.npy"), out)
        print(f"saved on {backend}: {model.get_layer('sapa_b').implementation}")
        return
    data = np.load(inputs_path)
    for other in others:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = keras.saving.load_model(os.path.join(directory, f"model_{other}.keras"))
        notes = [str(w.message)[:60] for w in caught if "compiled" in str(w.message)]
        out = model.predict([data["x"], data["guide"]], verbose=0)
        expected = np.load(os.path.join(directory, f"out_{other}.npy"))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5,
                                   err_msg=f"{other} file on {backend}")
        print(f"{other} -> {backend}: ok, max diff {np.abs(out - expected).max():.2e}, "
              f"warnings {notes}")


if __name__ == "__main__":
    main(*sys.argv[1:])
