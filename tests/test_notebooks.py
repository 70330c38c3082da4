"""Executes every tutorial notebook end to end (nbclient), with small settings.

Each notebook runs in a fresh temporary working directory with
``KERAS_SAPA_NOTEBOOK_QUICK=1`` (shorter training, same code), on the ``python3``
kernel. jupyter_client starts that kernel with the interpreter running the tests (it
replaces the kernelspec's bare ``python`` by ``sys.executable``), which each run checks
with one extra cell (same ``sys.prefix``).

The notebooks are generated from plain Python sources (``notebooks/src/*.py``, jupytext
percent format) by ``notebooks/build.py``: the committed ``.ipynb`` must match their
sources and carry no outputs, the sources must compile, and they may use only the
public API of ``keras_sapa`` (no ``module._private`` names).
"""

import ast
import importlib.util
import json
import os
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
SOURCE_DIR = os.path.join(NOTEBOOK_DIR, "src")
NOTEBOOKS = sorted(n for n in os.listdir(NOTEBOOK_DIR) if n.endswith(".ipynb"))
SOURCES = sorted(n for n in os.listdir(SOURCE_DIR) if n.endswith(".py"))
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
            nb,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd)}},
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


def _build_module(notebook_dir):
    """``notebooks/build.py`` of ``notebook_dir``, imported (it reads the sources next to
    it): the checks below call its ``main`` in this process."""
    path = os.path.join(notebook_dir, "build.py")
    spec = importlib.util.spec_from_file_location("notebook_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_match_their_sources_and_have_no_outputs(capsys):
    assert _build_module(NOTEBOOK_DIR).main(["--check"]) == 0, capsys.readouterr().out
    assert NOTEBOOKS == [
        "01_quickstart.ipynb",
        "02_segmentation.ipynb",
        "03_detection.ipynb",
        "04_export.ipynb",
    ]
    assert [n[:-3] for n in SOURCES] == [n[:-6] for n in NOTEBOOKS]
    for name in NOTEBOOKS:
        with open(os.path.join(NOTEBOOK_DIR, name)) as f:
            nb = json.load(f)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, name


def test_build_check_sees_an_edited_source(tmp_path, capsys):
    """``build.py --check`` fails when a notebook differs from its source."""
    import shutil

    copy = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    source = copy / "src" / SOURCES[0]
    source.write_text(source.read_text() + "\n# %%\nprint('an extra cell')\n")
    build = _build_module(str(copy))
    capsys.readouterr()
    assert build.main(["--check"]) == 1 and NOTEBOOKS[0] in capsys.readouterr().out
    assert build.main([]) == 0
    assert build.main(["--check"]) == 0
    assert "an extra cell" in (copy / NOTEBOOKS[0]).read_text()


@pytest.mark.parametrize("name", SOURCES)
def test_sources_compile_and_use_public_api_only(name):
    with open(os.path.join(SOURCE_DIR, name)) as f:
        source = f.read()
    tree = ast.parse(source, filename=name)  # a SyntaxError fails here
    private = sorted(
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    )
    private += sorted(
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and "._" in node.module
    )
    assert not private, f"{name} uses private names: {private}"
    # Every notebook says which Keras backend it runs on, before Keras is imported.
    first_import = re.search(r"^(import keras|from keras)\b", source, re.M)
    setting = re.search(
        r'^os\.environ(\["KERAS_BACKEND"\] = |\.setdefault\("KERAS_BACKEND")', source, re.M
    )
    assert setting and first_import and setting.start() < first_import.start(), name


def _stdout(nb):
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("name") == "stdout"
    )


def _check_deeplab_table(printed):
    """Notebook 02's table of the DeepLab pair (``demo.format_training_table``): one row
    per model, mIoU and boundary F in [0, 1]. The command line's DeepLab training is not
    run again by tests/test_demo.py: this is its check."""
    from keras_sapa.demo import train

    names = f"{re.escape(train.STOCK)}|{re.escape(train.SAPA)}"
    rows = re.findall(rf"^({names})\s+(\S+)\s+(\S+)\s+[\d,]+\s+[\d.]+$", printed, re.M)
    assert [row[0] for row in rows] == [train.STOCK, train.SAPA], printed[-3000:]
    for _, miou, boundary_f in rows:
        assert 0.0 <= float(miou) <= 1.0 and 0.0 <= float(boundary_f) <= 1.0  # NaN fails


def _check_segmentation_tables(printed):
    """Notebook 02's two tables: the DeepLab pair's, and the SegFormer pair's per seed
    (``train.format_seed_table``; one seed under KERAS_SAPA_NOTEBOOK_QUICK): both models'
    mIoU and boundary F in [0, 1] and the differences SAPA minus stock."""
    _check_deeplab_table(printed)
    rows = re.findall(r"^\s+0((?:\s+[+-]?\d+\.\d+){6})$", printed, re.M)
    assert len(rows) == 1, printed[-3000:]
    miou_stock, miou_sapa, miou_diff, bf_stock, bf_sapa, bf_diff = map(float, rows[0].split())
    for value in (miou_stock, miou_sapa, bf_stock, bf_sapa):
        assert 0.0 <= value <= 1.0  # NaN fails too
    assert abs(miou_diff - (miou_sapa - miou_stock)) <= 1.5e-3
    assert abs(bf_diff - (bf_sapa - bf_stock)) <= 1.5e-3


def _check_compiled_savedmodel_processes(printed):
    """Notebook 04, where the compiled op is built: a fresh process without the library
    cannot load a SavedModel holding the op, one that loads it first can (the check of
    tests/test_compiled.py::test_savedmodel_with_compiled_op_reloads that needs fresh
    processes)."""
    from keras_sapa import ops

    if not ops.compiled_available():
        assert "every export is already portable" in printed
        return
    plain = re.search(r"library not loaded -> exit code (-?\d+)", printed)
    first = re.search(r"library loaded first -> exit code (-?\d+)", printed)
    assert plain and first, printed[-3000:]
    assert int(plain.group(1)) != 0 and int(first.group(1)) == 0, printed[-3000:]


# What a notebook must print, beyond running without an error.
PRINTED_TABLES = {
    "02_segmentation.ipynb": _check_segmentation_tables,
    "04_export.ipynb": _check_compiled_savedmodel_processes,
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    """Runs the notebook, then one more cell that prints ``sys.prefix``: the kernel is
    this interpreter's environment (a venv's python is often a symlink to the base one,
    so prefixes are compared, not executables)."""
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    start = time.perf_counter()
    _execute(nb, tmp_path)
    elapsed = time.perf_counter() - start
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    printed = [o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout"]
    assert "".join(printed).strip() == sys.prefix
    if name in PRINTED_TABLES:
        PRINTED_TABLES[name](_stdout(nb))
    images = sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    )
    if name != "04_export.ipynb":
        assert images > 0, f"{name} produced no plot"
    print(f"{name}: {elapsed:.1f} s, {images} figures")
