// The kernel_size / up_factor attributes shared by every keras_sapa op, read and checked
// the same way by the shape functions (InferenceContext) and the kernels
// (OpKernelConstruction).

#ifndef KERAS_SAPA_SAPA_ATTRS_H_
#define KERAS_SAPA_SAPA_ATTRS_H_

#include <cstdint>

#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/status.h"

namespace keras_sapa {

template <typename Context>
::tensorflow::Status ReadWindowAttrs(Context* ctx, int64_t* kernel_size, int64_t* up_factor) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("kernel_size", kernel_size));
  TF_RETURN_IF_ERROR(ctx->GetAttr("up_factor", up_factor));
  if (*kernel_size < 1 || *kernel_size % 2 == 0) {
    return tsl::errors::InvalidArgument(
        "kernel_size must be a positive odd integer. Received: kernel_size=", *kernel_size);
  }
  if (*up_factor < 1) {
    return tsl::errors::InvalidArgument("up_factor must be >= 1. Received: up_factor=",
                                        *up_factor);
  }
  return absl::OkStatus();
}

}  // namespace keras_sapa

#endif  // KERAS_SAPA_SAPA_ATTRS_H_
