#!/usr/bin/env python3
"""Builds all of keras_sapa's native code: one entry point, one stamp rule, one log.

    python custom_ops/build.py [--only TARGETS] [--no-gpu] [--force] [--jobs N] [--verbose]

Targets (``--only tf,bindings`` builds a subset; ``--no-gpu`` drops ``cuda`` and
``launcher``), each writing into ``keras_sapa/_lib/``:

- ``tf``: ``_sapa_ops.so``, the TensorFlow op registrations and CPU kernels, built with
  the host C++ compiler (``$CXX``, default ``g++``) and TensorFlow's own flags
  (``tf.sysconfig.get_compile_flags()`` / ``get_link_flags()``, passed unchanged).
- ``bindings``: ``_sapa_core.so``, the framework-free CPU kernel core with a thread pool
  and plain C entry points (``custom_ops/sapa/bindings/sapa_core_c.h``; PyTorch calls it
  through ctypes), and ``_sapa_jax.so``, the XLA FFI handlers (headers from
  ``jax.ffi.include_dir()``, built only when JAX is installed), linked to the core.
  Needs no TensorFlow.
- ``cuda``: ``sapa_kernels.<target>.cubin`` / ``.ptx``, the CUDA kernels
  (``custom_ops/sapa/kernels/cuda/``) compiled with NVRTC from the
  ``nvidia-cuda-nvrtc-cu12`` wheel (headers from ``nvidia-cuda-runtime-cu12``), loaded
  with ctypes: no nvcc, no CUDA toolkit, no GPU needed. Targets: a cubin for every
  architecture in TensorFlow's ``cuda_compute_capabilities`` and for ``REQUIRED_TARGETS``
  (sm_75: T4-class GPUs), plus PTX for the newest (``KERAS_SAPA_CUDA_TARGETS=
  "sm_75,sm_80,compute_90"`` overrides; without TensorFlow, ``DEFAULT_TARGETS``). ptxas
  runs verbose for every cubin and the build fails when any kernel spills registers on
  any target (the table is recorded as ``cuda_resources``). The PTX is for GPUs newer
  than every cubin; the driver JIT-compiles it and needs at least the CUDA version of the
  NVRTC that wrote it (``ptx_min_driver``: NVRTC 12.9 writes PTX ISA 8.8, which needs a
  CUDA 12.9 driver, r575 or newer; an older driver reports
  CUDA_ERROR_UNSUPPORTED_PTX_VERSION, which the launcher names).
- ``launcher``: ``libsapa_launcher.so``, the framework-free launcher
  (``custom_ops/sapa/launcher/``, driver API through ``dlopen("libcuda.so.1")``, plain C
  ABI, for ctypes callers such as ``scripts/gpu_harness.py``) and, with TensorFlow,
  ``_sapa_ops_gpu.so``, the ``DEVICE_GPU`` kernels (adapter and launcher, g++ alone).

The op set is data (``keras_sapa/ops/_optable.py``); every build first regenerates the
C++ header the adapters include from it (``custom_ops/sapa/cc/sapa_optable.inc``,
committed; ``--generate`` only writes it).

``-O3``; ``-mavx2 -mfma -mf16c`` are added only when the compiler and this CPU support them
(``KERAS_SAPA_CPU_FLAGS`` overrides, e.g. ``KERAS_SAPA_CPU_FLAGS=""`` for a portable
build); the CPU features those flags need are recorded (``cpu_features``) and checked by
the loaders.

Two records, read by the loaders: ``build_info.json`` (targets tf, cuda, launcher) and
``bindings_build_info.json`` (target bindings). Each holds a ``stamp``, a hash of its
sources and of everything else it depends on (flags, compiler, framework and NVRTC
versions, targets); when the stamp is unchanged and every output exists that part is
skipped (``--force`` rebuilds); when only the C++ changed, the CUDA images of the last
build are kept (their own source hash, targets and NVRTC version unchanged), since NVRTC
takes minutes. Everything printed also goes to
``build/custom_ops/build.log``.

Exit status: 1 when the TensorFlow library was asked for and could not be built (no
compiler, no TensorFlow, a compile error; ``scripts/setup_env.sh`` tolerates that and the
package then runs on its pure paths); a failed GPU part or bindings library is reported,
recorded, and never affects the others.
"""

import argparse
import concurrent.futures
import ctypes
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAPA = os.path.join(ROOT, "custom_ops", "sapa")
SRC = os.path.join(SAPA, "cc")
BINDINGS = os.path.join(SAPA, "bindings")
CUDA_DIR = os.path.join(SAPA, "kernels", "cuda")
LAUNCHER_DIR = os.path.join(SAPA, "launcher")
OUT_DIR = os.path.join(ROOT, "keras_sapa", "_lib")
BUILD_DIR = os.path.join(ROOT, "build", "custom_ops")
LOG_FILE = os.path.join(BUILD_DIR, "build.log")
OPTABLE = os.path.join(ROOT, "keras_sapa", "ops", "_optable.py")
OPTABLE_HEADER = os.path.join(SRC, "sapa_optable.inc")

CPU_LIB = "_sapa_ops.so"
GPU_LIB = "_sapa_ops_gpu.so"
LAUNCHER_LIB = "libsapa_launcher.so"
CORE_LIB = "_sapa_core.so"
JAX_LIB = "_sapa_jax.so"
BUILD_INFO = "build_info.json"
BINDINGS_INFO = "bindings_build_info.json"
# Must match KERAS_SAPA_CORE_ABI in sapa_core_c.h (the loader checks the library's).
CORE_ABI = 1

CPU_SOURCES = [
    os.path.join(SRC, "ops", "sapa_ops.cc"),
    os.path.join(SRC, "kernels", "sapa_kernels.cc"),
]
GPU_ADAPTER_SOURCE = os.path.join(SRC, "kernels", "sapa_kernels_gpu.cc")
LAUNCHER_SOURCE = os.path.join(LAUNCHER_DIR, "sapa_launcher.cc")
CUDA_SOURCE = os.path.join(CUDA_DIR, "sapa_kernels.cu")
# One op family per source: a new family adds its C entry points and FFI handlers here.
CORE_SOURCES = [os.path.join(BINDINGS, n) for n in ("sapa_core_c.cc", "sapa_deform_core_c.cc")]
JAX_SOURCES = [os.path.join(BINDINGS, n) for n in ("sapa_xla_ffi.cc", "sapa_deform_xla_ffi.cc")]

TARGETS = ("tf", "bindings", "cuda", "launcher")
GPU_TARGETS = ("cuda", "launcher")
# Always compiled, whatever TensorFlow lists: sm_75 (Turing: T4, the GPU of most free
# notebook services) would otherwise run the sm_70 image.
REQUIRED_TARGETS = ("sm_75",)
# Used when TensorFlow (and its build info) is absent: Pascal to Hopper, PTX for the newest.
DEFAULT_TARGETS = ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
# The SIMD flags of the CPU kernels, where the compiler and the CPU support them all.
SIMD_FLAGS = ("-mavx2", "-mfma", "-mf16c")
# The CPU feature (as in /proc/cpuinfo) each SIMD flag requires.
FLAG_FEATURES = {
    "-mavx2": "avx2",
    "-mfma": "fma",
    "-mavx512f": "avx512f",
    "-mavx": "avx",
    "-msse4.2": "sse4_2",
    "-mf16c": "f16c",
}
# PTX ISA version -> (CUDA version, minimum Linux driver) that JIT-compiles it.
PTX_DRIVERS = {
    "8.0": ("12.0", "525.60.13"),
    "8.1": ("12.1", "530.30.02"),
    "8.2": ("12.2", "535.54.03"),
    "8.3": ("12.3", "545.23.06"),
    "8.4": ("12.4", "550.54.14"),
    "8.5": ("12.5", "555.42.02"),
    "8.6": ("12.6", "560.28.03"),
    "8.7": ("12.8", "570.26"),
    "8.8": ("12.9", "575.51.03"),
}


class BuildError(RuntimeError):
    pass


_log_lines = []


def _log(msg):
    line = f"[keras_sapa build] {msg}"
    print(line, flush=True)
    _log_lines.append(line)


def _write_log():
    try:
        os.makedirs(BUILD_DIR, exist_ok=True)
        with open(LOG_FILE, "w") as f:
            f.write("\n".join(_log_lines) + "\n")
    except OSError:
        pass


def _run(cmd, verbose, what):
    if verbose:
        _log(" ".join(cmd))
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.stdout.strip():
        _log_lines.append(f"$ {' '.join(cmd)}\n{proc.stdout.rstrip()}")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{tail}")
    if verbose and proc.stdout.strip():
        print(proc.stdout)
    return time.time() - start


def _tf_flags():
    try:
        import tensorflow as tf
    except Exception as exc:  # noqa: BLE001 - any import failure means no build
        raise BuildError(
            f"TensorFlow cannot be imported ({exc!r}); nothing to build against"
        ) from exc
    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    include = tf.sysconfig.get_include()
    if not os.path.isfile(os.path.join(include, "tensorflow", "core", "framework", "op.h")):
        raise BuildError(f"TensorFlow headers not found under {include}")
    return tf, compile_flags, link_flags, include


def _compiler_version(cxx):
    try:
        out = subprocess.run(
            [cxx, "--version"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=True,
        ).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"C++ compiler {cxx!r} not usable: {exc}") from exc


def _cpu_simd_flags(cxx):
    """['-mavx2', '-mfma', '-mf16c'] when the compiler accepts them and this CPU runs them
    (F16C converts the half-precision tiles of the kernels; every AVX2 CPU has it)."""
    if "KERAS_SAPA_CPU_FLAGS" in os.environ:
        return os.environ["KERAS_SAPA_CPU_FLAGS"].split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    probe = (
        "int main() { __builtin_cpu_init(); "
        'return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && '
        '__builtin_cpu_supports("f16c")) ? 0 : 1; }\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cc")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(probe)
        try:
            subprocess.run(
                [cxx, *SIMD_FLAGS, src, "-o", exe],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            ok = subprocess.run([exe]).returncode == 0
        except (OSError, subprocess.CalledProcessError):
            ok = False
    return list(SIMD_FLAGS) if ok else []


def cpu_features_for(flags):
    """The CPU features (``/proc/cpuinfo`` names) the given compiler flags require."""
    features = []
    for flag in flags:
        if flag.startswith("-march=") or flag.startswith("-mcpu="):
            features.append(flag)  # cannot be checked precisely: recorded as is
        elif flag in FLAG_FEATURES:
            features.append(FLAG_FEATURES[flag])
    return features


def _compile_all(commands, jobs, verbose):
    """Runs {what: command} concurrently; returns {what: error message} of the failures."""
    errors = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            what: pool.submit(_run, cmd, verbose, f"compiling {what}")
            for what, cmd in commands.items()
        }
        for what, future in futures.items():
            try:
                future.result()
            except BuildError as exc:
                errors[what] = str(exc)
    return errors


# ---------------------------------------------------------------------------------------
# The op table -> C++


def load_optable():
    """``keras_sapa/ops/_optable.py`` loaded by path (the package's dependencies need not
    be installed to build)."""
    spec = importlib.util.spec_from_file_location("_keras_sapa_optable", OPTABLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_CXX_TYPES = {
    "half": "Eigen::half",
    "bfloat16": "Eigen::bfloat16",
    "float": "float",
    "double": "double",
}


def _cxx_string(text):
    return json.dumps(text)


def _cxx_dim(table, op, symbols, attr_names, text):
    """One DimSpec initialiser: {symbol index, {attribute indices}, factor, text}."""
    symbol, attrs, factor = table.parse_dim(text)
    if len(attrs) > 2:
        raise ValueError(f"{op.name}: {text!r} has more than two attribute factors")
    index = symbols.index(symbol) if symbol is not None else -1
    ids = [attr_names.index(a) for a in attrs] + [-1] * (2 - len(attrs))
    return f"{{{index}, {{{ids[0]}, {ids[1]}}}, {factor}, {_cxx_string(text)}}}"


def render_optable(table=None):
    """The text of ``sapa_optable.inc`` for the op table."""
    table = table or load_optable()
    attr_names = sorted({a.name for o in table.OPS for a in o.attrs})
    lines = [
        "// Generated by custom_ops/build.py from keras_sapa/ops/_optable.py: do not edit.",
        "// tests/test_cuda_build.py checks that it is current.",
        "//",
        "// KERAS_SAPA_OPS(X): X(Name) for every op (KERAS_SAPA_OPS_CPU / _GPU: those with",
        "// TensorFlow kernels there); KERAS_SAPA_OP_TYPES_<Name>(X, Name):",
        "// X(Name, T, Tweights) for each type instantiation (Tweights = void without one).",
        "// keras_sapa::optable::k<Name>: the op's OpSpec (sapa_opspec.h).",
        "",
        "#define KERAS_SAPA_OPS(X) " + " ".join(f"X({o.name})" for o in table.OPS),
        "// The ops with TensorFlow kernels on each device (Op.devices).",
        *(
            f"#define KERAS_SAPA_OPS_{device.upper()}(X) "
            + " ".join(f"X({o.name})" for o in table.OPS if device in o.devices)
            for device in ("cpu", "gpu")
        ),
        "",
    ]
    for o in table.OPS:
        if o.type_pairs:
            pairs = [f"X(NAME, {_CXX_TYPES[t]}, {_CXX_TYPES[w]})" for t, w in o.type_pairs]
        else:
            pairs = [f"X(NAME, {_CXX_TYPES[t]}, void)" for t in o.type_attrs["T"]]
        lines.append(f"#define KERAS_SAPA_OP_TYPES_{o.name}(X, NAME) " + " ".join(pairs))
    lines += ["", "namespace keras_sapa {", "namespace optable {", ""]
    lines.append("// Attribute indices (OpSpec::attrs and DimSpec::attrs use them).")
    for i, name in enumerate(attr_names):
        lines.append(f"constexpr int kAttr_{name} = {i};")
    lines.append("")
    for o in table.OPS:
        symbols = table.symbols(o)

        for kind, items in (("inputs", o.inputs), ("outputs", o.outputs)):
            lines.append(f"constexpr TensorSpec k{o.name}_{kind}[] = {{")
            for t in items:
                dims = ", ".join(_cxx_dim(table, o, symbols, attr_names, d) for d in t.shape)
                lines.append(
                    f"    {{{_cxx_string(t.name)}, {_cxx_string(t.dtype)}, "
                    f"{len(t.shape)}, {{{dims}}}}},"
                )
            lines.append("};")
        lines.append(f"constexpr AttrSpec k{o.name}_attrs[] = {{")
        for a in o.attrs:
            check = {"odd_positive": "AttrCheck::kOddPositive", "positive": "AttrCheck::kPositive"}
            lines.append(f"    {{{_cxx_string(a.name)}, kAttr_{a.name}, {check[a.check]}}},")
        lines.append("};")
        lines.append(
            f"constexpr const char* k{o.name}_symbols[] = {{"
            + ", ".join(_cxx_string(s) for s in symbols)
            + "};"
        )
        type_attrs = [f"{name}: {{{', '.join(types)}}}" for name, types in o.type_attrs.items()]
        lines.append(
            f"constexpr const char* k{o.name}_types[] = {{"
            + ", ".join(_cxx_string(t) for t in type_attrs)
            + "};"
        )
        lines += [
            f"constexpr OpSpec k{o.name} = {{",
            f"    {_cxx_string(o.tf_name)},",
            f"    {_cxx_string(o.doc)},",
            f"    k{o.name}_inputs, {len(o.inputs)},",
            f"    k{o.name}_outputs, {len(o.outputs)},",
            f"    k{o.name}_attrs, {len(o.attrs)},",
            f"    k{o.name}_symbols, {len(symbols)},",
            f"    k{o.name}_types, {len(type_attrs)},",
            "};",
            "",
        ]
    lines += [
        f"constexpr int kNumAttrs = {len(attr_names)};",
        "",
        "}  // namespace optable",
        "}  // namespace keras_sapa",
        "",
    ]
    return "\n".join(lines)


def generate_optable():
    """Writes ``sapa_optable.inc`` when its content changed; returns its path."""
    text = render_optable()
    try:
        with open(OPTABLE_HEADER) as f:
            if f.read() == text:
                return OPTABLE_HEADER
    except OSError:
        pass
    with open(OPTABLE_HEADER, "w") as f:
        f.write(text)
    _log(f"wrote {os.path.relpath(OPTABLE_HEADER, ROOT)} from the op table")
    return OPTABLE_HEADER


# ---------------------------------------------------------------------------------------
# TensorFlow CPU library


def build_cpu(compile_flags, link_flags, cxx, simd, jobs, verbose):
    common = [
        "-fPIC",
        "-O3",
        "-DNDEBUG",
        "-fopenmp-simd",
        *simd,
        *compile_flags,
        "-I" + os.path.join(SRC, "kernels"),
    ]
    os.makedirs(BUILD_DIR, exist_ok=True)
    objects = [os.path.join(BUILD_DIR, os.path.basename(s) + ".o") for s in CPU_SOURCES]
    commands = {
        os.path.basename(s): [cxx, "-c", s, "-o", o, *common]
        for s, o in zip(CPU_SOURCES, objects, strict=True)
    }
    _log(f"compiling the CPU kernels with {cxx} ({' '.join(simd) or 'no extra SIMD flags'})")
    start = time.time()
    errors = _compile_all(commands, jobs, verbose)
    if errors:
        raise BuildError("\n".join(errors.values()))
    target = os.path.join(BUILD_DIR, CPU_LIB)
    _run(
        [cxx, "-shared", *objects, "-o", target, *link_flags, "-O3"],
        verbose,
        "linking the CPU library",
    )
    _log(f"CPU library built in {time.time() - start:.0f}s")
    return target


# ---------------------------------------------------------------------------------------
# JAX / PyTorch bindings


def _jax_info():
    """(version dict, include dir, None) or (None, None, reason)."""
    if importlib.util.find_spec("jax") is None:
        return None, None, "JAX is not installed"
    try:
        import jax
        import jax.ffi
        import jaxlib

        include = jax.ffi.include_dir()
    except Exception as exc:  # noqa: BLE001 - any failure means no JAX library
        return None, None, f"JAX's FFI headers are unavailable ({exc!r})"
    if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        return None, None, f"xla/ffi/api/ffi.h not found under {include}"
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}, include, None


def build_bindings(cxx, flags, jax_include, jobs, verbose):
    """Compiles ``_sapa_core.so`` and (with JAX) ``_sapa_jax.so`` into BUILD_DIR; returns
    (core path or None, jax path or None, {what: error})."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    common = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", *flags]
    core = os.path.join(BUILD_DIR, CORE_LIB)
    # -ldl: the core dlopen()s the CUDA launcher; glibc < 2.34 keeps dlopen in libdl.
    commands = {CORE_LIB: [cxx, *common, "-I" + SRC, "-shared", *CORE_SOURCES, "-o", core, "-ldl"]}
    jax_objects = [os.path.join(BUILD_DIR, os.path.basename(p) + ".o") for p in JAX_SOURCES]
    if jax_include:
        # The FFI headers are third-party: -isystem keeps their warnings out of the log.
        for source, obj in zip(JAX_SOURCES, jax_objects, strict=True):
            commands[os.path.basename(source)] = [
                *(cxx, "-std=c++17", "-fPIC", "-O2", "-DNDEBUG", "-isystem", jax_include),
                *("-I" + SRC, "-c", source, "-o", obj),
            ]
    errors = _compile_all(commands, jobs, verbose)
    if CORE_LIB in errors:
        return None, None, errors
    jax_lib = None
    if errors:  # a handler source failed: no JAX library
        errors[JAX_LIB] = "\n".join(errors.values())
    if jax_include and JAX_LIB not in errors:
        jax_lib = os.path.join(BUILD_DIR, JAX_LIB)
        try:
            _run(
                [
                    cxx,
                    "-shared",
                    *jax_objects,
                    "-o",
                    jax_lib,
                    "-L" + BUILD_DIR,
                    "-l:" + CORE_LIB,
                    "-Wl,-rpath,$ORIGIN",
                ],
                verbose,
                "linking the JAX library",
            )
        except BuildError as exc:
            errors[JAX_LIB] = str(exc)
            jax_lib = None
    return core, jax_lib, errors


# ---------------------------------------------------------------------------------------
# NVRTC


def _nvidia_dir(package):
    """Directory of an ``nvidia.<package>`` wheel (``cuda_nvrtc``, ``cuda_runtime``)."""
    try:
        import nvidia  # namespace package of the NVIDIA wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        path = os.path.join(base, package)
        if os.path.isdir(path):
            return path
    return None


def find_nvrtc():
    """Path of libnvrtc.so.12: ``$KERAS_SAPA_NVRTC``, else the nvidia-cuda-nvrtc-cu12 wheel.
    None when absent."""
    explicit = os.environ.get("KERAS_SAPA_NVRTC")
    if explicit:
        return explicit if os.path.isfile(explicit) else None
    base = _nvidia_dir("cuda_nvrtc")
    if base:
        for name in ("libnvrtc.so.12", "libnvrtc.so"):
            path = os.path.join(base, "lib", name)
            if os.path.isfile(path):
                return path
    return None


def find_cuda_include():
    """Directory holding cuda_fp16.h / cuda_bf16.h (the nvidia-cuda-runtime-cu12 wheel,
    or ``$KERAS_SAPA_CUDA_INCLUDE``). None when absent."""
    explicit = os.environ.get("KERAS_SAPA_CUDA_INCLUDE")
    candidates = [explicit] if explicit else []
    base = _nvidia_dir("cuda_runtime")
    if base:
        candidates.append(os.path.join(base, "include"))
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


class Nvrtc:
    """The few NVRTC calls the build needs, through ctypes."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        self.version = (major.value, minor.value)

    def _check(self, rc, what, log=""):
        if rc != 0:
            message = self.lib.nvrtcGetErrorString(rc).decode()
            raise BuildError(f"NVRTC {what} failed: {message}\n{log}".rstrip())

    def compile(self, source, name, target, options):
        """Compiles ``source`` for ``target`` (``sm_XY``: cubin, ``compute_XY``: PTX).
        Returns (image bytes, compile log)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
            ),
            "create",
        )
        try:
            opts = [f"--gpu-architecture={target}", *options]
            array = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), array)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            log = log.value.decode(errors="replace")
            self._check(rc, f"compile for {target}", log)
            getter = "CUBIN" if target.startswith("sm_") else "PTX"
            self._check(
                getattr(self.lib, f"nvrtcGet{getter}Size")(prog, ctypes.byref(size)),
                f"get {getter} size",
            )
            data = ctypes.create_string_buffer(size.value)
            self._check(getattr(self.lib, f"nvrtcGet{getter}")(prog, data), f"get {getter}")
            return data.raw, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cuda_targets(tf=None):
    """Targets from ``$KERAS_SAPA_CUDA_TARGETS``, else a cubin for each of TensorFlow's
    ``cuda_compute_capabilities`` and ``REQUIRED_TARGETS`` (``compute_XY`` also as a
    cubin) plus PTX for the newest, else ``DEFAULT_TARGETS``."""
    env = os.environ.get("KERAS_SAPA_CUDA_TARGETS")
    if env:
        return [t.strip() for t in env.replace(";", ",").split(",") if t.strip()]
    caps = []
    if tf is not None:
        try:
            caps = list(tf.sysconfig.get_build_info().get("cuda_compute_capabilities") or [])
        except Exception:  # noqa: BLE001 - a CPU-only TensorFlow has no such entry
            caps = []
    numbers = {
        int(c.split("_")[1])
        for c in caps
        if c.split("_")[-1].isdigit() and c.startswith(("sm_", "compute_"))
    }
    if not numbers:
        return list(DEFAULT_TARGETS)
    numbers = sorted(numbers | {int(t.split("_")[1]) for t in REQUIRED_TARGETS})
    return [f"sm_{n}" for n in numbers] + [f"compute_{numbers[-1]}"]


def image_name(target):
    return f"sapa_kernels.{target}." + ("cubin" if target.startswith("sm_") else "ptx")


TYPE_NAMES = ("f32", "f64", "f16", "bf16")  # <t> of the entry points (SAPA_FOR_EACH_TYPE)
HALF_NAMES = ("f16", "bf16")  # those with _wacc gather/scatter variants (SAPA_FOR_EACH_WACC)


def sapa_kernel_names():
    """SAPA's extern "C" kernels (kernels/cuda/sapa_kernels.cu), as the launcher names them."""
    names = []
    for t in TYPE_NAMES:
        for k in (3, 5, 7):
            names += [f"sapa_dot_{t}_k{k}", f"sapa_dsoftmax_{t}_k{k}", f"sapa_fused_{t}_k{k}"]
        for suffix in ["", "_wacc"] if t in HALF_NAMES else [""]:
            for op in ("gather", "scatter"):
                names += [f"sapa_{op}_{t}{suffix}", f"sapa_{op}_{t}{suffix}_any"]
        names += [f"sapa_dot_{t}_any", f"sapa_dsoftmax_{t}_any", f"sapa_fused_{t}_any"]
    return names


def deform_kernel_names():
    """SAPA-D's extern "C" kernels (kernels/cuda/sapa_deform_kernels.cuh)."""
    ops = (
        "forward",
        "similarity",
        "aggregate",
        "backward",
        "similarity_backward",
        "aggregate_backward",
        "scatter",
    )
    names = [f"sapa_deform_{op}_{t}" for t in TYPE_NAMES for op in ops]
    names += [f"sapa_deform_{op}_{t}_wacc" for t in HALF_NAMES for op in ("aggregate", "scatter")]
    names += ["sapa_deform_zero_f32", "sapa_deform_zero_f64"]
    return names + [f"sapa_deform_cast_{t}" for t in HALF_NAMES]


def kernel_names():
    """Every extern "C" kernel the image must define (as the launcher names them): SAPA's
    and SAPA-D's (sapa_kernels.cu includes sapa_deform_kernels.cuh)."""
    return sapa_kernel_names() + deform_kernel_names()


def nvrtc_options(include):
    return ["-I" + CUDA_DIR, "-I" + include, "--std=c++17", "-default-device"]


# ptxas's verbose lines: "Compiling entry function 'k' for 'sm_75'", then "N bytes stack
# frame, S bytes spill stores, L bytes spill loads" and "Used R registers".
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log):
    """{kernel: {"registers", "stack", "spill_stores", "spill_loads"}} from ptxas -v."""
    table, current = {}, None
    for line in log.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = table.setdefault(
                entry.group(1), {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            )
            continue
        if current is None:
            continue
        spill = _PTXAS_SPILL.search(line)
        if spill:
            current.update(
                stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)),
            )
        regs = _PTXAS_REGS.search(line)
        if regs:
            current["registers"] = int(regs.group(1))
    return table


def spills(resources):
    """``{target: [kernel, ...]}`` of the kernels that spill, from ``cuda_resources``."""
    out = {}
    for target, summary in resources.items():
        bad = [
            name for name, r in summary["kernels"].items() if r["spill_stores"] or r["spill_loads"]
        ]
        if bad:
            out[target] = sorted(bad)
    return out


def ptx_requirements(ptx):
    """(PTX ISA version, "CUDA x.y driver rNNN.NN") of a PTX text."""
    match = re.search(rb"^\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    isa = match.group(1).decode() if match else None
    cuda, driver = PTX_DRIVERS.get(isa, (None, None))
    need = f"CUDA {cuda} driver ({driver} or newer on Linux)" if cuda else "unknown"
    return isa, need


def cuda_source_hash(include=None):
    """Hash of what the kernel images are compiled from: every file under
    ``kernels/cuda`` and the NVRTC options. Recorded in ``build_info.json`` so the tests
    can verify the images this build compiled rather than compile them again."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*"))):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(json.dumps(nvrtc_options(include or find_cuda_include() or "")).encode())
    return digest.hexdigest()


def compile_kernels(targets, out_dir, jobs=2, verbose=False, nvrtc_path=None, include=None):
    """Compiles the CUDA kernels for every target into ``out_dir``; returns
    {"nvrtc", "targets", "images", "source_hash", "resources", "ptx_isa",
    "ptx_min_driver"}. ``resources`` is ptxas's register and spill table per cubin
    target ({target: {"max_registers", "spill_bytes", "kernels": {...}}}). Raises
    BuildError, also when a kernel spills on any target."""
    nvrtc_path = nvrtc_path or find_nvrtc()
    if nvrtc_path is None:
        raise BuildError(
            "NVRTC not found (install nvidia-cuda-nvrtc-cu12 or set "
            "$KERAS_SAPA_NVRTC); CUDA kernels skipped"
        )
    include = include or find_cuda_include()
    if include is None:
        raise BuildError(
            "cuda_fp16.h not found (install nvidia-cuda-runtime-cu12 or set "
            "$KERAS_SAPA_CUDA_INCLUDE); CUDA kernels skipped"
        )
    nvrtc = Nvrtc(nvrtc_path)
    with open(CUDA_SOURCE) as f:
        source = f.read()
    options = nvrtc_options(include)
    _log(
        f"compiling the CUDA kernels with NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} "
        f"for {', '.join(targets)}"
    )
    start = time.time()

    def one(target):
        cubin = target.startswith("sm_")
        extra = ["--ptxas-options=-v"] if cubin else []
        data, log = nvrtc.compile(source, os.path.basename(CUDA_SOURCE), target, options + extra)
        missing = [n for n in kernel_names() if n.encode() not in data]
        if missing:
            raise BuildError(f"the {target} image lacks the kernels {missing[:5]}...")
        _log_lines.append(f"NVRTC {target}:\n{log.strip()}")
        return target, data, parse_ptxas_log(log) if cubin else None

    os.makedirs(out_dir, exist_ok=True)
    images, resources, ptx_isa, ptx_driver = [], {}, None, None
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(one, targets))
    for target, data, table in results:
        if table is not None:
            if set(table) != set(kernel_names()):
                raise BuildError(
                    f"ptxas reported {len(table)} kernels for {target}, "
                    f"expected {len(kernel_names())}"
                )
            resources[target] = {
                "max_registers": max(r["registers"] for r in table.values()),
                "spill_bytes": sum(r["spill_stores"] + r["spill_loads"] for r in table.values()),
                "kernels": table,
            }
        else:
            ptx_isa, ptx_driver = ptx_requirements(data)
    for target, summary in resources.items():
        _log(
            f"  {target}: at most {summary['max_registers']} registers, "
            f"{summary['spill_bytes']} bytes spilled"
        )
    spilling = spills(resources)
    if spilling:
        detail = "; ".join(
            f"{target}: "
            + ", ".join(
                f"{n} ({resources[target]['kernels'][n]['spill_stores']} B stored, "
                f"{resources[target]['kernels'][n]['spill_loads']} B loaded)"
                for n in names
            )
            for target, names in spilling.items()
        )
        raise BuildError(f"CUDA kernels spill registers: {detail}")
    for target, data, _ in results:
        with open(os.path.join(out_dir, image_name(target)), "wb") as f:
            f.write(data)
        images.append(image_name(target))
    if ptx_isa:
        _log(f"  PTX ISA {ptx_isa}: the PTX fallback needs a {ptx_driver}")
    _log(f"CUDA kernels compiled in {time.time() - start:.0f}s")
    return {
        "nvrtc": f"{nvrtc.version[0]}.{nvrtc.version[1]}",
        "targets": list(targets),
        "images": images,
        "source_hash": cuda_source_hash(include),
        "resources": resources,
        "ptx_isa": ptx_isa,
        "ptx_min_driver": ptx_driver,
    }


# ---------------------------------------------------------------------------------------
# Launcher and the TensorFlow GPU library


def build_launcher(cxx, verbose):
    """The standalone launcher library (no TensorFlow)."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    target = os.path.join(BUILD_DIR, LAUNCHER_LIB)
    _run(
        [
            cxx,
            "-shared",
            "-fPIC",
            "-O2",
            "-std=c++17",
            LAUNCHER_SOURCE,
            "-o",
            target,
            # libstdc++ linked in, libgcc_s and libdl/libpthread by their old sonames
            # (glibc 2.34+ folds them into libc and -ldl alone no longer records them;
            # -static-libgcc would pull in glibc 2.35's _dl_find_object): the library
            # needs no glibc newer than 2.28 (tests/test_launcher.py checks it).
            "-static-libstdc++",
            "-Wl,--no-as-needed",
            "-l:libdl.so.2",
            "-l:libpthread.so.0",
        ],
        verbose,
        "building the launcher",
    )
    return target


def build_gpu(compile_flags, link_flags, cxx, verbose):
    """The TensorFlow GPU adapter + launcher, with g++ alone."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    objects = []
    for source in (GPU_ADAPTER_SOURCE, LAUNCHER_SOURCE):
        obj = os.path.join(BUILD_DIR, os.path.basename(source) + ".gpu.o")
        _run(
            [
                cxx,
                "-c",
                source,
                "-o",
                obj,
                "-fPIC",
                "-O2",
                "-DNDEBUG",
                *compile_flags,
                "-I" + os.path.join(SRC, "kernels"),
            ],
            verbose,
            f"compiling {os.path.basename(source)}",
        )
        objects.append(obj)
    target = os.path.join(BUILD_DIR, GPU_LIB)
    _run(
        [cxx, "-shared", *objects, "-o", target, *link_flags, "-ldl"],
        verbose,
        "linking the GPU library",
    )
    return target


# ---------------------------------------------------------------------------------------
# Stamps: one rule for both records


def _sources():
    """Inputs of ``build_info.json``'s targets (TensorFlow library, CUDA, launcher)."""
    paths = set(CPU_SOURCES)
    for pattern in ("**/*.cc", "**/*.h", "**/*.inc", "**/*.cu", "**/*.cuh"):
        paths.update(glob.glob(os.path.join(SAPA, pattern), recursive=True))
    paths.update((os.path.abspath(__file__), OPTABLE))
    # The launcher's test stand-ins and the JAX/PyTorch bindings (their own record) are
    # not inputs of this part.
    skip = {"testing", "bindings"}
    return sorted(p for p in paths if not skip & set(os.path.relpath(p, SAPA).split(os.sep)))


def _binding_sources():
    """Inputs of ``bindings_build_info.json``'s target (the JAX/PyTorch bindings)."""
    paths = glob.glob(os.path.join(BINDINGS, "*"))
    paths += glob.glob(os.path.join(SAPA, "kernels", "cpu", "*.h"))
    paths += [os.path.abspath(__file__), OPTABLE, OPTABLE_HEADER]
    paths += glob.glob(os.path.join(SRC, "*.h"))
    return sorted(p for p in set(paths) if os.path.isfile(p))


def build_stamp(parts, sources=None):
    """Hash of the sources (default: :func:`_sources`) and of ``parts`` (flags, compiler,
    versions, targets)."""
    digest = hashlib.sha256()
    for path in _sources() if sources is None else sources:
        digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(json.dumps(parts, sort_keys=True).encode())
    return digest.hexdigest()


def _up_to_date(record, stamp, output_keys):
    """Whether ``record`` (a JSON file in OUT_DIR) has ``stamp`` and every output it
    names (under ``output_keys``) exists."""
    try:
        with open(os.path.join(OUT_DIR, record)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("stamp") != stamp:
        return False
    outputs = []
    for key in output_keys:
        value = info.get(key)
        outputs += value if isinstance(value, list) else [value]
    return all(os.path.isfile(os.path.join(OUT_DIR, o)) for o in outputs if o)


def _remove_outputs(names):
    """Removes old outputs first, so a failed build never leaves a mismatched set."""
    for name in names:
        path = os.path.join(OUT_DIR, name)
        if os.path.exists(path):
            os.remove(path)


def _write_record(name, info):
    with open(os.path.join(OUT_DIR, name), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------
# The two parts


def _reusable_images(targets, nvrtc_version):
    """The kernel images of the last build, as ``compile_kernels`` returns them, when they
    were compiled from the current CUDA sources for these targets by this NVRTC, passed
    the spill check and are all present; else None (then they are compiled again)."""
    try:
        with open(os.path.join(OUT_DIR, BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    images = info.get("cuda_images") or []
    resources = info.get("cuda_resources")
    if (
        not images
        or not resources
        or spills(resources)
        or info.get("cuda_targets") != list(targets)
        or info.get("nvrtc") != nvrtc_version
        or info.get("cuda_source_hash") != cuda_source_hash()
        or not all(os.path.isfile(os.path.join(OUT_DIR, i)) for i in images)
    ):
        return None
    _log("CUDA kernels: the images of the last build are current (sources, targets, NVRTC)")
    return {
        "nvrtc": info["nvrtc"],
        "targets": info["cuda_targets"],
        "images": images,
        "source_hash": info["cuda_source_hash"],
        "resources": resources,
        "ptx_isa": info.get("ptx_isa"),
        "ptx_min_driver": info.get("ptx_min_driver"),
    }


# The record entries of each GPU target of build_info.json.
CUDA_KEYS = (
    "nvrtc",
    "cuda_targets",
    "cuda_images",
    "cuda_source_hash",
    "ptx_isa",
    "ptx_min_driver",
    "cuda_resources",
)
LAUNCHER_KEYS = ("launcher_library", "gpu_library")


def _partial_plan(gpu, reused):
    """For a build of the GPU targets ``gpu`` (``reused``: the CUDA images of the last build
    are kept as they are): (the outputs to remove before building, the entries of the last
    record to keep). A GPU target not being built keeps its outputs and their entries in
    build_info.json (where they all still exist): ``--only tf`` or ``--only tf,launcher``
    never removes the CUDA images, ``--only cuda`` never the launcher."""
    try:
        with open(os.path.join(OUT_DIR, BUILD_INFO)) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        previous = {}

    def present(names):
        return all(os.path.isfile(os.path.join(OUT_DIR, n)) for n in names if n)

    stale, kept = [CPU_LIB, BUILD_INFO], {}
    if "cuda" in gpu:
        if reused is None:
            stale += [
                os.path.basename(p) for p in glob.glob(os.path.join(OUT_DIR, "sapa_kernels.*"))
            ]
    elif previous.get("cuda_images") and present(previous["cuda_images"]):
        kept.update({k: previous[k] for k in CUDA_KEYS if k in previous})
    if "launcher" in gpu:
        stale += [GPU_LIB, LAUNCHER_LIB]
    else:
        kept.update(
            {k: previous[k] for k in LAUNCHER_KEYS if previous.get(k) and present([previous[k]])}
        )
    return stale, kept


def _build_tf_part(args, targets, cxx, simd):
    """The TensorFlow library, the CUDA images, the launcher and the TensorFlow GPU
    library, recorded in build_info.json. Returns the exit status."""
    try:
        tf, compile_flags, link_flags, _ = _tf_flags()
        cxx_version = _compiler_version(cxx)
    except BuildError as exc:
        if "tf" not in targets:  # the launcher and CUDA images need no TensorFlow ...
            tf, compile_flags, link_flags, cxx_version = None, [], [], None
        else:
            _log(f"ERROR: the CPU custom op library could not be built.\n{exc}")
            return 1
    if tf is None:  # ... but they are recorded beside it: skipped without TensorFlow
        _log("no TensorFlow: the CUDA images and the launcher are built with it")
        return 0
    gpu = [t for t in GPU_TARGETS if t in targets]
    cuda = cuda_targets(tf) if "cuda" in gpu else []
    nvrtc_path = find_nvrtc() if "cuda" in gpu else None
    nvrtc_version = None
    if nvrtc_path:
        try:
            nvrtc_version = "{}.{}".format(*Nvrtc(nvrtc_path).version)
        except (OSError, BuildError):
            nvrtc_version = None
    stamp = build_stamp(
        {
            "tensorflow": tf.__version__,
            "cxx": cxx_version,
            "simd": simd,
            "compile_flags": compile_flags,
            "link_flags": link_flags,
            "gpu": gpu,
            "targets": cuda,
            "nvrtc": nvrtc_version,
            "python": platform.python_version(),
        }
    )
    if not args.force and _up_to_date(
        BUILD_INFO, stamp, ("cpu_library", "gpu_library", "launcher_library", "cuda_images")
    ):
        _log(
            "TensorFlow library, CUDA images, launcher: up to date (sources, flags, compiler "
            "and versions unchanged); --force rebuilds"
        )
        return 0
    try:
        cpu_lib = build_cpu(compile_flags, link_flags, cxx, simd, args.jobs, args.verbose)
    except BuildError as exc:
        _log(f"ERROR: the CPU custom op library could not be built.\n{exc}")
        return 1

    os.makedirs(OUT_DIR, exist_ok=True)
    info = {
        "tensorflow_version": tf.__version__,
        "tensorflow_cuda": bool(tf.test.is_built_with_cuda()),
        "cxx": cxx_version,
        "cxx_flags": ["-O3", *simd],
        "cpu_features": cpu_features_for(simd),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_library": CPU_LIB,
        "gpu_library": None,
        "launcher_library": None,
        "nvrtc": None,
        "cuda_targets": [],
        "cuda_images": [],
        "gpu_status": None if gpu else "skipped (--no-gpu)",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stamp": None,
    }
    reused = None if args.force or "cuda" not in gpu else _reusable_images(cuda, nvrtc_version)
    stale, kept = _partial_plan(gpu, reused)
    _remove_outputs(stale)
    info.update(kept)
    kept_what = [
        w
        for w, keys in (("CUDA images", CUDA_KEYS), ("launcher", LAUNCHER_KEYS))
        if any(k in kept for k in keys)
    ]
    if kept_what:
        info["gpu_status"] = f"kept from the last build: {', '.join(kept_what)}"
    shutil.copy2(cpu_lib, os.path.join(OUT_DIR, CPU_LIB))

    problems = []
    if "cuda" in gpu:
        try:
            kernels = reused or compile_kernels(cuda, OUT_DIR, args.jobs, args.verbose, nvrtc_path)
            info.update(
                nvrtc=kernels["nvrtc"],
                cuda_targets=kernels["targets"],
                cuda_images=kernels["images"],
                cuda_source_hash=kernels.get("source_hash"),
                ptx_isa=kernels.get("ptx_isa"),
                ptx_min_driver=kernels.get("ptx_min_driver"),
                cuda_resources=kernels.get("resources"),
            )
        except (BuildError, OSError) as exc:
            problems.append(f"CUDA kernels: {str(exc).splitlines()[0]}")
            _log(f"WARNING: CUDA kernels not built; the CPU library is unaffected.\n{exc}")
    if "launcher" in gpu:
        for what, build, key, name in (
            (
                "launcher",
                lambda: build_launcher(cxx, args.verbose),
                "launcher_library",
                LAUNCHER_LIB,
            ),
            (
                "GPU library",
                lambda: build_gpu(compile_flags, link_flags, cxx, args.verbose),
                "gpu_library",
                GPU_LIB,
            ),
        ):
            try:
                shutil.copy2(build(), os.path.join(OUT_DIR, name))
                info[key] = name
            except BuildError as exc:
                problems.append(f"{what}: {str(exc).splitlines()[0]}")
                _log(f"WARNING: the {what} was not built; the CPU library is unaffected.\n{exc}")
    if gpu:
        skipped = [t for t in GPU_TARGETS if t not in gpu]
        info["gpu_status"] = (
            "failed: " + "; ".join(problems)
            if problems
            else "built"
            + (f" (--only: {', '.join(skipped)} skipped)" if skipped else "")
            + (f"; kept from the last build: {', '.join(kept_what)}" if kept_what else "")
        )
    info["stamp"] = stamp
    _write_record(BUILD_INFO, info)
    _log(
        f"wrote {os.path.relpath(OUT_DIR, ROOT)}/ for TensorFlow {tf.__version__}; "
        f"GPU: {info['gpu_status']}"
    )
    return 0


def _build_bindings_part(args, cxx, simd):
    """``_sapa_core.so`` and ``_sapa_jax.so``, recorded in bindings_build_info.json.
    Never fatal: the exit status is 0 (1 with ``--strict`` when something was not built)."""
    try:
        cxx_version = _compiler_version(cxx)
    except BuildError as exc:
        _log(f"WARNING: JAX/PyTorch bindings not built: {exc}. They use their pure paths.")
        return 1 if args.strict else 0
    flags = ["-O3", "-DNDEBUG", "-fopenmp-simd", *simd]
    versions, jax_include, jax_reason = _jax_info()
    stamp = build_stamp(
        {"cxx": cxx_version, "flags": flags, "jax": versions, "python": platform.python_version()},
        _binding_sources(),
    )
    if not args.force and _up_to_date(BINDINGS_INFO, stamp, ("core_library", "jax_library")):
        _log("JAX/PyTorch bindings: up to date; --force rebuilds")
        return 0
    _log(
        f"compiling the JAX/PyTorch bindings with {cxx} "
        f"({' '.join(simd) or 'no extra SIMD flags'})"
        + ("" if jax_include else f"; no JAX library: {jax_reason}")
    )
    start = time.time()
    core, jax_lib, errors = build_bindings(cxx, flags, jax_include, args.jobs, args.verbose)
    os.makedirs(OUT_DIR, exist_ok=True)
    _remove_outputs((CORE_LIB, JAX_LIB, BINDINGS_INFO))
    for path in (core, jax_lib):
        if path:
            shutil.copy2(path, os.path.join(OUT_DIR, os.path.basename(path)))
    if JAX_LIB in errors:
        jax_reason = "compile error: " + errors[JAX_LIB].splitlines()[-1][:300]
    info = {
        "core_abi": CORE_ABI,
        "cxx": cxx_version,
        "cxx_flags": flags,
        "cpu_features": cpu_features_for(simd),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax_version": (versions or {}).get("jax"),
        "jaxlib_version": (versions or {}).get("jaxlib"),
        "core_library": CORE_LIB if core else None,
        "core_status": "built" if core else "failed: " + errors.get(CORE_LIB, "")[-300:],
        "jax_library": JAX_LIB if jax_lib else None,
        "jax_status": "built" if jax_lib else f"not built: {jax_reason}",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stamp": stamp if core and not errors else None,
    }
    _write_record(BINDINGS_INFO, info)
    for what, error in errors.items():
        _log(f"WARNING: {what} was not built:\n{error}")
    _log(
        f"bindings: core {info['core_status'][:80]}; JAX {info['jax_status'][:80]} "
        f"({time.time() - start:.0f}s)"
    )
    return 1 if args.strict and (not core or not jax_lib) else 0


# The on/off options of main().
SWITCHES = (
    ("--no-gpu", "skip the CUDA kernels, the launcher and the GPU library"),
    ("--force", "rebuild even when the stamp says nothing changed"),
    ("--strict", "also exit non-zero when the JAX/PyTorch bindings were not built"),
    ("--generate", "only regenerate custom_ops/sapa/cc/sapa_optable.inc"),
    ("--verbose", "print the compiler commands and their output"),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(TARGETS),
        help=f"comma-separated targets among {', '.join(TARGETS)} (default: all)",
    )
    for flag, help_text in SWITCHES:
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {unknown}; choose among {', '.join(TARGETS)}")
    if args.no_gpu:
        targets = [t for t in targets if t not in GPU_TARGETS]

    del _log_lines[:]
    start = time.time()
    os.makedirs(OUT_DIR, exist_ok=True)
    # One build at a time writes keras_sapa/_lib (a second one waits here).
    with open(os.path.join(OUT_DIR, ".build.lock"), "w") as lock:
        if not _try_lock(lock):
            _log("another build is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        generate_optable()
        if args.generate:
            return 0
        cxx = os.environ.get("CXX", "g++")
        simd = _cpu_simd_flags(cxx)
        status = 0
        if {"tf", "cuda", "launcher"} & set(targets):
            status = _build_tf_part(args, targets, cxx, simd)
        if "bindings" in targets:
            status = max(status, _build_bindings_part(args, cxx, simd))
        _log(f"done in {time.time() - start:.0f}s (log: {os.path.relpath(LOG_FILE, ROOT)})")
        _write_log()
    return status


def _try_lock(lock):
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
