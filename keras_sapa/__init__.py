"""keras_sapa: SAPA content-aware feature upsampling for Keras 3 and TensorFlow.

- :class:`keras_sapa.SAPA`: the Keras layer (SAPA-I, SAPA-B, SAPA-G and the concat
  ablation of the official code).
- :mod:`keras_sapa.ops`: the functional ops ``similarity``, ``aggregate`` and ``sapa``
  with pure TensorFlow and compiled implementations.
"""

from keras_sapa import ops
from keras_sapa.layers import SAPA
from keras_sapa.version import __version__

__all__ = ["SAPA", "ops", "__version__"]
