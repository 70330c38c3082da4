"""Stock weights into a SAPA model: every layer SAPA leaves unchanged."""

import os
import tempfile
import warnings

import keras

__all__ = ["load_stock_weights"]


def _is_model(obj):
    return isinstance(obj, keras.Model)


def _relative_paths(layer):
    """Variables of ``layer`` by their path below the layer (``lateral_conv_P3/kernel``)."""
    marker = f"{layer.name}/"
    out = {}
    for variable in layer.weights:
        path = variable.path
        index = path.find(marker)
        out[path[index + len(marker) :] if index >= 0 else path] = variable
    return out


def _load_renamed_classes(target, source):
    """Top-level sublayers with one name in both models but different classes (a SAPA
    pyramid in place of the stock one): Keras files them under different keys, so copy
    their variables by path below the layer, which holds the stock layer names."""
    for layer in target.layers:
        try:
            stock_layer = source.get_layer(layer.name)
        except ValueError:
            continue
        if type(stock_layer) is type(layer) or stock_layer is layer:
            continue
        mine = _relative_paths(layer)
        for path, variable in _relative_paths(stock_layer).items():
            if path in mine and tuple(mine[path].shape) == tuple(variable.shape):
                mine[path].assign(variable)


def load_stock_weights(model, stock):
    """Load a stock model's weights into a keras_sapa model, SAPA layers excepted.

    The keras_sapa models are built from the stock constructors' layers, with the stock
    layer names and the stock model's structure (the order of its layers, the
    attributes holding them), SAPA layers added where the fixed upsampling was. Keras 3
    weight files address a layer by that structure (class name and position, because
    auto-generated names differ between two instances of one model), so
    ``model.load_weights(stock_file, skip_mismatch=True)`` fills every unchanged layer
    and leaves the SAPA layers as they are. This function does that for a stock model
    in memory or a ``.weights.h5`` file, and also loads backbone into backbone when
    both models have one (a KerasHub task holding a SAPA backbone files it under
    another class name than the stock backbone). Given a model in memory, sublayers of
    the same name but another class (the SAPA feature pyramid ``fpn``) get their
    variables by name (path below the layer).

    Args:
        model: a keras_sapa model (or a KerasHub task holding a keras_sapa backbone).
        stock: the stock model (built, same backbone and head configuration), or the
            path of its ``.weights.h5`` file (for example a KerasHub preset's
            ``model.weights.h5``, which holds the backbone's weights: pass the SAPA
            backbone as ``model`` then).

    Returns:
        ``model``, with the stock weights loaded.
    """
    if not _is_model(model):
        raise ValueError(
            "`model` must be a keras.Model. "
            f"Received: model={model!r} (of type {type(model).__name__})"
        )
    if isinstance(stock, (str, os.PathLike)):
        if not os.fspath(stock).endswith(".weights.h5"):
            raise ValueError(
                f"`stock` must be a model or a `.weights.h5` file. Received: stock={stock!r}"
            )
        pairs = [(model, os.fspath(stock))]
    elif _is_model(stock):
        pairs = [(model, stock)]
        sub, stock_sub = getattr(model, "backbone", None), getattr(stock, "backbone", None)
        if _is_model(sub) and _is_model(stock_sub) and sub is not stock_sub:
            pairs.append((sub, stock_sub))
    else:
        raise ValueError(
            "`stock` must be a keras.Model or the path of a `.weights.h5` file. "
            f"Received: stock={stock!r} (of type {type(stock).__name__})"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for i, (target, source) in enumerate(pairs):
            if _is_model(source):
                path = os.path.join(tmp, f"stock_{i}.weights.h5")
                source.save_weights(path)
            else:
                path = source
            with warnings.catch_warnings():
                # The SAPA layers (and, at the task level, a backbone filed under
                # another class name) have no counterpart: expected, not a failure.
                warnings.simplefilter("ignore")
                target.load_weights(path, skip_mismatch=True)
            if _is_model(source):
                _load_renamed_classes(target, source)
    return model
