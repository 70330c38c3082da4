// Device-generic OpKernels of the keras_sapa ops. Included by the CPU kernel file (which
// registers them for DEVICE_CPU) and by the GPU adapter (DEVICE_GPU), each supplying the
// device functors of sapa_kernels.h.
//
// One kernel template, TableOp<Body, Device, T, F>, serves every op of the table
// (sapa_opspec.h): it reads and checks the attributes, binds the size symbols from the
// inputs (an InvalidArgument naming the input and its shape otherwise), allocates every
// output from the table's shapes and hands the call to the op's Body, which names the
// functors it runs. Adding an op = a table entry, a Body and its functors.

#ifndef KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_
#define KERAS_SAPA_KERNELS_SAPA_OP_KERNELS_H_

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

// similarity = Dot(query, key).
struct SimilarityBody {
  static constexpr const OpSpec& kSpec = optable::kSimilarity;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    return c.Unless0(0, [&] {
      return functor::WindowDot<Device, T>()(c.ctx, c.dims(c.size("d")), c.in_data<T>(0),
                                             c.in_data<T>(1), c.out_data<T>(0));
    });
  }
};

// (grad_query, grad_key) = (Gather(grad, key), Scatter(grad, query)).
struct SimilarityGradBody {
  static constexpr const OpSpec& kSpec = optable::kSimilarityGrad;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    const WindowDims d = c.dims(c.size("d"));
    const T *grad = c.in_data<T>(0), *query = c.in_data<T>(1), *key = c.in_data<T>(2);
    TF_RETURN_IF_ERROR(c.Unless0(0, [&] {
      return functor::WindowGather<Device, T>()(c.ctx, d, grad, key, c.out_data<T>(0));
    }));
    return c.Unless0(1, [&] {
      return functor::WindowScatter<Device, T>()(c.ctx, d, grad, query, c.out_data<T>(1));
    });
  }
};

// output = Gather(weights, value).
struct AggregateBody {
  static constexpr const OpSpec& kSpec = optable::kAggregate;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    return c.Unless0(0, [&] {
      return functor::WindowGather<Device, T>()(c.ctx, c.dims(c.size("C")), c.in_data<T>(0),
                                                c.in_data<T>(1), c.out_data<T>(0));
    });
  }
};

// (grad_weights, grad_value) = (Dot(grad, value), Scatter(weights, grad)).
struct AggregateGradBody {
  static constexpr const OpSpec& kSpec = optable::kAggregateGrad;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    const WindowDims d = c.dims(c.size("C"));
    const T *grad = c.in_data<T>(0), *weights = c.in_data<T>(1), *value = c.in_data<T>(2);
    TF_RETURN_IF_ERROR(c.Unless0(0, [&] {
      return functor::WindowDot<Device, T>()(c.ctx, d, grad, value, c.out_data<T>(0));
    }));
    return c.Unless0(1, [&] {
      return functor::WindowScatter<Device, T>()(c.ctx, d, weights, grad, c.out_data<T>(1));
    });
  }
};

// (output, weights) = SapaForward(query, key, value).
struct SapaBody {
  static constexpr const OpSpec& kSpec = optable::kSapa;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    return c.Unless0(1, [&] {
      return functor::SapaForward<Device, T, F>()(c.ctx, c.dims(c.size("d")), c.size("C"),
                                                  c.in(0), c.in(1), c.in(2), c.out(0), c.out(1));
    });
  }
};

// (grad_query, grad_key, grad_value) = SapaBackward(grad, query, key, value, weights).
struct SapaGradBody {
  static constexpr const OpSpec& kSpec = optable::kSapaGrad;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    if (c.in(4).NumElements() == 0) return absl::OkStatus();
    return functor::SapaBackward<Device, T, F>()(c.ctx, c.dims(c.size("d")), c.size("C"),
                                                 c.in(0), c.in(1), c.in(2), c.in(3), c.in(4),
                                                 c.out(0), c.out(1), c.out(2));
  }
};

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
