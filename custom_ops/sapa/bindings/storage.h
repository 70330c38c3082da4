// The kernel core's view of a C ABI tensor, shared by the C entry points of _sapa_core.so
// (sapa_core_c.cc, sapa_deform_core_c.cc): S is the core's storage type (cpu::Half and
// cpu::BFloat16 for the 16-bit types, which the C ABI passes as their uint16_t bits).

#ifndef KERAS_SAPA_BINDINGS_STORAGE_H_
#define KERAS_SAPA_BINDINGS_STORAGE_H_

namespace keras_sapa {
namespace bindings {

template <typename S, typename C>
const S* Storage(const C* p) {
  static_assert(sizeof(S) == sizeof(C), "storage and C types differ in size");
  return reinterpret_cast<const S*>(p);
}
template <typename S, typename C>
S* Storage(C* p) {
  static_assert(sizeof(S) == sizeof(C), "storage and C types differ in size");
  return reinterpret_cast<S*>(p);
}

}  // namespace bindings
}  // namespace keras_sapa

#endif  // KERAS_SAPA_BINDINGS_STORAGE_H_
