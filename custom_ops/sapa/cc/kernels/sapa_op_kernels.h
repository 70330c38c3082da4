// Device-generic OpKernels of the keras_sapa ops. Included by the CPU kernel file (which
// registers them for DEVICE_CPU) and by the GPU adapter (DEVICE_GPU), each supplying the
// device functors of sapa_kernels.h.
//
// One kernel template, TableOp<Body, Device, T, F>, serves every op of the table
// (sapa_opspec.h): it reads and checks the attributes, binds the size symbols from the
// inputs (an InvalidArgument naming the input and its shape otherwise), allocates every
// output from the table's shapes and hands the call to the op's Body, which names the
// functors it runs; each device supplies the functors (sapa_kernels.cc: CPU,
// sapa_kernels_gpu.cc: GPU). Adding an op = a table entry, a Body and its functors.

#ifndef KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_
#define KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_

#include <cstring>
#include <string>

#include "../sapa_attrs.h"
#include "../sapa_opspec.h"
#include "sapa_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace keras_sapa {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

constexpr int kMaxOutputs = 4;

// One call of an op: its context, the bound sizes and the allocated outputs.
struct Call {
  OpKernelContext* ctx;
  const OpSpec& op;
  Sizes sizes;
  Tensor* outputs[kMaxOutputs] = {};

  const Tensor& in(int i) const { return ctx->input(i); }
  Tensor* out(int i) const { return outputs[i]; }
  int64_t size(const char* symbol) const { return sizes.Symbol(op, symbol); }
  template <typename T>
  const T* in_data(int i) const { return in(i).flat<T>().data(); }
  template <typename T>
  T* out_data(int i) const { return outputs[i]->flat<T>().data(); }
  // fn() unless output i has no elements.
  template <typename Fn>
  Status Unless0(int i, Fn fn) const {
    return outputs[i]->NumElements() == 0 ? absl::OkStatus() : fn();
  }
  // The input, else the output, of that name (the table's), or nullptr.
  const Tensor* named(const char* name) const {
    for (int i = 0; i < op.num_inputs; ++i) {
      if (std::strcmp(op.inputs[i].name, name) == 0) return &in(i);
    }
    for (int i = 0; i < op.num_outputs; ++i) {
      if (std::strcmp(op.outputs[i].name, name) == 0) return outputs[i];
    }
    return nullptr;
  }

  // The window sizes with `channels` as the high/low channel count.
  WindowDims dims(int64_t channels) const {
    WindowDims d;
    d.batch = size("B");
    d.height = size("H");
    d.width = size("W");
    d.up = sizes.attrs[optable::kAttr_up_factor];
    d.kernel = sizes.attrs[optable::kAttr_kernel_size];
    d.channels = channels;
    return d;
  }

  // The SAPA-D sizes, or an InvalidArgument when the maps are too large for the kernels.
  Status deform_dims(DeformDims* d) const {
    d->batch = size("B");
    d->height = size("H");
    d->width = size("W");
    d->up = sizes.attrs[optable::kAttr_up_factor];
    d->points = sizes.attrs[optable::kAttr_num_points];
    d->groups = sizes.attrs[optable::kAttr_groups];
    // The halves lack E (DeformAggregate) or Cg (DeformSimilarity): 0 channels there.
    const int64_t e = size("E"), cg = size("Cg");
    d->dim = e < 0 ? 0 : d->groups * e;
    d->channels = cg < 0 ? 0 : d->groups * cg;
    if (!d->Valid()) {
      return tsl::errors::InvalidArgument(
          "SAPA-D: the low-resolution maps are too large for the kernels ((H+1)*(W+1) must "
          "fit in int32). Received: H=",
          d->height, ", W=", d->width);
    }
    return absl::OkStatus();
  }

  // Binds the sizes from the inputs and allocates every output.
  Status Prepare() {
    const int64_t* shapes[kMaxRank + 4];
    int ranks[kMaxRank + 4];
    int64_t storage[kMaxRank + 4][kMaxRank];
    for (int i = 0; i < op.num_inputs; ++i) {
      const Tensor& t = in(i);
      ranks[i] = t.dims();
      if (ranks[i] > kMaxRank) ranks[i] = kMaxRank + 1;  // reported as a rank error
      for (int j = 0; j < t.dims() && j < kMaxRank; ++j) storage[i][j] = t.dim_size(j);
      shapes[i] = storage[i];
    }
    const std::string problem = BindInputs(op, shapes, ranks, &sizes);
    if (!problem.empty()) return tsl::errors::InvalidArgument(problem);
    for (int k = 0; k < op.num_outputs; ++k) {
      int64_t dims[kMaxRank];
      OutputShape(op, k, sizes, dims);
      TensorShape shape;
      for (int j = 0; j < op.outputs[k].rank; ++j) shape.AddDim(dims[j]);
      TF_RETURN_IF_ERROR(ctx->allocate_output(k, shape, &outputs[k]));
    }
    return absl::OkStatus();
  }
};

template <typename Body, typename Device, typename T, typename F>
class TableOp : public OpKernel {
 public:
  explicit TableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadAttrs(ctx, Body::kSpec, attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    Call call{ctx, Body::kSpec};
    for (int i = 0; i < kMaxAttrs; ++i) call.sizes.attrs[i] = attrs_[i];
    OP_REQUIRES_OK(ctx, call.Prepare());
    OP_REQUIRES_OK(ctx, (Body::template Run<Device, T, F>(call)));
  }

 private:
  int64_t attrs_[kMaxAttrs] = {};
};

// ------------------------------------------------------------------------- op bodies
// Each names the functors its op runs; outputs with no elements are left alone.

// The window ops are compositions of the three primitives (sapa_kernels.h): a step runs
// one primitive on two inputs into one output, with the channels of the symbol `Channels`.
enum class Primitive { kDot, kGather, kScatter };
struct Step {
  Primitive primitive;
  int a, b, out;  // input, input, output index
};

template <typename Device, typename T, size_t N>
Status RunSteps(const Call& c, const char* channels, const Step (&steps)[N]) {
  const WindowDims d = c.dims(c.size(channels));
  for (const Step& s : steps) {
    TF_RETURN_IF_ERROR(c.Unless0(s.out, [&] {
      const T *a = c.in_data<T>(s.a), *b = c.in_data<T>(s.b);
      T* out = c.out_data<T>(s.out);
      switch (s.primitive) {
        case Primitive::kDot: return functor::WindowDot<Device, T>()(c.ctx, d, a, b, out);
        case Primitive::kGather: return functor::WindowGather<Device, T>()(c.ctx, d, a, b, out);
        default: return functor::WindowScatter<Device, T>()(c.ctx, d, a, b, out);
      }
    }));
  }
  return absl::OkStatus();
}

#define KERAS_SAPA_WINDOW_BODY(NAME, CHANNELS, ...)                 \
  struct NAME##Body {                                              \
    static constexpr const OpSpec& kSpec = optable::k##NAME;       \
    template <typename Device, typename T, typename F>             \
    static Status Run(const Call& c) {                             \
      static constexpr Step kSteps[] = {__VA_ARGS__};              \
      return RunSteps<Device, T>(c, CHANNELS, kSteps);             \
    }                                                              \
  };

// similarity = Dot(query, key).
KERAS_SAPA_WINDOW_BODY(Similarity, "d", {Primitive::kDot, 0, 1, 0})
// (grad_query, grad_key) = (Gather(grad, key), Scatter(grad, query)).
KERAS_SAPA_WINDOW_BODY(SimilarityGrad, "d", {Primitive::kGather, 0, 2, 0},
                       {Primitive::kScatter, 0, 1, 1})
// output = Gather(weights, value).
KERAS_SAPA_WINDOW_BODY(Aggregate, "C", {Primitive::kGather, 0, 1, 0})
// (grad_weights, grad_value) = (Dot(grad, value), Scatter(weights, grad)).
KERAS_SAPA_WINDOW_BODY(AggregateGrad, "C", {Primitive::kDot, 0, 2, 0},
                       {Primitive::kScatter, 1, 0, 1})
#undef KERAS_SAPA_WINDOW_BODY

// The fused ops: SapaForward (query, key, value) -> (output, weights), SapaBackward
// (grad, query, key, value, weights) -> (grad_query, grad_key, grad_value), and SAPA-D's
// DeformForward (query, key, value, offsets) -> (output, weights), DeformBackward (grad,
// query, key, value, offsets, weights) -> (grad_query, grad_key, grad_value,
// grad_offsets). Nothing to do when the saved softmax `weights` is empty.
template <const OpSpec& Spec, functor::Fused kOp>
struct FusedBody {
  static constexpr const OpSpec& kSpec = Spec;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    const Tensor* weights = c.named("weights");
    return weights->NumElements() == 0 ? absl::OkStatus()
                                       : functor::FusedOp<kOp, Device, T, F>()(c);
  }
};
using SapaBody = FusedBody<optable::kSapa, functor::Fused::kSapaForward>;
using SapaGradBody = FusedBody<optable::kSapaGrad, functor::Fused::kSapaBackward>;
using SapaDeformBody = FusedBody<optable::kSapaDeform, functor::Fused::kDeformForward>;
using SapaDeformGradBody = FusedBody<optable::kSapaDeformGrad, functor::Fused::kDeformBackward>;

// SAPA-D's halves, float and double (the table's DeformSimilarity (query, key, offsets)
// -> logits, DeformSimilarityGrad (grad, query, key, offsets) -> (grad_query, grad_key,
// grad_offsets), DeformAggregate (weights, value, offsets) -> output, DeformAggregateGrad
// (grad, weights, value, offsets) -> (grad_weights, grad_value, grad_offsets)): each
// device's functor::DeformHalfOp runs one on the call's tensors in the table's order, with
// Call::deform_dims. Nothing to do when the offsets are empty (every output is then).
enum class DeformHalf { kSimilarity, kSimilarityBackward, kAggregate, kAggregateBackward };

namespace functor {
template <DeformHalf kOp, typename Device, typename T>
struct DeformHalfOp {
  Status operator()(const Call& c) const;
};
}  // namespace functor

template <const OpSpec& Spec, DeformHalf kOp>
struct DeformHalfBody {
  static constexpr const OpSpec& kSpec = Spec;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    return c.named("offsets")->NumElements() == 0 ? absl::OkStatus()
                                                  : functor::DeformHalfOp<kOp, Device, T>()(c);
  }
};
using DeformSimilarityBody = DeformHalfBody<optable::kDeformSimilarity, DeformHalf::kSimilarity>;
using DeformSimilarityGradBody =
    DeformHalfBody<optable::kDeformSimilarityGrad, DeformHalf::kSimilarityBackward>;
using DeformAggregateBody = DeformHalfBody<optable::kDeformAggregate, DeformHalf::kAggregate>;
using DeformAggregateGradBody =
    DeformHalfBody<optable::kDeformAggregateGrad, DeformHalf::kAggregateBackward>;

// Registers every op of the table for DEVICE_NAME with the functors of DEVICE, for each
// type instantiation the table lists (F = void: no Tweights attribute).
#define KERAS_SAPA_TWEIGHTS_void
#define KERAS_SAPA_TWEIGHTS_float .TypeConstraint<float>("Tweights")
#define KERAS_SAPA_TWEIGHTS_double .TypeConstraint<double>("Tweights")
#define KERAS_SAPA_REGISTER_KERNEL_TYPED(DEVICE_NAME, DEVICE, NAME, T, F)              \
  REGISTER_KERNEL_BUILDER(Name(::keras_sapa::optable::k##NAME.name)                    \
                              .Device(DEVICE_NAME)                                     \
                              .TypeConstraint<T>("T") KERAS_SAPA_TWEIGHTS_##F,         \
                          ::keras_sapa::TableOp<::keras_sapa::NAME##Body, DEVICE, T, F>);

}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_
