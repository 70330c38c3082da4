"""Helpers shared by the keras_sapa model integrations."""

import keras

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
