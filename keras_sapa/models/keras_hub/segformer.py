"""SegFormer (KerasHub) whose all-MLP decoder upsamples with SAPA, as the SAPA paper does."""

import keras
import keras_hub

from keras_sapa.models._common import UpsamplerModel
from keras_sapa.models._common import bilinear_macs
from keras_sapa.models._common import check_image_encoder
from keras_sapa.models._upsampler import SAPA_B_SEGFORMER
from keras_sapa.models._upsampler import Upsampler
from keras_sapa.ops import _checks

DEFAULT_UPSAMPLER = SAPA_B_SEGFORMER


def _check_encoder(image_encoder, model_name):
    check_image_encoder(image_encoder, model_name, "keras_hub.models.MiTBackbone")
    pyramid = image_encoder.pyramid_outputs
    if len(pyramid) < 2:
        raise ValueError(
            f"`image_encoder` of {model_name} must have a `pyramid_outputs` dict of at "
            "least two stages, finest first, as KerasHub's MiTBackbone has. Received "
            f"an encoder of type {type(image_encoder).__name__} with "
            f"pyramid_outputs={pyramid!r}"
        )
    dims = getattr(image_encoder, "hidden_dims", None)
    if dims is None or len(dims) != len(pyramid):
        raise ValueError(
            f"`image_encoder` of {model_name} must have `hidden_dims`, one per pyramid "
            f"stage. Received: hidden_dims={dims!r} for {len(pyramid)} stages"
        )


def _stage_strides(image_encoder, keys):
    """Cumulative stride of each pyramid stage (from the encoder, or static shapes)."""
    steps = getattr(image_encoder, "layerwise_strides", None)
    if steps is not None and len(steps) == len(keys):
        strides, total = [], 1
        for step in steps:
            total *= int(step)
            strides.append(total)
        return strides
    height = image_encoder.input.shape[1]
    sizes = [image_encoder.pyramid_outputs[k].shape[1] for k in keys]
    if height is None or any(size is None for size in sizes):
        raise ValueError(
            "SAPASegFormerBackbone needs the encoder's stage strides: an encoder with "
            "`layerwise_strides` (as MiTBackbone has) or a static `image_shape`."
        )
    return [height // size for size in sizes]


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPASegFormerBackbone(UpsamplerModel, keras_hub.models.Backbone):
    """KerasHub's ``SegFormerBackbone`` with SAPA upsampling in its all-MLP decoder.

    The stock decoder projects each encoder stage to ``projection_filters`` channels
    (``Dense`` layers ``linear_{hidden_dim}``), resizes stages 2 to 4 bilinearly to the
    finest stage's size, concatenates (coarsest first) and fuses them (1x1 convolution,
    batch norm, ReLU). Here the bilinear resizing is SAPA, placed as in the official
    SAPA SegFormer head: each coarser stage climbs to the finest one 2x at a time, each
    step guided by the projected feature of the stage it arrives at::

        s4 = SAPA(SAPA(SAPA(p4, guide=p3), guide=p2), guide=p1)   # sapa_P4_to_P3, ..
        s3 = SAPA(SAPA(p3, guide=p2), guide=p1)                    # sapa_P3_to_P2, ..
        s2 = SAPA(p2, guide=p1)                                    # sapa_P2_to_P1
        out = linear_fuse(concat[s4, s3, s2, p1])

    (six SAPA layers for MiT's four stages). Every other layer is the stock one, with
    the stock name and place, so a stock ``SegFormerBackbone``'s weights load into all
    but the SAPA layers (:func:`keras_sapa.models.load_stock_weights`), and the model
    is a drop-in ``backbone`` for ``keras_hub.models.SegFormerImageSegmenter``.

    Args:
        image_encoder: the encoder, ``keras_hub.models.MiTBackbone`` (built from its
            constructor, or ``MiTBackbone.from_preset(...)`` where the network is
            reachable; nothing here downloads anything).
        projection_filters: decoder width (256 for SegFormer-B1 and up, 32 for tiny
            test models).
        upsampler: the layer of each 2x step, any layer called as ``layer(x, guide)``
            (stages in the order drawn above: 0 is ``sapa_P4_to_P3``, 1
            ``sapa_P4_to_P2``, ..., the last ``sapa_P2_to_P1``): ``None`` for SAPA-B,
            K=5, d=32, LayerNorm, the paper's SegFormer configuration (``{"variant":
            "gated"}`` gives SAPA-G, the paper's best on ADE20K); a dict of SAPA
            arguments (the ones left out take those defaults); a serialized layer or
            a layer used as a template; a list of these, one per stage; or a callable
            ``upsampler(stage_index, name=name)`` (see :mod:`keras_sapa.models`).
        **kwargs: ``keras_hub.models.Backbone`` arguments (``name``, ``dtype``).
    """

    ARGUMENTS = ("projection_filters",)
    NESTED = ("image_encoder",)

    def __init__(
        self,
        image_encoder,
        projection_filters,
        upsampler=None,
        **kwargs,
    ):
        _check_encoder(image_encoder, "SAPASegFormerBackbone")
        projection_filters = _checks.positive_int("projection_filters", projection_filters)
        factory = Upsampler(upsampler, DEFAULT_UPSAMPLER, "SAPASegFormerBackbone")

        # === Layers and graph, in the stock model's order ===
        inputs = keras.layers.Input(shape=image_encoder.input.shape[1:])
        self.feature_extractor = keras.Model(image_encoder.inputs, image_encoder.pyramid_outputs)
        features = self.feature_extractor(inputs)
        keys = list(features)
        strides = _stage_strides(image_encoder, keys)
        for i in range(1, len(keys)):
            if strides[i] != 2 * strides[i - 1]:
                raise ValueError(
                    "SAPASegFormerBackbone upsamples 2x per stage: each encoder stage "
                    "must have twice the stride of the previous one. Received stage "
                    f"strides {dict(zip(keys, strides, strict=False))}"
                )

        self.mlp_blocks = [
            keras.layers.Dense(projection_filters, name=f"linear_{dim}")
            for dim in image_encoder.hidden_dims
        ]
        self.concat = keras.layers.Concatenate(axis=-1)
        self.linear_fuse = keras.Sequential(
            [
                keras.layers.Conv2D(filters=projection_filters, kernel_size=1, use_bias=False),
                keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9),
                keras.layers.Activation("relu"),
            ]
        )
        projected = [mlp(features[key]) for mlp, key in zip(self.mlp_blocks, keys, strict=False)]

        factory.start_stages(len(keys) * (len(keys) - 1) // 2)
        upsampled = {0: projected[0]}
        for i in range(len(keys) - 1, 0, -1):  # coarsest stream first, as officially
            stages = [
                (f"sapa_{keys[i]}_to_{keys[j]}", strides[j].bit_length() - 1, projected[j])
                for j in range(i - 1, -1, -1)
            ]
            upsampled[i] = factory.chain(projected[i], stages)
        self.sapa_blocks = [layer for layer, _ in factory.stages]
        multi_layer_outs = [upsampled[i] for i in range(len(keys))]
        concatenated = self.concat(multi_layer_outs[::-1])
        seg = self.linear_fuse(concatenated)

        super().__init__(inputs=inputs, outputs=seg, **kwargs)

        # === Config ===
        self._keep_arguments(locals())
        self._upsampler = factory
        self._finest_level = strides[0].bit_length() - 1
        self._num_stages = len(keys)

    # ------------------------------------------------------------------ counting
    def replaced_upsampling_macs(self, image_hw):
        """Multiply-adds of the stock bilinear resizing of stages 2.. to the finest
        stage (4 per output value)."""
        macs = bilinear_macs(image_hw, self._finest_level, self.projection_filters)
        return macs * (self._num_stages - 1)


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPASegFormer(keras_hub.models.SegFormerImageSegmenter):
    """``keras_hub.models.SegFormerImageSegmenter`` on a :class:`SAPASegFormerBackbone`.

    Everything is KerasHub's segmenter (dropout, 1x1 classifier, bilinear resize of
    the logits to the image, ``fit``, ``preprocessor``); only the decoder's upsampling
    is SAPA. Build it from an encoder::

        encoder = keras_hub.models.MiTBackbone(...)   # or MiTBackbone.from_preset(...)
        model = keras_sapa.models.SAPASegFormer(backbone=encoder, num_classes=150)

    or pass a ready :class:`SAPASegFormerBackbone` (then leave ``projection_filters``
    and ``upsampler`` out). Like the stock segmenter it returns logits
    (``from_logits=True`` losses).

    Args:
        backbone: a ``keras_hub.models.MiTBackbone`` (any encoder with
            ``pyramid_outputs`` and ``hidden_dims``), wrapped in a
            :class:`SAPASegFormerBackbone`; or a :class:`SAPASegFormerBackbone`.
        num_classes: number of classes.
        projection_filters: decoder width (``None``: 256, SegFormer-B1 and up).
        upsampler: the decoder's upsampler, as for :class:`SAPASegFormerBackbone`
            (``None``: SAPA-B, K=5, d=32, LayerNorm).
        preprocessor: optional ``keras_hub`` preprocessor, as for the stock segmenter.
        **kwargs: ``keras_hub.models.Task`` arguments (``name``).
    """

    def __init__(
        self,
        backbone,
        num_classes,
        projection_filters=None,
        upsampler=None,
        preprocessor=None,
        **kwargs,
    ):
        decoder_args = {
            key: value
            for key, value in (
                ("projection_filters", projection_filters),
                ("upsampler", upsampler),
            )
            if value is not None
        }
        num_classes = _checks.positive_int("num_classes", num_classes)
        if isinstance(backbone, SAPASegFormerBackbone):
            if decoder_args:
                raise ValueError(
                    "Pass either a SAPASegFormerBackbone or the decoder arguments to "
                    f"build one, not both. Received: backbone={backbone.name!r} and "
                    f"{decoder_args}"
                )
        else:
            _check_encoder(backbone, "SAPASegFormer")
            decoder_args.setdefault("projection_filters", 256)
            backbone = SAPASegFormerBackbone(image_encoder=backbone, **decoder_args)
        super().__init__(
            backbone=backbone, num_classes=num_classes, preprocessor=preprocessor, **kwargs
        )
