// SAPA kernel launcher: driver API only, opened with dlopen (see sapa_launcher.h).
//
// Launch sizes come from device attributes and the occupancy API, never from a
// runtime struct whose layout depends on a CUDA version. Modules are loaded once per
// CUDA context (the stream's, from cuStreamGetCtx).

#include "sapa_launcher.h"

#include <dirent.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

// The few driver API types and constants used (values from cuda.h, checked against it by
// tests/test_cuda_build.py when the header is at hand).
typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUstream;
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
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  CUresult (*cuOccupancyMaxActiveBlocksPerMultiprocessor)(int*, CUfunction, int, size_t);
  CUresult (*cuFuncGetAttribute)(int*, int, CUfunction);
};

// Same layout as sapa::Args in kernels/cuda/sapa_kernels.cuh.
struct KernelArgs {
  int64_t batch, height, width, up, kernel, ch, ch_v, tile, tiles_h, tiles_w;
};

struct Image {
  std::string target;  // sm_XY or compute_XY
  std::vector<char> data;
};

struct DeviceState {
  CUmodule module = nullptr;
  std::string target;
  int major = 0, minor = 0, sms = 1, max_threads = 1024, max_smem = 48 * 1024;
  int64_t max_grid = 2147483647;
  std::map<std::string, CUfunction> functions;
  // (kernel, up, K) -> (tile, block, smem)
  std::map<std::tuple<std::string, int64_t, int64_t>, std::tuple<int, int, int>> tiles;
};

std::mutex g_mutex;
Driver g_driver;
std::vector<Image> g_images;
std::map<CUcontext, DeviceState> g_devices;
bool g_untiled = false;
thread_local std::string t_error;
thread_local std::string t_last_name;
thread_local int64_t t_last_grid = 0;
thread_local int t_last_block = 0, t_last_smem = 0;

int Fail(int status, const std::string& message) {
  t_error = message;
  return status;
}

std::string DriverError(CUresult rc) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (g_driver.cuGetErrorName) g_driver.cuGetErrorName(rc, &name);
  if (g_driver.cuGetErrorString) g_driver.cuGetErrorString(rc, &text);
  std::ostringstream out;
  out << (name ? name : "CUDA error") << " (" << rc << ")";
  if (text) out << ": " << text;
  return out.str();
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
        Sym(handle, "cuInit", &d.cuInit) && Sym(handle, "cuDriverGetVersion", &d.cuDriverGetVersion) &&
        Sym(handle, "cuGetErrorName", &d.cuGetErrorName) &&
        Sym(handle, "cuGetErrorString", &d.cuGetErrorString) &&
        Sym(handle, "cuStreamGetCtx", &d.cuStreamGetCtx) &&
        Sym(handle, "cuCtxPushCurrent_v2", &d.cuCtxPushCurrent) &&
        Sym(handle, "cuCtxPopCurrent_v2", &d.cuCtxPopCurrent) &&
        Sym(handle, "cuCtxGetDevice", &d.cuCtxGetDevice) &&
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
    g_driver = d;
  }
  const CUresult rc = g_driver.cuInit(0);
  if (rc != CUDA_SUCCESS) {
    return Fail(SAPA_ERR_DRIVER, "cuInit failed: " + DriverError(rc));
  }
  g_driver.initialised = true;
  return SAPA_OK;
}

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
  if (digits.size() < 2 || digits.find_first_not_of("0123456789") != std::string::npos) {
    return false;  // also rejects arch-specific targets such as sm_90a
  }
  *major = std::stoi(digits.substr(0, digits.size() - 1));
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
    if (is_ptx && (ma < major || (ma == major && mi <= minor))) ptx.push_back({ma * 10 + mi, &image});
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

int NoImage(int major, int minor) {
  std::ostringstream out;
  out << "no kernel image for this GPU (sm_" << major << minor << "); the build has: "
      << ImageList() << ". Rebuild with KERAS_SAPA_CUDA_TARGETS including sm_" << major
      << minor << " (python custom_ops/build.py)";
  return Fail(SAPA_ERR_NO_IMAGE, out.str());
}

// The per-context state of the stream's context, loading the module on first use.
int DeviceFor(CUstream stream, DeviceState** state) {
  int status = InitLocked(nullptr);
  if (status != SAPA_OK) return status;
  CUcontext ctx = nullptr;
  CUresult rc = g_driver.cuStreamGetCtx(stream, &ctx);
  if (rc != CUDA_SUCCESS || ctx == nullptr) {
    return Fail(SAPA_ERR_DRIVER, "cuStreamGetCtx failed: " + DriverError(rc));
  }
  auto found = g_devices.find(ctx);
  if (found != g_devices.end()) {
    *state = &found->second;
    return SAPA_OK;
  }
  rc = g_driver.cuCtxPushCurrent(ctx);
  if (rc != CUDA_SUCCESS) return Fail(SAPA_ERR_DRIVER, "cuCtxPushCurrent failed: " + DriverError(rc));
  DeviceState dev;
  CUdevice device = 0;
  status = SAPA_OK;
  rc = g_driver.cuCtxGetDevice(&device);
  int smem = 0, grid = 0;
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&dev.major, ATTR_COMPUTE_CAPABILITY_MAJOR, device);
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&dev.minor, ATTR_COMPUTE_CAPABILITY_MINOR, device);
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&dev.sms, ATTR_MULTIPROCESSOR_COUNT, device);
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&dev.max_threads, ATTR_MAX_THREADS_PER_BLOCK, device);
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&smem, ATTR_MAX_SHARED_MEMORY_PER_BLOCK, device);
  if (rc == CUDA_SUCCESS) rc = g_driver.cuDeviceGetAttribute(&grid, ATTR_MAX_GRID_DIM_X, device);
  if (rc != CUDA_SUCCESS) {
    status = Fail(SAPA_ERR_DRIVER, "reading the device attributes failed: " + DriverError(rc));
  } else {
    dev.max_smem = std::min(smem, 48 * 1024);  // no opt-in: the static default limit
    dev.max_grid = grid;
    std::vector<const Image*> candidates = Candidates(dev.major, dev.minor);
    if (candidates.empty()) status = NoImage(dev.major, dev.minor);
    std::string errors;
    for (const Image* image : candidates) {
      rc = g_driver.cuModuleLoadData(&dev.module, image->data.data());
      if (rc == CUDA_SUCCESS) {
        dev.target = image->target;
        break;
      }
      dev.module = nullptr;
      errors += "; " + image->target + ": " + DriverError(rc);
      if (rc == CUDA_ERROR_UNSUPPORTED_PTX_VERSION) {
        errors += " (the driver is older than the NVRTC that built the PTX)";
      }
    }
    if (!candidates.empty() && dev.module == nullptr) {
      std::ostringstream out;
      out << "no kernel image loads on this GPU (sm_" << dev.major << dev.minor << ")" << errors;
      status = Fail(rc == CUDA_ERROR_NO_BINARY_FOR_GPU ? SAPA_ERR_NO_IMAGE : SAPA_ERR_DRIVER,
                    out.str());
    }
  }
  CUcontext popped = nullptr;
  g_driver.cuCtxPopCurrent(&popped);
  if (status != SAPA_OK) return status;
  *state = &(g_devices[ctx] = dev);
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
// larger tiles winning ties (less halo). Returns false when no tile fits.
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
  if (g_driver.cuFuncGetAttribute(&max_threads, FUNC_ATTR_MAX_THREADS_PER_BLOCK, fn) != CUDA_SUCCESS ||
      max_threads <= 0) {
    max_threads = dev->max_threads;
  }
  max_threads = std::min(max_threads, dev->max_threads);
  for (int64_t t = 1; t <= 32; ++t) {
    const int b = BlockFor(kind, t, up);
    const int64_t bytes = SharedBytes(kind, dtype, t, up, kernel);
    if (b > max_threads || bytes > dev->max_smem) break;  // both grow with t
    int blocks = 0;
    if (g_driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, b, bytes) != CUDA_SUCCESS ||
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

int Check(int dtype, const SapaDims* d) {
  if (DtypeName(dtype) == nullptr) {
    return Fail(SAPA_ERR_INVALID, "dtype must be SAPA_F32/F16/BF16/F64. Received: dtype=" +
                                      std::to_string(dtype));
  }
  if (d == nullptr || d->batch < 0 || d->height < 0 || d->width < 0 || d->channels < 0 ||
      d->channels_v < 0 || d->up < 1 || d->kernel < 1 || d->kernel % 2 == 0) {
    return Fail(SAPA_ERR_INVALID, "invalid sizes: up must be >= 1, kernel odd and >= 1, "
                                  "the others >= 0");
  }
  return SAPA_OK;
}

int Launch(CUstream stream, const std::string& name, CUfunction fn,
           int64_t grid, int block, int smem, void** params) {
  t_last_name = name;
  t_last_grid = grid;
  t_last_block = block;
  t_last_smem = smem;
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

// Tries the tiled kernel `tiled` (empty: none); else runs the untiled `any` kernel over
// `any_work` threads. ptrs are the pointer arguments after the Args struct.
int Run(CUstream stream, Kind kind, int dtype, const SapaDims* d, const std::string& tiled,
        const std::string& any, int64_t any_work, std::vector<void*> ptrs) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState* dev = nullptr;
  int status = DeviceFor(stream, &dev);
  if (status != SAPA_OK) return status;
  KernelArgs args = {d->batch, d->height, d->width, d->up, d->kernel, d->channels,
                     d->channels_v, 0, 0, 0};
  std::vector<void*> params;
  params.push_back(&args);
  for (void*& p : ptrs) params.push_back(&p);
  if (!tiled.empty() && !g_untiled) {
    CUfunction fn;
    status = Function(dev, tiled, &fn);
    if (status != SAPA_OK) return status;
    int tile, block, smem;
    if (ChooseTile(dev, fn, tiled, kind, dtype, d->up, d->kernel, &tile, &block, &smem)) {
      args.tile = tile;
      args.tiles_h = (d->height + tile - 1) / tile;
      args.tiles_w = (d->width + tile - 1) / tile;
      const int64_t grid = d->batch * args.tiles_h * args.tiles_w;
      if (grid <= dev->max_grid) return Launch(stream, tiled, fn, grid, block, smem, params.data());
    }
  }
  CUfunction fn;
  status = Function(dev, any, &fn);
  if (status != SAPA_OK) return status;
  return Launch(stream, any, fn, StrideGrid(dev, any_work, 256), 256, 0, params.data());
}

std::string Name(const char* op, int dtype, const char* suffix) {
  return std::string("sapa_") + op + "_" + DtypeName(dtype) + suffix;
}

bool IsHalf(int dtype) { return dtype == SAPA_F16 || dtype == SAPA_BF16; }

bool TiledK(int64_t kernel) { return kernel == 3 || kernel == 5 || kernel == 7; }

int64_t HighPoints(const SapaDims* d) { return d->batch * d->height * d->up * d->width * d->up; }

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
  g_images.push_back(std::move(image));
  return SAPA_OK;
}

int sapa_load_image_dir(const char* dir, int* count) {
  if (count) *count = 0;
  DIR* handle = dir ? opendir(dir) : nullptr;
  if (!handle) return Fail(SAPA_ERR_IO, std::string("cannot open the image directory ") + (dir ? dir : "NULL"));
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
    std::ifstream in(std::string(dir) + "/" + name, std::ios::binary);
    std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (!in.good() && !in.eof()) return Fail(SAPA_ERR_IO, "cannot read " + name);
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
  if (target && target_size) std::snprintf(target, target_size, "%s", candidates[0]->target.c_str());
  return SAPA_OK;
}

int sapa_device_info(void* stream, int* major, int* minor, char* target, size_t target_size) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceState* dev = nullptr;
  const int status = DeviceFor(static_cast<CUstream>(stream), &dev);
  if (status != SAPA_OK) return status;
  if (major) *major = dev->major;
  if (minor) *minor = dev->minor;
  if (target && target_size) std::snprintf(target, target_size, "%s", dev->target.c_str());
  return SAPA_OK;
}

void sapa_set_untiled(int untiled) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_untiled = untiled != 0;
}

int sapa_last_launch(char* name, size_t name_size, int64_t* grid, int* block, int* smem) {
  if (name && name_size) std::snprintf(name, name_size, "%s", t_last_name.c_str());
  if (grid) *grid = t_last_grid;
  if (block) *block = t_last_block;
  if (smem) *smem = t_last_smem;
  return SAPA_OK;
}

int sapa_dot(void* stream, int dtype, const SapaDims* d, const void* hi, const void* lo, void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  const std::string tiled = TiledK(d->kernel) ? Name("dot", dtype, ("_k" + std::to_string(d->kernel)).c_str()) : "";
  return Run(static_cast<CUstream>(stream), kDot, dtype, d, tiled, Name("dot", dtype, "_any"),
             HighPoints(d) * d->kernel * d->kernel,
             {const_cast<void*>(hi), const_cast<void*>(lo), out});
}

int sapa_gather(void* stream, int dtype, const SapaDims* d, const void* w, const void* lo, void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  return Run(static_cast<CUstream>(stream), kGather, dtype, d, Name("gather", dtype, ""),
             Name("gather", dtype, "_any"), HighPoints(d) * d->channels,
             {const_cast<void*>(w), const_cast<void*>(lo), out});
}

int sapa_scatter(void* stream, int dtype, const SapaDims* d, const void* w, const void* hi, void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  return Run(static_cast<CUstream>(stream), kScatter, dtype, d, Name("scatter", dtype, ""),
             Name("scatter", dtype, "_any"), d->batch * d->height * d->width * d->channels,
             {const_cast<void*>(w), const_cast<void*>(hi), out});
}

int sapa_gather_acc(void* stream, int dtype, const SapaDims* d, const void* w, const void* lo,
                    void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  const char* wacc = IsHalf(dtype) ? "_wacc" : "";
  return Run(static_cast<CUstream>(stream), kGather, dtype, d, Name("gather", dtype, wacc),
             Name("gather", dtype, (std::string(wacc) + "_any").c_str()),
             HighPoints(d) * d->channels, {const_cast<void*>(w), const_cast<void*>(lo), out});
}

int sapa_scatter_acc(void* stream, int dtype, const SapaDims* d, const void* w, const void* hi,
                     void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  const char* wacc = IsHalf(dtype) ? "_wacc" : "";
  return Run(static_cast<CUstream>(stream), kScatter, dtype, d, Name("scatter", dtype, wacc),
             Name("scatter", dtype, (std::string(wacc) + "_any").c_str()),
             d->batch * d->height * d->width * d->channels,
             {const_cast<void*>(w), const_cast<void*>(hi), out});
}

int sapa_forward(void* stream, int dtype, const SapaDims* d, const void* q, const void* k,
                 const void* v, void* out, void* attn) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  if (attn == nullptr) return Fail(SAPA_ERR_INVALID, "sapa_forward needs an attn buffer");
  const std::string tiled = TiledK(d->kernel) ? Name("fused", dtype, ("_k" + std::to_string(d->kernel)).c_str()) : "";
  return Run(static_cast<CUstream>(stream), kFused, dtype, d, tiled, Name("fused", dtype, "_any"),
             HighPoints(d), {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), out, attn});
}

int sapa_softmax_backward(void* stream, int dtype, const SapaDims* d, const void* grad,
                          const void* v, const void* attn, void* out) {
  int status = Check(dtype, d);
  if (status != SAPA_OK) return status;
  const std::string tiled = TiledK(d->kernel) ? Name("dsoftmax", dtype, ("_k" + std::to_string(d->kernel)).c_str()) : "";
  return Run(static_cast<CUstream>(stream), kDSoftmax, dtype, d, tiled,
             Name("dsoftmax", dtype, "_any"), HighPoints(d),
             {const_cast<void*>(grad), const_cast<void*>(v), const_cast<void*>(attn), out});
}

}  // extern "C"
