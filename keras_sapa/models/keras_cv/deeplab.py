"""DeepLabV3+ with SAPA in place of the 8x bilinear upsampling of the encoder output."""

import keras
import keras_cv

from keras_sapa.models._common import UpsamplerModel
from keras_sapa.models._common import check_backbone
from keras_sapa.models._common import pyramid_extractor
from keras_sapa.models._upsampler import SAPA_G
from keras_sapa.models._upsampler import Upsampler
from keras_sapa.ops import _checks

_LEVELS = ("P2", "P3", "P4", "P5")
# Encoder output (P5 resolution) is brought to P2 by one SAPA 2x stage per level, each
# guided by the backbone feature of the level it produces.
_GUIDE_LEVELS = (4, 3, 2)
DEFAULT_UPSAMPLER = SAPA_G


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPADeepLabV3Plus(UpsamplerModel, keras_cv.models.Task):
    """DeepLabV3+ (Chen et al., ECCV 2018) with SAPA upsampling in the decoder.

    The graph is KerasCV's ``DeepLabV3Plus`` except for one step. The stock model
    upsamples the spatial-pyramid-pooling output from P5 (stride 32) to P2 (stride 4)
    with one fixed ``UpSampling2D(8, "bilinear", name="encoder_output_upsampling")``.
    Here that step is three SAPA 2x stages, as the SAPA paper places its upsampler:

        x = ASPP(P5)
        x = SAPA(x, guide=P4)   # named "sapa_upsampling_P4"
        x = SAPA(x, guide=P3)   # "sapa_upsampling_P3"
        x = SAPA(x, guide=P2)   # "sapa_upsampling_P2"

    Each guide is the raw backbone feature at the level the stage produces (SAPA
    normalises it itself); each stage keeps the ASPP's channel count, so the rest of
    the decoder sees the shapes it sees in the stock model.

    Choices, to stay faithful to DeepLabV3+:

    - The low-level branch is unchanged: P2 is projected by a 1x1 convolution to
      ``projection_filters`` channels (48, as in the reference DeepLab), batch norm and
      ReLU, then concatenated with the upsampled encoder output. SAPA's last stage is
      guided by the *unprojected* P2, so the guide keeps all the detail of the
      backbone, while the decoder's fusion stays DeepLabV3+'s concatenation.
    - The default head is the stock one: 1x1 convolution to 256 channels, batch norm,
      ReLU, 4x bilinear upsampling to the input size (P2 is stride 4 in KerasCV's
      pyramid convention) and a 1x1 softmax classifier kept in float32. Only the 8x
      step is replaced; the final 4x upsampling to image size stays bilinear, as in
      the stock model (the image has no feature to guide it).
    - Parameters other than SAPA's are exactly those of the stock model with the same
      backbone, pooling and head; :func:`keras_sapa.models.sapa_overhead` reports
      the difference.
    - Every layer SAPA does not replace keeps KerasCV's name and place in the model
      (``low_level_feature_conv``, ``segmentation_head_norm``, ...), so a stock
      ``DeepLabV3Plus``'s weights load into all of it:
      :func:`keras_sapa.models.load_stock_weights`.

    Args:
        backbone: a KerasCV backbone (``keras.Model`` with ``pyramid_level_inputs``
            holding ``"P2"`` to ``"P5"``), for example
            ``keras_cv.models.ResNetV2Backbone(stackwise_filters=[64, 128, 256, 512],
            stackwise_blocks=[3, 4, 6, 3], stackwise_strides=[1, 2, 2, 2],
            include_rescaling=True, input_shape=(512, 512, 3))``. Pretrained weights
            are an option where the network is reachable:
            ``keras_cv.models.ResNet50V2Backbone.from_preset("resnet50_v2_imagenet",
            input_shape=(512, 512, 3))``; nothing here downloads anything.
        num_classes: number of classes, background included.
        upsampler: the layer of each of the three stages (stage 0: P5 -> P4, named
            ``sapa_upsampling_P4``; 1: ``_P3``; 2: ``_P2``), any layer called as
            ``layer(x, guide)``: ``None`` for SAPA-G, K=5, d=64, LayerNorm (the
            paper's configuration); a dict of SAPA arguments (the ones left out take
            those defaults), e.g. ``{"variant": "bilinear", "embedding_dim": 32}``; a
            serialized layer or a layer used as a template; a list of these, one per
            stage; or a callable ``upsampler(stage_index, name=name)`` that returns the
            stage's layer (see :mod:`keras_sapa.models`). ``"identity"`` needs the
            encoder output and every guide to have the same width. With SAPA's
            ``implementation="auto"``, ``model.export`` writes builtin ops only.
        projection_filters: filters of the 1x1 projection of P2.
        spatial_pyramid_pooling: optional layer applied to P5; defaults to
            ``keras_cv.layers.SpatialPyramidPooling(dilation_rates=[6, 12, 18])``.
        segmentation_head: optional layer mapping the concatenated decoder features
            (at P2 resolution) to the output; defaults to the stock head above.
        **kwargs: ``keras.Model`` arguments (``name``, ...).
    """

    ARGUMENTS = ("num_classes", "projection_filters")
    NESTED = ("backbone", "spatial_pyramid_pooling", "segmentation_head")

    def __init__(
        self,
        backbone,
        num_classes,
        upsampler=None,
        projection_filters=48,
        spatial_pyramid_pooling=None,
        segmentation_head=None,
        **kwargs,
    ):
        check_backbone(backbone, _LEVELS, "SAPADeepLabV3Plus")
        num_classes = _checks.positive_int("num_classes", num_classes)
        projection_filters = _checks.positive_int("projection_filters", projection_filters)
        factory = Upsampler(upsampler, DEFAULT_UPSAMPLER, "SAPADeepLabV3Plus")
        factory.start_stages(len(_GUIDE_LEVELS))

        inputs = backbone.input
        features = pyramid_extractor(backbone, _LEVELS)(inputs)

        if spatial_pyramid_pooling is None:
            spatial_pyramid_pooling = keras_cv.layers.SpatialPyramidPooling(
                dilation_rates=[6, 12, 18]
            )
        x = spatial_pyramid_pooling(features["P5"])

        # The low-level branch exactly as KerasCV builds it (unnamed Sequential, layer
        # names and call order kept), so stock weights load into it.
        low_level_feature_projector = keras.Sequential(
            [
                keras.layers.Conv2D(
                    name="low_level_feature_conv",
                    filters=projection_filters,
                    kernel_size=1,
                    padding="same",
                    use_bias=False,
                ),
                keras.layers.BatchNormalization(name="low_level_feature_norm"),
                keras.layers.ReLU(name="low_level_feature_relu"),
            ]
        )
        low_level = low_level_feature_projector(features["P2"])

        x = factory.chain(
            x, [(f"sapa_upsampling_P{lv}", lv, features[f"P{lv}"]) for lv in _GUIDE_LEVELS]
        )

        combined = keras.layers.Concatenate(axis=-1)([x, low_level])

        if segmentation_head is None:
            segmentation_head = keras.Sequential(
                [
                    keras.layers.Conv2D(
                        name="segmentation_head_conv",
                        filters=256,
                        kernel_size=1,
                        padding="same",
                        use_bias=False,
                    ),
                    keras.layers.BatchNormalization(name="segmentation_head_norm"),
                    keras.layers.ReLU(name="segmentation_head_relu"),
                    keras.layers.UpSampling2D(size=(4, 4), interpolation="bilinear"),
                    # float32 classifier: a softmax in float16 loses the small classes.
                    keras.layers.Conv2D(
                        name="segmentation_output",
                        filters=num_classes,
                        kernel_size=1,
                        use_bias=False,
                        padding="same",
                        activation="softmax",
                        dtype="float32",
                    ),
                ]
            )
        outputs = segmentation_head(combined)

        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        self._keep_arguments(locals())
        # A plain object holding the stage layers (the replaced step: the stock 8x
        # bilinear one): not tracked, so the layers keep their one path in saved files.
        self._upsampler = factory
