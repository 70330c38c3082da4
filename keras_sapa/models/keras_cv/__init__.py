"""SAPA inside KerasCV models (TensorFlow backend; KerasCV 0.9).

- :class:`SAPADeepLabV3Plus`: KerasCV's DeepLabV3Plus whose 8x bilinear upsampling of
  the encoder output is three SAPA 2x stages guided by the backbone's P4, P3 and P2.
- :class:`SAPAFeaturePyramid`: a feature pyramid with SAPA in each top-down step, a
  drop-in ``feature_pyramid`` for ``keras_cv.models.RetinaNet``.
- :class:`SAPARetinaNet`: RetinaNet with that pyramid by default, kept on reload.

Importing this module imports KerasCV; ``import keras_sapa`` does not.
"""

from keras_sapa.models.keras_cv.deeplab import SAPADeepLabV3Plus
from keras_sapa.models.keras_cv.retinanet import SAPAFeaturePyramid
from keras_sapa.models.keras_cv.retinanet import SAPARetinaNet

__all__ = ["SAPADeepLabV3Plus", "SAPAFeaturePyramid", "SAPARetinaNet"]
