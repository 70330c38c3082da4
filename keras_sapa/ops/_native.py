"""The one loader of keras_sapa's native libraries, for every backend.

``custom_ops/build.py`` writes into ``keras_sapa/_lib/`` the TensorFlow custom op library
``_sapa_ops.so`` (and its GPU twin) with ``build_info.json``, and the framework-free kernel
core ``_sapa_core.so`` (PyTorch calls it through ctypes) and JAX's XLA FFI handlers
``_sapa_jax.so`` with ``bindings_build_info.json`` (``--only bindings`` builds these).
Every backend's library goes through the same checks, in this order, before any
``dlopen``:

1. the disable switch: ``KERAS_SAPA_DISABLE_COMPILED`` set to ``1``, ``true``, ``yes`` or
   ``on`` (any case; any other value but ``0``, ``false``, ``no``, ``off`` or empty
   too) disables the compiled kernels on every backend, read at every call;
2. the build record exists and parses;
3. the framework version it records is the running one (TensorFlow for the custom op
   library, jaxlib for the FFI handlers; the ctypes core has no framework to match);
4. the running CPU has every instruction set the build was compiled for
   (``cpu_features``, e.g. ``avx2``): a library built for features this CPU lacks would
   die with SIGILL. Where the CPU's features cannot be read (``/proc/cpuinfo``
   unreadable, not Linux), a library that needs any is refused as well.

A library that fails a check or does not load gives one ``RuntimeWarning`` per process
(none when disabled on purpose) and the builtin formulation runs; the backend's
``unavailable_reason()`` says why.

The C ABI of the core is described here once for every op of the table
(:func:`core_sizes`, :func:`output_shapes`, :func:`call_cpu`, :func:`call_cuda`). For
CUDA, :data:`cuda` opens the launcher ``libsapa_launcher.so`` and its kernel images
through the core (``keras_sapa_cuda_open``) and runs its self-test
(:mod:`._gpu_check`) on the first CUDA use of the JAX or PyTorch bindings.

Environment variables: ``KERAS_SAPA_DISABLE_COMPILED`` (above),
``KERAS_SAPA_OPS_LIBRARY`` (path of the TensorFlow library to load instead of
``keras_sapa/_lib/_sapa_ops.so``, its ``build_info.json`` beside it),
``KERAS_SAPA_BINDINGS_DIR`` (directory holding ``_sapa_core.so``, ``_sapa_jax.so`` and
``bindings_build_info.json``), ``KERAS_SAPA_NUM_THREADS`` (threads of the core's pool).
"""

import ctypes
import json
import os
import threading
import warnings

from keras_sapa.ops import _gpu_check  # the launcher's first-use self-test

ENV_DISABLE = "KERAS_SAPA_DISABLE_COMPILED"
ENV_DIR = "KERAS_SAPA_BINDINGS_DIR"
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lib")
CORE_LIBRARY = "_sapa_core.so"
JAX_LIBRARY = "_sapa_jax.so"
BINDINGS_BUILD_INFO = "bindings_build_info.json"
CORE_ABI = 1  # KERAS_SAPA_CORE_ABI of custom_ops/sapa/bindings/sapa_core_c.h
CPUINFO = "/proc/cpuinfo"  # where the running CPU's features are read (Linux)
_NOT_DISABLED = ("", "0", "false", "no", "off")


def disabled():
    """True when ``KERAS_SAPA_DISABLE_COMPILED`` asks for the builtin formulations."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in _NOT_DISABLED


def cpu_features():
    """The running CPU's feature flags (``/proc/cpuinfo`` names such as ``avx2``), or
    None where they cannot be read."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.split(":", 1)[0].strip() in ("flags", "Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_cpu_features(required):
    """The features in ``required`` (recorded by a build) that the running CPU lacks;
    all of them where the CPU's features cannot be read."""
    required = [str(feature) for feature in required or []]
    have = cpu_features() if required else set()
    return required if have is None else [f for f in required if f not in have]


def read_build_info(path, framework=None, version=None, build_command="custom_ops/build.py"):
    """``(info, None)`` when the build record at ``path`` passes checks 2-4 of the module
    docs (``framework`` names the record's ``<framework>_version`` field that must equal
    ``version``), else ``(None, reason)``."""
    rebuild = f"rebuild with `python {build_command}`"
    if not os.path.isfile(path):
        return None, f"{path} is missing ({rebuild})"
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc!r})"
    if not isinstance(info, dict):
        return None, f"{path} is malformed"
    if framework is not None and info.get(f"{framework}_version") != version:
        return None, (
            f"the library was built for {framework} "
            f"{info.get(f'{framework}_version')} but {framework} {version} is "
            f"running ({rebuild})"
        )
    lacking = missing_cpu_features(info.get("cpu_features"))
    if lacking:
        return None, (
            f"the library was built for CPU features {sorted(lacking)} that this "
            f"CPU lacks ({rebuild} here, or build a portable library with "
            'KERAS_SAPA_CPU_FLAGS="")'
        )
    return info, None


class Library:
    """A native library loaded on first use, once per process (thread-safe).

    ``load()`` returns ``(handle, None)`` or ``(None, reason)``; a failure gives one
    ``RuntimeWarning`` naming ``what`` (none with ``warn=False``). The disable switch is
    read at every call, before anything is loaded.
    """

    def __init__(self, what, load, warn=True):
        self.what, self._load, self._warn = what, load, warn
        self._lock = threading.RLock()
        self.reset()

    def reset(self):
        """Forgets the load attempt (tests; a loaded library stays mapped)."""
        self._tried, self._handle, self._reason = False, None, None

    def get(self):
        """The loaded handle, or None (see :meth:`reason`)."""
        if disabled():
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._handle, self._reason = self._load()
                    self._tried = True
                    if self._handle is None and self._warn:
                        warnings.warn(
                            f"keras_sapa: the compiled SAPA kernels for {self.what} are "
                            f"unavailable ({self._reason}); the builtin formulation is used.",
                            RuntimeWarning,
                            stacklevel=4,
                        )
        return self._handle

    def reason(self):
        """Why :meth:`get` returns None (None when it does not)."""
        if disabled():
            return f"{ENV_DISABLE} is set"
        return None if self.get() is not None else self._reason


def bindings_dir():
    """Directory the JAX and PyTorch bindings' libraries are loaded from."""
    return os.environ.get(ENV_DIR) or LIB_DIR


def bindings_build_info(framework=None, version=None):
    """The bindings' build record (see :func:`read_build_info`), its C ABI checked."""
    info, reason = read_build_info(
        os.path.join(bindings_dir(), BINDINGS_BUILD_INFO),
        framework,
        version,
        "custom_ops/build.py --only bindings",
    )
    if info is not None and info.get("core_abi") != CORE_ABI:
        return None, f"the bindings record another C ABI than {CORE_ABI}: rebuild them"
    return info, reason


def num_core_sizes(op):
    """How many size arguments the op's C entry points take (:func:`core_sizes`)."""
    return len(op.attrs) + 5


def core_sizes(op, shapes, attrs):
    """The size arguments of an op's C entry points (``custom_ops/sapa/bindings/``), by
    one rule for every op of the table: batch, height and width of ``key`` (else
    ``value``), ``up_factor``, the op's other attributes in the table's order, then the
    channels of ``key`` and of ``value`` (0 where the op has none: SAPA-D's halves).
    ``shapes`` are the inputs' shapes in the op's order (every dimension before the last
    three a batch dimension), ``attrs`` a dict by name."""
    named = dict(zip((t.name for t in op.inputs), shapes, strict=True))
    key, value = named.get("key"), named.get("value")
    low = key if key is not None else value
    batch = 1
    for dim in low[:-3]:
        batch *= int(dim)
    others = [int(attrs[a.name]) for a in op.attrs if a.name != "up_factor"]
    return (
        batch,
        *(int(d) for d in low[-3:-1]),
        int(attrs["up_factor"]),
        *others,
        0 if key is None else int(key[-1]),
        0 if value is None else int(value[-1]),
    )


def output_shapes(op, shapes, attrs):
    """The op's output shapes for inputs of ``shapes`` by the op table's symbols
    (:func:`keras_sapa.ops._optable.output_shape`), every dimension before the last
    three a batch dimension (that of the first input)."""
    from keras_sapa.ops import _optable

    lead = tuple(shapes[0][:-3])
    batch = 1
    for dim in lead:
        batch *= dim
    folded = [(batch, *tuple(s)[-3:]) for s in shapes]
    return [
        lead + tuple(_optable.output_shape(op, i, folded, attrs)[1:])
        for i in range(len(op.outputs))
    ]


def _declare(lib):
    """The C signatures of every op of the table that the library has: the CPU entry
    points (``<c_abi>_f32`` / ``_f64``, and ``_f16`` / ``_bf16`` where it has them: each
    tensor, inputs then outputs, as a pointer, then :func:`core_sizes`) and the CUDA ones
    (``<c_abi>_cuda``). A library built before an op (SAPA-D) lacks its entry points:
    they stay undeclared, and :func:`entry_point` returns None for them."""
    from keras_sapa.ops import _optable

    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for spec in _optable.OPS:
        if spec.bindings.c_abi is None:
            continue
        for dtype in ("f32", "f64", *HALF_SUFFIXES.values()):
            fn = getattr(lib, f"{spec.bindings.c_abi}_{dtype}", None)
            if fn is not None:
                tensors = len(spec.inputs) + len(spec.outputs)
                fn.argtypes = [pointer] * tensors + [size] * num_core_sizes(spec)
                fn.restype = ctypes.c_int
        fn = getattr(lib, f"{spec.bindings.c_abi}_cuda", None)
        if fn is not None:
            fn.argtypes = [pointer, ctypes.c_int, pointer, pointer, pointer]
            fn.restype = ctypes.c_int
            scratch = getattr(lib, f"{spec.bindings.c_abi}_cuda_scratch")
            scratch.argtypes = [ctypes.c_int, pointer, ctypes.POINTER(ctypes.c_int64)]
            scratch.restype = ctypes.c_int
    lib.keras_sapa_core_abi.restype = ctypes.c_int
    lib.keras_sapa_num_threads.restype = ctypes.c_int
    lib.keras_sapa_set_num_threads.argtypes = [ctypes.c_int]
    lib.keras_sapa_set_num_threads.restype = None
    if hasattr(lib, "keras_sapa_cuda_open"):
        lib.keras_sapa_cuda_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        lib.keras_sapa_cuda_open.restype = ctypes.c_int
        lib.keras_sapa_cuda_error.restype = ctypes.c_char_p


# The C ABI suffixes of the 16-bit element types (storage as bits, weights float32).
HALF_SUFFIXES = {"float16": "f16", "bfloat16": "bf16"}


def stores_halves(lib, op):
    """Whether the core ``lib`` takes float16 and bfloat16 tensors of the table's fused
    ``op`` and of its gradient op in 16-bit storage (``<c_abi>_f16`` / ``_bf16``, weights
    float32, converted per tile inside the kernels). Where not (an older library, an op
    without them), the bindings compute half types in float32."""
    from keras_sapa.ops import _optable

    ops = (op, _optable.op(op.gradient))
    return lib is not None and all(
        entry_point(lib, o, s) is not None for o in ops for s in HALF_SUFFIXES.values()
    )


def entry_point(lib, op, suffix):
    """The C function ``<c_abi>_<suffix>`` (``f32``, ``f64``, ``f16``, ``bf16``, ``cuda``,
    ``cuda_scratch``) of the table's op in ``lib``, or None when the library predates
    it."""
    return getattr(lib, f"{op.bindings.c_abi}_{suffix}", None)


def call_cpu(lib, op, tensors, sizes, dtype):
    """Runs the op's CPU entry point for ``dtype`` (``"f32"``, ``"f64"``, ``"f16"``,
    ``"bf16"``) on the data pointers ``tensors`` (inputs then outputs); RuntimeError on a
    failure code."""
    rc = entry_point(lib, op, dtype)(*tensors, *sizes)
    if rc != 0:
        raise RuntimeError(f"{op.bindings.c_abi}_{dtype} failed (code {rc})")


def _cuda_failure(lib, op, rc):
    message = lib.keras_sapa_cuda_error().decode(errors="replace")
    return RuntimeError(f"{op.bindings.c_abi}_cuda failed (code {rc}): {message}")


def cuda_scratch_bytes(lib, op, dtype, sizes):
    """Bytes of device scratch the op's CUDA entry point needs (``<c_abi>_cuda_scratch``)."""
    values = (ctypes.c_int64 * len(sizes))(*sizes)
    nbytes = ctypes.c_int64()
    rc = entry_point(lib, op, "cuda_scratch")(dtype, values, ctypes.byref(nbytes))
    if rc != 0:
        raise _cuda_failure(lib, op, rc)
    return nbytes.value


def call_cuda(lib, op, stream, dtype, tensors, sizes, scratch=None):
    """Runs the op's CUDA entry point (``<c_abi>_cuda``) on ``stream`` (a CUstream
    handle, None: the default stream) with the launcher's dtype code, device data
    pointers and ``scratch`` (a device pointer of :func:`cuda_scratch_bytes` bytes);
    RuntimeError with the launcher's message on a failure."""
    pointers = (ctypes.c_void_p * len(tensors))(*tensors)
    values = (ctypes.c_int64 * len(sizes))(*sizes)
    rc = entry_point(lib, op, "cuda")(stream, dtype, pointers, values, scratch)
    if rc != 0:
        raise _cuda_failure(lib, op, rc)


def _load_core():
    info, reason = bindings_build_info()
    if info is None:
        return None, reason
    if not info.get("core_library"):
        return None, f"the core library was not built ({info.get('core_status')})"
    path = os.path.join(bindings_dir(), CORE_LIBRARY)
    try:
        lib = ctypes.CDLL(path)
        _declare(lib)
        abi = lib.keras_sapa_core_abi()
    except (OSError, AttributeError) as exc:
        return None, f"{path} failed to load ({exc})"
    if abi != CORE_ABI:
        return None, f"{path} has C ABI {abi}, this package needs {CORE_ABI}: rebuild"
    return lib, None


# The framework-free kernel core (ctypes), under the JAX and PyTorch bindings; they warn.
core = Library("the bindings' core", _load_core, warn=False)


def load_core():
    """``(ctypes.CDLL, build info)`` of ``_sapa_core.so``, or ``(None, None)``."""
    lib = core.get()
    return (lib, bindings_build_info()[0]) if lib is not None else (None, None)


def unavailable_reason():
    """Why :func:`load_core` returns None (None when it loads)."""
    return core.reason()


# ------------------------------------------------------------------ CUDA
def launcher_dir():
    """Directory of the CUDA launcher and its kernel images (``custom_ops/build.py``'s
    GPU part writes them beside the TensorFlow library)."""
    return LIB_DIR


def _open_cuda():
    lib = core.get()
    if lib is None:
        return None, unavailable_reason()
    if not hasattr(lib, "keras_sapa_cuda_open"):
        return None, "the core library predates its CUDA entry points: rebuild the bindings"
    path = os.path.join(launcher_dir(), _gpu_check.LAUNCHER_LIBRARY)
    if not os.path.isfile(path):
        return None, f"{path} is missing (build the GPU part: `python custom_ops/build.py`)"
    rc = lib.keras_sapa_cuda_open(path.encode(), launcher_dir().encode())
    if rc != 0:
        return None, lib.keras_sapa_cuda_error().decode(errors="replace")
    _, problem = _gpu_check.self_test(launcher_dir(), library=path)
    if problem is not None:
        return None, f"the GPU kernels failed their self-test ({problem})"
    return lib, None


# The core with the CUDA launcher opened (the kernel images of launcher_dir() loaded) and
# its self-test passed on GPU 0 (keras_sapa.ops._gpu_check), for the JAX and PyTorch CUDA
# bindings; loaded on their first CUDA use, one warning when it fails.
cuda = Library("CUDA", _open_cuda)
