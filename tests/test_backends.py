"""SAPA on the three Keras backends, from the one ``pytest tests`` run.

This run's backend is TensorFlow (it collects ``tests/multibackend`` itself). Here
the same backend-neutral tests, and ``tests/test_convert.py``, run again in one
subprocess per other backend with ``KERAS_BACKEND`` set (JAX, PyTorch): a backend is
chosen when Keras is first imported, so it cannot change inside this process. A
failure reports the subprocess's output.

Then what needs several processes: a ``.keras`` file saved on each backend loads on
the others with the same outputs, and JAX's ``keras.distribution.DataParallel`` over
two host CPU devices matches one device.
"""

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
MULTI = os.path.join(TESTS, "multibackend")
ROOT = os.path.dirname(TESTS)


def _run(args, backend, timeout, **env):
    environ = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    result = subprocess.run(args, cwd=ROOT, env=environ, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"KERAS_BACKEND={backend} {' '.join(args[1:])} failed "
        f"(exit {result.returncode}):\n{output[-12000:]}"
    )
    return output


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_neutral_suite(backend):
    pytest.importorskip(backend if backend != "torch" else "torch")
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
          os.path.join("tests", "multibackend"), os.path.join("tests", "test_convert.py")],
         backend, timeout=1500)


def test_keras_file_loads_across_backends(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    script = os.path.join(MULTI, "keras_file_script.py")
    steps = [
        ("jax", ["save"]),
        ("torch", ["save"], ["load", "jax"]),
        ("tensorflow", ["save"], ["load", "jax", "torch"]),
        ("jax", ["load", "torch", "tensorflow"]),
    ]
    log = []
    for backend, *commands in steps:
        for command in commands:
            log.append(_run([sys.executable, script, str(tmp_path), *command], backend, 600))
    text = "".join(log)
    for pair in ("jax -> torch", "jax -> tensorflow", "torch -> tensorflow",
                 "torch -> jax", "tensorflow -> jax"):
        assert f"{pair}: ok" in text, text[-4000:]


def test_jax_data_parallel_matches_one_device():
    pytest.importorskip("jax")
    output = _run(
        [sys.executable, os.path.join(MULTI, "data_parallel_script.py")], "jax", 600,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert "DataParallel over 2 devices matches 1 device" in output, output[-4000:]
