// An emulated libcuda.so.1 that RUNS the SAPA and SAPA-D CUDA kernels on the CPU, for
// tests on machines without a GPU.
//
// The kernel source (kernels/cuda/sapa_kernels.cu, which includes SAPA-D's) is compiled
// here by g++ through emulation.h (every CUDA thread a fiber, __syncthreads() a barrier
// of the block's scheduler). cuLaunchKernel runs the named kernel with the launcher's grid, block and
// shared memory size, so a test drives the real launcher (tile choice, fallbacks,
// arguments) and the real kernel code on host memory.
//
// It also models what the launcher's context handling depends on, with the driver's
// error codes: up to 4 devices (emu_set_device_count, emu_configure_device), one primary
// context per device (retain/release reference count, cuDevicePrimaryCtxGetState; reset
// destroys it; a re-created primary context keeps its handle but gets a new cuCtxGetId,
// as a driver may reuse an address; emu_hide_context_ids: a driver without cuCtxGetId),
// a per-thread stack of current contexts (push/pop), modules that belong to the context
// that loaded them (using one from another or a destroyed context fails), launches that
// need the function's and the stream's context current, and device memory (cuMemAlloc:
// host memory). Kernels run one launch at a time (the shared-memory buffer is global);
// everything else may be called from many threads at once. A log of the launches that
// ran (kernel, block, shared memory, device, tile) and an injected fault (emu_corrupt:
// the named kernel's output gets NaN in its first bytes) serve the tests.

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "emulation.h"
// emulation.h first: the kernels read its CUDA stand-ins.
#include "../../kernels/cuda/sapa_kernels.cu"

namespace {

const int kInvalidValue = 1, kInvalidDevice = 101, kInvalidContext = 201,
          kInvalidHandle = 400, kNotFound = 500, kContextDestroyed = 709;

struct Context {
  int device = 0;
  unsigned long long id = 0;
  bool alive = false;
  int refs = 0;
};
struct Device {
  int major = 8, minor = 0, sms = 1;
  Context primary;
  int loads = 0;
};
struct Module {
  Context* ctx;
  unsigned long long id;
};
struct Function {
  void* symbol;
  Module* module;
};
struct Stream {
  Context* ctx;
  unsigned long long id;
};
struct LogEntry {
  std::string name;
  int block, smem, device, tile;
};

// A kernel's parameters after its argument struct: how many pointers, which one is its
// (first) output (emu_corrupt writes there), and whether the struct is SAPA-D's.
struct Signature {
  int pointers, output;
  bool deform;
};

Signature SignatureOf(const std::string& name) {
  static const struct {
    const char* prefix;
    Signature sig;
  } table[] = {
      // Longest prefixes first.
      {"sapa_deform_similarity_backward", {6, 4, true}},
      {"sapa_deform_aggregate_backward", {6, 4, true}},
      {"sapa_deform_backward", {9, 7, true}},
      {"sapa_deform_forward", {6, 4, true}},
      {"sapa_deform_similarity", {4, 3, true}},
      {"sapa_deform_aggregate", {4, 3, true}},
      {"sapa_deform_scatter", {4, 3, true}},
      {"sapa_deform_zero", {1, 0, true}},
      {"sapa_deform_cast", {2, 1, true}},
      {"sapa_fused", {5, 3, false}},
      {"sapa_dsoftmax", {4, 3, false}},
  };
  for (const auto& entry : table) {
    if (name.rfind(entry.prefix, 0) == 0) return entry.sig;
  }
  return Signature{3, 2, false};  // dot, gather, scatter
}

std::mutex g_state;  // everything below
std::mutex g_run;    // one kernel at a time (the shared-memory buffers are global)
Device g_devices[4];
int g_device_count = 1;
unsigned long long g_next_id = 1;
std::atomic<int> g_launches{0};
std::vector<LogEntry> g_log;
std::string g_corrupt;
bool g_hide_ids = false;  // a driver before CUDA 12.0: no cuCtxGetId
thread_local std::vector<Context*> t_stack;

// The current context if it is alive. g_state held.
int Current(Context** ctx) {
  if (t_stack.empty()) return kInvalidContext;
  *ctx = t_stack.back();
  return (*ctx)->alive ? 0 : kContextDestroyed;
}

bool Live(const Module* m) { return m->ctx->alive && m->ctx->id == m->id; }

}  // namespace

extern "C" {

// Device 0's compute capability and SM count (the first version's configuration).
void emu_configure(int major, int minor, int sms) {
  std::lock_guard<std::mutex> lock(g_state);
  g_devices[0].major = major;
  g_devices[0].minor = minor;
  g_devices[0].sms = sms;
}
int emu_set_device_count(int count) {
  if (count < 1 || count > 4) return kInvalidValue;
  std::lock_guard<std::mutex> lock(g_state);
  g_device_count = count;
  return 0;
}
int emu_configure_device(int device, int major, int minor, int sms) {
  if (device < 0 || device >= 4) return kInvalidDevice;
  std::lock_guard<std::mutex> lock(g_state);
  g_devices[device].major = major;
  g_devices[device].minor = minor;
  g_devices[device].sms = sms;
  return 0;
}
int emu_launches(void) { return g_launches.load(); }
int emu_module_loads(int device) {
  std::lock_guard<std::mutex> lock(g_state);
  return device >= 0 && device < 4 ? g_devices[device].loads : -1;
}
// The primary context's reference count (0: not active).
int emu_primary_refs(int device) {
  std::lock_guard<std::mutex> lock(g_state);
  return device >= 0 && device < 4 && g_devices[device].primary.alive
             ? g_devices[device].primary.refs : 0;
}
int emu_context_depth(void) { return static_cast<int>(t_stack.size()); }
// A stream of ctx (as a framework creates one in its context).
void* emu_stream_create(void* ctx) {
  Context* c = static_cast<Context*>(ctx);
  std::lock_guard<std::mutex> lock(g_state);
  if (c == nullptr || !c->alive) return nullptr;
  return new Stream{c, c->id};
}
void emu_log_clear(void) {
  std::lock_guard<std::mutex> lock(g_state);
  g_log.clear();
}
int emu_log_size(void) {
  std::lock_guard<std::mutex> lock(g_state);
  return static_cast<int>(g_log.size());
}
int emu_log_entry(int i, char* name, size_t size, int* block, int* smem, int* device,
                  int* tile) {
  std::lock_guard<std::mutex> lock(g_state);
  if (i < 0 || i >= static_cast<int>(g_log.size())) return kInvalidValue;
  std::snprintf(name, size, "%s", g_log[i].name.c_str());
  *block = g_log[i].block;
  *smem = g_log[i].smem;
  *device = g_log[i].device;
  *tile = g_log[i].tile;
  return 0;
}
void emu_hide_context_ids(int hide) {
  std::lock_guard<std::mutex> lock(g_state);
  g_hide_ids = hide != 0;
}
void emu_corrupt(const char* kernel) {
  std::lock_guard<std::mutex> lock(g_state);
  g_corrupt = kernel ? kernel : "";
}

int cuInit(unsigned) { return 0; }
int cuDriverGetVersion(int* v) { *v = 12090; return 0; }
int cuGetErrorName(int, const char** name) { *name = "EMULATED_ERROR"; return 0; }
int cuGetErrorString(int, const char** text) { *text = "emulated driver"; return 0; }

int cuDeviceGet(int* device, int ordinal) {
  std::lock_guard<std::mutex> lock(g_state);
  if (ordinal < 0 || ordinal >= g_device_count) return kInvalidDevice;
  *device = ordinal;
  return 0;
}
int cuDeviceGetCount(int* count) {
  std::lock_guard<std::mutex> lock(g_state);
  *count = g_device_count;
  return 0;
}
int cuDevicePrimaryCtxRetain(void** ctx, int device) {
  std::lock_guard<std::mutex> lock(g_state);
  if (device < 0 || device >= g_device_count) return kInvalidDevice;
  Context& c = g_devices[device].primary;
  if (!c.alive) {  // created (again): same handle, new ID
    c.device = device;
    c.alive = true;
    c.id = g_next_id++;
    c.refs = 0;
  }
  ++c.refs;
  *ctx = &c;
  return 0;
}
int cuDevicePrimaryCtxRelease_v2(int device) {
  std::lock_guard<std::mutex> lock(g_state);
  if (device < 0 || device >= g_device_count) return kInvalidDevice;
  Context& c = g_devices[device].primary;
  if (!c.alive || c.refs <= 0) return kInvalidContext;
  if (--c.refs == 0) c.alive = false;  // destroyed with its modules
  return 0;
}
int cuDevicePrimaryCtxReset_v2(int device) {
  std::lock_guard<std::mutex> lock(g_state);
  if (device < 0 || device >= g_device_count) return kInvalidDevice;
  Context& c = g_devices[device].primary;
  c.alive = false;
  c.refs = 0;
  return 0;
}
int cuDevicePrimaryCtxGetState(int device, unsigned* flags, int* active) {
  std::lock_guard<std::mutex> lock(g_state);
  if (device < 0 || device >= g_device_count) return kInvalidDevice;
  *flags = 0;
  *active = g_devices[device].primary.alive ? 1 : 0;
  return 0;
}
int cuCtxGetId(void* ctx, unsigned long long* id) {
  std::lock_guard<std::mutex> lock(g_state);
  Context* c = static_cast<Context*>(ctx);
  if (g_hide_ids) return 801;  // CUDA_ERROR_NOT_SUPPORTED
  if (c == nullptr) return kInvalidContext;
  if (!c->alive) return kContextDestroyed;
  *id = c->id;
  return 0;
}
int cuCtxGetCurrent(void** ctx) {
  *ctx = t_stack.empty() ? nullptr : t_stack.back();
  return 0;
}
int cuCtxPushCurrent_v2(void* ctx) {
  std::lock_guard<std::mutex> lock(g_state);
  Context* c = static_cast<Context*>(ctx);
  if (c == nullptr) return kInvalidContext;
  if (!c->alive) return kContextDestroyed;
  t_stack.push_back(c);
  return 0;
}
int cuCtxPopCurrent_v2(void** ctx) {
  if (t_stack.empty()) return kInvalidContext;
  if (ctx) *ctx = t_stack.back();
  t_stack.pop_back();
  return 0;
}
int cuCtxGetDevice(int* device) {
  std::lock_guard<std::mutex> lock(g_state);
  Context* c;
  const int rc = Current(&c);
  if (rc) return rc;
  *device = c->device;
  return 0;
}
int cuStreamGetCtx(void* stream, void** ctx) {
  std::lock_guard<std::mutex> lock(g_state);
  if (stream == nullptr) {
    Context* c;
    const int rc = Current(&c);
    if (rc) return rc;
    *ctx = c;
    return 0;
  }
  Stream* s = static_cast<Stream*>(stream);
  if (!s->ctx->alive || s->ctx->id != s->id) return kInvalidHandle;
  *ctx = s->ctx;
  return 0;
}
int cuStreamSynchronize(void*) { return 0; }  // launches run synchronously
int cuDeviceGetAttribute(int* value, int attribute, int device) {
  std::lock_guard<std::mutex> lock(g_state);
  if (device < 0 || device >= g_device_count) return kInvalidDevice;
  const Device& d = g_devices[device];
  switch (attribute) {
    case 75: *value = d.major; return 0;
    case 76: *value = d.minor; return 0;
    case 16: *value = d.sms; return 0;
    case 1: *value = 1024; return 0;
    case 8: *value = 48 * 1024; return 0;
    case 5: *value = 2147483647; return 0;
    default: *value = 0; return kInvalidValue;
  }
}
int cuModuleLoadData(void** module, const void*) {
  std::lock_guard<std::mutex> lock(g_state);
  Context* c;
  const int rc = Current(&c);
  if (rc) return rc;
  *module = new Module{c, c->id};
  ++g_devices[c->device].loads;
  return 0;
}
int cuModuleGetFunction(void** fn, void* module, const char* name) {
  std::lock_guard<std::mutex> lock(g_state);
  Module* m = static_cast<Module*>(module);
  Context* c;
  const int rc = Current(&c);
  if (rc) return rc;
  if (m == nullptr || !Live(m) || m->ctx != c) return kInvalidHandle;
  void* symbol = dlsym(emu::Self(), name);
  if (symbol == nullptr) return kNotFound;
  *fn = new Function{symbol, m};
  return 0;
}
// The limit a kernel's __launch_bounds__ sets (SAPA_BOUND_<K> in sapa_kernels.cu).
int cuFuncGetAttribute(int* value, int attribute, void* fn) {
  Dl_info info;
  if (attribute != 0 || fn == nullptr ||
      !dladdr(static_cast<Function*>(fn)->symbol, &info) || !info.dli_sname) {
    return kInvalidValue;
  }
  const std::string name = info.dli_sname;
  const bool k7 = name.find("_k7") != std::string::npos;
  const bool k5 = name.find("_k5") != std::string::npos;
  const bool k3 = name.find("_k3") != std::string::npos;
#if defined(SAPA_TILED_THREADS)  // per-K and per-precision bounds of the tiled kernels
  const bool f64 = name.find("_f64") != std::string::npos;
  if (k7) {
    *value = f64 ? SAPA_TILED_THREADS(double, 7) : SAPA_TILED_THREADS(float, 7);
  } else if (k5) {
    *value = f64 ? SAPA_TILED_THREADS(double, 5) : SAPA_TILED_THREADS(float, 5);
  } else if (k3) {
    *value = f64 ? SAPA_TILED_THREADS(double, 3) : SAPA_TILED_THREADS(float, 3);
  } else {
    *value = SAPA_WINDOW_THREADS;
  }
#else
  (void)k3;
  *value = k7 ? SAPA_BOUND_7 : k5 ? SAPA_BOUND_5 : 1024;
#endif
  return 0;
}
int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void*, int block, size_t smem) {
  int by_threads = 2048 / block;
  int by_smem = smem ? static_cast<int>((164 * 1024) / smem) : 32;
  *blocks = std::min(std::min(by_threads, by_smem), 32);
  return 0;
}
int cuMemAlloc_v2(unsigned long long* pointer, size_t size) {
  {
    std::lock_guard<std::mutex> lock(g_state);
    Context* c;
    const int rc = Current(&c);
    if (rc) return rc;
  }
  void* p = std::malloc(size ? size : 1);
  if (p == nullptr) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
  *pointer = reinterpret_cast<uintptr_t>(p);
  return 0;
}
int cuMemFree_v2(unsigned long long pointer) {
  std::free(reinterpret_cast<void*>(static_cast<uintptr_t>(pointer)));
  return 0;
}
int cuMemcpyHtoD_v2(unsigned long long dst, const void* src, size_t size) {
  std::memcpy(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)), src, size);
  return 0;
}
int cuMemcpyDtoH_v2(void* dst, unsigned long long src, size_t size) {
  std::memcpy(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), size);
  return 0;
}

int cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, unsigned smem, void* stream, void** params,
                   void**) {
  if (gy != 1 || gz != 1 || by != 1 || bz != 1 || bx == 0 || bx > 1024) return kInvalidValue;
  if (smem > sizeof(sapa::smem_raw)) return kInvalidValue;
  Function* f = static_cast<Function*>(function);
  int device = 0;
  bool corrupt = false;
  {
    std::lock_guard<std::mutex> lock(g_state);
    Context* c;
    const int rc = Current(&c);
    if (rc) return rc;
    // The function's module and the stream must belong to the current context.
    if (f == nullptr || !Live(f->module) || f->module->ctx != c) return kInvalidHandle;
    if (stream != nullptr) {
      Stream* s = static_cast<Stream*>(stream);
      if (s->ctx != c || s->id != c->id) return kInvalidHandle;
    }
    device = c->device;
  }
  void* fn = f->symbol;
  Dl_info info;
  if (!dladdr(fn, &info) || !info.dli_sname) return kNotFound;
  const std::string name = info.dli_sname;
  const Signature sig = SignatureOf(name);
  void* p[emu::kMaxPointers] = {};
  for (int i = 0; i < sig.pointers; ++i) p[i] = *static_cast<void**>(params[1 + i]);
  // The tile field of the kernel's argument struct (sapa::Args or DeformArgs).
  const int64_t tile = sig.deform ? static_cast<sapa::deform::DeformArgs*>(params[0])->tile
                                  : static_cast<sapa::Args*>(params[0])->tile;
  std::lock_guard<std::mutex> run(g_run);
  if (sig.deform) {
    const sapa::deform::DeformArgs args = *static_cast<sapa::deform::DeformArgs*>(params[0]);
    emu::RunGrid(gx, bx, sapa::deform::smem_raw, smem,
                 [&] { emu::CallKernel(fn, args, p, sig.pointers); });
  } else {
    const sapa::Args args = *static_cast<sapa::Args*>(params[0]);
    emu::RunGrid(gx, bx, sapa::smem_raw, smem, [&] { emu::CallKernel(fn, args, p, sig.pointers); });
  }
  {
    std::lock_guard<std::mutex> lock(g_state);
    corrupt = !g_corrupt.empty() && g_corrupt == name;
    g_log.push_back(LogEntry{name, static_cast<int>(bx), static_cast<int>(smem), device,
                             static_cast<int>(tile)});
  }
  if (corrupt) std::memset(p[sig.output], 0xff, 8);  // NaN in the output
  ++g_launches;
  return 0;
}

}  // extern "C"
