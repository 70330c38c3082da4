// SAPA-D's XLA FFI handlers (CPU) in _sapa_jax.so, beside SAPA's (sapa_xla_ffi.cc), for
// JAX (keras_sapa/ops/_jax_deform_kernels.py registers them). They call the C entry points
// of _sapa_core.so (sapa_deform_core_c.h), so JAX and PyTorch share one kernel build and
// one thread pool.
//
//   keras_sapa_deform_forward  (query, key, value, offsets; num_points, up_factor, groups)
//                                                        -> (out, weights)
//   keras_sapa_deform_backward (grad, query, key, value, offsets, weights; same attributes)
//                                                        -> (dquery, dkey, dvalue, doffsets)
//
// float32 and float64 (the caller converts half types). Channels last; every dimension
// before the last three is a batch dimension (vmap_method="broadcast_all" adds some).
// Shapes are checked by the op table's rule (sapa_opspec.h, ops KerasSapa>SapaDeform /
// SapaDeformGrad), as in the TensorFlow kernels.

#include <cstdint>
#include <initializer_list>
#include <string>

#include "sapa_deform_core_c.h"
#include "sapa_opspec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Dims = ffi::AnyBuffer::Dimensions;
using keras_sapa::OpSpec;
using keras_sapa::Sizes;
namespace optable = keras_sapa::optable;

std::string DimsString(Dims dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// The attributes of a SAPA-D call, checked as the table says.
ffi::Error SetAttrs(const OpSpec& op, int64_t num_points, int64_t up_factor, int64_t groups,
                    Sizes* sizes) {
  sizes->attrs[optable::kAttr_num_points] = num_points;
  sizes->attrs[optable::kAttr_up_factor] = up_factor;
  sizes->attrs[optable::kAttr_groups] = groups;
  for (int i = 0; i < op.num_attrs; ++i) {
    const std::string problem =
        keras_sapa::CheckAttr(op.attrs[i], sizes->attrs[op.attrs[i].index]);
    if (!problem.empty()) return ffi::Error::InvalidArgument("keras_sapa: " + problem);
  }
  return ffi::Error::Success();
}

// Checks the buffers against the table's shapes (leading dimensions folded into B, the
// same for every buffer) and binds the size symbols.
ffi::Error Bind(const OpSpec& op, std::initializer_list<Dims> inputs,
                std::initializer_list<Dims> outputs, Sizes* sizes) {
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
          std::string("keras_sapa: `") + op.inputs[n].name + "` has shape " + DimsString(d) +
          ", expected the batch dimensions of `" + op.inputs[0].name + "` " + DimsString(ref) +
          " followed by three dimensions");
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
                                         op.outputs[k].name + "` has shape " + DimsString(d));
    }
    ++k;
  }
  return ffi::Error::Success();
}

ffi::Error OneFloatType(std::initializer_list<ffi::DataType> types) {
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

// The core's size arguments (batch, height, width, up, points, groups, dim, channels).
struct CoreSizes {
  int64_t b, h, w, s, p, g, d, c;
};

CoreSizes Core(const OpSpec& op, const Sizes& z) {
  const int64_t g = z.attrs[optable::kAttr_groups];
  return {z.Symbol(op, "B"), z.Symbol(op, "H"), z.Symbol(op, "W"),
          z.attrs[optable::kAttr_up_factor], z.attrs[optable::kAttr_num_points], g,
          g * z.Symbol(op, "E"), g * z.Symbol(op, "Cg")};
}

template <typename T>
const T* In(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

int CoreForward(const float* q, const float* k, const float* v, const float* o, float* out,
                float* w, const CoreSizes& n) {
  return keras_sapa_deform_forward_f32(q, k, v, o, out, w, n.b, n.h, n.w, n.s, n.p, n.g, n.d,
                                       n.c);
}
int CoreForward(const double* q, const double* k, const double* v, const double* o,
                double* out, double* w, const CoreSizes& n) {
  return keras_sapa_deform_forward_f64(q, k, v, o, out, w, n.b, n.h, n.w, n.s, n.p, n.g, n.d,
                                       n.c);
}
int CoreBackward(const float* g, const float* q, const float* k, const float* v,
                 const float* o, const float* w, float* dq, float* dk, float* dv, float* doff,
                 const CoreSizes& n) {
  return keras_sapa_deform_backward_f32(g, q, k, v, o, w, dq, dk, dv, doff, n.b, n.h, n.w, n.s,
                                        n.p, n.g, n.d, n.c);
}
int CoreBackward(const double* g, const double* q, const double* k, const double* v,
                 const double* o, const double* w, double* dq, double* dk, double* dv,
                 double* doff, const CoreSizes& n) {
  return keras_sapa_deform_backward_f64(g, q, k, v, o, w, dq, dk, dv, doff, n.b, n.h, n.w, n.s,
                                        n.p, n.g, n.d, n.c);
}

template <typename T>
int Forward(const CoreSizes& n, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
            ffi::AnyBuffer o, ffi::Result<ffi::AnyBuffer>& out,
            ffi::Result<ffi::AnyBuffer>& weights) {
  return CoreForward(In<T>(q), In<T>(k), In<T>(v), In<T>(o), Out<T>(out), Out<T>(weights), n);
}

template <typename T>
int Backward(const CoreSizes& n, ffi::AnyBuffer g, ffi::AnyBuffer q, ffi::AnyBuffer k,
             ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer w,
             ffi::Result<ffi::AnyBuffer>& dq, ffi::Result<ffi::AnyBuffer>& dk,
             ffi::Result<ffi::AnyBuffer>& dv, ffi::Result<ffi::AnyBuffer>& doff) {
  return CoreBackward(In<T>(g), In<T>(q), In<T>(k), In<T>(v), In<T>(o), In<T>(w), Out<T>(dq),
                      Out<T>(dk), Out<T>(dv), Out<T>(doff), n);
}

ffi::Error ForwardImpl(ffi::AnyBuffer query, ffi::AnyBuffer key, ffi::AnyBuffer value,
                       ffi::AnyBuffer offsets, int64_t num_points, int64_t up_factor,
                       int64_t groups, ffi::Result<ffi::AnyBuffer> out,
                       ffi::Result<ffi::AnyBuffer> weights) {
  const OpSpec& op = optable::kSapaDeform;
  Sizes s;
  if (ffi::Error e = SetAttrs(op, num_points, up_factor, groups, &s); e.failure()) return e;
  if (ffi::Error e = Bind(op,
                          {query.dimensions(), key.dimensions(), value.dimensions(),
                           offsets.dimensions()},
                          {out->dimensions(), weights->dimensions()}, &s);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = OneFloatType({query.element_type(), key.element_type(),
                                   value.element_type(), offsets.element_type(),
                                   out->element_type(), weights->element_type()});
      e.failure()) {
    return e;
  }
  const CoreSizes n = Core(op, s);
  const int rc = query.element_type() == ffi::DataType::F32
                     ? Forward<float>(n, query, key, value, offsets, out, weights)
                     : Forward<double>(n, query, key, value, offsets, out, weights);
  if (rc != KERAS_SAPA_OK) return ffi::Error::Internal("keras_sapa: SAPA-D forward failed");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer grad, ffi::AnyBuffer query, ffi::AnyBuffer key,
                        ffi::AnyBuffer value, ffi::AnyBuffer offsets, ffi::AnyBuffer weights,
                        int64_t num_points, int64_t up_factor, int64_t groups,
                        ffi::Result<ffi::AnyBuffer> dquery, ffi::Result<ffi::AnyBuffer> dkey,
                        ffi::Result<ffi::AnyBuffer> dvalue,
                        ffi::Result<ffi::AnyBuffer> doffsets) {
  const OpSpec& op = optable::kSapaDeformGrad;
  Sizes s;
  if (ffi::Error e = SetAttrs(op, num_points, up_factor, groups, &s); e.failure()) return e;
  if (ffi::Error e = Bind(op,
                          {grad.dimensions(), query.dimensions(), key.dimensions(),
                           value.dimensions(), offsets.dimensions(), weights.dimensions()},
                          {dquery->dimensions(), dkey->dimensions(), dvalue->dimensions(),
                           doffsets->dimensions()},
                          &s);
      e.failure()) {
    return e;
  }
  if (ffi::Error e = OneFloatType({grad.element_type(), query.element_type(),
                                   key.element_type(), value.element_type(),
                                   offsets.element_type(), weights.element_type(),
                                   dquery->element_type(), dkey->element_type(),
                                   dvalue->element_type(), doffsets->element_type()});
      e.failure()) {
    return e;
  }
  const CoreSizes n = Core(op, s);
  const int rc =
      query.element_type() == ffi::DataType::F32
          ? Backward<float>(n, grad, query, key, value, offsets, weights, dquery, dkey, dvalue,
                            doffsets)
          : Backward<double>(n, grad, query, key, value, offsets, weights, dquery, dkey, dvalue,
                             doffsets);
  if (rc != KERAS_SAPA_OK) return ffi::Error::Internal("keras_sapa: SAPA-D backward failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasSapaDeformForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Arg<ffi::AnyBuffer>()  // offsets
                                  .Attr<int64_t>("num_points")
                                  .Attr<int64_t>("up_factor")
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::AnyBuffer>()   // out
                                  .Ret<ffi::AnyBuffer>());  // weights

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasSapaDeformBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // grad
                                  .Arg<ffi::AnyBuffer>()  // query
                                  .Arg<ffi::AnyBuffer>()  // key
                                  .Arg<ffi::AnyBuffer>()  // value
                                  .Arg<ffi::AnyBuffer>()  // offsets
                                  .Arg<ffi::AnyBuffer>()  // weights
                                  .Attr<int64_t>("num_points")
                                  .Attr<int64_t>("up_factor")
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::AnyBuffer>()   // dquery
                                  .Ret<ffi::AnyBuffer>()   // dkey
                                  .Ret<ffi::AnyBuffer>()   // dvalue
                                  .Ret<ffi::AnyBuffer>());  // doffsets
