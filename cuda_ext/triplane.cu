// CUDA kernel of the tri-plane hash-grid encoding (forward and backward).
//
// Plain CUDA C++17, no torch headers: `extern "C"` launchers take raw device pointers, sizes and
// the stream (a cudaStream_t passed as void*, torch.cuda.current_stream().cuda_stream), so the file
// compiles with a bare `nvcc -shared` and is loaded with ctypes (avatar/render/_triplane_kernels.py
// via avatar/render/_build.py). It computes exactly what the PyTorch twin `_triplane_encode`
// (avatar/render/triplane.py) and the C++ kernel (avatar/render/csrc/triplane_cpu.cpp) compute:
//
//   plane p reads the coordinate axes (x, y), (y, z), (x, z) for p = 0, 1, 2;
//   at level l with R cells per side, pos = u * R, cell = min(trunc(pos), R - 1), frac = pos - cell
//   (the cell also clamped below at 0, as the C++ kernel, so no input reads outside the table);
//   corners (x0, y0), (x1, y0), (x0, y1), (x1, y1), weights (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy;
//   dense levels (the first n_dense) index vertex (x, y) as x + y (R + 1), hashed levels as
//   (x ^ y * 2654435761) & (2^log2 - 1), relative to the first row offsets[l][p];
//   out[m][p][l][:] = sum_c w_c table[row_c][:].
//
// One thread per (point, level) handles the three planes, so each coordinate is located once and
// shared by the two planes that read it. The backward adds into the table with atomicAdd (order
// not deterministic: float sums differ between runs in the last bits) and into the position
// gradient with one atomicAdd per (point, level, axis); grad_coords must be zeroed by the caller.
// float and double (atomicAdd on double needs sm_60 or newer).

#include <cuda_runtime.h>

#include <cstdint>

namespace avatar_triplane {

constexpr unsigned kHashPrime = 2654435761u;  // instant-ngp's prime for y; x uses 1
constexpr int kThreads = 256;

struct Layout {
  const int64_t* res;  // [L], device
  const int64_t* off;  // [L, 3], device
  int64_t m;
  int64_t levels;
  int64_t feats;
  int64_t n_dense;
  unsigned mask;
};

template <typename T>
struct Axis {
  int cell;
  T frac;
};

// u * R rounded on its own (never fused into the fma of pos - cell, which --use_fast_math's
// -fmad would allow): the fraction is then exactly the twin's.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T>
__device__ __forceinline__ Axis<T> axis_of(T u, T scale, T last) {
  const T pos = mul_rn(u, scale);
  T q = pos > T(0) ? pos : T(0);
  q = q < last ? q : last;
  const int cell = static_cast<int>(q);
  return {cell, pos - static_cast<T>(cell)};
}

__device__ __forceinline__ void corner_rows(bool dense, int64_t x, int64_t y, int64_t stride, unsigned mask,
                                            int64_t row[4]) {
  if (dense) {
    const int64_t base = x + y * stride;
    row[0] = base;
    row[1] = base + 1;
    row[2] = base + stride;
    row[3] = base + stride + 1;
  } else {
    const unsigned x0 = static_cast<unsigned>(x), x1 = x0 + 1u;
    const unsigned y0 = static_cast<unsigned>(y) * kHashPrime, y1 = y0 + kHashPrime;
    row[0] = (x0 ^ y0) & mask;
    row[1] = (x1 ^ y0) & mask;
    row[2] = (x0 ^ y1) & mask;
    row[3] = (x1 ^ y1) & mask;
  }
}

template <typename T>
__device__ __forceinline__ void weights_of(T fx, T fy, T w[4]) {
  const T gx = T(1) - fx, gy = T(1) - fy;
  w[0] = gx * gy;
  w[1] = fx * gy;
  w[2] = gx * fy;
  w[3] = fx * fy;
}

__device__ __forceinline__ int plane_axis(int p, int which) {
  // xy, yz, xz
  return which == 0 ? (p == 1 ? 1 : 0) : (p == 0 ? 1 : 2);
}

template <typename T, int kF>
__global__ void forward_kernel(const T* __restrict__ coords, const T* __restrict__ table, Layout lay,
                               T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= lay.m * lay.levels) return;
  const int64_t m = i / lay.levels, l = i % lay.levels;
  const int64_t F = kF > 0 ? kF : lay.feats;
  const int64_t res = lay.res[l], stride = res + 1;
  const T scale = static_cast<T>(res), last = static_cast<T>(res - 1);
  const bool dense = l < lay.n_dense;
  const Axis<T> ax[3] = {axis_of(coords[m * 3], scale, last), axis_of(coords[m * 3 + 1], scale, last),
                         axis_of(coords[m * 3 + 2], scale, last)};
#pragma unroll
  for (int p = 0; p < 3; ++p) {
    const Axis<T> u = ax[plane_axis(p, 0)], v = ax[plane_axis(p, 1)];
    int64_t row[4];
    corner_rows(dense, u.cell, v.cell, stride, lay.mask, row);
    T w[4];
    weights_of(u.frac, v.frac, w);
    const T* tab = table + lay.off[l * 3 + p] * F;
    T* dst = out + ((m * 3 + p) * lay.levels + l) * F;
    for (int64_t f = 0; f < F; ++f) {
      T acc = tab[row[0] * F + f] * w[0];
      acc += tab[row[1] * F + f] * w[1];
      acc += tab[row[2] * F + f] * w[2];
      acc += tab[row[3] * F + f] * w[3];
      dst[f] = acc;
    }
  }
}

template <typename T, int kF>
__global__ void backward_kernel(const T* __restrict__ coords, const T* __restrict__ table, Layout lay,
                                const T* __restrict__ grad, T* __restrict__ grad_table, T* __restrict__ grad_coords) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= lay.m * lay.levels) return;
  const int64_t m = i / lay.levels, l = i % lay.levels;
  const int64_t F = kF > 0 ? kF : lay.feats;
  const int64_t res = lay.res[l], stride = res + 1;
  const T scale = static_cast<T>(res), last = static_cast<T>(res - 1);
  const bool dense = l < lay.n_dense;
  const Axis<T> ax[3] = {axis_of(coords[m * 3], scale, last), axis_of(coords[m * 3 + 1], scale, last),
                         axis_of(coords[m * 3 + 2], scale, last)};
  T dpos[3] = {T(0), T(0), T(0)};
#pragma unroll
  for (int p = 0; p < 3; ++p) {
    const int iu = plane_axis(p, 0), iv = plane_axis(p, 1);
    const Axis<T> u = ax[iu], v = ax[iv];
    int64_t row[4];
    corner_rows(dense, u.cell, v.cell, stride, lay.mask, row);
    const int64_t first = lay.off[l * 3 + p] * F;
    const T* g = grad + ((m * 3 + p) * lay.levels + l) * F;
    if (grad_table != nullptr) {
      T w[4];
      weights_of(u.frac, v.frac, w);
      for (int k = 0; k < 4; ++k) {
        T* dst = grad_table + first + row[k] * F;
        for (int64_t f = 0; f < F; ++f) atomicAdd(dst + f, w[k] * g[f]);
      }
    }
    if (grad_coords != nullptr) {
      T gw[4];  // d out / d weight_c = <table[row_c], grad>
      for (int k = 0; k < 4; ++k) {
        const T* e = table + first + row[k] * F;
        T s = e[0] * g[0];
        for (int64_t f = 1; f < F; ++f) s += e[f] * g[f];
        gw[k] = s;
      }
      const T fx = u.frac, fy = v.frac, gx = T(1) - fx, gy = T(1) - fy;
      dpos[iu] += scale * (gy * (gw[1] - gw[0]) + fy * (gw[3] - gw[2]));
      dpos[iv] += scale * (gx * (gw[2] - gw[0]) + fx * (gw[3] - gw[1]));
    }
  }
  if (grad_coords != nullptr) {
    for (int a = 0; a < 3; ++a) atomicAdd(grad_coords + m * 3 + a, dpos[a]);
  }
}

inline bool make_layout(Layout& lay, const int64_t* res, const int64_t* off, int64_t m, int64_t levels,
                        int64_t feats, int64_t n_dense, int64_t log2_hashmap_size) {
  if (m < 0 || levels < 1 || feats < 1 || n_dense < 0 || n_dense > levels || log2_hashmap_size < 1 ||
      log2_hashmap_size > 30) {
    return false;
  }
  lay = Layout{res, off, m, levels, feats, n_dense, static_cast<unsigned>((int64_t(1) << log2_hashmap_size) - 1)};
  return true;
}

inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? 0 : 1000 + static_cast<int>(err);
}

template <typename T>
int forward(const T* coords, const T* table, const int64_t* res, const int64_t* off, int64_t m, int64_t levels,
            int64_t feats, int64_t n_dense, int64_t log2, T* out, void* stream) {
  Layout lay;
  if (!make_layout(lay, res, off, m, levels, feats, n_dense, log2)) return 1;
  const int64_t n = m * levels;
  if (n == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (feats == 2) {
    forward_kernel<T, 2><<<blocks, kThreads, 0, s>>>(coords, table, lay, out);
  } else {
    forward_kernel<T, 0><<<blocks, kThreads, 0, s>>>(coords, table, lay, out);
  }
  return launch_status();
}

template <typename T>
int backward(const T* coords, const T* table, const int64_t* res, const int64_t* off, int64_t m, int64_t levels,
             int64_t feats, int64_t n_dense, int64_t log2, const T* grad, T* grad_table, T* grad_coords,
             void* stream) {
  Layout lay;
  if (!make_layout(lay, res, off, m, levels, feats, n_dense, log2)) return 1;
  const int64_t n = m * levels;
  if (n == 0 || (grad_table == nullptr && grad_coords == nullptr)) return 0;
  const unsigned blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (feats == 2) {
    backward_kernel<T, 2><<<blocks, kThreads, 0, s>>>(coords, table, lay, grad, grad_table, grad_coords);
  } else {
    backward_kernel<T, 0><<<blocks, kThreads, 0, s>>>(coords, table, lay, grad, grad_table, grad_coords);
  }
  return launch_status();
}

}  // namespace avatar_triplane

extern "C" {

int avatar_triplane_cuda_abi_version() { return 1; }

// coords [M, 3], table [E = n_rows, F], res [L], off [L, 3] (int64): contiguous device memory.
// The layout lives on the device, so unlike the C++ kernel it is not checked against n_rows here.
// Forward writes out [M, 3, L, F]; backward reads grad [M, 3, L, F], adds into grad_table [E, F]
// and grad_coords [M, 3] (each skipped when null; grad_coords zeroed by the caller). Both are
// asynchronous on `stream`. Return 0, 1 on invalid sizes, 1000 + cudaError_t on a launch error.
#define AVATAR_TRIPLANE_CUDA_ENTRIES(T, SUFFIX)                                                                 \
  int avatar_triplane_cuda_fwd_##SUFFIX(const T* coords, const T* table, const int64_t* res, const int64_t* off, \
                                        int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2, \
                                        int64_t n_rows, T* out, void* stream) {                                  \
    (void)n_rows;                                                                                               \
    return avatar_triplane::forward<T>(coords, table, res, off, m, levels, feats, n_dense, log2, out, stream);   \
  }                                                                                                             \
  int avatar_triplane_cuda_bwd_##SUFFIX(const T* coords, const T* table, const int64_t* res, const int64_t* off, \
                                        int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2, \
                                        int64_t n_rows, const T* grad, T* grad_table, T* grad_coords,            \
                                        void* stream) {                                                          \
    (void)n_rows;                                                                                               \
    return avatar_triplane::backward<T>(coords, table, res, off, m, levels, feats, n_dense, log2, grad,          \
                                        grad_table, grad_coords, stream);                                        \
  }

AVATAR_TRIPLANE_CUDA_ENTRIES(float, f32)
AVATAR_TRIPLANE_CUDA_ENTRIES(double, f64)

#undef AVATAR_TRIPLANE_CUDA_ENTRIES

}  // extern "C"
