// _sapa_jax.so: XLA FFI handlers (CPU) of the fused SAPA forward and backward, for JAX
// (keras_sapa/ops/_jax_kernels.py registers them with jax.ffi.register_ffi_target).
// They call the C entry points of _sapa_core.so (linked, found through $ORIGIN), so JAX
// and PyTorch share one kernel build and one thread pool. Headers: jax.ffi.include_dir().
//
//   keras_sapa_forward  (query, key, value; kernel_size, up_factor) -> (out, weights)
//   keras_sapa_backward (grad, query, key, value, weights; kernel_size, up_factor)
//                                                           -> (dquery, dkey, dvalue)
//
// float32 and float64 (the caller converts half types). Tensors are channels last; every
// dimension before the last three is a batch dimension (so vmap_method="broadcast_all"
// just adds batch dimensions). Shapes are checked by the op table's rule (sapa_opspec.h,
// ops KerasSapa>Sapa / SapaGrad), as in the TensorFlow kernels.

#include <cstdint>
#include <initializer_list>
#include <string>

#include "sapa_core_c.h"
#include "sapa_opspec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Dims = ffi::AnyBuffer::Dimensions;
using keras_sapa::OpSpec;
using keras_sapa::Sizes;

std::string ShapeString(Dims dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// Checks the buffers of one call against the op table's shapes, every dimension before
// the last three being a batch dimension (the same for all buffers, folded into B), and
// fills the sizes. `outputs` are checked against the shapes the table derives.
ffi::Error Bind(const OpSpec& op, std::initializer_list<Dims> inputs,
                std::initializer_list<Dims> outputs, int64_t kernel_size, int64_t up_factor,
                Sizes* sizes) {
  sizes->attrs[keras_sapa::optable::kAttr_kernel_size] = kernel_size;
  sizes->attrs[keras_sapa::optable::kAttr_up_factor] = up_factor;
  for (int i = 0; i < op.num_attrs; ++i) {
    const std::string problem =
        keras_sapa::CheckAttr(op.attrs[i], sizes->attrs[op.attrs[i].index]);
    if (!problem.empty()) return ffi::Error::InvalidArgument("keras_sapa: " + problem);
  }
  const Dims ref = *inputs.begin();
  int64_t folded[keras_sapa::kMaxRank + 4][4];
  const int64_t* shapes[keras_sapa::kMaxRank + 4];
  int ranks[keras_sapa::kMaxRank + 4];
  int n = 0;
  for (Dims d : inputs) {
    bool ok = d.size() >= 3 && d.size() == ref.size() && n < keras_sapa::kMaxRank + 4;
    for (size_t i = 0; ok && i + 3 < d.size(); ++i) ok = d[i] == ref[i];
    if (!ok) {
      return ffi::Error::InvalidArgument(
          std::string("keras_sapa: `") + op.inputs[n].name + "` has shape " + ShapeString(d) +
          ", expected the batch dimensions of `" + op.inputs[0].name + "` " +
          ShapeString(ref) + " followed by three dimensions");
    }
    folded[n][0] = 1;
    for (size_t i = 0; i + 3 < d.size(); ++i) folded[n][0] *= d[i];
    for (int j = 1; j < 4; ++j) folded[n][j] = d[d.size() - 4 + j];
    shapes[n] = folded[n];
    ranks[n] = 4;
    ++n;
  }
  const std::string problem = keras_sapa::BindInputs(op, shapes, ranks, sizes);
  if (!problem.empty()) return ffi::Error::InvalidArgument("keras_sapa: " + problem);
  int k = 0;
  for (Dims d : outputs) {
    int64_t want[keras_sapa::kMaxRank];
    keras_sapa::OutputShape(op, k, *sizes, want);
    bool ok = d.size() == ref.size();
    for (size_t i = 0; ok && i + 3 < d.size(); ++i) ok = d[i] == ref[i];
    for (int j = 1; ok && j < 4; ++j) ok = d[d.size() - 4 + j] == want[j];
    if (!ok) {
      return ffi::Error::InvalidArgument(std::string("keras_sapa: result `") +
                                         op.outputs[k].name + "` has shape " + ShapeString(d));
    }
    ++k;
  }
  return ffi::Error::Success();
}

ffi::Error CheckTypes(std::initializer_list<ffi::DataType> types) {
  const ffi::DataType dtype = *types.begin();
  for (ffi::DataType t : types) {
    if (t != dtype) {
      return ffi::Error::InvalidArgument("keras_sapa: all tensors must have one dtype");
    }
  }
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::F64) {
    return ffi::Error::InvalidArgument("keras_sapa: only float32 and float64 are supported");
  }
  return ffi::Error::Success();
}

// The core's C entry points, by type.
int CoreForward(const float* q, const float* k, const float* v, float* o, float* w,
                int64_t b, int64_t h, int64_t wd, int64_t s, int64_t kk, int64_t d, int64_t c) {
  return keras_sapa_forward_f32(q, k, v, o, w, b, h, wd, s, kk, d, c);
}
int CoreForward(const double* q, const double* k, const double* v, double* o, double* w,
                int64_t b, int64_t h, int64_t wd, int64_t s, int64_t kk, int64_t d, int64_t c) {
  return keras_sapa_forward_f64(q, k, v, o, w, b, h, wd, s, kk, d, c);
}
int CoreBackward(const float* g, const float* q, const float* k, const float* v,
                 const float* w, float* dq, float* dk, float* dv, int64_t b, int64_t h,
                 int64_t wd, int64_t s, int64_t kk, int64_t d, int64_t c) {
  return keras_sapa_backward_f32(g, q, k, v, w, dq, dk, dv, b, h, wd, s, kk, d, c);
}
int CoreBackward(const double* g, const double* q, const double* k, const double* v,
                 const double* w, double* dq, double* dk, double* dv, int64_t b, int64_t h,
                 int64_t wd, int64_t s, int64_t kk, int64_t d, int64_t c) {
  return keras_sapa_backward_f64(g, q, k, v, w, dq, dk, dv, b, h, wd, s, kk, d, c);
}

template <typename T>
const T* In(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

// The core's size arguments (batch, height, width, up, kernel, dim, channels).
struct CoreSizes {
  int64_t b, h, w, s, k, d, c;
};

CoreSizes Core(const OpSpec& op, const Sizes& z) {
  return {z.Symbol(op, "B"), z.Symbol(op, "H"), z.Symbol(op, "W"),
          z.attrs[keras_sapa::optable::kAttr_up_factor],
          z.attrs[keras_sapa::optable::kAttr_kernel_size], z.Symbol(op, "d"), z.Symbol(op, "C")};
}

template <typename T>
int Forward(const Sizes& z, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
            ffi::Result<ffi::AnyBuffer>& out, ffi::Result<ffi::AnyBuffer>& weights) {
  const CoreSizes n = Core(keras_sapa::optable::kSapa, z);
  return CoreForward(In<T>(q), In<T>(k), In<T>(v), Out<T>(out), Out<T>(weights), n.b, n.h, n.w,
                     n.s, n.k, n.d, n.c);
}

template <typename T>
int Backward(const Sizes& z, ffi::AnyBuffer g, ffi::AnyBuffer q, ffi::AnyBuffer k,
             ffi::AnyBuffer v, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer>& dq,
             ffi::Result<ffi::AnyBuffer>& dk, ffi::Result<ffi::AnyBuffer>& dv) {
  const CoreSizes n = Core(keras_sapa::optable::kSapaGrad, z);
  return CoreBackward(In<T>(g), In<T>(q), In<T>(k), In<T>(v), In<T>(w), Out<T>(dq), Out<T>(dk),
                      Out<T>(dv), n.b, n.h, n.w, n.s, n.k, n.d, n.c);
}

ffi::Error ForwardImpl(ffi::AnyBuffer query, ffi::AnyBuffer key, ffi::AnyBuffer value,
                       int64_t kernel_size, int64_t up_factor,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> weights) {
  Sizes s;
  if (ffi::Error e = Bind(keras_sapa::optable::kSapa,
                          {query.dimensions(), key.dimensions(), value.dimensions()},
                          {out->dimensions(), weights->dimensions()}, kernel_size, up_factor, &s);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckTypes({query.element_type(), key.element_type(), value.element_type(),
                                 out->element_type(), weights->element_type()});
      e.failure()) {
    return e;
  }
  const int rc = query.element_type() == ffi::DataType::F32
                     ? Forward<float>(s, query, key, value, out, weights)
                     : Forward<double>(s, query, key, value, out, weights);
  if (rc != KERAS_SAPA_OK) return ffi::Error::Internal("keras_sapa: forward kernel failed");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer grad, ffi::AnyBuffer query, ffi::AnyBuffer key,
                        ffi::AnyBuffer value, ffi::AnyBuffer weights, int64_t kernel_size,
                        int64_t up_factor, ffi::Result<ffi::AnyBuffer> dquery,
                        ffi::Result<ffi::AnyBuffer> dkey, ffi::Result<ffi::AnyBuffer> dvalue) {
  Sizes s;
  if (ffi::Error e = Bind(keras_sapa::optable::kSapaGrad,
                          {grad.dimensions(), query.dimensions(), key.dimensions(),
                           value.dimensions(), weights.dimensions()},
                          {dquery->dimensions(), dkey->dimensions(), dvalue->dimensions()},
                          kernel_size, up_factor, &s);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckTypes({query.element_type(), grad.element_type(), key.element_type(),
                                 value.element_type(), weights.element_type(),
                                 dquery->element_type(), dkey->element_type(),
                                 dvalue->element_type()});
      e.failure()) {
    return e;
  }
  const int rc = query.element_type() == ffi::DataType::F32
                     ? Backward<float>(s, grad, query, key, value, weights, dquery, dkey, dvalue)
                     : Backward<double>(s, grad, query, key, value, weights, dquery, dkey,
                                        dvalue);
  if (rc != KERAS_SAPA_OK) return ffi::Error::Internal("keras_sapa: backward kernel failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasSapaForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("up_factor")
                                  .Ret<ffi::AnyBuffer>()   // out
                                  .Ret<ffi::AnyBuffer>());  // weights

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasSapaBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Arg<ffi::AnyBuffer>()  // weights
                                  .Attr<int64_t>("kernel_size")
                                  .Attr<int64_t>("up_factor")
                                  .Ret<ffi::AnyBuffer>()   // dquery
                                  .Ret<ffi::AnyBuffer>()   // dkey
                                  .Ret<ffi::AnyBuffer>());  // dvalue
