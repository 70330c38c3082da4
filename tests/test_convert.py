"""Importing and exporting official PyTorch SAPA weights (keras_sapa.convert).

Random state dicts in the official naming and layouts (torch Linear ``(out, in)``,
1x1 Conv2d ``(out, in, 1, 1)``, LayerNorm / GroupNorm ``(C,)``) are loaded into the
layer, and the layer's output is compared with the NumPy loop reference fed the same
weights. Where torch is importable, a small PyTorch SAPA written here from the spec
(unfold-based similarity and aggregation) is compared with the converted layer, and
real ``.pth`` files are read. Without torch those tests skip; everything else runs.
"""

import sys
import types
import warnings

import keras
import numpy as np
import pytest

import reference as ref
from keras_sapa import SAPA
from keras_sapa import convert

ATOL = 1e-4
RTOL = 1e-4


# --------------------------------------------------------------------- helpers
def make_state_dict(
    rng, variant, cx, cy, d=8, norm="layer", use_bias=True, v_out=None, fmt="linear", prefix=""
):
    """A random state dict of the official module, in torch names and layouts."""
    sd = {}

    def put(name, value):
        sd[prefix + name] = np.asarray(value, np.float32)

    if norm is not None:
        for name, channels in (("norm_y", cy), ("norm_x", cx)):
            put(f"{name}.weight", 1.0 + 0.3 * rng.standard_normal(channels))
            put(f"{name}.bias", 0.3 * rng.standard_normal(channels))

    def projection(name, out, inp):
        weight = 0.3 * rng.standard_normal((out, inp))
        put(f"{name}.weight", weight[:, :, None, None] if fmt == "conv" else weight)
        if use_bias:
            put(f"{name}.bias", 0.3 * rng.standard_normal(out))

    if variant == "bilinear":
        projection("q", d, cy)
    elif variant == "concat":
        projection("q", d, cy + cx)
    elif variant == "gated":
        projection("qy", d, cy)
        projection("qx", d, cx)
        projection("gate", 1, cx)
    if variant != "identity":
        projection("k", d, cx)
    if v_out is not None:
        projection("v", v_out, cx)
    return sd


def reference_params(sd, prefix=""):
    """Official names -> arrays in the reference's Keras layout: transposed here."""
    params = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        value = np.asarray(value, np.float64)
        if value.ndim == 4:
            value = value[:, :, 0, 0]
        params[key[len(prefix) :]] = value.T if value.ndim == 2 else value
    return params


def random_inputs(rng, cx, cy, up_factor, height=3, width=4, batch=2):
    x = rng.standard_normal((batch, height, width, cx)).astype(np.float32)
    y = rng.standard_normal((batch, up_factor * height, up_factor * width, cy)).astype(np.float32)
    return x, y


def run_layer(layer, x, y):
    if layer.data_format == "channels_first":
        out = layer(np.transpose(x, (0, 3, 1, 2)), np.transpose(y, (0, 3, 1, 2)))
        return np.transpose(keras.ops.convert_to_numpy(out), (0, 2, 3, 1))
    return keras.ops.convert_to_numpy(layer(x, y))


def build_layer(cx, cy, **kwargs):
    layer = SAPA(**kwargs)
    if layer.data_format == "channels_first":
        layer.build((None, cx, None, None), (None, cy, None, None))
    else:
        layer.build((None, None, None, cx), (None, None, None, cy))
    return layer


def layer_weights(layer):
    return {w.path.split("/", 1)[1]: np.array(w.numpy()) for w in layer.weights}


# One case per official module shape: (variant, cx, cy, norm, groups, fmt, use_bias,
# v_out, up_factor, kernel_size, data_format).
CASES = {
    "identity-layernorm": ("identity", 6, 6, "layer", 1, "linear", True, None, 2, 5, None),
    "bilinear-layernorm": ("bilinear", 6, 5, "layer", 1, "linear", True, None, 2, 5, None),
    "bilinear-nobias": ("bilinear", 6, 5, "layer", 1, "linear", False, None, 2, 3, None),
    "gated-layernorm": ("gated", 6, 5, "layer", 1, "linear", True, None, 2, 5, None),
    "concat-layernorm": ("concat", 6, 5, "layer", 1, "linear", True, None, 3, 3, None),
    "bilinear-v-out": ("bilinear", 6, 5, "layer", 1, "linear", True, 4, 2, 5, None),
    "gated-v-embed": ("gated", 6, 5, "layer", 1, "linear", True, 6, 2, 3, None),
    "bilinear-groupnorm-conv": ("bilinear", 8, 12, "group", 4, "conv", True, None, 2, 5, None),
    "bilinear-groupnorm32-conv-nchw": (
        "bilinear",
        32,
        64,
        "group",
        32,
        "conv",
        True,
        None,
        2,
        3,
        "channels_first",
    ),
    "gated-groupnorm-conv": ("gated", 8, 12, "group", 4, "conv", True, None, 2, 3, None),
    "bilinear-nonorm-conv": ("bilinear", 6, 5, None, 1, "conv", False, None, 2, 5, None),
}


def layer_kwargs(case):
    variant, _, _, norm, groups, _, use_bias, v_out, up, ks, data_format = case
    kwargs = dict(
        variant=variant,
        norm=norm,
        norm_groups=groups,
        use_bias=use_bias,
        embedding_dim=8,
        up_factor=up,
        kernel_size=ks,
        data_format=data_format,
    )
    if v_out is not None:
        kwargs.update(output_dim=v_out, value_projection=True)
    return kwargs


def expected_output(case, sd, x, y, prefix=""):
    variant, _, _, norm, groups, _, _, v_out, up, ks, _ = case
    return ref.sapa_layer(
        x,
        y,
        reference_params(sd, prefix),
        variant,
        ks,
        up,
        norm=norm,
        groups=groups,
        value_projection=v_out is not None,
    )


# ------------------------------------------------------------ load vs reference
@pytest.mark.parametrize("case_id", sorted(CASES))
def test_loaded_layer_matches_reference(case_id):
    case = CASES[case_id]
    variant, cx, cy, norm, _, fmt, use_bias, v_out, up, _, _ = case
    rng = np.random.default_rng(sum(map(ord, case_id)))
    sd = make_state_dict(rng, variant, cx, cy, norm=norm, use_bias=use_bias, v_out=v_out, fmt=fmt)
    layer = build_layer(cx, cy, **layer_kwargs(case))
    report = convert.load_torch_state_dict(layer, sd)
    assert sorted(report["loaded"]) == sorted(sd)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    x, y = random_inputs(rng, cx, cy, up)
    got = run_layer(layer, x, y)
    np.testing.assert_allclose(got, expected_output(case, sd, x, y), rtol=RTOL, atol=ATOL)


def test_loading_changes_the_output():
    """Guards the comparison above: default weights must not match the reference."""
    case = CASES["gated-layernorm"]
    rng = np.random.default_rng(0)
    sd = make_state_dict(rng, "gated", 6, 5)
    layer = build_layer(6, 5, **layer_kwargs(case))
    x, y = random_inputs(rng, 6, 5, 2)
    before = run_layer(layer, x, y)
    convert.load_torch_state_dict(layer, sd)
    after = run_layer(layer, x, y)
    expected = expected_output(case, sd, x, y)
    assert np.abs(before - expected).max() > 1e-2
    np.testing.assert_allclose(after, expected, rtol=RTOL, atol=ATOL)


def test_torch_like_tensors_are_converted_without_torch():
    class FakeTensor:
        """Duck-types the torch.Tensor calls the converter makes."""

        def __init__(self, array):
            self.array = array
            self.calls = []

        def detach(self):
            self.calls.append("detach")
            return self

        def cpu(self):
            self.calls.append("cpu")
            return self

        def numpy(self):
            self.calls.append("numpy")
            return self.array

    rng = np.random.default_rng(1)
    sd = make_state_dict(rng, "bilinear", 6, 5)
    fakes = {key: FakeTensor(value) for key, value in sd.items()}
    layer = build_layer(6, 5, **layer_kwargs(CASES["bilinear-layernorm"]))
    convert.load_torch_state_dict(layer, fakes)
    assert all(f.calls == ["detach", "cpu", "numpy"] for f in fakes.values())
    np.testing.assert_array_equal(layer.q.kernel.numpy(), sd["q.weight"].T)


def test_concat_query_takes_guide_channels_first():
    """torch.cat([y_n, up(x)]) puts the guide first: the first Cy input columns of the
    torch q.weight must become the first Cy rows of the Keras kernel."""
    rng = np.random.default_rng(2)
    cx, cy = 4, 3
    sd = make_state_dict(rng, "concat", cx, cy)
    sd["q.weight"][:, cy:] = 0.0
    layer = build_layer(cx, cy, variant="concat", embedding_dim=8)
    convert.load_torch_state_dict(layer, sd)
    np.testing.assert_array_equal(layer.q.kernel.numpy()[cy:], 0.0)
    assert np.abs(layer.q.kernel.numpy()[:cy]).min() > 0


# ---------------------------------------------------------------------- prefix
def test_prefix_selects_the_module_and_ignores_the_rest():
    rng = np.random.default_rng(3)
    case = CASES["gated-layernorm"]
    sd = make_state_dict(rng, "gated", 6, 5, prefix="decoder.upsample1.")
    # Same names in a sibling whose name starts like the prefix, and unrelated entries.
    sd.update(make_state_dict(rng, "bilinear", 7, 7, prefix="decoder.upsample10."))
    sd.update(make_state_dict(rng, "gated", 6, 5, prefix="decoder.upsample2."))
    sd["backbone.conv1.weight"] = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    sd["k.weight"] = np.zeros((8, 6), np.float32)

    for prefix in ("decoder.upsample1.", "decoder.upsample1"):
        layer = build_layer(6, 5, **layer_kwargs(case))
        report = convert.load_torch_state_dict(layer, sd, prefix=prefix)
        assert all(name.startswith("decoder.upsample1.") for name in report["loaded"])
        assert len(report["loaded"]) == 12  # 4 norm + 3 x 2 query + 2 key entries
        x, y = random_inputs(rng, 6, 5, 2)
        np.testing.assert_allclose(
            run_layer(layer, x, y),
            expected_output(case, sd, x, y, prefix="decoder.upsample1."),
            rtol=RTOL,
            atol=ATOL,
        )


def test_wrong_prefix_lists_the_sapa_modules_found():
    rng = np.random.default_rng(4)
    sd = make_state_dict(rng, "bilinear", 6, 5, prefix="module.decoder.up.")
    sd["module.backbone.fc.weight"] = np.zeros((2, 2), np.float32)
    assert convert.find_sapa_prefixes(sd) == ["module.decoder.up."]
    layer = build_layer(6, 5, embedding_dim=8)
    with pytest.raises(ValueError, match=r"module\.decoder\.up\.") as info:
        convert.load_torch_state_dict(layer, sd, prefix="decoder.up.")
    assert "No entry starts with the prefix 'decoder.up.'" in str(info.value)


def test_find_sapa_prefixes_skips_attention_blocks():
    rng = np.random.default_rng(5)
    sd = make_state_dict(rng, "bilinear", 6, 5, prefix="dec.up1.")
    sd.update(make_state_dict(rng, "gated", 6, 5, norm=None, fmt="conv", prefix="dec.up2."))
    sd.update(make_state_dict(rng, "bilinear", 6, 5))
    # A transformer attention block with q, k, v also has a projection: not SAPA.
    for name in ("q", "k", "v", "proj"):
        sd[f"backbone.block0.attn.{name}.weight"] = np.zeros((4, 4), np.float32)
    assert convert.find_sapa_prefixes(sd) == ["", "dec.up1.", "dec.up2."]


# ---------------------------------------------------------------------- errors
def _loaded_layer_and_dict(seed=6):
    rng = np.random.default_rng(seed)
    sd = make_state_dict(rng, "bilinear", 6, 5, prefix="m.")
    layer = build_layer(6, 5, embedding_dim=8)
    return layer, sd


def test_missing_entries_raise():
    layer, sd = _loaded_layer_and_dict()
    del sd["m.k.bias"], sd["m.norm_y.weight"]
    with pytest.raises(ValueError, match="Missing entries: m.norm_y.weight, m.k.bias"):
        convert.load_torch_state_dict(layer, sd, prefix="m.")


def test_unexpected_entries_raise():
    layer, sd = _loaded_layer_and_dict()
    sd["m.norm_x.num_batches_tracked"] = np.array(3)
    sd["m.offset.weight"] = np.zeros((36, 6, 1, 1), np.float32)
    with pytest.raises(ValueError, match="Unexpected entries: ") as info:
        convert.load_torch_state_dict(layer, sd, prefix="m.")
    message = str(info.value)
    assert "m.norm_x.num_batches_tracked" in message and "m.offset.weight" in message
    assert "SAPA-D" in message
    assert "Missing" not in message


@pytest.mark.parametrize(
    "name,shape",
    [
        ("m.q.weight", (5, 8)),
        ("m.k.weight", (8, 6, 3, 3)),
        ("m.k.bias", (9,)),
        ("m.norm_x.weight", (6, 1)),
    ],
)
def test_mis_shaped_entries_raise(name, shape):
    layer, sd = _loaded_layer_and_dict()
    sd[name] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="wrong shape") as info:
        convert.load_torch_state_dict(layer, sd, prefix="m.")
    assert f"{name}: got {shape}" in str(info.value)


def test_all_problems_in_one_error_and_nothing_assigned():
    layer, sd = _loaded_layer_and_dict()
    before = layer_weights(layer)
    del sd["m.q.bias"]
    sd["m.qy.weight"] = np.zeros((8, 5), np.float32)
    sd["m.k.weight"] = np.zeros((6, 8), np.float32)  # Keras layout by mistake
    sd["m.norm_x.bias"] = "not an array"
    with pytest.raises(ValueError) as info:
        convert.load_torch_state_dict(layer, sd, prefix="m.")
    message = str(info.value)
    assert "Missing entries: m.q.bias" in message
    assert "Unexpected entries: m.qy.weight" in message
    assert "m.k.weight: got (6, 8), expected (8, 6) (Linear) or (8, 6, 1, 1)" in message
    assert "m.norm_x.bias: not a numeric array" in message
    after = layer_weights(layer)
    assert all(np.array_equal(before[key], after[key]) for key in before)


def test_configuration_mismatch_hints():
    rng = np.random.default_rng(7)
    sd = make_state_dict(rng, "gated", 6, 5, use_bias=False, v_out=4)
    layer = build_layer(6, 5, embedding_dim=8)
    with pytest.raises(ValueError) as info:
        convert.load_torch_state_dict(layer, sd)
    message = str(info.value)
    assert "variant='gated'" in message
    assert "use_bias=False" in message
    assert "value projection `v`" in message


def test_strict_false_warns_once_and_loads_what_fits():
    layer, sd = _loaded_layer_and_dict()
    original_k = layer.k.kernel.numpy().copy()
    del sd["m.q.bias"]
    sd["m.k.weight"] = np.zeros((3, 3), np.float32)
    sd["m.extra.weight"] = np.zeros((2,), np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = convert.load_torch_state_dict(layer, sd, prefix="m.", strict=False)
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    text = str(caught[0].message)
    assert "m.q.bias" in text and "m.k.weight" in text and "m.extra.weight" in text
    assert report["missing"] == ["m.q.bias"]
    assert report["unexpected"] == ["m.extra.weight"]
    assert report["mismatched"] == ["m.k.weight"]
    np.testing.assert_array_equal(layer.q.kernel.numpy(), sd["m.q.weight"].T)
    np.testing.assert_array_equal(layer.norm_y.gamma.numpy(), sd["m.norm_y.weight"])
    np.testing.assert_array_equal(layer.k.kernel.numpy(), original_k)


def test_strict_false_without_problems_does_not_warn():
    layer, sd = _loaded_layer_and_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert.load_torch_state_dict(layer, sd, prefix="m.", strict=False)


def test_unbuilt_layer_raises():
    _, sd = _loaded_layer_and_dict()
    layer = SAPA(embedding_dim=8)
    with pytest.raises(ValueError, match=r"not built.*layer\.build\(x_shape, guide_shape\)"):
        convert.load_torch_state_dict(layer, sd, prefix="m.")
    with pytest.raises(ValueError, match="not built"):
        convert.to_torch_state_dict(layer)


def test_bad_arguments_raise():
    layer, sd = _loaded_layer_and_dict()
    with pytest.raises(TypeError, match="keras_sapa.SAPA"):
        convert.load_torch_state_dict(object(), sd)
    with pytest.raises(TypeError, match="mapping"):
        convert.load_torch_state_dict(layer, list(sd.items()))
    with pytest.raises(ValueError, match="format="):
        convert.to_torch_state_dict(layer, format="nhwc")


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "case_id",
    ["gated-v-embed", "concat-layernorm", "gated-groupnorm-conv", "bilinear-nonorm-conv"],
)
@pytest.mark.parametrize("fmt", ["linear", "conv"])
def test_round_trip(case_id, fmt):
    case = CASES[case_id]
    variant, cx, cy, norm, _, _, use_bias, v_out, _, _, _ = case
    rng = np.random.default_rng(8)
    sd = make_state_dict(
        rng, variant, cx, cy, norm=norm, use_bias=use_bias, v_out=v_out, fmt=fmt, prefix="net.up."
    )
    first = build_layer(cx, cy, **layer_kwargs(case))
    convert.load_torch_state_dict(first, sd, prefix="net.up.")

    exported = convert.to_torch_state_dict(first, prefix="net.up", format=fmt)
    assert list(exported) == list(sd)  # names and order of the official module
    for key, value in sd.items():
        assert exported[key].dtype == np.float32 and exported[key].flags.c_contiguous
        np.testing.assert_array_equal(exported[key], value)

    second = build_layer(cx, cy, **layer_kwargs(case))
    convert.load_torch_state_dict(second, exported, prefix="net.up.")
    a, b = layer_weights(first), layer_weights(second)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[key], b[key]) for key in a)


# ------------------------------------------------ from_torch_checkpoint (no torch)
@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in ``torch`` module whose ``load`` returns stored checkpoints, so the
    inference of from_torch_checkpoint is tested where torch is not installed."""
    store = {}
    module = types.ModuleType("torch")

    def load(path, map_location=None, weights_only=None):
        assert map_location == "cpu" and weights_only is True
        return store[path]

    if keras.config.backend() == "torch":
        # Keras runs on the real torch here: only its `load` is replaced.
        monkeypatch.setattr(sys.modules["torch"], "load", load)
    else:
        module.load = load
        monkeypatch.setitem(sys.modules, "torch", module)
    return store


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_checkpoint_settings_are_inferred(case_id, fake_torch):
    case = CASES[case_id]
    variant, cx, cy, norm, groups, fmt, use_bias, v_out, up, ks, data_format = case
    rng = np.random.default_rng(9)
    sd = make_state_dict(
        rng,
        variant,
        cx,
        cy,
        norm=norm,
        use_bias=use_bias,
        v_out=v_out,
        fmt=fmt,
        prefix="decoder.up.",
    )
    sd["backbone.stem.weight"] = np.zeros((3, 3), np.float32)
    fake_torch["ckpt.pth"] = {"meta": {"epoch": 1}, "state_dict": sd}
    kwargs = dict(up_factor=up, kernel_size=ks, data_format=data_format)
    if norm == "group":
        kwargs["norm_groups"] = groups
    if variant == "bilinear" and norm is None:
        kwargs["guide_channels"] = cy  # cy <= cx here, but pass it as a user would
    layer = convert.from_torch_checkpoint("ckpt.pth", prefix="decoder.up", **kwargs)

    assert layer.built and layer.variant == variant
    # An identity checkpoint cannot tell LayerNorm from GroupNorm: the default is "layer".
    assert layer.norm == norm
    if variant != "identity":
        assert layer.use_bias == use_bias and layer.embedding_dim == 8
    assert (layer.v is None) == (v_out is None)
    x, y = random_inputs(rng, cx, cy, up)
    np.testing.assert_allclose(
        run_layer(layer, x, y),
        expected_output(case, sd, x, y, prefix="decoder.up."),
        rtol=RTOL,
        atol=ATOL,
    )


def test_checkpoint_wrappers_and_ambiguity(fake_torch):
    rng = np.random.default_rng(10)
    cx, cy = 4, 6
    sd = make_state_dict(rng, "concat", cx, cy, norm=None, fmt="conv")
    fake_torch["bare.pth"] = sd
    fake_torch["nested.pth"] = {"model": {"state_dict": sd}, "optimizer": {}}
    # q takes 10 inputs, k takes 4: bilinear with Cy=10 or concat with Cy=6.
    with pytest.raises(ValueError, match="guide_channels"):
        convert.from_torch_checkpoint("bare.pth")
    layer = convert.from_torch_checkpoint("nested.pth", guide_channels=cy)
    assert layer.variant == "concat" and layer.norm is None
    layer = convert.from_torch_checkpoint("bare.pth", guide_channels=cx + cy)
    assert layer.variant == "bilinear"
    layer = convert.from_torch_checkpoint("bare.pth", variant="concat")
    assert layer.variant == "concat"
    with pytest.raises(ValueError, match="x_channels=5"):
        convert.from_torch_checkpoint("bare.pth", guide_channels=cy, x_channels=5)


def test_checkpoint_errors(fake_torch):
    rng = np.random.default_rng(11)
    fake_torch["model.pth"] = make_state_dict(rng, "gated", 6, 5, prefix="dec.up1.")
    fake_torch["list.pth"] = [1, 2]
    with pytest.raises(ValueError, match=r"prefix ''.*\['dec\.up1\.'\]"):
        convert.from_torch_checkpoint("model.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        convert.from_torch_checkpoint("list.pth")
    # Settings that contradict the weights are reported by the loader.
    with pytest.raises(ValueError, match="variant='gated'"):
        convert.from_torch_checkpoint("model.pth", prefix="dec.up1", variant="bilinear")


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install keras_sapa\[torch\]"):
        convert.from_torch_checkpoint("anything.pth")


# ------------------------------------------------------ against real PyTorch
def _torch_sapa_class(torch):
    """A PyTorch SAPA written from the spec, independent of the package: parameter
    names of the official modules, Linear + LayerNorm or 1x1 Conv2d + GroupNorm,
    similarity and aggregation through F.unfold (zero padding), channels first."""
    nn, F = torch.nn, torch.nn.functional

    def windows(t, kernel_size, up_factor):
        batch, channels, height, width = t.shape
        patches = F.unfold(t, kernel_size, padding=kernel_size // 2)
        patches = patches.view(batch, channels, kernel_size * kernel_size, height, width)
        return patches.repeat_interleave(up_factor, 3).repeat_interleave(up_factor, 4)

    def up(t, s):
        return t.repeat_interleave(s, 2).repeat_interleave(s, 3)

    class TorchSAPA(nn.Module):
        def __init__(
            self,
            dim_y,
            dim_x,
            mode="bilinear",
            conv=False,
            norm=True,
            groups=32,
            embedding_dim=8,
            out_dim=None,
            v_embed=False,
            up_factor=2,
            kernel_size=5,
            bias=True,
        ):
            super().__init__()
            self.mode, self.conv, self.use_norm = mode, conv, norm
            self.s, self.ks = up_factor, kernel_size
            if norm:
                make_norm = (lambda c: nn.GroupNorm(groups, c)) if conv else nn.LayerNorm
                self.norm_y, self.norm_x = make_norm(dim_y), make_norm(dim_x)

            def proj(c_in, c_out):
                if conv:
                    return nn.Conv2d(c_in, c_out, 1, bias=bias)
                return nn.Linear(c_in, c_out, bias=bias)

            d = embedding_dim
            if mode == "bilinear":
                self.q = proj(dim_y, d)
            elif mode == "concat":
                self.q = proj(dim_y + dim_x, d)
            else:
                self.qy, self.qx, self.gate = proj(dim_y, d), proj(dim_x, d), proj(dim_x, 1)
            self.k = proj(dim_x, d)
            out_dim = out_dim or dim_x
            if v_embed or out_dim != dim_x:
                self.v = proj(dim_x, out_dim)
            with torch.no_grad():
                for name, p in self.named_parameters():  # random: every weight counts
                    offset = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
                    p.copy_(offset + 0.3 * torch.randn_like(p))

        def _apply_nchw(self, module, t):
            if self.conv or isinstance(module, nn.GroupNorm):
                return module(t)
            return module(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        def forward(self, y, x):
            x_n = self._apply_nchw(self.norm_x, x) if self.use_norm else x
            y_n = self._apply_nchw(self.norm_y, y) if self.use_norm else y
            if self.mode == "bilinear":
                q = self._apply_nchw(self.q, y_n)
            elif self.mode == "concat":
                q = self._apply_nchw(self.q, torch.cat([y_n, up(x, self.s)], 1))
            else:
                g = up(torch.sigmoid(self._apply_nchw(self.gate, x_n)), self.s)
                q = g * self._apply_nchw(self.qy, y_n) + (1 - g) * self._apply_nchw(
                    self.qx, up(x, self.s)
                )
            k = self._apply_nchw(self.k, x_n)
            v = self._apply_nchw(self.v, x_n) if hasattr(self, "v") else x
            sim = (q.unsqueeze(2) * windows(k, self.ks, self.s)).sum(1)
            weights = torch.softmax(sim, dim=1)
            return (weights.unsqueeze(1) * windows(v, self.ks, self.s)).sum(2)

    return TorchSAPA


TORCH_CASES = {
    # id: (TorchSAPA kwargs, Keras layer kwargs besides the shared ones, cx, cy)
    "neurips-bilinear": (dict(mode="bilinear"), dict(variant="bilinear"), 6, 5),
    "exp-gated-v": (dict(mode="gated", out_dim=4), dict(variant="gated", output_dim=4), 6, 5),
    "exp-concat": (dict(mode="concat"), dict(variant="concat"), 6, 5),
    "extended-groupnorm-conv": (
        dict(mode="bilinear", conv=True),
        dict(variant="bilinear", norm="group"),
        32,
        64,
    ),
    "extended-nonorm-conv-nobias": (
        dict(mode="bilinear", conv=True, norm=False, bias=False),
        dict(variant="bilinear", norm=None, use_bias=False),
        6,
        5,
    ),
}


def _torch_outputs(torch, module, x, y):
    """The PyTorch module in float64 on NCHW copies of channels-last inputs."""
    import copy

    module64 = copy.deepcopy(module).double()
    with torch.no_grad():
        out = module64(
            torch.from_numpy(np.transpose(y, (0, 3, 1, 2))).double(),
            torch.from_numpy(np.transpose(x, (0, 3, 1, 2))).double(),
        )
    return np.transpose(out.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("case_id", sorted(TORCH_CASES))
def test_against_pytorch_module(case_id):
    torch = pytest.importorskip(
        "torch", reason="PyTorch not installed (optional: pip install keras_sapa[torch])"
    )
    torch_kwargs, keras_kwargs, cx, cy = TORCH_CASES[case_id]
    torch.manual_seed(sum(map(ord, case_id)))
    module = _torch_sapa_class(torch)(cy, cx, up_factor=2, kernel_size=5, **torch_kwargs)
    layer = build_layer(cx, cy, embedding_dim=8, up_factor=2, kernel_size=5, **keras_kwargs)
    convert.load_torch_state_dict(layer, module.state_dict())  # torch tensors as they are

    rng = np.random.default_rng(12)
    x, y = random_inputs(rng, cx, cy, 2)
    np.testing.assert_allclose(
        run_layer(layer, x, y), _torch_outputs(torch, module, x, y), rtol=RTOL, atol=ATOL
    )

    # Exported weights are accepted by the torch module as they are (names, shapes).
    fmt = "conv" if torch_kwargs.get("conv") else "linear"
    exported = convert.to_torch_state_dict(layer, format=fmt)
    other = _torch_sapa_class(torch)(cy, cx, **torch_kwargs)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key].numpy(), value.numpy())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
@pytest.mark.parametrize("case_id", ["exp-gated-v", "extended-groupnorm-conv"])
def test_from_torch_checkpoint_reads_pth(case_id, wrapper, tmp_path):
    torch = pytest.importorskip(
        "torch", reason="PyTorch not installed (optional: pip install keras_sapa[torch])"
    )
    torch_kwargs, keras_kwargs, cx, cy = TORCH_CASES[case_id]
    torch.manual_seed(13)
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, cy, 3)
    model.decoder = torch.nn.ModuleDict(
        {"up1": _torch_sapa_class(torch)(cy, cx, up_factor=2, kernel_size=3, **torch_kwargs)}
    )
    path = tmp_path / "model.pth"
    state = model.state_dict()
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7}, path)

    layer = convert.from_torch_checkpoint(path, prefix="decoder.up1.", up_factor=2, kernel_size=3)
    for key, value in keras_kwargs.items():
        assert getattr(layer, key) == value
    rng = np.random.default_rng(14)
    x, y = random_inputs(rng, cx, cy, 2)
    np.testing.assert_allclose(
        run_layer(layer, x, y),
        _torch_outputs(torch, model.decoder["up1"], x, y),
        rtol=RTOL,
        atol=ATOL,
    )
