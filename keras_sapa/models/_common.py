"""Helpers shared by the keras_sapa model integrations."""

import keras

class _Default:
    """Marks an argument left to its default (where ``None`` has a meaning of its own)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "DEFAULT"


#: "Left out": the default of model arguments whose ``None`` means something
#: (``norm=None`` is "no norm").
DEFAULT = _Default()

def deserialize_nested(config, *keys):
    """A copy of ``config`` with the Keras objects serialized under ``keys`` (a
    backbone, a pyramid, ...) deserialized, for the models' ``from_config``."""
    config = dict(config)
    for key in keys:
        if isinstance(config.get(key), dict):
            config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


# SAPA arguments a model forwards to each of its SAPA layers.
SAPA_ARGS = ("variant", "kernel_size", "embedding_dim", "norm", "implementation")


def check_backbone(backbone, levels, model_name):
    """Raise ``ValueError`` unless ``backbone`` is a Keras model exposing ``levels``."""
    if not isinstance(backbone, keras.Model):
        raise ValueError(
            f"`backbone` of {model_name} must be a `keras.Model` (a KerasCV backbone). "
            f"Received: backbone={backbone!r} (of type {type(backbone).__name__})"
        )
    pyramid = getattr(backbone, "pyramid_level_inputs", None)
    if not isinstance(pyramid, dict):
        raise ValueError(
            f"`backbone` of {model_name} must have a `pyramid_level_inputs` dict "
            "mapping pyramid levels ('P2', ...) to layer names, as KerasCV backbones "
            f"do. Received a backbone of type {type(backbone).__name__} without one."
        )
    missing = [level for level in levels if level not in pyramid]
    if missing:
        raise ValueError(
            f"{model_name} needs the backbone levels {list(levels)}; the backbone's "
            f"`pyramid_level_inputs` lacks {missing}. Received: "
            f"pyramid_level_inputs={pyramid}"
        )


def pyramid_extractor(backbone, levels, name=None):
    """A functional model from the backbone's input to a dict of its pyramid levels."""
    outputs = {
        level: backbone.get_layer(backbone.pyramid_level_inputs[level]).output
        for level in levels
    }
    return keras.Model(inputs=backbone.inputs, outputs=outputs, name=name)


def sapa_kwargs(variant, kernel_size, embedding_dim, norm, implementation):
    """The SAPA arguments a model forwards to its layers, checked once up front."""
    from keras_sapa.layers import NORMS
    from keras_sapa.layers import VARIANTS
    from keras_sapa.ops import _checks

    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}")
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}. Received: norm={norm!r}")
    return {
        "variant": variant,
        "kernel_size": _checks.check_kernel_size(kernel_size),
        "embedding_dim": _checks.positive_int("embedding_dim", embedding_dim),
        "norm": norm,
        "implementation": _checks.check_implementation(implementation),
    }


def power_of_two_log(name, value):
    """``log2(value)`` for a power of two >= 2, else a ``ValueError`` naming ``name``."""
    from keras_sapa.ops import _checks

    value = _checks.integer(name, value, "a power of two >= 2", minimum=2)
    if value & (value - 1):
        raise ValueError(f"`{name}` must be a power of two >= 2. Received: {name}={value}")
    return value.bit_length() - 1
