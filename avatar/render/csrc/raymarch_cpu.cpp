// CPU kernels of ray marching with empty-space skipping and of front-to-back volume compositing.
//
// Plain C++17 with a C ABI and no torch headers, loaded with ctypes (avatar/render/_raymarch_kernels.py),
// like csrc/rasterize_cpu.cpp. The definitions, and the PyTorch twins these kernels are tested against,
// are in avatar/render/raymarch.py; cuda_ext/raymarch.cu is the same code for CUDA.
//
// Marching. Ray r samples t_k = near_r + (k + 0.5) * step for k = 0, 1, ... while t_k < far_r, and keeps
// the samples whose occupancy cell is set, at most max_samples of them. Every quantity that decides
// whether a sample exists is computed in the tensors' precision T, one rounded operation at a time and
// in the same order as the twin:
//   t = near + (T(k) + 0.5) * step;  p = o + t * d;  cell = clamp(floor((p - lo) * scale), 0, G - 1)
// so that the kernels and the twin produce the very same sample set (tests check equality). It runs in
// two passes over the rays, count then fill, with the offsets (exclusive sum of the counts) computed by
// the caller in between: outputs are allocated once at their exact size.
//
// Compositing. Along ray r, with s_i = sigma_i delta_i, T_0 = 1:
//   sample i contributes iff T_i >= stop (the first sample failing this ends the ray),
//   alpha_i = 1 - exp(-s_i) (as -expm1(-s_i): accurate for small s_i), w_i = T_i alpha_i,
//   T_{i+1} = T_i exp(-s_i).
// Outputs rgb = sum w_i c_i, opacity = sum w_i, depth = sum w_i t_i. With q_i = g_rgb . c_i + g_opacity
// + g_depth t_i the backward is
//   dL/dc_i = w_i g_rgb,   dL/dsigma_i = delta_i (T_{i+1} q_i - sum_{j > i} w_j q_j),
// computed by re-running the ray front to back (keeping T_i and expm1(-s_i)), then walking it back to
// front with a running suffix sum: no division by (1 - alpha_i), exact for alpha_i = 1.
//
// Work is split over std::threads by blocks of rays; each ray writes only its own samples and its own
// output row, so there are no atomics.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kRaysPerBlock = 64;

template <typename F>
void parallel_rays(int64_t n_rays, int n_threads, F&& fn) {
  const int64_t n_blocks = (n_rays + kRaysPerBlock - 1) / kRaysPerBlock;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t b = next.fetch_add(1); b < n_blocks; b = next.fetch_add(1)) {
      const int64_t end = std::min(n_rays, (b + 1) * kRaysPerBlock);
      for (int64_t r = b * kRaysPerBlock; r < end; ++r) fn(r);
    }
  };
  n_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({n_threads, n_blocks, 256})));
  std::vector<std::thread> pool;
  for (int i = 1; i < n_threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

// params: lo (3), scale = G / (hi - lo) (3), step (1), all in T, computed once by the caller.
template <typename T>
struct Grid {
  T lo[3], scale[3], step;
  int64_t dims[3];
  const uint8_t* occ;

  Grid(const T* params, const int64_t* g, const uint8_t* occupancy) : occ(occupancy) {
    for (int a = 0; a < 3; ++a) {
      lo[a] = params[a];
      scale[a] = params[3 + a];
      dims[a] = g[a];
    }
    step = params[6];
  }

  // clamp(floor(u), 0, G - 1) without a floor: truncation is floor for u in [0, G), and the other
  // cases are the clamps (std::floor is a libm call on baseline x86-64, without SSE4.1's roundss).
  int64_t cell(T p, int a) const {
    const T u = (p - lo[a]) * scale[a];
    if (!(u >= T(0))) return 0;  // also NaN
    if (u >= T(dims[a])) return dims[a] - 1;
    return static_cast<int64_t>(u);
  }
};

// Visit ray r's kept samples in order: fn(t, x, y, z) for each, at most max_samples. Returns the count.
template <typename T, typename F>
int64_t walk_ray(const T* origins, const T* dirs, T near, T far, const Grid<T>& grid,
                 int64_t max_samples, F&& fn) {
  const T o[3] = {origins[0], origins[1], origins[2]};
  const T d[3] = {dirs[0], dirs[1], dirs[2]};
  int64_t n = 0;
  if (max_samples <= 0) return 0;
  for (int64_t k = 0;; ++k) {
    const T t = near + (T(k) + T(0.5)) * grid.step;
    if (!(t < far)) break;
    T p[3];
    for (int a = 0; a < 3; ++a) p[a] = o[a] + t * d[a];
    const int64_t idx = (grid.cell(p[0], 0) * grid.dims[1] + grid.cell(p[1], 1)) * grid.dims[2] + grid.cell(p[2], 2);
    if (!grid.occ[idx]) continue;
    fn(n, t, p);
    if (++n >= max_samples) break;
  }
  return n;
}

template <typename T>
void march_count(const T* origins, const T* dirs, const T* near, const T* far, const uint8_t* occ,
                 const int64_t* dims, const T* params, int64_t n_rays, int64_t max_samples,
                 int64_t* counts, int n_threads) {
  const Grid<T> grid(params, dims, occ);
  parallel_rays(n_rays, n_threads, [&](int64_t r) {
    counts[r] = walk_ray(origins + 3 * r, dirs + 3 * r, near[r], far[r], grid, max_samples,
                         [](int64_t, T, const T*) {});
  });
}

template <typename T>
void march_fill(const T* origins, const T* dirs, const T* near, const T* far, const uint8_t* occ,
                const int64_t* dims, const T* params, int64_t n_rays, int64_t max_samples,
                const int64_t* offsets, T* ts, T* deltas, int64_t* ray_ids, T* positions, int n_threads) {
  const Grid<T> grid(params, dims, occ);
  parallel_rays(n_rays, n_threads, [&](int64_t r) {
    const int64_t start = offsets[r];
    const int64_t cap = offsets[r + 1] - start;  // the count pass's figure: never write past it
    walk_ray(origins + 3 * r, dirs + 3 * r, near[r], far[r], grid, std::min(cap, max_samples),
             [&](int64_t i, T t, const T* p) {
               const int64_t s = start + i;
               ts[s] = t;
               deltas[s] = grid.step;
               ray_ids[s] = r;
               for (int a = 0; a < 3; ++a) positions[3 * s + a] = p[a];
             });
  });
}

template <typename T>
void composite_fwd(const T* sigmas, const T* rgbs, const T* deltas, const T* ts, const int64_t* offsets,
                   int64_t n_rays, int64_t channels, T stop, T* out_rgb, T* out_opacity, T* out_depth,
                   int n_threads) {
  parallel_rays(n_rays, n_threads, [&](int64_t r) {
    T* rgb = out_rgb + r * channels;
    std::fill(rgb, rgb + channels, T(0));
    T trans = 1, opacity = 0, depth = 0;
    for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) {
      if (!(trans >= stop)) break;
      const T em = std::expm1(-sigmas[i] * deltas[i]);  // exp(-s) - 1 = -alpha
      const T w = -em * trans;
      const T* c = rgbs + i * channels;
      for (int64_t ch = 0; ch < channels; ++ch) rgb[ch] += w * c[ch];
      opacity += w;
      depth += w * ts[i];
      trans *= T(1) + em;
    }
    out_opacity[r] = opacity;
    out_depth[r] = depth;
  });
}

template <typename T>
void composite_bwd(const T* sigmas, const T* rgbs, const T* deltas, const T* ts, const int64_t* offsets,
                   int64_t n_rays, int64_t channels, T stop, const T* g_rgb, const T* g_opacity,
                   const T* g_depth, T* grad_sigmas, T* grad_rgbs, int n_threads) {
  parallel_rays(n_rays, n_threads, [&](int64_t r) {
    thread_local std::vector<T> trans_before, expm1s;
    trans_before.clear();
    expm1s.clear();
    const int64_t start = offsets[r];
    T trans = 1;
    for (int64_t i = start; i < offsets[r + 1]; ++i) {
      if (!(trans >= stop)) break;
      const T em = std::expm1(-sigmas[i] * deltas[i]);
      trans_before.push_back(trans);
      expm1s.push_back(em);
      trans *= T(1) + em;
    }
    const T* g = g_rgb + r * channels;
    const T go = g_opacity[r], gd = g_depth[r];
    T later = 0;  // sum over j > i of w_j q_j
    for (int64_t k = static_cast<int64_t>(trans_before.size()) - 1; k >= 0; --k) {
      const int64_t i = start + k;
      const T em = expm1s[k];
      const T w = -em * trans_before[k];
      const T* c = rgbs + i * channels;
      T* gc = grad_rgbs + i * channels;
      T q = go + gd * ts[i];
      for (int64_t ch = 0; ch < channels; ++ch) {
        q += g[ch] * c[ch];
        gc[ch] = w * g[ch];
      }
      const T trans_after = trans_before[k] * (T(1) + em);
      grad_sigmas[i] = deltas[i] * (trans_after * q - later);
      later += w * q;
    }
  });
}

}  // namespace

extern "C" {

// Version of this C ABI; the Python side refuses a library with another one.
int avatar_raymarch_abi_version() { return 1; }

#define AVATAR_DEFINE(SUFFIX, T)                                                                          \
  int avatar_march_count_##SUFFIX(const T* origins, const T* dirs, const T* near, const T* far,          \
                                  const uint8_t* occ, const int64_t* dims, const T* params,               \
                                  int64_t n_rays, int64_t max_samples, int64_t* counts, int n_threads) {  \
    march_count(origins, dirs, near, far, occ, dims, params, n_rays, max_samples, counts, n_threads);     \
    return 0;                                                                                             \
  }                                                                                                       \
  int avatar_march_fill_##SUFFIX(const T* origins, const T* dirs, const T* near, const T* far,           \
                                 const uint8_t* occ, const int64_t* dims, const T* params,                \
                                 int64_t n_rays, int64_t max_samples, const int64_t* offsets, T* ts,      \
                                 T* deltas, int64_t* ray_ids, T* positions, int n_threads) {              \
    march_fill(origins, dirs, near, far, occ, dims, params, n_rays, max_samples, offsets, ts, deltas,     \
               ray_ids, positions, n_threads);                                                            \
    return 0;                                                                                             \
  }                                                                                                       \
  int avatar_composite_fwd_##SUFFIX(const T* sigmas, const T* rgbs, const T* deltas, const T* ts,        \
                                    const int64_t* offsets, int64_t n_rays, int64_t channels,             \
                                    double stop, T* out_rgb, T* out_opacity, T* out_depth,                \
                                    int n_threads) {                                                      \
    composite_fwd(sigmas, rgbs, deltas, ts, offsets, n_rays, channels, T(stop), out_rgb, out_opacity,     \
                  out_depth, n_threads);                                                                  \
    return 0;                                                                                             \
  }                                                                                                       \
  int avatar_composite_bwd_##SUFFIX(const T* sigmas, const T* rgbs, const T* deltas, const T* ts,        \
                                    const int64_t* offsets, int64_t n_rays, int64_t channels,             \
                                    double stop, const T* g_rgb, const T* g_opacity, const T* g_depth,    \
                                    T* grad_sigmas, T* grad_rgbs, int n_threads) {                        \
    composite_bwd(sigmas, rgbs, deltas, ts, offsets, n_rays, channels, T(stop), g_rgb, g_opacity,         \
                  g_depth, grad_sigmas, grad_rgbs, n_threads);                                            \
    return 0;                                                                                             \
  }

AVATAR_DEFINE(f32, float)
AVATAR_DEFINE(f64, double)

#undef AVATAR_DEFINE

}  // extern "C"
