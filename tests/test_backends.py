"""SAPA on the three Keras backends, from the one ``pytest tests`` run.

This run's backend is TensorFlow (it collects ``tests/multibackend`` itself). The same
backend-neutral tests, ``tests/test_convert.py`` and the small KerasHub SegFormer check
(``test_keras_hub_models.py::test_segformer_on_this_backend``) run again on JAX and on PyTorch in
ONE fresh process per backend (``tests/multibackend/run_backend.py``; a backend is
chosen when Keras is first imported, so it cannot change inside this process). That
process also checks that ``import keras_sapa`` loads no TensorFlow, KerasCV or KerasHub,
and takes part in the ``.keras`` file exchange: a file saved on each backend loads on
the two others with the same outputs (all six directions).

Both processes start in the background as soon as collection ends
(``tests/conftest.py`` calls :func:`start_in_background`), so on a two-core machine they
run beside the TensorFlow tests; the tests below run last and collect their results. A
failure shows the process's output.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
MULTI = os.path.join(TESTS, "multibackend")
ROOT = os.path.dirname(TESTS)
BACKENDS = ("jax", "torch")
PATHS = (
    os.path.join("tests", "multibackend"),
    os.path.join("tests", "test_convert.py"),
    # the KerasHub SegFormer (stock weights, fit, .keras reload) on this backend
    os.path.join("tests", "test_keras_hub_models.py") + "::test_segformer_on_this_backend",
)
TIMEOUT = 1800  # seconds, from the start of the process
# Added to the JAX process's XLA_FLAGS: LLVM's optimisations off. Its programs are small
# and run a few times, so compiling is most of its cost (318 -> 215 CPU-seconds, the same
# 271 tests passing). Not for tests/test_jax_torch_kernels.py's workers, whose kernels at
# real sizes then ran slower (31 -> 41 s). Users keep XLA's defaults.
JAX_XLA_FLAGS = "--xla_backend_optimization_level=0"

_state = {}  # "exchange": folder; backend: (Popen, log path, start time); "tf_saved"


def _installed(backend):
    return importlib.util.find_spec(backend) is not None


def start_in_background(config=None):
    """Saves this process's (TensorFlow) ``.keras`` file and starts one process per
    installed other backend; idempotent."""
    if "exchange" in _state:
        return
    exchange = _state["exchange"] = tempfile.mkdtemp(prefix="keras_sapa_backends_")
    sys.path.insert(0, MULTI)
    import keras_files

    try:
        _state["tf_saved"] = keras_files.save(exchange)
    except Exception as exc:  # reported by test_keras_file_loads_across_backends
        _state["tf_saved"] = exc
    launched = [b for b in BACKENDS if _installed(b)]
    for backend in launched:
        others = ",".join(["tensorflow"] + [b for b in launched if b != backend])
        log = os.path.join(exchange, f"{backend}.log")
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if backend == "jax":
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {JAX_XLA_FLAGS}".strip()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, os.path.join(MULTI, "run_backend.py"), exchange, others, *PATHS],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _state[backend] = (proc, log, time.monotonic())


def stop_background():
    """Ends the processes still running (a run cut short) and removes the folder."""
    for backend in BACKENDS:
        if backend in _state:
            proc = _state[backend][0]
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if "exchange" in _state:
        shutil.rmtree(_state["exchange"], ignore_errors=True)
    _state.clear()


def summaries():
    """The tail of each finished process's pytest report (its slowest durations and
    result line), for the terminal summary."""
    texts = {}
    for backend in BACKENDS:
        if backend in _state and _state[backend][0].poll() is not None:
            with open(_state[backend][1]) as f:
                text = f.read()
            found = re.search(r"^=+ slowest .*durations =+$", text, re.M)
            texts[backend] = text[found.start() if found else -3000 :].strip()
    return texts


def _result(backend):
    """(exit status, output) of ``backend``'s process, waiting for it to end."""
    if not _installed(backend):
        pytest.skip(f"{backend} is not installed")
    start_in_background()
    proc, log, started = _state[backend]
    try:
        proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(log) as f:
        return proc.returncode, f.read()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_neutral_suite(backend):
    status, output = _result(backend)
    summary = [line for line in output.splitlines() if re.match(r"=+ .*(passed|failed)", line)]
    assert status == 0 and summary and "failed" not in summary[-1], (
        f"KERAS_BACKEND={backend} run_backend.py {' '.join(PATHS)} failed "
        f"(exit {status}):\n{output[-12000:]}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_import_loads_no_tensorflow_keras_cv_or_keras_hub(backend):
    """``import keras_sapa`` (ops, layers, convert, models) first thing in a fresh
    process on JAX / PyTorch loads none of TensorFlow, KerasCV, KerasHub."""
    _, output = _result(backend)
    lines = [line for line in output.splitlines() if line.startswith("IMPORTS ")]
    assert lines == ["IMPORTS []"], output[-6000:]


def test_keras_file_loads_across_backends():
    results = {b: _result(b)[1] for b in BACKENDS}
    import keras_files  # on sys.path since start_in_background

    saved = _state["tf_saved"]
    if isinstance(saved, Exception):
        raise saved
    text = "".join(results.values()) + "\n".join(
        keras_files.load(_state["exchange"], BACKENDS, timeout=5)
    )
    for source in ("tensorflow", *BACKENDS):
        for target in ("tensorflow", *BACKENDS):
            if source != target:
                assert f"{source} -> {target}: ok" in text, (
                    f"{source} -> {target} missing:\n{text[-6000:]}"
                )
