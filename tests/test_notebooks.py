"""Executes every tutorial notebook end to end (nbclient), with small settings.

Each notebook runs in a fresh temporary working directory with
``KERAS_SAPA_NOTEBOOK_QUICK=1`` (shorter training, same code), on the ``python3``
kernel. jupyter_client starts that kernel with the interpreter running the tests (it
replaces the kernelspec's bare ``python`` by ``sys.executable``), which
``test_kernel_is_this_interpreter`` checks (same ``sys.prefix``). The notebooks must also match their
generator, ``notebooks/_build.py``, and be committed without outputs.
"""

import json
import os
import subprocess
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(n for n in os.listdir(NOTEBOOK_DIR) if n.endswith(".ipynb"))
# Per-notebook wall-clock limit (seconds) on a 2-core CPU machine shared with others.
CELL_TIMEOUT = 600


def _execute(nb, cwd):
    env_before = os.environ.get("KERAS_SAPA_NOTEBOOK_QUICK")
    os.environ["KERAS_SAPA_NOTEBOOK_QUICK"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The kernel must import the keras_sapa of this checkout, whatever the cwd.
    path_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + path_before if path_before else "")
    try:
        client = nbclient.NotebookClient(
            nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("KERAS_SAPA_NOTEBOOK_QUICK", None)
        else:
            os.environ["KERAS_SAPA_NOTEBOOK_QUICK"] = env_before
        if path_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path_before
    return nb


def test_notebooks_match_generator_and_have_no_outputs():
    result = subprocess.run(
        [sys.executable, os.path.join(NOTEBOOK_DIR, "_build.py"), "--check"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_segmentation.ipynb", "03_detection.ipynb", "04_export.ipynb"]
    for name in NOTEBOOKS:
        with open(os.path.join(NOTEBOOK_DIR, name)) as f:
            nb = json.load(f)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name


def test_kernel_is_this_interpreter(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("import sys, keras_sapa; print(sys.prefix)")]
    )
    _execute(nb, tmp_path)
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout")
    # The same environment (a venv's python is often a symlink to the base one, so
    # compare prefixes, not executables).
    assert printed.strip() == sys.prefix


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    start = time.perf_counter()
    _execute(nb, tmp_path)
    elapsed = time.perf_counter() - start
    errors = [
        output for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs if output.output_type == "error"
    ]
    assert not errors
    images = sum(
        1 for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    )
    if name != "04_export.ipynb":
        assert images > 0, f"{name} produced no plot"
    print(f"{name}: {elapsed:.1f} s, {images} figures")
