// SAPA kernel launcher: driver API only, opened with dlopen (see sapa_launcher.h).
//
// Launch sizes come from device attributes and the occupancy API, never from a
// runtime struct whose layout depends on a CUDA version. Every entry point pushes a
// context for its whole duration (ContextScope); modules are loaded once per (device,
// context), the context identified by its driver ID where the driver has one.
//
// Portability: the library is linked with a static libstdc++ and must load on glibc
// 2.28 and newer (manylinux_2_28). So it uses no iostreams or locales (they pull in
// symbols of glibc 2.33-2.36), binds the dl* functions to their original symbol versions,
// and defines, hidden, the few glibc 2.32+/2.34+ symbols the static libstdc++ refers to
// (GlibcCompat below). tests/test_launcher.py checks the built library's requirements.

#include "sapa_launcher.h"

#include <dirent.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// --- glibc compatibility -----------------------------------------------------------
#if defined(__GLIBC__) && !defined(SAPA_NO_GLIBC_COMPAT) && \
    (defined(__x86_64__) || defined(__aarch64__))
#if defined(__x86_64__)
#define SAPA_GLIBC_BASE "GLIBC_2.2.5"
#else
#define SAPA_GLIBC_BASE "GLIBC_2.17"
#endif
// glibc 2.34 moved the dl* functions into libc under a new version; the original
// versions (libdl.so.2 before 2.34, compatibility symbols of libc after) exist on every
// glibc, so the library needs libdl.so.2 (linked with -ldl) and nothing newer.
__asm__(".symver dlopen,dlopen@" SAPA_GLIBC_BASE);
__asm__(".symver dlsym,dlsym@" SAPA_GLIBC_BASE);
__asm__(".symver dlclose,dlclose@" SAPA_GLIBC_BASE);
__asm__(".symver dlerror,dlerror@" SAPA_GLIBC_BASE);
__asm__(".symver pthread_key_create,pthread_key_create@" SAPA_GLIBC_BASE);

// Symbols the static libstdc++ (GCC 11+) refers to with glibc 2.32/2.34 versions,
// defined here, hidden, so those references bind to these at link time:
// - __libc_single_threaded (2.32): 0 means "maybe threaded", always correct;
// - pthread_once and __pthread_key_create (2.34, moved from libpthread into libc);
// - arc4random (2.36), which std::random_device can use (never by this library).
extern "C" {
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// One state per control (0 not run, 1 running, 2 done): no lock shared between
// controls, so an init function that waits for another thread's pthread_once cannot
// deadlock; an init that throws leaves the control to be run again, as glibc does.
__attribute__((visibility("hidden"))) int pthread_once(pthread_once_t* control,
                                                       void (*init)(void)) {
  int* state = reinterpret_cast<int*>(control);
  for (;;) {
    int expected = __atomic_load_n(state, __ATOMIC_ACQUIRE);
    if (expected == 2) return 0;
    if (expected == 0 &&
        __atomic_compare_exchange_n(state, &expected, 1, false, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
      try {
        init();
      } catch (...) {
        __atomic_store_n(state, 0, __ATOMIC_RELEASE);
        throw;
      }
      __atomic_store_n(state, 2, __ATOMIC_RELEASE);
      return 0;
    }
    sched_yield();  // another thread runs init
  }
}

__attribute__((visibility("hidden"))) int __pthread_key_create(pthread_key_t* key,
                                                               void (*destructor)(void*)) {
  return pthread_key_create(key, destructor);
}

__attribute__((visibility("hidden"))) uint32_t arc4random(void) {
  uint32_t value = 0;
  while (syscall(SYS_getrandom, &value, sizeof value, 0) != sizeof value) {
  }
  return value;
}
}  // extern "C"
#endif

namespace {

// The few driver API types and constants used (values from cuda.h, checked against it by
// tests/test_cuda_build.py when the header is at hand).
typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
typedef unsigned long long CUdeviceptr;
const CUresult CUDA_SUCCESS = 0;
const CUresult CUDA_ERROR_NO_BINARY_FOR_GPU = 209;
const CUresult CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222;
const int ATTR_MAX_THREADS_PER_BLOCK = 1;
const int ATTR_MAX_GRID_DIM_X = 5;
const int ATTR_MAX_SHARED_MEMORY_PER_BLOCK = 8;
const int ATTR_MULTIPROCESSOR_COUNT = 16;
const int ATTR_COMPUTE_CAPABILITY_MAJOR = 75;
const int ATTR_COMPUTE_CAPABILITY_MINOR = 76;
const int FUNC_ATTR_MAX_THREADS_PER_BLOCK = 0;

struct Driver {
  void* handle = nullptr;
  bool initialised = false;
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuStreamGetCtx)(CUstream, CUcontext*);
  CUresult (*cuCtxPushCurrent)(CUcontext);
  CUresult (*cuCtxPopCurrent)(CUcontext*);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  CUresult (*cuOccupancyMaxActiveBlocksPerMultiprocessor)(int*, CUfunction, int, size_t);
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
  // Optional: CUDA 12.0+ (a context ID that is never reused) and the self-test's memory.
  CUresult (*cuCtxGetId)(CUcontext, unsigned long long*) = nullptr;
  CUresult (*cuDevicePrimaryCtxGetState)(CUdevice, unsigned*, int*) = nullptr;
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*cuMemFree)(CUdeviceptr) = nullptr;
  CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void*, size_t) = nullptr;
  CUresult (*cuMemcpyDtoH)(void*, CUdeviceptr, size_t) = nullptr;
  CUresult (*cuStreamSynchronize)(CUstream) = nullptr;
};

// Same layout as sapa::Args in kernels/cuda/sapa_kernels.cuh.
struct KernelArgs {
  int64_t batch, height, width, up, kernel, ch, ch_v, tile, tiles_h, tiles_w;
};

// Same layout as sapa::deform::DeformArgs in kernels/cuda/sapa_deform_kernels.cuh.
struct DeformKernelArgs {
  int64_t batch, height, width, up, points, groups, dim, channels, tile, count;
};

struct Image {
  std::string target;  // sm_XY or compute_XY
  std::vector<char> data;
};

// What a (device, context) has loaded. Created once, never freed (a stale entry of a
// reset context is only forgotten by the cache), so a pointer stays valid without a lock;
// functions and tiles change under g_mutex.
struct DeviceState {
  CUmodule module = nullptr;
  std::string target;
  int major = 0, minor = 0, sms = 1, max_threads = 1024, max_smem = 48 * 1024;
  int64_t max_grid = 2147483647;
  std::map<std::string, CUfunction> functions;
  // (kernel, up, K) -> (tile, block, smem)
  std::map<std::tuple<std::string, int64_t, int64_t>, std::tuple<int, int, int>> tiles;
};

// The primary context the launcher holds one reference to, per device.
struct HeldPrimary {
  CUcontext ctx = nullptr;
  unsigned long long id = 0;
};

std::mutex g_mutex;
Driver g_driver;
std::vector<Image> g_images;
std::map<std::pair<CUdevice, unsigned long long>, DeviceState*> g_devices;
std::map<CUdevice, HeldPrimary> g_primary;
int g_module_loads = 0;
std::atomic<bool> g_untiled{false};
thread_local std::string t_error;
thread_local std::string t_last_name;
thread_local int64_t t_last_grid = 0;
thread_local int t_last_block = 0, t_last_smem = 0;
thread_local int t_device = 0;
thread_local bool t_untiled = false;  // the self-test's untiled pass
// The self-test's record of what an entry point launched: (kernel, block, shared memory).
thread_local std::vector<std::tuple<std::string, int, int>>* t_record = nullptr;

int Fail(int status, const std::string& message) {
  t_error = message;
  return status;
}

std::string DriverError(CUresult rc) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (g_driver.cuGetErrorName) g_driver.cuGetErrorName(rc, &name);
  if (g_driver.cuGetErrorString) g_driver.cuGetErrorString(rc, &text);
  std::string out = std::string(name ? name : "CUDA error") + " (" + std::to_string(rc) + ")";
  if (text) out += std::string(": ") + text;
  return out;
}

template <typename F>
bool Sym(void* handle, const char* name, F* fn) {
  *fn = reinterpret_cast<F>(dlsym(handle, name));
  return *fn != nullptr;
}

int InitLocked(const char* driver_path) {
  if (g_driver.initialised) return SAPA_OK;
  const char* path = driver_path ? driver_path : "libcuda.so.1";
  if (!g_driver.handle) {
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      const char* why = dlerror();
      return Fail(SAPA_ERR_NO_DRIVER, std::string("no NVIDIA driver: cannot load ") + path +
                                          " (" + (why ? why : "unknown reason") + ")");
    }
    Driver d;
    d.handle = handle;
    const bool ok =
        Sym(handle, "cuInit", &d.cuInit) &&
        Sym(handle, "cuDriverGetVersion", &d.cuDriverGetVersion) &&
        Sym(handle, "cuGetErrorName", &d.cuGetErrorName) &&
        Sym(handle, "cuGetErrorString", &d.cuGetErrorString) &&
        Sym(handle, "cuStreamGetCtx", &d.cuStreamGetCtx) &&
        Sym(handle, "cuCtxPushCurrent_v2", &d.cuCtxPushCurrent) &&
        Sym(handle, "cuCtxPopCurrent_v2", &d.cuCtxPopCurrent) &&
        Sym(handle, "cuCtxGetCurrent", &d.cuCtxGetCurrent) &&
        Sym(handle, "cuCtxGetDevice", &d.cuCtxGetDevice) &&
        Sym(handle, "cuDeviceGet", &d.cuDeviceGet) &&
        Sym(handle, "cuDevicePrimaryCtxRetain", &d.cuDevicePrimaryCtxRetain) &&
        Sym(handle, "cuDevicePrimaryCtxRelease_v2", &d.cuDevicePrimaryCtxRelease) &&
        Sym(handle, "cuDeviceGetAttribute", &d.cuDeviceGetAttribute) &&
        Sym(handle, "cuModuleLoadData", &d.cuModuleLoadData) &&
        Sym(handle, "cuModuleGetFunction", &d.cuModuleGetFunction) &&
        Sym(handle, "cuLaunchKernel", &d.cuLaunchKernel) &&
        Sym(handle, "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            &d.cuOccupancyMaxActiveBlocksPerMultiprocessor) &&
        Sym(handle, "cuFuncGetAttribute", &d.cuFuncGetAttribute);
    if (!ok) {
      dlclose(handle);
      return Fail(SAPA_ERR_NO_DRIVER,
                  std::string(path) + " lacks a driver API function the launcher needs");
    }
    Sym(handle, "cuCtxGetId", &d.cuCtxGetId);
    Sym(handle, "cuDevicePrimaryCtxGetState", &d.cuDevicePrimaryCtxGetState);
    Sym(handle, "cuMemAlloc_v2", &d.cuMemAlloc);
    Sym(handle, "cuMemFree_v2", &d.cuMemFree);
    Sym(handle, "cuMemcpyHtoD_v2", &d.cuMemcpyHtoD);
    Sym(handle, "cuMemcpyDtoH_v2", &d.cuMemcpyDtoH);
    Sym(handle, "cuStreamSynchronize", &d.cuStreamSynchronize);
    g_driver = d;
  }
  const CUresult rc = g_driver.cuInit(0);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_DRIVER, "cuInit failed: " + DriverError(rc));
  }
  g_driver.initialised = true;
  return SAPA_OK;
}

int Init() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return InitLocked(nullptr);
}

// The context's identity: its driver ID (unique for the process's lifetime, so a context
// re-created at the same address after a reset differs), else its address (drivers
// before CUDA 12.0).
unsigned long long ContextId(CUcontext ctx) {
  unsigned long long id = 0;
  if (g_driver.cuCtxGetId && g_driver.cuCtxGetId(ctx, &id) == CUDA_SUCCESS) return id;
  return reinterpret_cast<unsigned long long>(ctx);
}

// The primary context of device `ordinal`, of which the launcher keeps exactly one
// reference: a retain that finds the context already held is released again; one that
// finds a new context (the old one was reset: inactive before the retain, or a new ID)
// is kept.
int PrimaryContext(int ordinal, CUcontext* ctx) {
  CUdevice device = 0;
  CUresult rc = g_driver.cuDeviceGet(&device, ordinal);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_DRIVER, "cuDeviceGet(" + std::to_string(ordinal) +
                                     ") failed: " + DriverError(rc));
  }
  unsigned flags = 0;
  int active = 1;
  if (g_driver.cuDevicePrimaryCtxGetState &&
      g_driver.cuDevicePrimaryCtxGetState(device, &flags, &active) != CUDA_SUCCESS) {
    active = 1;
  }
  rc = g_driver.cuDevicePrimaryCtxRetain(ctx, device);
  if (rc != CUDA_SUCCESS || *ctx == nullptr) {
    return Fail(SAPA_ERR_DRIVER, "cuDevicePrimaryCtxRetain(device " +
                                     std::to_string(ordinal) + ") failed: " + DriverError(rc));
  }
  const unsigned long long id = ContextId(*ctx);
  std::lock_guard<std::mutex> lock(g_mutex);
  HeldPrimary& held = g_primary[device];
  if (active && held.ctx == *ctx && held.id == id) {
    g_driver.cuDevicePrimaryCtxRelease(device);
  } else {
    held.ctx = *ctx;
    held.id = id;
    // Without context IDs a re-created context may have the old address: what was
    // loaded for it belongs to the destroyed one.
    if (!active) g_devices.erase(std::make_pair(device, id));
  }
  return SAPA_OK;
}

// Pushes the launch's context for the scope's lifetime: the stream's own context, or
// for a NULL stream the thread's current one, else the primary context of the thread's
// device (sapa_set_device).
class ContextScope {
 public:
  ContextScope() = default;
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;
  ~ContextScope() {
    if (pushed_) {
      CUcontext popped = nullptr;
      g_driver.cuCtxPopCurrent(&popped);
    }
  }

  int Enter(CUstream stream) {
    int status = Init();
    if (status != SAPA_OK) return status;
    CUcontext ctx = nullptr;
    CUresult rc;
    if (stream != nullptr) {
      rc = g_driver.cuStreamGetCtx(stream, &ctx);
      if (rc != CUDA_SUCCESS || ctx == nullptr) {
        return Fail(SAPA_ERR_DRIVER, "cuStreamGetCtx failed: " + DriverError(rc));
      }
    } else {
      rc = g_driver.cuCtxGetCurrent(&ctx);
      if (rc != CUDA_SUCCESS) {
        return Fail(SAPA_ERR_DRIVER, "cuCtxGetCurrent failed: " + DriverError(rc));
      }
      if (ctx == nullptr) {
        status = PrimaryContext(t_device, &ctx);
        if (status != SAPA_OK) return status;
      }
    }
    rc = g_driver.cuCtxPushCurrent(ctx);
    if (rc != CUDA_SUCCESS) {
      return Fail(SAPA_ERR_DRIVER, "cuCtxPushCurrent failed: " + DriverError(rc));
    }
    pushed_ = true;
    ctx_ = ctx;
    rc = g_driver.cuCtxGetDevice(&device_);
    if (rc != CUDA_SUCCESS) {
      return Fail(SAPA_ERR_DRIVER, "cuCtxGetDevice failed: " + DriverError(rc));
    }
    id_ = ContextId(ctx);
    return SAPA_OK;
  }

  CUdevice device() const { return device_; }
  unsigned long long id() const { return id_; }

 private:
  bool pushed_ = false;
  CUcontext ctx_ = nullptr;
  CUdevice device_ = 0;
  unsigned long long id_ = 0;
};

bool ParseTarget(const std::string& target, bool* ptx, int* major, int* minor) {
  std::string digits;
  if (target.rfind("sm_", 0) == 0) {
    *ptx = false;
    digits = target.substr(3);
  } else if (target.rfind("compute_", 0) == 0) {
    *ptx = true;
    digits = target.substr(8);
  } else {
    return false;
  }
  if (digits.size() < 2 || digits.size() > 4 ||
      digits.find_first_not_of("0123456789") != std::string::npos) {
    return false;  // also rejects arch-specific targets such as sm_90a
  }
  *major = std::atoi(digits.substr(0, digits.size() - 1).c_str());
  *minor = digits.back() - '0';
  return true;
}

// Candidate images for a device, best first: cubins of the same major with minor <= the
// device's (newest first), then PTX not newer than the device (newest first).
std::vector<const Image*> Candidates(int major, int minor) {
  std::vector<std::pair<int, const Image*>> cubins, ptx;
  for (const Image& image : g_images) {
    bool is_ptx;
    int ma, mi;
    if (!ParseTarget(image.target, &is_ptx, &ma, &mi)) continue;
    if (!is_ptx && ma == major && mi <= minor) cubins.push_back({ma * 10 + mi, &image});
    if (is_ptx && (ma < major || (ma == major && mi <= minor))) {
      ptx.push_back({ma * 10 + mi, &image});
    }
  }
  auto newest_first = [](const std::pair<int, const Image*>& a,
                         const std::pair<int, const Image*>& b) { return a.first > b.first; };
  std::stable_sort(cubins.begin(), cubins.end(), newest_first);
  std::stable_sort(ptx.begin(), ptx.end(), newest_first);
  std::vector<const Image*> out;
  for (auto& c : cubins) out.push_back(c.second);
  for (auto& p : ptx) out.push_back(p.second);
  return out;
}

std::string ImageList() {
  std::string list;
  for (const Image& image : g_images) list += (list.empty() ? "" : ", ") + image.target;
  return list.empty() ? "none loaded" : list;
}

std::string Arch(int major, int minor) {
  return "sm_" + std::to_string(major) + std::to_string(minor);
}

int NoImage(int major, int minor) {
  return Fail(SAPA_ERR_NO_IMAGE, "no kernel image for this GPU (" + Arch(major, minor) +
                                     "); the build has: " + ImageList() +
                                     ". Rebuild with KERAS_SAPA_CUDA_TARGETS including " +
                                     Arch(major, minor) + " (python custom_ops/build.py)");
}

// The state of the scope's (device, context), loading the module on first use. The
// scope's context is current. Called with g_mutex held.
int DeviceForLocked(const ContextScope& scope, DeviceState** state) {
  const auto key = std::make_pair(scope.device(), scope.id());
  auto found = g_devices.find(key);
  if (found != g_devices.end()) {
    *state = found->second;
    return SAPA_OK;
  }
  std::unique_ptr<DeviceState> dev(new DeviceState);
  const CUdevice device = scope.device();
  int smem = 0, grid = 0;
  CUresult rc = g_driver.cuDeviceGetAttribute(&dev->major, ATTR_COMPUTE_CAPABILITY_MAJOR, device);
  if (rc == CUDA_SUCCESS) {
    rc = g_driver.cuDeviceGetAttribute(&dev->minor, ATTR_COMPUTE_CAPABILITY_MINOR, device);
  }
  if (rc == CUDA_SUCCESS) {
    rc = g_driver.cuDeviceGetAttribute(&dev->sms, ATTR_MULTIPROCESSOR_COUNT, device);
  }
  if (rc == CUDA_SUCCESS) {
    rc = g_driver.cuDeviceGetAttribute(&dev->max_threads, ATTR_MAX_THREADS_PER_BLOCK, device);
  }
  if (rc == CUDA_SUCCESS) {
    rc = g_driver.cuDeviceGetAttribute(&smem, ATTR_MAX_SHARED_MEMORY_PER_BLOCK, device);
  }
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&grid, ATTR_MAX_GRID_DIM_X, device);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_DRIVER, "reading the device attributes failed: " + DriverError(rc));
  }
  dev->max_smem = std::min(smem, 48 * 1024);  // no opt-in: the static default limit
  dev->max_grid = grid;
  std::vector<const Image*> candidates = Candidates(dev->major, dev->minor);
  if (candidates.empty()) return NoImage(dev->major, dev->minor);
  std::string errors;
  for (const Image* image : candidates) {
    rc = g_driver.cuModuleLoadData(&dev->module, image->data.data());
    if (rc == CUDA_SUCCESS) {
      dev->target = image->target;
      break;
    }
    dev->module = nullptr;
    errors += "; " + image->target + ": " + DriverError(rc);
    if (rc == CUDA_ERROR_UNSUPPORTED_PTX_VERSION) {
      errors += " (the driver is older than the NVRTC that built the PTX)";
    }
  }
  if (dev->module == nullptr) {
    return Fail(rc == CUDA_ERROR_NO_BINARY_FOR_GPU ? SAPA_ERR_NO_IMAGE : SAPA_ERR_DRIVER,
                "no kernel image loads on this GPU (" + Arch(dev->major, dev->minor) + ")" +
                    errors);
  }
  ++g_module_loads;
  *state = dev.release();
  g_devices[key] = *state;
  return SAPA_OK;
}

int Function(DeviceState* dev, const std::string& name, CUfunction* fn) {
  auto found = dev->functions.find(name);
  if (found != dev->functions.end()) {
    *fn = found->second;
    return SAPA_OK;
  }
  const CUresult rc = g_driver.cuModuleGetFunction(fn, dev->module, name.c_str());
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_NO_IMAGE, "kernel " + name + " not in the image " + dev->target +
                                       ": " + DriverError(rc));
  }
  dev->functions[name] = *fn;
  return SAPA_OK;
}

const char* DtypeName(int dtype) {
  switch (dtype) {
    case SAPA_F32: return "f32";
    case SAPA_F16: return "f16";
    case SAPA_BF16: return "bf16";
    case SAPA_F64: return "f64";
    default: return nullptr;
  }
}

int AccSize(int dtype) { return dtype == SAPA_F64 ? 8 : 4; }

bool IsHalf(int dtype) { return dtype == SAPA_F16 || dtype == SAPA_BF16; }

enum Kind { kDot, kDSoftmax, kFused, kGather, kScatter };

// Dynamic shared memory of a tiled kernel (mirrors the layouts in sapa_kernels.cuh).
int64_t SharedBytes(Kind kind, int dtype, int64_t tile, int64_t up, int64_t kernel) {
  const int64_t acc = AccSize(dtype);
  const int64_t dc = dtype == SAPA_F64 ? 8 : 16, row = 32, scatter = dtype == SAPA_F64 ? 8 : 16;
  const int64_t ts = tile * up, points = ts * ts, ht = tile + kernel - 1, halo = ht * ht;
  const int64_t kk = kernel * kernel;
  switch (kind) {
    case kDot:
    case kDSoftmax: return (points + halo) * (dc + 1) * acc;
    case kFused: return (points * kk + std::max((points + halo) * (dc + 1), halo * row)) * acc;
    case kGather: return (points * kk + halo * row) * acc;
    case kScatter: return ht * up * ht * up * scatter * acc;
  }
  return 0;
}

// Threads per block of a tiled kernel: dot/fused need one thread per high-res point.
int BlockFor(Kind kind, int64_t tile, int64_t up) {
  if (kind == kDot || kind == kDSoftmax || kind == kFused) {
    const int64_t points = tile * up * tile * up;
    return static_cast<int>((points + 31) / 32 * 32);
  }
  return 256;
}

// Picks the tile side that keeps the most useful threads resident per SM (occupancy API),
// larger tiles winning ties (less halo). Returns false when no tile fits. g_mutex held.
bool ChooseTile(DeviceState* dev, CUfunction fn, const std::string& name, Kind kind, int dtype,
                int64_t up, int64_t kernel, int* tile, int* block, int* smem) {
  auto key = std::make_tuple(name, up, kernel);
  auto found = dev->tiles.find(key);
  if (found != dev->tiles.end()) {
    std::tie(*tile, *block, *smem) = found->second;
    return *tile > 0;
  }
  int best_tile = 0, best_block = 0, best_smem = 0;
  int64_t best_score = -1;
  // The kernel's own limit (its __launch_bounds__, its registers) and the device's.
  int max_threads = dev->max_threads;
  if (g_driver.cuFuncGetAttribute(&max_threads, FUNC_ATTR_MAX_THREADS_PER_BLOCK, fn) !=
          CUDA_SUCCESS ||
      max_threads <= 0) {
    max_threads = dev->max_threads;
  }
  max_threads = std::min(max_threads, dev->max_threads);
  for (int64_t t = 1; t <= 32; ++t) {
    const int b = BlockFor(kind, t, up);
    const int64_t bytes = SharedBytes(kind, dtype, t, up, kernel);
    if (b > max_threads || bytes > dev->max_smem) break;  // both grow with t
    int blocks = 0;
    if (g_driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, b, bytes) !=
            CUDA_SUCCESS ||
        blocks <= 0) {
      continue;
    }
    const int64_t useful = (kind == kScatter) ? t * t * 16 : t * up * t * up;
    const int64_t score = blocks * std::min<int64_t>(useful, b);
    if (score >= best_score) {
      best_score = score;
      best_tile = static_cast<int>(t);
      best_block = b;
      best_smem = static_cast<int>(bytes);
    }
  }
  dev->tiles[key] = std::make_tuple(best_tile, best_block, best_smem);
  *tile = best_tile;
  *block = best_block;
  *smem = best_smem;
  return best_tile > 0;
}

int CheckDtype(int dtype) {
  if (DtypeName(dtype) == nullptr) {
    return Fail(SAPA_ERR_INVALID, "dtype must be SAPA_F32/F16/BF16/F64. Received: dtype=" +
                                      std::to_string(dtype));
  }
  return SAPA_OK;
}

int Check(int dtype, const SapaDims* d) {
  if (CheckDtype(dtype) != SAPA_OK) return SAPA_ERR_INVALID;
  if (d == nullptr || d->batch < 0 || d->height < 0 || d->width < 0 || d->channels < 0 ||
      d->channels_v < 0 || d->up < 1 || d->kernel < 1 || d->kernel % 2 == 0) {
    return Fail(SAPA_ERR_INVALID, "invalid sizes: up must be >= 1, kernel odd and >= 1, "
                                  "the others >= 0");
  }
  return SAPA_OK;
}

int Launch(CUstream stream, const std::string& name, CUfunction fn, int64_t grid, int block,
           int smem, void** params) {
  t_last_name = name;
  t_last_grid = grid;
  t_last_block = block;
  t_last_smem = smem;
  if (t_record) t_record->emplace_back(name, block, smem);
  if (grid == 0) return SAPA_OK;
  const CUresult rc = g_driver.cuLaunchKernel(fn, static_cast<unsigned>(grid), 1, 1,
                                              static_cast<unsigned>(block), 1, 1,
                                              static_cast<unsigned>(smem), stream, params,
                                              nullptr);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_LAUNCH, "launching " + name + " (grid " + std::to_string(grid) +
                                     ", block " + std::to_string(block) + ", shared " +
                                     std::to_string(smem) + " B) failed: " + DriverError(rc));
  }
  return SAPA_OK;
}

// Grid of an untiled (grid-stride) kernel.
int64_t StrideGrid(const DeviceState* dev, int64_t work, int block) {
  const int64_t needed = (work + block - 1) / block;
  return std::min<int64_t>(needed, static_cast<int64_t>(dev->sms) * 32);
}

// The public entry points, by what they launch.
enum Op { kOpDot, kOpGather, kOpScatter, kOpGatherAcc, kOpScatterAcc, kOpForward,
          kOpSoftmaxBackward, kOpCount,
          kOpBackward,                            // SAPA's fused backward: four of the above
          kOpDeformForward, kOpDeformBackward };  // SAPA-D's (not SAPA's window kernels)

std::string Name(const char* op, int dtype, const std::string& suffix) {
  return std::string("sapa_") + op + "_" + DtypeName(dtype) + suffix;
}

bool TiledK(int64_t kernel) { return kernel == 3 || kernel == 5 || kernel == 7; }

// The tiled kernel of an entry point (empty: none for this K) and its untiled fallback.
void Kernels(Op op, int dtype, int64_t kernel, Kind* kind, std::string* tiled,
             std::string* any) {
  const std::string k = "_k" + std::to_string(kernel);
  const std::string wacc = IsHalf(dtype) ? "_wacc" : "";
  switch (op) {
    case kOpDot:
      *kind = kDot;
      *tiled = TiledK(kernel) ? Name("dot", dtype, k) : "";
      *any = Name("dot", dtype, "_any");
      return;
    case kOpGather:
    case kOpGatherAcc: {
      const std::string w = op == kOpGatherAcc ? wacc : "";
      *kind = kGather;
      *tiled = Name("gather", dtype, w);
      *any = Name("gather", dtype, w + "_any");
      return;
    }
    case kOpScatter:
    case kOpScatterAcc: {
      const std::string w = op == kOpScatterAcc ? wacc : "";
      *kind = kScatter;
      *tiled = Name("scatter", dtype, w);
      *any = Name("scatter", dtype, w + "_any");
      return;
    }
    case kOpForward:
      *kind = kFused;
      *tiled = TiledK(kernel) ? Name("fused", dtype, k) : "";
      *any = Name("fused", dtype, "_any");
      return;
    default:
      *kind = kDSoftmax;
      *tiled = TiledK(kernel) ? Name("dsoftmax", dtype, k) : "";
      *any = Name("dsoftmax", dtype, "_any");
      return;
  }
}

// Threads of an untiled kernel's grid-stride loop.
int64_t UntiledWork(Op op, const SapaDims* d) {
  const int64_t high = d->batch * d->height * d->up * d->width * d->up;
  switch (op) {
    case kOpDot: return high * d->kernel * d->kernel;
    case kOpGather:
    case kOpGatherAcc: return high * d->channels;
    case kOpScatter:
    case kOpScatterAcc: return d->batch * d->height * d->width * d->channels;
    default: return high;
  }
}

struct Choice {
  std::string name;
  CUfunction fn = nullptr;
  int tile = 0, block = 256, smem = 0;
};

// What an entry point launches for (dtype, up, K) on dev. g_mutex held.
int ChooseLocked(DeviceState* dev, Op op, int dtype, int64_t up, int64_t kernel, bool untiled,
                 Choice* choice) {
  Kind kind;
  std::string tiled, any;
  Kernels(op, dtype, kernel, &kind, &tiled, &any);
  if (!tiled.empty() && !untiled && up <= SAPA_TILED_MAX_UP) {
    CUfunction fn;
    const int status = Function(dev, tiled, &fn);
    if (status != SAPA_OK) return status;
    int tile, block, smem;
    if (ChooseTile(dev, fn, tiled, kind, dtype, up, kernel, &tile, &block, &smem)) {
      *choice = Choice{tiled, fn, tile, block, smem};
      return SAPA_OK;
    }
  }
  CUfunction fn;
  const int status = Function(dev, any, &fn);
  if (status != SAPA_OK) return status;
  *choice = Choice{any, fn, 0, 256, 0};
  return SAPA_OK;
}

// Runs an entry point: its context pushed for the whole call, the tiled kernel when one
// fits (else the untiled one). ptrs are the pointer arguments after the Args struct.
int Run(CUstream stream, Op op, int dtype, const SapaDims* d, std::vector<void*> ptrs) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  ContextScope scope;
  status = scope.Enter(stream);
  if (status != SAPA_OK) return status;
  DeviceState* dev = nullptr;
  Choice choice;
  const bool untiled = t_untiled || g_untiled;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    status = DeviceForLocked(scope, &dev);
    if (status != SAPA_OK) return status;
    status = ChooseLocked(dev, op, dtype, d->up, d->kernel, untiled, &choice);
    if (status != SAPA_OK) return status;
  }
  KernelArgs args = {d->batch, d->height, d->width, d->up, d->kernel, d->channels,
                     d->channels_v, 0, 0, 0};
  std::vector<void*> params;
  params.push_back(&args);
  for (void*& p : ptrs) params.push_back(&p);
  if (choice.tile > 0) {
    args.tile = choice.tile;
    args.tiles_h = (d->height + choice.tile - 1) / choice.tile;
    args.tiles_w = (d->width + choice.tile - 1) / choice.tile;
    const int64_t grid = d->batch * args.tiles_h * args.tiles_w;
    if (grid <= dev->max_grid) {
      return Launch(stream, choice.name, choice.fn, grid, choice.block, choice.smem,
                    params.data());
    }
    args.tile = args.tiles_h = args.tiles_w = 0;
    std::lock_guard<std::mutex> lock(g_mutex);
    status = ChooseLocked(dev, op, dtype, d->up, d->kernel, true, &choice);
    if (status != SAPA_OK) return status;
  }
  return Launch(stream, choice.name, choice.fn, StrideGrid(dev, UntiledWork(op, d), 256), 256,
                0, params.data());
}

// --- SAPA's fused backward ------------------------------------------------------------

// sapa_backward's dlogits scratch: (B, sH, sW, K*K) in the accumulation type.
int64_t BackwardScratchBytes(int dtype, const SapaDims* d) {
  return d->batch * d->height * d->up * d->width * d->up * d->kernel * d->kernel *
         AccSize(dtype);
}

// The sizes of the backward's launches over the query and key (`channels` on both
// sides) and over the value and the output's gradient (`channels_v` on both sides).
SapaDims OverQueryKey(const SapaDims* d) {
  SapaDims out = *d;
  out.channels_v = d->channels;
  return out;
}

SapaDims OverValue(const SapaDims* d) {
  SapaDims out = *d;
  out.channels = d->channels_v;
  return out;
}

// The logits' gradient, then grad_query = gather(dlogits, key), grad_key =
// scatter(dlogits, query), grad_value = scatter(attn, grad): deterministic launches.
int Backward(CUstream stream, int dtype, const SapaDims* d, const void* grad, const void* q,
             const void* k, const void* v, const void* attn, void* dlogits, void* dq, void* dk,
             void* dv) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  if (dlogits == nullptr && BackwardScratchBytes(dtype, d) > 0) {
    return Fail(SAPA_ERR_INVALID, "sapa_backward needs a dlogits buffer "
                                  "(sapa_backward_workspace bytes)");
  }
  const SapaDims qk = OverQueryKey(d), value = OverValue(d);
  auto in = [](const void* p) { return const_cast<void*>(p); };
  status = Run(stream, kOpSoftmaxBackward, dtype, &value, {in(grad), in(v), in(attn), dlogits});
  if (status == SAPA_OK) status = Run(stream, kOpGatherAcc, dtype, &qk, {dlogits, in(k), dq});
  if (status == SAPA_OK) status = Run(stream, kOpScatterAcc, dtype, &qk, {dlogits, in(q), dk});
  if (status == SAPA_OK) {
    status = Run(stream, kOpScatterAcc, dtype, &value, {in(attn), in(grad), dv});
  }
  return status;
}

// A *_workspace entry point: *bytes = size() where the sizes' check gave `status` SAPA_OK,
// else 0 (and that status).
template <typename Fn>
int Workspace(int status, Fn size, size_t* bytes) {
  if (bytes) *bytes = status == SAPA_OK ? static_cast<size_t>(size()) : 0;
  return status;
}

// --- SAPA-D ---------------------------------------------------------------------------

// Threads per block of the SAPA-D kernels (their __launch_bounds__).
const int kDeformBlock = 256;

// Dynamic shared memory of a SAPA-D block: per (point, k) 7 accumulators and 2 ints
// (deform_shared_bytes in sapa_deform_kernels.cuh).
int64_t DeformSharedBytes(int dtype, int64_t tile, int64_t gp) {
  return tile * gp * (7 * AccSize(dtype) + 2 * 4);
}

int CheckDeform(int dtype, const SapaDeformDims* d) {
  if (CheckDtype(dtype) != SAPA_OK) return SAPA_ERR_INVALID;
  if (d == nullptr || d->batch < 0 || d->height < 0 || d->width < 0 || d->dim < 0 ||
      d->channels < 0 || d->up < 1 || d->points < 1 || d->groups < 1) {
    return Fail(SAPA_ERR_INVALID, "invalid SAPA-D sizes: up, points and groups must be >= 1, "
                                  "the others >= 0");
  }
  if (d->dim % d->groups != 0 || d->channels % d->groups != 0) {
    return Fail(SAPA_ERR_INVALID, "SAPA-D: dim and channels must be multiples of groups. "
                                  "Received: dim=" + std::to_string(d->dim) + ", channels=" +
                                      std::to_string(d->channels) + ", groups=" +
                                      std::to_string(d->groups));
  }
  const int64_t int32_max = 2147483647;
  if (d->points >= int32_max || d->groups >= int32_max) {
    return Fail(SAPA_ERR_INVALID, "SAPA-D: points and groups must be below 2**31");
  }
  if (d->height >= int32_max || d->width >= int32_max ||
      (d->height + 1) * (d->width + 1) > int32_max) {
    return Fail(SAPA_ERR_INVALID, "SAPA-D: (height+1)*(width+1) must be below 2**31. "
                                  "Received: height=" + std::to_string(d->height) +
                                      ", width=" + std::to_string(d->width));
  }
  return SAPA_OK;
}

// The kernels of SAPA-D's entry points for a dtype and G*P points per output point.
struct DeformKernels {
  Choice forward, backward, scatter;  // tiled
  Choice zero, cast;                  // grid-stride over elements (cast: f16/bf16 only)
};

// The launch of SAPA-D kernel `name`. A tiled kernel's block takes `tile` output points
// at a time: the largest power of two with tile*gp <= the block (one (point, k) item per
// thread in the kernels' first phase), so the tiles a device can get are the powers of
// two up to 256, each of which the self-test runs. g_mutex held.
int DeformChooseLocked(DeviceState* dev, const std::string& name, int dtype, int64_t gp,
                       bool tiled, Choice* choice) {
  CUfunction fn;
  const int status = Function(dev, name, &fn);
  if (status != SAPA_OK) return status;
  int limit = 0, block = std::min(kDeformBlock, dev->max_threads);
  if (g_driver.cuFuncGetAttribute(&limit, FUNC_ATTR_MAX_THREADS_PER_BLOCK, fn) ==
          CUDA_SUCCESS &&
      limit > 0) {
    block = std::min(block, limit);
  }
  if (!tiled) {
    *choice = Choice{name, fn, 0, block, 0};
    return SAPA_OK;
  }
  int64_t tile = kDeformBlock;
  while (tile > 1 && tile * gp > block) tile /= 2;
  const int64_t smem = DeformSharedBytes(dtype, tile, gp);
  if (smem > dev->max_smem) {
    return Fail(SAPA_ERR_INVALID,
                "SAPA-D: groups*num_points=" + std::to_string(gp) + " points per output "
                "point need " + std::to_string(smem) + " bytes of shared memory per block, "
                "more than the device's " + std::to_string(dev->max_smem) + " (at most " +
                    std::to_string(dev->max_smem / DeformSharedBytes(dtype, 1, 1)) +
                    " points per output point)");
  }
  *choice = Choice{name, fn, static_cast<int>(tile), block, static_cast<int>(smem)};
  return SAPA_OK;
}

int DeformKernelsLocked(DeviceState* dev, int dtype, int64_t gp, DeformKernels* k) {
  const std::string t = DtypeName(dtype);
  const std::string wacc = IsHalf(dtype) ? "_wacc" : "";
  int status = DeformChooseLocked(dev, "sapa_deform_forward_" + t, dtype, gp, true, &k->forward);
  if (status == SAPA_OK) {
    status = DeformChooseLocked(dev, "sapa_deform_backward_" + t, dtype, gp, true, &k->backward);
  }
  if (status == SAPA_OK) {
    status = DeformChooseLocked(dev, "sapa_deform_scatter_" + t + wacc, dtype, gp, true,
                                &k->scatter);
  }
  if (status == SAPA_OK) {
    status = DeformChooseLocked(dev, dtype == SAPA_F64 ? "sapa_deform_zero_f64"
                                                       : "sapa_deform_zero_f32",
                                dtype, gp, false, &k->zero);
  }
  k->cast = Choice{};
  if (status == SAPA_OK && IsHalf(dtype)) {
    status = DeformChooseLocked(dev, "sapa_deform_cast_" + t, dtype, gp, false, &k->cast);
  }
  return status;
}

// Pushes the call's context and chooses its kernels.
int DeformPrepare(ContextScope* scope, CUstream stream, int dtype, const SapaDeformDims* d,
                  DeviceState** dev, DeformKernels* kernels) {
  int status = CheckDeform(dtype, d);
  if (status != SAPA_OK) return status;
  status = scope->Enter(stream);
  if (status != SAPA_OK) return status;
  std::lock_guard<std::mutex> lock(g_mutex);
  status = DeviceForLocked(*scope, dev);
  if (status != SAPA_OK) return status;
  return DeformKernelsLocked(*dev, dtype, d->groups * d->points, kernels);
}

int64_t DeformHighPoints(const SapaDeformDims* d) {
  return d->batch * d->height * d->up * d->width * d->up;
}

// One SAPA-D launch over `work` items (tiled: output points; else elements), `count` the
// kernel's DeformArgs::count. Grid-stride kernels: at most 32 blocks per SM.
int DeformLaunch(CUstream stream, const DeviceState* dev, const Choice& c,
                 const SapaDeformDims* d, int64_t work, int64_t count, std::vector<void*> ptrs) {
  DeformKernelArgs args = {d->batch, d->height, d->width, d->up, d->points,
                           d->groups, d->dim, d->channels, c.tile, count};
  const int64_t per_block = c.tile > 0 ? c.tile : c.block;
  const int64_t grid = std::min<int64_t>((work + per_block - 1) / per_block,
                                         std::min<int64_t>(dev->max_grid, dev->sms * 32LL));
  std::vector<void*> params;
  params.push_back(&args);
  for (void*& p : ptrs) params.push_back(&p);
  return Launch(stream, c.name, c.fn, grid, c.block, c.smem, params.data());
}

// The workspace of sapa_deform_backward: the logits' gradient (accumulation type), then
// for f16/bf16 one float buffer for the key's and then the value's scatter.
int64_t DeformLogitsBytes(int dtype, const SapaDeformDims* d) {
  const int64_t bytes = DeformHighPoints(d) * d->groups * d->points * AccSize(dtype);
  return (bytes + 255) / 256 * 256;
}

int64_t DeformWorkspaceBytes(int dtype, const SapaDeformDims* d) {
  const int64_t low = d->batch * d->height * d->width;
  return DeformLogitsBytes(dtype, d) +
         (IsHalf(dtype) ? low * std::max(d->dim, d->channels) * AccSize(dtype) : 0);
}

int DeformForward(CUstream stream, int dtype, const SapaDeformDims* d, const void* q,
                  const void* key, const void* value, const void* off, void* out, void* attn) {
  ContextScope scope;
  DeviceState* dev = nullptr;
  DeformKernels k;
  const int status = DeformPrepare(&scope, stream, dtype, d, &dev, &k);
  if (status != SAPA_OK) return status;
  return DeformLaunch(stream, dev, k.forward, d, DeformHighPoints(d), 0,
                      {const_cast<void*>(q), const_cast<void*>(key), const_cast<void*>(value),
                       const_cast<void*>(off), out, attn});
}

int DeformBackward(CUstream stream, int dtype, const SapaDeformDims* d, const void* grad,
                   const void* q, const void* key, const void* value, const void* off,
                   const void* attn, void* workspace, void* dq, void* dkey, void* dvalue,
                   void* doff) {
  ContextScope scope;
  DeviceState* dev = nullptr;
  DeformKernels k;
  int status = DeformPrepare(&scope, stream, dtype, d, &dev, &k);
  if (status != SAPA_OK) return status;
  if (workspace == nullptr && DeformWorkspaceBytes(dtype, d) > 0) {
    return Fail(SAPA_ERR_INVALID, "sapa_deform_backward needs a workspace "
                                  "(sapa_deform_workspace bytes)");
  }
  const int64_t high = DeformHighPoints(d), low = d->batch * d->height * d->width;
  void* dlogits = workspace;
  void* acc = IsHalf(dtype) ? static_cast<char*>(workspace) + DeformLogitsBytes(dtype, d)
                            : nullptr;
  status = DeformLaunch(stream, dev, k.backward, d, high, 0,
                        {const_cast<void*>(grad), const_cast<void*>(q), const_cast<void*>(key),
                         const_cast<void*>(value), const_cast<void*>(off),
                         const_cast<void*>(attn), dlogits, dq, doff});
  // grad_key = scatter(dlogits, query), grad_value = scatter(attn, grad), each summed in
  // the accumulation type (in place for f32/f64) from zero.
  const struct {
    const void* coef;
    const void* src;
    void* dst;
    int64_t channels;
  } scatters[2] = {{dlogits, q, dkey, d->dim}, {attn, grad, dvalue, d->channels}};
  for (const auto& s : scatters) {
    void* sum = acc ? acc : s.dst;
    const int64_t count = low * s.channels;
    if (status == SAPA_OK) status = DeformLaunch(stream, dev, k.zero, d, count, count, {sum});
    if (status == SAPA_OK) {
      status = DeformLaunch(stream, dev, k.scatter, d, high, s.channels,
                            {const_cast<void*>(s.coef), const_cast<void*>(s.src),
                             const_cast<void*>(off), sum});
    }
    if (status == SAPA_OK && acc) {
      status = DeformLaunch(stream, dev, k.cast, d, count, count, {sum, s.dst});
    }
  }
  return status;
}

// --- SAPA-D's halves (float32 and float64) ---------------------------------------------

// One half: the per-output-point kernel sapa_deform_<stem>_<t> on `ptrs`; for a backward
// (dst not null; the offsets are its fourth tensor) then dst = scatter(coef, src) over the
// low-resolution map's `channels` channels, zeroed first (f32/f64 accumulate in place).
// d->dim / d->channels: 0 where the half has no such tensor.
int DeformHalf(CUstream stream, int dtype, const SapaDeformDims* d, const char* stem,
               std::vector<void*> ptrs, const void* coef = nullptr, const void* src = nullptr,
               void* dst = nullptr, int64_t channels = 0) {
  if (dtype != SAPA_F32 && dtype != SAPA_F64) {
    return Fail(SAPA_ERR_INVALID, std::string("sapa_deform_") + stem +
                                      " takes float32 or float64. Received: dtype " +
                                      std::to_string(dtype));
  }
  ContextScope scope;
  DeviceState* dev = nullptr;
  DeformKernels k;
  int status = DeformPrepare(&scope, stream, dtype, d, &dev, &k);
  if (status != SAPA_OK) return status;
  Choice point;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    status = DeformChooseLocked(dev, std::string("sapa_deform_") + stem + "_" + DtypeName(dtype),
                                dtype, d->groups * d->points, true, &point);
  }
  if (status == SAPA_OK) status = DeformLaunch(stream, dev, point, d, DeformHighPoints(d), 0, ptrs);
  if (dst == nullptr || status != SAPA_OK) return status;
  const int64_t count = d->batch * d->height * d->width * channels;
  status = DeformLaunch(stream, dev, k.zero, d, count, count, {dst});
  if (status != SAPA_OK) return status;
  return DeformLaunch(stream, dev, k.scatter, d, DeformHighPoints(d), channels,
                      {const_cast<void*>(coef), const_cast<void*>(src), ptrs[3], dst});
}

// --- Launch configurations and the self-test ----------------------------------------

struct PlanEntry {
  Op op;
  int64_t up, kernel;  // SAPA-D: up and G*P
  bool untiled;        // run with the tiled kernels off (covers the untiled ones)
  Choice choice;       // the kernel it is listed for
  std::vector<Choice> also;  // other kernels the entry point launches (SAPA-D's backward)
};

// The SAPA-D self-test case that gets each tile: G*P = 256 / tile points per output point.
int64_t DeformGroups(int64_t gp) { return gp >= 16 ? 4 : gp >= 4 ? 2 : 1; }

// Every launch configuration the launcher can choose on dev for dtype: SAPA-D's kernels
// once per tile, then each SAPA entry point's
// (kernel, tile) for up 1..SAPA_TILED_MAX_UP and odd K until no tiled kernel fits
// (dot/fused/dsoftmax: K 3, 5, 7; gather/scatter: any K whose halo fits the shared
// memory), then every untiled kernel. per_tile: only the first (up, K) of each (kernel,
// tile); else every (kernel, tile, up, K) (block and shared memory depend on all four).
// g_mutex held.
int EnumerateLocked(DeviceState* dev, int dtype, bool per_tile, std::vector<PlanEntry>* plan) {
  std::set<std::tuple<std::string, int, int64_t, int64_t>> seen;
  auto add = [&](Op op, int64_t up, int64_t kernel, bool untiled, bool* tiled) -> int {
    Choice choice;
    const int status = ChooseLocked(dev, op, dtype, up, kernel, untiled, &choice);
    if (status != SAPA_OK) return status;
    if (choice.tile > 0) *tiled = true;
    const bool any = choice.tile == 0;  // untiled kernels: once each
    const auto key = std::make_tuple(choice.name, choice.tile, per_tile || any ? 0 : up,
                                     per_tile || any ? 0 : kernel);
    if (seen.insert(key).second) plan->push_back(PlanEntry{op, up, kernel, untiled, choice, {}});
    return SAPA_OK;
  };
  // SAPA-D first: its forward and backward once per tile (G*P = 1, 2, 4, ..., 256 get
  // the tiles 256, 128, ..., 1 from a 256-thread block).
  for (int64_t gp = 1; gp <= kDeformBlock; gp *= 2) {
    DeformKernels k;
    const int status = DeformKernelsLocked(dev, dtype, gp, &k);
    if (status != SAPA_OK) return status;
    if (!seen.insert(std::make_tuple(k.forward.name, k.forward.tile, 0, 0)).second) continue;
    plan->push_back(PlanEntry{kOpDeformForward, 2, gp, false, k.forward, {}});
    std::vector<Choice> also = {k.zero, k.scatter};
    if (IsHalf(dtype)) also.push_back(k.cast);
    plan->push_back(PlanEntry{kOpDeformBackward, 2, gp, false, k.backward, also});
  }
  for (int64_t up = 1; up <= SAPA_TILED_MAX_UP; ++up) {
    for (int64_t kernel = 1; kernel <= 63; kernel += 2) {
      bool tiled = false;
      for (int op = 0; op < kOpCount; ++op) {
        const int status = add(static_cast<Op>(op), up, kernel, false, &tiled);
        if (status != SAPA_OK) return status;
      }
      if (!tiled && kernel > 7) break;  // shared memory grows with K
    }
  }
  for (int op = 0; op < kOpCount; ++op) {
    bool tiled = false;
    const int status = add(static_cast<Op>(op), 2, 3, true, &tiled);
    if (status != SAPA_OK) return status;
  }
  // SAPA's fused backward (sapa_backward) last, at up 2 and K 5, once on the tiled kernels
  // and once on the untiled ones: the kernels listed above, composed (no new
  // configuration).
  for (const bool untiled : {false, true}) {
    PlanEntry entry{kOpBackward, 2, 5, untiled, Choice{}, {}};
    for (const Op part : {kOpSoftmaxBackward, kOpGatherAcc, kOpScatterAcc}) {
      Choice choice;
      const int status = ChooseLocked(dev, part, dtype, 2, 5, untiled, &choice);
      if (status != SAPA_OK) return status;
      if (part == kOpSoftmaxBackward) {
        entry.choice = choice;
      } else {
        entry.also.push_back(choice);
      }
    }
    plan->push_back(entry);
  }
  return SAPA_OK;
}

int Enumerate(CUstream stream, int dtype, bool per_tile, std::vector<PlanEntry>* plan) {
  if (CheckDtype(dtype) != SAPA_OK) return SAPA_ERR_INVALID;
  ContextScope scope;
  int status = scope.Enter(stream);
  if (status != SAPA_OK) return status;
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState* dev = nullptr;
  status = DeviceForLocked(scope, &dev);
  if (status != SAPA_OK) return status;
  return EnumerateLocked(dev, dtype, per_tile, plan);
}

// Host values <-> device storage (f16/bf16 rounded to nearest even).
uint16_t FloatToHalf(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int32_t exponent = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = x & 0x7fffff;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (mantissa ? 0x200 : 0));
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7c00);
  if (exponent <= 0) {
    if (exponent < -10) return static_cast<uint16_t>(sign);
    mantissa |= 0x800000;
    const int shift = 14 - exponent;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1), middle = 1u << (shift - 1);
    if (rest > middle || (rest == middle && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
  return static_cast<uint16_t>(sign | half);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  uint32_t x;
  if (exponent == 0x1f) {
    x = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    x = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: exact in float
    float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
    return sign ? -value : value;
  }
  float out;
  std::memcpy(&out, &x, 4);
  return out;
}

uint16_t FloatToBfloat(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

float BfloatToFloat(uint16_t b) {
  const uint32_t x = static_cast<uint32_t>(b) << 16;
  float out;
  std::memcpy(&out, &x, 4);
  return out;
}

int StorageSize(int storage) {
  return storage == SAPA_F64 ? 8 : storage == SAPA_F32 ? 4 : 2;
}

// A host tensor: values (float64) and the device storage type.
struct HostTensor {
  int storage;
  std::vector<double> values;

  std::vector<unsigned char> Encode() const {
    std::vector<unsigned char> bytes(values.size() * StorageSize(storage));
    for (size_t i = 0; i < values.size(); ++i) {
      unsigned char* at = bytes.data() + i * StorageSize(storage);
      if (storage == SAPA_F64) {
        std::memcpy(at, &values[i], 8);
      } else if (storage == SAPA_F32) {
        const float f = static_cast<float>(values[i]);
        std::memcpy(at, &f, 4);
      } else {
        const float f = static_cast<float>(values[i]);
        const uint16_t h = storage == SAPA_F16 ? FloatToHalf(f) : FloatToBfloat(f);
        std::memcpy(at, &h, 2);
      }
    }
    return bytes;
  }

  void Decode(const std::vector<unsigned char>& bytes) {
    for (size_t i = 0; i < values.size(); ++i) {
      const unsigned char* at = bytes.data() + i * StorageSize(storage);
      if (storage == SAPA_F64) {
        std::memcpy(&values[i], at, 8);
      } else if (storage == SAPA_F32) {
        float f;
        std::memcpy(&f, at, 4);
        values[i] = f;
      } else {
        uint16_t h;
        std::memcpy(&h, at, 2);
        values[i] = storage == SAPA_F16 ? HalfToFloat(h) : BfloatToFloat(h);
      }
    }
  }
};

// Deterministic values in [-scale, scale), already rounded to the storage type (so the
// reference sees exactly what the GPU reads).
HostTensor Random(int storage, size_t count, uint64_t* seed, double scale) {
  HostTensor t{storage, std::vector<double>(count)};
  for (double& v : t.values) {
    *seed = *seed * 6364136223846793005ULL + 1442695040888963407ULL;
    v = (static_cast<double>(*seed >> 11) / 9007199254740992.0 * 2.0 - 1.0) * scale;
  }
  t.Decode(t.Encode());
  return t;
}

// exp without libm's versioned exp (glibc 2.29): range reduction and a Taylor series,
// accurate to ~1e-15 relative for the softmax's x <= 0.
double Exp(double x) {
  if (x < -700.0) return 0.0;
  const double ln2 = 0.6931471805599453;
  const double k = static_cast<double>(static_cast<int64_t>(x / ln2 + (x < 0 ? -0.5 : 0.5)));
  const double r = x - k * ln2;
  double term = 1.0, sum = 1.0;
  for (int n = 1; n < 24; ++n) {
    term *= r / n;
    sum += term;
  }
  int64_t e = static_cast<int64_t>(k);
  while (e > 0) { sum *= 2.0; --e; }
  while (e < 0) { sum *= 0.5; ++e; }
  return sum;
}

// The float64 CPU reference of the entry points (the loops of tests/reference.py).
struct Geometry {
  int64_t batch, height, width, up, kernel;
  int64_t HighPoints() const { return batch * height * up * width * up; }
  int64_t LowPoints() const { return batch * height * width; }
  int64_t Taps() const { return kernel * kernel; }
  // The low-res point of tap n of high-res point `point`, or -1 outside the map.
  int64_t Neighbour(int64_t point, int64_t n) const {
    const int64_t sw = width * up, sh = height * up;
    const int64_t j = point % sw, i = (point / sw) % sh, b = point / (sw * sh);
    const int64_t r = kernel / 2;
    const int64_t p = i / up + n / kernel - r, t = j / up + n % kernel - r;
    if (p < 0 || p >= height || t < 0 || t >= width) return -1;
    return (b * height + p) * width + t;
  }
};

std::vector<double> RefDot(const Geometry& g, const std::vector<double>& hi,
                           const std::vector<double>& lo, int64_t ch) {
  std::vector<double> out(g.HighPoints() * g.Taps(), 0.0);
  for (int64_t point = 0; point < g.HighPoints(); ++point) {
    for (int64_t n = 0; n < g.Taps(); ++n) {
      const int64_t q = g.Neighbour(point, n);
      if (q < 0) continue;
      double sum = 0.0;
      for (int64_t c = 0; c < ch; ++c) sum += hi[point * ch + c] * lo[q * ch + c];
      out[point * g.Taps() + n] = sum;
    }
  }
  return out;
}

// Gather: out[point] = sum_n w[point, n] * src[neighbour n] (high resolution); scatter:
// out[neighbour n] += w[point, n] * src[point] (low resolution).
std::vector<double> RefWindow(const Geometry& g, const std::vector<double>& w,
                              const std::vector<double>& src, int64_t ch, bool scatter) {
  std::vector<double> out((scatter ? g.LowPoints() : g.HighPoints()) * ch, 0.0);
  for (int64_t point = 0; point < g.HighPoints(); ++point) {
    for (int64_t n = 0; n < g.Taps(); ++n) {
      const int64_t q = g.Neighbour(point, n);
      if (q < 0) continue;
      const int64_t from = scatter ? point : q, to = scatter ? q : point;
      for (int64_t c = 0; c < ch; ++c) {
        out[to * ch + c] += w[point * g.Taps() + n] * src[from * ch + c];
      }
    }
  }
  return out;
}


// Softmax over consecutive runs of `run` values.
std::vector<double> RefSoftmaxRuns(const std::vector<double>& logits, int64_t run) {
  std::vector<double> out(logits.size());
  for (size_t start = 0; start + run <= logits.size(); start += run) {
    const double* row = logits.data() + start;
    const double top = *std::max_element(row, row + run);
    double sum = 0.0;
    for (int64_t n = 0; n < run; ++n) sum += (out[start + n] = Exp(row[n] - top));
    for (int64_t n = 0; n < run; ++n) out[start + n] /= sum;
  }
  return out;
}

std::vector<double> RefSoftmax(const Geometry& g, const std::vector<double>& logits) {
  return RefSoftmaxRuns(logits, g.Taps());
}

// The logits' gradient attn * (dot(grad, v) - <attn, dot(grad, v)>), from gv = dot(grad,
// v) (RefDot).
std::vector<double> RefSoftmaxBackward(const Geometry& g, const std::vector<double>& attn,
                                       const std::vector<double>& gv) {
  const size_t taps = g.Taps();
  std::vector<double> out(attn.size());
  for (size_t p = 0; p < static_cast<size_t>(g.HighPoints()); ++p) {
    double inner = 0.0;
    for (size_t n = 0; n < taps; ++n) inner += attn[p * taps + n] * gv[p * taps + n];
    for (size_t n = 0; n < taps; ++n) {
      out[p * taps + n] = attn[p * taps + n] * (gv[p * taps + n] - inner);
    }
  }
  return out;
}

// SAPA-D's float64 reference (the loops of tests/reference_deform.py, the kernels'
// rules: the cell of floor, zero outside the map, a point outside (-1, H) x (-1, W)
// dropped with every gradient 0).
struct DeformGeometry {
  int64_t batch, height, width, up, points, groups, dim, channels;
  int64_t HighPoints() const { return batch * height * up * width * up; }
  int64_t LowPoints() const { return batch * height * width; }
  int64_t GP() const { return groups * points; }
  SapaDeformDims Dims() const {
    return SapaDeformDims{batch, height, width, up, points, groups, dim, channels};
  }

  // The bilinear taps of point k of output point `point`: cells (-1: outside the map),
  // weights and their derivatives along the width and the height. False: dropped.
  bool Taps(const std::vector<double>& off, int64_t point, int64_t k, int64_t cell[4],
            double wt[4], double dw[4], double dh[4]) const {
    const int64_t sw = width * up, sh = height * up;
    const int64_t j = point % sw, i = (point / sw) % sh, b = point / (sw * sh);
    const double ph = static_cast<double>(i / up) + off[(point * GP() + k) * 2 + 1];
    const double pw = static_cast<double>(j / up) + off[(point * GP() + k) * 2];
    if (!(ph > -1.0 && ph < height && pw > -1.0 && pw < width)) return false;
    int64_t h0 = static_cast<int64_t>(ph), w0 = static_cast<int64_t>(pw);  // floor
    if (h0 > ph) --h0;
    if (w0 > pw) --w0;
    const double lh = ph - h0, lw = pw - w0;
    const double hh = 1.0 - lh, hw = 1.0 - lw;
    const double weights[4] = {hh * hw, hh * lw, lh * hw, lh * lw};
    const double along_w[4] = {-hh, hh, -lh, lh}, along_h[4] = {-hw, -lw, hw, lw};
    for (int a = 0; a < 4; ++a) {
      const int64_t h = h0 + a / 2, w = w0 + a % 2;
      cell[a] = (h >= 0 && h < height && w >= 0 && w < width) ? (b * height + h) * width + w : -1;
      wt[a] = weights[a];
      dw[a] = along_w[a];
      dh[a] = along_h[a];
    }
    return true;
  }

  // sum_a c[a] * map[cell a, ch] for a map of `stride` channels.
  static double Mix(const std::vector<double>& map, int64_t stride, int64_t ch,
                    const int64_t cell[4], const double c[4]) {
    double sum = 0.0;
    for (int a = 0; a < 4; ++a) {
      if (cell[a] >= 0) sum += c[a] * map[cell[a] * stride + ch];
    }
    return sum;
  }
};

// Forward: the softmax weights (B, sH, sW, G*P) and the output (B, sH, sW, C).
void RefDeformForward(const DeformGeometry& g, const std::vector<double>& q,
                      const std::vector<double>& key, const std::vector<double>& value,
                      const std::vector<double>& off, std::vector<double>* attn,
                      std::vector<double>* out) {
  const int64_t gp = g.GP(), e_per = g.dim / g.groups, c_per = g.channels / g.groups;
  std::vector<double> logits(g.HighPoints() * gp, 0.0);
  int64_t cell[4];
  double wt[4], dw[4], dh[4];
  for (int64_t point = 0; point < g.HighPoints(); ++point) {
    for (int64_t k = 0; k < gp; ++k) {
      if (!g.Taps(off, point, k, cell, wt, dw, dh)) continue;
      for (int64_t e = (k / g.points) * e_per; e < (k / g.points + 1) * e_per; ++e) {
        logits[point * gp + k] += q[point * g.dim + e] * g.Mix(key, g.dim, e, cell, wt);
      }
    }
  }
  *attn = RefSoftmaxRuns(logits, g.points);
  out->assign(g.HighPoints() * g.channels, 0.0);
  for (int64_t point = 0; point < g.HighPoints(); ++point) {
    for (int64_t k = 0; k < gp; ++k) {
      if (!g.Taps(off, point, k, cell, wt, dw, dh)) continue;
      for (int64_t c = (k / g.points) * c_per; c < (k / g.points + 1) * c_per; ++c) {
        (*out)[point * g.channels + c] +=
            (*attn)[point * gp + k] * g.Mix(value, g.channels, c, cell, wt);
      }
    }
  }
}

// Backward from the output's gradient and the weights `attn`: grads = query, key, value,
// offsets.
void RefDeformBackward(const DeformGeometry& g, const std::vector<double>& grad,
                       const std::vector<double>& q, const std::vector<double>& key,
                       const std::vector<double>& value, const std::vector<double>& off,
                       const std::vector<double>& attn, std::vector<double> grads[4]) {
  const int64_t gp = g.GP(), e_per = g.dim / g.groups, c_per = g.channels / g.groups;
  grads[0].assign(q.size(), 0.0);
  grads[1].assign(key.size(), 0.0);
  grads[2].assign(value.size(), 0.0);
  grads[3].assign(off.size(), 0.0);
  int64_t cell[4];
  double wt[4], dw[4], dh[4];
  for (int64_t point = 0; point < g.HighPoints(); ++point) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const int64_t k0 = grp * g.points, e0 = grp * e_per, c0 = grp * c_per;
      // <grad, sample(value)> per point, and the softmax's inner product.
      std::vector<double> gv(g.points, 0.0);
      double inner = 0.0;
      for (int64_t p = 0; p < g.points; ++p) {
        if (!g.Taps(off, point, k0 + p, cell, wt, dw, dh)) continue;
        for (int64_t c = c0; c < c0 + c_per; ++c) {
          gv[p] += grad[point * g.channels + c] * g.Mix(value, g.channels, c, cell, wt);
        }
        inner += attn[point * gp + k0 + p] * gv[p];
      }
      for (int64_t p = 0; p < g.points; ++p) {
        const int64_t k = k0 + p;
        if (!g.Taps(off, point, k, cell, wt, dw, dh)) continue;
        const double w = attn[point * gp + k], dl = w * (gv[p] - inner);
        double ow = 0.0, oh = 0.0;
        for (int64_t c = c0; c < c0 + c_per; ++c) {
          const double x = grad[point * g.channels + c];
          ow += w * x * g.Mix(value, g.channels, c, cell, dw);
          oh += w * x * g.Mix(value, g.channels, c, cell, dh);
          for (int a = 0; a < 4; ++a) {
            if (cell[a] >= 0) grads[2][cell[a] * g.channels + c] += w * wt[a] * x;
          }
        }
        for (int64_t e = e0; e < e0 + e_per; ++e) {
          const double x = q[point * g.dim + e];
          grads[0][point * g.dim + e] += dl * g.Mix(key, g.dim, e, cell, wt);
          ow += dl * x * g.Mix(key, g.dim, e, cell, dw);
          oh += dl * x * g.Mix(key, g.dim, e, cell, dh);
          for (int a = 0; a < 4; ++a) {
            if (cell[a] >= 0) grads[1][cell[a] * g.dim + e] += dl * wt[a] * x;
          }
        }
        grads[3][(point * gp + k) * 2] = ow;
        grads[3][(point * gp + k) * 2 + 1] = oh;
      }
    }
  }
}

// Device buffers of one self-test launch, freed on scope exit.
class DeviceBuffers {
 public:
  ~DeviceBuffers() {
    for (CUdeviceptr p : pointers_) g_driver.cuMemFree(p);
  }
  int Alloc(size_t bytes, void** pointer) {
    CUdeviceptr p = 0;
    const CUresult rc = g_driver.cuMemAlloc(&p, std::max<size_t>(bytes, 16));
    if (rc != CUDA_SUCCESS) return Fail(SAPA_ERR_DRIVER, "cuMemAlloc failed: " + DriverError(rc));
    pointers_.push_back(p);
    *pointer = reinterpret_cast<void*>(static_cast<uintptr_t>(p));
    return SAPA_OK;
  }
  int Upload(const HostTensor& t, void** pointer) {
    const std::vector<unsigned char> bytes = t.Encode();
    const int status = Alloc(bytes.size(), pointer);
    if (status != SAPA_OK) return status;
    const CUresult rc = g_driver.cuMemcpyHtoD(
        static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(*pointer)), bytes.data(),
        bytes.size());
    if (rc != CUDA_SUCCESS) {
      return Fail(SAPA_ERR_DRIVER, "cuMemcpyHtoD failed: " + DriverError(rc));
    }
    return SAPA_OK;
  }
  // An output buffer of t's size, every element NaN (all bits set), so that an element a
  // kernel does not write fails the comparison.
  int Unwritten(const HostTensor& t, void** pointer) {
    HostTensor nan{t.storage, std::vector<double>(t.values.size(), __builtin_nan(""))};
    return Upload(nan, pointer);
  }
  int Download(void* pointer, HostTensor* t) {
    std::vector<unsigned char> bytes(t->values.size() * StorageSize(t->storage));
    const CUresult rc = g_driver.cuMemcpyDtoH(
        bytes.data(), static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(pointer)),
        bytes.size());
    if (rc != CUDA_SUCCESS) {
      return Fail(SAPA_ERR_DRIVER, "cuMemcpyDtoH failed: " + DriverError(rc));
    }
    t->Decode(bytes);
    return SAPA_OK;
  }

 private:
  std::vector<CUdeviceptr> pointers_;
};

// Relative tolerance of a result stored as `storage` (computed in float or double).
double Tolerance(int storage) {
  switch (storage) {
    case SAPA_F64: return 1e-10;
    case SAPA_F32: return 1e-4;
    case SAPA_F16: return 4e-3;
    default: return 3e-2;
  }
}

// "name (tile T, block B, shared S B)" of an entry's kernels.
std::string Describe(const PlanEntry& e) {
  std::string names = e.choice.name;
  for (const Choice& c : e.also) names += "+" + c.name;
  return names + " (tile " + std::to_string(e.choice.tile) + ", block " +
         std::to_string(e.choice.block) + ", shared " + std::to_string(e.choice.smem) + " B)";
}

// One output of a self-test case: its device buffer, its values once downloaded, and the
// reference.
struct Output {
  const char* what;
  void* device;
  HostTensor got;
  std::vector<double> want;
};

int Compare(const PlanEntry& e, int dtype, const std::string& case_text, const Output& o) {
  const double tol = Tolerance(o.got.storage);
  for (size_t i = 0; i < o.want.size(); ++i) {
    const double g = o.got.values[i], w = o.want[i];
    const double error = g > w ? g - w : w - g;
    if (!(error <= tol * (1.0 + (w < 0 ? -w : w)))) {  // also catches NaN (unwritten)
      char text[160];
      std::snprintf(text, sizeof text, "%s[%zu] is %.9g, the CPU reference %.9g (tolerance "
                    "%.1e relative)", o.what, i, g, w, tol);
      return Fail(SAPA_ERR_MISMATCH, "self-test: " + Describe(e) + " " + DtypeName(dtype) +
                                         ", case " + case_text + ": " + text);
    }
  }
  return SAPA_OK;
}

// run() with this thread's untiled switch set to `untiled`, then restored.
template <typename Fn>
int Untiled(bool untiled, Fn run) {
  const bool was_untiled = t_untiled;
  t_untiled = untiled;
  const int status = run();
  t_untiled = was_untiled;
  return status;
}

// Runs an entry point (`run`), checks that it launched exactly the kernels the plan
// lists for it, waits for the GPU and compares every output with its reference.
template <typename Fn>
int RunAndCompare(CUstream stream, int dtype, const PlanEntry& e, const std::string& case_text,
                  DeviceBuffers* buffers, std::vector<Output>* outputs, Fn run) {
  std::vector<std::tuple<std::string, int, int>> record;
  t_record = &record;
  int status = run();
  t_record = nullptr;
  if (status != SAPA_OK) return status;
  std::set<std::tuple<std::string, int, int>> planned = {
      std::make_tuple(e.choice.name, e.choice.block, e.choice.smem)};
  for (const Choice& c : e.also) planned.insert(std::make_tuple(c.name, c.block, c.smem));
  if (std::set<std::tuple<std::string, int, int>>(record.begin(), record.end()) != planned) {
    std::string ran;
    for (const auto& r : record) ran += (ran.empty() ? "" : ", ") + std::get<0>(r);
    return Fail(SAPA_ERR_MISMATCH, "self-test: expected a launch of " + Describe(e) +
                                       ", the launcher ran " + ran);
  }
  const CUresult rc = g_driver.cuStreamSynchronize(stream);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_LAUNCH, "self-test: " + Describe(e) + " failed on the GPU: " +
                                     DriverError(rc));
  }
  for (Output& o : *outputs) {
    status = buffers->Download(o.device, &o.got);
    if (status == SAPA_OK) status = Compare(e, dtype, case_text, o);
    if (status != SAPA_OK) return status;
  }
  return SAPA_OK;
}

// Softmax weights as a forward saves them: in the accumulation type `acc`, rounded.
HostTensor RandomAttn(const Geometry& g, int acc, uint64_t* seed) {
  HostTensor attn{acc, RefSoftmax(g, Random(acc, g.HighPoints() * g.Taps(), seed, 2.0).values)};
  attn.Decode(attn.Encode());
  return attn;
}

// "B=.. HxW s=.. K=.. C=.. Cv=.." of a SAPA self-test case.
std::string CaseText(const SapaDims& d) {
  char text[128];
  std::snprintf(text, sizeof text, "B=%lld %lldx%lld s=%lld K=%lld C=%lld Cv=%lld",
                static_cast<long long>(d.batch), static_cast<long long>(d.height),
                static_cast<long long>(d.width), static_cast<long long>(d.up),
                static_cast<long long>(d.kernel), static_cast<long long>(d.channels),
                static_cast<long long>(d.channels_v));
  return text;
}

// Runs one plan entry on a small case and compares it with the CPU reference.
int SelfTestEntry(CUstream stream, int dtype, const PlanEntry& e, uint64_t* seed) {
  const int tile = e.choice.tile > 0 ? e.choice.tile : 3;
  // Two tiles per side, the second partial; batch 2; channels over one 16/32-wide chunk.
  const SapaDims d = {2, tile + 1, tile + 2, e.up, e.kernel, 19, 37};
  const Geometry g = {d.batch, d.height, d.width, d.up, d.kernel};
  const int acc = dtype == SAPA_F64 ? SAPA_F64 : SAPA_F32;
  const size_t high = g.HighPoints(), low = g.LowPoints(), taps = g.Taps();
  const int64_t ch = d.channels, ch_v = d.channels_v;
  DeviceBuffers buffers;
  std::vector<void*> in;
  auto upload = [&](const HostTensor& t) {
    void* p = nullptr;
    const int status = buffers.Upload(t, &p);
    in.push_back(p);
    return status;
  };
  HostTensor out{dtype, {}}, out2{acc, {}};
  std::vector<double> want, want2;
  int status = SAPA_OK;
  switch (e.op) {
    case kOpDot: {
      HostTensor hi = Random(dtype, high * ch, seed, 0.5), lo = Random(dtype, low * ch, seed, 0.5);
      status = upload(hi) | upload(lo);
      out.values.assign(high * taps, 0.0);
      want = RefDot(g, hi.values, lo.values, ch);
      break;
    }
    case kOpGather:
    case kOpGatherAcc:
    case kOpScatter:
    case kOpScatterAcc: {  // weights and a low- (gather) or high-resolution (scatter) map
      const bool scatter = e.op == kOpScatter || e.op == kOpScatterAcc;
      const bool weights_acc = e.op == kOpGatherAcc || e.op == kOpScatterAcc;
      HostTensor w = Random(weights_acc ? acc : dtype, high * taps, seed, 0.5);
      HostTensor src = Random(dtype, (scatter ? high : low) * ch, seed, 0.5);
      status = upload(w) | upload(src);
      out.values.assign((scatter ? low : high) * ch, 0.0);
      want = RefWindow(g, w.values, src.values, ch, scatter);
      break;
    }
    case kOpForward: {
      HostTensor q = Random(dtype, high * ch, seed, 0.5), k = Random(dtype, low * ch, seed, 0.5);
      HostTensor v = Random(dtype, low * ch_v, seed, 1.0);
      status = upload(q) | upload(k) | upload(v);
      out.values.assign(high * ch_v, 0.0);
      out2.values.assign(high * taps, 0.0);
      want2 = RefSoftmax(g, RefDot(g, q.values, k.values, ch));
      want = RefWindow(g, want2, v.values, ch_v, false);
      break;
    }
    default: {  // softmax backward
      HostTensor grad = Random(dtype, high * ch, seed, 0.5), v = Random(dtype, low * ch, seed, 0.5);
      const HostTensor attn = RandomAttn(g, acc, seed);
      status = upload(grad) | upload(v) | upload(attn);
      out = HostTensor{acc, std::vector<double>(high * taps, 0.0)};
      want = RefSoftmaxBackward(g, attn.values, RefDot(g, grad.values, v.values, ch));
      break;
    }
  }
  if (status != SAPA_OK) return SAPA_ERR_DRIVER;
  std::vector<Output> outputs = {{"out", nullptr, out, want}};
  if (!out2.values.empty()) outputs.push_back(Output{"attn", nullptr, out2, want2});
  std::vector<void*> ptrs = in;
  for (Output& o : outputs) {
    status = buffers.Unwritten(o.got, &o.device);
    if (status != SAPA_OK) return status;
    ptrs.push_back(o.device);
  }
  return RunAndCompare(stream, dtype, e, CaseText(d), &buffers, &outputs, [&] {
    return Untiled(e.untiled, [&] { return Run(stream, e.op, dtype, &d, ptrs); });
  });
}

// SAPA's fused backward (sapa_backward) on a small case (query/key and value of different
// widths) against the CPU reference: the gradients of query, key and value.
int SelfTestBackward(CUstream stream, int dtype, const PlanEntry& e, uint64_t* seed) {
  const int tile = e.choice.tile > 0 ? e.choice.tile : 3;
  const SapaDims d = {2, tile + 1, tile + 2, e.up, e.kernel, 19, 37};
  const Geometry g = {d.batch, d.height, d.width, d.up, d.kernel};
  const int acc = dtype == SAPA_F64 ? SAPA_F64 : SAPA_F32;
  const size_t high = g.HighPoints(), low = g.LowPoints();
  HostTensor grad = Random(dtype, high * d.channels_v, seed, 0.5);
  HostTensor q = Random(dtype, high * d.channels, seed, 0.5);
  HostTensor k = Random(dtype, low * d.channels, seed, 0.5);
  HostTensor v = Random(dtype, low * d.channels_v, seed, 0.5);
  const HostTensor attn = RandomAttn(g, acc, seed);
  const std::vector<double> dlogits =
      RefSoftmaxBackward(g, attn.values, RefDot(g, grad.values, v.values, d.channels_v));
  std::vector<Output> outputs = {
      {"grad_query", nullptr, HostTensor{dtype, std::vector<double>(high * d.channels)},
       RefWindow(g, dlogits, k.values, d.channels, false)},
      {"grad_key", nullptr, HostTensor{dtype, std::vector<double>(low * d.channels)},
       RefWindow(g, dlogits, q.values, d.channels, true)},
      {"grad_value", nullptr, HostTensor{dtype, std::vector<double>(low * d.channels_v)},
       RefWindow(g, attn.values, grad.values, d.channels_v, true)}};
  DeviceBuffers buffers;
  void *in[5] = {}, *scratch = nullptr;
  const HostTensor* inputs[5] = {&grad, &q, &k, &v, &attn};
  int status = buffers.Alloc(static_cast<size_t>(BackwardScratchBytes(dtype, &d)), &scratch);
  for (int i = 0; i < 5 && status == SAPA_OK; ++i) status = buffers.Upload(*inputs[i], &in[i]);
  for (Output& o : outputs) {
    if (status == SAPA_OK) status = buffers.Unwritten(o.got, &o.device);
  }
  if (status != SAPA_OK) return status;
  return RunAndCompare(stream, dtype, e, CaseText(d), &buffers, &outputs, [&] {
    return Untiled(e.untiled, [&] {
      return Backward(stream, dtype, &d, in[0], in[1], in[2], in[3], in[4], scratch,
                      outputs[0].device, outputs[1].device, outputs[2].device);
    });
  });
}

// SAPA-D offsets: within +-2.5 low-resolution pixels (points near the border drop out),
// at least 0.1 from an integer position once rounded to the storage (so that the float
// and the float64 positions lie in the same cell).
HostTensor Offsets(int storage, size_t count, uint64_t* seed) {
  HostTensor t = Random(SAPA_F64, count, seed, 2.5);
  for (double& v : t.values) {
    const double nearest = static_cast<double>(static_cast<int64_t>(v + (v < 0 ? -0.5 : 0.5)));
    if (v - nearest < 0.1 && nearest - v < 0.1) v = nearest + 0.25;
  }
  t.storage = storage;
  t.Decode(t.Encode());
  return t;
}

// Runs a SAPA-D plan entry (the forward, or the backward from the reference's weights)
// on a case of two or more tiles (the last one partial where the sizes allow: G*P =
// 256 / tile points per output point, 3 x W maps, batch 2) against the CPU reference.
int SelfTestDeform(CUstream stream, int dtype, const PlanEntry& e, uint64_t* seed) {
  const int64_t gp = e.kernel, groups = DeformGroups(gp), up = e.up, rows = 3;
  const int64_t per_row = 2 * up * up * rows;  // output points per map column, both images
  const int64_t width = std::max<int64_t>(2, (5 * e.choice.tile / 2 + per_row - 1) / per_row);
  const DeformGeometry g = {2, rows, width, up, gp / groups, groups, groups * 3, groups * 5};
  const SapaDeformDims d = g.Dims();
  const int acc = dtype == SAPA_F64 ? SAPA_F64 : SAPA_F32;
  const size_t high = g.HighPoints(), low = g.LowPoints();
  HostTensor q = Random(dtype, high * g.dim, seed, 0.5);
  HostTensor key = Random(dtype, low * g.dim, seed, 0.5);
  HostTensor value = Random(dtype, low * g.channels, seed, 1.0);
  HostTensor off = Offsets(dtype, high * gp * 2, seed);
  std::vector<double> attn, out;
  RefDeformForward(g, q.values, key.values, value.values, off.values, &attn, &out);
  DeviceBuffers buffers;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *doff = nullptr;
  int status = buffers.Upload(q, &dq) | buffers.Upload(key, &dk) | buffers.Upload(value, &dv) |
               buffers.Upload(off, &doff);
  if (status != SAPA_OK) return SAPA_ERR_DRIVER;
  char case_text[128];
  std::snprintf(case_text, sizeof case_text,
                "B=%lld %lldx%lld s=%lld G=%lld P=%lld D=%lld C=%lld",
                static_cast<long long>(g.batch), static_cast<long long>(g.height),
                static_cast<long long>(g.width), static_cast<long long>(g.up),
                static_cast<long long>(g.groups), static_cast<long long>(g.points),
                static_cast<long long>(g.dim), static_cast<long long>(g.channels));
  std::vector<Output> outputs;
  void *dgrad = nullptr, *dweights = nullptr, *workspace = nullptr;
  if (e.op == kOpDeformForward) {
    outputs = {{"out", nullptr, HostTensor{dtype, out}, out},
               {"attn", nullptr, HostTensor{acc, attn}, attn}};
  } else {
    // The weights as the forward saves them (rounded to the accumulation type).
    HostTensor weights{acc, attn};
    weights.Decode(weights.Encode());
    HostTensor grad = Random(dtype, high * g.channels, seed, 1.0);
    std::vector<double> want[4];
    RefDeformBackward(g, grad.values, q.values, key.values, value.values, off.values,
                      weights.values, want);
    const char* names[4] = {"grad_query", "grad_key", "grad_value", "grad_offsets"};
    for (int i = 0; i < 4; ++i) {
      outputs.push_back(Output{names[i], nullptr, HostTensor{dtype, want[i]}, want[i]});
    }
    status = buffers.Upload(grad, &dgrad) | buffers.Upload(weights, &dweights) |
             buffers.Alloc(static_cast<size_t>(DeformWorkspaceBytes(dtype, &d)), &workspace);
    if (status != SAPA_OK) return SAPA_ERR_DRIVER;
  }
  for (Output& o : outputs) {
    status = buffers.Unwritten(o.got, &o.device);
    if (status != SAPA_OK) return status;
  }
  std::vector<void*> o;
  for (const Output& output : outputs) o.push_back(output.device);
  return RunAndCompare(stream, dtype, e, case_text, &buffers, &outputs, [&] {
    if (e.op == kOpDeformForward) {
      return DeformForward(stream, dtype, &d, dq, dk, dv, doff, o[0], o[1]);
    }
    return DeformBackward(stream, dtype, &d, dgrad, dq, dk, dv, doff, dweights, workspace, o[0],
                          o[1], o[2], o[3]);
  });
}

}  // namespace

extern "C" {

const char* sapa_last_error(void) { return t_error.c_str(); }

int sapa_init(const char* driver_path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return InitLocked(driver_path);
}

int sapa_add_image(const char* target, const void* data, size_t size) {
  bool ptx;
  int major, minor;
  if (target == nullptr || !ParseTarget(target, &ptx, &major, &minor)) {
    return Fail(SAPA_ERR_INVALID, std::string("target must be sm_XY or compute_XY. Received: ") +
                                      (target ? target : "NULL"));
  }
  if (data == nullptr || size == 0) return Fail(SAPA_ERR_INVALID, "empty image");
  Image image;
  image.target = target;
  image.data.assign(static_cast<const char*>(data), static_cast<const char*>(data) + size);
  if (ptx && image.data.back() != '\0') image.data.push_back('\0');
  std::lock_guard<std::mutex> lock(g_mutex);
  for (Image& existing : g_images) {  // registering a target again replaces its image
    if (existing.target == image.target) {
      existing = std::move(image);
      return SAPA_OK;
    }
  }
  g_images.push_back(std::move(image));
  return SAPA_OK;
}

int sapa_load_image_dir(const char* dir, int* count) {
  if (count) *count = 0;
  DIR* handle = dir ? opendir(dir) : nullptr;
  if (!handle) {
    return Fail(SAPA_ERR_IO, std::string("cannot open the image directory ") +
                                 (dir ? dir : "NULL"));
  }
  const std::string prefix = "sapa_kernels.";
  std::vector<std::string> names;
  while (dirent* entry = readdir(handle)) names.push_back(entry->d_name);
  closedir(handle);
  std::sort(names.begin(), names.end());
  int loaded = 0;
  for (const std::string& name : names) {
    if (name.rfind(prefix, 0) != 0) continue;
    const size_t dot = name.rfind('.');
    const std::string ext = name.substr(dot + 1);
    if (ext != "cubin" && ext != "ptx") continue;
    const std::string target = name.substr(prefix.size(), dot - prefix.size());
    FILE* file = std::fopen((std::string(dir) + "/" + name).c_str(), "rb");
    if (!file) return Fail(SAPA_ERR_IO, "cannot read " + name);
    std::vector<char> data;
    char buffer[65536];
    size_t got;
    while ((got = std::fread(buffer, 1, sizeof buffer, file)) > 0) {
      data.insert(data.end(), buffer, buffer + got);
    }
    const bool failed = std::ferror(file) != 0;
    std::fclose(file);
    if (failed) return Fail(SAPA_ERR_IO, "cannot read " + name);
    const int status = sapa_add_image(target.c_str(), data.data(), data.size());
    if (status != SAPA_OK) return status;
    ++loaded;
  }
  if (count) *count = loaded;
  return SAPA_OK;
}

void sapa_clear_images(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_images.clear();
}

int sapa_select_image(int major, int minor, char* target, size_t target_size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<const Image*> candidates = Candidates(major, minor);
  if (candidates.empty()) return NoImage(major, minor);
  if (target && target_size) {
    std::snprintf(target, target_size, "%s", candidates[0]->target.c_str());
  }
  return SAPA_OK;
}

int sapa_device_info(void* stream, int* major, int* minor, char* target, size_t target_size) {
  ContextScope scope;
  int status = scope.Enter(static_cast<CUstream>(stream));
  if (status != SAPA_OK) return status;
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState* dev = nullptr;
  status = DeviceForLocked(scope, &dev);
  if (status != SAPA_OK) return status;
  if (major) *major = dev->major;
  if (minor) *minor = dev->minor;
  if (target && target_size) std::snprintf(target, target_size, "%s", dev->target.c_str());
  return SAPA_OK;
}

void sapa_set_untiled(int untiled) { g_untiled = untiled != 0; }

int sapa_last_launch(char* name, size_t name_size, int64_t* grid, int* block, int* smem) {
  if (name && name_size) std::snprintf(name, name_size, "%s", t_last_name.c_str());
  if (grid) *grid = t_last_grid;
  if (block) *block = t_last_block;
  if (smem) *smem = t_last_smem;
  return SAPA_OK;
}

int sapa_set_device(int ordinal) {
  if (ordinal < 0) {
    return Fail(SAPA_ERR_INVALID, "ordinal must be >= 0. Received: ordinal=" +
                                      std::to_string(ordinal));
  }
  t_device = ordinal;
  return SAPA_OK;
}

int sapa_module_loads(int* loads, int* entries) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (loads) *loads = g_module_loads;
  if (entries) *entries = static_cast<int>(g_devices.size());
  return SAPA_OK;
}

int sapa_launch_configs(void* stream, int dtype, SapaLaunchConfig* out, int capacity,
                        int* count) {
  if (count) *count = 0;
  std::vector<PlanEntry> plan;
  const int status = Enumerate(static_cast<CUstream>(stream), dtype, false, &plan);
  if (status != SAPA_OK) return status;
  // Every kernel of every entry, each (kernel, tile, up, K) once, untiled kernels once.
  std::set<std::tuple<std::string, int, int64_t, int64_t>> seen;
  int n = 0;
  for (const PlanEntry& e : plan) {
    std::vector<Choice> kernels = {e.choice};
    kernels.insert(kernels.end(), e.also.begin(), e.also.end());
    for (const Choice& k : kernels) {
      const bool any = k.tile == 0;
      if (!seen.insert(std::make_tuple(k.name, k.tile, any ? 0 : e.up, any ? 0 : e.kernel))
               .second) {
        continue;
      }
      if (out && n < capacity) {
        SapaLaunchConfig& c = out[n];
        std::memset(&c, 0, sizeof c);
        std::snprintf(c.kernel, sizeof c.kernel, "%s", k.name.c_str());
        c.tile = k.tile;
        c.block = k.block;
        c.smem = k.smem;
        c.up = static_cast<int>(e.up);
        c.ksize = static_cast<int>(e.kernel);
      }
      ++n;
    }
  }
  if (count) *count = n;
  return SAPA_OK;
}

int sapa_self_test(void* stream, int flags, int* cases) {
  if (cases) *cases = 0;
  const int known = 15 | SAPA_SELF_TEST_PER_TILE;
  if (flags < 0 || (flags & ~known) != 0) {
    return Fail(SAPA_ERR_INVALID, "flags must combine 1 << SAPA_F32 ... 1 << SAPA_F64 and "
                                  "SAPA_SELF_TEST_PER_TILE. Received: flags=" +
                                      std::to_string(flags));
  }
  const bool per_tile = (flags & SAPA_SELF_TEST_PER_TILE) != 0;
  int dtype_mask = flags & 15;
  if (dtype_mask == 0) dtype_mask = 15;
  CUstream s = static_cast<CUstream>(stream);
  ContextScope scope;  // the allocations and copies need the context current too
  int status = scope.Enter(s);
  if (status != SAPA_OK) return status;
  if (!g_driver.cuMemAlloc || !g_driver.cuMemFree || !g_driver.cuMemcpyHtoD ||
      !g_driver.cuMemcpyDtoH || !g_driver.cuStreamSynchronize) {
    return Fail(SAPA_ERR_NO_DRIVER, "the driver lacks the memory functions the self-test uses");
  }
  uint64_t seed = 20240601;
  for (int dtype = 0; dtype < 4; ++dtype) {
    if (!(dtype_mask & (1 << dtype))) continue;
    std::vector<PlanEntry> plan;
    status = Enumerate(s, dtype, per_tile, &plan);
    if (status != SAPA_OK) return status;
    for (const PlanEntry& entry : plan) {
      const bool deform = entry.op == kOpDeformForward || entry.op == kOpDeformBackward;
      status = deform                       ? SelfTestDeform(s, dtype, entry, &seed)
               : entry.op == kOpBackward ? SelfTestBackward(s, dtype, entry, &seed)
                                         : SelfTestEntry(s, dtype, entry, &seed);
      if (status != SAPA_OK) return status;
      if (cases) ++*cases;
    }
  }
  return SAPA_OK;
}

int sapa_dot(void* stream, int dtype, const SapaDims* d, const void* hi, const void* lo,
             void* out) {
  return Run(static_cast<CUstream>(stream), kOpDot, dtype, d,
             {const_cast<void*>(hi), const_cast<void*>(lo), out});
}

int sapa_gather(void* stream, int dtype, const SapaDims* d, const void* w, const void* lo,
                void* out) {
  return Run(static_cast<CUstream>(stream), kOpGather, dtype, d,
             {const_cast<void*>(w), const_cast<void*>(lo), out});
}

int sapa_scatter(void* stream, int dtype, const SapaDims* d, const void* w, const void* hi,
                 void* out) {
  return Run(static_cast<CUstream>(stream), kOpScatter, dtype, d,
             {const_cast<void*>(w), const_cast<void*>(hi), out});
}

int sapa_gather_acc(void* stream, int dtype, const SapaDims* d, const void* w,
                    const void* lo, void* out) {
  return Run(static_cast<CUstream>(stream), kOpGatherAcc, dtype, d,
             {const_cast<void*>(w), const_cast<void*>(lo), out});
}

int sapa_scatter_acc(void* stream, int dtype, const SapaDims* d, const void* w,
                     const void* hi, void* out) {
  return Run(static_cast<CUstream>(stream), kOpScatterAcc, dtype, d,
             {const_cast<void*>(w), const_cast<void*>(hi), out});
}

int sapa_forward(void* stream, int dtype, const SapaDims* d, const void* q, const void* k,
                 const void* v, void* out, void* attn) {
  if (attn == nullptr && Check(dtype, d) == SAPA_OK) {
    return Fail(SAPA_ERR_INVALID, "sapa_forward needs an attn buffer");
  }
  return Run(static_cast<CUstream>(stream), kOpForward, dtype, d,
             {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out, attn});
}

int sapa_softmax_backward(void* stream, int dtype, const SapaDims* d, const void* grad,
                          const void* v, const void* attn, void* out) {
  return Run(static_cast<CUstream>(stream), kOpSoftmaxBackward, dtype, d,
             {const_cast<void*>(grad), const_cast<void*>(v), const_cast<void*>(attn), out});
}

int sapa_backward_workspace(int dtype, const SapaDims* dims, size_t* bytes) {
  return Workspace(Check(dtype, dims), [&] { return BackwardScratchBytes(dtype, dims); }, bytes);
}

int sapa_backward(void* stream, int dtype, const SapaDims* dims, const void* grad,
                  const void* query, const void* key, const void* value, const void* attn,
                  void* dlogits, void* grad_query, void* grad_key, void* grad_value) {
  return Backward(static_cast<CUstream>(stream), dtype, dims, grad, query, key, value, attn,
                  dlogits, grad_query, grad_key, grad_value);
}

int sapa_deform_forward(void* stream, int dtype, const SapaDeformDims* dims, const void* query,
                        const void* key, const void* value, const void* offsets, void* output,
                        void* attn) {
  return DeformForward(static_cast<CUstream>(stream), dtype, dims, query, key, value, offsets,
                       output, attn);
}

int sapa_deform_workspace(int dtype, const SapaDeformDims* dims, size_t* bytes) {
  return Workspace(CheckDeform(dtype, dims), [&] { return DeformWorkspaceBytes(dtype, dims); },
                   bytes);
}

int sapa_deform_backward(void* stream, int dtype, const SapaDeformDims* dims, const void* grad,
                         const void* query, const void* key, const void* value,
                         const void* offsets, const void* attn, void* workspace,
                         void* grad_query, void* grad_key, void* grad_value,
                         void* grad_offsets) {
  return DeformBackward(static_cast<CUstream>(stream), dtype, dims, grad, query, key, value,
                        offsets, attn, workspace, grad_query, grad_key, grad_value,
                        grad_offsets);
}

// SAPA-D's halves (DeformHalf).
int sapa_deform_similarity(void* stream, int dtype, const SapaDeformDims* dims,
                           const void* query, const void* key, const void* offsets,
                           void* logits) {
  return DeformHalf(static_cast<CUstream>(stream), dtype, dims, "similarity",
                    {const_cast<void*>(query), const_cast<void*>(key),
                     const_cast<void*>(offsets), logits});
}

int sapa_deform_similarity_backward(void* stream, int dtype, const SapaDeformDims* dims,
                                    const void* grad_logits, const void* query, const void* key,
                                    const void* offsets, void* grad_query, void* grad_key,
                                    void* grad_offsets) {
  return DeformHalf(static_cast<CUstream>(stream), dtype, dims, "similarity_backward",
                    {const_cast<void*>(grad_logits), const_cast<void*>(query),
                     const_cast<void*>(key), const_cast<void*>(offsets), grad_query,
                     grad_offsets},
                    grad_logits, query, grad_key, dims ? dims->dim : 0);
}

int sapa_deform_aggregate(void* stream, int dtype, const SapaDeformDims* dims,
                          const void* weights, const void* value, const void* offsets,
                          void* output) {
  return DeformHalf(static_cast<CUstream>(stream), dtype, dims, "aggregate",
                    {const_cast<void*>(weights), const_cast<void*>(value),
                     const_cast<void*>(offsets), output});
}

int sapa_deform_aggregate_backward(void* stream, int dtype, const SapaDeformDims* dims,
                                   const void* grad, const void* weights, const void* value,
                                   const void* offsets, void* grad_weights, void* grad_value,
                                   void* grad_offsets) {
  return DeformHalf(static_cast<CUstream>(stream), dtype, dims, "aggregate_backward",
                    {const_cast<void*>(grad), const_cast<void*>(weights),
                     const_cast<void*>(value), const_cast<void*>(offsets), grad_weights,
                     grad_offsets},
                    weights, grad, grad_value, dims ? dims->channels : 0);
}

}  // extern "C"
