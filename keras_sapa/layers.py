"""The SAPA layer: similarity-aware point affiliation upsampling (Lu et al., 2022)."""

import warnings

import keras
from keras import ops

from keras_sapa import ops as sapa_ops
from keras_sapa.ops import _checks

VARIANTS = ("identity", "bilinear", "gated", "concat")
# PyTorch's LayerNorm/GroupNorm default; Keras's 1e-3 would break parity with
# checkpoints trained with the official code.
NORM_EPSILON = 1e-5


def nearest_up(t, up_factor):
    """Nearest-neighbour upsampling by an integer factor, channels last."""
    if up_factor == 1:
        return t
    return ops.repeat(ops.repeat(t, up_factor, axis=1), up_factor, axis=2)


class GuidedUpsampler(keras.layers.Layer):
    """What the guided upsamplers (:class:`SAPA`, :class:`keras_sapa.SAPADeform`) share:
    the call convention ``layer(x, guide)`` with ``guide`` exactly ``up_factor`` times
    ``x`` spatially, ``data_format``, ``implementation`` (and the ``supports_jit`` that
    follows it), the norms of ``x`` and the guide (``norm_x``, ``norm_y``), the
    projections' initialisers and biases, the shape checks, ``build``, ``call`` and
    ``get_config``. A subclass checks its channels (:meth:`_check_channels`), builds
    its projections (:meth:`_build_projections`), computes in channels last from the
    normalised inputs (:meth:`_upsample`) and names its own config keys
    (:attr:`CONFIG_KEYS`)."""

    #: The ``norm`` values the subclass accepts.
    NORMS = ("layer", "group", None)
    #: The subclass's own constructor arguments (attributes of the same names), which
    #: :meth:`get_config` stores beside the shared ones.
    CONFIG_KEYS = ()

    @staticmethod
    def _default_kernel_initializer():
        return keras.initializers.TruncatedNormal(stddev=0.02)

    def __init__(
        self,
        up_factor,
        norm,
        use_bias=True,
        data_format=None,
        implementation="auto",
        kernel_initializer=None,
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.up_factor = _checks.check_up_factor(up_factor)
        if norm not in self.NORMS:
            raise ValueError(f"`norm` must be one of {self.NORMS}. Received: norm={norm!r}")
        self.norm = norm
        self.norm_x = self.norm_y = None
        self.use_bias = bool(use_bias)
        if data_format is None:
            data_format = keras.config.image_data_format()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "`data_format` must be 'channels_last' or 'channels_first'. "
                f"Received: data_format={data_format!r}"
            )
        self.data_format = data_format
        self.implementation = _checks.check_implementation(implementation)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            if kernel_initializer is not None
            else self._default_kernel_initializer()
        )
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self._projections_made = 0

    @property
    def supports_jit(self):
        """Whether Keras may compile this layer with XLA, read when a model is compiled
        (no GPU probe at construction) and following :attr:`implementation` (so
        :func:`keras_sapa.ops.set_implementation` keeps it right). False on TensorFlow
        for ``"compiled"`` (XLA cannot hold the custom op) and for ``"auto"`` where the
        compiled GPU op runs, so that ``fit`` reaches it; see
        :func:`keras_sapa.ops.layer_supports_jit`."""
        return self._supports_jit and sapa_ops.layer_supports_jit(self.implementation)

    @supports_jit.setter
    def supports_jit(self, value):
        self._supports_jit = bool(value)

    # ------------------------------------------------------------------ shapes
    def _to_channels_last(self, shape):
        shape = tuple(shape)
        if self.data_format == "channels_first" and len(shape) == 4:
            return (shape[0], shape[2], shape[3], shape[1])
        return shape

    def _check_shapes(self, x_shape, guide_shape):
        """Both shapes checked (rank 4, ``guide`` = ``up_factor`` x ``x``, channels
        known and fit for the subclass and the norm) and in channels-last order."""
        x_shape = self._to_channels_last(_checks.check_rank4("x", x_shape))
        guide_shape = self._to_channels_last(_checks.check_rank4("guide", guide_shape))
        _checks.check_pair("guide", guide_shape, "x", x_shape, self.up_factor)
        cx, cy = x_shape[3], guide_shape[3]
        if cx is None or cy is None:
            raise ValueError(
                "The channel dimensions of `x` and `guide` must be known. "
                f"Received: x.shape={x_shape}, guide.shape={guide_shape} "
                f"(data_format={self.data_format!r})"
            )
        self._check_channels(cx, cy)
        if self.norm == "group":
            for name, c in (("x", cx), ("guide", cy)):
                if c % self.norm_groups:
                    raise ValueError(
                        f"norm='group' uses GroupNorm with norm_groups={self.norm_groups} "
                        f"groups, which must divide the channels of `{name}`. Received: "
                        f"norm_groups={self.norm_groups}, {name} channels={c}"
                    )
        return x_shape, guide_shape

    def _check_channels(self, x_channels, guide_channels):
        """``ValueError`` for channel counts the subclass cannot take."""

    def _output_channels(self, x_channels):
        """Channels of the output, given those of ``x``."""
        return x_channels

    def compute_output_shape(self, x_shape, guide_shape):
        x_shape, guide_shape = self._check_shapes(x_shape, guide_shape)

        def high(axis):
            if guide_shape[axis] is not None:
                return guide_shape[axis]
            return None if x_shape[axis] is None else self.up_factor * x_shape[axis]

        batch = x_shape[0] if x_shape[0] is not None else guide_shape[0]
        channels = self._output_channels(x_shape[3])
        if self.data_format == "channels_first":
            return (batch, channels, high(1), high(2))
        return (batch, high(1), high(2), channels)

    # ------------------------------------------------------------------- build
    def build(self, x_shape, guide_shape):
        x_shape, guide_shape = self._check_shapes(x_shape, guide_shape)
        cx, cy = x_shape[3], guide_shape[3]
        self._projections_made = 0
        self.norm_x = self._make_norm("norm_x", cx)
        self.norm_y = self._make_norm("norm_y", cy)
        self._build_projections(cx, cy)
        self.built = True

    def _build_projections(self, x_channels, guide_channels):
        """Builds the subclass's projections (:meth:`_make_dense`), after the norms."""
        raise NotImplementedError

    def _make_norm(self, name, channels):
        """The built norm sublayer ``name`` for ``norm`` (None for ``norm=None``)."""
        if self.norm is None:
            return None
        if self.norm == "layer":
            layer = keras.layers.LayerNormalization(
                axis=-1, epsilon=NORM_EPSILON, dtype=self.dtype_policy, name=name
            )
        else:
            layer = keras.layers.GroupNormalization(
                groups=self.norm_groups,
                axis=-1,
                epsilon=NORM_EPSILON,
                dtype=self.dtype_policy,
                name=name,
            )
        layer.build((None, None, None, channels))
        return layer

    def _sublayer_initializer(self):
        """A fresh copy of ``kernel_initializer`` for the next projection.

        One Keras random initializer instance returns the same values at every call
        (an unseeded one draws its seed once, when it is created), so sharing it would
        start every projection with identical kernels. Each projection gets its own
        copy; a seeded initializer stays reproducible, its seed offset by the
        projection's index."""
        initializer = keras.initializers.deserialize(
            keras.initializers.serialize(self.kernel_initializer)
        )
        seed = getattr(initializer, "seed", None)
        if isinstance(seed, int) and not isinstance(seed, bool):
            initializer.seed = seed + self._projections_made
        self._projections_made += 1
        return initializer

    def _make_dense(self, name, units, in_channels):
        layer = keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=self._sublayer_initializer(),
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name=name,
        )
        layer.build((None, None, None, in_channels))
        return layer

    # -------------------------------------------------------------------- call
    def _channels_last(self, t):
        return ops.transpose(t, (0, 2, 3, 1)) if self.data_format == "channels_first" else t

    def _normalised(self, t, norm):
        return t if norm is None else norm(t)

    def call(self, x, guide, training=None):
        # Sizes checked: static sizes are concrete in eager mode and under ``jax.jit``
        # (a bad size raises ValueError here); sizes unknown in a TensorFlow graph are
        # checked at run time.
        x, guide = self._channels_last(x), self._channels_last(guide)
        _checks.check_pair("guide", tuple(guide.shape), "x", tuple(x.shape), self.up_factor)
        guide = sapa_ops._checked_at_run_time(guide, "guide", x, "x", self.up_factor)
        x_n = self._normalised(x, self.norm_x)
        y_n = self._normalised(guide, self.norm_y)
        out = ops.cast(self._upsample(x, x_n, y_n, training), self.compute_dtype)
        if self.data_format == "channels_first":
            out = ops.transpose(out, (0, 3, 1, 2))
        return out

    def _upsample(self, x, x_n, y_n, training):
        """The channels-last output from ``x``, its normalised ``x_n`` and the
        normalised guide ``y_n``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config):
        """Rebuilds a layer from :meth:`get_config`, on any backend.

        A config saved with ``implementation="compiled"`` still loads where the
        compiled kernels are missing, or on a backend that has none: the layer then
        runs on ``"auto"``, the backend's builtin path, and one warning says so.
        Constructing the layer with ``implementation="compiled"`` directly keeps the
        request, and calling it without the kernels raises ``RuntimeError``.
        """
        config = dict(config)
        if config.get("implementation") == "compiled" and not sapa_ops.compiled_available():
            warnings.warn(
                f"{cls.__name__} layer {config.get('name')!r} was saved with "
                "implementation='compiled', but the keras_sapa compiled kernels are not "
                f"available on the {keras.config.backend()!r} backend here: it runs "
                "with implementation='auto' (same numbers, builtin path).",
                stacklevel=2,
            )
            config["implementation"] = "auto"
        return super().from_config(config)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "up_factor": self.up_factor,
                "norm": self.norm,
                "use_bias": self.use_bias,
                "data_format": self.data_format,
                "implementation": self.implementation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                **{key: getattr(self, key) for key in self.CONFIG_KEYS},
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPA(GuidedUpsampler):
    """Similarity-Aware Point Affiliation upsampling.

    Written with ``keras.ops``: the same class, config and weights work with
    ``KERAS_BACKEND=tensorflow``, ``jax`` and ``torch``.

    Upsamples a low-resolution decoder feature ``x`` by ``up_factor``, guided by a
    high-resolution encoder feature ``guide``: every output point is a softmax-weighted
    mix of the ``kernel_size x kernel_size`` points of ``x`` around it, the weights
    being the similarity between the guide point (query) and those points (keys).
    Semantics, parameter names and initialisation follow the official PyTorch module
    (see ``shared/SAPA_SPEC.md``), so a model gives the same numbers with the same
    weights.

    Call it as ``layer(x, guide)``:

    - ``x``: ``(B, H, W, Cx)`` (or ``(B, Cx, H, W)`` with ``channels_first``).
    - ``guide``: ``(B, up_factor*H, up_factor*W, Cy)``; any other spatial size is an
      error (no silent crop or resize).
    - returns ``(B, up_factor*H, up_factor*W, output_dim or Cx)``.

    Args:
        up_factor: integer upsampling factor ``s >= 1``.
        kernel_size: odd window size ``K`` over the low-resolution map.
        embedding_dim: width ``d`` of query and key (unused by ``"identity"``).
        variant: ``"identity"`` (SAPA-I: normalised features compared directly; needs
            ``Cx == Cy``), ``"bilinear"`` (SAPA-B: ``Dense_q(norm(guide))`` against
            ``Dense_k(norm(x))``), ``"gated"`` (SAPA-G: the query mixes the guide and
            the upsampled raw ``x`` through a learned sigmoid gate) or ``"concat"``
            (the official ablation: ``Dense_q`` of the concatenated guide and
            upsampled ``x``).
        norm: ``"layer"`` (LayerNorm over channels, epsilon 1e-5, the NeurIPS code),
            ``"group"`` (GroupNorm, the extended code) or ``None``.
        norm_groups: number of groups for ``norm="group"``; must divide both
            channel counts.
        output_dim: output channels; when set and different from ``Cx``, a value
            projection ``Dense_v(norm(x))`` is added.
        value_projection: add the value projection even when ``output_dim`` is
            ``None`` or equals ``Cx`` (official ``v_embed``).
        use_bias: whether the projections have biases (official ``qkv_bias``).
        data_format: ``"channels_last"``, ``"channels_first"`` or ``None`` (Keras's
            ``image_data_format``). With ``channels_first`` inputs and output are NCHW.
        implementation: ``"auto"``, ``"patches"``, ``"xla"`` or ``"compiled"``; see
            :mod:`keras_sapa.ops` for their meaning on each backend and the rule that
            resolves ``"auto"``: the compiled kernels for training and eager calls,
            builtin ops in anything that may be exported. For fast inference that
            is not exported, call ``keras_sapa.ops.set_implementation(model,
            "compiled")``.
        kernel_initializer: initialiser of the projection kernels (official: truncated
            normal, stddev 0.02).
        bias_initializer: initialiser of the projection biases (official: zeros).
        **kwargs: base ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    ``use_bias``, ``data_format``, ``implementation`` and the initialisers are keyword
    arguments, with their defaults, of the base class :class:`GuidedUpsampler` shared
    with :class:`keras_sapa.SAPADeform`.

    Weights are sublayers named after the official parameters: ``norm_x``,
    ``norm_y``, ``q``, ``k`` (bilinear, concat), ``qy``, ``qx``, ``gate`` (gated),
    ``v`` (value projection).
    """

    CONFIG_KEYS = (
        "kernel_size",
        "embedding_dim",
        "variant",
        "norm_groups",
        "output_dim",
        "value_projection",
    )

    def __init__(
        self,
        up_factor=2,
        kernel_size=5,
        embedding_dim=64,
        variant="bilinear",
        norm="layer",
        norm_groups=32,
        output_dim=None,
        value_projection=False,
        **kwargs,
    ):
        super().__init__(up_factor=up_factor, norm=norm, **kwargs)
        self.kernel_size = _checks.check_kernel_size(kernel_size)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}. Received: variant={variant!r}")
        self.variant = variant
        self.norm_groups = _checks.positive_int("norm_groups", norm_groups)
        self.output_dim = (
            None if output_dim is None else _checks.positive_int("output_dim", output_dim)
        )
        self.value_projection = bool(value_projection)
        for name in ("q", "k", "qy", "qx", "gate", "v"):
            setattr(self, name, None)

    # ------------------------------------------------------------------ shapes
    def _check_channels(self, x_channels, guide_channels):
        if self.variant == "identity" and x_channels != guide_channels:
            raise ValueError(
                "variant='identity' compares `x` and `guide` directly, so they need the "
                f"same number of channels. Received: x channels={x_channels}, guide "
                f"channels={guide_channels}"
            )

    def _has_value_projection(self, cx):
        return self.value_projection or (self.output_dim is not None and self.output_dim != cx)

    def _output_channels(self, x_channels):
        return self.output_dim or x_channels

    # ------------------------------------------------------------------- build
    def _build_projections(self, cx, cy):
        d = self.embedding_dim
        if self.variant == "bilinear":
            self.q = self._make_dense("q", d, cy)
        elif self.variant == "concat":
            self.q = self._make_dense("q", d, cy + cx)
        elif self.variant == "gated":
            self.qy = self._make_dense("qy", d, cy)
            self.qx = self._make_dense("qx", d, cx)
            self.gate = self._make_dense("gate", 1, cx)
        if self.variant != "identity":
            self.k = self._make_dense("k", d, cx)
        if self._has_value_projection(cx):
            self.v = self._make_dense("v", self.output_dim or cx, cx)

    # -------------------------------------------------------------------- call
    def _upsample(self, x, x_n, y_n, training):
        s = self.up_factor
        if self.variant == "identity":
            query, key = y_n, x_n
        else:
            key = self.k(x_n)
            if self.variant == "bilinear":
                query = self.q(y_n)
            elif self.variant == "concat":
                # The official module concatenates the *raw* upsampled x.
                query = self.q(ops.concatenate([y_n, nearest_up(x, s)], axis=-1))
            else:  # gated
                gate = nearest_up(ops.sigmoid(self.gate(x_n)), s)
                query = gate * self.qy(y_n) + (1.0 - gate) * self.qx(nearest_up(x, s))
        value = x if self.v is None else self.v(x_n)
        return sapa_ops.sapa(
            query,
            key,
            value,
            self.kernel_size,
            s,
            implementation=self.implementation,
            training=training,
        )
