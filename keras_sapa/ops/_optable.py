"""The keras_sapa op set as data: one descriptor per compiled op.

Every layer of the native stack reads this table instead of spelling the ops again:

- ``custom_ops/build.py`` turns it into ``custom_ops/sapa/cc/sapa_optable.inc`` (a
  generated C++ header, committed, with a test that it is current), which the TensorFlow
  op registrations (``custom_ops/sapa/cc/ops/sapa_ops.cc``: inputs, outputs, attributes,
  one generic shape function) and the CPU and GPU kernel adapters (the generic shape
  checks and output allocation of ``custom_ops/sapa/cc/kernels/sapa_op_kernels.h``, the
  kernel registrations) include;
- the Python side reads the same names: the TensorFlow op names, the XLA FFI targets and
  the ``torch.library`` op names of each op's bindings, and which op is whose gradient.

Nothing here imports anything beyond the standard library, so the build script (which
must run without the package's dependencies) can load this file by path.

Shapes are written with symbols, one string per dimension. A dimension is a product of
factors separated by ``*``: integers, attribute names (``up_factor``, ``kernel_size``)
and at most one free size symbol (``B``, ``H``, ``W``, ``d``, ``C``, ...). Every
occurrence of a symbol must agree; ``up_factor*H`` is up_factor times the ``H`` of the
same call. The shape of an output is then fully determined by the inputs' symbols.

Adding an op = one ``Op`` entry here (plus its kernels); the generated header and the
Python bindings follow. See ``/work/coord/H2-native.md`` for the fields.
"""

from dataclasses import dataclass
from dataclasses import field

# Type attributes a tensor may take (TensorFlow attribute name -> allowed dtypes).
FLOAT_TYPES = ("half", "bfloat16", "float", "double")
ACCUMULATION_TYPES = ("float", "double")


@dataclass(frozen=True)
class Attr:
    """An integer attribute of an op.

    ``check`` is one of ``"odd_positive"`` (1, 3, 5, ...), ``"positive"`` (>= 1);
    ``default`` is the Python API's default (the TensorFlow attribute has none)."""

    name: str
    default: int
    check: str = "positive"
    doc: str = ""


@dataclass(frozen=True)
class Tensor:
    """An input or output: its name, its dtype attribute (``T`` for the op's element
    type, ``Tweights`` for the accumulation type) and its symbolic shape."""

    name: str
    shape: tuple
    dtype: str = "T"


@dataclass(frozen=True)
class Bindings:
    """Where an op's kernels are reachable, per framework (None: not bound there).

    ``cpu_core``: the function of the framework-free C++ core
    (``custom_ops/sapa/kernels/cpu/sapa_cpu.h``); ``c_abi``: the ``_sapa_core.so`` entry
    point prefix (``<prefix>_f32`` / ``_f64``); ``xla_ffi``: (FFI target name, handler
    symbol in ``_sapa_jax.so``); ``torch``: the ``torch.library`` op; ``launcher``: the
    CUDA launcher entry point (``custom_ops/sapa/launcher/sapa_launcher.h``)."""

    cpu_core: str | None = None
    c_abi: str | None = None
    xla_ffi: tuple | None = None
    torch: str | None = None
    launcher: str | None = None


@dataclass(frozen=True)
class Op:
    """One compiled op.

    ``name`` is the TensorFlow op name without its namespace (registered as
    ``KerasSapa>{name}``); ``family`` the public op it serves (``sapa``, ``similarity``,
    ``aggregate``, ``sapa_deform``); ``gradient`` the name of the op computing its
    gradient (None for gradient ops), which takes ``grad`` of each differentiable output
    followed by the inputs listed in ``gradient_inputs`` and returns one gradient per
    ``differentiable`` input, in order. ``type_pairs`` lists the (T, Tweights) kernel
    instantiations of ops with a ``Tweights`` attribute. ``devices`` lists where
    TensorFlow has kernels for it (``"cpu"``, ``"gpu"``): the CPU and GPU adapters each
    register the ops of their device."""

    name: str
    family: str
    inputs: tuple
    outputs: tuple
    attrs: tuple
    doc: str
    gradient: str | None = None
    differentiable: tuple = ()
    gradient_inputs: tuple = ()
    type_attrs: dict = field(default_factory=lambda: {"T": FLOAT_TYPES})
    type_pairs: tuple = ()
    bindings: Bindings = Bindings()
    devices: tuple = ("cpu", "gpu")

    @property
    def tf_name(self):
        return NAMESPACE + ">" + self.name


NAMESPACE = "KerasSapa"

WINDOW_ATTRS = (
    Attr("kernel_size", 5, "odd_positive", "K, the side of the square window"),
    Attr("up_factor", 2, "positive", "s, the integer upsampling factor"),
)

HIGH = ("B", "up_factor*H", "up_factor*W")  # the high-resolution (batch, rows, columns)
LOW = ("B", "H", "W")
WINDOW = "kernel_size*kernel_size"
# Weights in the accumulation type: float for half and bfloat16, else T.
FUSED_TYPES = (("float", "float"), ("double", "double"), ("half", "float"), ("bfloat16", "float"))

OPS = (
    Op(
        name="Similarity",
        family="similarity",
        inputs=(Tensor("query", HIGH + ("d",)), Tensor("key", LOW + ("d",))),
        outputs=(Tensor("similarity", HIGH + (WINDOW,)),),
        attrs=WINDOW_ATTRS,
        doc="similarity[b,i,j,n] = <query[b,i,j], key[b, i/s + a, j/s + c]>, "
        "n = (a + r) * K + (c + r), zero outside the key map.",
        gradient="SimilarityGrad",
        differentiable=("query", "key"),
        gradient_inputs=("query", "key"),
    ),
    Op(
        name="SimilarityGrad",
        family="similarity",
        inputs=(
            Tensor("grad", HIGH + (WINDOW,)),
            Tensor("query", HIGH + ("d",)),
            Tensor("key", LOW + ("d",)),
        ),
        outputs=(Tensor("grad_query", HIGH + ("d",)), Tensor("grad_key", LOW + ("d",))),
        attrs=WINDOW_ATTRS,
        doc="Gradient of KerasSapa>Similarity with respect to query and key.",
    ),
    Op(
        name="Aggregate",
        family="aggregate",
        inputs=(Tensor("weights", HIGH + (WINDOW,)), Tensor("value", LOW + ("C",))),
        outputs=(Tensor("output", HIGH + ("C",)),),
        attrs=WINDOW_ATTRS,
        doc="output[b,i,j] = sum_n weights[b,i,j,n] * value[b, i/s + a, j/s + c], "
        "points outside the value map contributing zero.",
        gradient="AggregateGrad",
        differentiable=("weights", "value"),
        gradient_inputs=("weights", "value"),
    ),
    Op(
        name="AggregateGrad",
        family="aggregate",
        inputs=(
            Tensor("grad", HIGH + ("C",)),
            Tensor("weights", HIGH + (WINDOW,)),
            Tensor("value", LOW + ("C",)),
        ),
        outputs=(Tensor("grad_weights", HIGH + (WINDOW,)), Tensor("grad_value", LOW + ("C",))),
        attrs=WINDOW_ATTRS,
        doc="Gradient of KerasSapa>Aggregate with respect to weights and value.",
    ),
    Op(
        name="Sapa",
        family="sapa",
        inputs=(
            Tensor("query", HIGH + ("d",)),
            Tensor("key", LOW + ("d",)),
            Tensor("value", LOW + ("C",)),
        ),
        outputs=(
            Tensor("output", HIGH + ("C",)),
            Tensor("weights", HIGH + (WINDOW,), dtype="Tweights"),
        ),
        attrs=WINDOW_ATTRS,
        doc="Fused SAPA: output = aggregate(softmax(similarity(query, key)), value) in one "
        "pass, padded window points entering the softmax with logit 0. weights is that "
        "softmax in Tweights (float for half and bfloat16), kept for the gradient; it "
        "is not differentiable.",
        gradient="SapaGrad",
        differentiable=("query", "key", "value"),
        gradient_inputs=("query", "key", "value", "weights"),
        type_attrs={"T": FLOAT_TYPES, "Tweights": ACCUMULATION_TYPES},
        type_pairs=FUSED_TYPES,
        bindings=Bindings(
            cpu_core="SapaForward",
            c_abi="keras_sapa_forward",
            xla_ffi=("keras_sapa_forward", "KerasSapaForward"),
            torch="keras_sapa::sapa_forward",
            launcher="sapa_forward",
        ),
    ),
    Op(
        name="SapaGrad",
        family="sapa",
        inputs=(
            Tensor("grad", HIGH + ("C",)),
            Tensor("query", HIGH + ("d",)),
            Tensor("key", LOW + ("d",)),
            Tensor("value", LOW + ("C",)),
            Tensor("weights", HIGH + (WINDOW,), dtype="Tweights"),
        ),
        outputs=(
            Tensor("grad_query", HIGH + ("d",)),
            Tensor("grad_key", LOW + ("d",)),
            Tensor("grad_value", LOW + ("C",)),
        ),
        attrs=WINDOW_ATTRS,
        doc="Gradient of KerasSapa>Sapa with respect to query, key and value.",
        type_attrs={"T": FLOAT_TYPES, "Tweights": ACCUMULATION_TYPES},
        type_pairs=FUSED_TYPES,
        bindings=Bindings(
            cpu_core="SapaBackward",
            c_abi="keras_sapa_backward",
            xla_ffi=("keras_sapa_backward", "KerasSapaBackward"),
            torch="keras_sapa::sapa_backward",
            launcher="sapa_softmax_backward",
        ),
    ),
)

# SAPA-D (dynamic point selection): G = groups point sets of P = num_points points; query
# and key have groups*E channels, value and output groups*Cg, offsets 2*G*P (channel 2k the
# width shift, 2k+1 the height shift of point k = g*P + p).
DEFORM_ATTRS = (
    Attr("num_points", 9, "positive", "P, the sampled points per group"),
    Attr("up_factor", 2, "positive", "s, the integer upsampling factor"),
    Attr("groups", 4, "positive", "G, the point groups (channel groups)"),
)
DEFORM_POINTS = "groups*num_points"
DEFORM_OFFSETS = "2*groups*num_points"

OPS += (
    Op(
        name="SapaDeform",
        family="sapa_deform",
        inputs=(
            Tensor("query", HIGH + ("groups*E",)),
            Tensor("key", LOW + ("groups*E",)),
            Tensor("value", LOW + ("groups*Cg",)),
            Tensor("offsets", HIGH + (DEFORM_OFFSETS,)),
        ),
        outputs=(
            Tensor("output", HIGH + ("groups*Cg",)),
            Tensor("weights", HIGH + (DEFORM_POINTS,), dtype="Tweights"),
        ),
        attrs=DEFORM_ATTRS,
        doc="Fused SAPA-D: output = deform_aggregate(softmax_per_group(deform_similarity("
        "query, key, offsets)), value, offsets), key and value sampled "
        "bilinearly (zero padding) at the anchor (i/s, j/s) plus each point's offset; a "
        "point outside (-1, H) x (-1, W) is dropped (logit 0, zero value). weights is the "
        "softmax in Tweights, kept for the gradient; it is not differentiable.",
        gradient="SapaDeformGrad",
        differentiable=("query", "key", "value", "offsets"),
        gradient_inputs=("query", "key", "value", "offsets", "weights"),
        type_attrs={"T": FLOAT_TYPES, "Tweights": ACCUMULATION_TYPES},
        type_pairs=FUSED_TYPES,
        bindings=Bindings(
            cpu_core="DeformForward",
            c_abi="keras_sapa_deform_forward",
            xla_ffi=("keras_sapa_deform_forward", "KerasSapaDeformForward"),
            torch="keras_sapa::sapa_deform_forward",
        ),
        devices=("cpu",),
    ),
    Op(
        name="SapaDeformGrad",
        family="sapa_deform",
        inputs=(
            Tensor("grad", HIGH + ("groups*Cg",)),
            Tensor("query", HIGH + ("groups*E",)),
            Tensor("key", LOW + ("groups*E",)),
            Tensor("value", LOW + ("groups*Cg",)),
            Tensor("offsets", HIGH + (DEFORM_OFFSETS,)),
            Tensor("weights", HIGH + (DEFORM_POINTS,), dtype="Tweights"),
        ),
        outputs=(
            Tensor("grad_query", HIGH + ("groups*E",)),
            Tensor("grad_key", LOW + ("groups*E",)),
            Tensor("grad_value", LOW + ("groups*Cg",)),
            Tensor("grad_offsets", HIGH + (DEFORM_OFFSETS,)),
        ),
        attrs=DEFORM_ATTRS,
        doc="Gradient of KerasSapa>SapaDeform with respect to query, key, value and "
        "offsets (a position's derivative taken in the cell of floor, as the official "
        "kernels do).",
        type_attrs={"T": FLOAT_TYPES, "Tweights": ACCUMULATION_TYPES},
        type_pairs=FUSED_TYPES,
        bindings=Bindings(
            cpu_core="DeformBackward",
            c_abi="keras_sapa_deform_backward",
            xla_ffi=("keras_sapa_deform_backward", "KerasSapaDeformBackward"),
            torch="keras_sapa::sapa_deform_backward",
        ),
        devices=("cpu",),
    ),
)

BY_NAME = {op.name: op for op in OPS}


def op(name):
    """The descriptor of the op ``name`` (``"Sapa"`` or ``"KerasSapa>Sapa"``)."""
    return BY_NAME[name.split(">")[-1]]


def parse_dim(dim):
    """``"up_factor*H"`` -> ``(symbol or None, [attribute names], integer factor)``."""
    symbol, attrs, factor = None, [], 1
    for part in dim.split("*"):
        part = part.strip()
        if part.isdigit():
            factor *= int(part)
        elif part in ATTR_NAMES:
            attrs.append(part)
        elif symbol is None:
            symbol = part
        else:
            raise ValueError(f"dimension {dim!r} has two size symbols")
    return symbol, attrs, factor


def symbols(op_):
    """The free size symbols of an op, in order of first appearance in its inputs."""
    seen = []
    for tensor in op_.inputs:
        for dim in tensor.shape:
            symbol = parse_dim(dim)[0]
            if symbol is not None and symbol not in seen:
                seen.append(symbol)
    return seen


def output_shape(op_, index, input_shapes, attrs):
    """The concrete shape of output ``index`` for concrete input shapes and attribute
    values (a dict), by the table's symbols. Raises ValueError naming the input whose
    shape disagrees."""
    if len(input_shapes) != len(op_.inputs):
        raise ValueError(
            f"{op_.tf_name} takes {len(op_.inputs)} inputs. Received: {len(input_shapes)} shapes"
        )
    bound = {}
    for tensor, shape in zip(op_.inputs, input_shapes, strict=True):
        if len(shape) != len(tensor.shape):
            raise ValueError(
                f"{tensor.name} must have rank {len(tensor.shape)}. "
                f"Received: {tensor.name}.shape={tuple(shape)}"
            )
        for dim, size in zip(tensor.shape, shape, strict=True):
            symbol, names, factor = parse_dim(dim)
            for name in names:
                factor *= attrs[name]
            if symbol is None:
                if size != factor:
                    raise ValueError(
                        f"{tensor.name} must have {dim}={factor} there. "
                        f"Received: {tensor.name}.shape={tuple(shape)}"
                    )
                continue
            if size % factor:
                raise ValueError(
                    f"{tensor.name} must have {dim} there, a multiple of "
                    f"{factor}. Received: {tensor.name}.shape={tuple(shape)}"
                )
            if bound.setdefault(symbol, size // factor) != size // factor:
                raise ValueError(
                    f"{tensor.name}.shape={tuple(shape)} disagrees with the other inputs on {dim}"
                )
    out = []
    for dim in op_.outputs[index].shape:
        symbol, names, factor = parse_dim(dim)
        for name in names:
            factor *= attrs[name]
        out.append(factor * (bound[symbol] if symbol is not None else 1))
    return tuple(out)


ATTR_NAMES = frozenset(a.name for o in OPS for a in o.attrs)
