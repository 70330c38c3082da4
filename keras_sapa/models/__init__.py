"""SAPA inside KerasCV models.

- :class:`SAPADeepLabV3Plus`: DeepLabV3+ whose 8x bilinear encoder-output upsampling is
  three SAPA 2x stages guided by the backbone's P4, P3 and P2.
- :class:`SAPAFeaturePyramid`: a feature pyramid with SAPA in each top-down step, a
  drop-in ``feature_pyramid`` for ``keras_cv.models.RetinaNet``.
- :class:`SAPARetinaNet`: RetinaNet with the SAPA pyramid by default, which keeps its
  pyramid through ``get_config``/``from_config`` and ``.keras`` files.
- :func:`sapa_overhead`: parameters and multiply-adds SAPA adds over the stock model.

``model.export`` of these models writes builtin ops only (``implementation="auto"``
traces the pure path for exports), so the SavedModel reloads without the compiled
op's library.
"""

from keras_sapa.models._counting import sapa_layer_macs
from keras_sapa.models._counting import sapa_overhead
from keras_sapa.models.deeplab import SAPADeepLabV3Plus
from keras_sapa.models.retinanet import SAPAFeaturePyramid
from keras_sapa.models.retinanet import SAPARetinaNet

__all__ = [
    "SAPADeepLabV3Plus",
    "SAPAFeaturePyramid",
    "SAPARetinaNet",
    "sapa_overhead",
    "sapa_layer_macs",
]
