"""Speed and memory benchmark of the SAPA implementations (``python -m keras_sapa bench``).

For every workload and implementation (``compiled``, ``patches``, ``xla``) it measures,
in one run and one process:

- ``fwd ms``: median wall time of ``ops.sapa(query, key, value)`` (similarity, softmax,
  aggregation) in a ``tf.function`` (``jit_compile=True`` for ``xla``);
- ``fwd+bwd ms``: the forward pass plus the gradients with respect to query, key and
  value (a fixed random upstream gradient);
- ratios against ``tf.image.resize(value, (sH, sW), "bilinear")`` of the same value
  tensor (its forward, timed in the same rounds) and against the patches path;
- ``peak MiB``: the peak extra memory of one forward, and of one forward+backward call:
  TensorFlow's allocator statistics (``tf.config.experimental.get_memory_info``: the
  ``peak`` after ``reset_memory_stats`` minus the bytes in use before the call; on CPU
  this works with the oneDNN allocator of the x86 wheels). It counts every tensor the call
  allocates (outputs, gradients, temporaries), not Python or code memory. Where the
  allocator keeps no statistics, a fresh subprocess per case measures resident memory
  instead: after a warm-up call ``/proc/self/clear_refs`` resets the high-water mark
  (VmHWM), glibc maps every buffer of 64 KiB or more separately
  (``MALLOC_MMAP_THRESHOLD_``) and the caching oneDNN allocator is off, so freed memory
  leaves the process. ``xN out`` divides the forward+backward peak by the size of the
  output tensor.

Timings interleave the implementations (forward and forward+backward) round by round,
so that load from other processes on a shared machine affects them alike; the table gives
the median over rounds with the min-max spread, and every ratio is computed within each
round before its median is taken. A last line times the compiled forward on W1 with
TensorFlow's intra-op pool at 1, 2 and all cores (one subprocess each). Everything runs on the default device
(CPU here; GPU where TensorFlow sees one).

Targets (issue 16, on workload W1 unless noted): compiled forward >= 10x faster than
patches; <= 2.5x bilinear resize; forward+backward <= 3.5x forward; peak extra memory of
forward+backward at B=4, 64x64 -> 128x128, C=256 (workload M1) <= 2x the output.
"""

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

IMPLEMENTATIONS = ("compiled", "patches", "xla")

# name: (batch, low height, low width, channels C, embedding d, kernel K, up factor s)
W1 = ("W1", 2, 32, 32, 256, 64, 5, 2)
M1 = ("M1", 4, 64, 64, 256, 64, 5, 2)
SWEEP = (
    ("res 16->32", 2, 16, 16, 256, 64, 5, 2),
    ("res 64->128", 2, 64, 64, 256, 64, 5, 2),
    ("res 128->256", 2, 128, 128, 256, 64, 5, 2),
    ("C=64", 2, 32, 32, 64, 64, 5, 2),
    ("C=512", 2, 32, 32, 512, 64, 5, 2),
    ("K=3", 2, 32, 32, 256, 64, 3, 2),
    ("K=7", 2, 32, 32, 256, 64, 7, 2),
    ("s=4", 2, 16, 16, 256, 64, 5, 4),
)
# The patches path materialises K*K copies of key and value (and of their gradients):
# skip it where that would exceed this many bytes.
PATCHES_LIMIT_BYTES = 3 << 30


def _workload_dict(spec):
    name, b, h, w, c, d, k, s = spec
    return dict(name=name, batch=b, height=h, width=w, channels=c, dim=d, kernel=k, up=s)


def _patches_bytes(wl):
    low = wl["batch"] * wl["height"] * wl["width"]
    return 4 * low * wl["kernel"] ** 2 * (wl["channels"] + wl["dim"]) * 3


def _backend():
    import keras

    return keras.config.backend()


def _make_inputs(wl, seed=0):
    if _backend() != "tensorflow":
        return _make_inputs_other(wl, seed)
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    b, h, w, s = wl["batch"], wl["height"], wl["width"], wl["up"]
    f = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))  # noqa
    query = f(b, s * h, s * w, wl["dim"])
    key = f(b, h, w, wl["dim"])
    value = f(b, h, w, wl["channels"])
    upstream = f(b, s * h, s * w, wl["channels"])
    return query, key, value, upstream


def _functions(impl, wl):
    """(forward, forward+backward) tf.functions of (query, key, value, upstream)."""
    if _backend() != "tensorflow":
        return _functions_other(impl, wl)
    import tensorflow as tf

    from keras_sapa import ops

    k, s = wl["kernel"], wl["up"]
    size = (wl["height"] * s, wl["width"] * s)
    jit = impl == "xla"
    if impl == "bilinear":
        def forward(query, key, value, upstream):
            return tf.image.resize(value, size, "bilinear")
    else:
        def forward(query, key, value, upstream):
            return ops.sapa(query, key, value, k, s, implementation=impl)

    def forward_backward(query, key, value, upstream):
        with tf.GradientTape() as tape:
            tape.watch([query, key, value])
            out = forward(query, key, value, upstream)
        grads = tape.gradient(out, [query, key, value], output_gradients=upstream)
        return [out] + [g for g in grads if g is not None]

    return (tf.function(forward, jit_compile=jit),
            tf.function(forward_backward, jit_compile=jit))


# ----------------------------------------------------------- JAX and PyTorch backends


def _make_inputs_other(wl, seed=0):
    """The inputs of :func:`_make_inputs` as arrays of the running Keras backend."""
    import keras

    rng = np.random.default_rng(seed)
    b, h, w, s = wl["batch"], wl["height"], wl["width"], wl["up"]
    f = lambda *shape: keras.ops.convert_to_tensor(  # noqa: E731
        rng.standard_normal(shape).astype(np.float32))
    return (f(b, s * h, s * w, wl["dim"]), f(b, h, w, wl["dim"]),
            f(b, h, w, wl["channels"]), f(b, s * h, s * w, wl["channels"]))


def _functions_other(impl, wl):
    """(forward, forward+backward) on JAX (``jax.jit``, results waited for) or
    PyTorch (eager): SAPA through :mod:`keras_sapa.ops`, or the backend's own bilinear
    resize of the same value tensor (``jax.image.resize``,
    ``torch.nn.functional.interpolate`` on an NCHW view, ``align_corners=False``)."""
    from keras_sapa import ops

    k, s = wl["kernel"], wl["up"]
    size = (wl["height"] * s, wl["width"] * s)
    if _backend() == "jax":
        import jax

        if impl == "bilinear":
            def forward(query, key, value, upstream):
                return jax.image.resize(value, (value.shape[0], *size, value.shape[3]),
                                        "bilinear")
        else:
            def forward(query, key, value, upstream):
                return ops.sapa(query, key, value, k, s, implementation=impl)

        def forward_backward(query, key, value, upstream):
            argnums = (2,) if impl == "bilinear" else (0, 1, 2)
            args = (query, key, value)
            out, pullback = jax.vjp(
                lambda *a: forward(*[a[argnums.index(i)] if i in argnums else args[i]
                                     for i in range(3)], upstream),
                *[args[i] for i in argnums])
            return [out, *pullback(upstream)]

        jitted = [jax.jit(forward), jax.jit(forward_backward)]
        return tuple((lambda fn: lambda *a: jax.block_until_ready(fn(*a)))(fn)
                     for fn in jitted)

    import torch
    import torch.nn.functional as F

    if impl == "bilinear":
        def forward(query, key, value, upstream):
            # A permuted view: interpolate runs on channels_last memory, no copy.
            return F.interpolate(value.permute(0, 3, 1, 2), size=size, mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
    else:
        def forward(query, key, value, upstream):
            return ops.sapa(query, key, value, k, s, implementation=impl)

    def forward_backward(query, key, value, upstream):
        leaves = [t.detach().requires_grad_(True) for t in (query, key, value)]
        out = forward(*leaves, upstream)
        wanted = leaves[2:] if impl == "bilinear" else leaves
        return [out, *torch.autograd.grad(out, wanted, upstream)]

    def no_grad(fn):
        def run(*args):
            with torch.no_grad():
                return fn(*args)
        return run

    return no_grad(forward), forward_backward


def _time_rounds(cases, inputs, rounds, calls):
    """cases: {label: fn}. Interleaved rounds; returns {label: [ms per round]}, each
    round's value the median of that round's calls."""
    samples = {label: [] for label in cases}
    per_case = {}
    for label, fn in cases.items():  # warm-up: tracing, XLA compilation, first allocation
        fn(*inputs)
        start = time.perf_counter()
        fn(*inputs)
        # Slow cases get fewer calls per round (at least one), about 0.3 s per round.
        per_case[label] = max(1, min(calls, int(0.3 / (time.perf_counter() - start))))
    for _ in range(rounds):
        for label, fn in cases.items():
            this_round = []
            for _ in range(per_case[label]):
                start = time.perf_counter()
                fn(*inputs)
                this_round.append(time.perf_counter() - start)
            samples[label].append(1e3 * float(np.median(this_round)))
    return samples


def _spread(values):
    """(median, min, max) of per-round values."""
    values = np.asarray(values, np.float64)
    return float(np.median(values)), float(values.min()), float(values.max())


def _ratio_spread(numerator, denominator):
    """(median, min, max) over rounds of a ratio of two cases timed in the same rounds."""
    return _spread(np.asarray(numerator) / np.asarray(denominator))


# ---------------------------------------------------------------------------- memory


def _status_kib(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1))


def _allocator_peak(fn, inputs):
    """Peak bytes above the current use of TensorFlow's CPU/GPU allocator during one call,
    or None where the allocator keeps no statistics."""
    import tensorflow as tf

    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None
    out = fn(*inputs)
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    del out
    return max(0, peak - before)


def _memory_child(spec_json):
    """Runs in a subprocess: prints the peak extra KiB of forward and forward+backward,
    as resident memory (VmHWM after a reset through /proc/self/clear_refs)."""
    spec = json.loads(spec_json)
    wl, impl = spec["workload"], spec["implementation"]
    inputs = _make_inputs(wl)
    forward, forward_backward = _functions(impl, wl)
    result = {}
    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        fn(*inputs)  # warm-up (tracing, compilation, one-time allocations)
        gc.collect()
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = fn(*inputs)
        peak = _status_kib("VmHWM")
        del out
        result[mode] = max(0, peak - baseline) * 1024
    print("MEMORY_RESULT " + json.dumps(result))


def _rss_supported():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def measure_memory_rss(wl, impl, timeout=900):
    """Peak extra resident bytes of one forward and one forward+backward call, in a fresh
    subprocess with glibc mapping every buffer >= 64 KiB separately and oneDNN's caching
    CPU allocator off, so that freed memory leaves the process (see the module doc)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TF_CPP_MIN_LOG_LEVEL="2",
               TF_ENABLE_ONEDNN_OPTS="0")
    spec = json.dumps({"workload": wl, "implementation": impl})
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys; from keras_sapa.bench import _memory_child; _memory_child(sys.argv[1])",
         spec],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT "):])
    raise RuntimeError(f"memory measurement of {impl} failed:\n{proc.stderr[-2000:]}")


# ------------------------------------------------------------------------------ main


# ------------------------------------------------------------------------- threads


def _threads_child(spec_json):
    """Runs in a subprocess: times the compiled forward and bilinear resize on one workload
    with TensorFlow's intra-op pool limited to ``threads`` threads."""
    import tensorflow as tf

    spec = json.loads(spec_json)
    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    wl = spec["workload"]
    inputs = _make_inputs(wl)
    fns = {impl: _functions(impl, wl)[0] for impl in ("compiled", "bilinear")}
    timed = _time_rounds(fns, inputs, spec["rounds"], spec["calls"])
    result = {impl: _spread(v) for impl, v in timed.items()}
    result["ratio"] = _ratio_spread(timed["compiled"], timed["bilinear"])
    print("THREADS_RESULT " + json.dumps(result))


def thread_scaling(workload=W1, counts=None, rounds=5, calls=4, timeout=600):
    """The compiled forward (and bilinear resize) on ``workload`` with 1, 2 and all cores:
    {threads: {"compiled": (median, min, max) ms, "bilinear": ..., "ratio": ...}}, one fresh
    subprocess per thread count (TensorFlow fixes its pool size at start-up)."""
    cores = os.cpu_count() or 1
    counts = counts or sorted({1, min(2, cores), cores})
    wl = _workload_dict(workload)
    results = {}
    for threads in counts:
        spec = json.dumps({"workload": wl, "threads": threads, "rounds": rounds,
                           "calls": calls})
        proc = subprocess.run(
            [sys.executable, "-c",
             "import sys; from keras_sapa.bench import _threads_child; "
             "_threads_child(sys.argv[1])", spec],
            capture_output=True, text=True, timeout=timeout,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        for line in proc.stdout.splitlines():
            if line.startswith("THREADS_RESULT "):
                results[threads] = json.loads(line[len("THREADS_RESULT "):])
                break
        else:
            raise RuntimeError(f"thread scaling run ({threads} threads) failed:\n"
                               f"{proc.stderr[-2000:]}")
    return {"workload": wl["name"], "results": results}


def format_scaling(scaling):
    """One line: the compiled forward at 1, 2 and all threads (median, min-max)."""
    parts = []
    for threads, res in sorted(scaling["results"].items(), key=lambda kv: int(kv[0])):
        median, low, high = res["compiled"]
        ratio = res["ratio"][0]
        parts.append(f"{threads} thread{'s' if int(threads) > 1 else ''}: {median:.2f} ms "
                     f"({low:.2f}-{high:.2f}), {ratio:.2f}x bilinear")
    return (f"Compiled forward, {scaling['workload']}, by intra-op threads: "
            + "; ".join(parts) + ".")


def machine_description():
    """One line describing the machine, TensorFlow and the compiled library (or,
    on JAX and PyTorch, the backend's version and devices)."""
    if _backend() != "tensorflow":
        return _machine_description_other()
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    device = f"GPU: {', '.join(g.name for g in gpus)}" if gpus else "no GPU"
    build = ""
    info_path = os.path.join(os.path.dirname(__file__), "_lib", "build_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        build = f", compiled ops: {info.get('cxx')} {' '.join(info.get('cxx_flags', []))}"
    return (f"{cpu}, {os.cpu_count()} logical cores, {device}; TensorFlow {tf.__version__}, "
            f"Python {platform.python_version()}{build}")


def _machine_description_other():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    backend = _backend()
    if backend == "jax":
        import jax

        devices = ", ".join(sorted({str(d.device_kind) for d in jax.devices()}))
        framework = f"JAX {jax.__version__} on {jax.default_backend()} ({devices})"
    else:
        import torch

        device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        framework = (f"PyTorch {torch.__version__} ({device}, "
                     f"{torch.get_num_threads()} threads)")
    return (f"{cpu}, {os.cpu_count()} logical cores; Keras backend {backend}: {framework}, "
            f"Python {platform.python_version()}")


def run_benchmark(workloads=None, implementations=IMPLEMENTATIONS, rounds=5, calls=4,
                  memory=True, memory_workloads=("W1", "M1"), print_table=True,
                  sweep_implementations=("compiled", "patches"), threads=True):
    """Benchmarks ``implementations`` on ``workloads`` (tuples like :data:`W1`).

    Returns a list of dict rows (one per workload and implementation, plus one
    ``bilinear`` row per workload) with the keys ``workload``, ``implementation``,
    ``fwd_ms``, ``fwdbwd_ms``, ``fwd_vs_bilinear``, ``speedup_vs_patches``,
    ``fwdbwd_over_fwd``, ``peak_fwd_mib``, ``peak_fwdbwd_mib``, ``peak_fwdbwd_over_out``
    (None where not measured). Prints a table unless ``print_table`` is False. Workloads
    other than W1 and M1 (the sweep) run only ``sweep_implementations`` (the XLA CPU
    backward takes seconds per call there), and patches only where its window tensors
    stay under :data:`PATCHES_LIMIT_BYTES`.
    """
    from keras_sapa import ops

    if _backend() != "tensorflow":
        # Allocator statistics, the RSS child and the thread runs are TensorFlow's.
        memory = threads = False
    workloads = [W1, M1, *SWEEP] if workloads is None else workloads
    impls = [i for i in implementations if i != "compiled" or ops.compiled_available()]
    skipped = [i for i in implementations if i not in impls]
    methods = set()
    rows = []
    for spec in workloads:
        wl = _workload_dict(spec)
        inputs = _make_inputs(wl)
        main_workload = wl["name"] in ("W1", "M1")
        here = ["bilinear"] + [
            i for i in impls
            if (i != "patches" or _patches_bytes(wl) <= PATCHES_LIMIT_BYTES)
            and (main_workload or i in sweep_implementations)
        ]
        fns = {impl: _functions(impl, wl) for impl in here}
        # Forward and forward+backward of every implementation interleaved in the same
        # rounds, so that every ratio is also taken per round (its spread is reported).
        timed = _time_rounds({(i, mode): f[j] for i, f in fns.items()
                              for j, mode in enumerate(("fwd", "fwdbwd"))},
                             inputs, rounds, calls)
        fwd_rounds = {i: timed[(i, "fwd")] for i in fns}
        fwdbwd_rounds = {i: timed[(i, "fwdbwd")] for i in fns}
        fwd = {i: _spread(v)[0] for i, v in fwd_rounds.items()}
        fwdbwd = {i: _spread(v)[0] for i, v in fwdbwd_rounds.items()}
        out_bytes = 4 * wl["batch"] * wl["height"] * wl["width"] * wl["up"] ** 2 * wl["channels"]
        for impl in here:
            # Medians over rounds; the *_spread keys hold (median, min, max) over rounds.
            spreads = dict(
                fwd_ms=_spread(fwd_rounds[impl]),
                fwdbwd_ms=_spread(fwdbwd_rounds[impl]),
                fwd_vs_bilinear=_ratio_spread(fwd_rounds[impl], fwd_rounds["bilinear"]),
                speedup_vs_patches=(_ratio_spread(fwd_rounds["patches"], fwd_rounds[impl])
                                    if "patches" in fwd_rounds else None),
                fwdbwd_over_fwd=_ratio_spread(fwdbwd_rounds[impl], fwd_rounds[impl]),
            )
            row = dict(workload=wl["name"], implementation=impl, peak_fwd_mib=None,
                       peak_fwdbwd_mib=None, peak_fwdbwd_over_out=None, shape=wl)
            for key, value in spreads.items():
                row[key] = None if value is None else value[0]
                row[key + "_spread"] = value
            if memory and wl["name"] in memory_workloads:
                peaks = {"fwd": _allocator_peak(fns[impl][0], inputs),
                         "fwdbwd": _allocator_peak(fns[impl][1], inputs)}
                method = "allocator"
                if None in peaks.values() and _rss_supported():
                    peaks, method = measure_memory_rss(wl, impl), "rss"
                if None not in peaks.values():
                    row["peak_fwd_mib"] = peaks["fwd"] / 2**20
                    row["peak_fwdbwd_mib"] = peaks["fwdbwd"] / 2**20
                    row["peak_fwdbwd_over_out"] = peaks["fwdbwd"] / out_bytes
                    row["memory_method"] = method
                    methods.add(method)
            rows.append(row)
        del fns, inputs
        gc.collect()
    scaling = None
    if threads and "compiled" in impls:
        scaling = thread_scaling(rounds=rounds, calls=calls)
        for row in rows:
            row["thread_scaling"] = scaling
    if print_table:
        print(format_table(rows, skipped=skipped, memory=methods, scaling=scaling))
    return rows


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def _fmt_spread(row, key, spec, suffix=""):
    spread = row.get(key + "_spread")
    if spread is None:
        return _fmt(row.get(key), spec, suffix)
    median, low, high = spread
    return (f"{format(median, spec)}{suffix} ({format(low, spec)}-{format(high, spec)})")


def format_table(rows, skipped=(), memory=(), scaling=None):
    """A Markdown table of :func:`run_benchmark` rows, with the machine description (and
    the thread scaling line of :func:`thread_scaling`, when given)."""
    lines = [
        f"Machine: {machine_description()}",
        "Workloads (B, HxW -> sHxsW, C, d, K, s; float32): "
        + "; ".join(
            sorted({f"{r['workload']}: {r['shape']['batch']}, {r['shape']['height']}x"
                    f"{r['shape']['width']} -> {r['shape']['height'] * r['shape']['up']}x"
                    f"{r['shape']['width'] * r['shape']['up']}, {r['shape']['channels']}, "
                    f"{r['shape']['dim']}, {r['shape']['kernel']}, {r['shape']['up']}"
                    for r in rows}, key=lambda t: (t[:2] != "W1", t[:2] != "M1", t))),
        "",
        "| workload | implementation | fwd ms | fwd+bwd ms | fwd / bilinear | patches fwd / fwd "
        "| fwd+bwd / fwd | peak fwd MiB | peak fwd+bwd MiB | fwd+bwd peak / output |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['implementation']} | {_fmt_spread(r, 'fwd_ms', '.2f')} | "
            f"{_fmt_spread(r, 'fwdbwd_ms', '.2f')} | "
            f"{_fmt_spread(r, 'fwd_vs_bilinear', '.2f', 'x')} | "
            f"{_fmt_spread(r, 'speedup_vs_patches', '.1f', 'x')} | "
            f"{_fmt_spread(r, 'fwdbwd_over_fwd', '.2f', 'x')} | "
            f"{_fmt(r['peak_fwd_mib'], '.1f')} | {_fmt(r['peak_fwdbwd_mib'], '.1f')} | "
            f"{_fmt(r['peak_fwdbwd_over_out'], '.2f', 'x')} |"
        )
    lines.append("\nTimes and ratios: median over interleaved rounds (min-max over rounds in "
                 "brackets); every ratio is taken within each round.")
    if scaling:
        lines.append(format_scaling(scaling))
    if skipped:
        lines.append(f"\nNot available here: {', '.join(skipped)}.")
    notes = {
        "allocator": "peak memory: TensorFlow allocator statistics (get_memory_info 'peak' "
                     "minus the bytes in use before the call; tensors only)",
        "rss": "peak memory: resident set high-water mark in a fresh subprocess",
    }
    if memory:
        lines.append("\n" + "; ".join(notes[m] for m in sorted(memory)) + ".")
    else:
        lines.append("\nPeak memory not measured here.")
    return "\n".join(lines)


def main(argv=None):
    """``python -m keras_sapa bench [--quick] [--no-memory] [--json PATH] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m keras_sapa bench",
        description="Benchmark the SAPA implementations against bilinear resize.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="W1 and M1 only, fewer repetitions (about a minute)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated subset of compiled,patches,xla")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=None, help="calls per round")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--no-threads", action="store_true",
                        help="skip the 1 / 2 / all-thread runs of the compiled forward")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"), default=None,
                        help="Keras backend to run on (default: KERAS_BACKEND, else "
                             "tensorflow); the baseline is that backend's bilinear resize")
    args = parser.parse_args(argv)
    if args.backend and args.backend != _backend():
        # Keras fixes its backend when first imported: run again under the one asked for.
        sys.stdout.flush()
        env = dict(os.environ, KERAS_BACKEND=args.backend)
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] == "bench":
            argv = argv[1:]
        return subprocess.call([sys.executable, "-m", "keras_sapa", "bench", *argv], env=env)
    impls = [i.strip() for i in args.implementations.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLEMENTATIONS]
    if bad:
        parser.error(f"unknown implementations {bad}; choose from {IMPLEMENTATIONS}")
    workloads = [W1, M1] if args.quick else None
    rounds = args.rounds or (3 if args.quick else 5)
    calls = args.calls or (3 if args.quick else 4)
    rows = run_benchmark(workloads, impls, rounds=rounds, calls=calls,
                         memory=not args.no_memory, threads=not args.no_threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
