#!/usr/bin/env python3
"""Builds SAPA's compiled CPU kernels for JAX and PyTorch (no TensorFlow needed).

    python custom_ops/build_bindings.py [--force] [--strict] [--verbose]

Outputs (in ``keras_sapa/_lib/``):

- ``_sapa_core.so``: the framework-free kernel core (``custom_ops/sapa/kernels/cpu/``),
  a small thread pool and plain C entry points (``custom_ops/sapa/bindings/sapa_core_c.h``),
  built with the C++ compiler alone (``$CXX``, default ``g++``). PyTorch calls it through
  ctypes (``keras_sapa/ops/_torch_kernels.py``).
- ``_sapa_jax.so``: the XLA FFI handlers (``custom_ops/sapa/bindings/sapa_xla_ffi.cc``),
  built only when JAX is installed (headers from ``jax.ffi.include_dir()``); linked to
  ``_sapa_core.so``, found beside it. ``keras_sapa/ops/_jax_kernels.py`` registers them.
- ``bindings_build_info.json``: compiler, flags, CPU features the flags need, JAX and
  jaxlib versions, what was built and why not, and a stamp of all inputs (an unchanged
  stamp skips the build; ``--force`` rebuilds).

``-O3``; ``-mavx2 -mfma`` when the compiler and this CPU support them, as for the
TensorFlow library (``KERAS_SAPA_CPU_FLAGS`` overrides, e.g. ``""`` for a portable build).

Never fatal: a missing compiler or JAX, or a compile error, is reported and the package
then runs on its pure paths. The exit status is 0 unless ``--strict`` is given and
something was not built.
"""

import argparse
import concurrent.futures
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SAPA = os.path.join(HERE, "sapa")
BINDINGS = os.path.join(SAPA, "bindings")
OUT_DIR = os.path.join(ROOT, "keras_sapa", "_lib")
BUILD_DIR = os.path.join(ROOT, "build", "bindings")
CORE_LIB = "_sapa_core.so"
JAX_LIB = "_sapa_jax.so"
BUILD_INFO = "bindings_build_info.json"
CORE_SOURCE = os.path.join(BINDINGS, "sapa_core_c.cc")
JAX_SOURCE = os.path.join(BINDINGS, "sapa_xla_ffi.cc")
# Must match KERAS_SAPA_CORE_ABI in sapa_core_c.h (the loader checks the library's).
CORE_ABI = 1


def _load_tf_build_helpers():
    """The SIMD-flag probe and the flag -> CPU feature table of ``build.py`` (shared so
    that both libraries are built for the same CPU); None when unusable."""
    try:
        spec = importlib.util.spec_from_file_location("_keras_sapa_build", os.path.join(HERE, "build.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module._cpu_simd_flags, module.cpu_features_for
    except Exception as exc:  # a broken or moved build.py must not stop this build
        _log(f"WARNING: custom_ops/build.py unusable ({exc!r}); building without SIMD flags")
        return None


def _log(msg):
    print(f"[build_bindings] {msg}", flush=True)


def _run(cmd, verbose):
    if verbose:
        _log(" ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout}")


def _compiler_version(cxx):
    try:
        out = subprocess.run([cxx, "--version"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"C++ compiler {cxx!r} not usable: {exc}"
    return out.splitlines()[0].strip(), None


def _jax_info():
    """(version dict, include dir, None) or (None, None, reason)."""
    if importlib.util.find_spec("jax") is None:
        return None, None, "JAX is not installed"
    try:
        import jax
        import jax.ffi
        import jaxlib

        include = jax.ffi.include_dir()
    except Exception as exc:
        return None, None, f"JAX's FFI headers are unavailable ({exc!r})"
    if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
        return None, None, f"xla/ffi/api/ffi.h not found under {include}"
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}, include, None


def _sources():
    paths = glob.glob(os.path.join(BINDINGS, "*"))
    paths += glob.glob(os.path.join(SAPA, "kernels", "cpu", "*.h"))
    paths.append(os.path.abspath(__file__))
    return sorted(p for p in paths if os.path.isfile(p))


def _stamp(parts):
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(json.dumps(parts, sort_keys=True).encode())
    return digest.hexdigest()


def _up_to_date(stamp):
    try:
        with open(os.path.join(OUT_DIR, BUILD_INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    outputs = [info.get("core_library"), info.get("jax_library")]
    return info.get("stamp") == stamp and all(
        os.path.isfile(os.path.join(OUT_DIR, o)) for o in outputs if o)


def build(cxx, flags, jax_include, verbose):
    """Compiles both libraries into BUILD_DIR; returns (core path or None, jax path or
    None, {what: error})."""
    os.makedirs(BUILD_DIR, exist_ok=True)
    common = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", *flags]
    core = os.path.join(BUILD_DIR, CORE_LIB)
    jax_obj = os.path.join(BUILD_DIR, "sapa_xla_ffi.o")
    jobs = {"core": [cxx, *common, "-shared", CORE_SOURCE, "-o", core]}
    if jax_include:
        # The FFI headers are third-party: -isystem keeps their warnings out of the log.
        jobs["jax"] = [cxx, "-std=c++17", "-fPIC", "-O2", "-DNDEBUG", "-isystem", jax_include,
                       "-c", JAX_SOURCE, "-o", jax_obj]
    errors = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {what: pool.submit(_run, cmd, verbose) for what, cmd in jobs.items()}
        for what, future in futures.items():
            try:
                future.result()
            except RuntimeError as exc:
                errors[what] = str(exc)
    if "core" in errors:
        return None, None, errors
    jax_lib = None
    if jax_include and "jax" not in errors:
        jax_lib = os.path.join(BUILD_DIR, JAX_LIB)
        try:
            _run([cxx, "-shared", jax_obj, "-o", jax_lib, "-L" + BUILD_DIR, "-l:" + CORE_LIB,
                  "-Wl,-rpath,$ORIGIN"], verbose)
        except RuntimeError as exc:
            errors["jax"] = str(exc)
            jax_lib = None
    return core, jax_lib, errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero when a library was not built")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    cxx = os.environ.get("CXX", "g++")
    cxx_version, problem = _compiler_version(cxx)
    if problem:
        _log(f"WARNING: nothing built: {problem}. JAX and PyTorch use their pure paths.")
        return 1 if args.strict else 0
    helpers = _load_tf_build_helpers()
    simd = helpers[0](cxx) if helpers else []
    features = helpers[1](simd) if helpers else []
    flags = ["-O3", "-DNDEBUG", "-fopenmp-simd", *simd]
    versions, jax_include, jax_reason = _jax_info()
    stamp = _stamp({"cxx": cxx_version, "flags": flags, "jax": versions,
                    "python": platform.python_version()})
    if not args.force and _up_to_date(stamp):
        _log("up to date (sources, flags, compiler and JAX unchanged); --force rebuilds")
        return 0

    _log(f"compiling with {cxx} ({' '.join(simd) or 'no extra SIMD flags'})"
         + ("" if jax_include else f"; no JAX library: {jax_reason}"))
    start = time.time()
    core, jax_lib, errors = build(cxx, flags, jax_include, args.verbose)
    os.makedirs(OUT_DIR, exist_ok=True)
    for name in (CORE_LIB, JAX_LIB, BUILD_INFO):  # never leave a mismatched set behind
        path = os.path.join(OUT_DIR, name)
        if os.path.exists(path):
            os.remove(path)
    for path in (core, jax_lib):
        if path:
            shutil.copy2(path, os.path.join(OUT_DIR, os.path.basename(path)))
    if "jax" in errors:
        jax_reason = "compile error: " + errors["jax"].splitlines()[-1][:300]
    info = {
        "core_abi": CORE_ABI,
        "cxx": cxx_version,
        "cxx_flags": flags,
        "cpu_features": features,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax_version": (versions or {}).get("jax"),
        "jaxlib_version": (versions or {}).get("jaxlib"),
        "core_library": CORE_LIB if core else None,
        "core_status": "built" if core else "failed: " + errors.get("core", "")[-300:],
        "jax_library": JAX_LIB if jax_lib else None,
        "jax_status": "built" if jax_lib else f"not built: {jax_reason}",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stamp": stamp if core and not errors else None,
    }
    with open(os.path.join(OUT_DIR, BUILD_INFO), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    for what, error in errors.items():
        _log(f"WARNING: the {what} library was not built:\n{error}")
    _log(f"core: {info['core_status'][:80]}; JAX: {info['jax_status'][:80]} "
         f"({time.time() - start:.0f}s)")
    return 1 if args.strict and (not core or not jax_lib) else 0


if __name__ == "__main__":
    sys.exit(main())
