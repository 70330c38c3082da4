"""Old import path of :class:`SAPADeepLabV3Plus`; the code is in ``models/keras_cv``."""

from keras_sapa.models.keras_cv.deeplab import SAPADeepLabV3Plus

__all__ = ["SAPADeepLabV3Plus"]
