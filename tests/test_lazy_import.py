"""``import keras_sapa`` imports neither KerasCV nor KerasHub; saved models still reload.

The two models are saved here (this process has imported both packages); everything
else runs in ONE fresh interpreter, in an order where each step starts from a state that
proves its point:

1. ``import keras_sapa`` (``models``, ``dir(models)``, ``models.sapa_overhead``) loads
   neither package;
2. a ``.keras`` file of a KerasHub model (SAPASegFormer) reloads after that plain import,
   with the same outputs: the registered stand-in imports KerasHub, and KerasHub only;
3. ``models.SAPASegFormer`` (first use through the package's ``__getattr__``) is that
   class and still imports no KerasCV;
4. a ``.keras`` file of a KerasCV model (SAPADeepLabV3Plus) reloads, KerasCV not having
   been imported before, with the same outputs.

On JAX and PyTorch the check of step 1 (no TensorFlow, KerasCV or KerasHub after
``import keras_sapa``) runs first in the shared backend processes
(``tests/multibackend/run_backend.py``).
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

import keras_sapa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype("float32")


def _keras_cv_model():
    import keras_cv

    backbone = keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 8, 8, 8],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=False,
        input_shape=(32, 32, 3),
    )
    return keras_sapa.models.SAPADeepLabV3Plus(
        backbone,
        2,
        upsampler={"embedding_dim": 4, "kernel_size": 3},
        spatial_pyramid_pooling=keras_cv.layers.SpatialPyramidPooling(
            dilation_rates=[1], num_channels=8
        ),
    )


def _keras_hub_model():
    import keras_hub

    encoder = keras_hub.models.MiTBackbone(
        image_shape=(32, 32, 3),
        num_layers=2,
        hidden_dims=[4, 8],
        layerwise_depths=[1, 1],
        layerwise_num_heads=[1, 1],
        layerwise_sr_ratios=[2, 1],
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        max_drop_path_rate=0.0,
    )
    return keras_sapa.models.SAPASegFormer(
        backbone=encoder, num_classes=2, projection_filters=8, upsampler={"embedding_dim": 4}
    )


FRESH = """
import sys
import numpy as np

def loaded():
    return sorted(m for m in ("keras_cv", "keras_hub") if m in sys.modules)

import keras, keras_sapa
import keras_sapa.models as models
dir(models)
models.sapa_overhead
print("after import", loaded())

def reload(kind):
    keras.utils.clear_session()  # fresh layer names, as in a process of its own
    model = keras.models.load_model(f"{kind}.keras")
    diff = np.max(np.abs(np.asarray(model(np.load("images.npy"))) - np.load(f"{kind}.npy")))
    print(kind, type(model).__module__, type(model).__name__, float(diff))
    return model

hub = reload("keras_hub")
print("after the KerasHub file", loaded())
assert models.SAPASegFormer is type(hub)
print("after models.SAPASegFormer", loaded())
reload("keras_cv")
"""


def test_import_skips_keras_cv_and_keras_hub_and_saved_models_reload(tmp_path):
    np.save(tmp_path / "images.npy", IMAGES)
    for kind, build in (("keras_cv", _keras_cv_model), ("keras_hub", _keras_hub_model)):
        keras.utils.set_random_seed(0)
        model = build()
        np.save(tmp_path / f"{kind}.npy", np.asarray(model(IMAGES)))
        model.save(str(tmp_path / f"{kind}.keras"))

    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FRESH)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "after import []", lines
    assert lines[2] == "after the KerasHub file ['keras_hub']", lines
    assert lines[3] == "after models.SAPASegFormer ['keras_hub']", lines
    for line, kind, real in (
        (lines[1], "keras_hub", "keras_sapa.models.keras_hub.segformer SAPASegFormer"),
        (lines[4], "keras_cv", "keras_sapa.models.keras_cv.deeplab SAPADeepLabV3Plus"),
    ):
        name, module, cls, diff = line.split()
        assert (name, f"{module} {cls}") == (kind, real), line
        assert float(diff) < 1e-5, line
