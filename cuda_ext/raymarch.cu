// CUDA kernels of ray marching with empty-space skipping and of front-to-back volume compositing.
//
// The same algorithms as avatar/render/csrc/raymarch_cpu.cpp (read its header for the definitions),
// one thread per ray. C ABI launchers take raw device pointers, sizes and the caller's cudaStream_t
// (as void*), and return the cudaError_t of the launch; no torch headers, so this file compiles on its
// own with `nvcc -std=c++17 -c cuda_ext/raymarch.cu` and loads with ctypes
// (avatar/render/_raymarch_kernels.py).
//
// The library is built with --use_fast_math, which lets nvcc contract a * b + c into an FMA and
// approximate divisions. Marching must reproduce the PyTorch twin's sample set exactly, so every
// operation that decides whether a sample exists uses the round-to-nearest intrinsics (__fmul_rn,
// __fadd_rn, ...), which are never contracted: t = near + (k + 0.5) * step, p = o + t * d and
// floor((p - lo) * scale) are rounded exactly as PyTorch's separate elementwise kernels round them.
// Compositing is compared to the twin with a tolerance and uses plain arithmetic.

#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float floor_(float a) { return floorf(a); }
__device__ __forceinline__ double floor_(double a) { return floor(a); }
__device__ __forceinline__ float expm1_(float a) { return expm1f(a); }
__device__ __forceinline__ double expm1_(double a) { return expm1(a); }

// params: lo (3), scale = G / (hi - lo) (3), step (1), in T; dims: G along x, y, z.
template <typename T>
__device__ __forceinline__ int64_t cell(T p, const T* params, const int64_t* dims, int a) {
  T f = floor_(mul_rn(sub_rn(p, params[a]), params[3 + a]));
  if (!(f >= T(0))) f = T(0);  // also NaN
  if (f > T(dims[a] - 1)) f = T(dims[a] - 1);
  return static_cast<int64_t>(f);
}

// Ray r's kept samples in order; with `ts` null only counts them. Returns the count.
template <typename T>
__device__ int64_t walk_ray(const T* __restrict__ origins, const T* __restrict__ dirs, T near, T far,
                            const uint8_t* __restrict__ occ, const int64_t* __restrict__ dims,
                            const T* __restrict__ params, int64_t max_samples, int64_t r, int64_t start,
                            T* ts, T* deltas, int64_t* ray_ids, T* positions) {
  const T step = params[6];
  const T o[3] = {origins[3 * r], origins[3 * r + 1], origins[3 * r + 2]};
  const T d[3] = {dirs[3 * r], dirs[3 * r + 1], dirs[3 * r + 2]};
  int64_t n = 0;
  if (max_samples <= 0) return 0;
  for (int64_t k = 0;; ++k) {
    const T t = add_rn(near, mul_rn(add_rn(T(k), T(0.5)), step));
    if (!(t < far)) break;
    T p[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) p[a] = add_rn(o[a], mul_rn(t, d[a]));
    const int64_t idx = (cell(p[0], params, dims, 0) * dims[1] + cell(p[1], params, dims, 1)) * dims[2] +
                        cell(p[2], params, dims, 2);
    if (!occ[idx]) continue;
    if (ts != nullptr) {
      const int64_t s = start + n;
      ts[s] = t;
      deltas[s] = step;
      ray_ids[s] = r;
#pragma unroll
      for (int a = 0; a < 3; ++a) positions[3 * s + a] = p[a];
    }
    if (++n >= max_samples) break;
  }
  return n;
}

template <typename T>
__global__ void march_count_kernel(const T* origins, const T* dirs, const T* near, const T* far,
                                   const uint8_t* occ, const int64_t* dims, const T* params, int64_t n_rays,
                                   int64_t max_samples, int64_t* counts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  counts[r] = walk_ray<T>(origins, dirs, near[r], far[r], occ, dims, params, max_samples, r, 0, nullptr,
                          nullptr, nullptr, nullptr);
}

template <typename T>
__global__ void march_fill_kernel(const T* origins, const T* dirs, const T* near, const T* far,
                                  const uint8_t* occ, const int64_t* dims, const T* params, int64_t n_rays,
                                  int64_t max_samples, const int64_t* offsets, T* ts, T* deltas,
                                  int64_t* ray_ids, T* positions) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  const int64_t start = offsets[r];
  const int64_t cap = offsets[r + 1] - start;  // the count pass's figure: never write past it
  walk_ray<T>(origins, dirs, near[r], far[r], occ, dims, params, cap < max_samples ? cap : max_samples, r,
              start, ts, deltas, ray_ids, positions);
}

template <typename T>
__global__ void composite_fwd_kernel(const T* __restrict__ sigmas, const T* __restrict__ rgbs,
                                     const T* __restrict__ deltas, const T* __restrict__ ts,
                                     const int64_t* __restrict__ offsets, int64_t n_rays, int64_t channels,
                                     T stop, T* out_rgb, T* out_opacity, T* out_depth) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  T* rgb = out_rgb + r * channels;
  for (int64_t ch = 0; ch < channels; ++ch) rgb[ch] = T(0);
  T trans = 1, opacity = 0, depth = 0;
  for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) {
    if (!(trans >= stop)) break;
    const T em = expm1_(-sigmas[i] * deltas[i]);  // exp(-s) - 1 = -alpha
    const T w = -em * trans;
    const T* c = rgbs + i * channels;
    for (int64_t ch = 0; ch < channels; ++ch) rgb[ch] += w * c[ch];
    opacity += w;
    depth += w * ts[i];
    trans *= T(1) + em;
  }
  out_opacity[r] = opacity;
  out_depth[r] = depth;
}

// work: [S] scratch for T_i, the transmittance before each sample (written front to back, read back
// to front), so that the backward needs no division by (1 - alpha).
template <typename T>
__global__ void composite_bwd_kernel(const T* __restrict__ sigmas, const T* __restrict__ rgbs,
                                     const T* __restrict__ deltas, const T* __restrict__ ts,
                                     const int64_t* __restrict__ offsets, int64_t n_rays, int64_t channels,
                                     T stop, const T* __restrict__ g_rgb, const T* __restrict__ g_opacity,
                                     const T* __restrict__ g_depth, T* grad_sigmas, T* grad_rgbs, T* work) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  const int64_t start = offsets[r];
  int64_t end = start;
  T trans = 1;
  for (; end < offsets[r + 1]; ++end) {
    if (!(trans >= stop)) break;
    work[end] = trans;
    trans *= T(1) + expm1_(-sigmas[end] * deltas[end]);
  }
  const T* g = g_rgb + r * channels;
  const T go = g_opacity[r], gd = g_depth[r];
  T later = 0;  // sum over j > i of w_j q_j
  for (int64_t i = end - 1; i >= start; --i) {
    const T em = expm1_(-sigmas[i] * deltas[i]);
    const T before = work[i];
    const T w = -em * before;
    const T* c = rgbs + i * channels;
    T* gc = grad_rgbs + i * channels;
    T q = go + gd * ts[i];
    for (int64_t ch = 0; ch < channels; ++ch) {
      q += g[ch] * c[ch];
      gc[ch] = w * g[ch];
    }
    grad_sigmas[i] = deltas[i] * (before * (T(1) + em) * q - later);
    later += w * q;
  }
}

inline unsigned int blocks_for(int64_t n) { return static_cast<unsigned int>((n + kThreads - 1) / kThreads); }

}  // namespace

extern "C" {

// Version of this C ABI; the Python side refuses a library with another one.
int avatar_raymarch_abi_version() { return 1; }

#define AVATAR_DEFINE(SUFFIX, T)                                                                           \
  int avatar_march_count_##SUFFIX(const T* origins, const T* dirs, const T* near, const T* far,           \
                                  const uint8_t* occ, const int64_t* dims, const T* params,                \
                                  int64_t n_rays, int64_t max_samples, int64_t* counts, void* stream) {    \
    if (n_rays == 0) return 0;                                                                             \
    march_count_kernel<T><<<blocks_for(n_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(         \
        origins, dirs, near, far, occ, dims, params, n_rays, max_samples, counts);                         \
    return static_cast<int>(cudaGetLastError());                                                           \
  }                                                                                                        \
  int avatar_march_fill_##SUFFIX(const T* origins, const T* dirs, const T* near, const T* far,            \
                                 const uint8_t* occ, const int64_t* dims, const T* params,                 \
                                 int64_t n_rays, int64_t max_samples, const int64_t* offsets, T* ts,       \
                                 T* deltas, int64_t* ray_ids, T* positions, void* stream) {                \
    if (n_rays == 0) return 0;                                                                             \
    march_fill_kernel<T><<<blocks_for(n_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(          \
        origins, dirs, near, far, occ, dims, params, n_rays, max_samples, offsets, ts, deltas, ray_ids,    \
        positions);                                                                                        \
    return static_cast<int>(cudaGetLastError());                                                           \
  }                                                                                                        \
  int avatar_composite_fwd_##SUFFIX(const T* sigmas, const T* rgbs, const T* deltas, const T* ts,         \
                                    const int64_t* offsets, int64_t n_rays, int64_t channels,              \
                                    double stop, T* out_rgb, T* out_opacity, T* out_depth, void* stream) { \
    if (n_rays == 0) return 0;                                                                             \
    composite_fwd_kernel<T><<<blocks_for(n_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(       \
        sigmas, rgbs, deltas, ts, offsets, n_rays, channels, T(stop), out_rgb, out_opacity, out_depth);    \
    return static_cast<int>(cudaGetLastError());                                                           \
  }                                                                                                        \
  int avatar_composite_bwd_##SUFFIX(const T* sigmas, const T* rgbs, const T* deltas, const T* ts,         \
                                    const int64_t* offsets, int64_t n_rays, int64_t channels,              \
                                    double stop, const T* g_rgb, const T* g_opacity, const T* g_depth,     \
                                    T* grad_sigmas, T* grad_rgbs, T* work, void* stream) {                 \
    if (n_rays == 0) return 0;                                                                             \
    composite_bwd_kernel<T><<<blocks_for(n_rays), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(       \
        sigmas, rgbs, deltas, ts, offsets, n_rays, channels, T(stop), g_rgb, g_opacity, g_depth,           \
        grad_sigmas, grad_rgbs, work);                                                                     \
    return static_cast<int>(cudaGetLastError());                                                           \
  }

AVATAR_DEFINE(f32, float)
AVATAR_DEFINE(f64, double)

#undef AVATAR_DEFINE

}  // extern "C"
