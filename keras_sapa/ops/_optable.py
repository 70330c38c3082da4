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

Adding an op = one ``Op`` entry here, its gradient op derived by :func:`with_gradient`
(plus its kernels); the generated header and the Python bindings follow.
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
    ``aggregate``, ``sapa_deform``, ``deform_similarity``, ``deform_aggregate``);
    ``gradient`` the name of the op computing its gradient (None for gradient ops),
    which takes ``grad`` of each differentiable output followed by the inputs listed in
    ``gradient_inputs`` and returns one gradient per ``differentiable`` input, in order.
    ``type_pairs`` lists the (T, Tweights) kernel instantiations of ops with a
    ``Tweights`` attribute. ``devices`` lists where TensorFlow has kernels for it
    (``"cpu"``, ``"gpu"``): the CPU and GPU adapters each register the ops of their
    device."""

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


def with_gradient(forward, doc=None, bindings=None):
    """``(forward, its gradient op)``. The gradient op is named ``forward.gradient``; it
    takes ``grad`` (shaped like the first output) then the tensors ``gradient_inputs``
    names, returns ``grad_<name>`` shaped like each ``differentiable`` input, and has the
    forward's family, attributes, types and devices."""
    tensors = {t.name: t for t in forward.inputs + forward.outputs}
    *others, last = forward.differentiable
    wrt = f"{', '.join(others)} and {last}" if others else last
    grad = Op(
        name=forward.gradient,
        family=forward.family,
        inputs=(Tensor("grad", forward.outputs[0].shape),)
        + tuple(tensors[name] for name in forward.gradient_inputs),
        outputs=tuple(Tensor("grad_" + n, tensors[n].shape) for n in forward.differentiable),
        attrs=forward.attrs,
        doc=doc or f"Gradient of {forward.tf_name} with respect to {wrt}.",
        type_attrs=forward.type_attrs,
        type_pairs=forward.type_pairs,
        bindings=bindings or Bindings(),
        devices=forward.devices,
    )
    return forward, grad


def window_op(name, inputs, output, doc, attrs=WINDOW_ATTRS, stem=None, **fields):
    """An op with one output (``attrs``; any float type unless ``fields`` say otherwise)
    and its gradient ``<name>Grad``, differentiable in every input, which it takes again.
    With ``stem``, both are bound as ``stem`` and ``<stem>_backward`` (:func:`bindings`)
    and serve the public op ``stem``; else they serve ``name.lower()``."""
    names = tuple(t.name for t in inputs)
    return with_gradient(
        Op(
            name=name,
            family=stem or name.lower(),
            inputs=inputs,
            outputs=(output,),
            attrs=attrs,
            doc=doc,
            gradient=name + "Grad",
            differentiable=names,
            gradient_inputs=names,
            bindings=bindings(stem, name) if stem else Bindings(),
            **fields,
        ),
        bindings=bindings(stem + "_backward", name + "Backward") if stem else None,
    )


def bindings(stem, cpu_core, launcher=None):
    """Where a fused op is bound, named from ``stem`` (``forward``, ``deform_backward``):
    the C entry points ``keras_sapa_<stem>_f32/_f64``, the XLA FFI target of that name
    (handler ``KerasSapa<Stem>``), the ``torch.library`` op ``keras_sapa::sapa_<stem>``
    and the launcher's ``sapa_<stem>`` unless ``launcher`` names another."""
    c_abi = "keras_sapa_" + stem
    handler = "KerasSapa" + "".join(word.capitalize() for word in stem.split("_"))
    return Bindings(
        cpu_core=cpu_core,
        c_abi=c_abi,
        xla_ffi=(c_abi, handler),
        torch="keras_sapa::sapa_" + stem,
        launcher=launcher or "sapa_" + stem,
    )


def fused_op(name, inputs, output, weights, attrs, doc, forward, backward, grad_doc=None):
    """A fused op ``name`` whose outputs are ``output`` and the saved softmax ``weights``
    (``Tweights``, the accumulation type; not differentiable), and its gradient
    ``<name>Grad``: differentiable in every input, it takes them and ``weights``.
    ``forward`` and ``backward`` are the ops' :class:`Bindings`."""
    names = tuple(t.name for t in inputs)
    return with_gradient(
        Op(
            name=name,
            family={"Sapa": "sapa", "SapaDeform": "sapa_deform"}[name],
            inputs=inputs,
            outputs=(output, Tensor("weights", weights, dtype="Tweights")),
            attrs=attrs,
            doc=doc,
            gradient=name + "Grad",
            differentiable=names,
            gradient_inputs=names + ("weights",),
            type_attrs={"T": FLOAT_TYPES, "Tweights": ACCUMULATION_TYPES},
            type_pairs=FUSED_TYPES,
            bindings=forward,
        ),
        grad_doc,
        backward,
    )


OPS = (
    *window_op(
        "Similarity",
        (Tensor("query", HIGH + ("d",)), Tensor("key", LOW + ("d",))),
        Tensor("similarity", HIGH + (WINDOW,)),
        "similarity[b,i,j,n] = <query[b,i,j], key[b, i/s + a, j/s + c]>, "
        "n = (a + r) * K + (c + r), zero outside the key map.",
    ),
    *window_op(
        "Aggregate",
        (Tensor("weights", HIGH + (WINDOW,)), Tensor("value", LOW + ("C",))),
        Tensor("output", HIGH + ("C",)),
        "output[b,i,j] = sum_n weights[b,i,j,n] * value[b, i/s + a, j/s + c], "
        "points outside the value map contributing zero.",
    ),
    *fused_op(
        "Sapa",
        (
            Tensor("query", HIGH + ("d",)),
            Tensor("key", LOW + ("d",)),
            Tensor("value", LOW + ("C",)),
        ),
        Tensor("output", HIGH + ("C",)),
        HIGH + (WINDOW,),
        WINDOW_ATTRS,
        "Fused SAPA: output = aggregate(softmax(similarity(query, key)), value) in one pass, "
        "padded window points entering the softmax with logit 0. weights is that softmax in "
        "Tweights (float for half and bfloat16), kept for the gradient; it is not "
        "differentiable.",
        bindings("forward", "SapaForward"),
        bindings("backward", "SapaBackward"),
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

OPS += fused_op(
    "SapaDeform",
    (
        Tensor("query", HIGH + ("groups*E",)),
        Tensor("key", LOW + ("groups*E",)),
        Tensor("value", LOW + ("groups*Cg",)),
        Tensor("offsets", HIGH + (DEFORM_OFFSETS,)),
    ),
    Tensor("output", HIGH + ("groups*Cg",)),
    HIGH + (DEFORM_POINTS,),
    DEFORM_ATTRS,
    "Fused SAPA-D: output = deform_aggregate(softmax_per_group(deform_similarity(query, key, "
    "offsets)), value, offsets), key and value sampled bilinearly (zero padding) at the "
    "anchor (i/s, j/s) plus each point's offset; a point outside (-1, H) x (-1, W) is "
    "dropped (logit 0, zero value). weights is the softmax in Tweights, kept for the "
    "gradient; it is not differentiable.",
    bindings("deform_forward", "DeformForward"),
    bindings("deform_backward", "DeformBackward"),
    grad_doc="Gradient of KerasSapa>SapaDeform with respect to query, key, value and offsets "
    "(a position's derivative taken in the cell of floor, as the official kernels do).",
)


# SAPA-D's halves, float and double (the public ops compute half types in float32).
DEFORM_HALVES = (
    "DeformSimilarity",
    "DeformSimilarityGrad",
    "DeformAggregate",
    "DeformAggregateGrad",
)
OPS += window_op(
    "DeformSimilarity",
    (
        Tensor("query", HIGH + ("groups*E",)),
        Tensor("key", LOW + ("groups*E",)),
        Tensor("offsets", HIGH + (DEFORM_OFFSETS,)),
    ),
    Tensor("logits", HIGH + (DEFORM_POINTS,)),
    "SAPA-D's similarity: logits[b,i,j,k] = <query[b,i,j, group g], key[b, group g] sampled "
    "bilinearly (zero padding) at the anchor (i/s, j/s) plus the offsets of point k = g*P + p>; "
    "a point outside (-1, H) x (-1, W) is dropped (logit 0).",
    DEFORM_ATTRS,
    "deform_similarity",
    type_attrs={"T": ACCUMULATION_TYPES},
)
OPS += window_op(
    "DeformAggregate",
    (
        Tensor("weights", HIGH + (DEFORM_POINTS,)),
        Tensor("value", LOW + ("groups*Cg",)),
        Tensor("offsets", HIGH + (DEFORM_OFFSETS,)),
    ),
    Tensor("output", HIGH + ("groups*Cg",)),
    "SAPA-D's aggregation: output[b,i,j, group g] = sum_p weights[b,i,j,g*P + p] * value[b, "
    "group g] sampled bilinearly (zero padding) at the anchor (i/s, j/s) plus the offsets of "
    "point g*P + p; a dropped point contributes zero.",
    DEFORM_ATTRS,
    "deform_aggregate",
    type_attrs={"T": ACCUMULATION_TYPES},
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
