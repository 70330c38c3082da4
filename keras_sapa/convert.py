"""Import and export SAPA weights in the naming of the official PyTorch code.

A model trained with the official PyTorch SAPA gives the same numbers here once its
weights are copied into a :class:`keras_sapa.SAPA` layer built with the same settings
(or, for the extended code's deformable module ``SAPADeform``, into a
:class:`keras_sapa.SAPADeform` layer). This module does the copying:

- :func:`load_torch_state_dict` copies a PyTorch state dict (names to tensors or NumPy
  arrays) into a built layer;
- :func:`from_torch_checkpoint` reads a ``.pth`` file (needs ``torch``:
  ``pip install keras_sapa[torch]``), works out the layer's settings from the weights,
  builds the layer and loads it;
- :func:`to_torch_state_dict` goes the other way, giving NumPy arrays in PyTorch
  layouts;
- :func:`find_sapa_prefixes` lists where SAPA modules sit in a bigger model's state
  dict, for the ``prefix`` argument.

Naming map
----------
Each sublayer of :class:`keras_sapa.SAPA` is named after the official module
attribute, so a PyTorch entry ``<prefix><name>.<param>`` maps to one Keras variable:

- ``norm_x.weight``, ``norm_x.bias`` -> ``layer.norm_x.gamma``, ``layer.norm_x.beta``
  (likewise ``norm_y``); shape ``(C,)`` on both sides.
- ``<name>.weight`` -> ``layer.<name>.kernel`` for the projections ``q``, ``k``,
  ``qy``, ``qx``, ``gate`` and ``v``: torch ``(out, in)`` (Linear) or
  ``(out, in, 1, 1)`` (1x1 Conv2d) becomes the Keras ``(in, out)``, a transpose.
- ``<name>.bias`` -> ``layer.<name>.bias``, ``(out,)`` on both sides; absent when the
  module has ``qkv_bias=False`` (``use_bias=False`` here).

Which official module maps to which layer settings:

- The NeurIPS module ``SAPA`` (``SAPA.py``) has ``norm_y``, ``norm_x`` (LayerNorm),
  ``q``, ``k`` (Linear): ``variant="bilinear"``, ``norm="layer"``.
- Its experimental module ``SAPAExp`` adds ``q_mode="gate"`` (``qy``, ``qx``, ``gate``
  in place of ``q``: ``variant="gated"``), ``q_mode="cat"`` (``q`` taking
  ``Cy + Cx`` inputs, the guide's channels first as in ``torch.cat([y, up(x)])``:
  ``variant="concat"``) and ``v`` (``v_embed`` or ``out_dim``: ``output_dim``,
  ``value_projection=True``).
- The extended code (github.com/tiny-smart/sapa, ``sapa_base.py``) uses 1x1
  ``Conv2d`` projections, weights ``(out, in, 1, 1)``, and ``GroupNorm(32, C)``
  (``norm="group"``, ``norm_groups=32``), or no norm (``norm=None``). Both weight
  layouts are accepted on import, whatever the layer's ``data_format``: the layer's
  weights do not depend on it.
- Its deformable module ``SAPADeform`` (``sapa_deform.py``: ``q``, ``k``, ``offset``
  1x1 convs, ``norm_y``, ``norm_x`` GroupNorm(32) when ``norm=True``) maps to
  :class:`keras_sapa.SAPADeform` (``num_points=num_point``, ``use_bias=qkv_bias``,
  ``norm="group"`` or ``None``, same ``groups``, ``embedding_dim``, ``up_factor``,
  ``high_offset``): ``offset.weight`` ``(out, in, 1, 1)`` becomes the kernel of the
  layer's ``offset`` Dense with the same output-channel order (the layer rearranges
  the offsets in ``pixel_shuffle``'s order, so no channel permutation is needed), and
  so for every data format.
- A norm without affine parameters (``elementwise_affine=False``) has no entries; the
  Keras norm's scale 1 and offset 0 are the same thing, so load such a dict with
  ``strict=False`` into a freshly built layer.

What counts as an error
-----------------------
Only the entries under ``prefix`` are looked at; everything else in the dict (the
backbone, the decoder, other upsamplers) is ignored. Under the prefix, every entry
the layer has must be present (*missing* otherwise), every entry present must be one
the layer has (*unexpected* otherwise) and have the right shape (*wrong shape*). The
official modules register no buffers, so no entry is treated as bookkeeping and
silently skipped: anything under the prefix that the layer cannot hold (a
``num_batches_tracked``, an ``offset.weight``) is reported as unexpected, because
ignoring it could hide a checkpoint of a different module. With ``strict=True`` (the
default) all problems are raised together in one ``ValueError`` and nothing is
assigned; with ``strict=False`` one warning lists them and the entries that fit are
loaded.
"""

import collections.abc
import os
import warnings

import numpy as np

__all__ = [
    "find_sapa_prefixes",
    "from_torch_checkpoint",
    "load_torch_state_dict",
    "to_torch_state_dict",
]

# Registration order of the official modules (SAPA.py, SAPAExp.py, sapa_base.py), so
# an exported dict lists its entries the way torch's state_dict() would.
# SAPADeform registers norm_y, norm_x, q, k, offset: the same order with offset last.
_MODULE_ORDER = ("norm_y", "norm_x", "q", "qy", "qx", "gate", "k", "v", "offset")
_NORM_NAMES = ("norm_y", "norm_x")
_PROJECTION_NAMES = ("q", "qy", "qx", "gate", "k", "v", "offset")
_KNOWN_ENTRIES = frozenset(
    f"{module}.{param}" for module in _MODULE_ORDER for param in ("weight", "bias")
)
_FORMATS = ("linear", "conv")
_WRAPPER_KEYS = ("state_dict", "model")

_TORCH_MISSING = (
    "Reading a PyTorch checkpoint needs PyTorch, which is an optional dependency of "
    "keras_sapa. Install it with `pip install keras_sapa[torch]` (or `pip install "
    "torch`), or load the state dict yourself and pass it to "
    "keras_sapa.convert.load_torch_state_dict."
)


# --------------------------------------------------------------------- helpers
def _normalise_prefix(prefix):
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a string. Received: prefix={prefix!r}")
    if prefix and not prefix.endswith("."):
        prefix += "."
    return prefix


def _to_numpy(value):
    """A NumPy array from a NumPy array, a torch tensor (without importing torch) or
    anything ``np.asarray`` takes; None when it is not numeric."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        tensor = value.detach().cpu()
        try:
            value = tensor.numpy()
        except (TypeError, RuntimeError):
            # bfloat16 and float8 tensors have no NumPy dtype: go through float32.
            value = tensor.float().numpy()
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything unconvertible is reported, not raised
        return None
    if array.dtype.kind not in "fiu":
        return None
    return array


def _entries_under(state_dict, prefix):
    """{relative name: value} of the entries whose name starts with ``prefix``."""
    if not isinstance(state_dict, collections.abc.Mapping):
        raise TypeError(
            "`state_dict` must be a mapping of parameter names to arrays or tensors. "
            f"Received: an object of type {type(state_dict).__name__}"
        )
    return {
        key[len(prefix) :]: value
        for key, value in state_dict.items()
        if isinstance(key, str) and key.startswith(prefix)
    }


def _is_deform(layer):
    from keras_sapa.deform import SAPADeform

    return isinstance(layer, SAPADeform)


def _check_sapa_layer(layer, action):
    from keras_sapa.layers import SAPA

    if not (isinstance(layer, SAPA) or _is_deform(layer)):
        raise TypeError(
            "`layer` must be a keras_sapa.SAPA or keras_sapa.SAPADeform layer. "
            f"Received: {type(layer).__name__}"
        )
    if not layer.built:
        raise ValueError(
            f"The {type(layer).__name__} layer {layer.name!r} is not built yet, so it "
            f"has no weights to {action}. Build it first: call it once on inputs, "
            "`layer(x, guide)`, or call `layer.build(x_shape, guide_shape)`; or use "
            "keras_sapa.convert.from_torch_checkpoint, which builds the layer from the "
            "checkpoint's shapes."
        )


def _slots(layer):
    """[(relative torch name, keras variable, kind)] of a built layer, in the order
    of the official modules. ``kind`` is ``"norm"``, ``"kernel"`` or ``"bias"``."""
    slots = []
    for name in _MODULE_ORDER:
        sub = getattr(layer, name, None)
        if sub is None:
            continue
        if name in _NORM_NAMES:
            slots.append((f"{name}.weight", sub.gamma, "norm"))
            slots.append((f"{name}.bias", sub.beta, "norm"))
        else:
            slots.append((f"{name}.weight", sub.kernel, "kernel"))
            if sub.use_bias:
                slots.append((f"{name}.bias", sub.bias, "bias"))
    return slots


def _torch_kernel_shapes(keras_shape):
    c_in, c_out = keras_shape
    return (c_out, c_in), (c_out, c_in, 1, 1)


def _convert_in(array, variable, kind):
    """The Keras value for a torch entry, or None when its shape does not fit."""
    target = tuple(variable.shape)
    if kind == "kernel":
        linear, conv = _torch_kernel_shapes(target)
        if array.shape == conv:
            array = array[:, :, 0, 0]
        elif array.shape != linear:
            return None
        return np.ascontiguousarray(array.T)
    if array.shape != target:
        return None
    return array


def _expected_description(variable, kind):
    if kind == "kernel":
        linear, conv = _torch_kernel_shapes(tuple(variable.shape))
        return f"{linear} (Linear) or {conv} (1x1 Conv2d)"
    return str(tuple(variable.shape))


def _guess_variant(names):
    """The variant a set of relative entry names looks like, or None."""
    modules = {name.split(".", 1)[0] for name in names}
    if modules & {"qy", "qx", "gate"}:
        return "gated"
    if "q" in modules:
        return "bilinear or concat"
    if modules and modules <= set(_NORM_NAMES):
        return "identity"
    return None


def _deform_hints(layer, missing, unexpected, present, mismatched):
    hints = []
    unexpected_modules = {name.split(".", 1)[0] for name in unexpected}
    missing_modules = {name.split(".", 1)[0] for name in missing}
    present_modules = {name.split(".", 1)[0] for name in present}
    if "offset" not in present_modules:
        hints.append(
            "The entries have no `offset` projection: they look like a SAPA module, "
            "load them into keras_sapa.SAPA."
        )
    if unexpected_modules & set(_NORM_NAMES) and layer.norm is None:
        hints.append("The checkpoint has norms (norm=True); build the layer with norm='group'.")
    if missing_modules & set(_NORM_NAMES) and not present_modules & set(_NORM_NAMES):
        hints.append("The checkpoint has no norms (norm=False); build the layer with norm=None.")
    biases_present = any(
        n.endswith(".bias") and n.split(".", 1)[0] in _PROJECTION_NAMES for n in present
    )
    if biases_present and not layer.use_bias:
        hints.append("The checkpoint has biases (qkv_bias=True); build with use_bias=True.")
    if not biases_present and layer.use_bias and missing:
        hints.append("The checkpoint has no biases (qkv_bias=False); build with use_bias=False.")
    if any(name.startswith("offset.") for name, _ in mismatched):
        hints.append(
            "The `offset` conv has 2*groups*num_point*up_factor**2 output channels with "
            "high_offset=True, 2*groups*num_point without; the layer expects "
            f"{layer.offset_channels} (groups={layer.groups}, num_points="
            f"{layer.num_points}, up_factor={layer.up_factor}, "
            f"high_offset={layer.high_offset})."
        )
    if any(name.split(".", 1)[0] in ("q", "k") for name, _ in mismatched):
        hints.append(
            "`q` and `k` have groups*embedding_dim outputs; the layer has "
            f"groups={layer.groups}, embedding_dim={layer.embedding_dim}."
        )
    return hints


def _hints(layer, missing, unexpected, present, mismatched=()):
    if _is_deform(layer):
        return _deform_hints(layer, missing, unexpected, present, mismatched)
    hints = []
    unexpected_modules = {name.split(".", 1)[0] for name in unexpected}
    missing_modules = {name.split(".", 1)[0] for name in missing}
    if "offset" in unexpected_modules:
        hints.append(
            "An `offset` projection belongs to the deformable SAPA-D module "
            "(sapa_deform.py): load it into keras_sapa.SAPADeform."
        )
    guessed = _guess_variant(present)
    if guessed and layer.variant not in guessed.split(" or "):
        hints.append(
            f"The entries look like variant={guessed!r}; the layer has variant={layer.variant!r}."
        )
    if unexpected_modules & set(_NORM_NAMES) and layer.norm is None:
        hints.append("The checkpoint has norms; build the layer with norm='layer' or 'group'.")
    if missing_modules & set(_NORM_NAMES) and not (
        {n.split(".", 1)[0] for n in present} & set(_NORM_NAMES)
    ):
        hints.append(
            "The checkpoint has no norm entries: build the layer with norm=None, or, if "
            "its norms had no affine parameters, load with strict=False."
        )
    if "v" in unexpected_modules and getattr(layer, "v", None) is None:
        hints.append(
            "The checkpoint has a value projection `v`; build the layer with "
            "output_dim=<v's output width> or value_projection=True."
        )
    if "v" in missing_modules and "v" not in {n.split(".", 1)[0] for n in present}:
        hints.append(
            "The layer has a value projection `v` that the checkpoint lacks; build it "
            "without output_dim / value_projection."
        )
    projection_bias = [
        n for n in unexpected if n.endswith(".bias") and n.split(".", 1)[0] in _PROJECTION_NAMES
    ]
    if projection_bias and not layer.use_bias:
        hints.append("The checkpoint has projection biases; build the layer with use_bias=True.")
    missing_bias = [
        n for n in missing if n.endswith(".bias") and n.split(".", 1)[0] in _PROJECTION_NAMES
    ]
    if missing_bias and not any(
        n.endswith(".bias") and n.split(".", 1)[0] in _PROJECTION_NAMES for n in present
    ):
        hints.append(
            "The checkpoint has no projection biases (qkv_bias=False); build the layer "
            "with use_bias=False."
        )
    return hints


def _describe_layer(layer):
    if _is_deform(layer):
        return (
            f"groups={layer.groups}, num_points={layer.num_points}, "
            f"embedding_dim={layer.embedding_dim}, up_factor={layer.up_factor}, "
            f"high_offset={layer.high_offset}, norm={layer.norm!r}, "
            f"use_bias={layer.use_bias}"
        )
    return (
        f"variant={layer.variant!r}, norm={layer.norm!r}, use_bias={layer.use_bias}, "
        f"value projection {'yes' if layer.v is not None else 'no'}"
    )


# ------------------------------------------------------------------------ load
def load_torch_state_dict(layer, state_dict, prefix="", strict=True):
    """Copies PyTorch SAPA weights into a built :class:`keras_sapa.SAPA` layer, or
    those of the official ``SAPADeform`` into a built :class:`keras_sapa.SAPADeform`.

    Args:
        layer: a built ``keras_sapa.SAPA`` (or ``SAPADeform``) whose settings match
            the PyTorch module (variant, norm, use_bias, output_dim /
            value_projection, channel counts, ``embedding_dim``; for SAPADeform
            groups, num_points, up_factor, high_offset, norm, use_bias; see the
            module docstring for the map).
        state_dict: a mapping of entry names to torch tensors or NumPy arrays, e.g.
            ``module.state_dict()`` or ``torch.load(path)["state_dict"]``. torch is
            not imported: tensors are converted with ``.detach().cpu().numpy()``.
        prefix: the module's path inside a bigger model, e.g.
            ``"decoder.upsample1."`` (a trailing dot is added when missing). Only
            the entries under it are read; the rest of the dict is ignored.
        strict: when True (default), missing, unexpected (under ``prefix``) or
            mis-shaped entries raise one ``ValueError`` listing them all, and no
            weight is changed. When False, one warning lists them and every entry
            that fits is loaded.

    Returns:
        A dict with the lists ``"loaded"``, ``"missing"``, ``"unexpected"`` and
        ``"mismatched"`` of full entry names (prefix included).

    Raises:
        ValueError: the layer is not built, or (strict) the dict does not fit it.
        TypeError: ``layer`` is not a SAPA or SAPADeform layer or ``state_dict`` not
            a mapping.
    """
    _check_sapa_layer(layer, "load into")
    prefix = _normalise_prefix(prefix)
    entries = _entries_under(state_dict, prefix)
    slots = _slots(layer)
    expected = {name for name, _, _ in slots}

    assignments, missing, mismatched = [], [], []
    for name, variable, kind in slots:
        if name not in entries:
            missing.append(name)
            continue
        array = _to_numpy(entries[name])
        value = None if array is None else _convert_in(array, variable, kind)
        if value is None:
            got = "not a numeric array" if array is None else f"got {tuple(array.shape)}"
            mismatched.append((name, f"{got}, expected {_expected_description(variable, kind)}"))
            continue
        assignments.append((name, variable, value))
    unexpected = [name for name in entries if name not in expected]

    if missing or unexpected or mismatched:
        lines = [
            f"Cannot load the PyTorch state dict into the {type(layer).__name__} layer "
            f"{layer.name!r}"
            + (f" (prefix {prefix!r})" if prefix else "")
            + f": the layer has {_describe_layer(layer)}."
        ]
        if missing:
            lines.append("Missing entries: " + ", ".join(prefix + n for n in missing))
        if unexpected:
            lines.append("Unexpected entries: " + ", ".join(prefix + n for n in unexpected))
        if mismatched:
            lines.append("Entries of the wrong shape:")
            lines.extend(f"  {prefix + n}: {why}" for n, why in mismatched)
        if not entries:
            found = find_sapa_prefixes(state_dict)
            lines.append(
                f"No entry starts with the prefix {prefix!r}."
                + (f" SAPA modules found at prefixes: {found}." if found else "")
            )
        else:
            lines.extend(_hints(layer, missing, unexpected, set(entries), mismatched))
        message = "\n".join(lines)
        if strict:
            raise ValueError(message)
        warnings.warn(
            message + "\nLoaded the entries that fit (strict=False).", UserWarning, stacklevel=2
        )

    for _, variable, value in assignments:
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return {
        "loaded": [prefix + name for name, _, _ in assignments],
        "missing": [prefix + name for name in missing],
        "unexpected": [prefix + name for name in unexpected],
        "mismatched": [prefix + name for name, _ in mismatched],
    }


# ---------------------------------------------------------------------- export
def to_torch_state_dict(layer, prefix="", format=None):
    """The layer's weights as a PyTorch-style state dict of NumPy arrays.

    Args:
        layer: a built ``keras_sapa.SAPA`` or ``keras_sapa.SAPADeform``.
        prefix: prepended to every name (a trailing dot is added when missing).
        format: ``"linear"`` for the official modules' ``nn.Linear`` weights
            ``(out, in)``, ``"conv"`` for the extended code's 1x1 ``nn.Conv2d``
            weights ``(out, in, 1, 1)``. ``None`` (default): ``"linear"`` for a
            ``SAPA`` layer, ``"conv"`` for a ``SAPADeform`` (the official
            ``SAPADeform`` has 1x1 convs).

    Returns:
        A dict, in the official modules' order, of float32 (or the variables' dtype)
        C-contiguous NumPy arrays. For a torch module:
        ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
    """
    _check_sapa_layer(layer, "export")
    if format is None:
        format = "conv" if _is_deform(layer) else "linear"
    if format not in _FORMATS:
        raise ValueError(f"`format` must be one of {_FORMATS}. Received: format={format!r}")
    prefix = _normalise_prefix(prefix)
    out = {}
    for name, variable, kind in _slots(layer):
        value = np.array(variable.numpy())
        if kind == "kernel":
            value = np.ascontiguousarray(value.T)
            if format == "conv":
                value = value[:, :, None, None]
        out[prefix + name] = value
    return out


# ---------------------------------------------------------------- checkpoints
def find_sapa_prefixes(state_dict):
    """Prefixes under which a state dict holds what looks like a SAPA module (the
    official ``SAPADeform`` included: its ``offset`` projection is an official name).

    A prefix qualifies when its direct entries (``<prefix><module>.<param>``) all
    have official SAPA names and include ``k.weight`` or ``norm_x.weight``. Use it
    to find the ``prefix`` for :func:`load_torch_state_dict` in a whole model.
    """
    direct = collections.defaultdict(set)
    for key in state_dict:
        if not isinstance(key, str):
            continue
        parts = key.rsplit(".", 2)
        if len(parts) < 2:
            continue
        module, param = parts[-2], parts[-1]
        prefix = parts[0] + "." if len(parts) == 3 else ""
        direct[prefix].add(f"{module}.{param}")
    return sorted(
        prefix
        for prefix, names in direct.items()
        if names <= _KNOWN_ENTRIES and names & {"k.weight", "norm_x.weight"}
    )


def _describe_path(path):
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "(file object)"


def _unwrap(checkpoint):
    """The state dict inside a checkpoint saved as {"state_dict": ...} or
    {"model": ...} (possibly nested), or the checkpoint itself."""
    for _ in range(4):
        if not isinstance(checkpoint, collections.abc.Mapping):
            break
        inner = next(
            (
                checkpoint[key]
                for key in _WRAPPER_KEYS
                if isinstance(checkpoint.get(key), collections.abc.Mapping)
            ),
            None,
        )
        if inner is None:
            break
        checkpoint = inner
    if not isinstance(checkpoint, collections.abc.Mapping):
        # ValueError, not TypeError: the argument was a path; its file's content is bad.
        raise ValueError(  # noqa: TRY004
            "The checkpoint is not a state dict (a mapping of names to tensors) nor a "
            "dict wrapping one under 'state_dict' or 'model'. Received: an object of "
            f"type {type(checkpoint).__name__}"
        )
    return checkpoint


def _shape(entries, name):
    array = _to_numpy(entries[name]) if name in entries else None
    return None if array is None else tuple(array.shape)


def _out_in(entries, module):
    """(outputs, inputs) of the Linear or 1x1 conv ``module`` among ``entries``, or None."""
    shape = _shape(entries, f"{module}.weight")
    return (shape[0], shape[1]) if shape is not None and len(shape) in (2, 4) else None


def _check_given_channels(x_channels, guide_channels, cx, cy):
    """``ValueError`` where the caller's channel counts differ from the weights'."""
    for name, given, inferred in (
        ("x_channels", x_channels, cx),
        ("guide_channels", guide_channels, cy),
    ):
        if given is not None and inferred is not None and given != inferred:
            raise ValueError(
                f"`{name}` does not match the checkpoint's weights. "
                f"Received: {name}={given}, the weights have {inferred}."
            )


def _infer_settings(entries, x_channels, guide_channels, variant):
    """(layer kwargs, x_channels, guide_channels) read off the entries' shapes,
    checked against what the caller gave."""
    shapes = {name: _shape(entries, name) for name in entries}

    def norm_size(module):
        shape = shapes.get(f"{module}.weight")
        return shape[0] if shape is not None and len(shape) == 1 else None

    def first(*values):
        return next((v for v in values if v is not None), None)

    k, q, qy, qx, gate, v = (_out_in(entries, m) for m in ("k", "q", "qy", "qx", "gate", "v"))
    cx = first(norm_size("norm_x"), k and k[1], qx and qx[1], gate and gate[1], v and v[1])
    cy = first(norm_size("norm_y"), qy and qy[1])
    _check_given_channels(x_channels, guide_channels, cx, cy)
    cx = first(x_channels, cx)
    cy = first(guide_channels, cy)

    settings = {}
    if variant is None:
        if qy or qx or gate:
            variant = "gated"
        elif q:
            # q takes Cy inputs (bilinear) or Cy + Cx (concat, guide first).
            if cy is None and cx is not None and q[1] <= cx:
                cy = q[1]
            if cy is not None:
                variant = "concat" if cx is not None and q[1] == cy + cx else "bilinear"
        elif not k and (norm_size("norm_x") or norm_size("norm_y")):
            variant = "identity"
        if variant is not None:
            settings["variant"] = variant
    if cy is None and q:
        if variant == "bilinear":
            cy = q[1]
        elif variant == "concat" and cx is not None:
            cy = q[1] - cx
    if variant == "identity":
        cx, cy = first(cx, cy), first(cy, cx)

    projections = [
        shape
        for name, shape in shapes.items()
        if name.split(".", 1)[0] in _PROJECTION_NAMES
        and name.endswith(".weight")
        and shape is not None
    ]
    if not any(name.split(".", 1)[0] in _NORM_NAMES for name in entries):
        settings["norm"] = None
    elif projections:
        settings["norm"] = "group" if any(len(s) == 4 for s in projections) else "layer"
    if projections:
        settings["use_bias"] = any(
            name.endswith(".bias") and name.split(".", 1)[0] in _PROJECTION_NAMES
            for name in entries
        )
    embedding = first(k and k[0], q and q[0], qy and qy[0], qx and qx[0])
    if embedding is not None:
        settings["embedding_dim"] = embedding
    if v is not None:
        settings["output_dim"] = v[0]
        settings["value_projection"] = True
    return settings, variant, cx, cy


def _build_and_load(layer, x_channels, guide_channels, state_dict, prefix):
    """``layer`` built for ``x_channels`` and ``guide_channels`` (in its data format)
    and loaded from the module's entries under ``prefix``, every entry required."""
    if layer.data_format == "channels_first":
        layer.build((None, x_channels, None, None), (None, guide_channels, None, None))
    else:
        layer.build((None, None, None, x_channels), (None, None, None, guide_channels))
    load_torch_state_dict(layer, state_dict, prefix=prefix, strict=True)
    return layer


def _deform_from_entries(entries, state_dict, prefix, x_channels, guide_channels, layer_kwargs):
    """Builds and loads a :class:`keras_sapa.SAPADeform` from the entries of an
    official ``SAPADeform`` module. ``groups``, ``up_factor`` and ``high_offset`` leave
    no unambiguous trace in the weights: they are the official defaults (4, 2, True)
    unless given; ``embedding_dim`` and ``num_points`` follow from them."""
    from keras_sapa.deform import SAPADeform

    q, k, offset = (_out_in(entries, m) for m in ("q", "k", "offset"))
    cx = offset[1] if offset else None
    cy = q[1] if q else None
    _check_given_channels(x_channels, guide_channels, cx, cy)
    if q is None or k is None or offset is None:
        raise ValueError(
            f"The SAPADeform entries under {prefix!r} need q.weight, k.weight and "
            f"offset.weight. Received: {sorted(entries)}"
        )
    kwargs = dict(layer_kwargs)
    groups = kwargs.setdefault("groups", 4)
    up_factor = kwargs.setdefault("up_factor", 2)
    high_offset = kwargs.setdefault("high_offset", True)
    per_point = 2 * groups * (up_factor**2 if high_offset else 1)
    if q[0] % groups or offset[0] % per_point:
        raise ValueError(
            f"The SAPADeform weights under {prefix!r} (q: {q[0]} outputs, offset: "
            f"{offset[0]} outputs) do not fit groups={groups}, up_factor={up_factor}, "
            f"high_offset={high_offset}: pass the module's groups, up_factor and "
            "high_offset."
        )
    kwargs.setdefault("embedding_dim", q[0] // groups)
    kwargs.setdefault("num_points", offset[0] // per_point)
    kwargs.setdefault("norm", "group" if "norm_x.weight" in entries else None)
    kwargs.setdefault("use_bias", "offset.bias" in entries)
    return _build_and_load(SAPADeform(**kwargs), cx, cy, state_dict, prefix)


def from_torch_checkpoint(
    path, prefix="", x_channels=None, guide_channels=None, weights_only=True, **layer_kwargs
):
    """Builds a :class:`keras_sapa.SAPA` from a PyTorch ``.pth`` file and loads it
    (a :class:`keras_sapa.SAPADeform` when the entries have an ``offset`` projection,
    the official ``SAPADeform``; pass its ``groups``, ``up_factor`` and
    ``high_offset`` when they are not the official defaults 4, 2 and True).

    The layer's settings are read off the weights where they can be: the variant
    (``qy``/``qx``/``gate``: gated; ``q`` taking ``Cy`` inputs: bilinear, ``Cy + Cx``:
    concat; norms only: identity), ``norm`` (none without norm entries; ``"group"``
    with 1x1 conv weights, the extended code; ``"layer"`` with Linear weights),
    ``use_bias``, ``embedding_dim``, ``output_dim`` / ``value_projection`` (from
    ``v``) and both channel counts. ``up_factor`` and ``kernel_size`` leave no trace
    in the weights: pass them when the module did not use the official defaults (2
    and 5, the layer's defaults too). Anything in ``layer_kwargs`` wins over what is
    inferred (for an identity checkpoint, whose norms could be LayerNorm or
    GroupNorm, ``norm`` is the layer's default ``"layer"`` unless given).

    Args:
        path: the ``.pth`` file (anything ``torch.load`` takes). A bare state dict,
            or a dict wrapping one under ``"state_dict"`` or ``"model"``.
        prefix: the module's path inside the saved model, e.g. ``"decoder.up1."``;
            :func:`find_sapa_prefixes` lists the candidates.
        x_channels, guide_channels: channels of ``x`` and of the guide, checked
            against the weights; needed only when the weights cannot tell (a concat
            ``q`` without norms).
        weights_only: passed to ``torch.load``. Keep True unless the file comes from
            a trusted source and holds objects beyond tensors and containers: False
            runs the pickled code in it.
        **layer_kwargs: other ``keras_sapa.SAPA`` arguments (``up_factor``,
            ``kernel_size``, ``data_format``, ``name``, ...).

    Returns:
        The built, loaded layer.

    Raises:
        ImportError: torch is not installed.
        ValueError: no SAPA entries under ``prefix``, settings that cannot be
            inferred, or weights that do not fit the layer.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(_TORCH_MISSING) from err
    from keras_sapa.layers import SAPA

    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    state_dict = _unwrap(checkpoint)
    prefix = _normalise_prefix(prefix)
    # Only the module's own entries (official names right under the prefix) tell its
    # settings; anything else under the prefix is reported by the loader.
    entries = {
        name: value
        for name, value in _entries_under(state_dict, prefix).items()
        if name in _KNOWN_ENTRIES
    }
    if not entries:
        found = find_sapa_prefixes(state_dict)
        raise ValueError(
            f"The checkpoint {_describe_path(path)} has no SAPA entries (norm_x, k, "
            f"q, ... weights) right under the prefix {prefix!r}. "
            + (
                f"SAPA modules found at prefixes: {found}."
                if found
                else "No SAPA module was found in it."
            )
        )

    if "offset.weight" in entries:
        return _deform_from_entries(
            entries, state_dict, prefix, x_channels, guide_channels, layer_kwargs
        )
    settings, variant, cx, cy = _infer_settings(
        entries, x_channels, guide_channels, layer_kwargs.get("variant")
    )
    if variant is None:
        raise ValueError(
            f"Cannot tell the SAPA variant of the entries under {prefix!r} "
            f"({sorted(entries)}): pass variant=..., or guide_channels, which tells "
            "a bilinear `q` (guide channels in) from a concat one (guide + x channels)."
        )
    if cx is None or cy is None:
        raise ValueError(
            f"Cannot tell the channel counts of the entries under {prefix!r}: pass "
            f"x_channels and guide_channels. Inferred: x_channels={cx}, "
            f"guide_channels={cy}."
        )

    kwargs = dict(settings)
    kwargs.update(layer_kwargs)
    return _build_and_load(SAPA(**kwargs), cx, cy, state_dict, prefix)
