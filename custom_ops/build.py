#!/usr/bin/env python3
"""Builds the keras_sapa native code.

    python custom_ops/build.py [--no-gpu] [--force] [--jobs N] [--verbose]

Outputs (in ``keras_sapa/_lib/``):

- ``_sapa_ops.so``: the op registrations and the CPU kernels, built with the host C++
  compiler (``$CXX``, default ``g++``) and TensorFlow's own flags
  (``tf.sysconfig.get_compile_flags()`` / ``get_link_flags()``, passed unchanged).
  ``-O3``; ``-mavx2 -mfma`` are added only when both the compiler and this CPU support
  them (set ``KERAS_SAPA_CPU_FLAGS`` to override, e.g. ``KERAS_SAPA_CPU_FLAGS=""`` for a
  portable build). The CPU features those flags need are recorded in ``build_info.json``
  (``cpu_features``) and checked by the loader against the running CPU.
- ``sapa_kernels.<target>.cubin`` / ``.ptx``: the CUDA kernels
  (``custom_ops/sapa/kernels/cuda/``), compiled with NVRTC from the
  ``nvidia-cuda-nvrtc-cu12`` wheel (headers from ``nvidia-cuda-runtime-cu12``), loaded
  with ctypes: no nvcc, no CUDA toolkit, no GPU needed. Targets: a cubin for every
  architecture in TensorFlow's ``cuda_compute_capabilities`` plus PTX for the newest
  (``KERAS_SAPA_CUDA_TARGETS="sm_75,sm_80,compute_90"`` overrides; without TensorFlow,
  ``DEFAULT_TARGETS``).
- ``libsapa_launcher.so``: the framework-free launcher (``custom_ops/sapa/launcher/``,
  driver API through ``dlopen("libcuda.so.1")``), plain C ABI, for ctypes callers such as
  ``scripts/gpu_harness.py``.
- ``_sapa_ops_gpu.so``: the TensorFlow ``DEVICE_GPU`` kernels: the thin adapter
  (``custom_ops/sapa/cc/kernels/sapa_kernels_gpu.cc``) and the launcher, built with g++
  alone (no CUDA headers, no CUDA runtime). A GPU build failure never affects the CPU
  library.
- ``build_info.json``: TensorFlow version, compilers, flags, CPU features, NVRTC version
  and targets, and ``stamp``, a hash of everything the build depends on (sources, flags,
  compiler, TensorFlow and NVRTC versions, targets). When the stamp is unchanged and every
  output exists the build is skipped; ``--force`` rebuilds.

Exits non-zero with a clear message when the CPU library cannot be built (no compiler,
no TensorFlow headers, a compile error); ``scripts/setup_env.sh`` tolerates that and the
package then runs on its pure paths.
"""

import argparse
import concurrent.futures
import ctypes
import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAPA = os.path.join(ROOT, "custom_ops", "sapa")
SRC = os.path.join(SAPA, "cc")
CUDA_DIR = os.path.join(SAPA, "kernels", "cuda")
LAUNCHER_DIR = os.path.join(SAPA, "launcher")
OUT_DIR = os.path.join(ROOT, "keras_sapa", "_lib")
BUILD_DIR = os.path.join(ROOT, "build", "custom_ops")
CPU_LIB = "_sapa_ops.so"
GPU_LIB = "_sapa_ops_gpu.so"
LAUNCHER_LIB = "libsapa_launcher.so"
BUILD_INFO = "build_info.json"

CPU_SOURCES = [
    os.path.join(SRC, "ops", "sapa_ops.cc"),
    os.path.join(SRC, "kernels", "sapa_kernels.cc"),
]
GPU_ADAPTER_SOURCE = os.path.join(SRC, "kernels", "sapa_kernels_gpu.cc")
LAUNCHER_SOURCE = os.path.join(LAUNCHER_DIR, "sapa_launcher.cc")
CUDA_SOURCE = os.path.join(CUDA_DIR, "sapa_kernels.cu")

# Used when TensorFlow (and its build info) is absent: Pascal to Hopper, PTX for the newest.
DEFAULT_TARGETS = ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
# The CPU feature (as in /proc/cpuinfo) each SIMD flag requires.
FLAG_FEATURES = {"-mavx2": "avx2", "-mfma": "fma", "-mavx512f": "avx512f", "-mavx": "avx",
                 "-msse4.2": "sse4_2", "-mf16c": "f16c"}


class BuildError(RuntimeError):
    pass


def _log(msg):
    print(f"[keras_sapa build] {msg}", flush=True)


def _run(cmd, verbose, what):
    if verbose:
        _log(" ".join(cmd))
    start = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        raise BuildError(f"TensorFlow cannot be imported ({exc!r}); nothing to build against")
    compile_flags = list(tf.sysconfig.get_compile_flags())
    link_flags = list(tf.sysconfig.get_link_flags())
    include = tf.sysconfig.get_include()
    if not os.path.isfile(os.path.join(include, "tensorflow", "core", "framework", "op.h")):
        raise BuildError(f"TensorFlow headers not found under {include}")
    return tf, compile_flags, link_flags, include


def _compiler_version(cxx):
    try:
        out = subprocess.run([cxx, "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"C++ compiler {cxx!r} not usable: {exc}")


def _cpu_simd_flags(cxx):
    """['-mavx2', '-mfma'] when the compiler accepts them and this CPU runs them."""
    if "KERAS_SAPA_CPU_FLAGS" in os.environ:
        return os.environ["KERAS_SAPA_CPU_FLAGS"].split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    probe = (
        "int main() { __builtin_cpu_init(); "
        "return (__builtin_cpu_supports(\"avx2\") && __builtin_cpu_supports(\"fma\")) ? 0 : 1; }\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cc")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(probe)
        try:
            subprocess.run([cxx, "-mavx2", "-mfma", src, "-o", exe], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ok = subprocess.run([exe]).returncode == 0
        except (OSError, subprocess.CalledProcessError):
            ok = False
    return ["-mavx2", "-mfma"] if ok else []


def cpu_features_for(flags):
    """The CPU features (``/proc/cpuinfo`` names) the given compiler flags require."""
    features = []
    for flag in flags:
        if flag.startswith("-march=") or flag.startswith("-mcpu="):
            features.append(flag)  # cannot be checked precisely: recorded as is
        elif flag in FLAG_FEATURES:
            features.append(FLAG_FEATURES[flag])
    return features


def build_cpu(compile_flags, link_flags, cxx, simd, jobs, verbose):
    common = ["-fPIC", "-O3", "-DNDEBUG", "-fopenmp-simd", *simd, *compile_flags,
              "-I" + os.path.join(SRC, "kernels")]
    os.makedirs(BUILD_DIR, exist_ok=True)
    objects = []
    commands = []
    for source in CPU_SOURCES:
        obj = os.path.join(BUILD_DIR, os.path.basename(source) + ".o")
        objects.append(obj)
        commands.append([cxx, "-c", source, "-o", obj, *common])
    _log(f"compiling the CPU kernels with {cxx} ({' '.join(simd) or 'no extra SIMD flags'})")
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_run, cmd, verbose, f"compiling {os.path.basename(cmd[2])}")
                   for cmd in commands]
        for future in futures:
            future.result()
    target = os.path.join(BUILD_DIR, CPU_LIB)
    _run([cxx, "-shared", *objects, "-o", target, *link_flags, "-O3"], verbose,
         "linking the CPU library")
    _log(f"CPU library built in {time.time() - start:.0f}s")
    return target


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
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                                name.encode(), 0, None, None), "create")
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
            self._check(getattr(self.lib, f"nvrtcGet{getter}Size")(prog, ctypes.byref(size)),
                        f"get {getter} size")
            data = ctypes.create_string_buffer(size.value)
            self._check(getattr(self.lib, f"nvrtcGet{getter}")(prog, data), f"get {getter}")
            return data.raw, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cuda_targets(tf=None):
    """Targets from ``$KERAS_SAPA_CUDA_TARGETS``, else TensorFlow's
    ``cuda_compute_capabilities`` (a cubin for each, ``compute_XY`` also as a cubin) plus
    PTX for the newest, else ``DEFAULT_TARGETS``."""
    env = os.environ.get("KERAS_SAPA_CUDA_TARGETS")
    if env:
        return [t.strip() for t in env.replace(";", ",").split(",") if t.strip()]
    caps = []
    if tf is not None:
        try:
            caps = list(tf.sysconfig.get_build_info().get("cuda_compute_capabilities") or [])
        except Exception:  # noqa: BLE001 - a CPU-only TensorFlow has no such entry
            caps = []
    numbers = sorted({int(c.split("_")[1]) for c in caps
                      if c.split("_")[-1].isdigit() and c.startswith(("sm_", "compute_"))})
    if not numbers:
        return list(DEFAULT_TARGETS)
    return [f"sm_{n}" for n in numbers] + [f"compute_{numbers[-1]}"]


def image_name(target):
    return f"sapa_kernels.{target}." + ("cubin" if target.startswith("sm_") else "ptx")


def kernel_names():
    """Every extern "C" kernel the image must define (as the launcher names them)."""
    names = []
    for t in ("f32", "f64", "f16", "bf16"):
        for k in (3, 5, 7):
            names += [f"sapa_dot_{t}_k{k}", f"sapa_dsoftmax_{t}_k{k}", f"sapa_fused_{t}_k{k}"]
        suffixes = ["", "_wacc"] if t in ("f16", "bf16") else [""]
        for suffix in suffixes:
            for op in ("gather", "scatter"):
                names += [f"sapa_{op}_{t}{suffix}", f"sapa_{op}_{t}{suffix}_any"]
        names += [f"sapa_dot_{t}_any", f"sapa_dsoftmax_{t}_any", f"sapa_fused_{t}_any"]
    return names


def nvrtc_options(include):
    return ["-I" + CUDA_DIR, "-I" + include, "--std=c++17", "-default-device"]


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
    {"nvrtc": "12.9", "targets": [...], "images": [...], "source_hash": ...}.
    Raises BuildError."""
    nvrtc_path = nvrtc_path or find_nvrtc()
    if nvrtc_path is None:
        raise BuildError("NVRTC not found (install nvidia-cuda-nvrtc-cu12 or set "
                         "$KERAS_SAPA_NVRTC); CUDA kernels skipped")
    include = include or find_cuda_include()
    if include is None:
        raise BuildError("cuda_fp16.h not found (install nvidia-cuda-runtime-cu12 or set "
                         "$KERAS_SAPA_CUDA_INCLUDE); CUDA kernels skipped")
    nvrtc = Nvrtc(nvrtc_path)
    with open(CUDA_SOURCE) as f:
        source = f.read()
    options = nvrtc_options(include)
    _log(f"compiling the CUDA kernels with NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} "
         f"for {', '.join(targets)}")
    start = time.time()

    def one(target):
        data, log = nvrtc.compile(source, os.path.basename(CUDA_SOURCE), target, options)
        missing = [n for n in kernel_names() if n.encode() not in data]
        if missing:
            raise BuildError(f"the {target} image lacks the kernels {missing[:5]}...")
        if verbose and log.strip():
            _log(f"{target}: {log.strip()}")
        return target, data

    os.makedirs(out_dir, exist_ok=True)
    images = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for target, data in pool.map(one, targets):
            path = os.path.join(out_dir, image_name(target))
            with open(path, "wb") as f:
                f.write(data)
            images.append(image_name(target))
    _log(f"CUDA kernels compiled in {time.time() - start:.0f}s")
    return {"nvrtc": f"{nvrtc.version[0]}.{nvrtc.version[1]}", "targets": list(targets),
            "images": images, "source_hash": cuda_source_hash(include)}


def build_launcher(cxx, verbose):
    """The standalone launcher library (no TensorFlow)."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    target = os.path.join(BUILD_DIR, LAUNCHER_LIB)
    _run([cxx, "-shared", "-fPIC", "-O2", "-std=c++17", LAUNCHER_SOURCE, "-o", target, "-ldl",
          "-static-libstdc++", "-static-libgcc"], verbose, "building the launcher")
    return target


def build_gpu(compile_flags, link_flags, cxx, verbose):
    """The TensorFlow GPU adapter + launcher, with g++ alone."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    objects = []
    for source in (GPU_ADAPTER_SOURCE, LAUNCHER_SOURCE):
        obj = os.path.join(BUILD_DIR, os.path.basename(source) + ".gpu.o")
        _run([cxx, "-c", source, "-o", obj, "-fPIC", "-O2", "-DNDEBUG", *compile_flags,
              "-I" + os.path.join(SRC, "kernels")], verbose,
             f"compiling {os.path.basename(source)}")
        objects.append(obj)
    target = os.path.join(BUILD_DIR, GPU_LIB)
    _run([cxx, "-shared", *objects, "-o", target, *link_flags, "-ldl"], verbose,
         "linking the GPU library")
    return target


# ---------------------------------------------------------------------------------------
# Stamp


def _sources():
    paths = set(CPU_SOURCES)
    for pattern in ("**/*.cc", "**/*.h", "**/*.cu", "**/*.cuh"):
        paths.update(glob.glob(os.path.join(SAPA, pattern), recursive=True))
    paths.add(os.path.abspath(__file__))
    # The launcher's test stand-ins and the JAX/PyTorch bindings (built by
    # build_bindings.py, with their own stamp) are not inputs of this build.
    skip = {"testing", "bindings"}
    return sorted(p for p in paths if not skip & set(os.path.relpath(p, SAPA).split(os.sep)))


def build_stamp(parts):
    """Hash of the sources and of ``parts`` (flags, compiler, versions, targets)."""
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(json.dumps(parts, sort_keys=True).encode())
    return digest.hexdigest()


def _up_to_date(stamp):
    path = os.path.join(OUT_DIR, BUILD_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    if info.get("stamp") != stamp:
        return False
    outputs = [info.get("cpu_library"), info.get("gpu_library"), info.get("launcher_library"),
               *(info.get("cuda_images") or [])]
    return all(os.path.isfile(os.path.join(OUT_DIR, o)) for o in outputs if o)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-gpu", action="store_true",
                        help="skip the CUDA kernels, the launcher and the GPU library")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when the stamp says nothing changed")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    cxx = os.environ.get("CXX", "g++")
    try:
        tf, compile_flags, link_flags, _ = _tf_flags()
        cxx_version = _compiler_version(cxx)
    except BuildError as exc:
        _log(f"ERROR: the CPU custom op library could not be built.\n{exc}")
        return 1
    simd = _cpu_simd_flags(cxx)
    targets = [] if args.no_gpu else cuda_targets(tf)
    nvrtc_path = None if args.no_gpu else find_nvrtc()
    nvrtc_version = None
    if nvrtc_path:
        try:
            nvrtc_version = "%d.%d" % Nvrtc(nvrtc_path).version
        except (OSError, BuildError):
            nvrtc_version = None
    stamp = build_stamp({
        "tensorflow": tf.__version__, "cxx": cxx_version, "simd": simd,
        "compile_flags": compile_flags, "link_flags": link_flags, "no_gpu": args.no_gpu,
        "targets": targets, "nvrtc": nvrtc_version, "python": platform.python_version(),
    })
    if not args.force and _up_to_date(stamp):
        _log("up to date (sources, flags, compiler and versions unchanged); "
             "--force rebuilds")
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
        "gpu_status": "skipped (--no-gpu)" if args.no_gpu else None,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stamp": None,
    }
    # Remove stale outputs first, so a failed build never leaves a mismatched set.
    stale = [CPU_LIB, GPU_LIB, LAUNCHER_LIB, BUILD_INFO]
    stale += [os.path.basename(p) for p in glob.glob(os.path.join(OUT_DIR, "sapa_kernels.*"))]
    for name in stale:
        path = os.path.join(OUT_DIR, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.copy2(cpu_lib, os.path.join(OUT_DIR, CPU_LIB))

    if not args.no_gpu:
        problems = []
        try:
            kernels = compile_kernels(targets, OUT_DIR, args.jobs, args.verbose, nvrtc_path)
            info.update(nvrtc=kernels["nvrtc"], cuda_targets=kernels["targets"],
                        cuda_images=kernels["images"],
                        cuda_source_hash=kernels.get("source_hash"))
        except (BuildError, OSError) as exc:
            problems.append(f"CUDA kernels: {str(exc).splitlines()[0]}")
            _log(f"WARNING: CUDA kernels not built; the CPU library is unaffected.\n{exc}")
        for what, build, key, name in (
            ("launcher", lambda: build_launcher(cxx, args.verbose), "launcher_library",
             LAUNCHER_LIB),
            ("GPU library", lambda: build_gpu(compile_flags, link_flags, cxx, args.verbose),
             "gpu_library", GPU_LIB),
        ):
            try:
                shutil.copy2(build(), os.path.join(OUT_DIR, name))
                info[key] = name
            except BuildError as exc:
                problems.append(f"{what}: {str(exc).splitlines()[0]}")
                _log(f"WARNING: the {what} was not built; the CPU library is unaffected.\n{exc}")
        info["gpu_status"] = "built" if not problems else "failed: " + "; ".join(problems)
    info["stamp"] = stamp

    with open(os.path.join(OUT_DIR, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    _log(f"wrote {os.path.relpath(OUT_DIR, ROOT)}/ for TensorFlow {tf.__version__}; "
         f"GPU: {info['gpu_status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
