"""SAPA inside KerasHub models (every backend the SAPA layer runs on).

- :class:`SAPASegFormerBackbone`: KerasHub's ``SegFormerBackbone`` (MiT encoder,
  all-MLP decoder) whose bilinear resizing of each coarser stage to the finest is SAPA
  2x stages guided by the finer stages, as the SAPA paper places it.
- :class:`SAPASegFormer`: ``keras_hub.models.SegFormerImageSegmenter`` built on it,
  from a ``MiTBackbone``.
- :class:`SAPADeepLabV3Backbone`: a backbone for
  ``keras_hub.models.DeepLabV3ImageSegmenter`` whose bilinear upsampling of the pooled
  encoder output is SAPA 2x stages guided by the encoder's pyramid.
- :class:`SAPAKerasHubFeaturePyramid` and :class:`SAPARetinaNetBackbone`: KerasHub's
  RetinaNet feature pyramid with SAPA in the top-down path, and a backbone for
  ``keras_hub.models.RetinaNetObjectDetector`` holding it.

Importing this module imports KerasHub; ``import keras_sapa`` does not.
"""

from keras_sapa.models.keras_hub.deeplab_v3 import SAPADeepLabV3Backbone
from keras_sapa.models.keras_hub.retinanet import SAPAKerasHubFeaturePyramid
from keras_sapa.models.keras_hub.retinanet import SAPARetinaNetBackbone
from keras_sapa.models.keras_hub.segformer import SAPASegFormer
from keras_sapa.models.keras_hub.segformer import SAPASegFormerBackbone

__all__ = [
    "SAPADeepLabV3Backbone",
    "SAPAKerasHubFeaturePyramid",
    "SAPARetinaNetBackbone",
    "SAPASegFormer",
    "SAPASegFormerBackbone",
]
