"""Native code that fails safe (issue 13) and the GPU first-use check (issue 15).

- The CPU library records the CPU features its build used; the loader refuses a library
  whose features the running CPU lacks (one warning, the pure path) instead of dying
  with SIGILL.
- ``custom_ops/build.py`` skips the build when its stamp (sources, flags, compiler,
  TensorFlow/NVRTC versions, targets) is unchanged and every output exists; ``--force``
  rebuilds; a changed source rebuilds.
- The GPU first-use check (a tiny case on the GPU against the CPU kernels) rejects a
  result that ran elsewhere or differs; ``layer_supports_jit`` is what a layer gives
  Keras so that ``jit_compile="auto"`` does not send the compiled GPU op into XLA.
"""

import json
import os
import shutil
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from keras_sapa.ops import _native  # noqa: E402
from keras_sapa.ops import _tf_kernels as _compiled  # noqa: E402
from test_cuda_build import build  # noqa: E402  (custom_ops/build.py, loaded once)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def reset_loader(monkeypatch):
    """Restores the loader's state (and environment) after a test that reloads it."""
    yield monkeypatch
    monkeypatch.undo()
    _compiled._reset()


# ---------------------------------------------------------------------------------------
# CPU features


def test_build_records_the_features_of_its_flags():
    assert build.cpu_features_for(["-mavx2", "-mfma"]) == ["avx2", "fma"]
    assert build.cpu_features_for([]) == []
    assert build.cpu_features_for(["-O3", "-mavx512f"]) == ["avx512f"]


def test_missing_cpu_features_reads_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2\n\nprocessor\t: 1\n")
    monkeypatch.setattr(_native, "CPUINFO", str(cpuinfo))
    assert _native.missing_cpu_features(["avx2", "fma"]) == ["fma"]
    assert _native.missing_cpu_features(["avx2"]) == []
    assert _native.missing_cpu_features([]) == []
    # Unreadable: a library that needs features is not trusted (on every backend: the
    # TensorFlow and the bindings' records go through the same read_build_info).
    monkeypatch.setattr(_native, "CPUINFO", str(tmp_path / "absent"))
    assert _native.missing_cpu_features(["avx2"]) == ["avx2"]
    assert _native.missing_cpu_features([]) == []
    record = tmp_path / "info.json"
    record.write_text(json.dumps({"cpu_features": ["avx2"], "jaxlib_version": "1"}))
    for framework, version in ((None, None), ("jaxlib", "1")):
        info, reason = _native.read_build_info(str(record), framework, version)
        assert info is None and "avx2" in reason and "lacks" in reason
    record.write_text(json.dumps({"cpu_features": [], "tensorflow_version": "0.1"}))
    assert _native.read_build_info(str(record))[0] is not None  # portable build
    info, reason = _native.read_build_info(str(record), "tensorflow", tf.__version__)
    assert info is None and "0.1" in reason and tf.__version__ in reason


@pytest.mark.parametrize(
    "value,expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("2", True),
        ("", False),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
    ],
)
def test_disable_switch_is_one_parser(value, expected, monkeypatch):
    """KERAS_SAPA_DISABLE_COMPILED: one parser for every backend (the JAX and PyTorch
    side runs in tests/multibackend/test_mb_bad_input.py)."""
    monkeypatch.setenv(_native.ENV_DISABLE, value)
    assert _native.disabled() is expected
    if expected:
        assert _compiled.load_library() is None
        assert _native.ENV_DISABLE in _compiled.unavailable_reason()


def _built_cpu_library():
    path = os.path.join(ROOT, "keras_sapa", "_lib", "_sapa_ops.so")
    info = os.path.join(ROOT, "keras_sapa", "_lib", "build_info.json")
    if not (os.path.isfile(path) and os.path.isfile(info)):
        pytest.skip("the CPU library is not built (python custom_ops/build.py)")
    return path, info


def test_library_for_a_cpu_feature_this_cpu_lacks_is_refused(tmp_path, reset_loader):
    path, info_path = _built_cpu_library()
    with open(info_path) as f:
        info = json.load(f)
    info["cpu_features"] = list(info.get("cpu_features") or []) + ["sapa_test_feature_x"]
    copy = tmp_path / "_sapa_ops.so"
    shutil.copy(path, copy)
    (tmp_path / "build_info.json").write_text(json.dumps(info))
    reset_loader.setenv(_compiled.ENV_LIBRARY, str(copy))
    _compiled._reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _compiled.available()
        assert not _compiled.available()  # the second call is silent
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "sapa_test_feature_x" in messages[0] and "lacks" in messages[0]
    assert "sapa_test_feature_x" in _compiled.unavailable_reason()


def test_library_built_here_passes_the_feature_check():
    _, info_path = _built_cpu_library()
    with open(info_path) as f:
        info = json.load(f)
    if "cpu_features" not in info:
        pytest.skip("the library was built before CPU features were recorded")
    assert _native.missing_cpu_features(info["cpu_features"]) == []


# ---------------------------------------------------------------------------------------
# Build stamp


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """build.main with the compile steps replaced by stand-ins that count their calls,
    writing into a temporary output folder, and one source file we can change."""
    out = tmp_path / "lib"
    work = tmp_path / "work"
    work.mkdir()
    source = tmp_path / "kernel.cc"
    source.write_text("int f() { return 1; }\n")
    calls = {"cpu": 0, "kernels": 0, "launcher": 0, "gpu": 0}

    def artefact(name):
        path = work / name
        path.write_bytes(b"\0")
        return str(path)

    def build_cpu(*args, **kwargs):
        calls["cpu"] += 1
        return artefact(build.CPU_LIB)

    def compile_kernels(targets, out_dir, *args, **kwargs):
        calls["kernels"] += 1
        names = []
        for target in targets:
            (out / build.image_name(target)).write_bytes(b"\0")
            names.append(build.image_name(target))
        return {"nvrtc": "12.9", "targets": list(targets), "images": names}

    def build_launcher(*args, **kwargs):
        calls["launcher"] += 1
        return artefact(build.LAUNCHER_LIB)

    def build_gpu(*args, **kwargs):
        calls["gpu"] += 1
        return artefact(build.GPU_LIB)

    monkeypatch.setattr(build, "OUT_DIR", str(out))
    monkeypatch.setattr(build, "build_cpu", build_cpu)
    monkeypatch.setattr(build, "compile_kernels", compile_kernels)
    monkeypatch.setattr(build, "build_launcher", build_launcher)
    monkeypatch.setattr(build, "build_gpu", build_gpu)
    # The JAX/PyTorch bindings have their own record and stamp (not under test here):
    # without this, every main() would compile them for real for the fixture's flags.
    monkeypatch.setattr(build, "_build_bindings_part", lambda args, cxx, simd: 0)
    monkeypatch.setattr(build, "_sources", lambda: [str(source)])
    monkeypatch.setenv("KERAS_SAPA_CUDA_TARGETS", "sm_80,compute_80")
    monkeypatch.setenv("KERAS_SAPA_CPU_FLAGS", "-mavx2 -mfma")
    return calls, out, source


def test_build_skips_when_nothing_changed(fake_build):
    calls, out, source = fake_build
    assert build.main([]) == 0
    assert calls == {"cpu": 1, "kernels": 1, "launcher": 1, "gpu": 1}
    info = json.loads((out / build.BUILD_INFO).read_text())
    assert info["cpu_features"] == ["avx2", "fma"]
    assert info["cuda_targets"] == ["sm_80", "compute_80"]
    assert info["gpu_status"] == "built" and len(info["stamp"]) == 64

    assert build.main([]) == 0  # unchanged: skipped
    assert calls["cpu"] == 1 and calls["kernels"] == 1

    assert build.main(["--force"]) == 0
    assert calls["cpu"] == 2 and calls["kernels"] == 2

    source.write_text("int f() { return 2; }\n")  # a source changed: rebuilt
    assert build.main([]) == 0
    assert calls["cpu"] == 3


def test_build_reruns_when_flags_or_outputs_change(fake_build, monkeypatch):
    calls, out, _ = fake_build
    assert build.main([]) == 0
    monkeypatch.setenv("KERAS_SAPA_CPU_FLAGS", "")  # another flag set
    assert build.main([]) == 0
    assert calls["cpu"] == 2
    assert json.loads((out / build.BUILD_INFO).read_text())["cpu_features"] == []
    assert build.main([]) == 0
    assert calls["cpu"] == 2
    os.remove(out / build.image_name("sm_80"))  # an output went missing
    assert build.main([]) == 0
    assert calls["cpu"] == 3
    monkeypatch.setenv("KERAS_SAPA_CUDA_TARGETS", "sm_90,compute_90")  # other targets
    assert build.main([]) == 0
    assert calls["kernels"] == 4


def test_partial_build_keeps_other_targets(fake_build):
    """--only tf / tf,launcher keep the CUDA images, --only cuda the launcher and GPU
    library: their files and their build_info.json entries."""
    _, out, _ = fake_build
    assert build.main([]) == 0
    images = json.loads((out / build.BUILD_INFO).read_text())["cuda_images"]
    assert images and all((out / i).is_file() for i in images)
    for only in ("tf", "tf,launcher", "cuda", "launcher", "tf,cuda"):
        assert build.main(["--only", only, "--force"]) == 0
        info = json.loads((out / build.BUILD_INFO).read_text())
        assert info["cuda_images"] == images, only
        assert all((out / i).is_file() for i in images), only
        assert info["launcher_library"] == build.LAUNCHER_LIB, only
        assert info["gpu_library"] == build.GPU_LIB, only
        assert (out / build.LAUNCHER_LIB).is_file(), only
        assert (out / build.GPU_LIB).is_file(), only
    assert build.main(["--only", "tf", "--force"]) == 0
    status = json.loads((out / build.BUILD_INFO).read_text())["gpu_status"]
    assert "kept from the last build: CUDA images, launcher" in status


def test_stamp_covers_every_native_source():
    sources = [os.path.relpath(p, ROOT) for p in build._sources()]
    for expected in (
        "custom_ops/sapa/kernels/cuda/sapa_kernels.cuh",
        "custom_ops/sapa/kernels/cuda/sapa_kernels.cu",
        "custom_ops/sapa/launcher/sapa_launcher.cc",
        "custom_ops/sapa/cc/kernels/sapa_kernels_gpu.cc",
        "custom_ops/sapa/cc/ops/sapa_ops.cc",
        "custom_ops/build.py",
    ):
        assert expected in sources, expected
    assert not any("testing" in s.split(os.sep) for s in sources)


# ---------------------------------------------------------------------------------------
# The GPU first-use check and Keras's jit_compile="auto"


class _Result:
    def __init__(self, value, device):
        self.value = np.asarray(value)
        self.device = device

    def __array__(self, dtype=None, copy=None):
        return self.value if dtype is None else self.value.astype(dtype)


def test_first_use_check_compares_with_the_cpu():
    gpu = "/job:localhost/replica:0/task:0/device:GPU:0"
    cpu = "/job:localhost/replica:0/task:0/device:CPU:0"
    want = [("similarity", _Result([1.0, 2.0], cpu)), ("aggregate", _Result([3.0], cpu))]
    good = [("similarity", _Result([1.0, 2.0 + 1e-6], gpu)), ("aggregate", _Result([3.0], gpu))]
    assert _compiled.compare_self_test(good, want) is None
    wrong = [("similarity", _Result([1.0, 2.5], gpu)), ("aggregate", _Result([3.0], gpu))]
    assert "similarity differs" in _compiled.compare_self_test(wrong, want)
    elsewhere = [("similarity", _Result([1.0, 2.0], cpu)), ("aggregate", _Result([3.0], gpu))]
    assert "not on the GPU" in _compiled.compare_self_test(elsewhere, want)
    shape = [("similarity", _Result([1.0], gpu)), ("aggregate", _Result([3.0], gpu))]
    assert "shape" in _compiled.compare_self_test(shape, want)
    assert _compiled.compare_self_test(good[:1], want) is not None


def test_self_test_results_run_every_op_on_the_cpu():
    """The tiny case itself, run on the CPU against the reference: the check compares
    meaningful numbers."""
    if not _compiled.available():
        pytest.skip(f"compiled library unavailable: {_compiled.unavailable_reason()}")
    import reference

    results = dict(_compiled._self_test_results(_compiled.load_library(), "/CPU:0"))
    assert {"similarity", "aggregate", "similarity_grad.key"} <= set(results)
    assert all("CPU" in t.device for t in results.values())
    rng = np.random.default_rng(1234)
    q, k, v, _ = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((1, 6, 6, 5), (1, 3, 3, 5), (1, 3, 3, 4), (1, 6, 6, 4))
    )
    np.testing.assert_allclose(
        results["similarity"], reference.similarity(q, k, 3, 2), rtol=1e-5, atol=1e-5
    )
    if "sapa" in results:
        np.testing.assert_allclose(
            results["sapa"], reference.sapa(q, k, v, 3, 2), rtol=1e-5, atol=1e-5
        )


def test_no_gpu_means_no_gpu_op():
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    assert not _compiled.gpu_op_usable()
    assert _compiled.gpu_status() is None


def test_layer_supports_jit(monkeypatch):
    monkeypatch.delenv("KERAS_SAPA_DISABLE_COMPILED", raising=False)
    monkeypatch.setattr(_compiled, "gpu_op_usable", lambda: False)
    assert _compiled.layer_supports_jit() is True
    # XLA cannot hold the custom op: an explicit "compiled" always declines it.
    assert _compiled.layer_supports_jit("compiled") is False
    monkeypatch.setattr(_compiled, "gpu_op_usable", lambda: True)
    # No GPU visible: nothing to decide (and the library is not loaded for it).
    monkeypatch.setattr(_compiled.tf.config, "list_physical_devices", lambda kind=None: [])
    assert _compiled.layer_supports_jit() is True
    monkeypatch.setattr(
        _compiled.tf.config,
        "list_physical_devices",
        lambda kind=None: ["GPU:0"] if kind == "GPU" else [],
    )
    assert _compiled.layer_supports_jit() is False
    assert _compiled.layer_supports_jit("compiled") is False
    assert _compiled.layer_supports_jit("xla") is True
    assert _compiled.layer_supports_jit("patches") is True
    monkeypatch.setenv("KERAS_SAPA_DISABLE_COMPILED", "1")
    assert _compiled.layer_supports_jit() is True


def test_keras_auto_jit_respects_supports_jit():
    """The public mechanism layer_supports_jit feeds: one layer with supports_jit=False
    makes Keras resolve jit_compile="auto" (and True) to False."""
    keras = pytest.importorskip("keras")
    if keras.config.backend() != "tensorflow":
        pytest.skip("TensorFlow backend only")
    inputs = keras.Input((4,))
    layer = keras.layers.Dense(2)
    layer.supports_jit = False
    model = keras.Model(inputs, layer(inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compile(loss="mse", jit_compile=True)
    assert model.jit_compile is False
