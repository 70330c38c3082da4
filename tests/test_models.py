"""keras_sapa.models: SAPA inside KerasCV's DeepLabV3Plus and RetinaNet, and the
``upsampler=`` argument every model shares.

Tiny backbones (64x64 images, few filters) keep the suite fast. Models are built once
per module and shared: the training test runs before the save/load tests in file
order, and those do not depend on it (they check outputs against the model as it is,
whatever its weights); the stock-weight transfer, which overwrites the weights, runs
after them. The SavedModel exports of these two models are checked in
tests/test_export.py (in a fresh process without keras_sapa).
"""

import keras
import keras_cv
import numpy as np
import pytest

import keras_sapa
import keras_sapa.models as sapa_models
from keras_sapa.demo import train
from test_keras_hub_models import deform_macs  # the cost models, written out once
from test_keras_hub_models import expected_macs

IMAGE = 64
NUM_CLASSES = 3
EMBED = 16
KERNEL = 5


def tiny_backbone(image=IMAGE):
    # The demo's: P2..P5 have 32, 64, 128, 256 channels at strides 4, 8, 16, 32.
    return train.tiny_resnet_backbone(image, include_rescaling=False)


def tiny_spp():
    return keras_cv.layers.SpatialPyramidPooling(dilation_rates=[1, 2, 3], num_channels=32)


def images(batch=2, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, IMAGE, IMAGE, 3)).astype("float32")


def sapa_layers_of(model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, keras_sapa.SAPA)]


def upsampling_layers_of(model):
    return [
        layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.UpSampling2D)
    ]


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=atol)


def reloaded(model, tmp_path):
    """``model`` saved to a ``.keras`` file and loaded back, of the same class."""
    path = str(tmp_path / f"{model.name}.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    return restored


def check_segmenter_fit(model, x, seed, epochs, variable, lr=1e-2):
    """A few eager fit steps: finite, falling loss, and ``variable`` (a SAPA weight)
    moved. Eager: tracing the train function costs ~30 s on a loaded 2-core machine,
    stock DeepLabV3Plus as much as this one (the layer tests train traced)."""
    y = np.random.default_rng(seed).integers(0, NUM_CLASSES, size=(len(x), IMAGE, IMAGE, 1))
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        run_eagerly=True,
    )
    before = np.array(variable.numpy())
    losses = model.fit(x, y, epochs=epochs, batch_size=len(x), verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert not np.allclose(before, variable.numpy())


@keras.saving.register_keras_serializable(package="keras_sapa_tests")
class GatedNearest(keras.layers.Layer):
    """Not SAPA: ``x`` repeated 2x, times a sigmoid gate computed from the guide; a
    stand-in for any upsampler called as ``layer(x, guide)``."""

    def __init__(self, up_factor=2, **kwargs):
        super().__init__(**kwargs)
        self.up_factor = up_factor
        self.gate = keras.layers.Dense(1, name="gate")

    def build(self, x_shape, guide_shape):
        self.gate.build(guide_shape)

    def call(self, x, guide):
        up = keras.ops.repeat(keras.ops.repeat(x, 2, axis=1), 2, axis=2)
        return up * keras.ops.sigmoid(self.gate(guide))

    def get_config(self):
        return {**super().get_config(), "up_factor": self.up_factor}


def gated_nearest_reference(x, guide, kernel, bias):
    """NumPy: what GatedNearest computes."""
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
    gate = 1.0 / (1.0 + np.exp(-(np.asarray(guide, np.float64) @ kernel + bias)))
    return up * gate


# A SAPA whose every argument differs from the model's default: the whole layer config,
# not five scalars, reaches each stage.
CUSTOM_SAPA = dict(
    kernel_size=KERNEL,
    embedding_dim=EMBED,
    norm="group",
    norm_groups=8,
    use_bias=False,
    kernel_initializer=keras.initializers.HeNormal(seed=3),
    value_projection=True,
)


# --------------------------------------------------------------------------- DeepLab
@pytest.fixture(scope="module")
def deeplab():
    keras.utils.set_random_seed(1)
    # The upsampler as serialize_keras_object gives it.
    upsampler = keras.saving.serialize_keras_object(
        keras_sapa.SAPA(variant="gated", **CUSTOM_SAPA)
    )
    return sapa_models.SAPADeepLabV3Plus(
        tiny_backbone(),
        NUM_CLASSES,
        upsampler=upsampler,
        spatial_pyramid_pooling=tiny_spp(),
    )


def test_deeplab_structure(deeplab):
    x = images()
    y = np.asarray(deeplab(x))
    assert y.shape == (2, IMAGE, IMAGE, NUM_CLASSES)
    assert_close(y.sum(-1), np.ones((2, IMAGE, IMAGE)))

    names = [layer.name for layer in deeplab._flatten_layers()]
    assert "encoder_output_upsampling" not in names
    # The only fixed upsampling left is the head's 4x to image size.
    assert [tuple(u.size) for u in upsampling_layers_of(deeplab)] == [(4, 4)]

    sapa = sapa_layers_of(deeplab)
    assert [layer.name for layer in sapa] == [
        "sapa_upsampling_P4",
        "sapa_upsampling_P3",
        "sapa_upsampling_P2",
    ]
    assert all(layer.variant == "gated" and layer.up_factor == 2 for layer in sapa)
    # Each stage doubles the size and keeps the ASPP's 32 channels; guides are the
    # backbone levels (128, 64, 32 channels).
    for layer, size, guide_channels in zip(sapa, (4, 8, 16), (128, 64, 32), strict=False):
        assert tuple(layer.output.shape) == (None, size, size, 32)
        assert layer.qy.kernel.shape == (guide_channels, EMBED)
        # Every argument of the upsampler config reached the stage.
        assert isinstance(layer.norm_y, keras.layers.GroupNormalization)
        assert layer.norm_y.groups == 8
        assert layer.qy.bias is None and layer.k.bias is None and layer.v.bias is None
        assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)


def test_deeplab_other_backbone_and_bad_backbone():
    keras.utils.set_random_seed(2)
    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[8, 8, 16, 16],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=True,
        input_shape=(IMAGE, IMAGE, 3),
    )
    model = sapa_models.SAPADeepLabV3Plus(
        backbone,
        2,
        upsampler={"variant": "bilinear", "embedding_dim": 8},
        spatial_pyramid_pooling=tiny_spp(),
    )
    assert tuple(model(images(1)).shape) == (1, IMAGE, IMAGE, 2)

    inputs = keras.Input((IMAGE, IMAGE, 3))
    plain = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=4, name="c")(inputs))
    with pytest.raises(ValueError, match="pyramid_level_inputs"):
        sapa_models.SAPADeepLabV3Plus(plain, 2)
    plain.pyramid_level_inputs = {"P2": "c"}
    with pytest.raises(ValueError, match="P3"):
        sapa_models.SAPADeepLabV3Plus(plain, 2)


@pytest.fixture(scope="module")
def deeplab_stock():
    """The stock DeepLabV3Plus with the same backbone, pooling and head."""
    keras.utils.set_random_seed(7)
    return keras_cv.models.DeepLabV3Plus(
        tiny_backbone(), NUM_CLASSES, spatial_pyramid_pooling=tiny_spp()
    )


def test_deeplab_overhead_against_stock(deeplab, deeplab_stock):
    stock = deeplab_stock
    assert "encoder_output_upsampling" in [layer.name for layer in stock.layers]
    report = sapa_models.sapa_overhead(deeplab)
    # Everything but SAPA is the stock model, parameter for parameter.
    assert report["params"] > 0
    assert report["params"] == deeplab.count_params() - stock.count_params()
    assert report["stock_params"] == stock.count_params()
    want = (
        expected_macs("gated", (2, 2), 32, 128, EMBED, value=True)
        + expected_macs("gated", (4, 4), 32, 64, EMBED, value=True)
        + expected_macs("gated", (8, 8), 32, 32, EMBED, value=True)
    )
    assert report["macs"] == want
    assert report["replaced_macs"] == 4 * 16 * 16 * 32
    assert report["net_macs"] == want - 4 * 16 * 16 * 32
    assert [stage["level"] for stage in report["stages"]] == [4, 3, 2]
    # Larger images: every stage has 4x the points, so 4x the multiply-adds.
    bigger = sapa_models.sapa_overhead(deeplab, input_shape=(2 * IMAGE, 2 * IMAGE, 3))
    assert bigger["macs"] == 4 * report["macs"]
    assert bigger["params"] == report["params"]


def test_deeplab_fit_loss_falls(deeplab):
    # Gradients reach SAPA's projections. The loss of this tiny model is noisy (batch
    # norm on two images): 1.22 -> 1.13 in 5 steps at 1e-3, where 1e-2 needs 10.
    kernel = deeplab.get_layer("sapa_upsampling_P3").k.kernel
    check_segmenter_fit(deeplab, images(), 3, 5, kernel, lr=1e-3)


def test_deeplab_keras_round_trip(deeplab, tmp_path):
    x = images(seed=5)
    restored = reloaded(deeplab, tmp_path)
    assert [layer.name for layer in sapa_layers_of(restored)] == [
        layer.name for layer in sapa_layers_of(deeplab)
    ]
    assert_close(restored(x), deeplab(x), atol=1e-6)

    config = deeplab.get_config()
    assert config["upsampler"]["config"]["norm_groups"] == 8
    clone = sapa_models.SAPADeepLabV3Plus.from_config(config)
    assert clone.get_config() == config


def test_deeplab_keeps_stock_names_and_loads_stock_weights(deeplab, deeplab_stock):
    """After the tests that train or read the two models: this one overwrites both
    models' weights (the stock ones scrambled)."""
    ours, stock = deeplab, deeplab_stock

    # Every explicitly named stock layer is in ours, under the same name.
    def named(model):
        return {
            layer.name
            for layer in model._flatten_layers()
            if not any(
                layer.name.startswith(p)
                for p in (
                    "sequential",
                    "concatenate",
                    "up_sampling2d",
                    "functional",
                    "input_layer",
                    "spatial_pyramid_pooling",
                    "res_net",
                    "conv2d",
                    "batch_normalization",
                    "dropout",
                    "re_lu",
                    "activation",
                    "global_average_pooling2d",
                    "reshape",
                )
            )
        }

    stock_names = named(stock)
    assert {
        "low_level_feature_conv",
        "segmentation_head_norm",
        "segmentation_output",
    } <= stock_names
    assert stock_names - {"encoder_output_upsampling", stock.name} <= named(ours)

    # Scramble the stock weights, transfer, and compare variable by variable.
    rng = np.random.default_rng(12)
    for variable in stock.weights:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    kept = [v for v in ours.weights if "sapa_" not in v.path]
    sapa_before = [np.array(v) for v in ours.weights if "sapa_" in v.path]
    assert len(kept) == len(stock.weights)
    sapa_models.load_stock_weights(ours, stock)
    for mine, theirs in zip(kept, stock.weights, strict=False):
        assert tuple(mine.shape) == tuple(theirs.shape), (mine.path, theirs.path)
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs), err_msg=mine.path)
    for a, b in zip(sapa_before, [v for v in ours.weights if "sapa_" in v.path], strict=False):
        np.testing.assert_array_equal(a, np.asarray(b))


# ------------------------------------------------------------------- SAPA-D in KerasCV
def test_deeplab_with_sapa_deform(tmp_path):
    """SAPA-D as every DeepLabV3Plus stage, given as a serialized layer: its cost, a few
    fit steps with falling loss that move the offset branch, and a .keras reload."""
    keras.utils.set_random_seed(21)
    groups, points, embed = 4, 4, 4
    upsampler = keras.saving.serialize_keras_object(
        keras_sapa.SAPADeform(num_points=points, groups=groups, embedding_dim=embed)
    )
    model = sapa_models.SAPADeepLabV3Plus(
        tiny_backbone(), NUM_CLASSES, upsampler=upsampler, spatial_pyramid_pooling=tiny_spp()
    )
    x = images(seed=22)
    deform = [
        layer for layer in model._flatten_layers() if isinstance(layer, keras_sapa.SAPADeform)
    ]
    assert [layer.name for layer in deform] == [
        "sapa_upsampling_P4",
        "sapa_upsampling_P3",
        "sapa_upsampling_P2",
    ]
    assert not sapa_layers_of(model)

    report = sapa_models.sapa_overhead(model)
    per_layer = [
        # q (Cy -> G*E), k (32 -> G*E), offset (32 -> G*P*2*4), with biases.
        (cy + 1) * groups * embed + 33 * groups * embed + 33 * groups * points * 8
        for cy in (128, 64, 32)
    ]
    assert report["params"] == sum(per_layer)
    assert [stage["params"] for stage in report["stages"]] == per_layer
    want = sum(
        deform_macs(hw, 32, cy, groups, points, embed)
        for hw, cy in (((2, 2), 128), ((4, 4), 64), ((8, 8), 32))
    )
    assert report["macs"] == want

    # The offsets learn.
    check_segmenter_fit(model, x, 23, 4, model.get_layer("sapa_upsampling_P3").offset.kernel)

    restored = reloaded(model, tmp_path)
    assert isinstance(restored.get_layer("sapa_upsampling_P2"), keras_sapa.SAPADeform)
    assert_close(restored(x), model(x))


def test_feature_pyramid_with_sapa_deform():
    """SAPA-D in the KerasCV pyramid's top-down steps (a layer template), checked against
    the pyramid's own parts: merged P4 = lateral P4 + SAPA-D(lateral P5, lateral P4)."""
    keras.utils.set_random_seed(24)
    feats = pyramid_features(25, 1, (16, 16, 16))
    template = keras_sapa.SAPADeform(num_points=4, groups=2, embedding_dim=4, norm="group")
    pyramid = sapa_models.SAPAFeaturePyramid(num_channels=32, upsampler=template)
    outputs = pyramid(feats)
    assert all(isinstance(layer, keras_sapa.SAPADeform) for layer in pyramid.upsamplers)
    assert all(layer.norm == "group" and layer.num_points == 4 for layer in pyramid.upsamplers)
    assert not template.built  # a template, never called
    check_pyramid_top_down(pyramid, feats, outputs)


# ------------------------------------------------------------------------- RetinaNet
def pyramid_features(seed, batch, channels):
    """Random backbone levels P3, P4, P5 of ``channels`` channels at strides 8-32."""
    rng = np.random.default_rng(seed)
    return {
        f"P{level}": rng.normal(size=(batch, IMAGE >> level, IMAGE >> level, c)).astype("float32")
        for level, c in zip((3, 4, 5), channels, strict=True)
    }


def check_pyramid_top_down(pyramid, feats, outputs):
    """The pyramid's P4 output against its parts: output_conv(lateral P4 + the
    upsampler of P5 -> P4 applied to lateral P5, guided by lateral P4); and a config
    round trip."""
    lat4 = pyramid.lateral_convs[1](feats["P4"])
    lat5 = pyramid.lateral_convs[2](feats["P5"])
    assert_close(outputs[1], pyramid.output_convs[1](lat4 + pyramid.upsamplers[1](lat5, lat4)))
    clone = sapa_models.SAPAFeaturePyramid.from_config(pyramid.get_config())
    assert clone.get_config() == pyramid.get_config()


def detection_batch():
    x = images(seed=7)
    boxes = np.array([[[4, 4, 36, 36], [24, 16, 32, 44]]] * 2, "float32")  # xywh
    classes = np.array([[0, 2], [1, 2]], "float32")
    return x, {"boxes": boxes, "classes": classes}


@pytest.fixture(scope="module")
def retinanet():
    keras.utils.set_random_seed(4)
    return sapa_models.SAPARetinaNet(
        tiny_backbone(),
        NUM_CLASSES,
        "xywh",
        upsampler={"embedding_dim": EMBED, "kernel_size": KERNEL},
    )


def test_feature_pyramid_standalone():
    keras.utils.set_random_seed(5)
    feats = pyramid_features(8, 2, (64, 128, 256))
    pyramid = sapa_models.SAPAFeaturePyramid(num_channels=32, upsampler={"embedding_dim": EMBED})
    outputs = pyramid(feats)
    sizes = (8, 4, 2, 1, 1)
    assert [tuple(o.shape) for o in outputs] == [(2, s, s, 32) for s in sizes]
    assert [
        tuple(s) for s in pyramid.compute_output_shape({k: v.shape for k, v in feats.items()})
    ] == [(2, s, s, 32) for s in sizes]
    as_list = pyramid([feats["P3"], feats["P4"], feats["P5"]])
    for a, b in zip(outputs, as_list, strict=False):
        assert_close(a, b, atol=0)
    assert [layer.name for layer in pyramid.upsamplers] == ["sapa_P4_to_P3", "sapa_P5_to_P4"]
    # The top-down path really uses SAPA.
    check_pyramid_top_down(pyramid, feats, outputs)
    with pytest.raises(ValueError, match="P3"):
        pyramid({"P4": feats["P4"], "P5": feats["P5"]})
    with pytest.raises(ValueError, match="max_level"):
        sapa_models.SAPAFeaturePyramid(min_level=5, max_level=4)


def test_feature_pyramid_takes_any_guided_layer(tmp_path):
    """A layer that is not SAPA, given as a template, upsamples every top-down step, and
    the pyramid reloads from a .keras file with it."""
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(9)
    shapes = {"P3": (8, 16), "P4": (4, 32), "P5": (2, 64)}
    feats = {
        level: rng.normal(size=(1, size, size, c)).astype("float32")
        for level, (size, c) in shapes.items()
    }
    pyramid = sapa_models.SAPAFeaturePyramid(
        num_channels=8, max_level=5, upsampler=GatedNearest(name="template")
    )
    inputs = {
        level: keras.Input((size, size, c), name=level) for level, (size, c) in shapes.items()
    }
    model = keras.Model(inputs, pyramid(inputs))
    outputs = model(feats)
    assert [type(layer) for layer in pyramid.upsamplers] == [GatedNearest, GatedNearest]
    assert [layer.name for layer in pyramid.upsamplers] == ["sapa_P4_to_P3", "sapa_P5_to_P4"]
    # merged P4 = lateral P4 + GatedNearest(lateral P5, guide=lateral P4), in NumPy.
    lat4 = np.asarray(pyramid.lateral_convs[1](feats["P4"]))
    lat5 = np.asarray(pyramid.lateral_convs[2](feats["P5"]))
    gate = pyramid.upsamplers[1].gate
    merged4 = lat4 + gated_nearest_reference(
        lat5, lat4, np.asarray(gate.kernel), np.asarray(gate.bias)
    )
    assert_close(outputs[1], pyramid.output_convs[1](merged4.astype("float32")))

    config = pyramid.get_config()["upsampler"]
    assert config["class_name"] == "GatedNearest"
    restored = reloaded(model, tmp_path)
    for a, b in zip(restored(feats), outputs, strict=False):
        assert_close(a, b, atol=1e-6)


def test_upsampler_argument():
    """Each accepted form of `upsampler=`, and a ValueError naming it for the others."""
    make = sapa_models.SAPAFeaturePyramid
    default = make(num_channels=8)
    assert {
        (layer.variant, layer.kernel_size, layer.embedding_dim, layer.norm)
        for layer in default.upsamplers
    } == {("bilinear", 5, 64, "layer")}
    # A plain dict holds SAPA arguments; those left out keep the model's defaults.
    no_norm = make(num_channels=8, upsampler={"norm": None, "implementation": "patches"})
    assert {(layer.variant, layer.norm, layer.implementation) for layer in no_norm.upsamplers} == {
        ("bilinear", None, "patches")
    }
    clone = make.from_config(no_norm.get_config())
    assert {layer.norm for layer in clone.upsamplers} == {None}
    # One entry per stage.
    per_stage = make(
        num_channels=8, upsampler=[{"kernel_size": 3}, keras_sapa.SAPA(kernel_size=7)]
    )
    assert [layer.kernel_size for layer in per_stage.upsamplers] == [3, 7]
    assert make.from_config(per_stage.get_config()).get_config() == per_stage.get_config()

    bad = [
        (42, "upsampler"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_sizes": 3}, "kernel_sizes"),
        ({"up_factor": 4}, "up_factor"),
        ([{}], "one entry per stage"),
        ([], "empty"),
        (lambda index, name: "not a layer", "keras.layers.Layer"),
        (lambda index, name: keras_sapa.SAPA(), "must name the layer"),
    ]
    for upsampler, message in bad:
        with pytest.raises(ValueError, match=message):
            make(num_channels=8, upsampler=upsampler)


def test_retinanet_structure_and_overhead(retinanet):
    x = images()
    keras.utils.set_random_seed(4)
    stock = keras_cv.models.RetinaNet(tiny_backbone(), NUM_CLASSES, "xywh")
    ours, theirs = retinanet({"images": x}), stock({"images": x})
    for key in ("box", "classification"):
        assert tuple(ours[key].shape) == tuple(theirs[key].shape)
    assert tuple(ours["classification"].shape)[-1] == NUM_CLASSES

    pyramid = retinanet.feature_pyramid
    assert isinstance(pyramid, sapa_models.SAPAFeaturePyramid)
    assert {layer.variant for layer in pyramid.upsamplers} == {"bilinear"}
    assert len(sapa_layers_of(retinanet)) == 2
    assert upsampling_layers_of(retinanet) == []
    assert len(upsampling_layers_of(stock)) == 1

    report = sapa_models.sapa_overhead(retinanet)
    assert report["params"] > 0
    assert report["params"] == retinanet.count_params() - stock.count_params()
    assert report["replaced_macs"] == 0
    # P5 (2x2) -> P4, then P4 (4x4) -> P3, both 256 channels.
    assert report["macs"] == expected_macs("bilinear", (2, 2), 256, 256, EMBED) + expected_macs(
        "bilinear", (4, 4), 256, 256, EMBED
    )


def test_retinanet_fit_loss_falls(retinanet):
    x, y = detection_batch()
    retinanet.compile(
        classification_loss="focal",
        box_loss="smoothl1",
        # With lr 1e-3 the focal loss of this tiny model spikes (the stock RetinaNet's
        # too); 3e-4 with clipping falls (~1.8 -> ~0.85 in 6 steps, ~0.46 in 10).
        optimizer=keras.optimizers.Adam(3e-4, global_clipnorm=1.0),
        # Eager: 6 steps take less than tracing the train function (the layer tests
        # train traced); the losses are the same.
        run_eagerly=True,
    )
    sapa_kernel = retinanet.feature_pyramid.upsamplers[0].q.kernel
    before = np.array(sapa_kernel.numpy())
    history = retinanet.fit(x, y, epochs=6, batch_size=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    assert not np.allclose(before, sapa_kernel.numpy())


def test_retinanet_with_sapa_deform_fits_and_reloads(tmp_path):
    """The KerasCV RetinaNet with SAPA-D in its pyramid: a few fit steps with falling
    loss that move the SAPA-D weights (its offset branch included), then a .keras reload
    with equal outputs."""
    keras.utils.set_random_seed(14)
    model = sapa_models.SAPARetinaNet(
        tiny_backbone(),
        NUM_CLASSES,
        "xywh",
        upsampler=keras_sapa.SAPADeform(num_points=4, groups=2, embedding_dim=EMBED),
    )
    deform = model.feature_pyramid.upsamplers
    assert deform and all(isinstance(layer, keras_sapa.SAPADeform) for layer in deform)
    x, y = detection_batch()
    model.compile(
        classification_loss="focal",
        box_loss="smoothl1",
        optimizer=keras.optimizers.Adam(3e-4, global_clipnorm=1.0),
        run_eagerly=True,  # as test_retinanet_fit_loss_falls
    )
    before = [np.array(w.numpy()) for w in deform[0].trainable_weights]
    losses = model.fit(x, y, epochs=6, batch_size=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    after = [w.numpy() for w in deform[0].trainable_weights]
    assert all(not np.allclose(b, a) for b, a in zip(before, after, strict=True))
    restored = reloaded(model, tmp_path)
    batch = images(seed=15)
    ours, theirs = restored({"images": batch}), model({"images": batch})
    for key in ("box", "classification"):
        assert_close(ours[key], theirs[key], atol=1e-6)


def test_retinanet_keras_round_trip_keeps_pyramid(retinanet, tmp_path):
    x = images(seed=9)
    restored = reloaded(retinanet, tmp_path)
    assert isinstance(restored.feature_pyramid, sapa_models.SAPAFeaturePyramid)
    assert restored.feature_pyramid.get_config() == retinanet.feature_pyramid.get_config()
    ours, theirs = restored({"images": x}), retinanet({"images": x})
    for key in ("box", "classification"):
        assert_close(ours[key], theirs[key], atol=1e-6)


def test_retinanet_config_keeps_pyramid_where_stock_drops_it(retinanet):
    def upsampler(stage_index, name):
        # A callable: Keras cannot store it, so the configs of its layers are stored.
        return keras_sapa.SAPA(
            variant="gated", kernel_size=3 + 2 * stage_index, embedding_dim=8, name=name
        )

    pyramid_config = dict(num_channels=32, upsampler=upsampler, name="my_pyramid")
    # Stock RetinaNet: the custom pyramid is dropped from the config and comes back as
    # the nearest-neighbour FeaturePyramid.
    keras.utils.set_random_seed(6)
    stock = keras_cv.models.RetinaNet(
        tiny_backbone(),
        NUM_CLASSES,
        "xywh",
        feature_pyramid=sapa_models.SAPAFeaturePyramid(**pyramid_config),
    )
    assert "feature_pyramid" not in stock.get_config()
    stock_clone = keras_cv.models.RetinaNet.from_config(stock.get_config())
    assert not isinstance(stock_clone.feature_pyramid, sapa_models.SAPAFeaturePyramid)

    # SAPARetinaNet keeps it, whatever its configuration.
    ours = sapa_models.SAPARetinaNet(
        tiny_backbone(),
        NUM_CLASSES,
        "xywh",
        feature_pyramid=sapa_models.SAPAFeaturePyramid(**pyramid_config),
    )
    config = ours.get_config()
    clone = sapa_models.SAPARetinaNet.from_config(config)
    assert isinstance(clone.feature_pyramid, sapa_models.SAPAFeaturePyramid)
    assert clone.feature_pyramid.get_config() == ours.feature_pyramid.get_config()
    assert [layer.variant for layer in clone.feature_pyramid.upsamplers] == ["gated", "gated"]
    assert [layer.kernel_size for layer in clone.feature_pyramid.upsamplers] == [3, 5]
    # (A .keras file reloads the same class: test_retinanet_keras_round_trip_keeps_pyramid.)

    with pytest.raises(ValueError, match="feature_pyramid"):
        sapa_models.SAPARetinaNet(
            retinanet.backbone,
            NUM_CLASSES,
            "xywh",
            feature_pyramid=sapa_models.SAPAFeaturePyramid(),
            upsampler={"variant": "gated"},
        )


def test_overhead_rejects_stock_models():
    inputs = keras.Input((IMAGE, IMAGE, 3))
    plain = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    with pytest.raises(ValueError, match="SAPADeepLabV3Plus"):
        sapa_models.sapa_overhead(plain)
