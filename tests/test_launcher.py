"""The CUDA launcher's runtime behaviour, on machines without a GPU.

The launcher (custom_ops/sapa/launcher/sapa_launcher.cc) is built here with the link
flags that keep it loadable on glibc 2.28 (LAUNCHER_FLAGS) and driven through ctypes
against the emulated driver (custom_ops/sapa/launcher/testing/emulated_libcuda.cc),
which runs the real CUDA kernels on the CPU and models contexts the way the driver does:
two devices with different compute capabilities, a per-thread context stack, a primary
context that a reset destroys (re-created under the same handle with a new ID), modules
that only work in the context that loaded them. Results are compared with
tests/reference.py.

- Contexts: worker threads with no current context, threads whose current context is
  another device's, streams of either device, several threads at once, a primary
  context reset between launches (the module cache reloads instead of launching a stale
  handle), and the caller's context stack left as it was.
- Self-test: the configurations the launcher lists are every one it can choose (an
  independent sweep over up and K, and over SAPA-D's points per output point), the
  self-test runs every one of them for every dtype and passes, and it reports a corrupted
  kernel by name; the Python side of it (keras_sapa/ops/_gpu_check.py, through ctypes)
  passes, and on a failure warns once and makes TensorFlow fall back.
- SAPA-D: the launcher's sapa_deform_forward / sapa_deform_backward against
  tests/reference_deform.py in every dtype, and its checks of bad sizes.
- glibc: the built library needs no symbol version newer than GLIBC_2.28, and
  custom_ops/build.py links it with the same flags.

Built libraries are cached under the temporary directory by a hash of their sources and
build commands, so only the first run compiles (about ten seconds).
"""

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest

import reference
import reference_deform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_DIR = os.path.join(ROOT, "custom_ops", "sapa", "launcher")
TESTING_DIR = os.path.join(LAUNCHER_DIR, "testing")
KERNEL_DIR = os.path.join(ROOT, "custom_ops", "sapa", "kernels", "cuda")

# The launcher's link for glibc 2.28 (custom_ops/build.py's build_launcher must match;
# the last test checks it; -Wall -Werror only here, a check that it compiles cleanly):
# static libstdc++, the system's libgcc_s (a static libgcc
# needs glibc 2.35's _dl_find_object), and libdl/libpthread named so that the original
# dl*/pthread symbols, which live there before glibc 2.34, are found on old systems.
LAUNCHER_FLAGS = [
    "-shared",
    "-fPIC",
    "-O2",
    "-std=c++17",
    "-Wall",
    "-Werror",
    "-static-libstdc++",
    "-Wl,--no-as-needed",
    "-l:libdl.so.2",
    "-l:libpthread.so.0",
]
EMULATED_FLAGS = [
    "-std=c++20",
    "-O1",
    "-shared",
    "-fPIC",
    "-w",
    "-I" + os.path.join(TESTING_DIR, "emulated_include"),
    "-ldl",
    "-lpthread",
]
MAX_GLIBC = (2, 28)

SAPA_OK, SAPA_ERR_DRIVER, SAPA_ERR_INVALID, SAPA_ERR_MISMATCH = 0, 2, 5, 7
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
OPS = {  # entry point: number of pointer arguments
    "sapa_dot": 3,
    "sapa_gather": 3,
    "sapa_scatter": 3,
    "sapa_gather_acc": 3,
    "sapa_scatter_acc": 3,
    "sapa_forward": 5,
    "sapa_softmax_backward": 4,
}
TILED_MAX_UP = 8
DEFORM_OPS = {  # pointer arguments
    "sapa_deform_forward": 6,
    "sapa_deform_backward": 11,
    "sapa_deform_similarity": 4,
    "sapa_deform_similarity_backward": 7,
    "sapa_deform_aggregate": 4,
    "sapa_deform_aggregate_backward": 7,
}
# The entry points whose kernels sapa_launch_configs lists (the halves' are not listed yet).
FUSED_DEFORM_OPS = ("sapa_deform_forward", "sapa_deform_backward")
ACC_SIZE = {"float32": 4, "float16": 4, "bfloat16": 4, "float64": 8}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The harness's ctypes mirror of sapa_launcher.h (it needs no framework).
harness = _load("keras_sapa_gpu_harness", os.path.join(ROOT, "scripts", "gpu_harness.py"))
SapaDims, SapaDeformDims = harness.SapaDims, harness.SapaDeformDims


class SapaLaunchConfig(ctypes.Structure):
    _fields_ = [
        ("kernel", ctypes.c_char * 48),
        ("tile", ctypes.c_int),
        ("block", ctypes.c_int),
        ("smem", ctypes.c_int),
        ("up", ctypes.c_int),
        ("ksize", ctypes.c_int),
    ]


# ---------------------------------------------------------------------------------------
# Building (cached by source hash)


def _digest(paths, command):
    h = hashlib.sha256(" ".join(command).encode())
    for path in sorted(paths):
        h.update(path.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


def _files(directory, pattern):
    return [os.path.join(directory, n) for n in os.listdir(directory) if re.search(pattern, n)]


def _cached_build(name, compiler, sources, inputs, flags):
    """Builds `sources` into a cached shared library; returns its path. The cache key
    hashes `inputs` and the emulation headers (launcher/testing/*.h), which the emulated
    builds include."""
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} to build {name}")
    key = _digest(set(inputs) | set(_files(TESTING_DIR, r"\.h$")), [compiler, *flags])
    cache = os.path.join(tempfile.gettempdir(), "keras_sapa_test_launcher")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{name}-{key}.so")
    if not os.path.isfile(path):
        partial = f"{path}.{os.getpid()}.tmp"
        # Sources first: -l options only resolve symbols of what precedes them.
        subprocess.run([compiler, *sources, "-o", partial, *flags], check=True)
        os.replace(partial, path)
    return path


@pytest.fixture(scope="session")
def launcher_build():
    source = os.path.join(LAUNCHER_DIR, "sapa_launcher.cc")
    return _cached_build(
        "launcher",
        "g++",
        [source],
        [source, os.path.join(LAUNCHER_DIR, "sapa_launcher.h")],
        LAUNCHER_FLAGS,
    )


@pytest.fixture(scope="session")
def emulated_build():
    source = os.path.join(TESTING_DIR, "emulated_libcuda.cc")
    inputs = [
        source,
        *_files(KERNEL_DIR, r"\.cuh?$"),
        *_files(os.path.join(TESTING_DIR, "emulated_include"), r"\.h$"),
    ]
    return _cached_build("emulated_libcuda", "g++", [source], inputs, EMULATED_FLAGS)


class Launcher:
    """A fresh launcher (its own globals: a copy under a new path) on a fresh emulated
    driver, with the calls the tests use."""

    def __init__(self, launcher_so, emulated_so, directory):
        driver_path = os.path.join(directory, "libcuda_emulated.so")
        shutil.copy(emulated_so, driver_path)
        lib_path = os.path.join(directory, "libsapa_launcher.so")
        shutil.copy(launcher_so, lib_path)
        self.driver_path, self.lib_path = driver_path, lib_path
        self.emu = ctypes.CDLL(driver_path)  # the instance the launcher dlopens
        self.lib = ctypes.CDLL(lib_path)
        self.lib.sapa_last_error.restype = ctypes.c_char_p
        self.emu.emu_stream_create.restype = ctypes.c_void_p
        self.emu.emu_stream_create.argtypes = [ctypes.c_void_p]
        self.emu.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        self.emu.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        for ops, dims in ((OPS, SapaDims), (DEFORM_OPS, SapaDeformDims)):
            for name, n in ops.items():
                getattr(self.lib, name).argtypes = [
                    ctypes.c_void_p,
                    ctypes.c_int,
                    ctypes.POINTER(dims),
                ] + [ctypes.c_void_p] * n
        self.lib.sapa_deform_workspace.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(SapaDeformDims),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        self.lib.sapa_self_test.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
        ]
        self.lib.sapa_launch_configs.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(SapaLaunchConfig),
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
        ]
        self.emu.emu_configure(8, 0, 1)
        self.check(self.lib.sapa_init(driver_path.encode()))
        for target in ("sm_75", "sm_80"):  # the emulated driver ignores the image's bytes
            image = b"\x7fELF emulated " + target.encode()
            self.check(self.lib.sapa_add_image(target.encode(), image, len(image)))

    def error(self):
        return self.lib.sapa_last_error().decode()

    def check(self, status):
        assert status == SAPA_OK, (status, self.error())

    def loads(self):
        loads, entries = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.sapa_module_loads(ctypes.byref(loads), ctypes.byref(entries)))
        return loads.value, entries.value

    def retain(self, device):
        ctx = ctypes.c_void_p()
        assert self.emu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) == 0
        return ctx

    def current(self):
        ctx = ctypes.c_void_p()
        assert self.emu.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
        return ctx.value

    def log(self):
        out = []
        name = ctypes.create_string_buffer(96)
        block, smem, device, tile = (ctypes.c_int() for _ in range(4))
        for i in range(self.emu.emu_log_size()):
            assert (
                self.emu.emu_log_entry(
                    i,
                    name,
                    96,
                    ctypes.byref(block),
                    ctypes.byref(smem),
                    ctypes.byref(device),
                    ctypes.byref(tile),
                )
                == 0
            )
            out.append((name.value.decode(), block.value, smem.value, device.value, tile.value))
        return out

    def configs(self, dtype):
        count = ctypes.c_int()
        buf = (SapaLaunchConfig * 2000)()
        self.check(
            self.lib.sapa_launch_configs(None, DTYPES[dtype], buf, 2000, ctypes.byref(count))
        )
        assert 0 < count.value <= 2000
        return [
            (c.kernel.decode(), c.tile, c.block, c.smem, c.up, c.ksize) for c in buf[: count.value]
        ]


@pytest.fixture
def launcher(launcher_build, emulated_build, tmp_path):
    return Launcher(launcher_build, emulated_build, str(tmp_path))


def _ptr(array):
    return ctypes.c_void_p(array.ctypes.data)


def _forward(launcher, stream, seed, case=(2, 5, 6, 2, 3, 4, 5)):
    """One fused forward through the launcher on host arrays; returns (out, want)."""
    batch, height, width, s, k, d, c = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, s * height, s * width, d)).astype(np.float32)
    key = rng.standard_normal((batch, height, width, d)).astype(np.float32)
    v = rng.standard_normal((batch, height, width, c)).astype(np.float32)
    out = np.full((batch, s * height, s * width, c), np.nan, np.float32)
    attn = np.full((batch, s * height, s * width, k * k), np.nan, np.float32)
    dims = SapaDims(batch, height, width, s, k, d, c)
    status = launcher.lib.sapa_forward(
        stream, 0, ctypes.byref(dims), _ptr(q), _ptr(key), _ptr(v), _ptr(out), _ptr(attn)
    )
    launcher.check(status)
    return out, reference.sapa(q, key, v, k, s)


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Contexts


@pytest.mark.parametrize("context_ids", [True, False], ids=["ctx_ids", "no_ctx_ids"])
def test_worker_threads_on_two_devices_with_a_reset(launcher, context_ids):
    """Threads with no current context pick a device (sapa_set_device) and run
    concurrently on both; a reset of device 0's primary context between two rounds makes
    the launcher load a new module there (a stale one fails in the emulated driver), also
    on a driver without cuCtxGetId (the re-created context has the old handle)."""
    L = launcher
    L.emu.emu_hide_context_ids(0 if context_ids else 1)
    assert L.emu.emu_set_device_count(2) == 0
    assert L.emu.emu_configure_device(1, 7, 5, 1) == 0  # a T4-class second GPU

    def round_(tag):
        errors = []

        def work(i):
            try:
                device = i % 2
                L.check(L.lib.sapa_set_device(device))
                assert L.current() is None  # a fresh worker thread: no current context
                for j in range(2):
                    got, want = _forward(L, None, seed=100 * i + j + tag)
                    _assert_close(got, want)
                    name = ctypes.create_string_buffer(64)
                    L.lib.sapa_last_launch(name, 64, None, None, None)
                    assert name.value == b"sapa_fused_f32_k3"
                assert L.current() is None  # the launcher popped what it pushed
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(f"thread {i}: {exc!r}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    L.emu.emu_log_clear()
    round_(0)
    devices = {entry[3] for entry in L.log()}
    assert devices == {0, 1}, L.log()
    assert L.loads() == (2, 2)  # one module per device, whatever the number of threads
    assert (L.emu.emu_module_loads(0), L.emu.emu_module_loads(1)) == (1, 1)
    # Exactly one reference held per device, however many calls retained it.
    assert (L.emu.emu_primary_refs(0), L.emu.emu_primary_refs(1)) == (1, 1)

    assert L.emu.cuDevicePrimaryCtxReset_v2(0) == 0
    round_(1)
    assert (L.emu.emu_module_loads(0), L.emu.emu_module_loads(1)) == (2, 1)
    # Device 0 reloaded: a new cache entry under the new context ID, or, without IDs, the
    # stale entry of the old context's handle replaced.
    assert L.loads() == (3, 3 if context_ids else 2)
    assert (L.emu.emu_primary_refs(0), L.emu.emu_primary_refs(1)) == (1, 1)


def test_streams_of_another_device_and_the_callers_context(launcher):
    """A stream's own context is pushed for the launch whatever the thread has current,
    and the thread's context stack is as it was afterwards; a NULL stream uses the
    thread's current context."""
    L = launcher
    assert L.emu.emu_set_device_count(2) == 0
    assert L.emu.emu_configure_device(1, 7, 5, 1) == 0
    ctx0, ctx1 = L.retain(0), L.retain(1)  # as a framework holds them
    stream1 = L.emu.emu_stream_create(ctx1)
    assert stream1

    assert L.emu.cuCtxPushCurrent_v2(ctx0) == 0
    L.emu.emu_log_clear()
    got, want = _forward(L, stream1, seed=1)
    _assert_close(got, want)
    assert L.log()[-1][3] == 1  # ran on the stream's device
    assert L.current() == ctx0.value and L.emu.emu_context_depth() == 1

    got, want = _forward(L, None, seed=2)  # NULL stream: the current context (device 0)
    _assert_close(got, want)
    assert L.log()[-1][3] == 0
    major, minor = ctypes.c_int(), ctypes.c_int()
    target = ctypes.create_string_buffer(16)
    L.check(
        L.lib.sapa_device_info(
            ctypes.c_void_p(stream1), ctypes.byref(major), ctypes.byref(minor), target, 16
        )
    )
    assert (major.value, minor.value, target.value) == (7, 5, b"sm_75")
    L.check(L.lib.sapa_device_info(None, ctypes.byref(major), ctypes.byref(minor), target, 16))
    assert (major.value, minor.value, target.value) == (8, 0, b"sm_80")
    assert L.current() == ctx0.value and L.emu.emu_context_depth() == 1

    # A reset destroys device 1's context and its streams: a clear error, then a new
    # stream in the re-created context works (a new module under the same handle).
    assert L.emu.cuDevicePrimaryCtxReset_v2(1) == 0
    dims = SapaDims(1, 2, 2, 2, 3, 4, 4)
    status = L.lib.sapa_dot(stream1, 0, ctypes.byref(dims), None, None, None)
    assert status == SAPA_ERR_DRIVER and "cuStreamGetCtx failed" in L.error()
    ctx1_new = L.retain(1)
    assert ctx1_new.value == ctx1.value  # same handle, new context
    loads = L.emu.emu_module_loads(1)
    got, want = _forward(L, L.emu.emu_stream_create(ctx1_new), seed=3)
    _assert_close(got, want)
    assert L.emu.emu_module_loads(1) == loads + 1
    assert L.current() == ctx0.value and L.emu.emu_context_depth() == 1


def test_set_device_rejects_a_negative_ordinal_and_reports_a_missing_device(launcher):
    L = launcher
    assert L.lib.sapa_set_device(-1) == SAPA_ERR_INVALID
    assert "ordinal=-1" in L.error()
    L.check(L.lib.sapa_set_device(3))  # only one device: the launch says so
    dims = SapaDims(1, 2, 2, 2, 3, 4, 4)
    assert L.lib.sapa_dot(None, 0, ctypes.byref(dims), None, None, None) == SAPA_ERR_DRIVER
    assert "cuDeviceGet(3)" in L.error()


# ---------------------------------------------------------------------------------------
# Launch configurations and the self-test


def _choices(L, dtype):
    """(kernel, block, smem) of every launch the entry points choose over a sweep wider
    than the launcher's list (up 1..10, K 1..31, and the untiled switch), read from
    sapa_last_launch after zero-batch calls (nothing runs)."""
    chosen = set()
    name = ctypes.create_string_buffer(64)
    block, smem = ctypes.c_int(), ctypes.c_int()
    scratch = np.zeros(8)
    dummy = [_ptr(scratch)] * 5  # never read: a zero batch launches nothing
    for untiled in (0, 1):
        L.lib.sapa_set_untiled(untiled)
        for up in range(1, TILED_MAX_UP + 3):
            for k in range(1, 32, 2):
                dims = SapaDims(0, 4, 4, up, k, 8, 8)
                for op, n in OPS.items():
                    L.check(
                        getattr(L.lib, op)(None, DTYPES[dtype], ctypes.byref(dims), *dummy[:n])
                    )
                    L.lib.sapa_last_launch(name, 64, None, ctypes.byref(block), ctypes.byref(smem))
                    chosen.add((name.value.decode(), block.value, smem.value))
                    if up > TILED_MAX_UP or untiled:
                        assert name.value.endswith(b"_any"), (op, up, k, name.value)
    L.lib.sapa_set_untiled(0)
    return chosen


def _deform_choices(L, dtype):
    """(kernel, tile, block) of the fused SAPA-D launches over G*P = 1..300 (zero-batch
    calls): the forward's, and the last of the backward's (the value's scatter, or the cast into
    the value's gradient for f16/bf16). The tile is read back from the shared memory,
    G*P * (7 accumulators + 2 ints) per output point."""
    chosen = set()
    name = ctypes.create_string_buffer(64)
    block, smem = ctypes.c_int(), ctypes.c_int()
    scratch = np.zeros(8)
    dummy = [_ptr(scratch)] * 11
    per_point = 7 * ACC_SIZE[dtype] + 8
    for gp in range(1, 301):
        groups = 2 if gp % 2 == 0 else 1
        dims = SapaDeformDims(0, 3, 4, 2, gp // groups, groups, 2 * groups, 3 * groups)
        for op in FUSED_DEFORM_OPS:
            n = DEFORM_OPS[op]
            L.check(getattr(L.lib, op)(None, DTYPES[dtype], ctypes.byref(dims), *dummy[:n]))
            L.lib.sapa_last_launch(name, 64, None, ctypes.byref(block), ctypes.byref(smem))
            chosen.add((name.value.decode(), smem.value // (gp * per_point), block.value))
    return chosen


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_launch_configs_are_every_choice(launcher, dtype):
    """sapa_launch_configs lists exactly what the entry points choose over a wider sweep,
    each (kernel, tile, up, K) once, the tiled dot/fused/dsoftmax for K 3, 5, 7 included;
    and SAPA-D's kernels with every power-of-two tile up to 256."""
    L = launcher
    configs = L.configs(dtype)
    assert len({(c[0], c[1], c[4], c[5]) for c in configs}) == len(configs)
    sapa = [c for c in configs if not c[0].startswith("sapa_deform_")]
    assert _choices(L, dtype) == {(name, block, smem) for name, _, block, smem, _, _ in sapa}
    short = ("f32", "f16", "bf16", "f64")[DTYPES[dtype]]
    tiled = {c[0] for c in configs if c[1] > 0}
    assert tiled >= {
        f"sapa_{op}_{short}_k{k}" for op in ("dot", "fused", "dsoftmax") for k in (3, 5, 7)
    }
    deform = {(c[0], c[1], c[2]) for c in configs if c[0].startswith("sapa_deform_")}
    assert _deform_choices(L, dtype) <= deform
    scatter = f"sapa_deform_scatter_{short}" + ("_wacc" if short in ("f16", "bf16") else "")
    for kernel in (f"sapa_deform_forward_{short}", f"sapa_deform_backward_{short}", scatter):
        assert {(t, b) for k, t, b in deform if k == kernel} == {(2**i, 256) for i in range(9)}


SELF_TEST_PER_TILE = 256


@pytest.mark.parametrize(
    "dtype,per_tile",
    [
        ("float32", False),
        ("float16", True),
        ("bfloat16", True),
        ("float64", True),
        *(
            pytest.param(d, False, marks=pytest.mark.benchmark)
            for d in ("float16", "bfloat16", "float64")
        ),
    ],
)
def test_self_test_runs_every_configuration_and_passes(launcher, dtype, per_tile, tmp_path):
    """The self-test runs every configuration through the real kernels, and they agree
    with its CPU reference; the emulated driver's log shows what actually ran. float32:
    every (kernel, tile, up, K) (177 configurations, about 30 s in emulation); the
    others every (kernel, tile) once, and every configuration with `-m benchmark`
    (about a minute each)."""
    from keras_sapa.ops import _gpu_check

    L = launcher
    configs = L.configs(dtype)
    L.emu.emu_log_clear()
    # Through the Python side (ctypes: sapa_load_image_dir, sapa_set_device(0),
    # sapa_self_test), as a framework's first use calls it.
    cases, problem = _gpu_check.self_test(
        _image_dir(tmp_path),
        library=L.lib_path,
        driver=L.driver_path,
        dtypes=(dtype,),
        per_tile=per_tile,
    )
    assert problem is None
    log = L.log()
    # SAPA: one launch per case, then sapa_backward's two cases (tiled, untiled) of four
    # launches each; SAPA-D: a forward and a backward case per tile, the backward
    # launching the backward kernel, then zero/scatter[/cast] for key and value.
    sapa = [entry for entry in log if not entry[0].startswith("sapa_deform_")]
    sapa, backward = sapa[:-8], [entry[0] for entry in sapa[-8:]]
    kinds = [name.split("_")[1] for name in backward]
    assert kinds == ["dsoftmax", "gather", "scatter", "scatter"] * 2, backward
    assert not backward[0].endswith("_any") and all(n.endswith("_any") for n in backward[4:])
    deform_tiles = {tile for name, _, _, _, tile in log if "deform_forward" in name}
    per_backward = 7 if dtype in ("float16", "bfloat16") else 5
    assert len(deform_tiles) == 9
    assert len(log) - len(sapa) - len(backward) == len(deform_tiles) * (1 + per_backward)
    assert cases == len(sapa) + 2 + 2 * len(deform_tiles)
    if per_tile:
        ran = {(name, tile) for name, _, _, _, tile in log}
        assert ran == {(name, tile) for name, tile, _, _, _, _ in configs}
    else:
        assert len(sapa) == len([c for c in configs if not c[0].startswith("sapa_deform_")])
        ran = {(name, tile, block, smem) for name, block, smem, _, tile in log}
        assert ran == {(name, tile, block, smem) for name, tile, block, smem, _, _ in configs}


@pytest.mark.parametrize(
    "kernel,reported",
    [
        ("sapa_scatter_f32", "sapa_scatter_f32"),
        ("sapa_deform_scatter_bf16_wacc", "sapa_deform_backward_bf16+"),
    ],
)
def test_self_test_reports_a_wrong_kernel(launcher, kernel, reported):
    L = launcher
    dtype = "bfloat16" if "bf16" in kernel else "float32"
    victim = next(c for c in L.configs(dtype) if c[0] == kernel and c[1] > 0)
    L.emu.emu_corrupt(victim[0].encode())
    cases = ctypes.c_int()
    flags = (1 << DTYPES[dtype]) | SELF_TEST_PER_TILE
    status = L.lib.sapa_self_test(None, flags, ctypes.byref(cases))
    assert status == SAPA_ERR_MISMATCH, L.error()
    assert reported in L.error() and kernel in L.error(), L.error()
    assert f"(tile {victim[1]}, block {victim[2]}" in L.error(), L.error()
    assert ", case B=2 " in L.error() and "CPU reference" in L.error()
    L.emu.emu_corrupt(None)
    assert L.lib.sapa_self_test(None, 16, ctypes.byref(cases)) == SAPA_ERR_INVALID
    assert "flags=16" in L.error()


# ---------------------------------------------------------------------------------------
# SAPA-D


def _storage(x, dtype):
    """float64 values -> the device storage of dtype (bfloat16: the top 16 bits of the
    float32, rounded to nearest even); and back to float64."""
    if dtype != "bfloat16":
        stored = np.ascontiguousarray(x, {"float16": np.float16}.get(dtype, dtype))
        return stored, stored.astype(np.float64)
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    stored = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return stored, (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_deform_entry_points_match_the_reference(launcher, dtype):
    """sapa_deform_forward and sapa_deform_backward (the kernels the TensorFlow GPU op
    launches) on the emulated GPU against tests/reference_deform.py: output, weights and
    the gradients of query, key, value and offsets; G=2, P=3, s=3, odd channel counts,
    offsets that drop points near the border."""
    L = launcher
    batch, height, width, up, points, groups, embed, cg = 2, 3, 4, 3, 3, 2, 3, 5
    rng = np.random.default_rng(20)
    high = (batch, up * height, up * width)
    raw = [
        rng.standard_normal(high + (groups * embed,)) * 0.5,
        rng.standard_normal((batch, height, width, groups * embed)) * 0.5,
        rng.standard_normal((batch, height, width, groups * cg)),
        reference_deform.offsets_away_from_integers(
            rng, high + (2 * groups * points,), spread=2.5, margin=0.1
        ),
        rng.standard_normal(high + (groups * cg,)),
    ]
    stored, seen = zip(*(_storage(x, dtype) for x in raw), strict=True)
    acc = np.float64 if dtype == "float64" else np.float32
    dims = SapaDeformDims(batch, height, width, up, points, groups, groups * embed, groups * cg)
    q, k, v, off, grad = stored
    nan = 0x7FFF if dtype == "bfloat16" else np.nan  # unwritten elements fail
    out = np.full_like(grad, nan)
    attn = np.full(high + (groups * points,), np.nan, acc)
    L.check(
        L.lib.sapa_deform_forward(
            None, DTYPES[dtype], ctypes.byref(dims), *map(_ptr, (q, k, v, off, out, attn))
        )
    )
    size = ctypes.c_size_t()
    L.check(L.lib.sapa_deform_workspace(DTYPES[dtype], ctypes.byref(dims), ctypes.byref(size)))
    workspace = np.full(size.value // 8 + 32, np.nan)
    grads = [np.full_like(a, nan) for a in (q, k, v, off)]
    L.check(
        L.lib.sapa_deform_backward(
            None,
            DTYPES[dtype],
            ctypes.byref(dims),
            *map(_ptr, (grad, q, k, v, off, attn, workspace, *grads)),
        )
    )
    args = (points, up, groups)
    logits = reference_deform.deform_similarity(seen[0], seen[1], seen[3], *args)
    want = [
        reference_deform.sapa_deform(*seen[:4], *args),
        reference_deform.group_softmax(logits, groups),
        *reference_deform.sapa_deform_vjp(*seen, *args),
    ]
    got = [_storage_back(a, dtype) for a in (out, attn, *grads)]
    tol = {"float64": 1e-10, "float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
    names = ("output", "weights", "grad_query", "grad_key", "grad_value", "grad_offsets")
    for name, a, b in zip(names, got, want, strict=True):
        assert np.isfinite(a).all(), name
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)
    assert L.current() is None  # the launcher popped the context it pushed


def _storage_back(stored, dtype):
    if dtype == "bfloat16" and stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deform_halves_match_the_reference(launcher, dtype):
    """SAPA-D's halves (sapa_deform_similarity / _aggregate and their backwards, which the
    GPU ops of DeformSimilarity / DeformAggregate launch) on the emulated GPU against
    tests/reference_deform.py: forward and the gradients of all three inputs; G=2, P=3,
    s=2, offsets that drop points near the border. Other dtypes are refused."""
    L = launcher
    batch, height, width, up, points, groups, embed, cg = 2, 3, 4, 2, 3, 2, 3, 5
    rng = np.random.default_rng(21)
    high = (batch, up * height, up * width)
    low = (batch, height, width)
    f = lambda *shape: np.ascontiguousarray(rng.standard_normal(shape), dtype)  # noqa: E731
    off = reference_deform.offsets_away_from_integers(
        rng, high + (2 * groups * points,), spread=2.5, margin=0.1
    ).astype(dtype)
    cases = [  # (entry point, sizes' dim and channels, inputs, reference, reference VJP)
        (
            "sapa_deform_similarity",
            (groups * embed, 0),
            [f(*high, groups * embed), f(*low, groups * embed), off],
            reference_deform.deform_similarity,
            reference_deform.deform_similarity_vjp,
        ),
        (
            "sapa_deform_aggregate",
            (0, groups * cg),
            [f(*high, groups * points), f(*low, groups * cg), off],
            reference_deform.deform_aggregate,
            reference_deform.deform_aggregate_vjp,
        ),
    ]
    tol = {"float64": 1e-10, "float32": 1e-4}[dtype]
    args = (points, up, groups)
    for name, (dim, channels), inputs, forward, reference_vjp in cases:
        dims = SapaDeformDims(batch, height, width, up, points, groups, dim, channels)
        want = forward(*inputs, *args)
        out = np.full(want.shape, np.nan, dtype)  # unwritten elements fail
        fn = getattr(L.lib, name)
        L.check(fn(None, DTYPES[dtype], ctypes.byref(dims), *map(_ptr, (*inputs, out))))
        grad = f(*want.shape)
        grads = [np.full_like(a, np.nan) for a in inputs]
        backward = getattr(L.lib, name + "_backward")
        L.check(
            backward(None, DTYPES[dtype], ctypes.byref(dims), *map(_ptr, (grad, *inputs, *grads)))
        )
        expected = reference_vjp(*inputs, grad, *args)
        for index, (a, b) in enumerate(zip((out, *grads), (want, *expected), strict=True)):
            assert np.isfinite(a).all(), (name, index)
            scale = max(1.0, float(np.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=f"{name} {index}")
        status = fn(None, DTYPES["float16"], ctypes.byref(dims), *map(_ptr, (*inputs, out)))
        assert status == SAPA_ERR_INVALID and "float32 or float64" in L.error(), L.error()
    assert L.current() is None  # the launcher popped the context it pushed


def test_core_deform_halves_run_on_the_launcher(launcher):
    """The kernel core's CUDA entry points of SAPA-D's halves
    (keras_sapa_deform_similarity_cuda, ..., which the JAX CUDA handlers and the PyTorch
    CUDA implementations call) through this launcher on the emulated GPU, with the op
    table's size rule (_native.core_sizes), against tests/reference_deform.py (float64)."""
    from keras_sapa.ops import _native
    from keras_sapa.ops import _optable

    lib = _native.core.get()
    if lib is None or _native.entry_point(lib, _optable.op("DeformSimilarity"), "cuda") is None:
        pytest.skip("the core library has no CUDA entry points for SAPA-D's halves")
    assert lib.keras_sapa_cuda_open(launcher.lib_path.encode(), None) == 0
    rng = np.random.default_rng(22)
    points, up, groups = 2, 2, 2
    high, low = (1, 4, 6), (1, 2, 3)
    off = reference_deform.offsets_away_from_integers(rng, high + (2 * groups * points,))
    cases = {
        "DeformSimilarity": ([rng.normal(size=high + (4,)), rng.normal(size=low + (4,)), off],)
        + (reference_deform.deform_similarity, reference_deform.deform_similarity_vjp),
        "DeformAggregate": ([rng.normal(size=high + (4,)), rng.normal(size=low + (6,)), off],)
        + (reference_deform.deform_aggregate, reference_deform.deform_aggregate_vjp),
    }
    attrs = {"num_points": points, "up_factor": up, "groups": groups}
    for name, (inputs, forward, reference_vjp) in cases.items():
        want = forward(*inputs, points, up, groups)
        grad = rng.normal(size=want.shape)
        expected = (want, *reference_vjp(*inputs, grad, points, up, groups))
        got = [np.full_like(want, np.nan)] + [np.full_like(a, np.nan) for a in inputs]
        sizes = _native.core_sizes(_optable.op(name), [a.shape for a in inputs], attrs)
        for op, tensors in ((name, (*inputs, got[0])), (name + "Grad", (grad, *inputs, *got[1:]))):
            pointers = [np.ascontiguousarray(a).ctypes.data for a in tensors]
            _native.call_cuda(lib, _optable.op(op), None, DTYPES["float64"], pointers, sizes)
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"{name} {index}")


def test_deform_rejects_bad_sizes(launcher):
    L = launcher
    size = ctypes.c_size_t()
    bad = [
        (SapaDeformDims(1, 2, 2, 2, 3, 2, 5, 4), "dim=5, channels=4, groups=2"),
        (SapaDeformDims(1, 2, 2, 0, 3, 2, 4, 4), "up, points and groups must be >= 1"),
        (SapaDeformDims(1, 2**31, 2, 2, 3, 2, 4, 4), "height=2147483648"),
    ]
    for dims, message in bad:
        status = L.lib.sapa_deform_workspace(0, ctypes.byref(dims), ctypes.byref(size))
        assert status == SAPA_ERR_INVALID and message in L.error(), L.error()
    dims = SapaDeformDims(0, 2, 2, 2, 800, 1, 4, 4)  # 800 points: too much shared memory
    status = L.lib.sapa_deform_forward(None, 3, ctypes.byref(dims), *[None] * 6)
    assert status == SAPA_ERR_INVALID and "groups*num_points=800" in L.error(), L.error()


# ---------------------------------------------------------------------------------------
# SAPA's fused backward (sapa_backward)


def _backward_entry_points(L):
    L.lib.sapa_backward.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(SapaDims)] + [
        ctypes.c_void_p
    ] * 9
    L.lib.sapa_backward_workspace.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(SapaDims),
        ctypes.POINTER(ctypes.c_size_t),
    ]


@pytest.mark.parametrize(
    "dtype,untiled",
    [("float32", 0), ("float32", 1), ("float16", 0), ("bfloat16", 0), ("float64", 0)],
)
def test_backward_entry_point_matches_the_reference(launcher, dtype, untiled):
    """sapa_backward (what the TensorFlow GPU op and the JAX/PyTorch CUDA bindings call)
    on the emulated GPU, from sapa_forward's weights, against tests/reference.py's
    sapa_vjp: the gradients of query, key and value; query/key and value of different
    odd widths, K=5, s=3, on the tiled kernels and on the untiled ones. Its four launches
    are the logits' gradient, the gather and the two scatters; its scratch is
    sapa_backward_workspace bytes."""
    L = launcher
    _backward_entry_points(L)
    L.lib.sapa_set_untiled(untiled)
    batch, height, width, up, k, d, c = 2, 3, 4, 3, 5, 7, 9
    rng = np.random.default_rng(21)
    high, low = (batch, up * height, up * width), (batch, height, width)
    raw = [
        rng.standard_normal(high + (d,)) * 0.5,
        rng.standard_normal(low + (d,)) * 0.5,
        rng.standard_normal(low + (c,)),
        rng.standard_normal(high + (c,)),
    ]
    stored, seen = zip(*(_storage(x, dtype) for x in raw), strict=True)
    q, key, v, grad = stored
    acc = np.float64 if dtype == "float64" else np.float32
    dims = SapaDims(batch, height, width, up, k, d, c)
    nan = 0x7FFF if dtype == "bfloat16" else np.nan  # unwritten elements fail
    out = np.full_like(grad, nan)
    attn = np.full(high + (k * k,), np.nan, acc)
    L.check(
        L.lib.sapa_forward(
            None, DTYPES[dtype], ctypes.byref(dims), *map(_ptr, (q, key, v, out, attn))
        )
    )
    size = ctypes.c_size_t()
    L.check(L.lib.sapa_backward_workspace(DTYPES[dtype], ctypes.byref(dims), ctypes.byref(size)))
    assert size.value == attn.nbytes
    dlogits = np.full(size.value // 4, np.nan, np.float32)
    grads = [np.full_like(a, nan) for a in (q, key, v)]
    L.emu.emu_log_clear()
    L.check(
        L.lib.sapa_backward(
            None,
            DTYPES[dtype],
            ctypes.byref(dims),
            *map(_ptr, (grad, q, key, v, attn, dlogits, *grads)),
        )
    )
    L.lib.sapa_set_untiled(0)
    short = ("f32", "f16", "bf16", "f64")[DTYPES[dtype]]
    acc_weights = "_wacc" if short in ("f16", "bf16") else ""
    any_ = "_any" if untiled else ""
    assert [entry[0] for entry in L.log()] == [
        f"sapa_dsoftmax_{short}_{'any' if untiled else f'k{k}'}",
        f"sapa_gather_{short}{acc_weights}{any_}",
        f"sapa_scatter_{short}{acc_weights}{any_}",
        f"sapa_scatter_{short}{acc_weights}{any_}",
    ]
    want = reference.sapa_vjp(seen[0], seen[1], seen[2], seen[3], k, up)
    tol = {"float64": 1e-10, "float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
    for name, got, expected in zip(
        ("grad_query", "grad_key", "grad_value"), grads, want, strict=True
    ):
        got = _storage_back(got, dtype)
        assert np.isfinite(got).all(), name
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale, err_msg=name)
    assert L.current() is None  # the launcher popped the contexts it pushed


def test_backward_rejects_bad_arguments(launcher):
    """sapa_backward and its workspace: a clear SAPA_ERR_INVALID for bad sizes and a
    missing scratch, nothing launched."""
    L = launcher
    _backward_entry_points(L)
    size = ctypes.c_size_t(7)
    even = SapaDims(1, 2, 2, 2, 4, 3, 3)
    assert L.lib.sapa_backward_workspace(0, ctypes.byref(even), ctypes.byref(size)) == (
        SAPA_ERR_INVALID
    )
    assert "kernel odd" in L.error() and size.value == 0
    dims = SapaDims(1, 2, 2, 2, 3, 3, 3)
    assert L.lib.sapa_backward_workspace(9, ctypes.byref(dims), ctypes.byref(size)) == (
        SAPA_ERR_INVALID
    )
    assert "dtype=9" in L.error()
    L.check(L.lib.sapa_backward_workspace(3, ctypes.byref(dims), ctypes.byref(size)))
    assert size.value == 1 * 4 * 4 * 9 * 8  # (B, sH, sW, K*K) float64
    scratch = np.zeros(8)
    args = [_ptr(scratch)] * 9
    args[5] = None  # dlogits
    L.emu.emu_log_clear()
    assert L.lib.sapa_backward(None, 0, ctypes.byref(dims), *args) == SAPA_ERR_INVALID
    assert "sapa_backward needs a dlogits buffer" in L.error()
    assert L.log() == []


def test_the_op_tables_launcher_entry_points_exist(launcher_build):
    """Every launcher entry point the op table names (keras_sapa/ops/_optable.py,
    ``Bindings.launcher``) for an op with GPU kernels is exported by the launcher: the
    fused SAPA pair's sapa_forward / sapa_backward and SAPA-D's."""
    from keras_sapa.ops import _optable

    lib = ctypes.CDLL(launcher_build)
    names = {op.bindings.launcher for op in _optable.OPS if "gpu" in op.devices}
    names.discard(None)
    assert {"sapa_forward", "sapa_backward"} <= names
    for name in sorted(names):
        assert hasattr(lib, name), name


# ---------------------------------------------------------------------------------------
# The Python side of the self-test (keras_sapa/ops/_gpu_check.py)


def _image_dir(tmp_path):
    """A kernel image directory for the emulated driver (which ignores the bytes)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "sapa_kernels.sm_80.cubin").write_bytes(b"\x7fELF emulated sm_80")
    return str(images)


def test_python_self_test_names_the_failure(launcher, tmp_path):
    """A kernel that disagrees fails _gpu_check's self-test by name (its passing path is
    test_self_test_runs_every_configuration_and_passes); a missing launcher or missing
    images say so. (Each caller warns once and falls back: TensorFlow below, JAX and
    PyTorch through _native's CUDA Library.)"""
    from keras_sapa.ops import _gpu_check

    L = launcher
    kwargs = {"library": L.lib_path, "driver": L.driver_path, "dtypes": ("float64",)}
    images = _image_dir(tmp_path)
    L.emu.emu_corrupt(b"sapa_deform_forward_f64")  # the first configuration
    try:
        _, problem = _gpu_check.self_test(images, **kwargs)
        assert problem is not None and "sapa_deform_forward_f64" in problem, problem
    finally:
        L.emu.emu_corrupt(None)
    missing = str(tmp_path / "nowhere" / "libsapa_launcher.so")
    assert _gpu_check.self_test(images, library=missing) == (
        0,
        f"no launcher at {missing} (build it with `python custom_ops/build.py`)",
    )
    (tmp_path / "empty").mkdir()
    problem = _gpu_check.self_test(str(tmp_path / "empty"), library=L.lib_path)[1]
    assert problem.startswith("no kernel images (sapa_kernels.*.cubin/ptx) in "), problem


def test_tensorflow_falls_back_when_the_gpu_self_test_fails(launcher, tmp_path, monkeypatch):
    """TensorFlow's first use with a GPU library loaded: the launcher's self-test (here
    on the emulated GPU, a kernel corrupted) fails, so the compiled library is refused
    with one warning naming the kernel, and the ops fall back to the builtin path."""
    pytest.importorskip("tensorflow")
    from keras_sapa.ops import _gpu_check
    from keras_sapa.ops import _tf_kernels

    if not os.path.isfile(_tf_kernels.library_path()):
        pytest.skip("the TensorFlow library is not built")
    L = launcher
    images = _image_dir(tmp_path)
    real = _gpu_check.self_test

    def emulated(lib_dir):
        assert lib_dir == os.path.dirname(_tf_kernels.library_path())
        return real(images, library=L.lib_path, driver=L.driver_path, dtypes=("float32",))

    monkeypatch.delenv("KERAS_SAPA_DISABLE_COMPILED", raising=False)
    monkeypatch.setattr(_tf_kernels, "_try_load_gpu", lambda lib_path: "loaded")
    monkeypatch.setattr(_gpu_check, "self_test", emulated)
    L.emu.emu_corrupt(b"sapa_deform_forward_f32")  # the first configuration
    _tf_kernels._reset()
    try:
        with pytest.warns(RuntimeWarning, match="sapa_deform_forward_f32") as caught:
            assert _tf_kernels.load_library() is None
            assert not _tf_kernels.available()
        assert len(caught) == 1
        assert "first-use check" in _tf_kernels.unavailable_reason()
        assert not _tf_kernels.gpu_op_usable()
    finally:
        L.emu.emu_corrupt(None)
        monkeypatch.undo()
        _tf_kernels._reset()


# ---------------------------------------------------------------------------------------
# glibc


def _glibc_versions(path):
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed: cannot read symbol versions")
    text = subprocess.run(
        ["objdump", "-T", path], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in text.splitlines():
        m = re.search(r"\(?GLIBC_(\d+)\.(\d+)(?:\.\d+)?\)?\s+(\S+)$", line)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), []).append(m.group(3))
    assert found, text[:2000]
    return found


def _assert_old_glibc(path):
    versions = _glibc_versions(path)
    too_new = {f"GLIBC_{a}.{b}": names for (a, b), names in versions.items() if (a, b) > MAX_GLIBC}
    assert not too_new, f"{path} needs a glibc newer than 2.28: {too_new}"
    needed = subprocess.run(
        ["readelf", "-d", path], capture_output=True, text=True, check=True
    ).stdout
    # Before glibc 2.34 the original dl*/pthread symbols live in these two libraries.
    assert "libdl.so.2" in needed and "libpthread.so.0" in needed, needed


def test_launcher_needs_no_glibc_newer_than_2_28(launcher_build):
    _assert_old_glibc(launcher_build)


def test_the_build_scripts_launcher_is_linked_like_this_one(monkeypatch):
    """custom_ops/build.py builds the launcher with LAUNCHER_FLAGS (whose build the test
    above checks for glibc 2.28; -Wall -Werror aside), the libraries after the source:
    its command, captured instead of run."""
    build = _load("keras_sapa_build_for_glibc", os.path.join(ROOT, "custom_ops", "build.py"))
    commands = []
    monkeypatch.setattr(build, "_run", lambda command, *args: commands.append(command))
    target = build.build_launcher("g++", False)
    (command,) = commands
    source = os.path.join(LAUNCHER_DIR, "sapa_launcher.cc")
    assert command[0] == "g++" and command.count(source) == 1
    assert command[command.index("-o") + 1] == target
    flags = [f for f in command[1:] if f not in (source, "-o", target)]
    assert flags == [f for f in LAUNCHER_FLAGS if f not in ("-Wall", "-Werror")]
    assert all(command.index(source) < command.index(f) for f in flags if f.startswith("-l"))
