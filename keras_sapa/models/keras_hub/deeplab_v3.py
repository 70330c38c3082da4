"""A DeepLabV3 backbone (KerasHub) whose encoder-output upsampling is SAPA."""

import keras
import keras_hub

from keras_sapa.models._common import UpsamplerModel
from keras_sapa.models._common import check_image_encoder
from keras_sapa.models._common import power_of_two_log
from keras_sapa.models._common import require_levels
from keras_sapa.models._upsampler import SAPA_G
from keras_sapa.models._upsampler import Upsampler
from keras_sapa.models.keras_hub._upstream import SpatialPyramidPooling
from keras_sapa.ops import _checks

DEFAULT_UPSAMPLER = SAPA_G


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPADeepLabV3Backbone(UpsamplerModel, keras_hub.models.Backbone):
    """KerasHub's ``DeepLabV3Backbone`` with SAPA where its decoder upsamples.

    The stock backbone pools the encoder level ``spatial_pyramid_pooling_key`` (ASPP),
    upsamples it by ``upsampling_size`` with one bilinear ``UpSampling2D`` named
    ``encoder_output_upsampling``, optionally concatenates the projected
    ``low_level_feature_key`` level (DeepLabV3+), applies a 1x1 convolution, batch
    norm and ReLU, and upsamples bilinearly to the image (``backbone_output_upsampling``).
    Here the ``encoder_output_upsampling`` step is ``log2(upsampling_size)`` SAPA 2x
    stages, each guided by the encoder level it produces (for ``"P5"`` and 8:
    ``sapa_upsampling_P4``, ``_P3``, ``_P2`` guided by P4, P3, P2). The last upsampling
    to the image stays bilinear: no feature guides it. Every other layer is the stock
    one with the stock name and place, so a stock ``DeepLabV3Backbone``'s weights load
    into all but the SAPA layers (:func:`keras_sapa.models.load_stock_weights`).

    Use it as the ``backbone`` of ``keras_hub.models.DeepLabV3ImageSegmenter``.

    Args:
        image_encoder: a KerasHub backbone with ``pyramid_outputs`` (for example
            ``keras_hub.models.ResNetBackbone``), holding every level from
            ``spatial_pyramid_pooling_key`` down to the level ``upsampling_size``
            brings it to.
        spatial_pyramid_pooling_key: encoder level pooled by the ASPP (``"P5"``).
        upsampling_size: factor of the replaced upsampling, a power of two (8 for
            DeepLabV3+ from P5 to P2).
        dilation_rates: ASPP dilation rates, as for the stock backbone.
        low_level_feature_key: encoder level concatenated after the upsampling
            (``"P2"`` for DeepLabV3+), or ``None``.
        projection_filters: filters of the low-level projection.
        image_shape: input shape.
        upsampler: the layer of each 2x stage (stage 0 is the first, from
            ``spatial_pyramid_pooling_key``), any layer called as ``layer(x, guide)``:
            ``None`` for SAPA-G, K=5, d=64, LayerNorm; a dict of SAPA arguments (the
            ones left out take those defaults); a serialized layer or a layer used as
            a template; a list of these, one per stage; or a callable
            ``upsampler(stage_index, name=name)`` (see :mod:`keras_sapa.models`).
            SAPA-D goes in the same way: ``upsampler=keras_sapa.SAPADeform()`` (its
            ``groups`` must divide the ASPP's 256 channels).
        **kwargs: ``keras_hub.models.Backbone`` arguments (``name``, ``dtype``).
    """

    ARGUMENTS = (
        "projection_filters",
        "dilation_rates",
        "upsampling_size",
        "low_level_feature_key",
        "spatial_pyramid_pooling_key",
        "image_shape",
    )
    NESTED = ("image_encoder",)

    def __init__(
        self,
        image_encoder,
        spatial_pyramid_pooling_key,
        upsampling_size,
        dilation_rates,
        low_level_feature_key=None,
        projection_filters=48,
        image_shape=(None, None, 3),
        upsampler=None,
        **kwargs,
    ):
        check_image_encoder(image_encoder, "SAPADeepLabV3Backbone")
        if isinstance(upsampling_size, (tuple, list)):
            if len(set(upsampling_size)) != 1:
                raise ValueError(
                    "`upsampling_size` must be the same along height and width. "
                    f"Received: upsampling_size={upsampling_size!r}"
                )
            factor = upsampling_size[0]
        else:
            factor = upsampling_size
        steps = power_of_two_log("upsampling_size", factor)
        projection_filters = _checks.positive_int("projection_filters", projection_filters)
        factory = Upsampler(upsampler, DEFAULT_UPSAMPLER, "SAPADeepLabV3Backbone")
        pyramid = image_encoder.pyramid_outputs
        try:
            top = int(str(spatial_pyramid_pooling_key)[1:])
        except ValueError:
            top = None
        if spatial_pyramid_pooling_key not in pyramid or top is None:
            raise ValueError(
                "`spatial_pyramid_pooling_key` must be one of the encoder's levels "
                f"{sorted(pyramid)}. Received: "
                f"spatial_pyramid_pooling_key={spatial_pyramid_pooling_key!r}"
            )
        guide_levels = range(top - 1, top - steps - 1, -1)
        require_levels(
            [f"P{level}" for level in guide_levels],
            pyramid,
            f"SAPA upsampling {spatial_pyramid_pooling_key} by upsampling_size={factor}",
            "the encoder",
        )
        if low_level_feature_key and low_level_feature_key not in pyramid:
            raise ValueError(
                f"`low_level_feature_key` must be one of the encoder's levels "
                f"{sorted(pyramid)} or None. Received: "
                f"low_level_feature_key={low_level_feature_key!r}"
            )
        if keras.config.image_data_format() != "channels_last":
            raise ValueError(
                "SAPADeepLabV3Backbone supports channels_last only. Received: "
                f"keras.config.image_data_format()={keras.config.image_data_format()!r}"
            )
        data_format = "channels_last"
        channel_axis = -1

        # === Layers and graph, in the stock model's order ===
        inputs = keras.layers.Input(image_shape, name="inputs")
        fpn_model = keras.Model(image_encoder.inputs, image_encoder.pyramid_outputs)
        fpn_outputs = fpn_model(inputs)

        spatial_pyramid_pooling = SpatialPyramidPooling(dilation_rates=dilation_rates)
        x = spatial_pyramid_pooling(fpn_outputs[spatial_pyramid_pooling_key])

        factory.start_stages(steps)
        encoder_outputs = factory.chain(
            x, [(f"sapa_upsampling_P{lv}", lv, fpn_outputs[f"P{lv}"]) for lv in guide_levels]
        )

        if low_level_feature_key:
            low = keras.layers.Conv2D(
                name="decoder_conv",
                filters=projection_filters,
                kernel_size=1,
                padding="same",
                use_bias=False,
                data_format=data_format,
            )(fpn_outputs[low_level_feature_key])
            low = keras.layers.BatchNormalization(name="decoder_norm", axis=channel_axis)(low)
            low = keras.layers.ReLU(name="decoder_relu")(low)
            encoder_outputs = keras.layers.Concatenate(
                axis=channel_axis, name="encoder_decoder_concat"
            )([encoder_outputs, low])
        upsampling = (2**top) // factor
        x = keras.layers.Conv2D(
            name="segmentation_head_conv",
            filters=256,
            kernel_size=1,
            padding="same",
            use_bias=False,
            data_format=data_format,
        )(encoder_outputs)
        x = keras.layers.BatchNormalization(name="segmentation_head_norm", axis=channel_axis)(x)
        x = keras.layers.ReLU(name="segmentation_head_relu")(x)
        x = keras.layers.UpSampling2D(
            size=upsampling,
            interpolation="bilinear",
            data_format=data_format,
            name="backbone_output_upsampling",
        )(x)

        super().__init__(inputs=inputs, outputs=x, **kwargs)

        # === Config ===
        self._keep_arguments(locals())
        # The stage layers (replacing the stock bilinear ``encoder_output_upsampling``),
        # held by a plain object: not tracked, one path in saved files.
        self._upsampler = factory

    def call(self, inputs, training=False, mask=None):
        """Runs the backbone; ``training`` defaults to False (inference), not None.

        The stock spatial pyramid pooling calls a ``keras.layers.Resizing`` made inside
        its ``call``, whose own ``training`` defaults to True. With the outer call's
        ``training`` left unset (``model.export``, ``tf.function(lambda x: model(x))``),
        Keras would take that True for the layers called after it: the SAPA stages'
        ``"auto"`` then takes the training path, which puts the compiled op into an
        exported graph. An explicit False here is what every layer inherits instead;
        ``fit`` and an explicit ``training=True`` are unchanged.
        """
        return super().call(inputs, training=training, mask=mask)
