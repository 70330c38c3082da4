"""Writes the tutorial notebooks ``notebooks/*.ipynb`` from their sources ``notebooks/src/*.py``.

    python notebooks/build.py          # rewrite notebooks/*.ipynb
    python notebooks/build.py --check  # exit 1 if a notebook differs from its source

The sources are plain Python in jupytext's "percent" format (``# %%`` starts a code
cell, ``# %% [markdown]`` a markdown cell written as comments): they run as scripts
(``python notebooks/src/01_quickstart.py``), lint and diff like any module. The
notebooks are generated without outputs, with fixed metadata and stable cell ids, so
a rebuild of unchanged sources rewrites nothing; ``tests/test_notebooks.py`` checks
that they match and executes them.
"""

import os
import sys

import jupytext
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = os.path.join(HERE, "src")


def sources():
    """The notebook sources, ``{notebook name: source path}``, in order."""
    names = sorted(n for n in os.listdir(SOURCES) if n.endswith(".py") and n[:2].isdigit())
    return {n[:-3] + ".ipynb": os.path.join(SOURCES, n) for n in names}


def build(source):
    """The ``.ipynb`` text generated from the percent-format file ``source``."""
    nb = jupytext.read(source, fmt="py:percent")
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.NotebookNode(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
    )
    prefix = os.path.basename(source).split("_")[0]
    for i, cell in enumerate(nb.cells):
        cell.metadata = nbformat.NotebookNode()
        cell["id"] = f"{prefix}-{i:02d}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for name, source in sources().items():
        path = os.path.join(HERE, name)
        text = build(source)
        current = None
        if os.path.exists(path):
            with open(path) as f:
                current = f.read()
        if current != text:
            stale.append(name)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    if check:
        if stale:
            print("out of date (run python notebooks/build.py):", ", ".join(stale))
            return 1
        return 0
    print("wrote", ", ".join(stale) if stale else "nothing (all up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
