// Op registrations of the keras_sapa custom ops (channels last, see SAPA_SPEC.md), one per
// entry of the op table (keras_sapa/ops/_optable.py, generated into sapa_optable.inc):
//
//   KerasSapa>Similarity     (query (B,sH,sW,d), key (B,H,W,d))         -> (B,sH,sW,K*K)
//   KerasSapa>SimilarityGrad (grad (B,sH,sW,K*K), query, key)           -> grad_query, grad_key
//   KerasSapa>Aggregate      (weights (B,sH,sW,K*K), value (B,H,W,C))   -> (B,sH,sW,C)
//   KerasSapa>AggregateGrad  (grad (B,sH,sW,C), weights, value)         -> grad_weights, grad_value
//   KerasSapa>Sapa           (query, key, value (B,H,W,C))              -> output (B,sH,sW,C),
//                                                                          weights (B,sH,sW,K*K)
//   KerasSapa>SapaGrad       (grad (B,sH,sW,C), query, key, value, weights)
//                                                                       -> grad_query, grad_key, grad_value
//
// Sapa is the fused aggregate(softmax(similarity(query, key)), value); its second output
// is the softmax, kept for SapaGrad (float32 for half and bfloat16 inputs, selected by
// the Tweights attribute). The four window ops stay as the composable reference path.
//
// The output point (i, j) is anchored at the low-resolution point (i / s, j / s); its
// window holds (i / s + a, j / s + b) for a, b in [-r, r], r = (K - 1) / 2, numbered
// n = (a + r) * K + (b + r). Points outside the map contribute zero.
//
// One shape function serves every op: it checks the ranks, merges every occurrence of a
// size symbol (B, H, W, d, C, ...) across the inputs, dividing scaled dimensions
// (up_factor*H) where they are known, and builds the outputs from the symbols.

#include <string>
#include <vector>

#include "../sapa_attrs.h"
#include "../sapa_opspec.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_sapa {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

Status InferShapes(InferenceContext* c, const OpSpec& op) {
  int64_t attrs[kMaxAttrs] = {};
  TF_RETURN_IF_ERROR(ReadAttrs(c, op, attrs));
  DimensionHandle symbols[kMaxSymbols];
  for (int s = 0; s < op.num_symbols; ++s) symbols[s] = c->UnknownDim();
  for (int i = 0; i < op.num_inputs; ++i) {
    const TensorSpec& t = op.inputs[i];
    ShapeHandle shape;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), t.rank, &shape));
    for (int j = 0; j < t.rank; ++j) {
      const DimSpec& dim = t.dims[j];
      const int64_t f = DimFactor(dim, attrs);
      DimensionHandle given = c->Dim(shape, j);
      if (dim.symbol < 0) {
        DimensionHandle merged;
        TF_RETURN_IF_ERROR(c->Merge(given, c->MakeDim(f), &merged));
        continue;
      }
      if (f != 1) {
        if (!c->ValueKnown(given)) continue;
        if (c->Value(given) % f != 0) {
          return tsl::errors::InvalidArgument(
              t.name, " dimension ", j, " (", dim.text, ") must be a multiple of ", f,
              ". Received: ", t.name, ".shape=", c->DebugString(shape));
        }
        given = c->MakeDim(c->Value(given) / f);
      }
      DimensionHandle& bound = symbols[dim.symbol];
      TF_RETURN_IF_ERROR(c->Merge(bound, given, &bound));
    }
  }
  for (int k = 0; k < op.num_outputs; ++k) {
    const TensorSpec& t = op.outputs[k];
    std::vector<DimensionHandle> dims(t.rank);
    for (int j = 0; j < t.rank; ++j) {
      const DimSpec& dim = t.dims[j];
      const int64_t f = DimFactor(dim, attrs);
      if (dim.symbol < 0) {
        dims[j] = c->MakeDim(f);
      } else {
        TF_RETURN_IF_ERROR(c->Multiply(symbols[dim.symbol], f, &dims[j]));
      }
    }
    c->set_output(k, c->MakeShape(dims));
  }
  return absl::OkStatus();
}

::tensorflow::register_op::OpDefBuilderWrapper Describe(const OpSpec& op) {
  ::tensorflow::register_op::OpDefBuilderWrapper builder(op.name);
  for (int i = 0; i < op.num_inputs; ++i) {
    builder.Input(std::string(op.inputs[i].name) + ": " + op.inputs[i].dtype);
  }
  for (int i = 0; i < op.num_outputs; ++i) {
    builder.Output(std::string(op.outputs[i].name) + ": " + op.outputs[i].dtype);
  }
  for (int i = 0; i < op.num_types; ++i) builder.Attr(op.types[i]);
  for (int i = 0; i < op.num_attrs; ++i) builder.Attr(std::string(op.attrs[i].name) + ": int");
  const OpSpec* spec = &op;
  builder.SetShapeFn([spec](InferenceContext* c) { return InferShapes(c, *spec); });
  builder.Doc(op.doc);
  return builder;
}

// REGISTER_OP(name) with the builder made from the table (the marker runs it once, at
// load, as REGISTER_OP's does).
#define KERAS_SAPA_REGISTER_OP(NAME)                                                   \
  static ::tensorflow::InitOnStartupMarker const register_op_##NAME TF_ATTRIBUTE_UNUSED = \
      ::tensorflow::InitOnStartupMarker{} << Describe(optable::k##NAME);
KERAS_SAPA_OPS(KERAS_SAPA_REGISTER_OP)
#undef KERAS_SAPA_REGISTER_OP

}  // namespace

}  // namespace keras_sapa
