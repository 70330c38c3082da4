"""keras_sapa: SAPA content-aware feature upsampling for Keras 3 and TensorFlow.

- :class:`keras_sapa.SAPA`: the Keras layer (SAPA-I, SAPA-B, SAPA-G and the concat
  ablation of the official code); :class:`keras_sapa.SAPADeform`: SAPA-D, dynamic
  point selection.
- :mod:`keras_sapa.ops`: the functional ops ``similarity``, ``aggregate`` and ``sapa``
  with pure TensorFlow and compiled implementations.
- :mod:`keras_sapa.models`: SAPA in KerasHub's SegFormer, DeepLabV3 and RetinaNet, and
  in KerasCV's DeepLabV3Plus and RetinaNet (KerasHub and KerasCV are imported when a
  model of theirs is first used, not by ``import keras_sapa``).
- :mod:`keras_sapa.convert`: weights to and from the official PyTorch modules.
"""

# First, before anything imports Keras (and so TensorFlow): under `python -m keras_sapa`
# or `keras-sapa` (only there), hide TensorFlow's start-up log lines unless --verbose.
from keras_sapa import _startup

_startup.quiet_command_line()

from keras_sapa import convert  # noqa: E402
from keras_sapa import ops
from keras_sapa.deform import SAPADeform
from keras_sapa.layers import SAPA
from keras_sapa.version import __version__

# Cheap: imports neither KerasCV nor KerasHub. It registers a loading stand-in for each
# model class, so `.keras` files holding them reload after a plain `import keras_sapa`.
from keras_sapa import models  # noqa: E402  isort: skip

__all__ = ["SAPA", "SAPADeform", "ops", "models", "convert", "__version__"]
