"""Functional SAPA ops (channels last), with a choice of implementation.

    similarity(query, key)      -> (B, sH, sW, K*K)
    aggregate(weights, value)   -> (B, sH, sW, C)
    sapa(query, key, value)     -> aggregate(softmax(similarity(query, key)), value)

Semantics are those of ``shared/SAPA_SPEC.md``. The TensorFlow implementations and
their dispatch live in :mod:`keras_sapa.ops._tensorflow`.
"""

from keras_sapa.ops._tensorflow import (  # noqa: F401
    aggregate,
    compiled_available,
    in_export_trace,
    in_xla_context,
    load_compiled_library,
    resolve_implementation,
    sapa,
    similarity,
    use_implementation,
)

__all__ = [
    "similarity",
    "aggregate",
    "sapa",
    "compiled_available",
    "load_compiled_library",
    "resolve_implementation",
    "use_implementation",
]
