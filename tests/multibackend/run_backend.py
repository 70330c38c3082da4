"""Helper of tests/test_backends.py (not a test module): everything the JAX or PyTorch
backend is tested with, in ONE fresh process per backend.

Run as ``KERAS_BACKEND=<jax|torch> python tests/multibackend/run_backend.py EXCHANGE
OTHERS PATH...`` from the repository root. In order:

1. ``import keras_sapa`` (and its ``ops``, ``layers``, ``convert`` and ``models``) as
   the first thing the process does, then reports which of TensorFlow, KerasCV and
   KerasHub that loaded (``IMPORTS [...]``; none may be, on these backends);
2. saves this backend's ``.keras`` file into the folder EXCHANGE
   (``keras_files.save``);
3. runs pytest on the PATHs (``tests/multibackend``, ``tests/test_convert.py``, the small
   KerasHub SegFormer check of ``tests/test_keras_hub_models.py``) with
   the repository's pytest.ini;
4. loads the files the backends in OTHERS (comma-separated) saved into EXCHANGE and
   checks their outputs here (``KERAS_FILE <other> -> <backend>: ok ...``).

Each step reports ``STEP <name> FAILED`` with its traceback and the process goes on; the
exit status is pytest's, or 1 where a step failed.
"""

import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEAVY = ("tensorflow", "keras_cv", "keras_hub")


def _step(name, fn):
    try:
        return fn(), True
    except Exception:  # reported, and the next steps still run
        print(f"STEP {name} FAILED\n{traceback.format_exc()}", flush=True)
        return None, False


def _imports():
    import keras_sapa  # noqa: F401
    import keras_sapa.convert
    import keras_sapa.layers
    import keras_sapa.models
    import keras_sapa.ops  # noqa: F401

    dir(keras_sapa.models)
    return sorted(m for m in HEAVY if m in sys.modules)


def main(exchange, others, *paths):
    sys.path.insert(0, ROOT)  # the checkout's keras_sapa, as `python -m pytest` from ROOT
    assert not [m for m in HEAVY if m in sys.modules]
    loaded, ok = _step("imports", _imports)
    print(f"IMPORTS {loaded}", flush=True)

    import keras

    backend = keras.config.backend()
    if backend == "jax":  # as tests/multibackend/conftest.py, before anything is built
        import jax

        jax.config.update("jax_enable_x64", True)
    import keras_files

    message, saved = _step("save", lambda: keras_files.save(exchange))
    if saved:
        print(f"KERAS_FILE {message}", flush=True)
    else:
        open(os.path.join(exchange, f"failed_{backend}"), "w").close()

    import pytest

    # In this process (-n 0: no pytest-xdist workers), which the import check above and
    # the .keras exchange describe.
    status = pytest.main(["-p", "no:cacheprovider", "-n", "0", *paths])
    sys.stdout.flush()

    others = [o for o in others.split(",") if o]
    lines, loaded_ok = _step("load", lambda: keras_files.load(exchange, others))
    for line in lines or []:
        print(f"KERAS_FILE {line}", flush=True)
    return int(status) or int(not (ok and saved and loaded_ok))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
