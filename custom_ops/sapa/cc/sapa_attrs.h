// The attributes of a keras_sapa op (kernel_size, up_factor, ...), read and checked the
// same way by the shape functions (InferenceContext) and the kernels
// (OpKernelConstruction), as the op table describes them (sapa_opspec.h).

#ifndef KERAS_SAPA_SAPA_ATTRS_H_
#define KERAS_SAPA_SAPA_ATTRS_H_

#include <cstdint>
#include <string>

#include "sapa_opspec.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/platform/errors.h"
#include "tensorflow/core/platform/status.h"

namespace keras_sapa {

// Fills attrs[optable::kAttr_<name>] for every attribute of `op`.
template <typename Context>
::tensorflow::Status ReadAttrs(Context* ctx, const OpSpec& op, int64_t* attrs) {
  for (int i = 0; i < op.num_attrs; ++i) {
    const AttrSpec& attr = op.attrs[i];
    int64_t value = 0;
    TF_RETURN_IF_ERROR(ctx->GetAttr(attr.name, &value));
    const std::string problem = CheckAttr(attr, value);
    if (!problem.empty()) return tsl::errors::InvalidArgument(problem);
    attrs[attr.index] = value;
  }
  return absl::OkStatus();
}

}  // namespace keras_sapa

#endif  // KERAS_SAPA_SAPA_ATTRS_H_
