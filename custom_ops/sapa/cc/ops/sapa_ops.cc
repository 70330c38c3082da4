// Op registrations of the keras_sapa custom ops (channels last, see SAPA_SPEC.md).
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
// The shape functions check ranks, merge the batch and channel dimensions, and check that
// the high-resolution size is exactly up_factor times the low-resolution one.

#include "../sapa_attrs.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace keras_sapa {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Checks a (high, low) pair: same batch, high spatial = up_factor * low spatial.
// Returns the merged high-resolution (batch, height, width) and the low-resolution shape.
Status MergeHighLow(InferenceContext* c, ShapeHandle high, ShapeHandle low, int64_t up_factor,
                    DimensionHandle* batch, DimensionHandle* high_h, DimensionHandle* high_w,
                    DimensionHandle* low_h, DimensionHandle* low_w) {
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(high, 0), c->Dim(low, 0), batch));
  DimensionHandle scaled_h, scaled_w;
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(low, 1), up_factor, &scaled_h));
  TF_RETURN_IF_ERROR(c->Multiply(c->Dim(low, 2), up_factor, &scaled_w));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(high, 1), scaled_h, high_h));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(high, 2), scaled_w, high_w));
  *low_h = c->Dim(low, 1);
  *low_w = c->Dim(low, 2);
  // Where the high-resolution size is known and the low one is not, infer it.
  if (!c->ValueKnown(*low_h) && c->ValueKnown(*high_h)) {
    if (c->Value(*high_h) % up_factor != 0) {
      return tsl::errors::InvalidArgument("high-resolution height ", c->Value(*high_h),
                                          " is not a multiple of up_factor=", up_factor);
    }
    *low_h = c->MakeDim(c->Value(*high_h) / up_factor);
  }
  if (!c->ValueKnown(*low_w) && c->ValueKnown(*high_w)) {
    if (c->Value(*high_w) % up_factor != 0) {
      return tsl::errors::InvalidArgument("high-resolution width ", c->Value(*high_w),
                                          " is not a multiple of up_factor=", up_factor);
    }
    *low_w = c->MakeDim(c->Value(*high_w) / up_factor);
  }
  return absl::OkStatus();
}

// Shapes of (weights-like (B,sH,sW,K*K), high (B,sH,sW,Dh) or null, low (B,H,W,Dl)).
// Merges everything that must agree; outputs the merged dims.
struct Merged {
  DimensionHandle batch, high_h, high_w, low_h, low_w, window, low_c, high_c;
};

Status MergeAll(InferenceContext* c, int weights_input, int high_input, int low_input,
                bool high_low_same_channels, Merged* m) {
  int64_t kernel_size, up_factor;
  TF_RETURN_IF_ERROR(ReadWindowAttrs(c, &kernel_size, &up_factor));
  ShapeHandle low;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(low_input), 4, &low));
  ShapeHandle high = c->UnknownShapeOfRank(4);
  if (weights_input >= 0) {
    ShapeHandle weights;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(weights_input), 4, &weights));
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(weights, 3), c->MakeDim(kernel_size * kernel_size),
                                &m->window));
    high = weights;
  } else {
    m->window = c->MakeDim(kernel_size * kernel_size);
  }
  if (high_input >= 0) {
    ShapeHandle h;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(high_input), 4, &h));
    // Merge spatial/batch of the two high-resolution tensors (channels may differ).
    ShapeHandle h3, w3;
    TF_RETURN_IF_ERROR(c->Subshape(h, 0, 3, &h3));
    TF_RETURN_IF_ERROR(c->Subshape(high, 0, 3, &w3));
    ShapeHandle merged3;
    TF_RETURN_IF_ERROR(c->Merge(h3, w3, &merged3));
    m->high_c = c->Dim(h, 3);
    TF_RETURN_IF_ERROR(c->Concatenate(merged3, c->Vector(m->high_c), &high));
  }
  TF_RETURN_IF_ERROR(MergeHighLow(c, high, low, up_factor, &m->batch, &m->high_h, &m->high_w,
                                  &m->low_h, &m->low_w));
  m->low_c = c->Dim(low, 3);
  if (high_low_same_channels) {
    DimensionHandle merged;
    TF_RETURN_IF_ERROR(c->Merge(m->high_c, m->low_c, &merged));
    m->high_c = merged;
    m->low_c = merged;
  }
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasSapa>Similarity")
    .Input("query: T")
    .Input("key: T")
    .Output("similarity: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeAll(c, /*weights=*/-1, /*high=*/0, /*low=*/1, true, &m));
      c->set_output(0, c->MakeShape({m.batch, m.high_h, m.high_w, m.window}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
SAPA window similarity: similarity[b, i, j, n] = <query[b, i, j], key[b, i/s + a, j/s + c]>
with n = (a + r) * K + (c + r), zero where the window point lies outside the key map.
)doc");

REGISTER_OP("KerasSapa>SimilarityGrad")
    .Input("grad: T")
    .Input("query: T")
    .Input("key: T")
    .Output("grad_query: T")
    .Output("grad_key: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeAll(c, /*weights=*/0, /*high=*/1, /*low=*/2, true, &m));
      c->set_output(0, c->MakeShape({m.batch, m.high_h, m.high_w, m.high_c}));
      c->set_output(1, c->MakeShape({m.batch, m.low_h, m.low_w, m.low_c}));
      return absl::OkStatus();
    })
    .Doc("Gradient of KerasSapa>Similarity with respect to query and key.");

REGISTER_OP("KerasSapa>Aggregate")
    .Input("weights: T")
    .Input("value: T")
    .Output("output: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeAll(c, /*weights=*/0, /*high=*/-1, /*low=*/1, false, &m));
      c->set_output(0, c->MakeShape({m.batch, m.high_h, m.high_w, m.low_c}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
SAPA window aggregation: output[b, i, j] = sum_n weights[b, i, j, n] * value[b, i/s + a, j/s + c],
points outside the value map contributing zero.
)doc");

REGISTER_OP("KerasSapa>AggregateGrad")
    .Input("grad: T")
    .Input("weights: T")
    .Input("value: T")
    .Output("grad_weights: T")
    .Output("grad_value: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeAll(c, /*weights=*/1, /*high=*/0, /*low=*/2, true, &m));
      c->set_output(0, c->MakeShape({m.batch, m.high_h, m.high_w, m.window}));
      c->set_output(1, c->MakeShape({m.batch, m.low_h, m.low_w, m.low_c}));
      return absl::OkStatus();
    })
    .Doc("Gradient of KerasSapa>Aggregate with respect to weights and value.");

namespace {

// Shapes of the fused ops: query (B,sH,sW,d), key (B,H,W,d), value (B,H,W,C).
Status MergeTriple(InferenceContext* c, int query_input, Merged* m) {
  TF_RETURN_IF_ERROR(MergeAll(c, /*weights=*/-1, /*high=*/query_input,
                              /*low=*/query_input + 1, true, m));
  ShapeHandle key, value;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(query_input + 1), 4, &key));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(query_input + 2), 4, &value));
  ShapeHandle key3, value3, merged3;
  TF_RETURN_IF_ERROR(c->Subshape(key, 0, 3, &key3));
  TF_RETURN_IF_ERROR(c->Subshape(value, 0, 3, &value3));
  TF_RETURN_IF_ERROR(c->Merge(key3, value3, &merged3));
  TF_RETURN_IF_ERROR(c->Merge(m->batch, c->Dim(merged3, 0), &m->batch));
  TF_RETURN_IF_ERROR(c->Merge(m->low_h, c->Dim(merged3, 1), &m->low_h));
  TF_RETURN_IF_ERROR(c->Merge(m->low_w, c->Dim(merged3, 2), &m->low_w));
  int64_t kernel_size, up_factor;
  TF_RETURN_IF_ERROR(ReadWindowAttrs(c, &kernel_size, &up_factor));
  DimensionHandle scaled;
  TF_RETURN_IF_ERROR(c->Multiply(m->low_h, up_factor, &scaled));
  TF_RETURN_IF_ERROR(c->Merge(m->high_h, scaled, &m->high_h));
  TF_RETURN_IF_ERROR(c->Multiply(m->low_w, up_factor, &scaled));
  TF_RETURN_IF_ERROR(c->Merge(m->high_w, scaled, &m->high_w));
  m->window = c->MakeDim(kernel_size * kernel_size);
  m->low_c = c->Dim(value, 3);  // C (the value's channels); high_c stays d
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("KerasSapa>Sapa")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Output("output: T")
    .Output("weights: Tweights")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tweights: {float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeTriple(c, 0, &m));
      c->set_output(0, c->MakeShape({m.batch, m.high_h, m.high_w, m.low_c}));
      c->set_output(1, c->MakeShape({m.batch, m.high_h, m.high_w, m.window}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Fused SAPA: output = aggregate(softmax(similarity(query, key)), value) in one pass over the
low-resolution anchors, padded window points entering the softmax with logit 0. weights is
that softmax (B, sH, sW, K*K), computed in Tweights (float for half and bfloat16 inputs,
double for double, float for float), kept for the gradient; it is not differentiable.
)doc");

REGISTER_OP("KerasSapa>SapaGrad")
    .Input("grad: T")
    .Input("query: T")
    .Input("key: T")
    .Input("value: T")
    .Input("weights: Tweights")
    .Output("grad_query: T")
    .Output("grad_key: T")
    .Output("grad_value: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("Tweights: {float, double}")
    .Attr("kernel_size: int")
    .Attr("up_factor: int")
    .SetShapeFn([](InferenceContext* c) {
      Merged m;
      TF_RETURN_IF_ERROR(MergeTriple(c, 1, &m));
      ShapeHandle grad, weights;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 4, &weights));
      ShapeHandle out_shape = c->MakeShape({m.batch, m.high_h, m.high_w, m.low_c});
      TF_RETURN_IF_ERROR(c->Merge(grad, out_shape, &out_shape));
      ShapeHandle w_shape = c->MakeShape({m.batch, m.high_h, m.high_w, m.window});
      TF_RETURN_IF_ERROR(c->Merge(weights, w_shape, &w_shape));
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      c->set_output(2, c->input(3));
      return absl::OkStatus();
    })
    .Doc("Gradient of KerasSapa>Sapa with respect to query, key and value.");

}  // namespace keras_sapa
