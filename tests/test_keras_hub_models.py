"""keras_sapa.models.keras_hub: SAPA in KerasHub's SegFormer, DeepLabV3 and RetinaNet.

Backend-neutral (no TensorFlow import): it runs on whichever Keras backend the process
uses, and is skipped where the SAPA layer does not run on that backend. Tiny encoders
(64x64 images, a few channels) built from KerasHub's constructors keep it fast; no
downloads. Each check compares against something independent of the code under test:
the stock KerasHub model (shapes, parameters, weights), a written-out cost model, and
the model before saving. Each model pair is built once per module; the tests that
overwrite its weights (the stock-weight transfer) run after those that train or read
it, in file order.
"""

import collections
import json
import math
import re
import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import keras_sapa  # noqa: E402
import keras_sapa.models as sapa_models  # noqa: E402
from keras_sapa.demo import train  # noqa: E402  (its MiT builder)
from keras_sapa.models.keras_hub import _upstream  # noqa: E402

IMAGE = 64
NUM_CLASSES = 3
FILTERS = 32
EMBED = 8


def _layer_runs_here():
    try:
        layer = keras_sapa.SAPA(up_factor=2, embedding_dim=4)
        layer(np.zeros((1, 2, 2, 4), "float32"), np.zeros((1, 4, 4, 4), "float32"))
    except Exception as error:  # noqa: BLE001 - the reason is reported in the skip
        return f"SAPA layer does not run on {keras.config.backend()}: {error}"
    return None


_SKIP = _layer_runs_here()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


# ----------------------------------------------------------------------- helpers
def mit_encoder(stages=4, image=IMAGE):
    # Strides 4, 8, 16, 32: stages of 16, 8, 4, 2 points on a side (at 64x64).
    return train.mit_encoder(image, hidden_dims=[8, 16, 32, 64][:stages])


def resnet_encoder(image=IMAGE):
    # Basic blocks: P2..P5 with 64 (KerasHub requires it), 16, 16, 32 channels at
    # strides 4..32.
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16, 16, 32],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
        image_shape=(image, image, 3),
    )


def to_np(value):
    """A tensor or variable of any backend as a NumPy array (a copy)."""
    return np.array(keras.ops.convert_to_numpy(value))


def images(batch=2, seed=0, size=IMAGE):
    return np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype("float32")


def all_layers(model):
    return list(model._flatten_layers())


def sapa_layers_of(model, cls=keras_sapa.SAPA):
    return [layer for layer in all_layers(model) if isinstance(layer, cls)]


def is_sapa_variable(variable):
    return "sapa_" in variable.path


def expected_macs(variant, low_hw, cx, cy, d, k=5, s=2, value=False):
    """Cost model of shared/SAPA_SPEC.md, written out independently of _counting.py
    (tests/test_models.py uses it too)."""
    n_lo = low_hw[0] * low_hw[1]
    n_hi = n_lo * s * s
    total = n_hi * k * k * d + n_hi * k * k * cx + n_lo * cx * d  # sim + agg + key
    if value:
        total += n_lo * cx * cx
    if variant == "bilinear":
        total += n_hi * cy * d
    elif variant == "gated":
        total += n_hi * cy * d + n_hi * cx * d + n_lo * cx + 2 * n_hi * d
    else:
        raise AssertionError(variant)
    return total


def deform_macs(low_hw, cx, cy, groups, points, embed, s=2, high_offset=True):
    """SAPA-D's cost model (shared/SAPA_SPEC.md, SAPA-D "Cost"), written out
    independently of _counting.py: per output point 4 taps x E channels and an E-long
    dot product per sampled point, 4 taps x Cx for the values; q at high, k and offset
    at low resolution."""
    n_lo = low_hw[0] * low_hw[1]
    n_hi = n_lo * s * s
    offsets = groups * points * 2 * (s * s if high_offset else 1)
    return (
        n_hi * groups * points * (4 * embed + embed)
        + n_hi * points * 4 * cx
        + n_hi * cy * groups * embed
        + n_lo * cx * (groups * embed + offsets)
    )


def counterparts(ours, stock):
    """Pairs (our variable, stock variable), matched independently of the transfer:
    by variable path with auto-generated counters dropped (``sequential_24`` ->
    ``sequential``), in order within each such path."""

    def key(variable):
        return "/".join(re.sub(r"_\d+$", "", part) for part in variable.path.split("/"))

    groups = collections.defaultdict(list)
    for variable in stock.weights:
        groups[key(variable)].append(variable)
    kept = [v for v in ours.weights if not is_sapa_variable(v)]
    pairs = []
    taken = collections.Counter()
    for variable in kept:
        k = key(variable)
        assert taken[k] < len(groups[k]), f"no stock counterpart for {variable.path}"
        pairs.append((variable, groups[k][taken[k]]))
        taken[k] += 1
    assert len(pairs) == len(stock.weights)
    return pairs


def check_stock_weights_load(ours, stock):
    """Scramble the stock model's variables, transfer, and check every non-SAPA
    variable of ours equals its stock counterpart while SAPA's are untouched."""
    rng = np.random.default_rng(11)
    for variable in stock.weights:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    pairs = counterparts(ours, stock)
    sapa_before = [to_np(v) for v in ours.weights if is_sapa_variable(v)]
    assert sapa_before, "the model has no SAPA variables"
    assert not all(np.array_equal(to_np(a), to_np(b)) for a, b in pairs)

    sapa_models.load_stock_weights(ours, stock)

    for mine, theirs in pairs:
        assert tuple(mine.shape) == tuple(theirs.shape), (mine.path, theirs.path)
        np.testing.assert_array_equal(to_np(mine), to_np(theirs), err_msg=mine.path)
    sapa_after = [to_np(v) for v in ours.weights if is_sapa_variable(v)]
    for a, b in zip(sapa_before, sapa_after, strict=False):
        np.testing.assert_array_equal(a, b)


def check_fit_lowers_loss(model, x, y, loss, lr=3e-3, epochs=5, cls=keras_sapa.SAPA):
    # TensorFlow: eager, since tracing the train step of these models costs more than
    # a few steps. JAX: jitted, since op-by-op dispatch is far slower there.
    eager = keras.config.backend() == "tensorflow"
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, run_eagerly=eager)
    sapa = sapa_layers_of(model, cls)[0]
    before = [to_np(w) for w in sapa.trainable_weights]
    history = model.fit(x, y, epochs=epochs, batch_size=len(x), verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    after = [to_np(w) for w in sapa.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=False)), (
        "SAPA got no gradient"
    )


def without_encoder(config):
    """The config less the encoder's (whose auto-generated names differ), tuples as
    lists (as they come back from a file)."""
    return json.loads(
        json.dumps({key: value for key, value in config.items() if key != "image_encoder"})
    )


def outputs_np(outputs):
    """A model's output (a tensor, or a dict of them) as a dict of NumPy arrays."""
    if isinstance(outputs, dict):
        return {key: to_np(value) for key, value in outputs.items()}
    return {"output": to_np(outputs)}


def check_keras_round_trip(model, tmp_path, x, name, cls=keras_sapa.SAPA):
    path = str(tmp_path / f"{name}.keras")
    expected = outputs_np(model(x))
    model.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is type(model)
    assert type(getattr(restored, "backbone", None)) is type(getattr(model, "backbone", None))
    assert [layer.name for layer in sapa_layers_of(restored, cls)] == [
        layer.name for layer in sapa_layers_of(model, cls)
    ]
    got = outputs_np(restored(x))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    return restored


# ---------------------------------------------------------------------- SegFormer
@pytest.fixture(scope="module")
def segformer_pair():
    keras.utils.set_random_seed(1)
    stock = keras_hub.models.SegFormerImageSegmenter(
        backbone=keras_hub.models.SegFormerBackbone(
            image_encoder=mit_encoder(), projection_filters=FILTERS
        ),
        num_classes=NUM_CLASSES,
    )
    ours = sapa_models.SAPASegFormer(
        backbone=mit_encoder(),
        num_classes=NUM_CLASSES,
        projection_filters=FILTERS,
        upsampler={"embedding_dim": EMBED},
    )
    return ours, stock


def test_segformer_structure(segformer_pair):
    ours, stock = segformer_pair
    x = images()
    assert isinstance(ours, keras_hub.models.SegFormerImageSegmenter)
    assert isinstance(ours.backbone, sapa_models.SAPASegFormerBackbone)
    assert tuple(ours(x).shape) == tuple(stock(x).shape) == (2, IMAGE, IMAGE, NUM_CLASSES)

    # The stock decoder resizes stages 2-4 with one bilinear Resizing; ours has none.
    def resizings(model):
        return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.Resizing)]

    assert len(resizings(stock.backbone)) == 1
    assert resizings(ours.backbone) == []
    sapa = sapa_layers_of(ours.backbone)
    assert sorted(layer.name for layer in sapa) == sorted(
        [
            "sapa_P4_to_P3",
            "sapa_P4_to_P2",
            "sapa_P4_to_P1",
            "sapa_P3_to_P2",
            "sapa_P3_to_P1",
            "sapa_P2_to_P1",
        ]
    )
    # Paper defaults: SAPA-B, K=5; d as asked; every stage 2x on the decoder width.
    for layer in sapa:
        assert (layer.variant, layer.kernel_size, layer.embedding_dim) == ("bilinear", 5, EMBED)
        assert layer.up_factor == 2
        assert tuple(layer.q.kernel.shape) == (FILTERS, EMBED)
    # The stock decoder's named layers are all there.
    names = {layer.name for layer in ours.backbone.layers}
    assert {"linear_8", "linear_16", "linear_32", "linear_64"} <= names


def test_segformer_defaults_are_the_papers():
    encoder = mit_encoder()  # shared by the models below (Keras shares the layers)
    backbone = sapa_models.SAPASegFormerBackbone(image_encoder=encoder, projection_filters=16)
    assert {
        (layer.variant, layer.kernel_size, layer.embedding_dim, layer.norm)
        for layer in sapa_layers_of(backbone)
    } == {("bilinear", 5, 32, "layer")}
    model = sapa_models.SAPASegFormer(backbone=encoder, num_classes=2)
    assert model.backbone.projection_filters == 256
    gated = sapa_models.SAPASegFormer(
        backbone=encoder,
        num_classes=2,
        projection_filters=16,
        upsampler={"variant": "gated", "norm": None},
    )
    assert {layer.variant for layer in sapa_layers_of(gated)} == {"gated"}
    assert {layer.norm for layer in sapa_layers_of(gated)} == {None}


def test_segformer_bad_arguments():
    encoder = mit_encoder()
    with pytest.raises(ValueError, match="kernel_size"):
        sapa_models.SAPASegFormerBackbone(
            image_encoder=encoder, projection_filters=8, upsampler={"kernel_size": 4}
        )
    with pytest.raises(ValueError, match="variant"):
        sapa_models.SAPASegFormerBackbone(
            image_encoder=encoder, projection_filters=8, upsampler={"variant": "x"}
        )
    with pytest.raises(ValueError, match="6 upsampling stages"):
        sapa_models.SAPASegFormerBackbone(
            image_encoder=encoder, projection_filters=8, upsampler=[{}, {}]
        )
    with pytest.raises(ValueError, match="projection_filters"):
        sapa_models.SAPASegFormerBackbone(image_encoder=encoder, projection_filters=0)
    with pytest.raises(ValueError, match="image_encoder"):
        sapa_models.SAPASegFormerBackbone(image_encoder="mit", projection_filters=8)
    backbone = sapa_models.SAPASegFormerBackbone(image_encoder=encoder, projection_filters=8)
    with pytest.raises(ValueError, match="not both"):
        sapa_models.SAPASegFormer(backbone=backbone, num_classes=2, upsampler={"variant": "gated"})
    with pytest.raises(ValueError, match="num_classes"):
        sapa_models.SAPASegFormer(backbone=backbone, num_classes=0)


def test_segformer_overhead_against_stock(segformer_pair):
    ours, stock = segformer_pair
    report = sapa_models.sapa_overhead(ours)
    assert report["params"] > 0
    assert report["params"] == ours.count_params() - stock.count_params()
    assert report["stock_params"] == stock.count_params()
    # Stage sizes 2, 4, 8 -> finest 16: streams P4 (2->4->8->16), P3 (4->8->16), P2 (8->16).
    lows = [(2, 2), (4, 4), (8, 8), (4, 4), (8, 8), (8, 8)]
    want = sum(expected_macs("bilinear", hw, FILTERS, FILTERS, EMBED) for hw in lows)
    assert report["macs"] == want
    # Stock: three bilinear resizes to 16x16 at 4 multiply-adds per output value.
    assert report["replaced_macs"] == 3 * 4 * 16 * 16 * FILTERS
    assert report["net_macs"] == want - report["replaced_macs"]


def check_segmenter_fit_and_round_trip(model, tmp_path, seed, name, lr=3e-3, cls=keras_sapa.SAPA):
    """A few fit steps with falling loss, then a .keras reload with equal outputs and
    the same backbone config; returns the reloaded model."""
    size = model.input.shape[1]
    x = images(seed=seed, size=size)
    y = np.random.default_rng(seed + 1).integers(0, NUM_CLASSES, size=(2, size, size, 1))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    check_fit_lowers_loss(model, x, y, loss, lr=lr, cls=cls)
    restored = check_keras_round_trip(model, tmp_path, x, name, cls=cls)
    assert without_encoder(restored.backbone.get_config()) == without_encoder(
        model.backbone.get_config()
    )
    return restored


def test_segformer_fit_and_round_trip(segformer_pair, tmp_path):
    ours, _ = segformer_pair
    check_segmenter_fit_and_round_trip(ours, tmp_path, 4, "segformer")
    config = ours.backbone.get_config()
    clone = sapa_models.SAPASegFormerBackbone.from_config(config)
    assert without_encoder(clone.get_config()) == without_encoder(config)


# ---------------------------------------------------------------------- DeepLabV3
DEEPLAB_ARGS = dict(
    spatial_pyramid_pooling_key="P5",
    upsampling_size=8,
    dilation_rates=[1, 2],
    low_level_feature_key="P2",
    image_shape=(IMAGE, IMAGE, 3),
)


def custom_sapa():
    """A SAPA template whose every argument differs from the model's default: the whole
    layer config, not five scalars, reaches each stage."""
    return keras_sapa.SAPA(
        variant="gated",
        embedding_dim=EMBED,
        norm="group",
        norm_groups=8,
        use_bias=False,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01, seed=3),
        name="template",
    )


@pytest.fixture(scope="module")
def deeplab_pair():
    keras.utils.set_random_seed(2)
    stock = keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=keras_hub.models.DeepLabV3Backbone(
            image_encoder=resnet_encoder(), **DEEPLAB_ARGS
        ),
        num_classes=NUM_CLASSES,
    )
    ours = keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=sapa_models.SAPADeepLabV3Backbone(
            image_encoder=resnet_encoder(), upsampler=custom_sapa(), **DEEPLAB_ARGS
        ),
        num_classes=NUM_CLASSES,
    )
    return ours, stock


def test_deeplab_v3_structure_and_overhead(deeplab_pair):
    ours, stock = deeplab_pair
    x = images()
    assert tuple(ours(x).shape) == tuple(stock(x).shape) == (2, IMAGE, IMAGE, NUM_CLASSES)
    stock_names = {layer.name for layer in stock.backbone.layers}
    our_names = {layer.name for layer in ours.backbone.layers}
    assert "encoder_output_upsampling" in stock_names
    assert "encoder_output_upsampling" not in our_names
    # Every other stock name is kept; SAPA stages are added.
    unnamed = {name for name in stock_names if name.split("_")[0] in ("functional", "spatial")}
    assert stock_names - {"encoder_output_upsampling"} - unnamed <= our_names
    sapa = sapa_layers_of(ours.backbone)
    assert [layer.name for layer in sapa] == [
        "sapa_upsampling_P4",
        "sapa_upsampling_P3",
        "sapa_upsampling_P2",
    ]
    assert all(layer.variant == "gated" for layer in sapa)
    for layer in sapa:
        assert isinstance(layer.norm_x, keras.layers.GroupNormalization)
        assert layer.norm_x.groups == 8
        assert layer.k.bias is None and layer.qy.bias is None
        assert layer.kernel_initializer.stddev == 0.01  # the default is 0.02
    ups = [layer for layer in ours.backbone.layers if isinstance(layer, keras.layers.UpSampling2D)]
    assert [layer.name for layer in ups] == ["backbone_output_upsampling"]

    report = sapa_models.sapa_overhead(ours)
    assert report["params"] == ours.count_params() - stock.count_params() > 0
    # ASPP gives 256 channels at P5 (2x2); guides P4, P3, P2 have 16, 16, 64 channels.
    want = (
        expected_macs("gated", (2, 2), 256, 16, EMBED)
        + expected_macs("gated", (4, 4), 256, 16, EMBED)
        + expected_macs("gated", (8, 8), 256, 64, EMBED)
    )
    assert report["macs"] == want
    assert report["replaced_macs"] == 4 * 16 * 16 * 256


def test_deeplab_v3_bad_arguments():
    encoder = resnet_encoder()
    with pytest.raises(ValueError, match="upsampling_size"):
        sapa_models.SAPADeepLabV3Backbone(
            image_encoder=encoder, **dict(DEEPLAB_ARGS, upsampling_size=6)
        )
    with pytest.raises(ValueError, match="lacks"):
        sapa_models.SAPADeepLabV3Backbone(
            image_encoder=encoder, **dict(DEEPLAB_ARGS, upsampling_size=16)
        )
    with pytest.raises(ValueError, match="spatial_pyramid_pooling_key"):
        sapa_models.SAPADeepLabV3Backbone(
            image_encoder=encoder, **dict(DEEPLAB_ARGS, spatial_pyramid_pooling_key="P9")
        )


def test_deeplab_v3_fit_and_round_trip(deeplab_pair, tmp_path):
    ours, _ = deeplab_pair
    restored = check_segmenter_fit_and_round_trip(ours, tmp_path, 6, "deeplab_v3")
    assert {layer.norm_groups for layer in sapa_layers_of(restored)} == {8}


# ---------------------------------------------------------------------- RetinaNet
RETINA_ARGS = dict(min_level=3, max_level=5, use_p5=False, image_shape=(IMAGE, IMAGE, 3))


def per_stage_sapa(stage_index, name):
    """A callable upsampler: K=3 for the first stage (P4 -> P3), K=5 after."""
    return keras_sapa.SAPA(
        kernel_size=3 if stage_index == 0 else 5, embedding_dim=EMBED, name=name
    )


@pytest.fixture(scope="module")
def retinanet_pair():
    keras.utils.set_random_seed(5)
    stock = keras_hub.models.RetinaNetBackbone(image_encoder=resnet_encoder(), **RETINA_ARGS)
    ours = sapa_models.SAPARetinaNetBackbone(
        image_encoder=resnet_encoder(), upsampler=per_stage_sapa, **RETINA_ARGS
    )
    return ours, stock


def test_retinanet_pyramid_structure_and_overhead(retinanet_pair):
    ours, stock = retinanet_pair
    x = images()
    mine, theirs = ours(x), stock(x)
    assert sorted(mine) == sorted(theirs) == ["P3", "P4", "P5"]
    for key in mine:
        assert tuple(mine[key].shape) == tuple(theirs[key].shape)
    pyramid = ours.feature_pyramid
    assert isinstance(pyramid, sapa_models.SAPAKerasHubFeaturePyramid)
    assert pyramid.name == "fpn" and ours.get_layer("backbone") is not None
    assert pyramid.top_down_op is None
    assert [layer.name for layer in sapa_layers_of(pyramid)] == ["sapa_P4_to_P3", "sapa_P5_to_P4"]

    # The top-down path is SAPA: P4 = output_conv(lateral_4 + SAPA(lateral_5, lateral_4)).
    feats = ours.get_layer("backbone")(x)
    lat4 = pyramid.lateral_conv_layers["P4"](feats["P4"])
    lat5 = pyramid.lateral_conv_layers["P5"](feats["P5"])
    p4 = pyramid.output_conv_layers["P4"](lat4 + pyramid.sapa_layers["P4"](lat5, lat4))
    np.testing.assert_allclose(to_np(mine["P4"]), to_np(p4), rtol=1e-5, atol=1e-5)

    report = sapa_models.sapa_overhead(ours)
    assert report["params"] == ours.count_params() - stock.count_params() > 0
    assert report["replaced_macs"] == 0
    assert report["macs"] == expected_macs("bilinear", (2, 2), 256, 256, EMBED) + expected_macs(
        "bilinear", (4, 4), 256, 256, EMBED, k=3
    )


def test_retinanet_detector_fit_and_round_trip(retinanet_pair, tmp_path):
    ours, _ = retinanet_pair
    detector = keras_hub.models.RetinaNetObjectDetector(
        backbone=ours, num_classes=NUM_CLASSES, bounding_box_format="yxyx"
    )
    x = images(seed=8)
    boxes = np.array([[[4, 4, 36, 36], [16, 24, 44, 40]]] * 2, "float32")
    classes = np.array([[0, 2], [1, 2]], "float32")
    detector.compile(optimizer=keras.optimizers.Adam(3e-4, global_clipnorm=1.0), run_eagerly=True)
    sapa = sapa_layers_of(ours)[0]
    before = [to_np(w) for w in sapa.trainable_weights]
    history = detector.fit(
        x, {"boxes": boxes, "labels": classes}, epochs=6, batch_size=2, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert any(
        not np.allclose(a, to_np(b)) for a, b in zip(before, sapa.trainable_weights, strict=False)
    )

    path = str(tmp_path / "retinanet.keras")
    detector.save(path)
    restored = keras.models.load_model(path)
    assert type(restored.backbone) is sapa_models.SAPARetinaNetBackbone
    assert isinstance(restored.backbone.feature_pyramid, sapa_models.SAPAKerasHubFeaturePyramid)
    # The callable is not stored: the configs of the layers it built are.
    stored = restored.backbone.get_config()["upsampler"]
    assert [entry["config"]["kernel_size"] for entry in stored] == [3, 5]
    ours_out = ours(x)
    back_out = restored.backbone(x)
    for key in ours_out:
        np.testing.assert_allclose(
            to_np(back_out[key]), to_np(ours_out[key]), rtol=1e-5, atol=1e-5
        )


# ------------------------------------------- stock weights and upstream classes
# These run after every test that trains or reads the module's model pairs: the
# transfer overwrites the weights of both models of a pair (the stock ones scrambled).


@pytest.mark.parametrize("pair", ["segformer_pair", "deeplab_pair", "retinanet_pair"])
def test_stock_weights_load(pair, request):
    check_stock_weights_load(*request.getfixturevalue(pair))


def test_upstream_private_classes_are_the_stock_ones(deeplab_pair, retinanet_pair):
    """KerasHub does not export these two classes; fail loudly if they move."""
    stock_deeplab, stock_retinanet = deeplab_pair[1].backbone, retinanet_pair[1]
    assert any(type(layer) is _upstream.SpatialPyramidPooling for layer in stock_deeplab.layers)
    assert type(stock_retinanet.feature_pyramid) is _upstream.FeaturePyramid


# -------------------------------------------------------------------------- SAPA-D
# SAPA-D (keras_sapa.SAPADeform) as the upsampler of each KerasHub model, given the way
# each model's docstring allows: a layer template, a serialized layer, a per-stage list.
# 32x32 images. Per model: (build(upsampler), output shapes, stages as (low-resolution
# size, x channels, guide channels), the stage layers' names).
DEFORM = dict(num_points=4, groups=4, embedding_dim=4)
DEFORM_IMAGE = 32


def _deform_segformer(upsampler):
    # Three encoder stages, sizes 8, 4, 2: streams P3 (2->4->8) and P2 (4->8).
    return sapa_models.SAPASegFormer(
        backbone=mit_encoder(3, DEFORM_IMAGE),
        num_classes=NUM_CLASSES,
        projection_filters=FILTERS,
        upsampler=upsampler,
    )


def _deform_deeplab_v3(upsampler):
    # ASPP: 256 channels at P5 (1x1); guides P4, P3, P2 have 16, 16, 64 channels.
    return keras_hub.models.DeepLabV3ImageSegmenter(
        backbone=sapa_models.SAPADeepLabV3Backbone(
            image_encoder=resnet_encoder(DEFORM_IMAGE),
            upsampler=upsampler,
            **dict(DEEPLAB_ARGS, image_shape=(DEFORM_IMAGE, DEFORM_IMAGE, 3)),
        ),
        num_classes=NUM_CLASSES,
    )


def _deform_retinanet(upsampler):
    # The pyramid's 256-channel laterals at P5 (1x1) and P4 (2x2).
    return sapa_models.SAPARetinaNetBackbone(
        image_encoder=resnet_encoder(DEFORM_IMAGE),
        upsampler=upsampler,
        **dict(RETINA_ARGS, image_shape=(DEFORM_IMAGE, DEFORM_IMAGE, 3)),
    )


DEFORM_MODELS = {
    "segformer": (
        _deform_segformer,
        {"output": (2, DEFORM_IMAGE, DEFORM_IMAGE, NUM_CLASSES)},
        [((2, 2), FILTERS, FILTERS), ((4, 4), FILTERS, FILTERS), ((4, 4), FILTERS, FILTERS)],
        ["sapa_P3_to_P2", "sapa_P3_to_P1", "sapa_P2_to_P1"],
    ),
    "deeplab_v3": (
        _deform_deeplab_v3,
        {"output": (2, DEFORM_IMAGE, DEFORM_IMAGE, NUM_CLASSES)},
        [((1, 1), 256, 16), ((2, 2), 256, 16), ((4, 4), 256, 64)],
        ["sapa_upsampling_P4", "sapa_upsampling_P3", "sapa_upsampling_P2"],
    ),
    "retinanet": (
        _deform_retinanet,
        {"P3": (2, 4, 4, 256), "P4": (2, 2, 2, 256), "P5": (2, 1, 1, 256)},
        [((2, 2), 256, 256), ((1, 1), 256, 256)],
        ["sapa_P4_to_P3", "sapa_P5_to_P4"],
    ),
}


def _deform_upsampler(form, count):
    template = keras_sapa.SAPADeform(**DEFORM)
    if form == "template":
        return template
    if form == "serialized":
        return keras.saving.serialize_keras_object(template)
    return [template] * count


@pytest.mark.parametrize(
    "model_name, form",
    [("segformer", "template"), ("deeplab_v3", "serialized"), ("retinanet", "per_stage")],
)
def test_models_with_sapa_deform(model_name, form, tmp_path):
    """SAPA-D as every stage of each KerasHub model: the stage layers, the output
    shapes, the cost against the model written out above, a config round trip, a few
    fit steps with falling loss that move the SAPA-D weights (the segmenters on labels,
    the RetinaNet pyramid on random targets for its levels) and a .keras reload with
    equal outputs."""
    build, shapes, stages, names = DEFORM_MODELS[model_name]
    keras.utils.set_random_seed(6)
    model = build(_deform_upsampler(form, len(stages)))
    backbone = getattr(model, "backbone", model)
    deform = sapa_layers_of(backbone, keras_sapa.SAPADeform)
    assert sorted(layer.name for layer in deform) == sorted(names)
    assert not sapa_layers_of(model)
    assert {(layer.num_points, layer.groups, layer.embedding_dim) for layer in deform} == {
        (DEFORM["num_points"], DEFORM["groups"], DEFORM["embedding_dim"])
    }

    x = images(seed=7, size=DEFORM_IMAGE)
    out = outputs_np(model(x))
    assert {key: value.shape for key, value in out.items()} == shapes

    groups, points, embed = DEFORM["groups"], DEFORM["num_points"], DEFORM["embedding_dim"]
    report = sapa_models.sapa_overhead(model)
    assert report["macs"] == sum(
        deform_macs(hw, cx, cy, groups, points, embed) for hw, cx, cy in stages
    )
    # q (Cy -> G*E), k (Cx -> G*E) and offset (Cx -> G*P*2*s*s), with biases.
    assert report["params"] == sum(
        (cy + 1) * groups * embed + (cx + 1) * groups * (embed + points * 8)
        for _, cx, cy in stages
    )

    config = backbone.get_config()
    clone = type(backbone).from_config(config)
    assert without_encoder(clone.get_config()) == without_encoder(config)
    assert sorted(layer.name for layer in sapa_layers_of(clone, keras_sapa.SAPADeform)) == sorted(
        names
    )

    if model_name == "retinanet":  # the pyramid alone: its levels regress random targets
        rng = np.random.default_rng(8)
        y = {key: rng.normal(size=shape).astype("float32") for key, shape in shapes.items()}
        check_fit_lowers_loss(model, x, y, "mse", lr=1e-3, cls=keras_sapa.SAPADeform)
        check_keras_round_trip(model, tmp_path, x, model_name, cls=keras_sapa.SAPADeform)
    else:
        check_segmenter_fit_and_round_trip(
            model, tmp_path, 7, model_name, lr=1e-2, cls=keras_sapa.SAPADeform
        )


def test_overhead_of_a_segformer_b1_is_computed_without_weights():
    """SegFormer-B1's hyperparameters (MiT-B1: widths 64-128-320-512), decoder width 256,
    at 512x512: parameters are counted from the layers, multiply-adds checked against
    the cost model written out here."""
    if keras.config.backend() != "tensorflow":
        pytest.skip("one backend is enough for a count")
    encoder = train.mit_encoder(
        512, hidden_dims=(64, 128, 320, 512), depth=2, num_heads=(1, 2, 5, 8), drop_path=0.1
    )
    model = sapa_models.SAPASegFormerBackbone(image_encoder=encoder, projection_filters=256)
    report = sapa_models.sapa_overhead(model)
    # SAPA-B, d=32 per layer: LayerNorms 2*(2*256), q and k 2*(256*32 + 32).
    assert report["params"] == 6 * (2 * 2 * 256 + 2 * (256 * 32 + 32))
    lows = [(16, 16), (32, 32), (64, 64), (32, 32), (64, 64), (64, 64)]
    assert report["macs"] == sum(expected_macs("bilinear", hw, 256, 256, 32) for hw in lows)
    assert math.isclose(report["replaced_macs"], 3 * 4 * 128 * 128 * 256)

    # SAPA-D with the official defaults (P=9, G=4, E=32, high offsets, no norm) at the
    # same six stages (docs/models.md): q and k 256 -> 128, offset 256 -> 9*4*2*4 = 288.
    deform = sapa_models.SAPASegFormerBackbone(
        image_encoder=encoder, projection_filters=256, upsampler=keras_sapa.SAPADeform()
    )
    report = sapa_models.sapa_overhead(deform)
    assert report["params"] == 6 * (2 * (256 * 128 + 128) + 256 * 288 + 288)
    assert report["macs"] == sum(deform_macs(hw, 256, 256, 4, 9, 32) for hw in lows)


# ------------------------------------------------------------ on JAX and PyTorch
def check_small_segformer(tmp_path):
    """A SAPA SegFormer that builds, takes stock weights, fits, saves and reloads, with
    two encoder stages at 32x32 (one SAPA stage): the mechanisms of the four-stage
    model of the TensorFlow run, a fraction of its compile time on JAX."""
    keras.utils.set_random_seed(0)
    model = sapa_models.SAPASegFormer(
        backbone=mit_encoder(2, 32),
        num_classes=NUM_CLASSES,
        projection_filters=FILTERS,
        upsampler={"embedding_dim": EMBED},
    )
    stock = keras_hub.models.SegFormerImageSegmenter(
        backbone=keras_hub.models.SegFormerBackbone(
            image_encoder=mit_encoder(2, 32), projection_filters=FILTERS
        ),
        num_classes=NUM_CLASSES,
    )
    check_stock_weights_load(model, stock)
    check_segmenter_fit_and_round_trip(model, tmp_path, 1, "segformer_small")


def test_segformer_on_this_backend(tmp_path):
    """:func:`check_small_segformer` where the suite runs on JAX or PyTorch: the shared
    JAX and PyTorch processes of tests/test_backends.py run this test (the TensorFlow run
    checks the four-stage SegFormer above). It also checks that the SAPA SegFormer does
    not pull in KerasCV there."""
    if keras.config.backend() == "tensorflow":
        pytest.skip("the TensorFlow run checks the four-stage SegFormer above")
    check_small_segformer(tmp_path)
    assert "keras_cv" not in sys.modules
