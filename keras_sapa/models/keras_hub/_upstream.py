"""The KerasHub classes our models reuse that KerasHub does not export.

KerasHub 0.32 builds ``DeepLabV3Backbone`` with a ``SpatialPyramidPooling`` layer and
``RetinaNetBackbone`` with a ``FeaturePyramid`` layer, neither of them public. Our
models reuse them, so that the stock layers (and their weights) are the same; this is
the one place that reaches into ``keras_hub.src``, and ``tests/test_keras_hub_models.py``
fails loudly if KerasHub moves them.
"""

from keras_hub.src.models.deeplab_v3.deeplab_v3_layers import SpatialPyramidPooling
from keras_hub.src.models.retinanet.feature_pyramid import FeaturePyramid

__all__ = ["FeaturePyramid", "SpatialPyramidPooling"]
