"""``import keras_sapa`` imports neither KerasCV nor KerasHub; saved models still reload.

Each check runs in a fresh interpreter, since this test process has imported both.
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, backend="tensorflow"):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_import_keras_sapa_skips_keras_cv_and_keras_hub():
    out = run_python(
        """
        import sys
        import keras_sapa
        import keras_sapa.models as models
        dir(models)
        models.sapa_overhead
        print(sorted(m for m in ("keras_cv", "keras_hub") if m in sys.modules))
        models.SAPASegFormer  # first use imports KerasHub only
        print(sorted(m for m in ("keras_cv", "keras_hub") if m in sys.modules))
        """
    )
    assert out.split("\n")[:2] == ["[]", "['keras_hub']"]


@pytest.mark.parametrize("kind", ["keras_cv", "keras_hub"])
def test_saved_model_reloads_after_plain_import(kind, tmp_path):
    path = str(tmp_path / f"{kind}.keras")
    expected = str(tmp_path / "expected.npy")
    if kind == "keras_cv":
        build = """
            import keras_cv
            backbone = keras_cv.models.ResNetV2Backbone(
                stackwise_filters=[8, 8, 8, 8], stackwise_blocks=[2, 2, 2, 2],
                stackwise_strides=[1, 2, 2, 2], include_rescaling=False,
                input_shape=(32, 32, 3))
            model = keras_sapa.models.SAPADeepLabV3Plus(
                backbone, 2, upsampler={"embedding_dim": 4, "kernel_size": 3},
                spatial_pyramid_pooling=keras_cv.layers.SpatialPyramidPooling(
                    dilation_rates=[1], num_channels=8))
        """
        real = "keras_sapa.models.keras_cv.deeplab.SAPADeepLabV3Plus"
    else:
        build = """
            import keras_hub
            encoder = keras_hub.models.MiTBackbone(
                image_shape=(32, 32, 3), num_layers=2, hidden_dims=[4, 8],
                layerwise_depths=[1, 1], layerwise_num_heads=[1, 1],
                layerwise_sr_ratios=[2, 1], layerwise_patch_sizes=[7, 3],
                layerwise_strides=[4, 2], max_drop_path_rate=0.0)
            model = keras_sapa.models.SAPASegFormer(
                backbone=encoder, num_classes=2, projection_filters=8,
                upsampler={"embedding_dim": 4})
        """
        real = "keras_sapa.models.keras_hub.segformer.SAPASegFormer"
    save = f"""
        import numpy as np, keras, keras_sapa
        keras.utils.set_random_seed(0)
        {textwrap.dedent(build).strip().replace(chr(10), chr(10) + "        ")}
        x = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype("float32")
        np.save({expected!r}, np.asarray(model(x)))
        model.save({path!r})
    """
    run_python(save)
    out = run_python(
        f"""
        import sys
        import numpy as np, keras, keras_sapa
        assert "{kind}" not in sys.modules
        model = keras.models.load_model({path!r})
        import {real.rsplit(".", 1)[0]} as real_module
        assert type(model) is real_module.{real.rsplit(".", 1)[1]}, type(model)
        x = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype("float32")
        print(float(np.max(np.abs(np.asarray(model(x)) - np.load({expected!r})))))
        """
    )
    assert float(out.strip().splitlines()[-1]) < 1e-5


# On JAX and PyTorch the same check (no TensorFlow, KerasCV or KerasHub after
# `import keras_sapa`) runs first in the shared backend processes
# (tests/multibackend/run_backend.py).
