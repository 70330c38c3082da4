"""Loader and Python wrappers of the compiled SAPA custom op (see ``custom_ops/``).

Until the library is built this module reports it as unavailable.
"""


def available():
    return False


def unavailable_reason():
    return "the custom op library has not been built"


def similarity(query, key, kernel_size, up_factor):  # pragma: no cover
    raise RuntimeError(unavailable_reason())


def aggregate(weights, value, kernel_size, up_factor):  # pragma: no cover
    raise RuntimeError(unavailable_reason())
