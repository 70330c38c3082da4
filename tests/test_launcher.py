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
  independent sweep over up and K), the self-test runs every one of them for every dtype
  and passes, and it reports a corrupted kernel by name.
- glibc: the built library needs no symbol version newer than GLIBC_2.28.

Built libraries are cached under the temporary directory by a hash of their sources and
build commands, so only the first run compiles (about a minute on 2 cores).
"""

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np
import pytest

import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_DIR = os.path.join(ROOT, "custom_ops", "sapa", "launcher")
TESTING_DIR = os.path.join(LAUNCHER_DIR, "testing")
KERNEL_DIR = os.path.join(ROOT, "custom_ops", "sapa", "kernels", "cuda")

# The launcher's link for glibc 2.28 (custom_ops/build.py's build_launcher must match;
# the last test checks it): static libstdc++, the system's libgcc_s (a static libgcc
# needs glibc 2.35's _dl_find_object), and libdl/libpthread named so that the original
# dl*/pthread symbols, which live there before glibc 2.34, are found on old systems.
LAUNCHER_FLAGS = [
    "-shared",
    "-fPIC",
    "-O2",
    "-std=c++17",
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


class SapaDims(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int64)
        for n in ("batch", "height", "width", "up", "kernel", "channels", "channels_v")
    ]


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


def _cached_build(name, compiler, sources, inputs, flags):
    """Builds `sources` into a cached shared library; returns its path."""
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler} to build {name}")
    key = _digest(inputs, [compiler, *flags])
    cache = os.path.join(tempfile.gettempdir(), "keras_sapa_test_launcher")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"{name}-{key}.so")
    if not os.path.isfile(path):
        partial = f"{path}.{os.getpid()}.tmp"
        # Sources first: -l options only resolve symbols of what precedes them.
        subprocess.run([compiler, *sources, "-o", partial, *flags], check=True)
        os.replace(partial, path)
    return path


def _files(directory, pattern):
    return [os.path.join(directory, n) for n in os.listdir(directory) if re.search(pattern, n)]


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
        *_files(KERNEL_DIR, r"^sapa_kernels\.cuh?$"),
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
        self.emu = ctypes.CDLL(driver_path)  # the instance the launcher dlopens
        self.lib = ctypes.CDLL(lib_path)
        self.lib.sapa_last_error.restype = ctypes.c_char_p
        self.emu.emu_stream_create.restype = ctypes.c_void_p
        self.emu.emu_stream_create.argtypes = [ctypes.c_void_p]
        self.emu.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        self.emu.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        for name, n in OPS.items():
            getattr(self.lib, name).argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.POINTER(SapaDims),
            ] + [ctypes.c_void_p] * n
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


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_launch_configs_are_every_choice(launcher, dtype):
    """sapa_launch_configs lists exactly what the entry points choose over a wider sweep,
    each (kernel, tile, up, K) once, the tiled dot/fused/dsoftmax for K 3, 5, 7 included."""
    L = launcher
    configs = L.configs(dtype)
    assert len({(c[0], c[1], c[4], c[5]) for c in configs}) == len(configs)
    assert _choices(L, dtype) == {(name, block, smem) for name, _, block, smem, _, _ in configs}
    short = ("f32", "f16", "bf16", "f64")[DTYPES[dtype]]
    tiled = {c[0] for c in configs if c[1] > 0}
    assert tiled >= {
        f"sapa_{op}_{short}_k{k}" for op in ("dot", "fused", "dsoftmax") for k in (3, 5, 7)
    }


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
def test_self_test_runs_every_configuration_and_passes(launcher, dtype, per_tile):
    """The self-test runs every configuration through the real kernels, and they agree
    with its CPU reference; the emulated driver's log shows what actually ran. float32:
    every (kernel, tile, up, K) (177 configurations, about 30 s in emulation); the
    others every (kernel, tile) once, and every configuration with `-m benchmark`
    (about a minute each)."""
    L = launcher
    configs = L.configs(dtype)
    L.emu.emu_log_clear()
    cases = ctypes.c_int()
    flags = (1 << DTYPES[dtype]) | (SELF_TEST_PER_TILE if per_tile else 0)
    L.check(L.lib.sapa_self_test(None, flags, ctypes.byref(cases)))
    log = L.log()
    assert cases.value == len(log)
    if per_tile:
        ran = {(name, tile) for name, _, _, _, tile in log}
        assert ran == {(name, tile) for name, tile, _, _, _, _ in configs}
    else:
        assert cases.value == len(configs)
        ran = {(name, tile, block, smem) for name, block, smem, _, tile in log}
        assert ran == {(name, tile, block, smem) for name, tile, block, smem, _, _ in configs}


def test_self_test_reports_a_wrong_kernel(launcher):
    L = launcher
    victim = next(c for c in L.configs("float32") if c[0] == "sapa_scatter_f32" and c[1] > 0)
    L.emu.emu_corrupt(victim[0].encode())
    cases = ctypes.c_int()
    flags = (1 << DTYPES["float32"]) | SELF_TEST_PER_TILE
    status = L.lib.sapa_self_test(None, flags, ctypes.byref(cases))
    assert status == SAPA_ERR_MISMATCH, L.error()
    assert f"sapa_scatter_f32 (tile {victim[1]}, block {victim[2]}" in L.error()
    assert " f32, case B=2 " in L.error() and "CPU reference" in L.error()
    L.emu.emu_corrupt(None)
    assert L.lib.sapa_self_test(None, 16, ctypes.byref(cases)) == SAPA_ERR_INVALID
    assert "flags=16" in L.error()


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


def test_the_build_scripts_launcher_needs_no_glibc_newer_than_2_28(tmp_path, monkeypatch):
    """custom_ops/build.py's own launcher build (into a temporary folder)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "keras_sapa_build_for_glibc", os.path.join(ROOT, "custom_ops", "build.py")
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    monkeypatch.setattr(build, "BUILD_DIR", str(tmp_path))
    _assert_old_glibc(build.build_launcher("g++", False))
