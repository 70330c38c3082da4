"""The ``upsampler=`` argument of the keras_sapa models: the whole upsampler as one value.

Every model builds one upsampling layer per stage (a 2x step guided by a finer feature)
and calls it as ``layer(x, guide)``. What that layer is comes from one argument:

- ``None``: SAPA with the model's defaults (the paper's configuration for that model);
- a dict of SAPA arguments, as ``SAPA(...).get_config()`` returns (all of them or only
  some: the rest take the model's defaults), e.g. ``{"embedding_dim": 32}``;
- a serialized layer, as ``keras.saving.serialize_keras_object(layer)`` returns (any
  registered layer class called as ``layer(x, guide)``: ``SAPA`` or another one);
- a layer instance, used as a template: each stage gets a fresh layer from its config
  (the instance itself is never called, and its weights are not copied);
- a list of any of the above, one per stage, in the model's stage order;
- a callable ``upsampler(stage_index, name=name)`` returning a new layer for stage
  ``stage_index`` (0 is the first stage the model builds, see its docstring), named
  ``name`` (the model's stage names, documented per model, which its weight files and
  :func:`keras_sapa.models.sapa_overhead` use).

Every stage upsamples 2x: a config whose ``up_factor`` is not 2 is refused.
``get_config`` stores the serialized layer config (one dict, or the list as given);
for a callable, which Keras cannot serialize, it stores the list of the configs of the
layers the callable built, so that a saved model reloads with the same layers without
the callable.
"""

import copy

import keras

UP_FACTOR = 2

#: The models' default upsamplers (the paper's configurations), as SAPA arguments.
#: SAPA-G, K=5, d=64 (the official NeurIPS defaults): the DeepLab decoders.
SAPA_G = {"variant": "gated", "kernel_size": 5, "embedding_dim": 64, "norm": "layer"}
#: SAPA-B, K=5, d=64: the feature pyramids (the variant the paper reports for detection:
#: COCO Faster R-CNN 37.4 -> 37.8 box AP).
SAPA_B = {"variant": "bilinear", "kernel_size": 5, "embedding_dim": 64, "norm": "layer"}
#: SAPA-B, K=5, d=32: SegFormer (the official logs' upsample_cfg).
SAPA_B_SEGFORMER = {**SAPA_B, "embedding_dim": 32}


def _serialize(layer):
    """``serialize_keras_object(layer)`` less the shapes of a built layer: every stage
    layer is built by the model's graph."""
    config = keras.saving.serialize_keras_object(layer)
    config.pop("build_config", None)
    config.pop("compile_config", None)
    return config


def _deserialize(config, what):
    try:
        layer = keras.saving.deserialize_keras_object(copy.deepcopy(config))
    except TypeError as error:  # unknown or missing constructor arguments
        raise ValueError(
            f"{what} does not make a layer ({error}). Received: {config!r}"
        ) from error
    if not isinstance(layer, keras.layers.Layer):
        raise ValueError(
            f"{what} must make a keras.layers.Layer. Received: {config!r}, which made "
            f"a {type(layer).__name__}"
        )
    return layer


class Upsampler:
    """A model's resolved ``upsampler=`` argument (see the module docstring).

    Args:
        upsampler: the argument as given.
        defaults: the model's default SAPA arguments (a dict of ``SAPA`` keyword
            arguments), used for ``None`` and for the keys a plain dict leaves out.
        model_name: the model's class name, for error messages.
    """

    def __init__(self, upsampler, defaults, model_name):
        self.model_name = model_name
        #: (layer, info) of each stage layer made by :meth:`stage`, in stage order; info
        #: holds the stage's output ``level`` and input widths, for ``sapa_overhead``.
        self.stages = []
        self._function = None
        self._templates = None  # one serialized layer config, or a list per stage
        self._per_stage = False
        if isinstance(upsampler, (list, tuple)):
            if not upsampler:
                raise ValueError(
                    f"`upsampler` of {model_name} must not be an empty list. "
                    f"Received: upsampler={upsampler!r}"
                )
            self._per_stage = True
            self._templates = [
                self._template(item, defaults, f"`upsampler[{i}]` of {model_name}")
                for i, item in enumerate(upsampler)
            ]
        elif callable(upsampler) and not isinstance(upsampler, keras.layers.Layer):
            self._function = upsampler
        else:
            self._templates = self._template(upsampler, defaults, f"`upsampler` of {model_name}")

    @staticmethod
    def _template(value, defaults, what):
        """The serialized config of one stage layer, checked by making a layer of it."""
        from keras_sapa.layers import SAPA

        if value is None:
            value = {}
        if isinstance(value, keras.layers.Layer):
            config = _serialize(value)
        elif isinstance(value, dict) and "class_name" in value:
            config = copy.deepcopy(value)
        elif isinstance(value, dict):
            try:
                # A fixed name, so that the stored config does not depend on how many
                # layers the process made before (each stage is renamed anyway).
                layer = SAPA(**{"name": "upsampler", **defaults, **value})
            except TypeError as error:
                raise ValueError(
                    f"{what}: a dict without 'class_name' holds SAPA arguments ({error}); "
                    "pass keras.saving.serialize_keras_object(layer) for another layer "
                    f"class. Received: {value!r}"
                ) from error
            config = _serialize(layer)
        else:
            raise ValueError(
                f"{what} must be None, a dict (SAPA arguments or a serialized layer), "
                "a layer used as a template, a list of these (one per stage), or a "
                f"callable upsampler(stage_index, name=...). Received: {value!r} "
                f"(of type {type(value).__name__})"
            )
        layer = _deserialize(config, what)
        up_factor = getattr(layer, "up_factor", UP_FACTOR)
        if up_factor != UP_FACTOR:
            raise ValueError(
                f"{what}: every stage upsamples {UP_FACTOR}x, so the layer's up_factor "
                f"must be {UP_FACTOR}. Received: up_factor={up_factor!r}"
            )
        return config

    def start_stages(self, count):
        """Begin making the model's ``count`` stages: ``ValueError`` unless a per-stage
        list has ``count`` entries, and the stages recorded before are forgotten."""
        if self._per_stage and len(self._templates) != count:
            raise ValueError(
                f"{self.model_name} has {count} upsampling stages; a list `upsampler` "
                f"needs one entry per stage. Received {len(self._templates)} entries."
            )
        self.stages = []

    def stage(self, name, level, x_channels, guide_channels, dtype=None):
        """:meth:`make` the layer of the next stage and record it (see :attr:`stages`):
        ``level`` is the pyramid level it outputs (log2 of its stride), the channels
        those of its ``x`` and guide."""
        layer = self.make(len(self.stages), name, dtype)
        info = {
            "level": int(level),
            "x_channels": int(x_channels),
            "guide_channels": int(guide_channels),
        }
        self.stages.append((layer, info))
        return layer

    def chain(self, x, stages):
        """``x`` brought up one 2x stage per ``(name, level, guide)`` of ``stages``
        (coarsest first), each stage's layer made by :meth:`stage` and called as
        ``layer(x, guide)``."""
        for name, level, guide in stages:
            x = self.stage(name, level, x.shape[-1], guide.shape[-1])(x, guide)
        return x

    def make(self, stage_index, name, dtype=None):
        """The layer of stage ``stage_index``, named ``name`` (and with the dtype
        policy ``dtype`` when given, for layers nested in a layer)."""
        if self._function is not None:
            layer = self._function(stage_index, name=name)
            if not isinstance(layer, keras.layers.Layer):
                raise ValueError(
                    f"`upsampler` of {self.model_name} returned, for stage {stage_index}, "
                    f"{layer!r} (of type {type(layer).__name__}); it must return a "
                    "keras.layers.Layer called as layer(x, guide)."
                )
            if layer.name != name:
                raise ValueError(
                    f"`upsampler` of {self.model_name} must name the layer of stage "
                    f"{stage_index} {name!r} (the `name` it is called with). "
                    f"Received a layer named {layer.name!r}"
                )
            return layer
        config = self._templates[stage_index] if self._per_stage else self._templates
        config = copy.deepcopy(config)
        config["config"]["name"] = name
        if dtype is not None:
            config["config"]["dtype"] = keras.dtype_policies.serialize(
                keras.dtype_policies.get(dtype)
            )
        return _deserialize(config, f"`upsampler` of {self.model_name}")

    def get_config(self):
        """What the model's ``get_config`` stores under ``upsampler`` (for a callable:
        the configs of the stage layers it built, in stage order)."""
        if self._function is None:
            return copy.deepcopy(self._templates)
        if not self.stages:
            raise ValueError(
                f"The get_config of a {self.model_name} given a callable `upsampler` "
                "stores the configs of the layers it built; build the model first."
            )
        return [_serialize(layer) for layer, _ in self.stages]
