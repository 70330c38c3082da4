"""Exports of SAPA models in every format Keras offers, checked against the float64
loop reference, and the promise that exports hold builtin ops only.

- SavedModel, made three standard ways: ``model.export(path)``,
  ``tf.saved_model.save(model, path)``, and ``tf.saved_model.save(model, path,
  signatures=concrete)`` with a concrete function traced *before* saving (outside any
  save context). All three hold no ``KerasSapa>*`` op, even where the compiled op is
  available, and are run by a fresh Python process that never imports keras_sapa,
  through one ``serving_default`` signature with dynamic height and width at two sizes.
- ONNX (``format="onnx"``, run by onnxruntime) and LiteRT (``format="litert"``, run
  by the plain ``ai_edge_litert`` interpreter, which has no TensorFlow ops to fall back
  on): every variant, standard ONNX domains only.
- SAPA-D (``keras_sapa.SAPADeform``) is one more output of the same model, so it goes
  through every route above (SavedModel in the fresh process, ONNX, LiteRT), checked
  against the loop reference of ``tests/reference_deform.py``.
- The KerasCV models (``SAPADeepLabV3Plus`` with SAPA-B; ``SAPARetinaNet`` with SAPA-D in
  its pyramid; tiny ResNetV2 backbones): SavedModel in a fresh process, ONNX and LiteRT,
  against the Keras model run eagerly. Both models are also among the five below (with
  SAPA-D), whose SavedModel the default run checks; these conversions of larger models
  take minutes on a small CI machine, so they are marked ``benchmark``
  (``python -m pytest -m benchmark tests/test_export.py``).
- Every model with SAPA-D as its upsampler (issue 22): KerasHub's ``SAPASegFormer``,
  DeepLabV3 and RetinaNet backbones, KerasCV's ``SAPADeepLabV3Plus`` and ``SAPARetinaNet``
  (its SAPA-D feature pyramid), each at its smallest, are the outputs of one functional
  model on shared images: one SavedModel (in the same fresh process, each output against
  its own model run eagerly, each model's SAPA-D sampling found in the saved graph), and
  with ``-m benchmark`` one ONNX and one LiteRT conversion, cover all five.

One model holds every variant (one SAPA layer per output) and SAPA-D, so each format is
converted once. Inputs and weights come from fixed seeds.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sapa
import reference as ref
import reference_deform as ref_deform
from multibackend.backend_utils import randomise
from savedmodel_utils import custom_op_types
from savedmodel_utils import saved_nodes

CX = CY = 8
EMBED = 4
# name: (variant, kernel_size, output_dim). One K=5 layer beside the K=3 ones: the window
# ops' graph grows with K*K, and tf2onnx's conversion time with the graph (about 1/3 less
# with K=5 on one layer instead of three).
VARIANTS = {
    "identity": ("identity", 3, None),
    "bilinear": ("bilinear", 3, None),
    "gated": ("gated", 3, None),
    "concat": ("concat", 3, None),
    "gated_projected": ("gated", 5, 3),
}
# SAPA-D (keras_sapa.SAPADeform) as one more output of the same model: its builtin
# formulation (bilinear sampling by gathers) goes through every format with the others.
DEFORM = {"num_points": 4, "groups": 2, "embedding_dim": 4}
OUTPUTS = (*VARIANTS, "deform")
STATIC = ((1, 4, 5, CX), (1, 8, 10, CY))
# Two sizes through one dynamic signature.
SIZES = {"a": ((1, 4, 5, CX), (1, 8, 10, CY)), "b": ((2, 3, 6, CX), (2, 6, 12, CY))}


def _inputs(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


@pytest.fixture(scope="module")
def variants():
    """(dynamic model, static model, reference function) sharing one set of layers: one
    output per SAPA variant, and one SAPA-D output."""
    layers = {
        name: keras_sapa.SAPA(
            kernel_size=k, embedding_dim=EMBED, variant=variant, output_dim=out, name=name
        )
        for name, (variant, k, out) in VARIANTS.items()
    }
    layers["deform"] = keras_sapa.SAPADeform(**DEFORM, name="deform")

    def model(x_shape, g_shape):
        x_in = keras.Input(x_shape, name="x")
        g_in = keras.Input(g_shape, name="guide")
        return keras.Model([x_in, g_in], [layer(x_in, g_in) for layer in layers.values()])

    dynamic = model((None, None, CX), (None, None, CY))
    static = model(STATIC[0][1:], STATIC[1][1:])
    static(_inputs(STATIC, seed=0))  # Keras's ONNX and LiteRT exporters want a called model
    rng = np.random.default_rng(2024)
    params = {name: randomise(layer, rng) for name, layer in layers.items()}

    def reference(x, guide):
        return [
            ref.sapa_layer(x, guide, params[name], variant, k, 2, value_projection=out is not None)
            for name, (variant, k, out) in VARIANTS.items()
        ] + [
            ref_deform.sapa_deform_layer(
                x, guide, params["deform"], DEFORM["num_points"], 2, DEFORM["groups"]
            )
        ]

    return dynamic, static, reference


def _assert_outputs(got, expected, atol=2e-5):
    assert len(got) == len(expected)
    for name, g, e in zip(OUTPUTS, got, expected, strict=True):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=atol, err_msg=name)


# ---------------------------------------------------------------------- SavedModel
# A fresh interpreter: TensorFlow only. Calls every SavedModel's serving_default
# signature on the saved inputs and writes the outputs back.
RUNNER = """
import json, sys
import numpy as np
import tensorflow as tf
cases = json.load(open(sys.argv[1]))
results = {}
for case in cases:
    signature = tf.saved_model.load(case["path"]).signatures["serving_default"]
    names = sorted(signature.structured_input_signature[1])
    if set(names) == {"x", "guide"}:
        names = ["x", "guide"]
    for size, files in case["inputs"].items():
        arrays = [np.load(f) for f in files]
        outputs = signature(**{n: tf.constant(a) for n, a in zip(names, arrays)})
        for key, value in outputs.items():
            results[f"{case['name']}/{size}/{key}"] = value.numpy()
np.savez(sys.argv[2], **results)
print("keras_sapa imported:", "keras_sapa" in sys.modules,
      "keras imported:", "keras" in sys.modules)
"""


def _tiny_backbone():
    import keras_cv

    return keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 16, 32, 64],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=False,
        input_shape=(64, 64, 3),
    )


@pytest.fixture(scope="module")
def kerascv_models():
    import keras_cv

    from keras_sapa import models

    keras.utils.set_random_seed(7)
    upsampler = {"embedding_dim": 8, "kernel_size": 3}
    deeplab = models.SAPADeepLabV3Plus(
        _tiny_backbone(),
        3,
        upsampler=upsampler,
        spatial_pyramid_pooling=keras_cv.layers.SpatialPyramidPooling(
            dilation_rates=[1, 2], num_channels=16
        ),
    )
    # SAPA-D in the pyramid (a layer template): the KerasCV route carries it too.
    deform = keras_sapa.SAPADeform(num_points=4, groups=2, embedding_dim=8)
    retinanet = models.SAPARetinaNet(_tiny_backbone(), 3, "xywh", upsampler=deform)
    images = np.random.default_rng(8).uniform(size=(2, 64, 64, 3)).astype("float32")
    for model in (deeplab, retinanet):
        model(images)  # Keras's ONNX exporter wants a called model
    return {"deeplab": deeplab, "retinanet": retinanet}, images


# ------------------------------------------------------------ the models with SAPA-D
# Every model that takes SAPA-D as its upsampler, at its smallest: the KerasHub ones as
# tests/test_keras_hub_models.py builds them with SAPA-D (32x32 images, tiny encoders),
# the KerasCV ones on a stand-in backbone of four strided convolutions (all KerasCV reads
# of a backbone is its pyramid_level_inputs), the RetinaNet with a 16-channel pyramid and
# one-conv heads. Their SAPA-D weights get random values (offsets of about a pixel), so
# that points fall between pixels and some drop out.
MODEL_IMAGE = 32
MODEL_DEFORM = {"num_points": 4, "groups": 4, "embedding_dim": 4}


def _standin_backbone():
    x = inputs = keras.Input((MODEL_IMAGE, MODEL_IMAGE, 3))
    levels = {}
    strides_filters = ((4, 8), (2, 16), (2, 16), (2, 16))
    for level, (stride, filters) in zip(range(2, 6), strides_filters, strict=True):
        x = keras.layers.Conv2D(
            filters, 3, strides=stride, padding="same", activation="relu", name=f"c{level}"
        )(x)
        levels[f"P{level}"] = f"c{level}"
    backbone = keras.Model(inputs, x, name="standin_backbone")
    backbone.pyramid_level_inputs = levels
    return backbone


def _deform_models():
    """{name: model} of the five models, SAPA-D as every upsampling stage."""
    import keras_cv

    from keras_sapa import models
    from test_keras_hub_models import DEFORM_MODELS

    hub = {
        name: build(keras_sapa.SAPADeform(**MODEL_DEFORM))
        for name, (build, *_) in DEFORM_MODELS.items()
    }
    head = keras_cv.models.retinanet.PredictionHead
    return {
        "hub_segformer": hub["segformer"],
        "hub_deeplab_v3": hub["deeplab_v3"],
        "hub_retinanet": hub["retinanet"],
        "cv_deeplab_v3_plus": models.SAPADeepLabV3Plus(
            _standin_backbone(),
            3,
            upsampler=keras_sapa.SAPADeform(**MODEL_DEFORM),
            spatial_pyramid_pooling=keras_cv.layers.SpatialPyramidPooling(
                dilation_rates=[1], num_channels=16
            ),
        ),
        "cv_retinanet": models.SAPARetinaNet(
            _standin_backbone(),
            3,
            "xywh",
            feature_pyramid=models.SAPAFeaturePyramid(
                num_channels=16, upsampler=keras_sapa.SAPADeform(**MODEL_DEFORM)
            ),
            classification_head=head(9 * 3, keras.initializers.Zeros(), num_conv_layers=1),
            box_head=head(9 * 4, keras.initializers.Zeros(), num_conv_layers=1),
        ),
    }


@pytest.fixture(scope="module")
def deform_models():
    """(the five models, one functional model whose outputs are theirs on shared images,
    the function to export: that model with ``training=False``, the images, each model's
    eager outputs by the combined model's output name)."""
    keras.utils.set_random_seed(11)
    members = _deform_models()
    rng = np.random.default_rng(12)
    for model in members.values():
        for layer in model._flatten_layers():
            if isinstance(layer, keras_sapa.SAPADeform):
                randomise(layer, rng, scale=0.05)
    images = keras.Input((MODEL_IMAGE, MODEL_IMAGE, 3), name="images")
    outputs = {}
    for name, model in members.items():
        out = model(images)
        outputs.update(
            {f"{name}_{k}": v for k, v in out.items()} if isinstance(out, dict) else {name: out}
        )
    combined = keras.Model(images, outputs)
    # Called without `training`, the combined model runs some nested layers as in
    # training (batch statistics, and "auto"'s compiled ops in a trace): export it with
    # training=False, as a serving function does.
    serve = tf.function(
        lambda x: combined(x, training=False),
        input_signature=[tf.TensorSpec((None, MODEL_IMAGE, MODEL_IMAGE, 3), name="images")],
    )
    batch = np.random.default_rng(13).uniform(size=(2, MODEL_IMAGE, MODEL_IMAGE, 3))
    batch = batch.astype("float32")
    expected = {}
    for name, model in members.items():  # each model alone, eagerly: another implementation
        out = model(batch, training=False)
        out = {f"{name}_{k}": v for k, v in out.items()} if isinstance(out, dict) else {name: out}
        expected.update({k: np.asarray(v) for k, v in out.items()})
    assert sorted(expected) == sorted(outputs)
    return members, combined, serve, batch, expected


def _check_model_outputs(got, expected, atol=1e-4):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=atol, err_msg=key)


def _serve_in_fresh_process(root, cases):
    """Runs ``cases`` (name, SavedModel path, input files by size) in a fresh process
    without keras_sapa (RUNNER); returns its outputs by ``name/size/output``."""
    (root / "cases.json").write_text(json.dumps(cases))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(RUNNER),
            str(root / "cases.json"),
            str(root / "results.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(root),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "keras_sapa imported: False" in proc.stdout, proc.stdout
    return dict(np.load(root / "results.npz"))


@pytest.fixture(scope="module")
def savedmodels(variants, deform_models, tmp_path_factory):
    """Writes the SavedModels (three routes for the variants model, the models with
    SAPA-D as one module with a serving signature) and runs them all in one fresh
    process."""
    dynamic, _, _ = variants
    root = tmp_path_factory.mktemp("savedmodels")
    paths = {route: str(root / route) for route in ("export", "save", "concrete")}
    dynamic.export(paths["export"], verbose=False)
    tf.saved_model.save(dynamic, paths["save"])
    traced = tf.function(lambda x, guide: dynamic([x, guide]))
    spec = tf.TensorSpec((None, None, None, CX))
    concrete = traced.get_concrete_function(spec, spec)  # traced before saving
    tf.saved_model.save(dynamic, paths["concrete"], signatures=concrete)

    inputs = {size: _inputs(shapes, seed) for seed, (size, shapes) in enumerate(SIZES.items())}
    files = {}
    for size, arrays in inputs.items():
        files[size] = []
        for index, array in enumerate(arrays):
            files[size].append(str(root / f"input_{size}_{index}.npy"))
            np.save(files[size][-1], array)
    cases = [{"name": route, "path": path, "inputs": files} for route, path in paths.items()]
    # The models with SAPA-D: a module holding their variables and the serving function
    # (cheaper to write than model.export, which walks every layer's trackables).
    _, combined, serve, batch, _ = deform_models
    module = tf.Module()
    module.model_variables = list(combined.variables)
    paths["deform_models"] = str(root / "deform_models")
    tf.saved_model.save(
        module,
        paths["deform_models"],
        signatures={"serving_default": serve.get_concrete_function()},
    )
    np.save(root / "deform_batch.npy", batch)
    cases.append(
        {
            "name": "deform_models",
            "path": paths["deform_models"],
            "inputs": {"a": [str(root / "deform_batch.npy")]},
        }
    )
    return paths, inputs, _serve_in_fresh_process(root, cases)


@pytest.mark.parametrize("route", ["export", "save", "concrete", "deform_models"])
def test_savedmodel_holds_builtin_ops_only(savedmodels, route):
    paths, _, _ = savedmodels
    assert custom_op_types(paths[route]) == []


@pytest.mark.parametrize("route", ["export", "save", "concrete"])
def test_savedmodel_dynamic_sizes_in_fresh_process(variants, savedmodels, route):
    """Each route's serving_default signature, loaded once by a process without
    keras_sapa, serves two sizes; both match the reference."""
    _, _, reference = variants
    _, inputs, results = savedmodels
    for size, (x, guide) in inputs.items():
        got = [results[f"{route}/{size}/output_{i}"] for i in range(len(OUTPUTS))]
        _assert_outputs(got, reference(x, guide))


@pytest.mark.benchmark
def test_kerascv_savedmodel_in_fresh_process(kerascv_models, tmp_path):
    """model.export of each KerasCV model: builtin ops only, and served by the process
    without keras_sapa as the eager Keras model computes it (40-50 s on 2 cores; the same
    two models with SAPA-D are in the default run's SavedModel)."""
    models, images = kerascv_models
    np.save(tmp_path / "images.npy", images)
    cases = []
    for name, model in models.items():
        model.export(str(tmp_path / name), verbose=False)
        assert custom_op_types(str(tmp_path / name)) == [], name
        cases.append(
            {
                "name": name,
                "path": str(tmp_path / name),
                "inputs": {"a": [str(tmp_path / "images.npy")]},
            }
        )
    results = _serve_in_fresh_process(tmp_path, cases)
    for name, model in models.items():
        expected = model(images)  # eager Keras model: another implementation
        if not isinstance(expected, dict):
            expected = {"output_0": expected}
        for key, value in expected.items():
            np.testing.assert_allclose(
                results[f"{name}/a/{key}"], np.asarray(value), rtol=1e-4, atol=1e-4, err_msg=key
            )


def test_models_with_sapa_deform_savedmodel_in_fresh_process(deform_models, savedmodels):
    """The five models with SAPA-D in one SavedModel, served by the process without
    keras_sapa: every output matches its own model run eagerly, and every model's SAPA-D
    layers are in the saved graph (gathers under the model's and the layer's name)."""
    members, _, _, _, expected = deform_models
    paths, _, results = savedmodels
    got = {key.split("/")[-1]: value for key, value in results.items()}
    got = {key: value for key, value in got.items() if key in expected}
    _check_model_outputs(got, expected)
    gathers = [node.name for node in saved_nodes(paths["deform_models"]) if "Gather" in node.op]
    for name, model in members.items():
        deform = [
            layer for layer in model._flatten_layers() if isinstance(layer, keras_sapa.SAPADeform)
        ]
        assert len(deform) >= 2, name
        scope = re.compile(rf"(^|/){re.escape(model.name)}(_\d+)?/")
        for layer in deform:
            within = re.compile(rf"/{re.escape(layer.name)}(_\d+)?/")
            assert any(scope.search(n) and within.search(n) for n in gathers), (name, layer.name)


def test_keras_hub_deeplab_v3_model_export_holds_builtin_ops_only(deform_models, tmp_path):
    """``model.export`` of the KerasHub DeepLabV3 with SAPA-D, as a user makes it (its
    trace leaves ``training`` unset): KerasHub's spatial pyramid pooling calls a
    ``keras.layers.Resizing``, whose call defaults to ``training=True``, and Keras kept
    that for the later SAPA-D stages, so "auto" put the compiled op into the export until
    the backbone's call defaulted ``training`` to False (5b302fc)."""
    members = deform_models[0]
    members["hub_deeplab_v3"].export(str(tmp_path / "deeplab_v3"), verbose=False)
    assert custom_op_types(str(tmp_path / "deeplab_v3")) == []


def test_export_keeps_compiled_op_when_asked(variants, tmp_path):
    from keras_sapa import ops

    if not ops.compiled_available():
        pytest.skip("compiled custom op library unavailable")
    dynamic, _, _ = variants
    with ops.use_implementation("compiled"):
        dynamic.export(str(tmp_path / "compiled"), verbose=False)
    assert custom_op_types(str(tmp_path / "compiled"))


# ---------------------------------------------------------------------- ONNX, LiteRT
def _run_onnx(path, arrays):
    import onnx
    import onnxruntime

    graph = onnx.load(path).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    by_shape = {a.shape: a for a in arrays}
    feeds = {}
    for spec in session.get_inputs():
        matches = [
            a
            for a in arrays
            if len(a.shape) == len(spec.shape)
            and all(
                not isinstance(d, int) or d == n for d, n in zip(spec.shape, a.shape, strict=True)
            )
        ]
        assert len(matches) == 1, (spec.name, spec.shape, list(by_shape))
        feeds[spec.name] = matches[0]
    return session.run(None, feeds)


def _run_litert(path, arrays):
    from ai_edge_litert.interpreter import Interpreter

    # The plain interpreter: a model needing TensorFlow (Flex) ops fails to allocate.
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()
    details = runner.get_input_details()
    feeds = {}
    for name, spec in details.items():
        # Keras exports a dynamic batch (shape_signature -1): match the other axes.
        matches = [a for a in arrays if tuple(a.shape[1:]) == tuple(spec["shape"][1:])]
        assert len(matches) == 1, (name, spec["shape"])
        feeds[name] = matches[0]
    outputs = runner(**feeds)
    if all(key.startswith("output_") for key in outputs):  # Keras's names for a list
        return [outputs[f"output_{i}"] for i in range(len(outputs))]
    return list(outputs.values())  # a dict of named outputs (RetinaNet)


def _export_and_run(model, fmt, folder, arrays):
    """Exports ``model`` in ``fmt`` ("onnx" or "litert") into ``folder`` and runs the
    file on ``arrays`` with that format's own runtime."""
    path = str(folder / f"model.{'onnx' if fmt == 'onnx' else 'tflite'}")
    model.export(path, format=fmt, verbose=False)
    return (_run_onnx if fmt == "onnx" else _run_litert)(path, arrays)


@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_onnx_and_litert_every_variant(variants, tmp_path, fmt):
    _, static, reference = variants
    x, guide = _inputs(STATIC, seed=5 if fmt == "onnx" else 6)
    _assert_outputs(_export_and_run(static, fmt, tmp_path, [x, guide]), reference(x, guide))


@pytest.mark.benchmark
@pytest.mark.parametrize("fmt", ["onnx", "litert"])
@pytest.mark.parametrize("name", ["deeplab", "retinanet"])
def test_kerascv_onnx_and_litert(kerascv_models, tmp_path, name, fmt):
    models, images = kerascv_models
    model = models[name]
    batch = images[:1]
    got = _export_and_run(model, fmt, tmp_path, [batch])
    expected = model(batch)
    expected = [expected] if not isinstance(expected, dict) else list(expected.values())
    assert len(got) == len(expected)
    # Match outputs by shape (ONNX keeps Keras's order, LiteRT names them output_i).
    for value in expected:
        value = np.asarray(value)
        candidates = [g for g in got if g.shape == value.shape]
        assert candidates, value.shape
        err = min(np.abs(g - value).max() for g in candidates)
        assert err < 1e-3, err


@pytest.mark.benchmark
@pytest.mark.parametrize("fmt", ["onnx", "litert"])
def test_models_with_sapa_deform_onnx_and_litert(deform_models, tmp_path, fmt):
    """The five models with SAPA-D in one ONNX file (tf2onnx on the serving function:
    Keras's ONNX export traces the combined model without ``training=False``) run by
    onnxruntime, and in one LiteRT file (``model.export(format="litert")``) run by the
    plain interpreter; every output against its own model run eagerly. Minutes on a
    2-core machine (-m benchmark)."""
    _, combined, serve, batch, expected = deform_models
    if fmt == "onnx":
        import onnxruntime
        import tf2onnx

        path = str(tmp_path / "models.onnx")
        tf2onnx.convert.from_function(
            serve, input_signature=serve.input_signature, output_path=path
        )
        _run_onnx(path, [batch])  # standard domains only
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        got = dict(
            zip(names, session.run(None, {session.get_inputs()[0].name: batch}), strict=True)
        )
    else:
        from ai_edge_litert.interpreter import Interpreter

        path = str(tmp_path / "models.tflite")
        combined.export(path, format="litert", verbose=False)
        runner = Interpreter(model_path=path).get_signature_runner()
        (name,) = runner.get_input_details()
        got = {}
        for image in batch:  # LiteRT's exported batch is 1 where the input's was None
            for key, value in runner(**{name: image[None]}).items():
                got.setdefault(key, []).append(value)
        got = {key: np.concatenate(value) for key, value in got.items()}
    _check_model_outputs(got, expected, atol=2e-4)
