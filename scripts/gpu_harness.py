#!/usr/bin/env python3
"""Proves the SAPA CUDA kernels on a GPU without TensorFlow, and benchmarks them.

    python scripts/gpu_harness.py [--lib-dir keras_sapa/_lib] [--backend torch|cupy]
        [--skip-check] [--skip-bench] [--skip-big] [--official third_party_ref/sapa]
        [--log gpu_harness.log]

It loads what ``custom_ops/build.py`` produced, exactly as shipped: the framework-free
launcher (``libsapa_launcher.so``, driver API through ``dlopen("libcuda.so.1")``) and
the NVRTC kernel images (``sapa_kernels.<target>.cubin/.ptx``), and calls the launcher
through ctypes with PyTorch (or CuPy) device pointers and the current stream. Needs
NumPy and PyTorch or CuPy; no TensorFlow, no Keras, no CUDA toolkit.

1. Check: the launcher's own self-test (``sapa_self_test``: every launch configuration
   it can choose on this GPU, every dtype, against its float64 CPU reference); every
   kernel, forward and backward, tiled and untiled, float32 / float16 / bfloat16 /
   float64, at C=256 d=64, odd sizes, K 1/3/5/7/9, s 1/2/3/4, against the float64 NumPy
   reference of ``tests/reference.py`` (plus a float64 directional derivative of the
   reference for the gradients); SAPA-D's entry points (forward, and the gradients of
   query, key, value and offsets) at the official P=9, G=4, E=32 with C=256 and at odd
   sizes against ``tests/reference_deform.py``, and in float32 / float64 its halves
   (similarity, aggregation and their backwards); and one case whose output is past 2**31
   elements (checked on sampled points, including the last ones).
2. Benchmark M1 (B=4, 64x64 -> 128x128, C=256, d=64, K=5, s=2), float32 and float16
   (PyTorch backend):
   a device copy (bandwidth ceiling), bilinear ``torch.nn.functional.interpolate`` of the
   same tensor, our fused forward and forward+backward, a PyTorch unfold
   implementation, and the official SAPA CUDA kernels when a copy of
   github.com/poppinace/sapa sits in ``--official`` (a git-ignored folder; built there
   with PyTorch's extension builder). Prints time, achieved bandwidth (bytes that must
   move / time), the copy bandwidth, and ratios. Then the same M1 through XLA with JAX
   (the ``xla`` formulation that ``jit_compile=True`` runs): time and XLA's temporary
   memory, forward and forward+backward (``--skip-jax`` to leave out).

Everything printed also goes to ``--log``. Exit status: 0 all checks passed, 1 a check
failed, 2 the harness could not run (no driver, no GPU, no image for it, no PyTorch/CuPy):
the message says which.
"""

import argparse
import contextlib
import ctypes
import importlib.util
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LIB_DIR = os.path.join(ROOT, "keras_sapa", "_lib")
LAUNCHER_LIB = "libsapa_launcher.so"

SAPA_OK, SAPA_ERR_NO_DRIVER, SAPA_ERR_DRIVER, SAPA_ERR_NO_IMAGE = 0, 1, 2, 3
SAPA_ERR_LAUNCH, SAPA_ERR_INVALID, SAPA_ERR_IO = 4, 5, 6
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
STATUS_NAMES = {
    0: "ok",
    1: "no driver",
    2: "driver error",
    3: "no image",
    4: "launch failed",
    5: "invalid argument",
    6: "io error",
}


class LauncherError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"{STATUS_NAMES.get(status, status)}: {message}")
        self.status = status


class SapaDims(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("batch", "height", "width", "up", "kernel", "channels", "channels_v")
    ]


class SapaDeformDims(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_int64)
        for name in ("batch", "height", "width", "up", "points", "groups", "dim", "channels")
    ]


def dims(batch, height, width, up, kernel, channels, channels_v=None):
    return SapaDims(
        batch, height, width, up, kernel, channels, channels if channels_v is None else channels_v
    )


class Launcher:
    """ctypes binding of custom_ops/sapa/launcher/sapa_launcher.h."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        lib = self.lib
        lib.sapa_last_error.restype = ctypes.c_char_p
        lib.sapa_init.argtypes = [ctypes.c_char_p]
        lib.sapa_add_image.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.sapa_load_image_dir.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
        lib.sapa_select_image.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.sapa_device_info.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.sapa_set_untiled.argtypes = [ctypes.c_int]
        lib.sapa_last_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        ]
        p = ctypes.c_void_p
        for name, npointers in (
            ("sapa_dot", 3),
            ("sapa_gather", 3),
            ("sapa_scatter", 3),
            ("sapa_gather_acc", 3),
            ("sapa_scatter_acc", 3),
            ("sapa_forward", 5),
            ("sapa_softmax_backward", 4),
            ("sapa_backward", 9),
        ):
            getattr(lib, name).argtypes = [p, ctypes.c_int, ctypes.POINTER(SapaDims)] + [
                p
            ] * npointers
        deform = ctypes.POINTER(SapaDeformDims)
        lib.sapa_deform_forward.argtypes = [p, ctypes.c_int, deform] + [p] * 6
        lib.sapa_deform_backward.argtypes = [p, ctypes.c_int, deform] + [p] * 11
        for name in ("sapa_deform_similarity", "sapa_deform_aggregate"):
            getattr(lib, name).argtypes = [p, ctypes.c_int, deform] + [p] * 4
        for name in ("sapa_deform_similarity_backward", "sapa_deform_aggregate_backward"):
            getattr(lib, name).argtypes = [p, ctypes.c_int, deform] + [p] * 7
        lib.sapa_deform_workspace.argtypes = [
            ctypes.c_int,
            deform,
            ctypes.POINTER(ctypes.c_size_t),
        ]
        lib.sapa_set_device.argtypes = [ctypes.c_int]
        lib.sapa_self_test.argtypes = [p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]

    def _check(self, status):
        if status != SAPA_OK:
            raise LauncherError(status, self.lib.sapa_last_error().decode())

    def init(self, driver_path=None):
        self._check(self.lib.sapa_init(driver_path.encode() if driver_path else None))

    def load_image_dir(self, directory):
        count = ctypes.c_int()
        self._check(self.lib.sapa_load_image_dir(directory.encode(), ctypes.byref(count)))
        return count.value

    def add_image(self, target, data):
        self._check(self.lib.sapa_add_image(target.encode(), data, len(data)))

    def clear_images(self):
        self.lib.sapa_clear_images()

    def select_image(self, major, minor):
        out = ctypes.create_string_buffer(64)
        self._check(self.lib.sapa_select_image(major, minor, out, 64))
        return out.value.decode()

    def device_info(self, stream=None):
        major, minor, target = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(64)
        self._check(
            self.lib.sapa_device_info(stream, ctypes.byref(major), ctypes.byref(minor), target, 64)
        )
        return major.value, minor.value, target.value.decode()

    def set_untiled(self, untiled):
        self.lib.sapa_set_untiled(1 if untiled else 0)

    def last_launch(self):
        name = ctypes.create_string_buffer(128)
        grid, block, smem = ctypes.c_int64(), ctypes.c_int(), ctypes.c_int()
        self.lib.sapa_last_launch(
            name, 128, ctypes.byref(grid), ctypes.byref(block), ctypes.byref(smem)
        )
        return name.value.decode(), grid.value, block.value, smem.value

    def call(self, name, stream, dtype, d, *pointers):
        self._check(
            getattr(self.lib, f"sapa_{name}")(stream, DTYPES[dtype], ctypes.byref(d), *pointers)
        )

    def deform_workspace(self, dtype, d):
        size = ctypes.c_size_t()
        self._check(
            self.lib.sapa_deform_workspace(DTYPES[dtype], ctypes.byref(d), ctypes.byref(size))
        )
        return size.value

    def self_test(self, stream=None, flags=0, device=0):
        """The launcher's sapa_self_test (every launch configuration, every dtype; see
        sapa_launcher.h) on GPU `device`; returns the configurations run."""
        self._check(self.lib.sapa_set_device(device))
        cases = ctypes.c_int()
        self._check(self.lib.sapa_self_test(stream, flags, ctypes.byref(cases)))
        return cases.value


def load_reference(name="reference"):
    path = os.path.join(ROOT, "tests", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"sapa_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# Device arrays: PyTorch or CuPy, channels-last contiguous.


class TorchBackend:
    name = "torch"

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise LauncherError(SAPA_ERR_DRIVER, "PyTorch sees no CUDA GPU")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.types = {
            "float32": torch.float32,
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float64": torch.float64,
        }

    def device_name(self):
        return self.torch.cuda.get_device_name()

    def stream_handle(self):
        return ctypes.c_void_p(self.stream.cuda_stream)

    # Every allocation and copy runs on the harness's stream, the one the launches use.
    def to_device(self, array, dtype):
        t = self.torch.from_numpy(np.ascontiguousarray(array, np.float64))
        with self.torch.cuda.stream(self.stream):
            return t.to(device="cuda", dtype=self.types[dtype]).contiguous()

    def empty(self, shape, dtype):
        with self.torch.cuda.stream(self.stream):
            return self.torch.empty(shape, device="cuda", dtype=self.types[dtype])

    def full(self, shape, dtype, value):
        with self.torch.cuda.stream(self.stream):
            return self.torch.full(shape, value, device="cuda", dtype=self.types[dtype])

    def pointer(self, t):
        return ctypes.c_void_p(t.data_ptr())

    def to_host(self, t):
        with self.torch.cuda.stream(self.stream):
            host = t.to(self.torch.float64).cpu()
        self.synchronize()
        return host.numpy()

    def synchronize(self):
        self.stream.synchronize()

    def gather_host(self, t, flat_indices):
        """Host float64 values of t at flat element indices (without copying it all)."""
        with self.torch.cuda.stream(self.stream):
            idx = self.torch.as_tensor(np.asarray(flat_indices, np.int64), device="cuda")
            host = t.reshape(-1)[idx].to(self.torch.float64).cpu()
        self.synchronize()
        return host.numpy()


class CupyBackend:
    name = "cupy"

    def __init__(self):
        import cupy

        self.cp = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.types = {"float32": cupy.float32, "float16": cupy.float16, "float64": cupy.float64}

    def device_name(self):
        props = self.cp.cuda.runtime.getDeviceProperties(self.cp.cuda.Device().id)
        return props["name"].decode()

    def stream_handle(self):
        return ctypes.c_void_p(self.stream.ptr)

    def _type(self, dtype):
        if dtype not in self.types:
            raise LauncherError(SAPA_ERR_INVALID, f"CuPy has no {dtype}; use --backend torch")
        return self.types[dtype]

    def to_device(self, array, dtype):
        with self.stream:
            return self.cp.ascontiguousarray(self.cp.asarray(array).astype(self._type(dtype)))

    def empty(self, shape, dtype):
        with self.stream:
            return self.cp.empty(shape, self._type(dtype))

    def full(self, shape, dtype, value):
        with self.stream:
            return self.cp.full(shape, value, self._type(dtype))

    def pointer(self, a):
        return ctypes.c_void_p(a.data.ptr)

    def to_host(self, a):
        self.synchronize()
        return self.cp.asnumpy(a).astype(np.float64)

    def synchronize(self):
        self.stream.synchronize()

    def gather_host(self, a, flat_indices):
        self.synchronize()
        return self.cp.asnumpy(a.reshape(-1)[self.cp.asarray(flat_indices)]).astype(np.float64)


def make_backend(name):
    errors = []
    for candidate in [name] if name != "auto" else ["torch", "cupy"]:
        try:
            return TorchBackend() if candidate == "torch" else CupyBackend()
        except ImportError as exc:
            errors.append(f"{candidate}: {exc}")
        except LauncherError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. CuPy without a usable GPU
            errors.append(f"{candidate}: {exc}")
    raise LauncherError(
        SAPA_ERR_DRIVER, "no usable PyTorch or CuPy GPU backend (" + "; ".join(errors) + ")"
    )


# ---------------------------------------------------------------------------------------
# Independent float64 references beyond tests/reference.py.


def scatter_reference(w, hi, kernel_size, up_factor, low_shape):
    """lo[b,p,t] = sum over (i,j,n) whose window point n is (p,t) of w[b,i,j,n] hi[b,i,j],
    written from the definition (loops over the high-res points)."""
    w = np.asarray(w, np.float64)
    hi = np.asarray(hi, np.float64)
    batch, height, width = low_shape
    s, r = up_factor, kernel_size // 2
    out = np.zeros((batch, height, width, hi.shape[-1]))
    for b in range(batch):
        for i in range(s * height):
            for j in range(s * width):
                for a in range(-r, r + 1):
                    for c in range(-r, r + 1):
                        p, t = i // s + a, j // s + c
                        if 0 <= p < height and 0 <= t < width:
                            out[b, p, t] += w[b, i, j, (a + r) * kernel_size + c + r] * hi[b, i, j]
    return out


def sapa_point(q, k, v, b, i, j, kernel_size, up_factor):
    """Output (and weights) of one high-res point, from the spec, in float64."""
    r, s = kernel_size // 2, up_factor
    height, width = k.shape[1], k.shape[2]
    logits, values = [], []
    for a in range(-r, r + 1):
        for c in range(-r, r + 1):
            p, t = i // s + a, j // s + c
            if 0 <= p < height and 0 <= t < width:
                logits.append(float(np.dot(q[b, i, j].astype(np.float64), k[b, p, t])))
                values.append(np.asarray(v[b, p, t], np.float64))
            else:
                logits.append(0.0)
                values.append(np.zeros(v.shape[-1]))
    logits = np.array(logits)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return w @ np.array(values), w


TOLERANCES = {"float64": 1e-10, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


def rel_error(got, want):
    scale = max(1.0, float(np.max(np.abs(want))) if np.size(want) else 1.0)
    return float(np.max(np.abs(got - want))) / scale if np.size(want) else 0.0


def quantise(array, dtype, backend):
    """The values the device actually holds (rounded to dtype), as float64."""
    return backend.to_host(backend.to_device(array, dtype))


class Checker:
    def __init__(self, launcher, backend, log):
        self.launcher, self.backend, self.log = launcher, backend, log
        self.ref = load_reference()
        self.deform_ref = None  # tests/reference_deform.py, loaded for the first SAPA-D case
        self.failures = 0
        self.checks = 0

    def expect(self, what, got, want, tol):
        err = rel_error(got, want)
        self.checks += 1
        ok = err <= tol and np.all(np.isfinite(got))
        if not ok:
            self.failures += 1
        self.log(f"  {'ok  ' if ok else 'FAIL'} {what}: rel err {err:.2e} (tol {tol:.0e})")
        return ok

    def run_case(self, dtype, batch, height, width, s, k, d, c, seed):
        be, L = self.backend, self.launcher
        rng = np.random.default_rng(seed)
        self.log(f"case {dtype} B={batch} {height}x{width} s={s} K={k} d={d} C={c}")
        hs, ws, kk = s * height, s * width, k * k
        low_shape = (batch, height, width)
        q = quantise(rng.standard_normal((batch, hs, ws, d)) * 0.5, dtype, be)
        key = quantise(rng.standard_normal((batch, height, width, d)) * 0.5, dtype, be)
        v = quantise(rng.standard_normal((batch, height, width, c)), dtype, be)
        g = quantise(rng.standard_normal((batch, hs, ws, c)), dtype, be)
        acc = "float64" if dtype == "float64" else "float32"
        # References (float64, tests/reference.py and the loops above).
        sim_ref = self.ref.similarity(q, key, k, s)
        w_ref = self.ref.softmax(sim_ref)
        w = quantise(w_ref, dtype, be)  # the window ops' weights are in dtype
        gw = self.ref.similarity(g, v, k, s)
        gl_ref = w_ref * (gw - np.sum(w_ref * gw, axis=-1, keepdims=True))
        refs = {
            "dot": sim_ref,
            "gather": self.ref.aggregate(w, v, k, s),
            "scatter": scatter_reference(w, g, k, s, low_shape),
            "forward": self.ref.sapa(q, key, v, k, s),
            "grad query": self.ref.aggregate(gl_ref, key, k, s),
            "grad key": scatter_reference(gl_ref, q, k, s, low_shape),
            "grad value": scatter_reference(w_ref, g, k, s, low_shape),
        }
        dq, dk, dv, dg, dw = (be.to_device(x, dtype) for x in (q, key, v, g, w))
        stream = be.stream_handle()
        tol = TOLERANCES[dtype]
        P = be.pointer
        dd = dims(batch, height, width, s, k, d, c)
        dc = dims(batch, height, width, s, k, c, c)
        for untiled in (False, True):
            L.set_untiled(untiled)
            mode = "untiled" if untiled else "tiled"
            sim = be.empty((batch, hs, ws, kk), dtype)
            L.call("dot", stream, dtype, dd, P(dq), P(dk), P(sim))
            self.expect(f"{mode} dot", be.to_host(sim), refs["dot"], tol * max(1, d**0.5))
            out = be.empty((batch, hs, ws, c), dtype)
            L.call("gather", stream, dtype, dc, P(dw), P(dv), P(out))
            self.expect(f"{mode} gather", be.to_host(out), refs["gather"], tol)
            low = be.empty((batch, height, width, c), dtype)
            L.call("scatter", stream, dtype, dc, P(dw), P(dg), P(low))
            self.expect(f"{mode} scatter", be.to_host(low), refs["scatter"], tol * kk**0.5)
            # Fused forward.
            out_f = be.empty((batch, hs, ws, c), dtype)
            attn = be.empty((batch, hs, ws, kk), acc)
            L.call("forward", stream, dtype, dd, P(dq), P(dk), P(dv), P(out_f), P(attn))
            self.expect(f"{mode} fused forward", be.to_host(out_f), refs["forward"], tol)
            self.expect(
                f"{mode} fused forward weights",
                be.to_host(attn),
                w_ref,
                TOLERANCES[acc] * max(1, d**0.5),
            )
            # Backward: logits gradient, then three gathers.
            dl = be.empty((batch, hs, ws, kk), acc)
            L.call("softmax_backward", stream, dtype, dc, P(dg), P(dv), P(attn), P(dl))
            self.expect(f"{mode} softmax backward", be.to_host(dl), gl_ref, tol * max(1, c**0.5))
            gq, gk, gv = (
                be.empty(shape, dtype)
                for shape in (
                    (batch, hs, ws, d),
                    (batch, height, width, d),
                    (batch, height, width, c),
                )
            )
            L.call("gather_acc", stream, dtype, dd, P(dl), P(dk), P(gq))
            L.call("scatter_acc", stream, dtype, dd, P(dl), P(dq), P(gk))
            L.call("scatter_acc", stream, dtype, dc, P(attn), P(dg), P(gv))
            grads = [be.to_host(x) for x in (gq, gk, gv)]
            for name, got in zip(("grad query", "grad key", "grad value"), grads, strict=True):
                self.expect(f"{mode} {name}", got, refs[name], tol * max(1, c**0.5) * kk**0.25)
            # The same backward through its one entry point (what the bindings call), into
            # fresh buffers.
            fresh = [be.empty(be.to_host(x).shape, dtype) for x in (gq, gk, gv)]
            tensors = (dg, dq, dk, dv, attn, be.empty((batch, hs, ws, kk), acc), *fresh)
            L.call("backward", stream, dtype, dd, *(P(x) for x in tensors))
            for name, x in zip(("grad query", "grad key", "grad value"), fresh, strict=True):
                self.expect(
                    f"{mode} sapa_backward {name}",
                    be.to_host(x),
                    refs[name],
                    tol * max(1, c**0.5) * kk**0.25,
                )
            if dtype == "float64":
                self.directional(q, key, v, g, grads, k, s)
        L.set_untiled(False)

    def directional(self, q, key, v, g, grads, k, s):
        """<grad, u> against a central difference of the reference in float64."""
        rng = np.random.default_rng(7)
        u = [rng.standard_normal(x.shape) for x in (q, key, v)]
        eps = 1e-5

        def f(a, b, c):
            return float(np.sum(self.ref.sapa(a, b, c, k, s) * g))

        plus = f(q + eps * u[0], key + eps * u[1], v + eps * u[2])
        minus = f(q - eps * u[0], key - eps * u[1], v - eps * u[2])
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(float(np.sum(gr * uu)) for gr, uu in zip(grads, u, strict=True))
        self.expect(
            "directional derivative of the reference",
            np.array([analytic]),
            np.array([numeric]),
            1e-6,
        )

    def deform_case(self, dtype, batch, height, width, s, points, groups, embed, cg, seed):
        """SAPA-D's entry points (sapa_deform_forward, sapa_deform_backward) against the
        NumPy loops of tests/reference_deform.py: output, weights, the four gradients."""
        be, L = self.backend, self.launcher
        if self.deform_ref is None:
            self.deform_ref = load_reference("reference_deform")
        ref = self.deform_ref
        rng = np.random.default_rng(seed)
        self.log(
            f"case SAPA-D {dtype} B={batch} {height}x{width} s={s} P={points} G={groups} "
            f"E={embed} Cg={cg}"
        )
        high, low = (batch, s * height, s * width), (batch, height, width)
        shapes = (
            high + (groups * embed,),
            low + (groups * embed,),
            low + (groups * cg,),
            high + (groups * cg,),
        )
        q, key, v, g = (
            quantise(rng.standard_normal(shape) * scale, dtype, be)
            for shape, scale in zip(shapes, (0.5, 0.5, 1.0, 1.0), strict=True)
        )
        off = ref.offsets_away_from_integers(
            rng, high + (2 * groups * points,), spread=2.0, margin=0.1
        )
        off = quantise(off, dtype, be)
        args = (points, s, groups)
        want = [
            ref.sapa_deform(q, key, v, off, *args),
            ref.group_softmax(ref.deform_similarity(q, key, off, *args), groups),
            *ref.sapa_deform_vjp(q, key, v, off, g, *args),
        ]
        acc = "float64" if dtype == "float64" else "float32"
        d = SapaDeformDims(batch, height, width, s, points, groups, groups * embed, groups * cg)
        P = be.pointer
        arrays = [be.to_device(x, dtype) for x in (q, key, v, off, g)]  # kept alive
        inputs = [P(x) for x in arrays]
        out = be.empty(shapes[3], dtype)
        attn = be.empty(high + (groups * points,), acc)
        stream, code = be.stream_handle(), DTYPES[dtype]
        L._check(
            L.lib.sapa_deform_forward(stream, code, ctypes.byref(d), *inputs[:4], P(out), P(attn))
        )
        workspace = be.empty(((L.deform_workspace(dtype, d) + 3) // 4,), "float32")
        grads = [be.empty(x.shape, dtype) for x in (q, key, v, off)]
        L._check(
            L.lib.sapa_deform_backward(
                stream,
                code,
                ctypes.byref(d),
                inputs[4],
                *inputs[:4],
                P(attn),
                P(workspace),
                *map(P, grads),
            )
        )
        names = ("forward", "weights", "grad query", "grad key", "grad value", "grad offsets")
        for name, got, expected in zip(names, [out, attn, *grads], want, strict=True):
            tol = TOLERANCES[acc if name == "weights" else dtype]
            self.expect(
                f"SAPA-D {name}", be.to_host(got), expected, tol * (4 if "grad" in name else 1)
            )
        if dtype in ("float32", "float64"):  # the halves take these two
            self.deform_halves(dtype, d, (q, key, v, off, g), args, want[1], rng)

    def deform_halves(self, dtype, d, tensors, args, weights, rng):
        """SAPA-D's halves (sapa_deform_similarity, sapa_deform_aggregate and their
        backwards: the per-output-point kernels, then the scatter for the low-resolution
        gradient) against tests/reference_deform.py, on deform_case's tensors."""
        be, L, ref = self.backend, self.launcher, self.deform_ref
        q, key, v, off, g = tensors
        grad_logits = quantise(rng.standard_normal(weights.shape), dtype, be)
        weights = quantise(weights, dtype, be)
        want = {
            "similarity": [ref.deform_similarity(q, key, off, *args)],
            "aggregate": [ref.deform_aggregate(weights, v, off, *args)],
            "similarity backward": ref.deform_similarity_vjp(q, key, off, grad_logits, *args),
            "aggregate backward": ref.deform_aggregate_vjp(weights, v, off, g, *args),
        }
        calls = {  # entry point, inputs, outputs shaped as the wanted arrays
            "similarity": ("sapa_deform_similarity", (q, key, off)),
            "aggregate": ("sapa_deform_aggregate", (weights, v, off)),
            "similarity backward": ("sapa_deform_similarity_backward", (grad_logits, q, key, off)),
            "aggregate backward": ("sapa_deform_aggregate_backward", (g, weights, v, off)),
        }
        code, P = DTYPES[dtype], be.pointer
        for name, (entry, inputs) in calls.items():
            arrays = [be.to_device(x, dtype) for x in inputs]  # kept alive
            outputs = [be.empty(w.shape, dtype) for w in want[name]]
            L._check(
                getattr(L.lib, entry)(
                    be.stream_handle(), code, ctypes.byref(d), *map(P, arrays), *map(P, outputs)
                )
            )
            for i, (got, expected) in enumerate(zip(outputs, want[name], strict=True)):
                tol = TOLERANCES[dtype] * (4 if "backward" in name else 1)
                self.expect(f"SAPA-D {name} [{i}]", be.to_host(got), expected, tol)

    def big_case(self, dtype="float16"):
        """Output past 2**31 elements: B=1, 512x512 -> 2048x2048, C=520, d=8, K=3, s=4."""
        be, L = self.backend, self.launcher
        batch, height, width, s, k, d, c = 1, 512, 512, 4, 3, 8, 520
        hs, ws = s * height, s * width
        total = batch * hs * ws * c
        self.log(f"case big: output {total} elements (> 2**31 = {2**31}), {dtype}")
        rng = np.random.default_rng(99)
        q = quantise(rng.standard_normal((batch, hs, ws, d)) * 0.5, dtype, be)
        key = quantise(rng.standard_normal((batch, height, width, d)) * 0.5, dtype, be)
        v = quantise(rng.standard_normal((batch, height, width, c)), dtype, be)
        dq, dk, dv = (be.to_device(x, dtype) for x in (q, key, v))
        out = be.full((batch, hs, ws, c), dtype, float("nan"))
        attn = be.empty((batch, hs, ws, k * k), "float32")
        L.call(
            "forward",
            be.stream_handle(),
            dtype,
            dims(batch, height, width, s, k, d, c),
            be.pointer(dq),
            be.pointer(dk),
            be.pointer(dv),
            be.pointer(out),
            be.pointer(attn),
        )
        points = [(hs - 1, ws - 1), (hs - 1, 0), (hs // 2, ws - 3), (0, 0)]
        points += [tuple(p) for p in rng.integers(0, [hs, ws], size=(60, 2))]
        got_all, want_all = [], []
        for i, j in points:
            base = ((0 * hs + i) * ws + j) * c
            got_all.append(be.gather_host(out, np.arange(base, base + c)))
            want_all.append(sapa_point(q, key, v, 0, i, j, k, s)[0])
        self.expect(
            "big fused forward (sampled, incl. the last elements)",
            np.array(got_all),
            np.array(want_all),
            TOLERANCES[dtype],
        )
        # scatter over the same sizes: grad of the value (B,H,W,C) from a (B,sH,sW,C) grad.
        del dq
        low = be.full((batch, height, width, c), dtype, float("nan"))
        L.call(
            "scatter_acc",
            be.stream_handle(),
            dtype,
            dims(batch, height, width, s, k, c, c),
            be.pointer(attn),
            be.pointer(out),
            be.pointer(low),
        )
        got_all, want_all = [], []
        for p, t in [(height - 1, width - 1), (0, 0)] + [
            tuple(x) for x in rng.integers(0, [height, width], size=(6, 2))
        ]:
            acc = np.zeros(c)
            r = k // 2
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    ap, aq = p - a, t - b
                    if not (0 <= ap < height and 0 <= aq < width):
                        continue
                    n = (a + r) * k + b + r
                    for ci in range(s):
                        for cj in range(s):
                            i, j = ap * s + ci, aq * s + cj
                            point = i * ws + j
                            wv = be.gather_host(attn, [point * k * k + n])[0]
                            ov = be.gather_host(out, np.arange(point * c, point * c + c))
                            acc += wv * ov
            got_all.append(
                be.gather_host(low, np.arange(((p * width) + t) * c, ((p * width) + t) * c + c))
            )
            want_all.append(acc)
        self.expect(
            "big scatter (sampled)", np.array(got_all), np.array(want_all), TOLERANCES[dtype] * 4
        )


CASES = [
    # (batch, height, width, s, K, d, C)
    (1, 6, 7, 2, 5, 64, 256),  # real channel counts, odd width
    (2, 5, 3, 1, 3, 5, 7),  # s = 1, odd everything
    (1, 4, 5, 4, 7, 3, 33),  # s = 4, K = 7
    (1, 3, 4, 3, 5, 8, 9),  # s = 3
    (1, 5, 4, 2, 9, 6, 10),  # K = 9: untiled dot/fused, tiled gather/scatter
    (1, 4, 4, 2, 1, 4, 5),  # K = 1
    (1, 9, 11, 2, 3, 65, 257),  # channels past a chunk boundary
]
DEFORM_CASES = [
    # (batch, height, width, s, P, G, E, Cg)
    (1, 6, 7, 2, 9, 4, 32, 64),  # the official P, G, E; C = 256
    (2, 3, 5, 3, 3, 2, 3, 5),  # s = 3, odd everything, points dropped at the border
]


def run_checks(launcher, backend, log, skip_big):
    checker = Checker(launcher, backend, log)
    seed = 0
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        if backend.name == "cupy" and dtype == "bfloat16":
            log("bfloat16 skipped: CuPy has no bfloat16 (use --backend torch)")
            continue
        for case in CASES:
            seed += 1
            checker.run_case(dtype, *case, seed=seed)
        for case in DEFORM_CASES:
            seed += 1
            checker.deform_case(dtype, *case, seed=seed)
    if not skip_big:
        checker.big_case()
    log(f"checks: {checker.checks - checker.failures}/{checker.checks} passed")
    return checker.failures == 0


# ---------------------------------------------------------------------------------------
# Benchmark


def timed(backend, fn, iters=20, warmup=3):
    """Median milliseconds of fn() on the backend's stream (CUDA events)."""
    torch = backend.torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(backend.stream)
        fn()
        end.record(backend.stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def torch_unfold_sapa(torch, q, k, v, kernel_size, s):
    """SAPA with unfold (channels first), the way the official reference is written."""
    F = torch.nn.functional
    b, d, hh, ww = q.shape
    h, w = k.shape[2], k.shape[3]
    kk = kernel_size * kernel_size
    pad = kernel_size // 2
    kw = F.unfold(k, kernel_size, padding=pad).view(b, d, kk, h, w)
    vw = F.unfold(v, kernel_size, padding=pad).view(b, v.shape[1], kk, h, w)
    kw = kw.repeat_interleave(s, 3).repeat_interleave(s, 4)
    logits = torch.einsum("bdhw,bdnhw->bnhw", q, kw)
    weights = logits.softmax(1)
    vw = vw.repeat_interleave(s, 3).repeat_interleave(s, 4)
    return torch.einsum("bnhw,bcnhw->bchw", weights, vw)


def jax_xla_sapa(jnp, q, k, v, kernel_size, s):
    """SAPA the way the package's ``xla`` formulation computes it (pad, K*K shifted
    slices, nearest upsampling), for XLA through JAX: what a Keras ``fit`` with
    ``jit_compile=True`` runs instead of the custom op."""
    r = kernel_size // 2
    h, w = k.shape[1], k.shape[2]
    pad = ((0, 0), (r, r), (r, r), (0, 0))
    kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)

    def up(t):
        return jnp.repeat(jnp.repeat(t, s, axis=1), s, axis=2)

    logits = jnp.stack(
        [
            jnp.sum(q * up(kp[:, a : a + h, b : b + w]), axis=-1)
            for a in range(kernel_size)
            for b in range(kernel_size)
        ],
        axis=-1,
    )
    weights = jax_softmax(logits.astype(jnp.float32)).astype(q.dtype)
    out = 0
    for n in range(kernel_size * kernel_size):
        a, b = divmod(n, kernel_size)
        out = out + weights[..., n : n + 1] * up(vp[:, a : a + h, b : b + w])
    return out


def jax_softmax(x):
    import jax

    return jax.nn.softmax(x, axis=-1)


def run_jax_bench(log, dtype_names=("float32", "float16"), forward_ms=None):
    """M1 through XLA (JAX): forward and forward+backward time, and XLA's temporary
    memory, the numbers behind the layer declining XLA where the GPU op is used."""
    # PyTorch holds GPU memory in this process: JAX must not try to take 75% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import torch

        torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        log(f"JAX/XLA comparison skipped: {exc}")
        return
    if not any(d.platform == "gpu" for d in jax.devices()):
        log("JAX/XLA comparison skipped: JAX sees no GPU")
        return
    batch, height, width, s, k, d, c = 4, 64, 64, 2, 5, 64, 256
    key = jax.random.PRNGKey(0)
    for name in dtype_names:
        dt = getattr(jnp, name)
        k1, k2, k3, k4 = jax.random.split(key, 4)
        q = jax.random.normal(k1, (batch, s * height, s * width, d), dt)
        kk_ = jax.random.normal(k2, (batch, height, width, d), dt)
        v = jax.random.normal(k3, (batch, height, width, c), dt)
        g = jax.random.normal(k4, (batch, s * height, s * width, c), dt)
        fwd = jax.jit(lambda a, b, c_: jax_xla_sapa(jnp, a, b, c_, k, s))

        def loss(a, b, c_):
            return jnp.sum((jax_xla_sapa(jnp, a, b, c_, k, s) * g).astype(jnp.float32))

        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        times = {}
        for label, fn in (("forward", fwd), ("fwd+bwd", both)):
            compiled = fn.lower(q, kk_, v).compile()
            temp = None
            with contextlib.suppress(Exception):  # not every backend reports it
                temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(fn(q, kk_, v))
            runs = []
            for _ in range(20):
                start = time.perf_counter()
                jax.block_until_ready(fn(q, kk_, v))
                runs.append((time.perf_counter() - start) * 1e3)
            times[label] = float(np.median(runs))
            mem = f", XLA temp memory {temp / 2**20:.1f} MiB" if temp is not None else ""
            log(f"[{name}] JAX/XLA {label:8s} {times[label]:8.3f} ms{mem}")
        if forward_ms and name in forward_ms:
            ours_fwd, ours_both = forward_ms[name]
            log(
                f"[{name}] ours vs XLA: forward {times['forward'] / ours_fwd:.2f}x faster, "
                f"fwd+bwd {times['fwd+bwd'] / ours_both:.2f}x faster"
            )


def load_official(path, log):
    """The official SAPA CUDA ops from a local copy (poppinace/sapa), or None."""
    if not path or not os.path.isdir(path):
        log(f"official SAPA kernels: not present ({path}); skipped")
        return None
    try:
        from torch.utils.cpp_extension import load
    except ImportError as exc:
        log(f"official SAPA kernels: no torch extension builder ({exc}); skipped")
        return None
    sources = []
    for dirpath, _, files in os.walk(path):
        sources += [os.path.join(dirpath, f) for f in files if f.endswith((".cpp", ".cu"))]
    if not sources:
        log(f"official SAPA kernels: no .cpp/.cu sources under {path}; skipped")
        return None
    try:
        module = load("sapa_official", sorted(sources), verbose=False)
    except Exception as exc:  # noqa: BLE001
        log(f"official SAPA kernels: build failed ({str(exc).splitlines()[0]}); skipped")
        return None
    log(
        f"official SAPA kernels: built from {len(sources)} files; functions "
        f"{[n for n in dir(module) if not n.startswith('_')]}"
    )
    return module


def run_official(torch, module, q, k, v, kernel_size, s):
    """Calls the official sim/atn forward kernels (NCHW) if their names are as expected."""
    names = [n for n in dir(module) if not n.startswith("_")]
    sim_fn = next(
        (getattr(module, n) for n in names if "sim" in n.lower() and "forward" in n.lower()), None
    )
    atn_fn = next(
        (getattr(module, n) for n in names if "atn" in n.lower() and "forward" in n.lower()), None
    )
    if sim_fn is None or atn_fn is None:
        return None
    b, _, hh, ww = q.shape
    kk = kernel_size * kernel_size
    sim = torch.empty((b, kk, hh, ww), device=q.device, dtype=q.dtype)
    sim_fn(q, k, kernel_size, s, sim)
    weights = sim.softmax(1)
    out = torch.empty((b, v.shape[1], hh, ww), device=q.device, dtype=q.dtype)
    atn_fn(weights, v, kernel_size, s, out)
    return out


def run_bench(launcher, backend, log, official_path):
    """Returns {dtype: (forward ms, forward+backward ms)} of our kernels."""
    if backend.name != "torch":
        log("benchmark needs PyTorch (--backend torch); skipped")
        return {}
    results = {}
    torch = backend.torch
    batch, height, width, s, k, d, c = 4, 64, 64, 2, 5, 64, 256
    hs, ws, kk = s * height, s * width, k * k
    official = load_official(official_path, log)
    stream = backend.stream_handle()
    with torch.cuda.stream(backend.stream):
        big = torch.empty(64 * 2**20, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(big)
        copy_ms = timed(backend, lambda: dst.copy_(big))
        copy_gbs = 2 * big.numel() * 4 / copy_ms / 1e6
        log(
            f"device: {backend.device_name()}; copy bandwidth {copy_gbs:.0f} GB/s "
            f"(256 MiB device-to-device)"
        )
        log(f"M1: B={batch}, {height}x{width} -> {hs}x{ws}, C={c}, d={d}, K={k}, s={s}")
        for dtype in ("float32", "float16"):
            tt = backend.types[dtype]
            size = torch.finfo(tt).bits // 8
            q = torch.randn(batch, hs, ws, d, device="cuda", dtype=tt)
            key = torch.randn(batch, height, width, d, device="cuda", dtype=tt)
            v = torch.randn(batch, height, width, c, device="cuda", dtype=tt)
            g = torch.randn(batch, hs, ws, c, device="cuda", dtype=tt)
            out = torch.empty(batch, hs, ws, c, device="cuda", dtype=tt)
            attn = torch.empty(batch, hs, ws, kk, device="cuda", dtype=torch.float32)
            dl = torch.empty_like(attn)
            gq, gk, gv = torch.empty_like(q), torch.empty_like(key), torch.empty_like(v)
            P = backend.pointer
            dd = dims(batch, height, width, s, k, d, c)

            def forward():
                launcher.call("forward", stream, dtype, dd, P(q), P(key), P(v), P(out), P(attn))

            def backward():
                pointers = (g, q, key, v, attn, dl, gq, gk, gv)
                launcher.call("backward", stream, dtype, dd, *(P(x) for x in pointers))

            def both():
                forward()
                backward()

            x_nchw = v.permute(0, 3, 1, 2)  # channels-last memory, as v
            bilinear = lambda: torch.nn.functional.interpolate(  # noqa: E731
                x_nchw, scale_factor=s, mode="bilinear", align_corners=False
            )
            qc, kc, vc = (t.permute(0, 3, 1, 2).contiguous() for t in (q, key, v))
            unfold = lambda: torch_unfold_sapa(torch, qc, kc, vc, k, s)  # noqa: E731
            # Correctness of the benchmark's own output against the unfold version.
            forward()
            ours = out.permute(0, 3, 1, 2).float()
            ref = unfold().float()
            agree = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1))
            t_fwd = timed(backend, forward)
            t_both = timed(backend, both)
            t_bil = timed(backend, bilinear)
            t_unf = timed(backend, unfold)
            must_move = (
                q.numel() + key.numel() + v.numel() + out.numel()
            ) * size + attn.numel() * 4
            bw = must_move / t_fwd / 1e6
            bil_bytes = (v.numel() + out.numel()) * size
            log(f"[{dtype}] ours vs unfold max rel diff {agree:.1e}")
            log(f"[{dtype}] copy            {'':>9}  {copy_gbs:7.0f} GB/s")
            log(f"[{dtype}] bilinear        {t_bil:8.3f} ms  {bil_bytes / t_bil / 1e6:7.0f} GB/s")
            log(
                f"[{dtype}] ours forward    {t_fwd:8.3f} ms  {bw:7.0f} GB/s "
                f"({100 * bw / copy_gbs:.0f}% of copy)  {t_fwd / t_bil:.2f}x bilinear"
            )
            log(f"[{dtype}] ours fwd+bwd    {t_both:8.3f} ms  {t_both / t_fwd:.2f}x forward")
            log(f"[{dtype}] torch unfold    {t_unf:8.3f} ms  ours is {t_unf / t_fwd:.1f}x faster")
            if official is not None:
                try:
                    t_off = timed(backend, lambda: run_official(torch, official, qc, kc, vc, k, s))
                    log(
                        f"[{dtype}] official SAPA   {t_off:8.3f} ms  "
                        f"ours is {t_off / t_fwd:.1f}x faster"
                    )
                except Exception as exc:  # noqa: BLE001
                    log(f"[{dtype}] official SAPA failed: {str(exc).splitlines()[0]}")
            log(
                f"[{dtype}] targets: forward <= 3x bilinear: {t_fwd / t_bil <= 3}; "
                f"fwd+bwd <= 3.5x forward: {t_both / t_fwd <= 3.5}; "
                f">= 50% of copy bandwidth: {bw >= 0.5 * copy_gbs}"
            )
            results[dtype] = (t_fwd, t_both)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lib-dir",
        default=DEFAULT_LIB_DIR,
        help="folder with libsapa_launcher.so and the kernel images",
    )
    parser.add_argument("--driver", default=None, help="path of libcuda (default libcuda.so.1)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cupy"))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-big", action="store_true", help="skip the > 2**31 case")
    parser.add_argument("--official", default=os.path.join(ROOT, "third_party_ref", "sapa"))
    parser.add_argument("--skip-jax", action="store_true", help="skip the JAX/XLA comparison")
    parser.add_argument("--log", default="gpu_harness.log")
    args = parser.parse_args(argv)

    # Kept open for the whole run and closed by the interpreter at exit.
    log_file = open(args.log, "a") if args.log else None  # noqa: SIM115

    def log(line):
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    log(f"== gpu_harness {time.strftime('%Y-%m-%d %H:%M:%S')} lib-dir {args.lib_dir}")
    try:
        path = os.path.join(args.lib_dir, LAUNCHER_LIB)
        if not os.path.isfile(path):
            raise LauncherError(SAPA_ERR_IO, f"{path} is missing (python custom_ops/build.py)")
        launcher = Launcher(path)
        launcher.init(args.driver)
        count = launcher.load_image_dir(args.lib_dir)
        if count == 0:
            raise LauncherError(SAPA_ERR_NO_IMAGE, f"no sapa_kernels.* images in {args.lib_dir}")
        backend = make_backend(args.backend)
        major, minor, target = launcher.device_info(backend.stream_handle())
        log(
            f"GPU {backend.device_name()} (sm_{major}{minor}); image {target}; "
            f"{count} images; backend {backend.name}"
        )
    except LauncherError as exc:
        log(f"cannot run: {exc}")
        return 2
    ok = True
    if not args.skip_check:
        try:
            cases = launcher.self_test(backend.stream_handle())
            log(f"self-test: {cases} launch configurations agree with the CPU reference")
        except LauncherError as exc:
            log(f"FAIL self-test: {exc}")
            ok = False
        ok = run_checks(launcher, backend, log, args.skip_big) and ok
    if not args.skip_bench:
        ours = run_bench(launcher, backend, log, args.official)
        if not args.skip_jax:
            run_jax_bench(log, forward_ms=ours)
    log("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
