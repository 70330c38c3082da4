"""SAPA's compiled kernels on PyTorch: ``torch.library`` custom ops over ctypes.

:func:`sapa` computes ``aggregate(softmax(similarity(query, key)), value)`` (SAPA_SPEC.md)
with the fused kernels of ``custom_ops/sapa/kernels/``, through the C entry points of
``keras_sapa/_lib/_sapa_core.so`` (built by ``custom_ops/build.py``). Two ops:

- ``torch.ops.keras_sapa.sapa_forward(query, key, value, kernel_size, up_factor)
  -> (out, weights)``, the window softmax ``weights`` kept for the backward;
- ``torch.ops.keras_sapa.sapa_backward(grad, query, key, value, weights, kernel_size,
  up_factor) -> (dquery, dkey, dvalue)``.

Every op of the table is defined the same way (:func:`define`, which
:mod:`._torch_deform_kernels` uses too): its schema from the table's inputs and
attributes, fake implementations shaped by the table's shape symbols, ``register_autograd``
from its ``gradient`` entry (first-order gradients of its ``differentiable`` inputs), so
the ops run eagerly and inside ``torch.compile(fullgraph=True)`` graphs as single opaque
nodes. Implementations:

- CPU: the core's ``<c_abi>_f32`` / ``_f64`` / ``_f16`` / ``_bf16`` on the tensors' data
  pointers;
- CUDA (registered only when PyTorch is built with CUDA): the core's ``<c_abi>_cuda`` on
  ``torch.cuda.current_stream().cuda_stream``, through the CUDA launcher, which the core
  opens on the first CUDA call (:data:`._native.cuda`); :func:`run_cuda` is its body.

Tensors of float32 or float64, or float16 / bfloat16 with the ``weights`` in float32 (the
table's ``Tweights``) for the ops whose core has 16-bit entry points
(:func:`._native.stores_halves`: the fused SAPA and SAPA-D pairs), converted to float32
as the kernels read them. For other ops :func:`run` computes half types in float32 and
rounds the result once to ``value``'s dtype.

The core library goes through the checks of :mod:`._native` (disable switch, build
record, CPU features; ctypes ties it to no PyTorch version) on the first call of
:func:`available`, never at import (importing this module only registers the op schemas).
"""

import ctypes

import torch

from keras_sapa.ops import _native
from keras_sapa.ops import _optable

_NATIVE = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
_HALF = (torch.float16, torch.bfloat16)
# SapaDtype (sapa_launcher.h)
_LAUNCHER_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# CUDA implementations are registered where PyTorch has CUDA (none on a CPU-only build).
CUDA_REGISTERED = torch.backends.cuda.is_built()

# ------------------------------------------------------------------ facts for the dispatch
EAGER_BUILTIN = "xla"  # the builtin formulation without the kernels


def traced(tensor=None):
    """Whether ``torch.compile`` (Dynamo) is tracing."""
    return torch.compiler.is_compiling()


def in_xla_trace():
    """False: ``torch.compile`` keeps the custom ops as opaque nodes."""
    return False


def exporting():
    """Whether ``torch.onnx`` or ``torch.export`` is tracing (public API)."""
    return bool(torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting())


def layer_supports_jit(implementation="auto"):
    """True: a SAPA layer runs inside ``torch.compile`` with every implementation."""
    return True


_library = _native.Library(
    "PyTorch", lambda: (_native.load_core()[0], _native.unavailable_reason())
)


@torch.compiler.assume_constant_result  # Dynamo runs it (it takes a lock), then a constant
def available():
    """True when the compiled kernels are loaded (loads them on first call).

    False, after one ``RuntimeWarning``, when the library is missing, stale, built for
    another CPU or fails to load; False without a warning when
    ``KERAS_SAPA_DISABLE_COMPILED`` is set.
    """
    return _library.get() is not None


def serves(ops, tensors):
    """Whether the table's ``ops`` run on these tensors: all on the CPU, or all on one
    CUDA device with the CUDA implementations registered, the launcher open and the
    ops' CUDA entry points in the library."""
    devices = {t.device for t in tensors}
    kinds = {d.type for d in devices}
    if kinds == {"cpu"}:
        return True
    if kinds != {"cuda"} or len(devices) != 1 or not CUDA_REGISTERED:
        return False
    lib = _native.cuda.get()
    return lib is not None and all(_native.entry_point(lib, o, "cuda") for o in ops)


def usable(query, key, value):
    """Whether :func:`sapa` can serve these tensors: the kernels are loaded and the
    tensors are all on the CPU or all on one CUDA device that the kernels serve."""
    return available() and serves(_OPS, (query, key, value))


def unavailable_reason():
    """Why :func:`available` is False (None when it is True)."""
    return _library.reason()


def _reset():
    """Forgets the load attempt (tests only)."""
    _library.reset()
    _native.core.reset()


def _library_handle():
    if not available():
        raise RuntimeError(
            "keras_sapa: the compiled SAPA kernels for PyTorch are "
            f"unavailable: {unavailable_reason()}"
        )
    return _library.get()


# ------------------------------------------------------------------ op definitions
def torch_op(op):
    """``torch.ops.<namespace>.<name>`` of the table's op."""
    namespace, name = op.bindings.torch.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def _split(op, args):
    """(contiguous input tensors, attributes by name) of a call's arguments."""
    n = len(op.inputs)
    return [t.contiguous() for t in args[:n]], {
        a.name: int(v) for a, v in zip(op.attrs, args[n:], strict=True)
    }


def tensor_dtype(tensor, dtype):
    """The dtype of the table's ``tensor`` in a call whose element type (``T``) is
    ``dtype``: ``Tweights`` tensors (the saved softmax) are float32 for the half types."""
    return torch.float32 if tensor.dtype == "Tweights" and dtype in _HALF else dtype


def _outputs(op, tensors, attrs):
    shapes = _native.output_shapes(op, [tuple(t.shape) for t in tensors], attrs)
    dtype = tensors[0].dtype
    return [
        tensors[0].new_empty(s, dtype=tensor_dtype(t, dtype))
        for s, t in zip(shapes, op.outputs, strict=True)
    ]


def _returned(outs):
    """An implementation's result: the tensor of a one-output op (torch reads the schema
    ``-> (Tensor)`` as one Tensor), else the tuple."""
    return outs[0] if len(outs) == 1 else tuple(outs)


def _check(op, tensors, device):
    """ValueError unless the tensors are on ``device`` with one element type the op's
    entry points take (``Tweights`` ones in its accumulation type)."""
    dtype = tensors[0].dtype
    types = ("float32", "float64")
    if device == "cuda" or _native.entry_point(_library_handle(), op, "f16") is not None:
        types += ("float16", "bfloat16")  # with float32 weights
    if (
        dtype not in _NATIVE
        or str(dtype)[6:] not in types
        or any(
            t.device.type != device or t.dtype != tensor_dtype(spec, dtype)
            for t, spec in zip(tensors, op.inputs, strict=True)
        )
    ):
        raise ValueError(
            f"{op.bindings.torch} takes {device} tensors of one dtype, {', '.join(types)}, "
            "the weights in float32 for the half types. "
            f"Received: {[(str(t.dtype), t.device.type) for t in tensors]}"
        )


def _cpu_impl(op):
    def impl(*args):
        tensors, attrs = _split(op, args)
        _check(op, tensors, "cpu")
        outs = _outputs(op, tensors, attrs)
        _native.call_cpu(
            _library_handle(),
            op,
            [t.data_ptr() for t in (*tensors, *outs)],
            _native.core_sizes(op, [t.shape for t in tensors], attrs),
            _NATIVE[tensors[0].dtype],
        )
        return _returned(outs)

    return impl


def run_cuda(op, tensors, attrs, stream):
    """The CUDA implementation's body: the op's ``<c_abi>_cuda`` on ``stream`` (a
    CUstream handle; None: the default stream) with the tensors' data pointers, through
    the launcher the core has open. The tensors are device memory for the launcher: on
    a GPU, CUDA tensors; under the emulated driver of the tests, CPU tensors."""
    tensors = [t.contiguous() for t in tensors]
    outs = _outputs(op, tensors, attrs)
    lib, dtype = _native.core.get(), _LAUNCHER_DTYPES[tensors[0].dtype]
    sizes = _native.core_sizes(op, [t.shape for t in tensors], attrs)
    nbytes = _native.cuda_scratch_bytes(lib, op, dtype, sizes)
    scratch = tensors[0].new_empty(nbytes, dtype=torch.uint8) if nbytes else None
    _native.call_cuda(
        lib,
        op,
        stream,
        dtype,
        [t.data_ptr() for t in (*tensors, *outs)],
        sizes,
        None if scratch is None else ctypes.c_void_p(scratch.data_ptr()),
    )
    return _returned(outs)


def _cuda_impl(op):
    def impl(*args):
        tensors, attrs = _split(op, args)
        _check(op, tensors, "cuda")
        if _native.cuda.get() is None:
            raise RuntimeError(f"keras_sapa: no CUDA kernels ({_native.cuda.reason()})")
        stream = torch.cuda.current_stream(tensors[0].device).cuda_stream
        return run_cuda(op, tensors, attrs, stream)

    return impl


def _autograd(op):
    """``(backward, setup_context)`` of the fused op from its ``gradient`` entry."""
    n = len(op.inputs)
    names = [t.name for t in op.inputs] + [t.name for t in op.outputs]
    gradient = _optable.op(op.gradient)

    def setup_context(ctx, inputs, output):
        output = output if isinstance(output, tuple) else (output,)
        named = dict(zip(names, (*inputs[:n], *output), strict=True))
        ctx.save_for_backward(*(named[x] for x in op.gradient_inputs))
        for extra in output[1:]:
            ctx.mark_non_differentiable(extra)
        # No zero-filled gradient for the extra outputs (never differentiated): None.
        ctx.set_materialize_grads(False)
        ctx.attrs = inputs[n:]

    def backward(ctx, grad_out, *unused):
        if grad_out is None:
            return (None,) * (n + len(op.attrs))
        grads = iter(torch_op(gradient)(grad_out, *ctx.saved_tensors, *ctx.attrs))
        return (
            *(next(grads) if t.name in op.differentiable else None for t in op.inputs),
            *(None for _ in op.attrs),
        )

    return backward, setup_context


def define(op):
    """Defines the table's fused ``op`` and its gradient op as ``torch.library`` ops:
    schemas, CPU (and CUDA) implementations, fake implementations, autograd."""
    for spec in (op, _optable.op(op.gradient)):
        name = spec.bindings.torch
        args = [f"Tensor {t.name}" for t in spec.inputs] + [f"int {a.name}" for a in spec.attrs]
        results = ", ".join("Tensor" for _ in spec.outputs)
        torch.library.define(name, f"({', '.join(args)}) -> ({results})")
        torch.library.impl(name, "cpu", _cpu_impl(spec))
        if CUDA_REGISTERED:
            torch.library.impl(name, "cuda", _cuda_impl(spec))

        def fake(*args, spec=spec):
            return _returned(_outputs(spec, *_split(spec, args)))

        torch.library.register_fake(name, fake)
    backward, setup_context = _autograd(op)
    torch.library.register_autograd(op.bindings.torch, backward, setup_context=setup_context)


def compute_dtype(dtypes, stores_halves):
    """The element type the kernels run in for tensors of ``dtypes``: their one dtype
    where the kernels take it (a half type only where ``stores_halves``), else float64
    when one is float64, else float32 (the result is then rounded to ``value``'s dtype)."""
    dtypes = set(dtypes)
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype in (torch.float32, torch.float64) or (dtype in _HALF and stores_halves):
            return dtype
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.compiler.assume_constant_result  # Dynamo runs it (ctypes look-ups), then a constant
def _stores_halves(op_name):
    """:func:`._native.stores_halves` of the loaded core for the table's op ``op_name``."""
    return _native.stores_halves(_library_handle(), _optable.op(op_name))


def run(op, tensors, attrs):
    """The table's fused ``op`` (its first output) on the compiled kernels, for tensors
    the public op has checked: float16 / bfloat16 as they are where the core stores them
    (:func:`._native.stores_halves`), else computed in float32 (float64 inputs in
    float64), the result in ``value``'s dtype. Differentiable (first order), eagerly or
    inside ``torch.compile(fullgraph=True)``."""
    _library_handle()
    compute = compute_dtype([t.dtype for t in tensors], _stores_halves(op.name))
    values = [attrs[a.name] for a in op.attrs]
    out = torch_op(op)(*(t.to(compute) for t in tensors), *(int(v) for v in values))[0]
    names = [t.name for t in op.inputs]
    return out.to(tensors[names.index("value")].dtype) if "value" in names else out


_OPS = (_optable.op("Sapa"), _optable.op("SapaGrad"))
define(_OPS[0])


def sapa(query, key, value, kernel_size, up_factor):
    """``aggregate(softmax(similarity(query, key)), value)`` on the compiled kernels, for
    tensors that :func:`keras_sapa.ops.sapa` has checked (shapes, one floating dtype).

    Float16 and bfloat16 go to the kernels in their own storage (converted to float32 per
    tile inside them; with an older library, computed in float32 and rounded once to
    ``value``'s dtype). Differentiable in all three inputs (first order), eagerly or inside
    ``torch.compile(fullgraph=True)``. Raises ``RuntimeError`` when the kernels are
    unavailable (see :func:`available`).
    """
    return run(_OPS[0], (query, key, value), {"kernel_size": kernel_size, "up_factor": up_factor})
