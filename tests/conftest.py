"""Shared fixtures.

``implementation``: every available SAPA implementation in turn ("patches", "xla",
"compiled"); "compiled" is skipped, saying why, when its library is unavailable.
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
