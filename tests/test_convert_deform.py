"""SAPADeform loaded from an official ``SAPADeform`` state dict against the official
module (our PyTorch CPU stand-in, ``tests/official_deform_torch.py``, run in float64):
forward within 1e-5, gradients with respect to both inputs and every weight within
1e-4 relative, over a subsample of num_points {4, 9} x groups {1, 4} x up_factor
{2, 3, 4} x high_offset x norm x data format. Also export back to the official module,
``from_torch_checkpoint``, and the errors of a mismatched dict.

The stand-in's own backward is checked against float64 finite differences here
(``torch.autograd.gradcheck``), and its forward against the NumPy loop reference, so
that the parity is with something known to be right.
"""

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import official_deform_torch as official  # noqa: E402
import reference_deform as ref  # noqa: E402
from keras_sapa import convert  # noqa: E402
from keras_sapa.deform import SAPADeform  # noqa: E402
from multibackend.backend_utils import deform_layer  # noqa: E402

CASES = [  # (num_points, groups, up_factor, high_offset, norm, data_format)
    (9, 4, 2, True, False, "channels_last"),
    (4, 1, 3, False, True, "channels_first"),
    (9, 1, 4, True, True, "channels_last"),
    (4, 4, 2, False, False, "channels_first"),
    (4, 4, 3, True, True, "channels_first"),
    (9, 4, 4, False, False, "channels_last"),
]
BATCH, HEIGHT, WIDTH = 2, 3, 2


def _case_id(case):
    points, groups, s, high, norm, fmt = case
    return f"p{points}-g{groups}-s{s}-{'high' if high else 'low'}-" + (
        f"{'gn' if norm else 'nonorm'}-{'nchw' if fmt == 'channels_first' else 'nhwc'}"
    )


def _keras_layer(case, cx, cy, state_dict):
    layer = deform_layer(case)
    if case[-1] == "channels_first":
        layer.build((None, cx, None, None), (None, cy, None, None))
    else:
        layer.build((None, None, None, cx), (None, None, None, cy))
    report = convert.load_torch_state_dict(layer, state_dict)
    assert sorted(report["loaded"]) == sorted(state_dict)
    return layer


def _to_layer(t, fmt):
    return t if fmt == "channels_first" else np.ascontiguousarray(t.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer_matches_official_module(case):
    import tensorflow as tf

    points, groups, s, high, norm, fmt = case
    module, cx, cy = official.random_module(case, seed=sum(case[:3]))
    rng = np.random.default_rng(sum(case[:3]))
    x = rng.standard_normal((BATCH, cx, HEIGHT, WIDTH))
    y = rng.standard_normal((BATCH, cy, s * HEIGHT, s * WIDTH))
    cot = rng.standard_normal((BATCH, cx, s * HEIGHT, s * WIDTH))

    tx = torch.tensor(x, requires_grad=True)
    ty = torch.tensor(y, requires_grad=True)
    out_t = module(ty, tx)
    (out_t * torch.tensor(cot)).sum().backward()

    state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    layer = _keras_layer(case, cx, cy, state_dict)
    kx = tf.constant(_to_layer(x, fmt).astype(np.float32))
    ky = tf.constant(_to_layer(y, fmt).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([kx, ky])
        out_k = layer(kx, ky)
        loss = tf.reduce_sum(out_k * tf.constant(_to_layer(cot, fmt).astype(np.float32)))
    variables = layer.trainable_weights
    grads = tape.gradient(loss, [kx, ky] + variables)

    np.testing.assert_allclose(
        out_k.numpy(), _to_layer(out_t.detach().numpy(), fmt), rtol=1e-5, atol=1e-5
    )

    def close(got, expected, what):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)

    close(grads[0].numpy(), _to_layer(tx.grad.numpy(), fmt), "d x")
    close(grads[1].numpy(), _to_layer(ty.grad.numpy(), fmt), "d guide")
    # Every weight, through the exporter's name map (Keras layouts -> official ones).
    params = dict(module.named_parameters())
    slots = {id(variable): name for name, variable, _ in convert._slots(layer)}
    checked = set()
    for variable, grad in zip(variables, grads[2:], strict=True):
        name = slots[id(variable)]
        expected = params[name].grad.numpy()
        got = grad.numpy()
        if got.ndim == 2:
            got = got.T[:, :, None, None]
        close(got, expected, f"d {name}")
        checked.add(name)
    assert checked == set(params)


def test_exported_dict_loads_into_the_official_module():
    case = (4, 4, 2, True, True, "channels_last")
    module, cx, cy = official.random_module(case, seed=5)
    state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    layer = _keras_layer(case, cx, cy, state_dict)
    exported = convert.to_torch_state_dict(layer, prefix="up")
    assert list(exported) == [f"up.{n}" for n in module.state_dict()]  # official order
    fresh = official.SAPADeformTorch(
        cy, cx, up_factor=2, num_point=4, groups=4, embedding_dim=4, norm=True
    ).double()
    fresh.load_state_dict(
        {k[3:]: torch.tensor(v, dtype=torch.float64) for k, v in exported.items()}
    )
    for name, value in fresh.state_dict().items():
        np.testing.assert_allclose(value.numpy(), state_dict[name], rtol=1e-6, atol=1e-7)


def test_from_torch_checkpoint_builds_sapa_deform(tmp_path):
    case = (9, 4, 2, False, True, "channels_last")
    module, cx, cy = official.random_module(case, seed=7)
    path = tmp_path / "deform.pth"
    torch.save(
        {"state_dict": {f"decoder.up.{k}": v for k, v in module.state_dict().items()}}, path
    )
    layer = convert.from_torch_checkpoint(path, prefix="decoder.up", high_offset=False)
    assert isinstance(layer, SAPADeform)
    assert (layer.num_points, layer.groups, layer.embedding_dim, layer.norm, layer.use_bias) == (
        9,
        4,
        4,
        "group",
        True,
    )
    assert convert.find_sapa_prefixes(torch.load(path)["state_dict"]) == ["decoder.up."]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, cx, 2, 2))
    y = rng.standard_normal((1, cy, 4, 4))
    expected = module(torch.tensor(y), torch.tensor(x)).detach().numpy()
    got = keras.ops.convert_to_numpy(
        layer(
            _to_layer(x, "channels_last").astype(np.float32),
            _to_layer(y, "channels_last").astype(np.float32),
        )
    )
    np.testing.assert_allclose(got, _to_layer(expected, "channels_last"), rtol=1e-5, atol=1e-5)


def test_mismatched_dicts_are_explained():
    from keras_sapa import SAPA

    case = (9, 4, 2, True, False, "channels_last")
    module, cx, cy = official.random_module(case, seed=9)
    state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    wrong = SAPADeform(num_points=4, embedding_dim=4)
    wrong.build((None, None, None, cx), (None, None, None, cy))
    with pytest.raises(ValueError, match="offset.weight.*\n(.|\n)*2\\*groups\\*num_point"):
        convert.load_torch_state_dict(wrong, state_dict)
    normed = SAPADeform(embedding_dim=4, norm="group")
    normed.build((None, None, None, 32), (None, None, None, 32))
    with pytest.raises(ValueError, match="norm=None"):
        convert.load_torch_state_dict(normed, {k: v for k, v in state_dict.items()}, strict=True)
    sapa = SAPA(embedding_dim=16, norm=None)
    sapa.build((None, None, None, cx), (None, None, None, cy))
    with pytest.raises(ValueError, match="keras_sapa.SAPADeform"):
        convert.load_torch_state_dict(sapa, state_dict)
    with pytest.raises(TypeError, match="SAPADeform"):
        convert.load_torch_state_dict(keras.layers.Dense(2), state_dict)


def test_official_stand_in_is_right():
    """The stand-in's hand-written backward against float64 finite differences (away
    from integer positions), and its forward against the NumPy loop reference."""
    rng = np.random.default_rng(1)
    batch, height, width, groups, e, points, s, channels = 1, 2, 2, 2, 1, 2, 2, 2
    q = rng.standard_normal((batch, groups * e, s * height, s * width))
    k = rng.standard_normal((batch, groups * e, height, width))
    v = rng.standard_normal((batch, channels, height, width))
    o = ref.offsets_away_from_integers(
        rng, (batch, 2 * groups * points, s * height, s * width), spread=2.5
    )
    attn = rng.standard_normal((batch, groups, points, s * height, s * width))
    t = [torch.tensor(a, requires_grad=True) for a in (q, k, v, o, attn)]
    args = (points, s, groups)
    assert torch.autograd.gradcheck(
        lambda a, b, c: official.deform_qk(a, b, c, *args), (t[0], t[1], t[3])
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: official.deform_av(a, b, c, *args), (t[4], t[2], t[3])
    )
    last = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    logits = official.deform_qk(*(t[i] for i in (0, 1, 3)), *args).detach().numpy()
    np.testing.assert_allclose(
        last(logits.reshape(batch, groups * points, s * height, s * width)),
        ref.deform_similarity(last(q), last(k), last(o), points, s, groups),
        atol=1e-12,
    )
    out = official.deform_av(t[4], t[2], t[3], *args).detach().numpy()
    np.testing.assert_allclose(
        last(out),
        ref.deform_aggregate(
            last(attn.reshape(batch, groups * points, s * height, s * width)),
            last(v),
            last(o),
            points,
            s,
            groups,
        ),
        atol=1e-12,
    )
