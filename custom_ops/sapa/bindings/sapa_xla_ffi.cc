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
// just adds batch dimensions).

#include <cstdint>
#include <string>

#include "sapa_core_c.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The sizes of one call, read from key (B..., H, W, dim) and value (B..., H, W, C).
struct Sizes {
  int64_t batch = 1, height = 0, width = 0, dim = 0, channels = 0;
};

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// Checks that `t` is (B..., rows, cols, channels) with the batch dimensions of `ref`.
ffi::Error CheckShape(const char* name, ffi::AnyBuffer::Dimensions t,
                      ffi::AnyBuffer::Dimensions ref, int64_t rows, int64_t cols,
                      int64_t channels) {
  bool ok = t.size() == ref.size() && t.size() >= 3;
  for (size_t i = 0; ok && i + 3 < t.size(); ++i) ok = t[i] == ref[i];
  ok = ok && t[t.size() - 3] == rows && t[t.size() - 2] == cols && t[t.size() - 1] == channels;
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string("keras_sapa: `") + name + "` has shape " + ShapeString(t) + ", expected " +
      "the batch dimensions of `key` " + ShapeString(ref) + " followed by (" +
      std::to_string(rows) + ", " + std::to_string(cols) + ", " + std::to_string(channels) +
      ")");
}

ffi::Error ReadSizes(ffi::AnyBuffer key, ffi::AnyBuffer value, int64_t kernel, int64_t up,
                     Sizes* s) {
  if (kernel < 1 || kernel % 2 == 0) {
    return ffi::Error::InvalidArgument("keras_sapa: kernel_size must be a positive odd "
                                       "integer. Received: kernel_size=" +
                                       std::to_string(kernel));
  }
  if (up < 1) {
    return ffi::Error::InvalidArgument(
        "keras_sapa: up_factor must be a positive integer. Received: up_factor=" +
        std::to_string(up));
  }
  const auto k = key.dimensions();
  if (k.size() < 3) {
    return ffi::Error::InvalidArgument("keras_sapa: `key` must have rank >= 3. Received "
                                       "shape " + ShapeString(k));
  }
  const size_t rank = k.size();
  for (size_t i = 0; i + 3 < rank; ++i) s->batch *= k[i];
  s->height = k[rank - 3];
  s->width = k[rank - 2];
  s->dim = k[rank - 1];
  const auto v = value.dimensions();
  s->channels = v.size() == rank ? v[rank - 1] : -1;
  return CheckShape("value", v, k, s->height, s->width, s->channels);
}

ffi::Error CheckTypes(std::initializer_list<ffi::AnyBuffer> buffers, ffi::DataType dtype) {
  for (const ffi::AnyBuffer& b : buffers) {
    if (b.element_type() != dtype) {
      return ffi::Error::InvalidArgument("keras_sapa: all tensors must have one dtype");
    }
  }
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::F64) {
    return ffi::Error::InvalidArgument("keras_sapa: only float32 and float64 are supported");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer query, ffi::AnyBuffer key, ffi::AnyBuffer value,
                       int64_t kernel_size, int64_t up_factor,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> weights) {
  Sizes s;
  if (ffi::Error e = ReadSizes(key, value, kernel_size, up_factor, &s); e.failure()) return e;
  const auto kd = key.dimensions();
  const int64_t hh = s.height * up_factor, hw = s.width * up_factor;
  if (ffi::Error e = CheckShape("query", query.dimensions(), kd, hh, hw, s.dim); e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckShape("out", out->dimensions(), kd, hh, hw, s.channels); e.failure()) {
    return e;
  }
  if (ffi::Error e = CheckShape("weights", weights->dimensions(), kd, hh, hw,
                                kernel_size * kernel_size);
      e.failure()) {
    return e;
  }
  const ffi::DataType dtype = query.element_type();
  if (ffi::Error e = CheckTypes({key, value, *out, *weights}, dtype); e.failure()) return e;
  int rc;
  if (dtype == ffi::DataType::F32) {
    rc = keras_sapa_forward_f32(
        static_cast<const float*>(query.untyped_data()),
        static_cast<const float*>(key.untyped_data()),
        static_cast<const float*>(value.untyped_data()), static_cast<float*>(out->untyped_data()),
        static_cast<float*>(weights->untyped_data()), s.batch, s.height, s.width, up_factor,
        kernel_size, s.dim, s.channels);
  } else {
    rc = keras_sapa_forward_f64(
        static_cast<const double*>(query.untyped_data()),
        static_cast<const double*>(key.untyped_data()),
        static_cast<const double*>(value.untyped_data()),
        static_cast<double*>(out->untyped_data()), static_cast<double*>(weights->untyped_data()),
        s.batch, s.height, s.width, up_factor, kernel_size, s.dim, s.channels);
  }
  if (rc != KERAS_SAPA_OK) return ffi::Error::Internal("keras_sapa: forward kernel failed");
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::AnyBuffer grad, ffi::AnyBuffer query, ffi::AnyBuffer key,
                        ffi::AnyBuffer value, ffi::AnyBuffer weights, int64_t kernel_size,
                        int64_t up_factor, ffi::Result<ffi::AnyBuffer> dquery,
                        ffi::Result<ffi::AnyBuffer> dkey, ffi::Result<ffi::AnyBuffer> dvalue) {
  Sizes s;
  if (ffi::Error e = ReadSizes(key, value, kernel_size, up_factor, &s); e.failure()) return e;
  const auto kd = key.dimensions();
  const int64_t hh = s.height * up_factor, hw = s.width * up_factor;
  const struct {
    const char* name;
    ffi::AnyBuffer::Dimensions dims;
    int64_t rows, cols, channels;
  } checks[] = {
      {"query", query.dimensions(), hh, hw, s.dim},
      {"grad", grad.dimensions(), hh, hw, s.channels},
      {"weights", weights.dimensions(), hh, hw, kernel_size * kernel_size},
      {"dquery", dquery->dimensions(), hh, hw, s.dim},
      {"dkey", dkey->dimensions(), s.height, s.width, s.dim},
      {"dvalue", dvalue->dimensions(), s.height, s.width, s.channels},
  };
  for (const auto& c : checks) {
    if (ffi::Error e = CheckShape(c.name, c.dims, kd, c.rows, c.cols, c.channels); e.failure()) {
      return e;
    }
  }
  const ffi::DataType dtype = query.element_type();
  if (ffi::Error e = CheckTypes({grad, key, value, weights, *dquery, *dkey, *dvalue}, dtype);
      e.failure()) {
    return e;
  }
  int rc;
  if (dtype == ffi::DataType::F32) {
    rc = keras_sapa_backward_f32(
        static_cast<const float*>(grad.untyped_data()),
        static_cast<const float*>(query.untyped_data()),
        static_cast<const float*>(key.untyped_data()),
        static_cast<const float*>(value.untyped_data()),
        static_cast<const float*>(weights.untyped_data()),
        static_cast<float*>(dquery->untyped_data()), static_cast<float*>(dkey->untyped_data()),
        static_cast<float*>(dvalue->untyped_data()), s.batch, s.height, s.width, up_factor,
        kernel_size, s.dim, s.channels);
  } else {
    rc = keras_sapa_backward_f64(
        static_cast<const double*>(grad.untyped_data()),
        static_cast<const double*>(query.untyped_data()),
        static_cast<const double*>(key.untyped_data()),
        static_cast<const double*>(value.untyped_data()),
        static_cast<const double*>(weights.untyped_data()),
        static_cast<double*>(dquery->untyped_data()), static_cast<double*>(dkey->untyped_data()),
        static_cast<double*>(dvalue->untyped_data()), s.batch, s.height, s.width, up_factor,
        kernel_size, s.dim, s.channels);
  }
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
