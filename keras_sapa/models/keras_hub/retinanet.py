"""KerasHub's RetinaNet feature pyramid with SAPA in its top-down path, and its backbone."""

import keras
import keras_hub

from keras_sapa.models._common import PyramidStages
from keras_sapa.models._common import UpsamplerModel
from keras_sapa.models._common import check_image_encoder
from keras_sapa.models._common import require_levels
from keras_sapa.models._upsampler import SAPA_B
from keras_sapa.models._upsampler import Upsampler
from keras_sapa.models.keras_hub._upstream import FeaturePyramid

DEFAULT_UPSAMPLER = SAPA_B


def _backbone_max_level(levels, max_level):
    return min(max(int(str(level)[1:]) for level in levels), max_level)


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPAKerasHubFeaturePyramid(PyramidStages, FeaturePyramid):
    """KerasHub's RetinaNet ``FeaturePyramid`` whose top-down upsampling is SAPA.

    The stock pyramid adds to each lateral 1x1 convolution the nearest 2x upsampling
    (one ``UpSampling2D`` named ``upsampling``) of the merged level above. Here that
    upsampling is a SAPA 2x layer per level, ``sapa_P{l+1}_to_P{l}``, guided by the
    lateral feature it is added to::

        merged_l = lateral_l + SAPA_l(merged_{l+1}, guide=lateral_l)

    Everything else (lateral and output convolutions, optional batch norms, the
    coarser levels, names, the dict of outputs) is the stock pyramid, so its weights
    load into all but the SAPA layers. ``channels_last`` only.

    Args:
        *args, min_level, max_level, use_p5, num_filters, activation,
            kernel_initializer, bias_initializer, batch_norm_momentum,
            batch_norm_epsilon, kernel_regularizer, bias_regularizer, use_batch_norm,
            data_format: as for KerasHub's pyramid (same order, same defaults).
        upsampler: keyword only, the layer of each top-down step (stage ``i`` is
            ``sapa_P{min_level + i + 1}_to_P{min_level + i}``), any layer called as
            ``layer(x, guide)`` and built by ``build(x_shape, guide_shape)``: ``None``
            for SAPA-B (the paper's detection variant), K=5, d=64, LayerNorm; a dict of
            SAPA arguments (the ones left out take those defaults); a serialized layer
            or a layer used as a template; a list of these, one per stage; or a
            callable ``upsampler(stage_index, name=name)`` (see
            :mod:`keras_sapa.models`). SAPA-D goes in the same way:
            ``upsampler=keras_sapa.SAPADeform()`` (its ``groups`` must divide
            ``num_filters``).
        **kwargs: the other arguments of KerasHub's pyramid and ``keras.layers.Layer``
            arguments.
    """

    def __init__(self, *args, upsampler=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.data_format != "channels_last":
            raise ValueError(
                "SAPAKerasHubFeaturePyramid supports channels_last only. "
                f"Received: data_format={self.data_format!r}"
            )
        # A plain object holding the stage layers (which self.sapa_layers tracks).
        self._upsampler = Upsampler(upsampler, DEFAULT_UPSAMPLER, "SAPAKerasHubFeaturePyramid")
        self.sapa_layers = None

    def build(self, input_shapes):
        super().build(input_shapes)
        levels = [key.split("_")[0] if "shape" in key else key for key in input_shapes]
        top = _backbone_max_level(levels, self.max_level)
        c = self.num_filters
        self.sapa_layers = {}
        self._upsampler.start_stages(top - self.min_level)
        for i in range(self.min_level, top):
            layer = self._upsampler.stage(f"sapa_P{i + 1}_to_P{i}", i, c, c, self.dtype_policy)
            layer.build((None, None, None, c), (None, None, None, c))
            self.sapa_layers[f"P{i}"] = layer
        # The stock nearest upsampling is not used: SAPA replaces it.
        self.top_down_op = None

    def call(self, inputs):
        top = _backbone_max_level(inputs, self.max_level)
        merged = {}
        for i in range(top, self.min_level - 1, -1):
            level = f"P{i}"
            lateral = self.lateral_conv_layers[level](inputs[level])
            if i < top:
                upper = self.sapa_layers[level](merged[f"P{i + 1}"], lateral)
                lateral = self.merge_op([lateral, upper])
            merged[level] = (
                self.lateral_batch_norm_layers[level](lateral) if self.use_batch_norm else lateral
            )
        outputs = {
            f"P{i}": self.output_conv_layers[f"P{i}"](merged[f"P{i}"])
            for i in range(self.min_level, top + 1)
        }
        for i in range(top + 1, self.max_level + 1):
            level = f"P{i}"
            # The first level above the backbone's comes from its top input (use_p5)
            # or its top output; the next ones from the previous output.
            source = (inputs if i == top + 1 and self.use_p5 else outputs)[f"P{i - 1}"]
            if i > top + 1:
                source = self.activation(source)
            out = self.output_conv_layers[level](source)
            if self.use_batch_norm:
                out = self.output_batch_norms[level](out)
            outputs[level] = out
        return {f"P{i}": outputs[f"P{i}"] for i in range(self.min_level, self.max_level + 1)}

    def get_config(self):
        config = super().get_config()
        config["upsampler"] = self._upsampler.get_config()
        return config


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPARetinaNetBackbone(UpsamplerModel, keras_hub.models.Backbone):
    """KerasHub's ``RetinaNetBackbone`` with a :class:`SAPAKerasHubFeaturePyramid`.

    Same graph, names and attributes as the stock backbone (feature extractor
    ``backbone``, pyramid ``fpn``), so it is a drop-in ``backbone`` for
    ``keras_hub.models.RetinaNetObjectDetector``, and a stock ``RetinaNetBackbone``'s
    weights load into all but the SAPA layers
    (:func:`keras_sapa.models.load_stock_weights`).

    Args:
        image_encoder, min_level, max_level, use_p5, use_fpn_batch_norm, image_shape,
            data_format, dtype: as for ``keras_hub.models.RetinaNetBackbone``.
        upsampler: the pyramid's upsampler, as for
            :class:`SAPAKerasHubFeaturePyramid` (``None``: SAPA-B, K=5, d=64,
            LayerNorm).
        **kwargs: ``keras_hub.models.Backbone`` arguments (``name``).
    """

    ARGUMENTS = ("min_level", "max_level", "use_p5", "use_fpn_batch_norm", "image_shape")
    NESTED = ("image_encoder",)

    def __init__(
        self,
        image_encoder,
        min_level,
        max_level,
        use_p5,
        use_fpn_batch_norm=False,
        image_shape=(None, None, 3),
        upsampler=None,
        data_format=None,
        dtype=None,
        **kwargs,
    ):
        check_image_encoder(image_encoder, "SAPARetinaNetBackbone")
        if min_level > max_level:
            raise ValueError(
                "`min_level` must be <= `max_level`. "
                f"Received: min_level={min_level}, max_level={max_level}"
            )
        top = _backbone_max_level(image_encoder.pyramid_outputs, max_level)
        if top < 5 and max_level >= 5:
            raise ValueError(
                f"The encoder's levels reach P{top}, below the pyramid's max_level="
                f"{max_level}. Received encoder levels {sorted(image_encoder.pyramid_outputs)}"
            )
        require_levels(
            [f"P{level}" for level in range(min_level, top + 1)],
            image_encoder.pyramid_outputs,
            "SAPARetinaNetBackbone",
            "the encoder",
        )

        feature_extractor = keras.Model(
            inputs=image_encoder.inputs,
            outputs={
                f"P{level}": image_encoder.pyramid_outputs[f"P{level}"]
                for level in range(min_level, top + 1)
            },
            name="backbone",
        )
        feature_pyramid = SAPAKerasHubFeaturePyramid(
            min_level=min_level,
            max_level=max_level,
            use_p5=use_p5,
            name="fpn",
            dtype=dtype,
            data_format=data_format,
            use_batch_norm=use_fpn_batch_norm,
            upsampler=upsampler,
        )
        image_input = keras.layers.Input(image_shape, name="inputs")
        pyramid_outputs = feature_pyramid(feature_extractor(image_input))
        super().__init__(inputs=image_input, outputs=pyramid_outputs, dtype=dtype, **kwargs)

        self._keep_arguments(locals())
        self.feature_pyramid = feature_pyramid
        self.pyramid_outputs = pyramid_outputs
        self._upsampler = feature_pyramid._upsampler  # its stages, for sapa_overhead

    def replaced_upsampling_macs(self, image_hw):
        """Those of the pyramid's stages (none: they replace nearest upsampling)."""
        return self.feature_pyramid.replaced_upsampling_macs(image_hw)
