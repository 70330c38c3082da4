"""The SAPADeform layer: SAPA with dynamic point selection (SAPA-D)."""

import keras
from keras import ops

from keras_sapa.layers import GuidedUpsampler
from keras_sapa.layers import nearest_up
from keras_sapa.ops import _checks
from keras_sapa.ops import _deform

NORMS = ("group", None)
# torch.nn.GroupNorm(32, C) with its default epsilon, as in the official module.
NORM_GROUPS = 32
NORM_EPSILON = 1e-5


def pixel_shuffle(t, up_factor):
    """PyTorch's ``pixel_shuffle`` on a channels-last tensor: ``(B, H, W, C*s*s)`` ->
    ``(B, s*H, s*W, C)``, output channel ``c`` at ``(h*s + a, w*s + b)`` taken from
    input channel ``c*s*s + a*s + b`` at ``(h, w)``. (TensorFlow's ``depth_to_space``
    reads channel ``(a*s + b)*C + c`` instead, which would scramble official weights.)
    """
    s = up_factor
    if s == 1:
        return t
    shape = ops.shape(t)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    c = channels // (s * s)
    t = ops.reshape(t, (batch, height, width, c, s, s))
    t = ops.transpose(t, (0, 1, 4, 2, 5, 3))  # (B, H, a, W, b, C)
    return ops.reshape(t, (batch, height * s, width * s, c))


@keras.saving.register_keras_serializable(package="keras_sapa")
class SAPADeform(GuidedUpsampler):
    """SAPA-D: similarity-aware upsampling with dynamic point selection.

    The extension of SAPA (github.com/tiny-smart/sapa, module ``SAPADeform``): instead
    of a fixed ``K x K`` window, every output point predicts where its ``num_points``
    points per group lie (offsets from its anchor ``(i // s, j // s)``, predicted from
    ``x``), samples the key and the raw ``x`` there bilinearly, and mixes the samples
    with a softmax over the points of each group of their similarity to the guide's
    query. Semantics, parameter names and initialisation follow the official module
    (``shared/SAPA_SPEC.md``, section "SAPA-D"), so its weights give the same numbers
    here (:func:`keras_sapa.convert.load_torch_state_dict`).

    Written with ``keras.ops``: runs on TensorFlow, JAX and PyTorch.

    Call it as ``layer(x, guide)``:

    - ``x``: ``(B, H, W, Cx)`` (``(B, Cx, H, W)`` with ``channels_first``), the
      low-resolution feature to upsample; ``Cx`` must be divisible by ``groups``.
    - ``guide``: ``(B, up_factor*H, up_factor*W, Cy)``; any other spatial size is an
      error.
    - returns ``(B, up_factor*H, up_factor*W, Cx)``.

    Args:
        up_factor: integer upsampling factor ``s >= 1``.
        num_points: points per group ``P`` (official ``num_point``).
        groups: ``G``; the key, query and ``x`` channels are split into ``G`` groups,
            each with its own points.
        embedding_dim: query/key width per group ``E`` (query and key have ``G*E``
            channels).
        use_bias: biases of the three projections (official ``qkv_bias``).
        high_offset: predict ``s*s`` offsets per low-resolution point, rearranged to
            high resolution in PyTorch's ``pixel_shuffle`` order (official default);
            when False, one offset per low-resolution point, repeated (nearest).
        norm: ``"group"`` (GroupNorm with 32 groups, epsilon 1e-5, on ``x`` for the
            key and offsets and on the guide for the query; official ``norm=True``)
            or ``None`` (official default).
        data_format: ``"channels_last"``, ``"channels_first"`` or ``None`` (Keras's
            ``image_data_format``).
        kernel_initializer: initialiser of the projection kernels (official: normal,
            stddev 0.02, so every point starts on its anchor).
        bias_initializer: initialiser of the biases (official: zeros).
        implementation: ``"auto"``, ``"xla"``, ``"patches"`` (the builtin
            formulation, gather-based sampling in ``keras.ops``) or ``"compiled"``
            (the fused C++ CPU kernels on every backend); ``"auto"`` follows the one
            dispatch rule of :mod:`keras_sapa.ops`, as :class:`keras_sapa.SAPA` does.
        **kwargs: base ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).

    Weights are sublayers named after the official parameters: ``q`` (guide ->
    ``G*E``), ``k`` (``x`` -> ``G*E``), ``offset`` (``x`` -> ``2*G*P*s*s`` with
    ``high_offset``, else ``2*G*P``, its output channels in the official order) and,
    with ``norm="group"``, ``norm_x`` and ``norm_y``.
    """

    @staticmethod
    def _default_kernel_initializer():
        return keras.initializers.RandomNormal(stddev=0.02)

    def __init__(
        self,
        up_factor=2,
        num_points=9,
        groups=4,
        embedding_dim=32,
        use_bias=True,
        high_offset=True,
        norm=None,
        data_format=None,
        kernel_initializer=None,
        bias_initializer="zeros",
        implementation="auto",
        **kwargs,
    ):
        super().__init__(
            up_factor=up_factor,
            use_bias=use_bias,
            data_format=data_format,
            implementation=implementation,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.num_points = _checks.positive_int("num_points", num_points)
        self.groups = _checks.positive_int("groups", groups)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        self.high_offset = bool(high_offset)
        if norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}. Received: norm={norm!r}")
        self.norm = norm
        for name in ("norm_x", "norm_y", "q", "k", "offset"):
            setattr(self, name, None)

    # ------------------------------------------------------------------ shapes
    @property
    def offset_channels(self):
        """Output channels of the ``offset`` projection."""
        per_point = 2 * self.groups * self.num_points
        return per_point * self.up_factor**2 if self.high_offset else per_point

    def _check_shapes(self, x_shape, guide_shape):
        x_shape, guide_shape = self._channels_last_shapes(x_shape, guide_shape)
        cx, cy = x_shape[3], guide_shape[3]
        if cx % self.groups:
            raise ValueError(
                f"The channels of `x` must be divisible by groups={self.groups}. "
                f"Received: x channels={cx}"
            )
        if self.norm == "group":
            for name, c in (("x", cx), ("guide", cy)):
                if c % NORM_GROUPS:
                    raise ValueError(
                        f"norm='group' uses GroupNorm with {NORM_GROUPS} groups, which "
                        f"must divide the channels of `{name}`. Received: {name} "
                        f"channels={c}"
                    )
        return x_shape, guide_shape

    # ------------------------------------------------------------------- build
    def _make_norm(self, name, channels):
        if self.norm is None:
            return None
        layer = keras.layers.GroupNormalization(
            groups=NORM_GROUPS,
            axis=-1,
            epsilon=NORM_EPSILON,
            dtype=self.dtype_policy,
            name=name,
        )
        layer.build((None, None, None, channels))
        return layer

    def build(self, x_shape, guide_shape):
        x_shape, guide_shape = self._check_shapes(x_shape, guide_shape)
        cx, cy = x_shape[3], guide_shape[3]
        width = self.groups * self.embedding_dim
        self._projections_made = 0
        self.norm_x = self._make_norm("norm_x", cx)
        self.norm_y = self._make_norm("norm_y", cy)
        self.q = self._make_dense("q", width, cy)
        self.k = self._make_dense("k", width, cx)
        self.offset = self._make_dense("offset", self.offset_channels, cx)
        self.built = True

    def compute_output_shape(self, x_shape, guide_shape):
        x_shape, guide_shape = self._check_shapes(x_shape, guide_shape)
        return self._output_shape(x_shape, guide_shape, x_shape[3])

    # -------------------------------------------------------------------- call
    def _offsets(self, x_n):
        """Offsets from the (normalised) channels-last ``x_n``."""
        raw = self.offset(x_n)
        if self.high_offset:
            return pixel_shuffle(raw, self.up_factor)
        return nearest_up(raw, self.up_factor)

    def sampling_offsets(self, x):
        """The offsets the layer predicts for input ``x`` (in the layer's data format),
        channels last ``(B, s*H, s*W, 2*G*P)``: channel ``2k`` the width shift,
        ``2k + 1`` the height shift of point ``k = g*P + p``, in low-resolution pixels
        from the anchor ``(i // s, j // s)``: where the points of every output pixel
        are sampled. They depend on ``x`` only."""
        if self.data_format == "channels_first":
            x = ops.transpose(x, (0, 2, 3, 1))
        x_n = x if self.norm_x is None else self.norm_x(x)
        return self._offsets(x_n)

    def call(self, x, guide, training=None):
        x, guide = self._inputs_channels_last(x, guide)
        x_n = x if self.norm_x is None else self.norm_x(x)
        y_n = guide if self.norm_y is None else self.norm_y(guide)
        query = self.q(y_n)
        key = self.k(x_n)
        offsets = self._offsets(x_n)
        out = _deform.sapa_deform(
            query,
            key,
            x,
            offsets,
            num_points=self.num_points,
            up_factor=self.up_factor,
            groups=self.groups,
            implementation=self.implementation,
            training=training,
        )
        return self._output_in_data_format(out)

    # ------------------------------------------------------------------ config
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_points": self.num_points,
                "groups": self.groups,
                "embedding_dim": self.embedding_dim,
                "high_offset": self.high_offset,
                "norm": self.norm,
            }
        )
        return config
