// CPU compositing kernel of the avatar Gaussian rasterizer (forward and backward).
//
// Plain C++17 with a C ABI, no torch headers: it compiles in a second or two with any g++/clang++
// and is loaded with ctypes (avatar/render/_cpu_kernel.py), so it needs neither ninja nor a
// matching torch ABI. Projection, tile binning and sorting stay in PyTorch; this file only does
// the per-pixel loop that PyTorch cannot express without materialising every (pixel, Gaussian)
// pair of a tile.
//
// Conventions are gsplat's and those of avatar/render/_torch_impl.py:
//   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, (a, b, c) the inverse 2D covariance,
//   alpha = min(0.999, o exp(-sigma)), skipped when alpha < 1/255,
//   a pixel stops before the Gaussian that would bring its transmittance to <= 1e-4,
//   pixel (i, j) has its centre at (j + 0.5, i + 0.5).
// Output alpha is 1 - T_final. The backward re-runs each pixel's front-to-back pass, keeps the
// few Gaussians that contributed, and walks them back to front with a running suffix sum, so it
// never divides by (1 - alpha) to recover transmittance.
//
// Work is split by tile over std::threads. Gradients are first accumulated per tile-Gaussian
// intersection (each intersection belongs to exactly one tile, hence one thread: no atomics),
// then summed per Gaussian in one sequential pass.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr double kAlphaThreshold = 1.0 / 255.0;
constexpr double kAlphaMax = 0.999;
constexpr double kTransmittanceMin = 1e-4;

struct Geometry {
  int64_t n_cams;
  int64_t n_gauss;
  int64_t dim;  // feature channels D
  int64_t width;
  int64_t height;
  int64_t tile_size;
  int64_t tile_width;
  int64_t tile_height;
};

template <typename F>
void parallel_tiles(int64_t n_tiles, int n_threads, F&& fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t t = next.fetch_add(1); t < n_tiles; t = next.fetch_add(1)) fn(t);
  };
  n_threads = std::max(1, std::min<int>(n_threads, static_cast<int>(std::min<int64_t>(n_tiles, 256))));
  std::vector<std::thread> pool;
  for (int i = 1; i < n_threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

// The tile's Gaussians gathered into contiguous arrays (structure of arrays, for the cache).
template <typename T>
struct TileList {
  std::vector<T> mx, my, a, b, c, o, cut, feat;
  void load(const T* means2d, const T* conics, const T* opac, const T* feats, const int64_t* ids,
            int64_t n, int64_t dim) {
    mx.resize(n); my.resize(n); a.resize(n); b.resize(n); c.resize(n); o.resize(n);
    cut.resize(n); feat.resize(n * dim);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t g = ids[k];
      mx[k] = means2d[2 * g];
      my[k] = means2d[2 * g + 1];
      a[k] = conics[3 * g];
      b[k] = conics[3 * g + 1];
      c[k] = conics[3 * g + 2];
      o[k] = opac[g];
      // sigma above this can only give alpha < 1/255: skip those pairs without an exp. The
      // margin keeps the exact alpha test below in charge of borderline pairs.
      cut[k] = o[k] > 0 ? std::log(o[k] / T(kAlphaThreshold)) + T(1e-3) : T(-1);
      for (int64_t d = 0; d < dim; ++d) feat[k * dim + d] = feats[g * dim + d];
    }
  }
};

template <typename T>
void forward(const T* means2d, const T* conics, const T* opac, const T* feats,
             const int64_t* flatten_ids, const int64_t* tile_offsets, const Geometry& geo,
             T* out_render, T* out_alpha, int n_threads) {
  const int64_t tiles_per_cam = geo.tile_width * geo.tile_height;
  const int64_t dim = geo.dim;
  parallel_tiles(geo.n_cams * tiles_per_cam, n_threads, [&](int64_t tile) {
    thread_local TileList<T> list;
    thread_local std::vector<T> acc;
    acc.resize(dim);
    const int64_t cam = tile / tiles_per_cam;
    const int64_t local = tile % tiles_per_cam;
    const int64_t x0 = (local % geo.tile_width) * geo.tile_size;
    const int64_t y0 = (local / geo.tile_width) * geo.tile_size;
    const int64_t x1 = std::min(x0 + geo.tile_size, geo.width);
    const int64_t y1 = std::min(y0 + geo.tile_size, geo.height);
    const int64_t start = tile_offsets[tile];
    const int64_t n = tile_offsets[tile + 1] - start;
    list.load(means2d, conics, opac, feats, flatten_ids + start, n, dim);
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const T px = T(x) + T(0.5), py = T(y) + T(0.5);
        T trans = 1;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t k = 0; k < n; ++k) {
          const T dx = list.mx[k] - px, dy = list.my[k] - py;
          const T sigma = T(0.5) * (list.a[k] * dx * dx + list.c[k] * dy * dy) + list.b[k] * dx * dy;
          if (sigma > list.cut[k]) continue;
          const T alpha = std::min(T(kAlphaMax), list.o[k] * std::exp(-sigma));
          if (alpha < T(kAlphaThreshold)) continue;
          const T next = trans * (T(1) - alpha);
          if (next <= T(kTransmittanceMin)) break;
          const T w = alpha * trans;
          const T* f = &list.feat[k * dim];
          for (int64_t d = 0; d < dim; ++d) acc[d] += w * f[d];
          trans = next;
        }
        const int64_t pix = (cam * geo.height + y) * geo.width + x;
        for (int64_t d = 0; d < dim; ++d) out_render[pix * dim + d] = acc[d];
        out_alpha[pix] = T(1) - trans;
      }
    }
  });
}

template <typename T>
struct Hit {
  int64_t k;
  T alpha, trans, expo, dx, dy;
  bool clamped;
};

// grad_isect row layout: v_mean (2), v_conic (3), v_opac (1), v_feat (D).
template <typename T>
void backward(const T* means2d, const T* conics, const T* opac, const T* feats,
              const int64_t* flatten_ids, const int64_t* tile_offsets, const Geometry& geo,
              const T* v_render, const T* v_alpha, T* grad_isect, int n_threads) {
  const int64_t tiles_per_cam = geo.tile_width * geo.tile_height;
  const int64_t dim = geo.dim;
  const int64_t row = 6 + dim;
  parallel_tiles(geo.n_cams * tiles_per_cam, n_threads, [&](int64_t tile) {
    thread_local TileList<T> list;
    thread_local std::vector<Hit<T>> hits;
    const int64_t cam = tile / tiles_per_cam;
    const int64_t local = tile % tiles_per_cam;
    const int64_t x0 = (local % geo.tile_width) * geo.tile_size;
    const int64_t y0 = (local / geo.tile_width) * geo.tile_size;
    const int64_t x1 = std::min(x0 + geo.tile_size, geo.width);
    const int64_t y1 = std::min(y0 + geo.tile_size, geo.height);
    const int64_t start = tile_offsets[tile];
    const int64_t n = tile_offsets[tile + 1] - start;
    if (n == 0) return;
    list.load(means2d, conics, opac, feats, flatten_ids + start, n, dim);
    T* grad = grad_isect + start * row;  // this tile's intersections only
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t x = x0; x < x1; ++x) {
        const T px = T(x) + T(0.5), py = T(y) + T(0.5);
        const int64_t pix = (cam * geo.height + y) * geo.width + x;
        const T* g = v_render + pix * dim;
        const T g_alpha = v_alpha[pix];
        // Front to back: which Gaussians this pixel used, with their alpha and transmittance.
        hits.clear();
        T trans = 1;
        for (int64_t k = 0; k < n; ++k) {
          const T dx = list.mx[k] - px, dy = list.my[k] - py;
          const T sigma = T(0.5) * (list.a[k] * dx * dx + list.c[k] * dy * dy) + list.b[k] * dx * dy;
          if (sigma > list.cut[k]) continue;
          const T expo = std::exp(-sigma);
          const T raw = list.o[k] * expo;
          const T alpha = std::min(T(kAlphaMax), raw);
          if (alpha < T(kAlphaThreshold)) continue;
          const T next = trans * (T(1) - alpha);
          if (next <= T(kTransmittanceMin)) break;
          hits.push_back({k, alpha, trans, expo, dx, dy, raw > T(kAlphaMax)});
          trans = next;
        }
        // Back to front. out = sum_i w_i f_i with w_i = alpha_i T_i, and alpha_pix = sum_i w_i
        // (a feature channel of ones), so d out . g / d alpha_i = T_i gf_i - later_i / (1 - alpha_i)
        // where gf_i = g . f_i + g_alpha and later_i = sum_{j > i} w_j gf_j.
        T later = 0;
        for (auto it = hits.rbegin(); it != hits.rend(); ++it) {
          const int64_t k = it->k;
          const T* f = &list.feat[k * dim];
          T gf = g_alpha;
          for (int64_t d = 0; d < dim; ++d) gf += g[d] * f[d];
          const T w = it->alpha * it->trans;
          T* gk = grad + k * row;
          for (int64_t d = 0; d < dim; ++d) gk[6 + d] += w * g[d];
          const T v_a = it->trans * gf - later / (T(1) - it->alpha);
          later += w * gf;
          if (it->clamped) continue;  // alpha = 0.999 does not depend on sigma or opacity
          gk[5] += v_a * it->expo;
          const T v_sigma = -v_a * it->alpha;
          const T dx = it->dx, dy = it->dy;
          const T a = list.a[k], b = list.b[k], c = list.c[k];
          gk[0] += v_sigma * (a * dx + b * dy);  // d sigma / d mean_x (dx = mean_x - px)
          gk[1] += v_sigma * (b * dx + c * dy);
          gk[2] += v_sigma * T(0.5) * dx * dx;
          gk[3] += v_sigma * dx * dy;
          gk[4] += v_sigma * T(0.5) * dy * dy;
        }
      }
    }
  });
}

template <typename T>
void scatter(const int64_t* flatten_ids, int64_t n_isects, int64_t dim, const T* grad_isect,
             T* v_means2d, T* v_conics, T* v_opac, T* v_feats) {
  const int64_t row = 6 + dim;
  for (int64_t i = 0; i < n_isects; ++i) {
    const int64_t g = flatten_ids[i];
    const T* r = grad_isect + i * row;
    v_means2d[2 * g] += r[0];
    v_means2d[2 * g + 1] += r[1];
    v_conics[3 * g] += r[2];
    v_conics[3 * g + 1] += r[3];
    v_conics[3 * g + 2] += r[4];
    v_opac[g] += r[5];
    for (int64_t d = 0; d < dim; ++d) v_feats[g * dim + d] += r[6 + d];
  }
}

Geometry make_geometry(int64_t n_cams, int64_t n_gauss, int64_t dim, int64_t width,
                       int64_t height, int64_t tile_size) {
  return {n_cams, n_gauss, dim, width, height, tile_size,
          (width + tile_size - 1) / tile_size, (height + tile_size - 1) / tile_size};
}

template <typename T>
int run_backward(const T* means2d, const T* conics, const T* opac, const T* feats,
                 const int64_t* flatten_ids, const int64_t* tile_offsets, int64_t n_isects,
                 int64_t n_cams, int64_t n_gauss, int64_t dim, int64_t width, int64_t height,
                 int64_t tile_size, const T* v_render, const T* v_alpha, T* v_means2d,
                 T* v_conics, T* v_opac, T* v_feats, int n_threads) {
  const Geometry geo = make_geometry(n_cams, n_gauss, dim, width, height, tile_size);
  std::vector<T> grad_isect(static_cast<size_t>(n_isects) * (6 + dim), T(0));
  backward(means2d, conics, opac, feats, flatten_ids, tile_offsets, geo, v_render, v_alpha,
           grad_isect.data(), n_threads);
  scatter(flatten_ids, n_isects, dim, grad_isect.data(), v_means2d, v_conics, v_opac, v_feats);
  return 0;
}

}  // namespace

extern "C" {

// Version of this C ABI; the Python side refuses a library with another one.
int avatar_rasterize_abi_version() { return 1; }

#define AVATAR_DEFINE(SUFFIX, T)                                                                  \
  int avatar_rasterize_fwd_##SUFFIX(const T* means2d, const T* conics, const T* opac,             \
                                    const T* feats, const int64_t* flatten_ids,                   \
                                    const int64_t* tile_offsets, int64_t n_cams, int64_t n_gauss, \
                                    int64_t dim, int64_t width, int64_t height,                   \
                                    int64_t tile_size, T* out_render, T* out_alpha,               \
                                    int n_threads) {                                              \
    const Geometry geo = make_geometry(n_cams, n_gauss, dim, width, height, tile_size);           \
    forward(means2d, conics, opac, feats, flatten_ids, tile_offsets, geo, out_render, out_alpha,  \
            n_threads);                                                                           \
    return 0;                                                                                     \
  }                                                                                               \
  int avatar_rasterize_bwd_##SUFFIX(const T* means2d, const T* conics, const T* opac,             \
                                    const T* feats, const int64_t* flatten_ids,                   \
                                    const int64_t* tile_offsets, int64_t n_isects,                \
                                    int64_t n_cams, int64_t n_gauss, int64_t dim, int64_t width,  \
                                    int64_t height, int64_t tile_size, const T* v_render,         \
                                    const T* v_alpha, T* v_means2d, T* v_conics, T* v_opac,       \
                                    T* v_feats, int n_threads) {                                  \
    return run_backward(means2d, conics, opac, feats, flatten_ids, tile_offsets, n_isects,        \
                        n_cams, n_gauss, dim, width, height, tile_size, v_render, v_alpha,        \
                        v_means2d, v_conics, v_opac, v_feats, n_threads);                         \
  }

AVATAR_DEFINE(f32, float)
AVATAR_DEFINE(f64, double)

#undef AVATAR_DEFINE

}  // extern "C"
