"""Helpers shared by the keras_sapa model integrations."""

import keras


def deserialize_nested(config, *keys):
    """A copy of ``config`` with the Keras objects serialized under ``keys`` (a
    backbone, a pyramid, ...) deserialized, for the models' ``from_config``."""
    config = dict(config)
    for key in keys:
        if isinstance(config.get(key), dict):
            config[key] = keras.saving.deserialize_keras_object(config[key])
    return config


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
        level: backbone.get_layer(backbone.pyramid_level_inputs[level]).output for level in levels
    }
    return keras.Model(inputs=backbone.inputs, outputs=outputs, name=name)


def power_of_two_log(name, value):
    """``log2(value)`` for a power of two >= 2, else a ``ValueError`` naming ``name``."""
    from keras_sapa.ops import _checks

    value = _checks.integer(name, value, "a power of two >= 2", minimum=2)
    if value & (value - 1):
        raise ValueError(f"`{name}` must be a power of two >= 2. Received: {name}={value}")
    return value.bit_length() - 1
