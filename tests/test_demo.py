"""The demo command (``python -m keras_sapa demo``) and the built-in shapes task.

Only what holds by construction, or by a wide margin on any natural photo, is asserted:
the embedding identity, exactness on constant images, convexity of the SAPA mix, PSNR
ordering nearest < bilinear < SAPA on a real photo crop (margins of about 1 dB and
5 dB), sane metric ranges, the figure written, and clean usage errors.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from keras_sapa import data  # noqa: E402
from keras_sapa import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ guided demo
def test_colour_embedding_is_a_gaussian_log_kernel():
    rng = np.random.default_rng(0)
    scale, height, width = 3, 4, 5
    guide = rng.uniform(size=(height * scale, width * scale, 3))
    low = rng.uniform(size=(height, width, 3))
    cs, ss = 0.2, 1.5
    query, key = demo.colour_embedding(guide, low, scale, cs, ss)
    assert query.shape == (1, height * scale, width * scale, 7)
    assert key.shape == (1, height, width, 7)
    for (i, j), (a, b) in [((0, 0), (0, 0)), ((7, 11), (2, 4)), ((5, 2), (1, 0))]:
        py, px = (i + 0.5) / scale - 0.5, (j + 0.5) / scale - 0.5
        expected = (
            demo._BORDER_OFFSET
            - ((guide[i, j] - low[a, b]) ** 2).sum() / (2 * cs**2)
            - ((py - a) ** 2 + (px - b) ** 2) / (2 * ss**2)
        )
        assert np.dot(query[0, i, j], key[0, a, b]) == pytest.approx(expected, abs=2e-3)


def test_constant_image_is_reproduced_exactly_by_every_method():
    image = np.full((48, 40, 3), 0.3, np.float32)
    result = demo.guided_upsampling(image, scale=4, kernel_size=5)
    for name, out in result["outputs"].items():
        np.testing.assert_allclose(out, result["reference"], atol=1e-5, err_msg=name)
    # The border points (zero-padded by SAPA) get no weight: weights sum to 1.
    np.testing.assert_allclose(result["weights"].sum(-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def astronaut_result():
    image = demo.center_crop(demo.load_image("astronaut"), 128)
    return demo.guided_upsampling(image, scale=4, kernel_size=5)


def test_guided_upsampling_metrics_are_sane(astronaut_result):
    result = astronaut_result
    assert result["low"].shape == (32, 32, 3)
    assert result["reference"].shape == (128, 128, 3)
    assert set(result["outputs"]) == {"nearest", "bilinear", "bicubic", "SAPA, gray guide", "SAPA"}
    for name, m in result["metrics"].items():
        assert all(np.isfinite(v) for v in m.values()), (name, m)
        assert 12.0 < m["psnr"] < 60.0, (name, m)
        assert 0.0 <= m["edge_f1"] <= 1.0
        assert 0.0 < m["sharpness"] < 2.0
    psnr = {name: m["psnr"] for name, m in result["metrics"].items()}
    assert psnr["nearest"] < psnr["bilinear"]
    # SAPA sees the full-resolution guide: several dB above bilinear on any photo.
    assert psnr["SAPA"] > psnr["bilinear"] + 2.0
    assert result["metrics"]["SAPA"]["sharpness"] > result["metrics"]["bilinear"]["sharpness"]
    # A SAPA output pixel is a convex mix of its low-resolution window.
    low = result["low"]
    assert result["outputs"]["SAPA"].min() >= low.min() - 1e-5
    assert result["outputs"]["SAPA"].max() <= low.max() + 1e-5
    w = result["weights"]
    assert w.shape == (128, 128, 25)
    assert np.all(w >= 0) and np.all(w.sum(-1) <= 1.0 + 1e-5)
    table = demo.format_table(result["metrics"])
    assert "SAPA" in table and "bilinear" in table and "PSNR" in table


def test_figure_is_written(astronaut_result, tmp_path):
    path = demo.save_figure(astronaut_result, str(tmp_path / "figure.png"), crop=96)
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_load_image_forms(tmp_path):
    gray = demo.load_image(np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert gray.shape == (8, 8, 3) and gray.dtype == np.float32 and gray.max() <= 1.0
    rgba = demo.load_image(np.zeros((8, 8, 4), np.uint16))
    assert rgba.shape == (8, 8, 3)
    from skimage import io

    path = str(tmp_path / "tiny.png")
    io.imsave(path, (np.random.default_rng(0).uniform(size=(40, 40, 3)) * 255).astype(np.uint8))
    assert demo.load_image(path).shape == (40, 40, 3)
    with pytest.raises(demo.DemoError, match="neither a file nor a sample"):
        demo.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(demo.DemoError, match="directory"):
        demo.load_image(str(tmp_path))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(demo.DemoError, match="cannot read"):
        demo.load_image(str(bad))


# ------------------------------------------------------------------------- CLI
def test_main_writes_table_and_figure(tmp_path, capsys):
    out = tmp_path / "out"
    code = demo.main(["--image", "coffee", "--crop", "96", "--scale", "3", "--out", str(out), "--kernel-size", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("nearest", "bilinear", "bicubic", "SAPA"):
        assert name in printed
    assert "not a fair super-resolution benchmark" in printed
    assert (out / "guided_coffee_x3.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "/no/such/photo.png"], "neither a file nor a sample"),
        (["--scale", "1"], "--scale"),
        (["--scale", "two"], "--scale"),
        (["--scale", "2.5"], "--scale"),
        (["--crop", "64", "--scale", "9"], "too large"),
        (["--kernel-size", "4"], "--kernel-size"),
        (["--color-sigma", "0"], "--color-sigma"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path):
    code = demo.main(argv + ["--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err
    assert "Traceback" not in err


def test_help(capsys):
    assert demo.main(["--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--image", "--scale", "--out", "--kernel-size", "--train", "--quick", "astronaut"):
        assert option in text


def test_command_line_entry_point(tmp_path):
    """``python -m keras_sapa demo`` exits 2 with a one-line error, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "keras_sapa", "demo", "--image", str(tmp_path / "nope.jpg")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 2
    assert "neither a file nor a sample" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ shapes task
def test_shapes_are_deterministic_and_well_formed():
    images, masks = data.make_shapes(6, 48, seed=3)
    again, masks_again = data.make_shapes(6, 48, seed=3)
    other, _ = data.make_shapes(6, 48, seed=4)
    assert images.shape == (6, 48, 48, 3) and images.dtype == np.float32
    assert masks.shape == (6, 48, 48) and masks.dtype == np.int32
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(masks, masks_again)
    assert not np.array_equal(images, other)
    assert images.min() >= 0 and images.max() <= 255
    assert set(np.unique(masks)) <= set(range(data.NUM_CLASSES))
    assert (masks > 0).any() and (masks == 0).any()
    # The class is the colour family of a region, but pixels vary strongly around it.
    many, many_masks = data.make_shapes(64, 32, seed=0)
    for c in range(1, data.NUM_CLASSES):
        pixels = many[many_masks == c]
        assert np.argmax(pixels.mean(0)) == c - 1  # red, green, blue
        assert pixels.std(0).min() > 25
    with pytest.raises(ValueError, match="num_images"):
        data.make_shapes(-1)


def test_metrics():
    y = np.zeros((1, 8, 8), np.int32)
    y[0, 2:6, 2:6] = 1
    assert data.mean_iou(y, y)[0] == 1.0
    assert data.boundary_f_score(y, y) == (1.0, 1.0, 1.0)
    empty = np.zeros_like(y)
    miou, per_class = data.mean_iou(y, empty, num_classes=4)
    assert np.isnan(per_class[2]) and per_class[1] == 0.0
    assert miou == pytest.approx((48 / 64 + 0.0) / 2)
    assert data.boundary_f_score(y, empty)[0] == 0.0
    shifted = np.roll(y, 1, axis=2)
    assert data.boundary_f_score(y, shifted, tolerance=1)[0] == 1.0
    assert data.boundary_f_score(y, shifted, tolerance=0)[0] < 1.0


# ----------------------------------------------------------------------- train
def test_train_quick_smoke(tmp_path, capsys):
    code = demo.main(
        ["--image", "chelsea", "--crop", "64", "--out", str(tmp_path), "--train", "--quick",
         "--steps", "2", "--batch-size", "2", "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bilinear (stock)" in printed and "boundary F" in printed
    assert (tmp_path / "train_predictions.png").is_file()
