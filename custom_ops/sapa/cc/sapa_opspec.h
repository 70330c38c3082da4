// The op descriptors of keras_sapa/ops/_optable.py in C++, and the shape rule every
// adapter applies with them. Framework-free: the TensorFlow op registrations and kernels
// (cc/) and the XLA FFI handlers (bindings/) include it.
//
// An op's tensors have symbolic shapes: each dimension is factor * attrs... * symbol
// (e.g. up_factor*H, kernel_size*kernel_size, d). BindInputs reads the symbols' values
// from the inputs of one call, checking that every occurrence agrees, and OutputShape
// gives each output's shape from them. The descriptors themselves (optable::k<Name>)
// are generated into sapa_optable.inc by custom_ops/build.py.

#ifndef KERAS_SAPA_CC_SAPA_OPSPEC_H_
#define KERAS_SAPA_CC_SAPA_OPSPEC_H_

#include <cstdint>
#include <cstring>
#include <string>

namespace keras_sapa {

constexpr int kMaxRank = 6;
constexpr int kMaxSymbols = 16;
constexpr int kMaxAttrs = 8;

enum class AttrCheck { kPositive, kOddPositive };

struct DimSpec {
  int symbol;        // index into OpSpec::symbols, -1: a constant dimension
  int attrs[2];      // attribute indices multiplied in (-1: none)
  int64_t factor;    // integer factor
  const char* text;  // as written in the table, e.g. "up_factor*H"
};

struct TensorSpec {
  const char* name;
  const char* dtype;  // "T" or "Tweights"
  int rank;
  DimSpec dims[kMaxRank];
};

struct AttrSpec {
  const char* name;
  int index;  // optable::kAttr_<name>
  AttrCheck check;
};

struct OpSpec {
  const char* name;  // "KerasSapa>Sapa"
  const char* doc;
  const TensorSpec* inputs;
  int num_inputs;
  const TensorSpec* outputs;
  int num_outputs;
  const AttrSpec* attrs;
  int num_attrs;
  const char* const* symbols;
  int num_symbols;
  const char* const* types;  // "T: {half, bfloat16, float, double}", ...
  int num_types;
};

// The attribute values and the size symbols of one call.
struct Sizes {
  int64_t attrs[kMaxAttrs] = {};
  int64_t symbols[kMaxSymbols] = {};
  bool bound[kMaxSymbols] = {};

  // The value of the symbol `name` of `op` (-1 when the op has none such).
  int64_t Symbol(const OpSpec& op, const char* name) const {
    for (int i = 0; i < op.num_symbols; ++i) {
      if (std::strcmp(op.symbols[i], name) == 0) return symbols[i];
    }
    return -1;
  }
};

// attrs[...] * factor of a dimension.
inline int64_t DimFactor(const DimSpec& dim, const int64_t* attrs) {
  int64_t f = dim.factor;
  for (int a : dim.attrs) {
    if (a >= 0) f *= attrs[a];
  }
  return f;
}

// "" when `value` is valid for `attr`, else the error message.
inline std::string CheckAttr(const AttrSpec& attr, int64_t value) {
  if (attr.check == AttrCheck::kOddPositive && (value < 1 || value % 2 == 0)) {
    return std::string(attr.name) + " must be a positive odd integer. Received: " + attr.name +
           "=" + std::to_string(value);
  }
  if (attr.check == AttrCheck::kPositive && value < 1) {
    return std::string(attr.name) + " must be >= 1. Received: " + attr.name + "=" +
           std::to_string(value);
  }
  return "";
}

inline std::string ShapeString(const int64_t* dims, int rank) {
  std::string s = "[";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// The symbolic shape of a tensor, "(B, up_factor*H, up_factor*W, d)".
inline std::string SpecString(const TensorSpec& t) {
  std::string s = "(";
  for (int i = 0; i < t.rank; ++i) s += std::string(i ? ", " : "") + t.dims[i].text;
  return s + ")";
}

// Binds the size symbols of `op` from the input shapes (shapes[i] has ranks[i]
// dimensions) and sizes->attrs. Returns "" or an error naming the input and its shape.
inline std::string BindInputs(const OpSpec& op, const int64_t* const* shapes, const int* ranks,
                              Sizes* sizes) {
  for (int s = 0; s < kMaxSymbols; ++s) sizes->bound[s] = false;
  // Two passes: plain symbols first, so that a disagreement on a scaled dimension is
  // reported against the input that has it.
  for (int pass = 0; pass < 2; ++pass) {
    for (int i = 0; i < op.num_inputs; ++i) {
      const TensorSpec& t = op.inputs[i];
      if (ranks[i] != t.rank) {
        return std::string(t.name) + " must have rank " + std::to_string(t.rank) + ", shape " +
               SpecString(t) + ". Received: " + t.name + ".shape=" +
               ShapeString(shapes[i], ranks[i]);
      }
      for (int j = 0; j < t.rank; ++j) {
        const DimSpec& dim = t.dims[j];
        const int64_t f = DimFactor(dim, sizes->attrs);
        const int64_t size = shapes[i][j];
        if ((pass == 0) != (f == 1 && dim.symbol >= 0)) continue;
        const char* what = j == t.rank - 1 ? "channels" : "dimension";
        const std::string where = std::string(t.name) + " must have shape " + SpecString(t) +
                                  ": its " + what + " " + std::to_string(j) + " (" + dim.text +
                                  ") ";
        const std::string received =
            ". Received: " + std::string(t.name) + ".shape=" + ShapeString(shapes[i], t.rank);
        if (dim.symbol < 0) {
          if (size != f) return where + "must be " + std::to_string(f) + received;
          continue;
        }
        if (f < 1 || size % f != 0) {
          return where + "must be a multiple of " + std::to_string(f) + received;
        }
        const int64_t value = size / f;
        if (!sizes->bound[dim.symbol]) {
          sizes->bound[dim.symbol] = true;
          sizes->symbols[dim.symbol] = value;
        } else if (sizes->symbols[dim.symbol] != value) {
          return where + "must be " + std::to_string(f * sizes->symbols[dim.symbol]) +
                 " to match the other inputs (" + op.symbols[dim.symbol] + "=" +
                 std::to_string(sizes->symbols[dim.symbol]) + ")" + received;
        }
      }
    }
  }
  return "";
}

// The shape of output `index` (rank op.outputs[index].rank) from bound sizes.
inline void OutputShape(const OpSpec& op, int index, const Sizes& sizes, int64_t* dims) {
  const TensorSpec& t = op.outputs[index];
  for (int j = 0; j < t.rank; ++j) {
    const DimSpec& dim = t.dims[j];
    const int64_t f = DimFactor(dim, sizes.attrs);
    dims[j] = dim.symbol < 0 ? f : f * sizes.symbols[dim.symbol];
  }
}

}  // namespace keras_sapa

#include "sapa_optable.inc"  // NOLINT(build/include): the generated descriptors

#endif  // KERAS_SAPA_CC_SAPA_OPSPEC_H_
