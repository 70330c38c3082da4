"""The SAPADeform layer: SAPA with dynamic point selection (SAPA-D)."""

import keras
from keras import ops

from keras_sapa.layers import GuidedUpsampler
from keras_sapa.layers import nearest_up
from keras_sapa.ops import _checks
from keras_sapa.ops import _deform

# torch.nn.GroupNorm(32, C) (with the epsilon of every norm here), as in the official
# module.
NORM_GROUPS = 32


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

    ``use_bias``, ``data_format``, ``implementation`` and the initialisers are keyword
    arguments, with their defaults, of the base class
    :class:`keras_sapa.layers.GuidedUpsampler` shared with :class:`keras_sapa.SAPA`.

    Weights are sublayers named after the official parameters: ``q`` (guide ->
    ``G*E``), ``k`` (``x`` -> ``G*E``), ``offset`` (``x`` -> ``2*G*P*s*s`` with
    ``high_offset``, else ``2*G*P``, its output channels in the official order) and,
    with ``norm="group"``, ``norm_x`` and ``norm_y``.
    """

    NORMS = ("group", None)
    CONFIG_KEYS = ("num_points", "groups", "embedding_dim", "high_offset")
    #: The official module's GroupNorm groups (not a constructor argument).
    norm_groups = NORM_GROUPS

    @staticmethod
    def _default_kernel_initializer():
        return keras.initializers.RandomNormal(stddev=0.02)

    def __init__(
        self,
        up_factor=2,
        num_points=9,
        groups=4,
        embedding_dim=32,
        high_offset=True,
        norm=None,
        **kwargs,
    ):
        super().__init__(up_factor=up_factor, norm=norm, **kwargs)
        self.num_points = _checks.positive_int("num_points", num_points)
        self.groups = _checks.positive_int("groups", groups)
        self.embedding_dim = _checks.positive_int("embedding_dim", embedding_dim)
        self.high_offset = bool(high_offset)
        self.q = self.k = self.offset = None

    # ------------------------------------------------------------------ shapes
    @property
    def offset_channels(self):
        """Output channels of the ``offset`` projection."""
        per_point = 2 * self.groups * self.num_points
        return per_point * self.up_factor**2 if self.high_offset else per_point

    def _check_channels(self, x_channels, guide_channels):
        if x_channels % self.groups:
            raise ValueError(
                f"The channels of `x` must be divisible by groups={self.groups}. "
                f"Received: x channels={x_channels}"
            )

    # ------------------------------------------------------------------- build
    def _build_projections(self, cx, cy):
        width = self.groups * self.embedding_dim
        self.q = self._make_dense("q", width, cy)
        self.k = self._make_dense("k", width, cx)
        self.offset = self._make_dense("offset", self.offset_channels, cx)

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
        return self._offsets(self._normalised(self._channels_last(x), self.norm_x))

    def _upsample(self, x, x_n, y_n, training):
        return _deform.sapa_deform(
            self.q(y_n),
            self.k(x_n),
            x,
            self._offsets(x_n),
            num_points=self.num_points,
            up_factor=self.up_factor,
            groups=self.groups,
            implementation=self.implementation,
            training=training,
        )
