#!/usr/bin/env python3
"""Builds the keras_sapa custom op libraries.

    python custom_ops/build.py [--no-gpu] [--jobs N] [--verbose]

Outputs (in ``keras_sapa/_lib/``):

- ``_sapa_ops.so``: the op registrations and the CPU kernels, built with the host C++
  compiler (``$CXX``, default ``g++``) and TensorFlow's own flags
  (``tf.sysconfig.get_compile_flags()`` / ``get_link_flags()``, passed unchanged).
  ``-O3``; ``-mavx2 -mfma`` are added only when both the compiler and this CPU support
  them (set ``KERAS_SAPA_CPU_FLAGS`` to override, e.g. ``KERAS_SAPA_CPU_FLAGS=""`` for a
  portable build).
- ``_sapa_ops_gpu.so``: the CUDA kernels, registered for ``DEVICE_GPU``, built with nvcc
  (``$NVCC``, default ``nvcc`` on PATH or ``/usr/local/bin/nvcc``) for sm_80 and sm_90
  (``KERAS_SAPA_CUDA_ARCHS="80;90"``). Linked only when TensorFlow is CUDA-enabled
  (``tf.test.is_built_with_cuda()``); otherwise the CUDA file is compiled to an object
  only, to prove it compiles. A GPU build failure never affects the CPU library.
- ``build_info.json``: the TensorFlow version and the compilers used. The loader
  (``keras_sapa/ops/_compiled.py``) refuses a library built for another TensorFlow.

Exits non-zero with a clear message when the CPU library cannot be built (no compiler,
no TensorFlow headers, a compile error); ``scripts/setup_env.sh`` tolerates that and the
package then runs on its pure TensorFlow paths.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "custom_ops", "sapa", "cc")
OUT_DIR = os.path.join(ROOT, "keras_sapa", "_lib")
BUILD_DIR = os.path.join(ROOT, "build", "custom_ops")
CPU_LIB = "_sapa_ops.so"
GPU_LIB = "_sapa_ops_gpu.so"
BUILD_INFO = "build_info.json"

CPU_SOURCES = [
    os.path.join(SRC, "ops", "sapa_ops.cc"),
    os.path.join(SRC, "kernels", "sapa_kernels.cc"),
]
GPU_CUDA_SOURCE = os.path.join(SRC, "kernels", "sapa_kernels_gpu.cu.cc")
GPU_REGISTER_SOURCE = os.path.join(SRC, "kernels", "sapa_kernels_gpu_register.cc")


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


def build_cpu(compile_flags, link_flags, cxx, jobs, verbose):
    simd = _cpu_simd_flags(cxx)
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
    return target, simd


def _find_nvcc():
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cuda_lib_dir(nvcc):
    real = os.path.realpath(nvcc)
    for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        path = os.path.join(os.path.dirname(os.path.dirname(real)), lib)
        if os.path.isfile(os.path.join(path, "libcudart_static.a")):
            return path
    for path in ("/usr/local/cuda/lib64",):
        if os.path.isfile(os.path.join(path, "libcudart_static.a")):
            return path
    return None


def build_gpu(tf, compile_flags, link_flags, include, cxx, verbose):
    """Returns (library path or None, object paths, nvcc version line)."""
    nvcc = _find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set $NVCC); GPU kernels skipped")
    version = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout
    version = [line for line in version.splitlines() if line.strip()][-1].strip()
    archs = os.environ.get("KERAS_SAPA_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    os.makedirs(BUILD_DIR, exist_ok=True)
    cu_obj = os.path.join(BUILD_DIR, "sapa_kernels_gpu.cu.o")
    _log(f"compiling the CUDA kernels with {nvcc} ({version}), archs {archs}")
    start = time.time()
    _run([nvcc, "-c", GPU_CUDA_SOURCE, "-o", cu_obj, *compile_flags, "-DGOOGLE_CUDA=1",
          "-x", "cu", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-O3", "-DNDEBUG",
          "-I" + os.path.join(SRC, "kernels"), *gencode], verbose, "nvcc")
    _log(f"CUDA kernels compiled in {time.time() - start:.0f}s")
    if not tf.test.is_built_with_cuda():
        _log("TensorFlow is not CUDA-enabled: GPU library not linked (compile check only)")
        return None, [cu_obj], version
    reg_obj = os.path.join(BUILD_DIR, "sapa_kernels_gpu_register.cc.o")
    _run([cxx, "-c", GPU_REGISTER_SOURCE, "-o", reg_obj, "-fPIC", "-O2", "-DGOOGLE_CUDA=1",
          *compile_flags, "-I" + os.path.join(SRC, "kernels")], verbose,
         "compiling the GPU kernel registrations")
    libdir = _cuda_lib_dir(nvcc)
    if libdir is None:
        raise BuildError("libcudart_static.a not found next to nvcc; GPU library not linked")
    target = os.path.join(BUILD_DIR, GPU_LIB)
    # The CUDA runtime is linked statically: the library then does not depend on the
    # CUDA runtime version TensorFlow itself ships with.
    _run([cxx, "-shared", reg_obj, cu_obj, "-o", target, *link_flags,
          "-L" + libdir, "-lcudart_static", "-ldl", "-lrt", "-lpthread"], verbose,
         "linking the GPU library")
    return target, [cu_obj, reg_obj], version


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-gpu", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    cxx = os.environ.get("CXX", "g++")
    try:
        tf, compile_flags, link_flags, include = _tf_flags()
        cxx_version = _compiler_version(cxx)
        cpu_lib, simd = build_cpu(compile_flags, link_flags, cxx, args.jobs, args.verbose)
    except BuildError as exc:
        _log(f"ERROR: the CPU custom op library could not be built.\n{exc}")
        return 1

    os.makedirs(OUT_DIR, exist_ok=True)
    info = {
        "tensorflow_version": tf.__version__,
        "tensorflow_cuda": bool(tf.test.is_built_with_cuda()),
        "cxx": cxx_version,
        "cxx_flags": ["-O3", *simd],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_library": CPU_LIB,
        "gpu_library": None,
        "nvcc": None,
        "gpu_status": "skipped (--no-gpu)" if args.no_gpu else None,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Remove stale outputs first, so a failed build never leaves a mismatched pair.
    for name in (CPU_LIB, GPU_LIB, BUILD_INFO):
        path = os.path.join(OUT_DIR, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.copy2(cpu_lib, os.path.join(OUT_DIR, CPU_LIB))

    if not args.no_gpu:
        try:
            gpu_lib, _, nvcc_version = build_gpu(tf, compile_flags, link_flags, include, cxx,
                                                 args.verbose)
            info["nvcc"] = nvcc_version
            if gpu_lib is not None:
                shutil.copy2(gpu_lib, os.path.join(OUT_DIR, GPU_LIB))
                info["gpu_library"] = GPU_LIB
                info["gpu_status"] = "built"
            else:
                info["gpu_status"] = "compiled only (TensorFlow not CUDA-enabled)"
        except BuildError as exc:
            info["gpu_status"] = f"failed: {str(exc).splitlines()[0]}"
            _log(f"WARNING: GPU kernels not built; the CPU library is unaffected.\n{exc}")

    with open(os.path.join(OUT_DIR, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    _log(f"wrote {os.path.relpath(OUT_DIR, ROOT)}/{{{CPU_LIB}, {BUILD_INFO}}} "
         f"for TensorFlow {tf.__version__}; GPU: {info['gpu_status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
