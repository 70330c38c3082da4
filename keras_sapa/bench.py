"""Speed and memory benchmark of the SAPA implementations (``python -m keras_sapa bench``).

One table of cases drives it: :data:`WORKLOADS` (shapes) x :data:`CASES` (what is timed:
each SAPA implementation, and the bilinear baseline), on the Keras backend the process
runs (``--backend`` starts a process on another). Adding an op to the benchmark is one
:class:`Case` entry: its inputs, its forward function written with ``keras.ops`` or
:mod:`keras_sapa.ops`, the inputs it differentiates.

For every workload and case, in one process:

- ``fwd ms``: median wall time of the forward call, compiled as the backend compiles a
  model's call (TensorFlow: ``tf.function``, ``jit_compile=True`` for ``xla``; JAX:
  ``jax.jit``, results waited for; PyTorch: eager under ``torch.no_grad``);
- ``fwd+bwd ms``: the forward call plus the gradients with respect to the case's
  inputs (query, key and value for SAPA) for a fixed random upstream gradient
  (``tf.GradientTape``, ``jax.vjp``, ``torch.autograd.grad``: the only
  backend-specific lines, in :func:`_compile`);
- ratios against the bilinear resize of the same value tensor
  (``keras.ops.image.resize``, which calls ``tf.image.resize``, ``jax.image.resize`` or
  ``torch.nn.functional.interpolate``), timed in the same rounds, and against the
  patches path;
- ``peak MiB`` (TensorFlow): the peak extra memory of one forward and of one
  forward+backward call, from TensorFlow's allocator statistics (the ``peak`` after
  ``reset_memory_stats`` minus the bytes in use before the call: every tensor the call
  allocates). Where the allocator keeps no statistics, a fresh subprocess per case
  measures resident memory instead: after a warm-up call ``/proc/self/clear_refs``
  resets the high-water mark (VmHWM); glibc maps every buffer of 64 KiB or more
  separately (``MALLOC_MMAP_THRESHOLD_``) and oneDNN's caching allocator is off, so
  freed memory leaves the process. ``xN out`` divides the forward+backward peak by the
  size of the output tensor.

Timings interleave the cases (forward and forward+backward) round by round, so that load
from other processes on a shared machine affects them alike; the table gives the median
over rounds with the min-max spread, and every ratio is computed within each round
before its median is taken. On TensorFlow a last line times the compiled forward on W1
with the intra-op pool at 1, 2 and all cores (one subprocess each). Everything runs on
the default device.

Targets (issue 16, on workload W1 unless noted): compiled forward >= 10x faster than
patches; <= 2.5x bilinear resize; forward+backward <= 3.5x forward; peak extra memory of
forward+backward at B=4, 64x64 -> 128x128, C=256 (workload M1) <= 2x the output.
SAPA-D rows (``deform-xla``, ``deform-compiled``; P=9, G=4, E=32, random offsets), issue
22: compiled forward within 2x of SAPA-B's compiled forward (the ``compiled`` row of the
same workload), forward+backward within 3.5x of its own forward, peak forward+backward
memory at M1 within 3x of the output.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

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
#: The workloads that every case runs and whose memory is measured; the sweep runs
#: only the cases marked ``sweep``.
MAIN_WORKLOADS = ("W1", "M1")
# The patches path materialises K*K copies of key and value (and of their gradients):
# skip it where that would exceed this many bytes.
PATCHES_LIMIT_BYTES = 3 << 30


def _workload_dict(spec):
    name, b, h, w, c, d, k, s = spec
    return dict(name=name, batch=b, height=h, width=w, channels=c, dim=d, kernel=k, up=s)


# ------------------------------------------------------------------------ the cases


def _sapa_inputs(wl):
    """Shapes of SAPA's differentiated inputs for workload ``wl``."""
    b, h, w, s = wl["batch"], wl["height"], wl["width"], wl["up"]
    return {
        "query": (b, s * h, s * w, wl["dim"]),
        "key": (b, h, w, wl["dim"]),
        "value": (b, h, w, wl["channels"]),
    }


def _sapa(implementation):
    def forward(wl, query, key, value):
        from keras_sapa import ops

        return ops.sapa(query, key, value, wl["kernel"], wl["up"], implementation=implementation)

    return forward


def _bilinear(wl, query, key, value):
    import keras

    size = (wl["height"] * wl["up"], wl["width"] * wl["up"])
    return keras.ops.image.resize(value, size, interpolation="bilinear")


#: SAPA-D's configuration in the benchmark: the official defaults (points P, groups G,
#: embedding E per group), on each workload's sizes, channels and factor.
DEFORM_POINTS, DEFORM_GROUPS, DEFORM_EMBED = 9, 4, 32


def _deform_inputs(wl):
    """Shapes of SAPA-D's differentiated inputs for workload ``wl`` (the offsets are
    normal noise: points within about a pixel or two of their anchors)."""
    b, h, w, s = wl["batch"], wl["height"], wl["width"], wl["up"]
    width = DEFORM_GROUPS * DEFORM_EMBED
    return {
        "query": (b, s * h, s * w, width),
        "key": (b, h, w, width),
        "value": (b, h, w, wl["channels"]),
        "offsets": (b, s * h, s * w, 2 * DEFORM_GROUPS * DEFORM_POINTS),
    }


def _deform(implementation):
    def forward(wl, query, key, value, offsets):
        from keras_sapa import ops

        return ops.sapa_deform(
            query,
            key,
            value,
            offsets,
            num_points=DEFORM_POINTS,
            up_factor=wl["up"],
            groups=DEFORM_GROUPS,
            implementation=implementation,
        )

    return forward


def _deform_compiled_available():
    from keras_sapa.ops._deform import resolve_deform_implementation

    try:
        return resolve_deform_implementation("compiled") == "compiled"
    except (RuntimeError, ValueError):
        return False


def _compiled_available():
    from keras_sapa import ops

    return ops.compiled_available()


def _patches_fit(wl):
    low = wl["batch"] * wl["height"] * wl["width"]
    return 4 * low * wl["kernel"] ** 2 * (wl["channels"] + wl["dim"]) * 3 <= PATCHES_LIMIT_BYTES


@dataclasses.dataclass(frozen=True)
class Case:
    """One row kind of the table.

    Attributes:
        forward: ``forward(workload, *inputs)`` -> output, with ``keras.ops`` or
            :mod:`keras_sapa.ops` (the runner compiles it for the backend).
        inputs: ``inputs(workload)`` -> ``{name: shape}`` of the forward's inputs
            (float32 normal noise), in call order.
        grads: the inputs the backward differentiates.
        jit: TensorFlow only: ``tf.function(jit_compile=True)`` (JAX always jits).
        sweep: also run on the sweep workloads (not only :data:`MAIN_WORKLOADS`).
        available: ``available()`` -> whether it runs here (else listed as skipped).
        fits: ``fits(workload)`` -> whether the workload fits its memory.
    """

    forward: Callable
    inputs: Callable = _sapa_inputs
    grads: tuple = ("query", "key", "value")
    jit: bool = False
    sweep: bool = False
    available: Callable = lambda: True
    fits: Callable = lambda wl: True


#: The baseline, then SAPA's implementations (the names of ``implementation=``), then
#: SAPA-D's (``deform-`` and the ``implementation=`` of :func:`keras_sapa.ops.sapa_deform`).
CASES = {
    "bilinear": Case(_bilinear, grads=("value",)),
    "compiled": Case(_sapa("compiled"), sweep=True, available=_compiled_available),
    "patches": Case(_sapa("patches"), sweep=True, fits=_patches_fit),
    "xla": Case(_sapa("xla"), jit=True),
    # SAPA-D (P=9, G=4, E=32): its builtin gather formulation and its compiled kernels.
    "deform-xla": Case(
        _deform("xla"), inputs=_deform_inputs, grads=("query", "key", "value", "offsets"), jit=True
    ),
    "deform-compiled": Case(
        _deform("compiled"),
        inputs=_deform_inputs,
        grads=("query", "key", "value", "offsets"),
        available=_deform_compiled_available,
    ),
}
BASELINE = "bilinear"
#: The case the ``patches fwd / fwd`` column divides by.
RATIO_REFERENCE = "patches"
IMPLEMENTATIONS = tuple(name for name in CASES if name != BASELINE)


# ------------------------------------------------------------------- the runner


def _backend():
    import keras

    return keras.config.backend()


def _random_inputs(shapes, seed=0):
    import keras

    rng = np.random.default_rng(seed)
    return [
        keras.ops.convert_to_tensor(rng.standard_normal(shape).astype(np.float32))
        for shape in shapes
    ]


def _compile(case, wl, names):
    """``(forward, forward_backward)`` of ``case`` on the running backend; both take
    the inputs (in ``names`` order) then the upstream gradient."""
    backend = _backend()
    wanted = [names.index(name) for name in case.grads]

    def forward(*args):
        return case.forward(wl, *args[: len(names)])

    if backend == "tensorflow":
        import tensorflow as tf

        def forward_backward(*args):
            inputs, upstream = list(args[:-1]), args[-1]
            with tf.GradientTape() as tape:
                tape.watch([inputs[i] for i in wanted])
                out = forward(*inputs)
            return [out, *tape.gradient(out, [inputs[i] for i in wanted], upstream)]

        return (
            tf.function(forward, jit_compile=case.jit),
            tf.function(forward_backward, jit_compile=case.jit),
        )
    if backend == "jax":
        import jax

        def forward_backward(*args):
            inputs, upstream = list(args[:-1]), args[-1]

            def differentiable(*chosen):
                full = list(inputs)
                for i, value in zip(wanted, chosen, strict=True):
                    full[i] = value
                return forward(*full)

            out, pullback = jax.vjp(differentiable, *[inputs[i] for i in wanted])
            return [out, *pullback(upstream)]

        jitted = jax.jit(forward), jax.jit(forward_backward)
        return tuple(lambda *a, fn=fn: jax.block_until_ready(fn(*a)) for fn in jitted)
    import torch

    def no_grad_forward(*args):
        with torch.no_grad():
            return forward(*args)

    def forward_backward(*args):
        inputs = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(args[:-1])]
        out = forward(*inputs)
        return [out, *torch.autograd.grad(out, [inputs[i] for i in wanted], args[-1])]

    return no_grad_forward, forward_backward


def _prepare(names, wl, seed=0):
    """Per case ``(forward, forward_backward, arguments)``: the compiled functions and
    their inputs (one draw per input shape, shared by the cases that take it), the
    upstream gradient shaped like the case's output."""
    prepared = {}
    drawn = {}
    for name in names:
        case = CASES[name]
        shapes = case.inputs(wl)
        key = tuple(shapes.items())
        if key not in drawn:
            drawn[key] = _random_inputs(list(shapes.values()), seed)
        args = drawn[key]
        forward, forward_backward = _compile(case, wl, list(shapes))
        out_shape = tuple(case.forward(wl, *args).shape)  # one eager call
        upstream = _random_inputs([out_shape], seed + 1)[0]
        prepared[name] = (forward, forward_backward, [*args, upstream])
    return prepared


def _time_rounds(functions, rounds, calls):
    """functions: {label: (fn, args)}. Interleaved rounds; returns {label: [ms per
    round]}, each round's value the median of that round's calls."""
    samples = {label: [] for label in functions}
    per_case = {}
    for label, (fn, args) in functions.items():  # warm-up: tracing, compilation
        fn(*args)
        start = time.perf_counter()
        fn(*args)
        # Slow cases get fewer calls per round (at least one), about 0.3 s per round.
        per_case[label] = max(1, min(calls, int(0.3 / (time.perf_counter() - start))))
    for _ in range(rounds):
        for label, (fn, args) in functions.items():
            this_round = []
            for _ in range(per_case[label]):
                start = time.perf_counter()
                fn(*args)
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


def _allocator_peak(fn, args):
    """Peak bytes above the current use of TensorFlow's allocator during one call, or
    None where the allocator keeps no statistics."""
    import tensorflow as tf

    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None
    out = fn(*args)
    peak = tf.config.experimental.get_memory_info(device)["peak"]
    del out
    return max(0, peak - before)


def _rss_peaks(forward, forward_backward, args):
    """Peak extra resident bytes of one call of each (run in a fresh subprocess)."""
    result = {}
    for mode, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        fn(*args)  # warm-up (tracing, compilation, one-time allocations)
        gc.collect()
        baseline = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        out = fn(*args)
        peak = _status_kib("VmHWM")
        del out
        result[mode] = max(0, peak - baseline) * 1024
    return result


def _rss_supported():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def _measure_memory(forward, forward_backward, args, wl, name):
    """``({"fwd": bytes, "fwdbwd": bytes}, method)`` or ``(None, None)``: TensorFlow's
    allocator statistics, else resident memory in a subprocess. Other backends: not
    measured (their allocators keep no comparable statistics)."""
    if _backend() != "tensorflow":
        return None, None
    peaks = {
        "fwd": _allocator_peak(forward, args),
        "fwdbwd": _allocator_peak(forward_backward, args),
    }
    if None not in peaks.values():
        return peaks, "allocator"
    if not _rss_supported():
        return None, None
    env = dict(TF_CPP_MIN_LOG_LEVEL="2", MALLOC_MMAP_THRESHOLD_="65536", TF_ENABLE_ONEDNN_OPTS="0")
    return _run_child({"task": "memory", "workload": wl, "case": name}, env), "rss"


def _run_child(spec, env, timeout=900):
    """Runs :func:`_child` on ``spec`` in a fresh process; returns its result."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from keras_sapa import bench; bench._child(sys.argv[1])",
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise RuntimeError(f"benchmark subprocess {spec} failed:\n{proc.stderr[-2000:]}")


def _child(spec_json):
    """A subprocess's work: ``memory`` (resident peaks of one case) or ``threads``
    (the compiled forward and the baseline with TensorFlow's intra-op pool at
    ``threads``)."""
    spec = json.loads(spec_json)
    wl = spec["workload"]
    if spec["task"] == "memory":
        forward, forward_backward, args = _prepare([spec["case"]], wl)[spec["case"]]
        result = _rss_peaks(forward, forward_backward, args)
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
        names = ["compiled", BASELINE]
        prepared = _prepare(names, wl)
        timed = _time_rounds(
            {name: (prepared[name][0], prepared[name][2]) for name in names},
            spec["rounds"],
            spec["calls"],
        )
        result = {name: _spread(v) for name, v in timed.items()}
        result["ratio"] = _ratio_spread(timed["compiled"], timed[BASELINE])
    print("BENCH_RESULT " + json.dumps(result))


def thread_scaling(workload=W1, counts=None, rounds=5, calls=4):
    """The compiled forward (and the baseline) on ``workload`` with 1, 2 and all cores
    (TensorFlow): ``{"workload": name, "results": {threads: {"compiled": (median, min,
    max) ms, "bilinear": ..., "ratio": ...}}}``, one fresh subprocess per thread count
    (TensorFlow fixes its pool size at start-up)."""
    cores = os.cpu_count() or 1
    counts = counts or sorted({1, min(2, cores), cores})
    wl = _workload_dict(workload)
    results = {
        threads: _run_child(
            {
                "task": "threads",
                "workload": wl,
                "threads": threads,
                "rounds": rounds,
                "calls": calls,
            },
            {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"},
        )
        for threads in counts
    }
    return {"workload": wl["name"], "results": results}


# --------------------------------------------------------------------------- tables


def format_scaling(scaling):
    """One line: the compiled forward at 1, 2 and all threads (median, min-max)."""
    parts = []
    for threads, res in sorted(scaling["results"].items(), key=lambda kv: int(kv[0])):
        median, low, high = res["compiled"]
        parts.append(
            f"{threads} thread{'s' if int(threads) > 1 else ''}: {median:.2f} ms "
            f"({low:.2f}-{high:.2f}), {res['ratio'][0]:.2f}x bilinear"
        )
    return (
        f"Compiled forward, {scaling['workload']}, by intra-op threads: " + "; ".join(parts) + "."
    )


def machine_description():
    """One line: the CPU, the devices and versions of the running backend, and the
    compiled library's build flags."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    backend = _backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        device = ", ".join(g.name for g in gpus) if gpus else "no GPU"
        framework = f"TensorFlow {tf.__version__} ({device})"
    elif backend == "jax":
        import jax

        devices = ", ".join(sorted({str(d.device_kind) for d in jax.devices()}))
        framework = f"JAX {jax.__version__} on {jax.default_backend()} ({devices})"
    else:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        framework = f"PyTorch {torch.__version__} ({device}, {torch.get_num_threads()} threads)"
    build = ""
    info_path = os.path.join(os.path.dirname(__file__), "_lib", "build_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        build = f", compiled ops: {info.get('cxx')} {' '.join(info.get('cxx_flags', []))}"
    return (
        f"{cpu}, {os.cpu_count()} logical cores; Keras backend {backend}: {framework}, "
        f"Python {platform.python_version()}{build}"
    )


def _fmt(value, spec, suffix=""):
    return "-" if value is None else format(value, spec) + suffix


def _fmt_spread(row, key, spec, suffix=""):
    spread = row.get(key + "_spread")
    if spread is None:
        return _fmt(row.get(key), spec, suffix)
    median, low, high = spread
    return f"{format(median, spec)}{suffix} ({format(low, spec)}-{format(high, spec)})"


#: (header, row key, format, suffix, with spread) of the table's columns.
COLUMNS = (
    ("fwd ms", "fwd_ms", ".2f", "", True),
    ("fwd+bwd ms", "fwdbwd_ms", ".2f", "", True),
    ("fwd / bilinear", "fwd_vs_bilinear", ".2f", "x", True),
    ("patches fwd / fwd", "speedup_vs_patches", ".1f", "x", True),
    ("fwd+bwd / fwd", "fwdbwd_over_fwd", ".2f", "x", True),
    ("peak fwd MiB", "peak_fwd_mib", ".1f", "", False),
    ("peak fwd+bwd MiB", "peak_fwdbwd_mib", ".1f", "", False),
    ("fwd+bwd peak / output", "peak_fwdbwd_over_out", ".2f", "x", False),
)


def format_table(rows, skipped=(), memory=(), scaling=None):
    """A Markdown table of :func:`run_benchmark` rows, with the machine description (and
    the thread scaling line of :func:`thread_scaling`, when given)."""
    shapes = {}
    for r in rows:
        s = r["shape"]
        shapes[r["workload"]] = (
            f"{r['workload']}: {s['batch']}, {s['height']}x{s['width']} -> "
            f"{s['height'] * s['up']}x{s['width'] * s['up']}, {s['channels']}, {s['dim']}, "
            f"{s['kernel']}, {s['up']}"
        )
    lines = [
        f"Machine: {machine_description()}",
        "Workloads (B, HxW -> sHxsW, C, d, K, s; float32): " + "; ".join(shapes.values()),
        "",
        "| workload | implementation | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for r in rows:
        cells = [
            _fmt_spread(r, key, spec, suffix) if spread else _fmt(r[key], spec, suffix)
            for _, key, spec, suffix, spread in COLUMNS
        ]
        lines.append(f"| {r['workload']} | {r['implementation']} | " + " | ".join(cells) + " |")
    lines.append(
        "\nTimes and ratios: median over interleaved rounds (min-max over rounds in "
        "brackets); every ratio is taken within each round."
    )
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


# ----------------------------------------------------------------------------- run


def _row(wl, name, fwd, fwdbwd):
    """One result row from the per-round times of every case of the workload."""
    spreads = dict(
        fwd_ms=_spread(fwd[name]),
        fwdbwd_ms=_spread(fwdbwd[name]),
        fwd_vs_bilinear=_ratio_spread(fwd[name], fwd[BASELINE]),
        speedup_vs_patches=(
            _ratio_spread(fwd[RATIO_REFERENCE], fwd[name]) if RATIO_REFERENCE in fwd else None
        ),
        fwdbwd_over_fwd=_ratio_spread(fwdbwd[name], fwd[name]),
    )
    row = dict(
        workload=wl["name"],
        implementation=name,
        peak_fwd_mib=None,
        peak_fwdbwd_mib=None,
        peak_fwdbwd_over_out=None,
        shape=wl,
    )
    for key, value in spreads.items():
        # Medians over rounds; the *_spread keys hold (median, min, max) over rounds.
        row[key] = None if value is None else value[0]
        row[key + "_spread"] = value
    return row


def run_benchmark(
    workloads=None,
    implementations=IMPLEMENTATIONS,
    rounds=5,
    calls=4,
    memory=True,
    memory_workloads=MAIN_WORKLOADS,
    print_table=True,
    sweep_implementations=None,
    threads=True,
):
    """Benchmarks the ``implementations`` (names of :data:`CASES`) on ``workloads``
    (tuples like :data:`W1`; default: W1, M1 and the sweep).

    Returns a list of dict rows (one per workload and case, the baseline first) with the
    keys ``workload``, ``implementation``, ``fwd_ms``, ``fwdbwd_ms``, ``fwd_vs_bilinear``,
    ``speedup_vs_patches``, ``fwdbwd_over_fwd`` (each with a ``*_spread`` twin:
    median, min, max over rounds), ``peak_fwd_mib``, ``peak_fwdbwd_mib``,
    ``peak_fwdbwd_over_out`` (None where not measured) and ``shape``. Prints a table
    unless ``print_table`` is False. Workloads other than :data:`MAIN_WORKLOADS` run
    only the cases in ``sweep_implementations`` (default: those marked ``sweep``: the
    XLA CPU backward takes seconds per call there); a case runs only where it ``fits``.
    Memory (TensorFlow) on ``memory_workloads``; ``threads`` adds the thread scaling
    line (TensorFlow, compiled).
    """
    unknown = [name for name in implementations if name not in CASES]
    if unknown:
        raise ValueError(
            f"`implementations` must be names of {tuple(CASES)}. Received: {implementations!r}"
        )
    if sweep_implementations is None:
        sweep_implementations = [name for name, case in CASES.items() if case.sweep]
    workloads = [W1, M1, *SWEEP] if workloads is None else workloads
    names = [n for n in implementations if n != BASELINE and CASES[n].available()]
    skipped = [n for n in implementations if n != BASELINE and n not in names]
    methods = set()
    rows = []
    for spec in workloads:
        wl = _workload_dict(spec)
        main = wl["name"] in MAIN_WORKLOADS
        here = [BASELINE] + [
            n for n in names if CASES[n].fits(wl) and (main or n in sweep_implementations)
        ]
        prepared = _prepare(here, wl)
        # Forward and forward+backward of every case interleaved in the same rounds, so
        # that every ratio is also taken per round (its spread is reported).
        timed = _time_rounds(
            {
                (n, mode): (prepared[n][i], prepared[n][2])
                for n in here
                for i, mode in enumerate(("fwd", "fwdbwd"))
            },
            rounds,
            calls,
        )
        fwd = {n: timed[(n, "fwd")] for n in here}
        fwdbwd = {n: timed[(n, "fwdbwd")] for n in here}
        for name in here:
            row = _row(wl, name, fwd, fwdbwd)
            if memory and wl["name"] in memory_workloads:
                forward, forward_backward, args = prepared[name]
                peaks, method = _measure_memory(forward, forward_backward, args, wl, name)
                if peaks is not None:
                    out_bytes = 4 * int(np.prod(args[-1].shape))
                    row["peak_fwd_mib"] = peaks["fwd"] / 2**20
                    row["peak_fwdbwd_mib"] = peaks["fwdbwd"] / 2**20
                    row["peak_fwdbwd_over_out"] = peaks["fwdbwd"] / out_bytes
                    row["memory_method"] = method
                    methods.add(method)
            rows.append(row)
        del prepared
        gc.collect()
    scaling = None
    if threads and _backend() == "tensorflow" and "compiled" in names:
        scaling = thread_scaling(rounds=rounds, calls=calls)
        for row in rows:
            row["thread_scaling"] = scaling
    if print_table:
        print(format_table(rows, skipped=skipped, memory=methods, scaling=scaling))
    return rows


def main(argv=None):
    """``python -m keras_sapa bench [--quick] [--no-memory] [--json PATH] ...``"""
    parser = argparse.ArgumentParser(
        prog="python -m keras_sapa bench",
        description="Benchmark the SAPA implementations against bilinear resize.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="W1 and M1 only, fewer repetitions (about a minute)"
    )
    parser.add_argument(
        "--implementations",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help="comma-separated workload names (default: W1, M1 and the sweep; "
        f"choose from {', '.join(w[0] for w in (W1, M1, *SWEEP))})",
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=None, help="calls per round")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument(
        "--no-threads",
        action="store_true",
        help="skip the 1 / 2 / all-thread runs of the compiled forward",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--backend",
        choices=("tensorflow", "jax", "torch"),
        default=None,
        help="Keras backend to run on (default: KERAS_BACKEND, else "
        "tensorflow); the baseline is that backend's bilinear resize",
    )
    args = parser.parse_args(argv)
    if args.backend and args.backend != _backend():
        # Keras fixes its backend when first imported: run again under the one asked for.
        sys.stdout.flush()
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] == "bench":
            argv = argv[1:]
        env = dict(os.environ, KERAS_BACKEND=args.backend)
        return subprocess.call([sys.executable, "-m", "keras_sapa", "bench", *argv], env=env)
    names = [i.strip() for i in args.implementations.split(",") if i.strip()]
    bad = [i for i in names if i not in IMPLEMENTATIONS]
    if bad:
        parser.error(f"unknown implementations {bad}; choose from {IMPLEMENTATIONS}")
    workloads = [W1, M1] if args.quick else None
    if args.workloads:
        known = {spec[0]: spec for spec in (W1, M1, *SWEEP)}
        chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
        missing = [w for w in chosen if w not in known]
        if missing:
            parser.error(f"unknown workloads {missing}; choose from {list(known)}")
        workloads = [known[w] for w in chosen]
    rows = run_benchmark(
        workloads,
        names,
        rounds=args.rounds or (3 if args.quick else 5),
        calls=args.calls or (3 if args.quick else 4),
        memory=not args.no_memory,
        threads=not args.no_threads,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
