"""RetinaNet's feature pyramid with SAPA in the top-down path, and a RetinaNet that keeps it."""

import math

import keras
import keras_cv

from keras_sapa.models._common import PyramidStages
from keras_sapa.models._common import deserialize_nested
from keras_sapa.models._upsampler import SAPA_B
from keras_sapa.models._upsampler import Upsampler
from keras_sapa.ops import _checks

_positive_int = _checks.positive_int

DEFAULT_UPSAMPLER = SAPA_B


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPAFeaturePyramid(PyramidStages, keras.layers.Layer):
    """Feature pyramid network whose top-down upsampling is SAPA.

    A drop-in for ``keras_cv.models.RetinaNet(feature_pyramid=...)``: called, as
    RetinaNet calls its pyramid, on the backbone levels, either a dict
    ``{"P3": c3, "P4": c4, "P5": c5}`` or a list ``[c3, c4, c5]`` (levels
    ``min_level`` to ``backbone_max_level``), and returns a tuple of
    ``max_level - min_level + 1`` maps of ``num_channels`` channels, finest first.
    With the defaults it has the structure and the parameters of KerasCV's stock
    ``FeaturePyramid`` plus SAPA's, the stock model's shared nearest
    ``UpSampling2D(2)`` being replaced by one SAPA per top-down step:

        lateral_l = Conv1x1(C_l)                              (l = 3, 4, 5)
        merged_5  = lateral_5
        merged_l  = lateral_l + SAPA_l(merged_{l+1}, guide=lateral_l)
        P_l       = Conv3x3(merged_l)
        P6        = Conv3x3/2(C_5);   P7 = Conv3x3/2(relu(P6))

    Each SAPA is guided by the lateral feature of the finer level, the map it is
    added to, so the guide and the upsampled feature both have ``num_channels``
    channels.

    Args:
        min_level: finest level, the first backbone level used.
        max_level: coarsest level returned. Levels above ``backbone_max_level`` are
            made by stride-2 3x3 convolutions (from the top backbone feature, then
            from the ReLU of the previous extra level), as in RetinaNet.
        num_channels: width of every output map (256 in RetinaNet).
        backbone_max_level: coarsest backbone level given as input (RetinaNet passes
            P3 to P5).
        upsampler: the layer of each top-down step (stage ``i`` brings the merged
            level ``min_level + i + 1`` to ``min_level + i`` and is named
            ``sapa_P{l+1}_to_P{l}``), any layer called as ``layer(x, guide)``: ``None``
            for SAPA-B, K=5, d=64, LayerNorm (the variant the paper reports for
            detection); a dict of SAPA arguments (the ones left out take those
            defaults); a serialized layer or a layer used as a template; a list of
            these, one per stage; or a callable ``upsampler(stage_index, name=name)``
            (see :mod:`keras_sapa.models`). With SAPA's ``implementation="auto"`` a
            SavedModel export holds builtin ops only.
        **kwargs: ``keras.layers.Layer`` arguments.

    Input sizes must be multiples of the largest backbone stride, so that every
    level is exactly twice the next (SAPA rejects anything else).
    """

    def __init__(
        self,
        min_level=3,
        max_level=7,
        num_channels=256,
        backbone_max_level=5,
        upsampler=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.min_level = _positive_int("min_level", min_level)
        self.max_level = _positive_int("max_level", max_level)
        self.num_channels = _positive_int("num_channels", num_channels)
        self.backbone_max_level = _positive_int("backbone_max_level", backbone_max_level)
        if max_level < min_level:
            raise ValueError(
                "`max_level` must be >= `min_level`. "
                f"Received: min_level={min_level}, max_level={max_level}"
            )
        if backbone_max_level < min_level:
            raise ValueError(
                "`backbone_max_level` must be >= `min_level`. Received: "
                f"min_level={min_level}, backbone_max_level={backbone_max_level}"
            )
        self._upsampler = Upsampler(upsampler, DEFAULT_UPSAMPLER, "SAPAFeaturePyramid")

        top = self.top_backbone_level
        self.input_levels = tuple(range(self.min_level, top + 1))
        self.lateral_convs = self._convs("lateral_P{}", self.input_levels, 1)
        # upsamplers[i] brings merged level input_levels[i] + 1 to input_levels[i].
        self._upsampler.start_stages(len(self.input_levels) - 1)
        c = self.num_channels
        self.upsamplers = [
            self._upsampler.stage(f"sapa_P{level + 1}_to_P{level}", level, c, c, self.dtype_policy)
            for level in self.input_levels[:-1]
        ]
        self.output_convs = self._convs("output_P{}", self.input_levels, 3)
        self.extra_convs = self._convs("output_P{}", range(top + 1, self.max_level + 1), 3, 2)

    def _convs(self, name_format, levels, kernel_size, strides=1):
        """One ``num_channels`` convolution per level, named ``name_format.format(level)``."""
        return [
            keras.layers.Conv2D(
                self.num_channels,
                kernel_size,
                strides=strides,
                padding="same",
                dtype=self.dtype_policy,
                name=name_format.format(level),
            )
            for level in levels
        ]

    @property
    def top_backbone_level(self):
        """Coarsest backbone level used (``min(backbone_max_level, max_level)``)."""
        return min(self.backbone_max_level, self.max_level)

    # ------------------------------------------------------------------ inputs
    def _as_list(self, inputs, what="inputs"):
        levels = self.input_levels
        if isinstance(inputs, dict):
            missing = [f"P{level}" for level in levels if f"P{level}" not in inputs]
            if missing:
                raise ValueError(
                    f"SAPAFeaturePyramid needs backbone levels P{levels[0]} to "
                    f"P{levels[-1]}; {what} lack {missing}. Received keys: "
                    f"{sorted(inputs)}"
                )
            return [inputs[f"P{level}"] for level in levels]
        inputs = list(inputs)
        if len(inputs) < len(levels):
            raise ValueError(
                f"SAPAFeaturePyramid needs {len(levels)} backbone maps (P{levels[0]} to "
                f"P{levels[-1]}), finest first. Received {len(inputs)}."
            )
        return inputs[: len(levels)]

    # ------------------------------------------------------------------- build
    def build(self, input_shape):
        shapes = self._as_list(input_shape, "input shapes")
        c = self.num_channels
        for conv, shape in zip(self.lateral_convs, shapes, strict=False):
            conv.build((None, None, None, shape[-1]))
        for layer in self.upsamplers:
            layer.build((None, None, None, c), (None, None, None, c))
        for conv in self.output_convs:
            conv.build((None, None, None, c))
        for i, conv in enumerate(self.extra_convs):
            conv.build((None, None, None, shapes[-1][-1] if i == 0 else c))
        self.built = True

    def call(self, inputs, training=None):
        features = self._as_list(inputs)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=False)]
        merged = laterals[-1]
        merged_levels = [merged]
        for i in range(len(laterals) - 2, -1, -1):
            merged = laterals[i] + self.upsamplers[i](merged, laterals[i])
            merged_levels.insert(0, merged)
        outputs = [conv(m) for conv, m in zip(self.output_convs, merged_levels, strict=False)]
        x = features[-1]
        for i, conv in enumerate(self.extra_convs):
            x = conv(x if i == 0 else keras.ops.relu(x))
            outputs.append(x)
        return tuple(outputs)

    def compute_output_shape(self, input_shape):
        shapes = self._as_list(input_shape, "input shapes")
        c = self.num_channels
        out = [tuple(shape[:-1]) + (c,) for shape in shapes]
        batch, h, w = tuple(shapes[-1][:3])
        for _ in self.extra_convs:
            h = None if h is None else math.ceil(h / 2)
            w = None if w is None else math.ceil(w / 2)
            out.append((batch, h, w, c))
        return tuple(out)

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "min_level": self.min_level,
                "max_level": self.max_level,
                "num_channels": self.num_channels,
                "backbone_max_level": self.backbone_max_level,
                "upsampler": self._upsampler.get_config(),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPARetinaNet(keras_cv.models.RetinaNet):
    """KerasCV's RetinaNet with a :class:`SAPAFeaturePyramid` by default, kept on reload.

    Everything is ``keras_cv.models.RetinaNet`` (training, losses, decoding, presets),
    with two differences:

    - ``feature_pyramid`` defaults to ``SAPAFeaturePyramid(upsampler=upsampler)``.
    - ``get_config`` includes ``feature_pyramid`` and ``from_config`` rebuilds it. The
      stock ``RetinaNet.get_config`` leaves it out, so a stock RetinaNet given a
      custom pyramid silently comes back from a ``.keras`` file or a config with the
      nearest-neighbour ``FeaturePyramid``.

    Args:
        backbone: a KerasCV backbone exposing ``"P3"`` to ``"P5"`` in
            ``pyramid_level_inputs``. Build it from its constructor; a preset such as
            ``keras_cv.models.ResNet50Backbone.from_preset("resnet50_imagenet")`` is
            an option where the network is reachable.
        num_classes: number of classes (background excluded).
        bounding_box_format: format of the boxes, as for RetinaNet.
        feature_pyramid: a pyramid layer; when given, ``upsampler`` must be left out.
        upsampler: the ``upsampler`` of the default :class:`SAPAFeaturePyramid`
            (``None``: its default, SAPA-B).
        **kwargs: the other ``keras_cv.models.RetinaNet`` arguments (``anchor_generator``,
            ``label_encoder``, ``prediction_decoder``, ``classification_head``,
            ``box_head``, ``name``).

    ``model.export`` gives a portable SavedModel (builtin ops only) by default.
    """

    def __init__(
        self,
        backbone,
        num_classes,
        bounding_box_format,
        feature_pyramid=None,
        upsampler=None,
        **kwargs,
    ):
        if feature_pyramid is None:
            feature_pyramid = SAPAFeaturePyramid(upsampler=upsampler)
        elif upsampler is not None:
            raise ValueError(
                "Pass either `feature_pyramid` or the `upsampler` of the default "
                f"SAPAFeaturePyramid, not both. Received: feature_pyramid={feature_pyramid!r} "
                f"and upsampler={upsampler!r}"
            )
        super().__init__(
            backbone=backbone,
            num_classes=num_classes,
            bounding_box_format=bounding_box_format,
            feature_pyramid=feature_pyramid,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        config["feature_pyramid"] = keras.saving.serialize_keras_object(self.feature_pyramid)
        return config

    @classmethod
    def from_config(cls, config):
        return super().from_config(deserialize_nested(config, "feature_pyramid"))
