"""The CUDA path on every machine: NVRTC compiles every kernel for every target, the
launcher's paths that need no GPU, and the GPU library's build.

- Every kernel instantiation is compiled with NVRTC for every target architecture (a real
  compile: an error fails the test), sm_75 included; ptxas reports no register spill in
  any kernel on any target, and the PTX's driver requirement is recorded; skipped, saying
  so, only when the nvidia-cuda-nvrtc-cu12 wheel is absent.
- The C++ op descriptors (custom_ops/sapa/cc/sapa_optable.inc) are those the op table
  (keras_sapa/ops/_optable.py) generates.
- The launcher (built here with g++) is driven through ctypes: no driver found, no image
  for an architecture, image selection, and, against a stand-in libcuda
  (custom_ops/sapa/launcher/testing/fake_libcuda.c) that computes nothing, the kernel it
  picks, launch sizes within the device limits, and a failing launch.
- On a machine with a GPU, the compiled ops run there (soft placement off, the result's
  device asserted) and match the float64 reference; elsewhere those tests skip and say so.
"""

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

# The launcher and the emulated driver, built once (cached by source hash) for both files;
# the build script and the harness, loaded by path.
from test_launcher import _load
from test_launcher import emulated_build  # noqa: F401 - a fixture
from test_launcher import harness
from test_launcher import launcher_build  # noqa: F401 - a fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_DIR = os.path.join(ROOT, "custom_ops", "sapa", "launcher")
LIB_DIR = os.path.join(ROOT, "keras_sapa", "_lib")


build = _load("keras_sapa_build", os.path.join(ROOT, "custom_ops", "build.py"))


def _targets():
    try:
        import tensorflow as tf
    except ImportError:
        tf = None
    return build.cuda_targets(tf)


# ---------------------------------------------------------------------------------------
# NVRTC


def _images_of_this_build(targets):
    """The images that `custom_ops/build.py` (run by scripts/setup_env.sh) compiled, when
    they were compiled from the current kernel sources for these targets; else None."""
    import json

    try:
        with open(os.path.join(LIB_DIR, build.BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    images = info.get("cuda_images") or []
    if (
        info.get("cuda_source_hash") != build.cuda_source_hash()
        or info.get("cuda_targets") != targets
        or not all(os.path.isfile(os.path.join(LIB_DIR, i)) for i in images)
    ):
        return None
    return {
        "nvrtc": info.get("nvrtc"),
        "targets": targets,
        "images": images,
        "resources": info.get("cuda_resources"),
        "ptx_isa": info.get("ptx_isa"),
        "ptx_min_driver": info.get("ptx_min_driver"),
    }


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Kernel images for every target: a real NVRTC compile. The build run by
    scripts/setup_env.sh already compiled every kernel for every target (a few minutes on
    2 cores); when its images come from the current sources they are checked here as
    they are, else everything is compiled again into a temporary folder."""
    if build.find_nvrtc() is None:
        pytest.skip("the nvidia-cuda-nvrtc-cu12 wheel is not installed: no NVRTC to compile with")
    if build.find_cuda_include() is None:
        pytest.skip("the nvidia-cuda-runtime-cu12 wheel (cuda_fp16.h) is not installed")
    targets = _targets()
    built = _images_of_this_build(targets)
    if built is not None:
        return LIB_DIR, targets, built
    out = tmp_path_factory.mktemp("cuda_images")
    result = build.compile_kernels(targets, str(out), jobs=2)
    return str(out), targets, result


def test_targets_cover_tensorflow_and_end_with_ptx():
    targets = _targets()
    assert targets[-1].startswith("compute_"), targets
    cubins = [t for t in targets if t.startswith("sm_")]
    assert cubins and len(cubins) == len(set(cubins))
    newest = max(int(t[3:]) for t in cubins)
    assert targets[-1] == f"compute_{newest}"
    try:
        import tensorflow as tf

        caps = tf.sysconfig.get_build_info().get("cuda_compute_capabilities") or []
    except (ImportError, AttributeError):
        caps = []
    for cap in caps:
        assert "sm_" + cap.split("_")[1] in targets, (cap, targets)


def test_targets_include_turing(monkeypatch):
    """sm_75 (T4) gets its own cubin whatever TensorFlow lists, instead of the sm_70 one."""
    monkeypatch.delenv("KERAS_SAPA_CUDA_TARGETS", raising=False)
    assert "sm_75" in _targets()
    assert "sm_75" in build.DEFAULT_TARGETS


def test_default_targets_without_tensorflow(monkeypatch):
    monkeypatch.delenv("KERAS_SAPA_CUDA_TARGETS", raising=False)
    assert build.cuda_targets(None) == build.DEFAULT_TARGETS
    monkeypatch.setenv("KERAS_SAPA_CUDA_TARGETS", "sm_75, compute_75")
    assert build.cuda_targets(None) == ["sm_75", "compute_75"]


def test_every_kernel_compiles_for_every_target(images):
    out, targets, result = images
    assert result["targets"] == targets
    assert re.fullmatch(r"12\.\d+", result["nvrtc"]), result["nvrtc"]
    names = build.kernel_names()
    assert len(names) == len(set(names)) == 4 * 16 + 2 * 4 + 36  # SAPA, SAPA-D
    for target in targets:
        with open(os.path.join(out, build.image_name(target)), "rb") as f:
            data = f.read()
        if target.startswith("sm_"):
            assert data[:4] == b"\x7fELF", target
        else:
            text = data.decode()
            assert f".target {target.replace('compute_', 'sm_')}" in text
            entries = set(re.findall(r"\.entry\s+(\w+)\s*\(", text))
            assert entries == set(names), sorted(entries ^ set(names))
        for name in names:
            assert name.encode() in data, (target, name)


def test_no_kernel_spills_on_any_target(images):
    """ptxas ran verbose for every cubin: every kernel of every target has its register
    and spill counts, and none spills (the build fails otherwise)."""
    _, targets, result = images
    resources = result.get("resources")
    assert resources, "the build recorded no ptxas resource table (rebuild)"
    cubins = [t for t in targets if t.startswith("sm_")]
    assert sorted(resources) == sorted(cubins)
    for target in cubins:
        kernels = resources[target]["kernels"]
        assert set(kernels) == set(build.kernel_names()), target
        assert all(0 < k["registers"] <= 255 for k in kernels.values()), target
    assert build.spills(resources) == {}, build.spills(resources)


def test_ptxas_spills_are_detected():
    """The spill check reads ptxas's real log: a kernel forced to spill (few registers,
    a dynamically indexed array) is reported, with its bytes."""
    if build.find_nvrtc() is None:
        pytest.skip("the nvidia-cuda-nvrtc-cu12 wheel is not installed")
    nvrtc = build.Nvrtc(build.find_nvrtc())
    source = (
        'extern "C" __global__ void spiller(float* x, int n) {\n'
        "  float a[48];\n"
        "  for (int i = 0; i < 48; ++i) a[i] = x[i * n + threadIdx.x];\n"
        "  float s = 0.f;\n"
        "  for (int i = 0; i < 48; ++i) s += a[i] * a[(i * 7 + n) % 48] + a[47 - i];\n"
        "  x[threadIdx.x] = s;\n"
        "}\n"
        'extern "C" __global__ void simple(float* x) { x[threadIdx.x] += 1.f; }\n'
    )
    _, log = nvrtc.compile(
        source, "spill.cu", "sm_75", ["--ptxas-options=-v", "--maxrregcount=16"]
    )
    table = build.parse_ptxas_log(log)
    assert set(table) == {"spiller", "simple"}, log
    assert table["spiller"]["spill_stores"] > 0 and table["spiller"]["spill_loads"] > 0, log
    assert table["simple"]["spill_stores"] == table["simple"]["spill_loads"] == 0
    resources = {"sm_75": {"kernels": table}}
    assert build.spills(resources) == {"sm_75": ["spiller"]}


def test_ptx_fallback_states_its_minimum_driver(images):
    out, targets, result = images
    ptx = [t for t in targets if t.startswith("compute_")]
    with open(os.path.join(out, build.image_name(ptx[-1])), "rb") as f:
        data = f.read()
    isa = re.search(rb"^\.version\s+(\d+\.\d+)", data, re.MULTILINE).group(1).decode()
    assert result.get("ptx_isa") == isa
    cuda, driver = build.PTX_DRIVERS[isa]
    assert f"CUDA {cuda} driver ({driver}" in result["ptx_min_driver"]
    # NVRTC writes the PTX ISA of its own CUDA release (12.9: 8.8), so the driver must be
    # at least that release.
    assert cuda == result["nvrtc"], (cuda, result["nvrtc"])


def test_op_table_header_is_current():
    """custom_ops/sapa/cc/sapa_optable.inc is what build.py generates from the op table
    (regenerate with `python custom_ops/build.py --generate`)."""
    with open(build.OPTABLE_HEADER) as f:
        assert f.read() == build.render_optable()
    table = build.load_optable()
    text = build.render_optable()
    for op in table.OPS:
        assert f"constexpr OpSpec k{op.name} = {{" in text
        assert f'"{op.tf_name}"' in text
        if op.gradient:
            assert op.gradient in table.BY_NAME
            grad = table.BY_NAME[op.gradient]
            # One gradient per differentiable input, shaped like it.
            assert [t.name for t in grad.outputs] == ["grad_" + n for n in op.differentiable]
            shapes = {t.name: t.shape for t in op.inputs}
            assert [t.shape for t in grad.outputs] == [shapes[n] for n in op.differentiable]


def test_nvrtc_reports_a_compile_error():
    if build.find_nvrtc() is None:
        pytest.skip("the nvidia-cuda-nvrtc-cu12 wheel is not installed")
    nvrtc = build.Nvrtc(build.find_nvrtc())
    with pytest.raises(build.BuildError, match="undefined_thing"):
        nvrtc.compile(
            'extern "C" __global__ void k(float* x) { x[0] = undefined_thing; }',
            "broken.cu",
            "compute_70",
            [],
        )


def test_kernel_sources_have_no_framework_or_runtime_api():
    cuda_dir = os.path.join(ROOT, "custom_ops", "sapa", "kernels", "cuda")
    for name in os.listdir(cuda_dir):
        with open(os.path.join(cuda_dir, name)) as f:
            text = f.read()
        includes = re.findall(r"#include\s+[<\"]([^>\"]+)", text)
        allowed = {"cuda_fp16.h", "cuda_bf16.h", "sapa_kernels.cuh", "sapa_deform_kernels.cuh"}
        assert set(includes) <= allowed, includes
        assert not re.search(r"\bcuda[A-Z]\w*\(", text), "CUDA runtime API call in " + name
        assert "tensorflow" not in text.lower() and "Eigen" not in text


# ---------------------------------------------------------------------------------------
# Launcher


@pytest.fixture(scope="session")
def fake_driver_so(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in driver")
    out = tmp_path_factory.mktemp("fake_driver") / "libcuda_fake.so"
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O1",
            os.path.join(LAUNCHER_DIR, "testing", "fake_libcuda.c"),
            "-o",
            str(out),
        ],
        check=True,
    )
    return str(out)


@pytest.fixture
def fresh_launcher(launcher_build, tmp_path):  # noqa: F811 - the imported fixture
    """A launcher with its own globals (a copy of the library under a new path)."""
    path = tmp_path / "libsapa_launcher_copy.so"
    shutil.copy(launcher_build, path)
    return harness.Launcher(str(path))


@pytest.fixture
def fake(fake_driver_so, fresh_launcher):
    """(launcher, fake driver) with the launcher initialised on the stand-in driver."""
    driver = ctypes.CDLL(fake_driver_so)
    driver.fake_loaded_image.restype = ctypes.c_char_p
    driver.fake_last_kernel.restype = ctypes.c_char_p
    driver.fake_configure(8, 0, 0, 0, 0)
    fresh_launcher.init(fake_driver_so)
    return fresh_launcher, driver


def test_no_driver(fresh_launcher, tmp_path):
    with pytest.raises(harness.LauncherError, match="no NVIDIA driver") as info:
        fresh_launcher.init(str(tmp_path / "libcuda.so.1"))
    assert info.value.status == harness.SAPA_ERR_NO_DRIVER
    # Launches report the same instead of crashing.
    with pytest.raises(harness.LauncherError) as info:
        fresh_launcher.call(
            "dot", None, "float32", harness.dims(1, 2, 2, 1, 3, 4), None, None, None
        )
    assert info.value.status in (harness.SAPA_ERR_NO_DRIVER, harness.SAPA_ERR_DRIVER)


def test_no_driver_on_this_machine(fresh_launcher):
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(harness.LauncherError, match="no NVIDIA driver: cannot load libcuda.so.1"):
        fresh_launcher.init(None)


def test_image_selection_needs_no_gpu(fresh_launcher):
    L = fresh_launcher
    for target in ("sm_60", "sm_70", "sm_80", "sm_89", "sm_90", "compute_90"):
        L.add_image(target, b"image of " + target.encode())
    assert L.select_image(8, 0) == "sm_80"
    assert L.select_image(8, 6) == "sm_80"  # same major, older minor: binary compatible
    assert L.select_image(8, 9) == "sm_89"
    assert L.select_image(7, 5) == "sm_70"
    assert L.select_image(9, 0) == "sm_90"
    assert L.select_image(10, 0) == "compute_90"  # newer GPU: the driver JITs the PTX
    assert L.select_image(12, 0) == "compute_90"
    with pytest.raises(
        harness.LauncherError, match=r"no kernel image for this GPU \(sm_52\)"
    ) as info:
        L.select_image(5, 2)
    assert info.value.status == harness.SAPA_ERR_NO_IMAGE
    assert "sm_60, sm_70" in str(info.value)
    L.clear_images()
    L.add_image("sm_80", b"x")
    with pytest.raises(harness.LauncherError, match="sm_90"):
        L.select_image(9, 0)
    with pytest.raises(harness.LauncherError, match="sm_XY or compute_XY"):
        L.add_image("sm_90a", b"x")


def test_launcher_loads_the_built_images(fresh_launcher, images):
    out, targets, _ = images
    assert fresh_launcher.load_image_dir(out) == len(targets)


def _m1():
    return harness.dims(4, 64, 64, 2, 5, 64, 256)


def _launch(L, op, dtype, d, n):
    L.call(op, None, dtype, d, *([ctypes.c_void_p(0x10000)] * n))
    return L.last_launch()


def test_fake_driver_tiled_launch_sizes(fake, images):
    L, driver = fake
    L.load_image_dir(images[0])
    name, grid, block, smem = _launch(L, "forward", "float32", _m1(), 5)
    assert name == "sapa_fused_f32_k5"
    assert driver.fake_last_kernel().decode() == name
    assert driver.fake_loaded_image().decode() == "cubin"
    assert 0 < smem <= 48 * 1024 and 32 <= block <= 1024 and block % 32 == 0
    # The grid covers every anchor with tiles of T x T, one thread per high-res point.
    tiles = [t for t in range(1, 33) if (t * 2) ** 2 <= block < (t * 2) ** 2 + 32]
    assert len(tiles) == 1
    t = tiles[0]
    assert grid == 4 * (-(-64 // t)) ** 2
    # K = 7 kernels are limited to 256 threads (their registers hold 49 logits).
    name, grid, block, smem = _launch(
        L, "forward", "float32", harness.dims(4, 64, 64, 2, 7, 64, 256), 5
    )
    assert name == "sapa_fused_f32_k7" and block <= 256
    for op, dtype, n, want in (
        ("dot", "float16", 3, "sapa_dot_f16_k5"),
        ("softmax_backward", "bfloat16", 4, "sapa_dsoftmax_bf16_k5"),
        ("gather", "float64", 3, "sapa_gather_f64"),
        ("scatter", "float32", 3, "sapa_scatter_f32"),
        ("gather_acc", "float16", 3, "sapa_gather_f16_wacc"),
        ("scatter_acc", "bfloat16", 3, "sapa_scatter_bf16_wacc"),
        ("gather_acc", "float32", 3, "sapa_gather_f32"),
    ):
        name, grid, block, smem = _launch(L, op, dtype, _m1(), n)
        assert name == want
        assert 0 < grid < 2**31 and 0 < block <= 1024 and smem <= 48 * 1024


def test_fake_driver_untiled_fallbacks(fake, images):
    L, _ = fake
    L.load_image_dir(images[0])
    # K outside {3, 5, 7}: the untiled dot/fused; gather/scatter stay tiled (any K).
    d9 = harness.dims(1, 8, 8, 2, 9, 16, 16)
    assert _launch(L, "forward", "float32", d9, 5)[0] == "sapa_fused_f32_any"
    assert _launch(L, "dot", "float32", d9, 3)[0] == "sapa_dot_f32_any"
    assert _launch(L, "gather", "float32", d9, 3)[0] == "sapa_gather_f32"
    # s so large that a tile's high-res points exceed a block: untiled.
    big_s = harness.dims(1, 4, 4, 40, 3, 8, 8)
    assert _launch(L, "dot", "float32", big_s, 3)[0] == "sapa_dot_f32_any"
    L.set_untiled(True)
    assert _launch(L, "forward", "float16", _m1(), 5)[0] == "sapa_fused_f16_any"
    assert _launch(L, "scatter_acc", "float16", _m1(), 3)[0] == "sapa_scatter_f16_wacc_any"
    # Past 2**31 elements: a bounded grid-stride grid.
    huge = harness.dims(1, 512, 512, 4, 3, 8, 520)
    name, grid, block, _ = _launch(L, "gather", "float16", huge, 3)
    assert name == "sapa_gather_f16_any" and 0 < grid <= 108 * 32 and block == 256
    L.set_untiled(False)


def test_fake_driver_no_image_for_the_architecture(fake, images):
    L, driver = fake
    L.load_image_dir(images[0])
    driver.fake_configure(5, 0, 0, 0, 0)  # Maxwell: older than every image
    with pytest.raises(
        harness.LauncherError, match=r"no kernel image for this GPU \(sm_50\)"
    ) as info:
        _launch(L, "dot", "float32", _m1(), 3)
    assert info.value.status == harness.SAPA_ERR_NO_IMAGE
    driver.fake_configure(12, 0, 0, 0, 0)  # newer than every cubin: the PTX is JIT-compiled
    assert L.device_info()[2] == "compute_90"
    assert driver.fake_loaded_image().decode() == "ptx"


def test_fake_driver_launch_failure(fake, images):
    L, driver = fake
    L.load_image_dir(images[0])
    driver.fake_configure(8, 6, 0, 0, 719)
    with pytest.raises(harness.LauncherError, match="launching sapa_fused_f32_k5") as info:
        _launch(L, "forward", "float32", _m1(), 5)
    assert info.value.status == harness.SAPA_ERR_LAUNCH
    assert "FAKE_CUDA_ERROR_719" in str(info.value)


def test_fake_driver_old_driver_rejects_the_ptx(fake):
    L, driver = fake
    L.add_image("compute_90", b"// ptx text")
    driver.fake_configure(9, 1, 0, 222, 0)
    with pytest.raises(harness.LauncherError, match="older than the NVRTC"):
        L.device_info()


def test_fake_driver_init_failure(fake_driver_so, fresh_launcher):
    driver = ctypes.CDLL(fake_driver_so)
    driver.fake_configure(8, 0, 100, 0, 0)
    try:
        with pytest.raises(
            harness.LauncherError, match="cuInit failed: FAKE_CUDA_ERROR_100"
        ) as info:
            fresh_launcher.init(fake_driver_so)
        assert info.value.status == harness.SAPA_ERR_DRIVER
    finally:
        driver.fake_configure(8, 0, 0, 0, 0)


def test_bad_arguments(fake):
    L, _ = fake
    with pytest.raises(harness.LauncherError, match="dtype"):
        L._check(L.lib.sapa_dot(None, 7, ctypes.byref(_m1()), None, None, None))
    with pytest.raises(harness.LauncherError, match="kernel odd"):
        L.call("dot", None, "float32", harness.dims(1, 2, 2, 1, 4, 3), None, None, None)


def test_driver_constants_match_cuda_h(tmp_path):
    """The launcher declares the few driver API values it uses itself (no CUDA headers):
    check them against cuda.h where the wheel provides it."""
    include = build.find_cuda_include()
    if include is None or not os.path.isfile(os.path.join(include, "cuda.h")):
        pytest.skip("cuda.h (nvidia-cuda-runtime-cu12 wheel) not installed")
    with open(os.path.join(LAUNCHER_DIR, "sapa_launcher.cc")) as f:
        source = f.read()
    checks = []
    for name, value in re.findall(r"const int ATTR_(\w+) = (\d+);", source):
        checks.append(f'static_assert(CU_DEVICE_ATTRIBUTE_{name} == {value}, "{name}");')
    for name, value in re.findall(r"const int FUNC_ATTR_(\w+) = (\d+);", source):
        checks.append(f'static_assert(CU_FUNC_ATTRIBUTE_{name} == {value}, "{name}");')
    for name, value in re.findall(r"const CUresult (CUDA_\w+) = (\d+);", source):
        checks.append(f'static_assert({name} == {value}, "{name}");')
    for symbol in re.findall(r'Sym\(handle, "(\w+)"', source):
        checks.append(f'static_assert(sizeof(&{symbol}) > 0, "{symbol}");')
    assert len(checks) >= 20
    probe = tmp_path / "probe.cc"
    probe.write_text("#include <cuda.h>\n" + "\n".join(checks) + "\nint main() { return 0; }\n")
    subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-I" + include, str(probe)], check=True)


# ---------------------------------------------------------------------------------------
# The GPU library


def _built(name):
    path = os.path.join(LIB_DIR, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} not built (python custom_ops/build.py)")
    return path


def test_gpu_library_links_no_cuda_runtime():
    for name in ("_sapa_ops_gpu.so", "libsapa_launcher.so"):
        path = _built(name)
        undefined = subprocess.run(
            ["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True
        ).stdout
        cuda = [line for line in undefined.split() if re.match(r"_?_?cu(da)?[A-Z]", line)]
        assert not cuda, (name, cuda)
        needed = subprocess.run(
            ["readelf", "-d", path], capture_output=True, text=True, check=True
        ).stdout
        assert "libcudart" not in needed and "libcuda.so" not in needed


def test_gpu_library_loads_into_tensorflow():
    """Built with g++ against this TensorFlow: it loads (registering DEVICE_GPU kernels
    for every op of the table, SAPA-D's included) even where no GPU exists."""
    gpu_library = _built("_sapa_ops_gpu.so")
    tf = pytest.importorskip("tensorflow")
    from keras_sapa.ops import _tf_kernels

    if _tf_kernels.load_library() is None:
        pytest.skip(f"the CPU library is unavailable: {_tf_kernels.unavailable_reason()}")
    tf.load_library(gpu_library)  # the ops it registers kernels for are those loaded
    table = _load("keras_sapa_optable", os.path.join(ROOT, "keras_sapa", "ops", "_optable.py"))
    assert all("gpu" in op.devices for op in table.OPS)


def _harness(tmp_path, capsys, driver):
    """(exit status, output) of scripts/gpu_harness.py's main() on a copy of the built
    launcher (its own globals) with a kernel image file, and this driver."""
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    shutil.copy(_built("libsapa_launcher.so"), lib_dir)
    (lib_dir / "sapa_kernels.sm_80.cubin").write_bytes(b"\x7fELF (a stand-in image)")
    status = harness.main(
        ["--lib-dir", str(lib_dir), "--driver", str(driver), "--log", str(tmp_path / "h.log")]
    )
    return status, capsys.readouterr().out


def test_harness_without_a_driver_exits_clearly(tmp_path, capsys):
    """The harness's no-GPU path: a clear message and exit status 2."""
    status, out = _harness(tmp_path, capsys, tmp_path / "libcuda.so.1")
    assert status == 2, out
    assert "cannot run: no driver: no NVIDIA driver" in out
    assert "cannot run" in (tmp_path / "h.log").read_text()


def test_harness_without_a_gpu_backend_exits_clearly(tmp_path, capsys, fake_driver_so):
    """With a driver (the stand-in) but no GPU for PyTorch/CuPy: exit status 2."""
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU for PyTorch")
    except ImportError:
        pass
    status, out = _harness(tmp_path, capsys, fake_driver_so)
    assert status == 2, out
    assert "no usable PyTorch or CuPy GPU backend" in out or "sees no CUDA GPU" in out


def test_harness_references_agree_with_tests_reference():
    """The harness's own loops (scatter, single point) against tests/reference.py through
    adjointness and a direct evaluation, so a harness bug cannot pass a wrong kernel."""
    import reference

    rng = np.random.default_rng(3)
    k, s = 3, 2
    q = rng.standard_normal((1, 6, 4, 5))
    key = rng.standard_normal((1, 3, 2, 5))
    v = rng.standard_normal((1, 3, 2, 4))
    w = rng.standard_normal((1, 6, 4, 9))
    hi = rng.standard_normal((1, 6, 4, 5))
    lo = rng.standard_normal((1, 3, 2, 5))
    # <Scatter(w, hi), lo> == <w, Dot(hi, lo)>
    left = np.sum(harness.scatter_reference(w, hi, k, s, (1, 3, 2)) * lo)
    right = np.sum(w * reference.similarity(hi, lo, k, s))
    assert np.isclose(left, right, rtol=1e-12)
    full = reference.sapa(q, key, v, k, s)
    for i, j in ((0, 0), (5, 3), (2, 1)):
        point, weights = harness.sapa_point(q, key, v, 0, i, j, k, s)
        np.testing.assert_allclose(point, full[0, i, j], rtol=1e-12)
        assert np.isclose(weights.sum(), 1.0)


# ---------------------------------------------------------------------------------------
# On a GPU (skipped here when none exists)


def _gpu_or_skip():
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU on this machine: the compiled GPU kernels cannot run here")
    from keras_sapa.ops import _tf_kernels as _compiled

    if not _compiled.gpu_op_usable():
        pytest.fail(f"a GPU exists but the GPU kernels are not usable: {_compiled.gpu_status()}")
    return tf, _compiled


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_gpu_ops_match_reference_on_the_gpu(dtype):
    tf, compiled = _gpu_or_skip()
    import reference

    rng = np.random.default_rng(11)
    k, s = 5, 2
    q = rng.standard_normal((2, 10, 14, 64)).astype(np.float32) * 0.3
    key = rng.standard_normal((2, 5, 7, 64)).astype(np.float32) * 0.3
    v = rng.standard_normal((2, 5, 7, 256)).astype(np.float32)
    tol = {"float32": 1e-4, "float64": 1e-10, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(False)
    try:
        with tf.device("/GPU:0"):
            tq, tk, tv = (tf.cast(x, dtype) for x in (q, key, v))
            out, _ = compiled.sapa_with_weights(tq, tk, tv, k, s)
            sim = compiled.similarity(tq, tk, k, s)
    finally:
        tf.config.set_soft_device_placement(soft)
    assert "GPU" in out.device and "GPU" in sim.device
    qr, kr, vr = (np.asarray(tf.cast(tf.cast(x, dtype), tf.float64)) for x in (q, key, v))
    np.testing.assert_allclose(
        np.asarray(tf.cast(out, tf.float64)), reference.sapa(qr, kr, vr, k, s), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_gpu_deform_op_matches_reference_on_the_gpu(dtype):
    """KerasSapa>SapaDeform and its gradient on the GPU (soft placement off) against
    tests/reference_deform.py, at the official P=9, G=4, E=32 with C=256."""
    tf, _ = _gpu_or_skip()
    import reference_deform as ref
    from keras_sapa.ops import _tf_deform_kernels as deform

    rng = np.random.default_rng(12)
    p, s, g = 9, 2, 4
    high, low = (1, 8, 10), (1, 4, 5)
    raw = [
        rng.standard_normal(high + (128,)) * 0.3,
        rng.standard_normal(low + (128,)) * 0.3,
        rng.standard_normal(low + (256,)),
        ref.offsets_away_from_integers(rng, high + (2 * g * p,), spread=2.0, margin=0.1),
        rng.standard_normal(high + (256,)),
    ]
    tol = {"float32": 1e-4, "float64": 1e-10, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    soft = tf.config.get_soft_device_placement()
    tf.config.set_soft_device_placement(False)
    try:
        with tf.device("/GPU:0"):
            q, k, v, off, grad = (tf.cast(x, dtype) for x in raw)
            with tf.GradientTape() as tape:
                tape.watch([q, k, v, off])
                out = deform.sapa_deform(q, k, v, off, p, s, g)
            grads = tape.gradient(out, [q, k, v, off], output_gradients=grad)
    finally:
        tf.config.set_soft_device_placement(soft)
    assert "GPU" in out.device and all("GPU" in t.device for t in grads)
    seen = [np.asarray(tf.cast(tf.cast(x, dtype), tf.float64)) for x in raw]
    want = [ref.sapa_deform(*seen[:4], p, s, g), *ref.sapa_deform_vjp(*seen, p, s, g)]
    for got, expected in zip([out, *grads], want, strict=True):
        got = np.asarray(tf.cast(got, tf.float64))
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale)


# ---------------------------------------------------------------------------------------
# The kernels themselves, run on the CPU by an emulated driver
# (custom_ops/sapa/launcher/testing/emulated_libcuda.cc on emulation.h: each CUDA thread
# a fiber, __syncthreads a barrier of the block's scheduler), driven through the real
# launcher and the harness's checks against tests/reference.py. This proves the kernels'
# indexing, tiling, halos, chunking, softmax and gradients on every machine; speed and
# GPU-specific behaviour need a GPU.


class HostBackend:
    """The harness's device-array interface over host NumPy arrays (the emulated driver
    runs kernels on host memory)."""

    name = "host"

    def __init__(self):
        ml_dtypes = pytest.importorskip("ml_dtypes")
        self.types = {
            "float32": np.float32,
            "float16": np.float16,
            "bfloat16": ml_dtypes.bfloat16,
            "float64": np.float64,
        }

    def stream_handle(self):
        return None

    def to_device(self, array, dtype):
        return np.ascontiguousarray(np.asarray(array, np.float64).astype(self.types[dtype]))

    def empty(self, shape, dtype):
        return np.full(shape, np.nan, self.types[dtype])  # unwritten elements fail checks

    def full(self, shape, dtype, value):
        return np.full(shape, value, self.types[dtype])

    def pointer(self, array):
        return ctypes.c_void_p(array.ctypes.data)

    def to_host(self, array):
        return np.asarray(array).astype(np.float64)

    def synchronize(self):
        pass

    def gather_host(self, array, flat_indices):
        return array.reshape(-1)[np.asarray(flat_indices)].astype(np.float64)


@pytest.fixture
def emulated(emulated_build, fresh_launcher, tmp_path):  # noqa: F811 - the imported fixture
    path = tmp_path / "libcuda_emulated.so"  # its own globals, as the launcher's copy
    shutil.copy(emulated_build, path)
    driver = ctypes.CDLL(str(path))
    driver.emu_configure(8, 0, 1)  # one SM: small grid-stride grids, few host threads
    fresh_launcher.init(str(path))
    fresh_launcher.add_image("sm_80", b"\x7fELF (the emulated driver ignores the image)")
    return fresh_launcher, driver


def _emulation_cases():
    """Every case in float32 and float64; float16 and bfloat16 at the real channel
    counts and past a chunk boundary (their storage is what differs; every kernel and
    tile of theirs also runs in the launcher's self-test, tests/test_launcher.py), the
    other shapes with `-m benchmark`."""
    for case in harness.CASES:
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            half = dtype in ("float16", "bfloat16")
            marks = pytest.mark.benchmark if half and case[-1] < 256 else ()
            yield pytest.param(
                dtype,
                case,
                marks=marks,
                id="B{}_{}x{}_s{}_K{}_d{}_C{}".format(*case) + "-" + dtype,
            )


@pytest.mark.parametrize("dtype,case", list(_emulation_cases()))
def test_kernels_match_reference_in_emulation(emulated, dtype, case):
    launcher, driver = emulated
    lines = []
    checker = harness.Checker(launcher, HostBackend(), lines.append)
    before = driver.emu_launches()
    checker.run_case(dtype, *case, seed=sum(case) + len(dtype))
    # 8 launches (dot, gather, scatter, fused, softmax backward, 3 gradient gathers), then
    # sapa_backward (its 4), tiled then untiled.
    assert checker.checks >= 24 and driver.emu_launches() - before == 24
    assert checker.failures == 0, "\n".join(lines)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_harness_deform_check_in_emulation(emulated, dtype):
    """The harness's SAPA-D check (the launcher's deform entry points against
    tests/reference_deform.py) passes on the emulated GPU, as it must on a real one: the
    fused forward and backward (6 checks), and in float64 the halves too (8 more)."""
    launcher, _ = emulated
    lines = []
    checker = harness.Checker(launcher, HostBackend(), lines.append)
    checker.deform_case(dtype, *harness.DEFORM_CASES[-1], seed=5)
    expected = 6 + (8 if dtype == "float64" else 0)
    assert checker.checks == expected and checker.failures == 0, "\n".join(lines)


def test_harness_jax_formulation_matches_reference():
    """The XLA formulation the harness times through JAX computes SAPA (on the CPU here)."""
    jnp = pytest.importorskip("jax.numpy")
    import reference

    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 6, 8, 5)).astype(np.float32)
    key = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    v = rng.standard_normal((2, 3, 4, 7)).astype(np.float32)
    got = np.asarray(
        harness.jax_xla_sapa(jnp, jnp.asarray(q), jnp.asarray(key), jnp.asarray(v), 3, 2)
    )
    np.testing.assert_allclose(got, reference.sapa(q, key, v, 3, 2), rtol=1e-5, atol=1e-5)
