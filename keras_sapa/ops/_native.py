"""Loader of the framework-free SAPA CPU library ``_sapa_core.so`` (and its build record),
shared by the JAX and PyTorch bindings (:mod:`._jax_kernels`, :mod:`._torch_kernels`).

Built by ``custom_ops/build_bindings.py`` into ``keras_sapa/_lib/`` with
``bindings_build_info.json`` beside it. Nothing here imports a framework. Loading checks,
before any ``dlopen``: that the build record exists, that the CPU runs the instructions the
build was compiled for (``cpu_features``), and, after it, the library's C ABI version.

Environment variables:

- ``KERAS_SAPA_BINDINGS_DIR``: directory holding ``_sapa_core.so``, ``_sapa_jax.so`` and
  ``bindings_build_info.json`` instead of ``keras_sapa/_lib/``.
- ``KERAS_SAPA_DISABLE_COMPILED=1``: never load them (the pure paths run).
- ``KERAS_SAPA_NUM_THREADS``: threads of the library's pool (default: the CPUs available).
"""

import ctypes
import json
import os
import threading

ENV_DIR = "KERAS_SAPA_BINDINGS_DIR"
ENV_DISABLE = "KERAS_SAPA_DISABLE_COMPILED"
CORE_LIBRARY = "_sapa_core.so"
JAX_LIBRARY = "_sapa_jax.so"
BUILD_INFO = "bindings_build_info.json"
CORE_ABI = 1  # KERAS_SAPA_CORE_ABI of custom_ops/sapa/bindings/sapa_core_c.h

_lock = threading.RLock()
_state = {"tried": False, "core": None, "info": None, "reason": None}

_I64 = ctypes.c_int64


def library_dir():
    """Directory the bindings' libraries are loaded from."""
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lib")
    return os.environ.get(ENV_DIR) or default


def disabled():
    """True when ``KERAS_SAPA_DISABLE_COMPILED`` asks for the pure paths."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None  # unknown: not checked


def _read_info(directory):
    path = os.path.join(directory, BUILD_INFO)
    if not os.path.isfile(path):
        return None, (f"{path} is missing (build it with "
                      "`python custom_ops/build_bindings.py`)")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc!r})"
    if not isinstance(info, dict) or info.get("core_abi") != CORE_ABI:
        return None, f"{path} records another C ABI than {CORE_ABI}: rebuild"
    have = _cpu_flags()
    missing = [f for f in info.get("cpu_features") or [] if have is not None and f not in have]
    if missing:
        return None, (f"the library was built for CPU features this CPU lacks ({missing}); "
                      "rebuild it here (KERAS_SAPA_CPU_FLAGS='' gives a portable build)")
    return info, None


def _declare(lib):
    for dtype, ptr in (("f32", ctypes.c_void_p), ("f64", ctypes.c_void_p)):
        forward = getattr(lib, f"keras_sapa_forward_{dtype}")
        forward.argtypes = [ptr] * 5 + [_I64] * 7
        forward.restype = ctypes.c_int
        backward = getattr(lib, f"keras_sapa_backward_{dtype}")
        backward.argtypes = [ptr] * 8 + [_I64] * 7
        backward.restype = ctypes.c_int
    lib.keras_sapa_core_abi.restype = ctypes.c_int
    lib.keras_sapa_num_threads.restype = ctypes.c_int
    lib.keras_sapa_set_num_threads.argtypes = [ctypes.c_int]
    lib.keras_sapa_set_num_threads.restype = None


def load_core():
    """``(ctypes.CDLL, build info)`` of ``_sapa_core.so``, or ``(None, None)`` when it is
    missing, stale, disabled or broken (:func:`unavailable_reason` says why). Tried once
    per process; warnings are left to the callers."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            _state["core"], _state["info"], _state["reason"] = _try_load()
        return _state["core"], _state["info"]


def _try_load():
    if disabled():
        return None, None, f"{ENV_DISABLE} is set"
    directory = library_dir()
    info, reason = _read_info(directory)
    if info is None:
        return None, None, reason
    if not info.get("core_library"):
        return None, None, f"the core library was not built ({info.get('core_status')})"
    path = os.path.join(directory, CORE_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        _declare(lib)
        abi = lib.keras_sapa_core_abi()
    except (OSError, AttributeError) as exc:
        return None, None, f"{path} failed to load ({exc})"
    if abi != CORE_ABI:
        return None, None, f"{path} has C ABI {abi}, this package needs {CORE_ABI}: rebuild"
    return lib, info, None


def unavailable_reason():
    """Why :func:`load_core` returned None (None when it loaded or was not tried)."""
    return _state["reason"]


def _reset():
    """Forgets the load attempt (tests only; a loaded library stays mapped)."""
    with _lock:
        _state.update(tried=False, core=None, info=None, reason=None)
