// SAPA-D's TensorFlow CPU kernels: the op bodies of KerasSapa>SapaDeform and
// KerasSapa>SapaDeformGrad for the table-driven TableOp of sapa_op_kernels.h, on the
// framework-free core custom_ops/sapa/kernels/cpu/sapa_deform_cpu.h.
//
// Included by sapa_kernels.cc after its CPU helpers (tf_cpu::Pool, ComputeView,
// ComputeOut) and before the registration of the table's ops, which instantiates these
// bodies for DEVICE_CPU. SAPA-D has no TensorFlow GPU kernel yet (the op table lists it for
// "cpu" only, so the GPU adapter does not register it and TensorFlow places it on the CPU).
//
// Sizes come from the table's symbols: query/key channels groups*E, value/output channels
// groups*Cg, offsets 2*groups*num_points, the saved softmax groups*num_points. float and
// double compute in their own type; half and bfloat16 through float copies, the softmax
// kept in float (Tweights), as the fused SAPA op does.

#ifndef KERAS_SAPA_KERNELS_SAPA_DEFORM_BODY_H_
#define KERAS_SAPA_KERNELS_SAPA_DEFORM_BODY_H_

#include <string>
#include <type_traits>

#include "../../kernels/cpu/sapa_deform_cpu.h"
#include "sapa_op_kernels.h"

namespace keras_sapa {
namespace tf_cpu {

// The core's shape of one SAPA-D call, or an InvalidArgument when the maps are too large.
inline Status DeformDims(const Call& c, cpu::deform::DeformShape* d) {
  d->batch = c.size("B");
  d->height = c.size("H");
  d->width = c.size("W");
  d->up = c.sizes.attrs[optable::kAttr_up_factor];
  d->points = c.sizes.attrs[optable::kAttr_num_points];
  d->groups = c.sizes.attrs[optable::kAttr_groups];
  d->dim = d->groups * c.size("E");
  d->channels = d->groups * c.size("Cg");
  if (!d->Valid()) {
    return tsl::errors::InvalidArgument(
        "SAPA-D: the low-resolution maps are too large for the kernels ((H+1)*(W+1) must fit "
        "in int32). Received: H=",
        d->height, ", W=", d->width);
  }
  return absl::OkStatus();
}

// Compute-type views of the inputs first..first+n-1 (n <= 6).
template <typename T, typename F>
struct Views {
  Tensor tmp[6];
  const F* data[6] = {};
  Status Init(const Call& c, int first, int n) {
    for (int i = 0; i < n; ++i) {
      TF_RETURN_IF_ERROR((ComputeView<T, F>(c.ctx, c.in(first + i), &tmp[i], &data[i])));
    }
    return absl::OkStatus();
  }
};

}  // namespace tf_cpu

// (output, weights) = DeformForward(query, key, value, offsets).
struct SapaDeformBody {
  static constexpr const OpSpec& kSpec = optable::kSapaDeform;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    static_assert(std::is_same<Device, CPUDevice>::value, "SAPA-D has CPU kernels only");
    cpu::deform::DeformShape d;
    TF_RETURN_IF_ERROR(tf_cpu::DeformDims(c, &d));
    if (c.out(1)->NumElements() == 0 && c.out(0)->NumElements() == 0) return absl::OkStatus();
    tf_cpu::Views<T, F> in;
    TF_RETURN_IF_ERROR(in.Init(c, 0, 4));
    tf_cpu::ComputeOut<T, F> out;
    TF_RETURN_IF_ERROR(out.Init(c.ctx, c.out(0)));
    cpu::deform::DeformForward<F>(tf_cpu::Pool(c.ctx), d, in.data[0], in.data[1], in.data[2],
                                  in.data[3], out.data, c.out_data<F>(1));
    out.Finish(c.ctx);
    return absl::OkStatus();
  }
};

// (grad_query, grad_key, grad_value, grad_offsets) = DeformBackward(grad, query, key,
// value, offsets, weights).
struct SapaDeformGradBody {
  static constexpr const OpSpec& kSpec = optable::kSapaDeformGrad;
  template <typename Device, typename T, typename F>
  static Status Run(const Call& c) {
    static_assert(std::is_same<Device, CPUDevice>::value, "SAPA-D has CPU kernels only");
    cpu::deform::DeformShape d;
    TF_RETURN_IF_ERROR(tf_cpu::DeformDims(c, &d));
    tf_cpu::Views<T, F> in;
    TF_RETURN_IF_ERROR(in.Init(c, 0, 5));
    const Tensor& weights = c.in(5);
    Tensor dlogits;
    TF_RETURN_IF_ERROR(c.ctx->allocate_temp(tensorflow::DataTypeToEnum<F>::value,
                                            TensorShape({weights.NumElements()}), &dlogits));
    tf_cpu::ComputeOut<T, F> grads[4];
    for (int i = 0; i < 4; ++i) TF_RETURN_IF_ERROR(grads[i].Init(c.ctx, c.out(i)));
    cpu::deform::DeformBackward<F>(tf_cpu::Pool(c.ctx), d, in.data[0], in.data[1], in.data[2],
                                   in.data[3], in.data[4], weights.flat<F>().data(),
                                   dlogits.flat<F>().data(), grads[0].data, grads[1].data,
                                   grads[2].data, grads[3].data);
    for (auto& g : grads) g.Finish(c.ctx);
    return absl::OkStatus();
  }
};

}  // namespace keras_sapa

#endif  // KERAS_SAPA_KERNELS_SAPA_DEFORM_BODY_H_
