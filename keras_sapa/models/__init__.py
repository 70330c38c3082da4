"""SAPA inside KerasCV and KerasHub models, imported on first use.

KerasCV (TensorFlow only), in :mod:`keras_sapa.models.keras_cv`:

- :class:`SAPADeepLabV3Plus`: DeepLabV3+ whose 8x bilinear encoder-output upsampling is
  three SAPA 2x stages guided by the backbone's P4, P3 and P2.
- :class:`SAPAFeaturePyramid` / :class:`SAPARetinaNet`: RetinaNet's feature pyramid with
  SAPA in each top-down step, kept through ``get_config`` and ``.keras`` files.

KerasHub (every Keras backend the SAPA layer runs on), in
:mod:`keras_sapa.models.keras_hub`:

- :class:`SAPASegFormerBackbone` / :class:`SAPASegFormer`: SegFormer whose all-MLP
  decoder brings each coarser stage to the finest one by SAPA 2x stages guided by the
  finer stages, as the SAPA paper places it (SAPA-B, K=5, d=32 by default).
- :class:`SAPADeepLabV3Backbone`: for ``keras_hub.models.DeepLabV3ImageSegmenter``, the
  bilinear upsampling of the pooled encoder output replaced by SAPA 2x stages.
- :class:`SAPARetinaNetBackbone` (with :class:`SAPAKerasHubFeaturePyramid`): for
  ``keras_hub.models.RetinaNetObjectDetector``, SAPA in the pyramid's top-down path.

Each takes its upsampler as one argument, ``upsampler=``: ``None`` for SAPA with the
paper's configuration for that model; a dict of SAPA arguments (``{"embedding_dim":
32, "norm": "group", "norm_groups": 8}``; the ones left out take the model's
defaults); a serialized layer (``keras.saving.serialize_keras_object(layer)``) or a
layer used as a template (each stage gets a fresh layer from its config), of any class
called as ``layer(x, guide)``; a list of these, one per stage; or a callable
``upsampler(stage_index, name=name)`` that returns the named layer of each stage.
``get_config`` stores it (for a callable: the configs of the layers it built), so
``.keras`` files reload with the same upsamplers (:mod:`keras_sapa.models._upsampler`).

And, for all of them:

- :func:`sapa_overhead`: parameters and multiply-adds SAPA adds over the stock model.
- :func:`load_stock_weights`: a stock model's weights into every layer SAPA leaves
  unchanged.

``import keras_sapa`` imports neither KerasCV nor KerasHub: the classes above are
imported when first used (``keras_sapa.models.SAPASegFormer`` imports KerasHub), and
``.keras`` files holding them reload after a plain ``import keras_sapa``: each class is
registered under its ``keras_sapa>Name`` key by a small stand-in whose ``from_config``
imports the real module, which then registers the real class under the same key.
"""

import importlib

import keras

from keras_sapa.models._counting import sapa_deform_layer_macs
from keras_sapa.models._counting import sapa_layer_macs
from keras_sapa.models._counting import sapa_overhead
from keras_sapa.models._transfer import load_stock_weights

# Public name -> module that defines it (imported on first use).
_LAZY_CLASSES = {
    "SAPADeepLabV3Plus": "keras_sapa.models.keras_cv.deeplab",
    "SAPAFeaturePyramid": "keras_sapa.models.keras_cv.retinanet",
    "SAPARetinaNet": "keras_sapa.models.keras_cv.retinanet",
    "SAPASegFormerBackbone": "keras_sapa.models.keras_hub.segformer",
    "SAPASegFormer": "keras_sapa.models.keras_hub.segformer",
    "SAPADeepLabV3Backbone": "keras_sapa.models.keras_hub.deeplab_v3",
    "SAPAKerasHubFeaturePyramid": "keras_sapa.models.keras_hub.retinanet",
    "SAPARetinaNetBackbone": "keras_sapa.models.keras_hub.retinanet",
}
_SUBPACKAGES = ("keras_cv", "keras_hub")

__all__ = sorted(_LAZY_CLASSES) + [
    "load_stock_weights",
    "sapa_deform_layer_macs",
    "sapa_layer_macs",
    "sapa_overhead",
]


def __getattr__(name):
    if name in _LAZY_CLASSES:
        value = getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))


def _register_stand_in(name, module):
    """Register, under ``keras_sapa>name``, a stand-in that imports ``module`` to load.

    Keras finds a custom class only through its registration; the stand-in makes
    ``keras.models.load_model`` (and ``keras.saving.deserialize_keras_object``) work
    before the real module is imported. Importing the real module registers the real
    class under the same key, replacing the stand-in.
    """
    key = f"keras_sapa>{name}"
    if keras.saving.get_registered_object(key) is not None:
        return  # the real class is registered already

    def from_config(cls, config):
        real = getattr(importlib.import_module(module), name)
        return real.from_config(config)

    def get_config(self):  # required by register_keras_serializable; never called
        raise TypeError(f"{type(self).__name__} is a loading stand-in, never built.")

    stand_in = type(
        f"_Lazy{name}",
        (),
        {
            "from_config": classmethod(from_config),
            "get_config": get_config,
            "__doc__": f"Loads ``{key}`` by importing ``{module}`` first.",
            "__module__": __name__,
        },
    )
    keras.saving.register_keras_serializable(package="keras_sapa", name=name)(stand_in)


for _name, _module in _LAZY_CLASSES.items():
    _register_stand_in(_name, _module)
del _name, _module
