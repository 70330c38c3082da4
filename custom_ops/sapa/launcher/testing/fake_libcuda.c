/* A stand-in for libcuda.so.1, for tests of the launcher on machines without a GPU.
 *
 * It implements exactly the driver API functions the launcher resolves, and records what
 * the launcher asks for. Tests set its behaviour through fake_configure() (ctypes) after
 * loading it under the same path the launcher then dlopen()s, so both see one instance.
 * Nothing is computed: kernels are never run. */

#include <stdio.h>
#include <string.h>

static int g_major = 8, g_minor = 0, g_sms = 108;
static int g_init_rc = 0, g_load_rc = 0, g_launch_rc = 0;
static char g_loaded_image[64];
static char g_last_kernel[128];
static unsigned g_last_grid, g_last_block, g_last_smem;
static int g_launches;

void fake_configure(int major, int minor, int init_rc, int load_rc, int launch_rc) {
  g_major = major;
  g_minor = minor;
  g_init_rc = init_rc;
  g_load_rc = load_rc;
  g_launch_rc = launch_rc;
}

const char* fake_loaded_image(void) { return g_loaded_image; }
const char* fake_last_kernel(void) { return g_last_kernel; }
int fake_launches(void) { return g_launches; }
void fake_last_launch(unsigned* grid, unsigned* block, unsigned* smem) {
  *grid = g_last_grid;
  *block = g_last_block;
  *smem = g_last_smem;
}

int cuInit(unsigned flags) { (void)flags; return g_init_rc; }
int cuDriverGetVersion(int* v) { *v = 12090; return 0; }
int cuGetErrorName(int rc, const char** name) {
  static char buf[64];
  snprintf(buf, sizeof buf, "FAKE_CUDA_ERROR_%d", rc);
  *name = buf;
  return 0;
}
int cuGetErrorString(int rc, const char** text) {
  (void)rc;
  *text = "reported by the fake driver";
  return 0;
}
/* The context handle encodes the compute capability, so each configuration gets its own
 * module cache entry in the launcher. */
int cuStreamGetCtx(void* stream, void** ctx) {
  (void)stream;
  *ctx = (void*)(long)(0x1000 + g_major * 10 + g_minor);
  return 0;
}
/* The calling thread's current context: the same handle (as a framework's thread has). */
int cuCtxGetCurrent(void** ctx) {
  *ctx = (void*)(long)(0x1000 + g_major * 10 + g_minor);
  return 0;
}
int cuDeviceGet(int* device, int ordinal) { *device = ordinal; return 0; }
int cuDevicePrimaryCtxRetain(void** ctx, int device) { (void)device; return cuCtxGetCurrent(ctx); }
int cuDevicePrimaryCtxRelease_v2(int device) { (void)device; return 0; }
int cuCtxPushCurrent_v2(void* ctx) { (void)ctx; return 0; }
int cuCtxPopCurrent_v2(void** ctx) { if (ctx) *ctx = 0; return 0; }
int cuCtxGetDevice(int* device) { *device = 0; return 0; }
int cuDeviceGetAttribute(int* value, int attribute, int device) {
  (void)device;
  switch (attribute) {
    case 75: *value = g_major; return 0;
    case 76: *value = g_minor; return 0;
    case 16: *value = g_sms; return 0;
    case 1: *value = 1024; return 0;
    case 8: *value = 48 * 1024; return 0;
    case 5: *value = 2147483647; return 0;
    default: *value = 0; return 1;
  }
}
/* Remembers the start of the image (a cubin is ELF; a PTX image is text). */
int cuModuleLoadData(void** module, const void* image) {
  if (g_load_rc) return g_load_rc;
  const unsigned char* bytes = (const unsigned char*)image;
  if (bytes[0] == 0x7f && bytes[1] == 'E') {
    snprintf(g_loaded_image, sizeof g_loaded_image, "cubin");
  } else {
    snprintf(g_loaded_image, sizeof g_loaded_image, "ptx");
  }
  *module = (void*)0x2000;
  return 0;
}
int cuModuleGetFunction(void** fn, void* module, const char* name) {
  (void)module;
  /* The function handle is a copy of its name, so the launch can report it. */
  static char names[256][96];
  static int count;
  for (int i = 0; i < count; ++i) {
    if (strcmp(names[i], name) == 0) { *fn = names[i]; return 0; }
  }
  if (count == 256) return 500;
  snprintf(names[count], sizeof names[count], "%s", name);
  *fn = names[count++];
  return 0;
}
int cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                   unsigned bz, unsigned smem, void* stream, void** params, void** extra) {
  (void)gy; (void)gz; (void)by; (void)bz; (void)stream; (void)params; (void)extra;
  snprintf(g_last_kernel, sizeof g_last_kernel, "%s", (const char*)fn);
  g_last_grid = gx;
  g_last_block = bx;
  g_last_smem = smem;
  ++g_launches;
  return g_launch_rc;
}
/* The limit a kernel's __launch_bounds__ sets (the handle is the kernel's name), as
 * SAPA_TILED_THREADS / SAPA_WINDOW_THREADS in kernels/cuda/sapa_kernels.cu. */
int cuFuncGetAttribute(int* value, int attribute, void* fn) {
  const char* name = (const char*)fn;
  int f64 = strstr(name, "_f64") != NULL;
  if (attribute != 0) return 1;
  if (strstr(name, "_k7")) *value = 256;
  else if (strstr(name, "_k5")) *value = f64 ? 256 : 512;
  else if (strstr(name, "_k3")) *value = f64 ? 512 : 1024;
  else *value = 256;
  return 0;
}
/* A plausible occupancy: limited by 2048 threads and 164 KB of shared memory per SM. */
int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* fn, int block, size_t smem) {
  (void)fn;
  int by_threads = 2048 / block;
  int by_smem = smem ? (int)((164 * 1024) / smem) : 32;
  *blocks = by_threads < by_smem ? by_threads : by_smem;
  if (*blocks > 32) *blocks = 32;
  return 0;
}
