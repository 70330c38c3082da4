"""Distribution checks: a wheel of the package carries no native files.

The compiled libraries in ``keras_sapa/_lib`` are tied to one TensorFlow version and one
CPU architecture; a ``py3-none-any`` wheel must not carry them (issue 13). This builds a
wheel from the working tree, after the local build has put its libraries there.
"""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    pytest.importorskip("setuptools")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            ROOT,
            "-w",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(os.path.join(out, "*.whl"))
    return path


def test_wheel_is_pure_python_and_carries_no_native_files(wheel):
    assert os.path.basename(wheel).endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    native = [
        n
        for n in names
        if n.endswith((".so", ".dll", ".dylib", ".cubin", ".ptx")) or "/_lib/" in n
    ]
    assert native == [], f"the pure-Python wheel carries native or build files: {native}"
    assert "keras_sapa/layers.py" in names


def test_backends_and_integrations_are_extras():
    # The layer needs Keras and NumPy only; TensorFlow, JAX, PyTorch, KerasCV and
    # KerasHub are extras (issue 11). Read from the installed distribution's metadata.
    from importlib import metadata

    requires = metadata.requires("keras_sapa") or []
    unconditional = [r for r in requires if "extra ==" not in r]
    names = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower() for r in unconditional}
    assert names == {"keras", "numpy"}, unconditional
    extras = set(metadata.metadata("keras_sapa").get_all("Provides-Extra") or [])
    assert {"tensorflow", "jax", "torch", "keras-cv", "keras-hub"} <= extras, extras
