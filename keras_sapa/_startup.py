"""Quiet start-up for the command line (``python -m keras_sapa ...``, ``keras-sapa ...``).

Importing TensorFlow writes C++ log lines to the process's stderr (``I0000 ... oneDNN
custom operations are on``, ``This TensorFlow binary is optimized ...``, and on machines
without a GPU ``E0000 ... failed call to cuInit``). They come from C++ logging set up
before ``absl::InitializeLog`` runs, so ``TF_CPP_MIN_LOG_LEVEL`` silences only part of
them and has to be set before TensorFlow is imported. ``python -m keras_sapa`` imports
the ``keras_sapa`` package (hence Keras and TensorFlow) before ``__main__`` runs, so the
package calls :func:`quiet_command_line` first thing: when the process is the command
line and ``--verbose`` is not among its arguments, it

- sets ``TF_CPP_MIN_LOG_LEVEL=3`` (unless the user set it) and the ``tensorflow`` and
  ``absl`` Python loggers to errors;
- imports Keras (and so its backend) with the process's stderr (file descriptor 2)
  going to a temporary file, then writes back everything but the C++ log lines.

Library users (``import keras_sapa`` from their own code) are never affected.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile

#: Lines of TensorFlow's / absl's C++ logging: ``I0000 00:00:1796183794.455377  6661
#: port.cc:153] ...`` and its companions.
_LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\]"
    r"|^WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)
_SCRIPT_NAMES = ("keras-sapa", "keras-sapa.exe", "keras-sapa-script.py")


def is_command_line(argv=None):
    """Whether this process is ``python -m keras_sapa ...`` (while the package is
    imported for it, ``sys.argv[0]`` is ``"-m"``, as the ``-m`` option documents) or
    the ``keras-sapa`` console script."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    return argv[0] == "-m" or os.path.basename(argv[0]) in _SCRIPT_NAMES


def is_log_line(line):
    """Whether ``line`` is a TensorFlow / absl C++ log line."""
    return bool(_LOG_LINE.match(line))


@contextlib.contextmanager
def filtered_stderr():
    """Within the block, file descriptor 2 goes to a temporary file; on exit the lines
    that are not C++ log lines (:func:`is_log_line`) are written to stderr."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter (a detached process)
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines(True)
                if not is_log_line(line)
            ]
            if kept and sys.stderr is not None:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def silence_tensorflow():
    """Sets ``TF_CPP_MIN_LOG_LEVEL=3`` (unless set) and the ``tensorflow`` and ``absl``
    Python loggers to errors, then imports Keras (and its backend) with the C++ log
    lines of the import filtered out of stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with filtered_stderr():
        import keras  # noqa: F401  imports the backend (TensorFlow by default)


def quiet_command_line(argv=None):
    """Called by ``keras_sapa/__init__.py`` before it imports Keras: when the process is
    the command line (:func:`is_command_line`) without ``--verbose``, runs
    :func:`silence_tensorflow`. Returns whether it did."""
    argv = sys.argv if argv is None else argv
    if not is_command_line(argv) or "--verbose" in argv[1:] or "keras" in sys.modules:
        return False
    silence_tensorflow()
    return True
