"""Old import path of the KerasCV RetinaNet integration; the code is in ``models/keras_cv``."""

from keras_sapa.models.keras_cv.retinanet import SAPAFeaturePyramid
from keras_sapa.models.keras_cv.retinanet import SAPARetinaNet

__all__ = ["SAPAFeaturePyramid", "SAPARetinaNet"]
