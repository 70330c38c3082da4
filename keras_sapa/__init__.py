"""keras_sapa: SAPA content-aware feature upsampling for Keras 3 and TensorFlow.

- :class:`keras_sapa.SAPA`: the Keras layer (SAPA-I, SAPA-B, SAPA-G and the concat
  ablation of the official code).
- :mod:`keras_sapa.ops`: the functional ops ``similarity``, ``aggregate`` and ``sapa``
  with pure TensorFlow and compiled implementations.
- :mod:`keras_sapa.models`: SAPA in KerasCV's DeepLabV3Plus and RetinaNet.
- :mod:`keras_sapa.convert`: weights to and from the official PyTorch modules.
"""

from keras_sapa import convert
from keras_sapa import ops
from keras_sapa.layers import SAPA
from keras_sapa.version import __version__

# Imported eagerly (it costs the KerasCV import) so that `.keras` files holding these
# models reload after a plain `import keras_sapa`: Keras finds custom classes only
# through their registration, which happens when the module is imported.
from keras_sapa import models  # noqa: E402  isort: skip

__all__ = ["SAPA", "ops", "models", "convert", "__version__"]
