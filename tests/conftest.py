"""Shared fixtures and the order of the run.

``implementation``: every available SAPA implementation in turn ("patches", "xla",
"compiled"); "compiled" is skipped, saying why, when its library is unavailable.

A test module that defines ``start_in_background(config)`` (``tests/test_backends.py``:
the JAX and PyTorch processes) has it called once collection ends, and its tests moved
to the end of the run, so that the work it started runs beside the other tests. Its
processes' slowest durations are printed in the terminal summary of a run in one process
(``-n 0``; a failure shows the process's output either way). Under pytest-xdist
(pytest.ini) every worker collects every test, so nothing starts at collection: the
module's tests go first instead, and its first test starts the work, in the worker that
runs the module, which then waits on it while the other workers go on.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _compiled_skip_reason():
    from keras_sapa import ops

    if ops.compiled_available():
        return None
    if os.environ.get("KERAS_SAPA_DISABLE_COMPILED", "") not in ("", "0"):
        return "compiled ops disabled by KERAS_SAPA_DISABLE_COMPILED"
    from keras_sapa.ops import _tf_kernels as _compiled

    return f"compiled custom op library unavailable: {_compiled.unavailable_reason()}"


@pytest.fixture(params=["patches", "xla", "compiled"])
def implementation(request):
    if request.param == "compiled":
        reason = _compiled_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


_STARTED = pytest.StashKey[list]()  # the modules whose background work started (or may)


def _background_modules(items):
    modules = []
    for item in items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_in_background") and module not in modules:
            modules.append(module)
    return modules


def _xdist_worker(config):
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config, items):
    modules = _background_modules(items)
    if modules:
        background = [i for i in items if getattr(i, "module", None) in modules]
        rest = [i for i in items if getattr(i, "module", None) not in modules]
        items[:] = background + rest if _xdist_worker(config) else rest + background


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for module in _background_modules(session.items):
        if not _xdist_worker(session.config):
            module.start_in_background(session.config)
        session.config.stash.setdefault(_STARTED, []).append(module)


def pytest_terminal_summary(terminalreporter, config):
    for module in config.stash.get(_STARTED, []):
        for name, text in module.summaries().items():
            terminalreporter.section(f"{name} process: slowest durations", sep="-")
            terminalreporter.write_line(text)


def pytest_unconfigure(config):
    for module in config.stash.get(_STARTED, []):  # (under xdist: started if a test did)
        module.stop_background()
