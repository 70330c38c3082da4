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
    require_levels(levels, pyramid, model_name, "the backbone's `pyramid_level_inputs`")


def check_image_encoder(image_encoder, model_name, example="keras_hub.models.ResNetBackbone"):
    """Raise ``ValueError`` unless ``image_encoder`` is a Keras model with a
    ``pyramid_outputs`` dict (a KerasHub backbone such as ``example``)."""
    if not isinstance(image_encoder, keras.Model) or not isinstance(
        getattr(image_encoder, "pyramid_outputs", None), dict
    ):
        raise ValueError(
            f"`image_encoder` of {model_name} must be a `keras.Model` with a "
            f"`pyramid_outputs` dict (a KerasHub backbone such as `{example}`). Received: "
            f"image_encoder={image_encoder!r} (of type {type(image_encoder).__name__})"
        )


def require_levels(levels, available, needed_by, source):
    """Raise ``ValueError`` naming what lacks them unless every level of ``levels``
    (``"P2"``, ...) is a key of ``available`` (the levels of ``source``)."""
    missing = [level for level in levels if level not in available]
    if missing:
        raise ValueError(
            f"{needed_by} needs the levels {list(levels)}; {source} lacks {missing}. "
            f"Received levels: {sorted(available)}"
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


def bilinear_macs(image_hw, level, channels):
    """Multiply-adds of a bilinear upsampling to pyramid ``level`` (stride
    ``2**level``) of an image of size ``image_hw``: 4 per output value."""
    stride = 2**level
    return 4 * -(-image_hw[0] // stride) * -(-image_hw[1] // stride) * channels


class UpsamplerStages:
    """``sapa_stages`` and ``replaced_upsampling_macs`` (read by
    :func:`keras_sapa.models.sapa_overhead`) for a model or layer whose stage layers
    its :class:`~keras_sapa.models._upsampler.Upsampler` ``self._upsampler`` made."""

    def sapa_stages(self):
        """The upsampling stages: dicts of ``layer``, output ``level`` (log2 of its
        stride), ``x_channels`` and ``guide_channels``."""
        return [dict(info, layer=layer) for layer, info in self._upsampler.stages]

    def replaced_upsampling_macs(self, image_hw):
        """Multiply-adds of the stock upsampling the stages replace; by default one
        bilinear upsampling of the first stage's input to the last stage's level."""
        first, last = self._upsampler.stages[0][1], self._upsampler.stages[-1][1]
        return bilinear_macs(image_hw, last["level"], first["x_channels"])


class UpsamplerModel(UpsamplerStages):
    """:class:`UpsamplerStages`, and ``get_config`` / ``from_config`` for a model that
    keeps its constructor arguments as attributes of the same names: those named in
    ``ARGUMENTS`` as they are, the Keras objects named in ``NESTED`` serialized, and
    ``upsampler`` as its :class:`~keras_sapa.models._upsampler.Upsampler` stores it."""

    ARGUMENTS = ()
    NESTED = ()

    def _keep_arguments(self, values):
        """Sets the attributes named in ``ARGUMENTS`` and ``NESTED`` from ``values``:
        the constructor's ``locals()`` at its end, where each argument's name holds the
        value as checked or completed (a default layer built, an integer checked)."""
        for name in self.ARGUMENTS + self.NESTED:
            setattr(self, name, values[name])

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.ARGUMENTS})
        for name in self.NESTED:
            config[name] = keras.saving.serialize_keras_object(getattr(self, name))
        config["upsampler"] = self._upsampler.get_config()
        return config

    @classmethod
    def from_config(cls, config):
        return super().from_config(deserialize_nested(config, *cls.NESTED))


class PyramidStages(UpsamplerStages):
    """:class:`UpsamplerStages` of a feature pyramid, whose stages replace nearest
    upsamplings: no multiply-adds."""

    def replaced_upsampling_macs(self, image_hw):
        return 0
