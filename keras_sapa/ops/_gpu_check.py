"""The GPU kernels' first-use self-test, for every backend (imports no framework).

:func:`self_test` loads the framework-free CUDA launcher
(``keras_sapa/_lib/libsapa_launcher.so``) through ctypes, registers the kernel images
beside it and calls its ``sapa_self_test``: every launch configuration the launcher can
choose on the GPU (each kernel and tile of SAPA and SAPA-D, forward and backward, every
dtype), and SAPA's fused backward entry point ``sapa_backward`` on the tiled and on the
untiled kernels, runs on a small case and is compared with a float64 CPU reference inside
the library. It returns ``(cases, None)`` when all agree, else ``(cases, why)`` with the
launcher's ``sapa_last_error()``.

:mod:`._tf_kernels` runs it at the first use of TensorFlow's GPU op, and
:mod:`._native` when it first opens the launcher for the JAX and PyTorch CUDA bindings;
each caller gives one warning and falls back when it fails.
"""

import ctypes
import os

LAUNCHER_LIBRARY = "libsapa_launcher.so"
SAPA_OK = 0
SELF_TEST_PER_TILE = 256  # SAPA_SELF_TEST_PER_TILE of sapa_launcher.h
DTYPE_FLAGS = {"float32": 1, "float16": 2, "bfloat16": 4, "float64": 8}  # 1 << SapaDtype


def _declare(lib):
    lib.sapa_last_error.restype = ctypes.c_char_p
    lib.sapa_init.argtypes = [ctypes.c_char_p]
    lib.sapa_load_image_dir.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.sapa_set_device.argtypes = [ctypes.c_int]
    lib.sapa_self_test.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]


def self_test(lib_dir, *, library=None, driver=None, device=0, dtypes=None, per_tile=False):
    """Runs the launcher's ``sapa_self_test`` on GPU ``device`` (an ordinal) with the
    kernel images of ``lib_dir`` (the loaders pass ``keras_sapa/_lib``; taking it as an
    argument keeps this module free of imports from them); returns ``(cases, None)``
    when every configuration agrees with the CPU reference, else ``(cases, why)``.

    ``library``: the launcher to load (default ``lib_dir/libsapa_launcher.so``);
    ``driver``: the libcuda to open (default ``libcuda.so.1``); ``dtypes``: a subset of
    ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"`` (default all);
    ``per_tile``: each (kernel, tile) once instead of every configuration."""
    path = library or os.path.join(lib_dir, LAUNCHER_LIBRARY)
    if not os.path.isfile(path):
        return 0, f"no launcher at {path} (build it with `python custom_ops/build.py`)"
    try:
        lib = ctypes.CDLL(os.path.realpath(path))
    except OSError as exc:
        return 0, f"loading {path} failed: {exc}"
    _declare(lib)

    def failed(what, status, cases=0):
        error = lib.sapa_last_error().decode(errors="replace")
        return cases, f"{what} failed (launcher status {status}): {error}"

    if driver is not None:
        status = lib.sapa_init(os.fsencode(driver))
        if status != SAPA_OK:
            return failed("opening the driver", status)
    count = ctypes.c_int()
    status = lib.sapa_load_image_dir(os.fsencode(lib_dir), ctypes.byref(count))
    if status != SAPA_OK:
        return failed("loading the kernel images", status)
    if count.value == 0:
        return 0, f"no kernel images (sapa_kernels.*.cubin/ptx) in {lib_dir}"
    status = lib.sapa_set_device(int(device))  # this thread's device for the NULL stream
    if status != SAPA_OK:
        return failed(f"choosing GPU {device}", status)
    flags = sum(DTYPE_FLAGS[d] for d in dtypes or ()) | (SELF_TEST_PER_TILE if per_tile else 0)
    cases = ctypes.c_int()
    status = lib.sapa_self_test(None, flags, ctypes.byref(cases))
    if status != SAPA_OK:
        return failed(
            f"the GPU self-test (after {cases.value} passing cases)", status, cases.value
        )
    return cases.value, None
