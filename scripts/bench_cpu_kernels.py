#!/usr/bin/env python3
"""Microbenchmark of the framework-free SAPA CPU kernels, outside any framework.

Compiles ``scripts/bench_cpu_kernels.cc`` with the flags of ``custom_ops/build.py``
(``-O3``, plus ``-mavx2 -mfma -mf16c`` where the compiler and CPU support them) and reports, per
shape and thread count, the fused forward and forward+backward times, their GFLOP/s and
the fraction of the FMA peak::

    python scripts/bench_cpu_kernels.py                      # W1 and M1, 1 and 2 threads
    python scripts/bench_cpu_kernels.py --shapes W1 --reps 31 --baseline HEAD~3
    python scripts/bench_cpu_kernels.py --check              # float64 reference check only
    python scripts/bench_cpu_kernels.py --shapes W1 --threads 1 --parts   # and each primitive

Shapes: ``W1`` = B=2, 32x32 -> 64x64 (s=2), K=5, d=64, C=256; ``M1`` = the same at
128x128 -> 256x256; or ``B,H,W,s,K,d,C``. FLOPs: 2 * K*K * (d + C) per output point for
the forward (similarity and aggregation multiply-adds), twice that for the backward.
The same calls on float16 storage (converted per tile inside the kernels) are timed beside
float32.

Peak: ``nominal`` = cores x frequency (``cpu MHz`` of /proc/cpuinfo, the base clock) x 32
FLOP/cycle (two 8-lane fp32 FMA pipes, as on Haswell and later and on Zen 2-4);
``measured`` = a pure-FMA loop timed interleaved with the kernels in the same run (it
includes turbo and whatever share of the cores other jobs leave). Every entry is timed in
turn, rep by rep, and the medians reported: wall-clock, and process CPU time (summed over
threads), the steadier one on a shared machine. ``--baseline REV`` times the kernels of an
older git revision in the same process, interleaved with the current ones.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "custom_ops", "sapa", "kernels", "cpu")
SOURCE = os.path.join(ROOT, "scripts", "bench_cpu_kernels.cc")
SHAPES = {"W1": (2, 32, 32, 2, 5, 64, 256), "M1": (2, 128, 128, 2, 5, 64, 256)}
FLOP_PER_CYCLE = 32  # fp32: 8 lanes x 2 (multiply and add) x 2 FMA pipes
# The window primitives timed by --parts, with the width of their rows (d or C).
PARTS = {
    "dot_qk": "d",
    "gather_wv": "C",
    "dot_gv": "C",
    "gather_lk": "d",
    "scatter_lq": "d",
    "scatter_wg": "C",
}
PARTS_DOC = {
    "dot_qk": "forward logits, Dot(q, k)",
    "gather_wv": "forward aggregation, Gather(w, v)",
    "dot_gv": "backward dw, Dot(g, v)",
    "gather_lk": "backward dq, Gather(dl, k)",
    "scatter_lq": "backward dk, Scatter(dl, q)",
    "scatter_wg": "backward dv, Scatter(w, g)",
}


def simd_flags(cxx):
    """The SIMD flags custom_ops/build.py would use."""
    spec = importlib.util.spec_from_file_location(
        "_sapa_build", os.path.join(ROOT, "custom_ops", "build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._cpu_simd_flags(cxx)


def baseline_headers(rev, workdir):
    """The CPU kernel headers of git revision rev, with their include guards renamed."""
    os.makedirs(workdir, exist_ok=True)
    for name in ("sapa_cpu.h", "simd.h"):
        text = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:custom_ops/sapa/kernels/cpu/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        text = re.sub(r"KERAS_SAPA_KERNELS_CPU_(\w+)_H_", r"BASELINE_\1_H_", text)
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    return os.path.join(workdir, "sapa_cpu.h")


def build(workdir, baseline=None):
    cxx = os.environ.get("CXX", "g++")
    flags = ["-O3", "-DNDEBUG", "-fopenmp-simd", "-std=c++17", "-pthread", *simd_flags(cxx)]
    exe = os.path.join(workdir, "bench_cpu_kernels")
    cmd = [cxx, *flags, "-I" + KERNELS, SOURCE, "-o", exe]
    if baseline:
        cmd.insert(1, f'-DBASELINE_HEADER="{baseline_headers(baseline, workdir + "/base")}"')
    subprocess.run(cmd, check=True)
    return exe, flags


def cpu_mhz():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1])
    except OSError:
        pass
    return None


def parse(output):
    times = {}
    for line in output.splitlines():
        if line.startswith("time "):
            fields = line.split()
            times[fields[1]] = {k: float(v) for k, v in (f.split("=") for f in fields[2:])}
        elif line.startswith("fma_peak_mflop"):
            times["fma_peak_mflop"] = float(line.split()[1])
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="W1,M1")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--baseline", help="git revision whose kernels run beside")
    parser.add_argument("--check", action="store_true", help="only the reference check")
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time the window primitives one by one (the pieces of the fused pair)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as workdir:
        exe, flags = build(workdir, args.baseline)
        if args.check:
            return subprocess.run([exe, "check"]).returncode
        mhz = cpu_mhz()
        print(f"flags: {' '.join(flags)}")
        print(
            f"nominal peak per core: {mhz:.0f} MHz x {FLOP_PER_CYCLE} FLOP/cycle = "
            f"{mhz * FLOP_PER_CYCLE / 1e3:.1f} GFLOP/s"
            if mhz
            else "cpu MHz unknown"
        )
        entries = "fwd,bwd,fwd_f16,bwd_f16,fma_peak"
        entries += ",base_fwd,base_bwd" if args.baseline else ""
        entries += "," + ",".join(PARTS) if args.parts else ""
        for name in args.shapes.split(","):
            shape = SHAPES.get(name) or tuple(int(x) for x in name.split(","))
            b, h, w, s, k, d, c = shape
            flop_fwd = 2.0 * b * h * w * s * s * k * k * (d + c)
            for threads in (int(t) for t in args.threads.split(",")):
                out = subprocess.run(
                    [
                        exe,
                        "time",
                        ",".join(map(str, shape)),
                        str(threads),
                        str(args.reps),
                        entries,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                t = parse(out)
                measured = t["fma_peak_mflop"] / t["fma_peak"]["median_ms"]  # MFLOP/ms
                measured_cpu = t["fma_peak_mflop"] / t["fma_peak"]["cpu_median_ms"] * threads
                nominal = threads * mhz * FLOP_PER_CYCLE / 1e3 if mhz else float("nan")
                print(
                    f"\n{name} {shape} threads={threads}: forward {flop_fwd / 1e6:.0f} MFLOP; "
                    f"peak nominal {nominal:.0f}, measured {measured:.0f} GFLOP/s wall "
                    f"({measured_cpu:.0f} from CPU time)"
                )
                for label, keys, flop in (
                    ("forward", ["fwd"], flop_fwd),
                    ("fwd+bwd", ["fwd", "bwd"], 3 * flop_fwd),
                ):
                    for prefix in ("", "base_") if args.baseline else ("",):
                        wall = sum(t[prefix + key]["median_ms"] for key in keys)
                        cpu = sum(t[prefix + key]["cpu_median_ms"] for key in keys) / threads
                        rate = flop / wall / 1e6
                        rate_cpu = flop / cpu / 1e6
                        print(
                            f"  {prefix + label:13s} wall {wall:8.3f} ms {rate:6.1f} GFLOP/s "
                            f"({100 * rate / nominal:4.1f}% nominal, "
                            f"{100 * rate / measured:4.1f}% measured) | CPU/thread "
                            f"{cpu:8.3f} ms {rate_cpu:6.1f} GFLOP/s "
                            f"({100 * rate_cpu / nominal:4.1f}% nominal, "
                            f"{100 * rate_cpu / measured_cpu:4.1f}% measured)"
                        )
                    ratio = t["bwd"]["cpu_median_ms"] / t["fwd"]["cpu_median_ms"] + 1
                print(f"  fwd+bwd / fwd (CPU time): {ratio:.2f}")
                print(
                    "  float16 storage / float32 (CPU time, tiles converted in the kernels): "
                    + ", ".join(
                        f"{key} {t[key + '_f16']['cpu_median_ms'] / t[key]['cpu_median_ms']:.2f}"
                        for key in ("fwd", "bwd")
                    )
                )
                if args.parts:
                    points = b * h * w * s * s
                    for key, width in PARTS.items():
                        cpu = t[key]["cpu_median_ms"] / threads
                        flop = 2.0 * points * k * k * {"d": d, "C": c}[width]
                        print(
                            f"  part {key:10s} ({PARTS_DOC[key]}) CPU/thread {cpu:7.3f} ms "
                            f"{flop / cpu / 1e6:6.1f} GFLOP/s"
                        )
                if args.baseline:
                    for key in ("fwd", "bwd"):
                        print(
                            f"  {key} current / baseline: wall "
                            f"{t[key]['median_ms'] / t['base_' + key]['median_ms']:.2f}, CPU "
                            f"{t[key]['cpu_median_ms'] / t['base_' + key]['cpu_median_ms']:.2f}"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
