// The XLA FFI handlers of _sapa_jax.so, for every op of the table, from one generic
// handler: a call's buffers (inputs then results, in the op's order) and attributes (by
// the table's names) are checked against the op's descriptor (sapa_opspec.h: the same
// shape rule as the TensorFlow kernels) and handed, as data pointers plus the core's size
// arguments, to the op's C entry points (sapa_core_c.h, sapa_deform_core_c.h):
//
//   CPU:  <c_abi>_f32 / _f64 / _f16 / _bf16 (pointers..., sizes...)
//   CUDA: <c_abi>_cuda (stream, dtype, pointers, sizes, scratch) with scratch memory of
//         <c_abi>_cuda_scratch bytes, on the CUDA launcher
//
// An op's file then holds one line per handler:
//
//   KERAS_SAPA_CPU_HANDLER_HALF(KerasSapaForward, kSapa, keras_sapa_forward)
//   KERAS_SAPA_CUDA_HANDLER(KerasSapaForwardCuda, kSapa, keras_sapa_forward)
//
// Element types, by the table's dtype attributes: every tensor of dtype "T" has the
// call's type (that of the first input), the "Tweights" ones (weights) its accumulation
// type: float32 for float16 and bfloat16, else T. KERAS_SAPA_CPU_HANDLER serves float32
// and float64 (for an op whose core has no 16-bit entry points: the Python callers
// convert half types), KERAS_SAPA_CPU_HANDLER_HALF float16 and bfloat16 as well, handed
// to the core in 16-bit storage; the CUDA handlers all four (the launcher's dtypes).
//
// Every dimension before the last three is a batch dimension, the same for every buffer,
// folded into B (so vmap_method="broadcast_all" just adds batch dimensions). Headers:
// jax.ffi.include_dir().

#ifndef KERAS_SAPA_BINDINGS_XLA_FFI_OPS_H_
#define KERAS_SAPA_BINDINGS_XLA_FFI_OPS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "sapa_core_c.h"
#include "sapa_opspec.h"
#include "xla/ffi/api/ffi.h"

namespace keras_sapa {
namespace xla_ffi {

namespace ffi = xla::ffi;
using Dims = ffi::AnyBuffer::Dimensions;

constexpr int kMaxTensors = 16;

inline std::string DimsString(Dims dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// One decoded call: its op, bound sizes, dtype, and the data pointers and (folded) shapes
// of its tensors, inputs then results.
struct Call {
  const OpSpec* op = nullptr;
  Sizes sizes;
  ffi::DataType dtype = ffi::DataType::F32;
  void* data[kMaxTensors] = {};
  int64_t shapes[kMaxTensors][4] = {};
  int num_tensors = 0;

  // The input named `name` (-1: none).
  int Input(const char* name) const {
    for (int i = 0; i < op->num_inputs; ++i) {
      if (std::strcmp(op->inputs[i].name, name) == 0) return i;
    }
    return -1;
  }

  // The core's size arguments (sapa_core_c.h, sapa_deform_core_c.h): batch, height and
  // width of `key` (else `value`), up_factor, the op's other attributes in the table's
  // order, then the channels of `key` and of `value` (0 where the op has none: SAPA-D's
  // halves). Returns their number.
  int CoreSizes(int64_t* out) const {
    static const int64_t kNone[4] = {};
    const int k = Input("key"), v = Input("value");
    const int64_t* key = k >= 0 ? shapes[k] : kNone;
    const int64_t* value = v >= 0 ? shapes[v] : kNone;
    const int64_t* low = k >= 0 ? key : value;
    int n = 0;
    for (int j = 0; j < 3; ++j) out[n++] = low[j];
    out[n++] = sizes.attrs[optable::kAttr_up_factor];
    for (int i = 0; i < op->num_attrs; ++i) {
      if (op->attrs[i].index != optable::kAttr_up_factor) out[n++] = sizes.attrs[op->attrs[i].index];
    }
    out[n++] = key[3];
    out[n++] = value[3];
    return n;
  }
};

// Checks one dimension list against the first input's batch dimensions and folds it.
inline bool Fold(Dims d, Dims ref, int64_t* folded) {
  if (d.size() < 3 || d.size() != ref.size()) return false;
  folded[0] = 1;
  for (size_t i = 0; i + 3 < d.size(); ++i) {
    if (d[i] != ref[i]) return false;
    folded[0] *= d[i];
  }
  for (int j = 1; j < 4; ++j) folded[j] = d[d.size() - 4 + j];
  return true;
}

inline ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("keras_sapa: " + message);
}

// The accumulation type ("Tweights") of the element type `t` ("T").
inline ffi::DataType WeightsType(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 ? ffi::DataType::F32 : t;
}

inline const char* TypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16:
      return "float16";
    case ffi::DataType::BF16:
      return "bfloat16";
    case ffi::DataType::F32:
      return "float32";
    case ffi::DataType::F64:
      return "float64";
    default:
      return "a type other than these four";
  }
}

inline bool IsFloat(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 || t == ffi::DataType::F32 ||
         t == ffi::DataType::F64;
}

// Decodes and checks a call of `op`: attributes, shapes (the table's rule, results
// included) and dtypes (T of float16, bfloat16, float32 or float64; Tweights its
// accumulation type, WeightsType).
inline ffi::Error Decode(const OpSpec& op, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         ffi::Dictionary attrs, Call* call) {
  call->op = &op;
  if (args.size() != size_t(op.num_inputs) || rets.size() != size_t(op.num_outputs)) {
    return Invalid(std::string(op.name) + " takes " + std::to_string(op.num_inputs) +
                   " inputs and " + std::to_string(op.num_outputs) + " results");
  }
  for (int i = 0; i < op.num_attrs; ++i) {
    const AttrSpec& attr = op.attrs[i];
    ffi::ErrorOr<int64_t> value = attrs.get<int64_t>(attr.name);
    if (!value.has_value()) return Invalid(std::string("missing attribute ") + attr.name);
    call->sizes.attrs[attr.index] = *value;
    const std::string problem = CheckAttr(attr, *value);
    if (!problem.empty()) return Invalid(problem);
  }
  const int64_t* shapes[kMaxTensors];
  int ranks[kMaxTensors];
  std::optional<Dims> ref;
  for (int i = 0; i < op.num_inputs + op.num_outputs; ++i) {
    const bool input = i < op.num_inputs;
    const int k = input ? i : i - op.num_inputs;
    const char* name = input ? op.inputs[k].name : op.outputs[k].name;
    std::optional<ffi::AnyBuffer> buffer;
    if (input) {
      if (ffi::ErrorOr<ffi::AnyBuffer> b = args.get<ffi::AnyBuffer>(k); b.has_value()) buffer = *b;
    } else if (ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> b = rets.get<ffi::AnyBuffer>(k);
               b.has_value()) {
      buffer = **b;
    }
    if (!buffer.has_value()) return Invalid(std::string("`") + name + "` is not a buffer");
    const Dims d = buffer->dimensions();
    if (!ref.has_value()) ref = d;
    if (!Fold(d, *ref, call->shapes[i])) {
      return Invalid(std::string(input ? "`" : "result `") + name + "` has shape " +
                     DimsString(d) + ", expected the batch dimensions of `" + op.inputs[0].name +
                     "` " + DimsString(*ref) + " followed by three dimensions");
    }
    shapes[i] = call->shapes[i];
    ranks[i] = 4;
    call->data[i] = buffer->untyped_data();
    if (i == 0) {
      call->dtype = buffer->element_type();
      if (!IsFloat(call->dtype)) {
        return Invalid(std::string("`") + name + "` must be float16, bfloat16, float32 or "
                       "float64, not " + TypeName(call->dtype));
      }
    }
    const TensorSpec& spec = input ? op.inputs[k] : op.outputs[k];
    const bool weights = std::strcmp(spec.dtype, "Tweights") == 0;
    const ffi::DataType want = weights ? WeightsType(call->dtype) : call->dtype;
    if (buffer->element_type() != want) {
      return Invalid(std::string(input ? "`" : "result `") + name + "` must be " +
                     TypeName(want) + " with " + TypeName(call->dtype) + " `" +
                     op.inputs[0].name + "`, not " + TypeName(buffer->element_type()));
    }
  }
  call->num_tensors = op.num_inputs + op.num_outputs;
  const std::string problem = BindInputs(op, shapes, ranks, &call->sizes);
  if (!problem.empty()) return Invalid(problem);
  for (int k = 0; k < op.num_outputs; ++k) {
    int64_t want[kMaxRank];
    OutputShape(op, k, call->sizes, want);
    const int64_t* got = call->shapes[op.num_inputs + k];
    bool ok = true;
    for (int j = 1; j < 4; ++j) ok = ok && got[j] == want[j];
    if (!ok) {
      return Invalid(std::string("result `") + op.outputs[k].name + "` has shape " +
                     ShapeString(got, 4) + " (batch folded), expected " + ShapeString(want, 4));
    }
  }
  return ffi::Error::Success();
}

// The argument i of a C entry point: the call's data pointer i while `A` is a pointer,
// else a core size.
template <typename A>
A Arg(const Call& call, const int64_t* sizes, size_t i) {
  if constexpr (std::is_pointer_v<A>) {
    return static_cast<A>(call.data[i]);
  } else {
    return static_cast<A>(sizes[i - call.num_tensors]);
  }
}

template <typename... A, size_t... I>
int Apply(int (*fn)(A...), const Call& call, const int64_t* sizes, std::index_sequence<I...>) {
  return fn(Arg<A>(call, sizes, I)...);
}

// fn(data pointers..., core sizes...): a CPU entry point of the core.
template <typename... A>
int Apply(int (*fn)(A...), const Call& call) {
  int64_t sizes[kMaxAttrs + 8];
  if (call.num_tensors + call.CoreSizes(sizes) != int(sizeof...(A))) return -1;
  return Apply(fn, call, sizes, std::index_sequence_for<A...>{});
}

// fn's call, or -2 where the op has no entry point of the type (fn is nullptr).
template <typename Fn>
int ApplyIf(Fn fn, const Call& call) {
  if constexpr (std::is_same_v<Fn, std::nullptr_t>) {
    return -2;
  } else {
    return Apply(fn, call);
  }
}

// A CPU entry point per element type (F16, BF16: std::nullptr_t where the op has none).
template <typename F32, typename F64, typename F16 = std::nullptr_t,
          typename BF16 = std::nullptr_t>
ffi::Error RunCpu(const OpSpec& op, F32 f32, F64 f64, F16 f16, BF16 bf16,
                  ffi::RemainingArgs args, ffi::RemainingRets rets, ffi::Dictionary attrs) {
  Call call;
  if (ffi::Error e = Decode(op, args, rets, attrs, &call); e.failure()) return e;
  int rc = -2;
  switch (call.dtype) {
    case ffi::DataType::F32:
      rc = ApplyIf(f32, call);
      break;
    case ffi::DataType::F64:
      rc = ApplyIf(f64, call);
      break;
    case ffi::DataType::F16:
      rc = ApplyIf(f16, call);
      break;
    default:
      rc = ApplyIf(bf16, call);
  }
  if (rc == -2) {
    return Invalid(std::string(op.name) + " has no " + TypeName(call.dtype) +
                   " CPU kernels (convert to float32)");
  }
  if (rc != KERAS_SAPA_OK) {
    return ffi::Error::Internal(std::string("keras_sapa: ") + op.name + " kernel failed (code " +
                                std::to_string(rc) + ")");
  }
  return ffi::Error::Success();
}

// The launcher's dtype code (SapaDtype in launcher/sapa_launcher.h) of a float type.
inline int LauncherDtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16:
      return 1;
    case ffi::DataType::BF16:
      return 2;
    case ffi::DataType::F64:
      return 3;
    default:
      return 0;
  }
}

// A CUDA entry point of the core on XLA's stream, with scratch memory of the size its
// <c_abi>_cuda_scratch asks for from XLA's allocator.
inline ffi::Error RunCuda(const OpSpec& op, KerasSapaCudaFn fn, KerasSapaCudaScratchFn scratch_fn,
                          void* stream, ffi::ScratchAllocator& scratch, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, ffi::Dictionary attrs) {
  Call call;
  if (ffi::Error e = Decode(op, args, rets, attrs, &call); e.failure()) return e;
  int64_t sizes[kMaxAttrs + 8];
  call.CoreSizes(sizes);
  const int dtype = LauncherDtype(call.dtype);
  int64_t bytes = 0;
  int rc = scratch_fn(dtype, sizes, &bytes);
  void* work = nullptr;
  if (rc == KERAS_SAPA_OK && bytes > 0) {
    std::optional<void*> got = scratch.Allocate(bytes, 256);
    if (!got.has_value()) return ffi::Error::Internal("keras_sapa: no scratch memory");
    work = *got;
  }
  if (rc == KERAS_SAPA_OK) rc = fn(stream, dtype, call.data, sizes, work);
  if (rc != KERAS_SAPA_OK) {
    return ffi::Error::Internal(std::string("keras_sapa: ") + op.name + " on CUDA failed: " +
                                keras_sapa_cuda_error());
  }
  return ffi::Error::Success();
}

}  // namespace xla_ffi
}  // namespace keras_sapa

// A CPU handler `symbol` of the table's op `op` (optable::k<Name>) on the core's entry
// points f32, f64, f16, bf16 (nullptr: none).
#define KERAS_SAPA_CPU_HANDLER_OF(symbol, op, f32, f64, f16, bf16)                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      symbol,                                                                              \
      [](xla::ffi::RemainingArgs args, xla::ffi::RemainingRets rets,                       \
         xla::ffi::Dictionary attrs) {                                                     \
        return keras_sapa::xla_ffi::RunCpu(keras_sapa::optable::op, f32, f64, f16, bf16,   \
                                           args, rets, attrs);                             \
      },                                                                                   \
      xla::ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attrs<xla::ffi::Dictionary>())

// On the core's <entry>_f32 / <entry>_f64.
#define KERAS_SAPA_CPU_HANDLER(symbol, op, entry) \
  KERAS_SAPA_CPU_HANDLER_OF(symbol, op, entry##_f32, entry##_f64, nullptr, nullptr)

// On the core's <entry>_f32 / _f64 / _f16 / _bf16 (the last two in 16-bit storage with
// float32 weights).
#define KERAS_SAPA_CPU_HANDLER_HALF(symbol, op, entry)                                 \
  KERAS_SAPA_CPU_HANDLER_OF(symbol, op, entry##_f32, entry##_f64, entry##_f16, \
                            entry##_bf16)

// A CUDA handler on the core's <entry>_cuda (the stream from XLA, scratch memory from
// its allocator).
#define KERAS_SAPA_CUDA_HANDLER(symbol, op, entry)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                           \
      symbol,                                                                              \
      [](void* stream, xla::ffi::ScratchAllocator scratch, xla::ffi::RemainingArgs args,   \
         xla::ffi::RemainingRets rets, xla::ffi::Dictionary attrs) {                       \
        return keras_sapa::xla_ffi::RunCuda(keras_sapa::optable::op, entry##_cuda,         \
                                            entry##_cuda_scratch, stream, scratch, args,   \
                                            rets, attrs);                                  \
      },                                                                                   \
      xla::ffi::Ffi::Bind()                                                                \
          .Ctx<xla::ffi::PlatformStream<void*>>()                                          \
          .Ctx<xla::ffi::ScratchAllocator>()                                               \
          .RemainingArgs()                                                                 \
          .RemainingRets()                                                                 \
          .Attrs<xla::ffi::Dictionary>())

#endif  // KERAS_SAPA_BINDINGS_XLA_FFI_OPS_H_
