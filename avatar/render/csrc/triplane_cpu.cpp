// CPU kernel of the tri-plane hash-grid encoding (forward and backward).
//
// Plain C++17 with a C ABI, no torch headers: compiled on first use with `c++ -O3 -shared` and
// loaded with ctypes (avatar/render/_triplane_kernels.py). It must match the PyTorch twin
// `_triplane_encode` of avatar/render/triplane.py in both passes:
//
//   plane p reads the coordinate axes (x, y), (y, z), (x, z) for p = 0, 1, 2;
//   at level l with R cells per side, pos = u * R, cell = min(trunc(pos), R - 1), frac = pos - cell;
//   corners c = 0..3 are (x0, y0), (x1, y0), (x0, y1), (x1, y1) with x1 = x0 + 1, y1 = y0 + 1,
//   weights (1-fx)(1-fy), fx(1-fy), (1-fx)fy, fx fy, computed in the coordinates' type, then cast
//   to the table's type;
//   dense levels (the first n_dense) index vertex (x, y) as x + y (R + 1), hashed levels as
//   (x ^ y * 2654435761) & (2^log2 - 1); both relative to the first row offsets[l][p];
//   out[m][p][l][:] = sum_c w_c table[row_c][:], accumulated in corner order.
//
// Instantiated for float and double, coordinates and table of one dtype (the templates keep the
// two types apart so that the casts sit where the twin has them), with F = 2 (the default width)
// as one 2-lane vector per row and any other F as a loop.
//
// One difference on invalid input only: the twin expects coordinates in [0, 1] (an index below
// zero makes torch raise); here the cell is also clamped below at 0 (and NaN maps to cell 0), so
// that no input can read or write outside the table.
//
// Threads (std::thread, as many as asked for and useful) take work from a shared counter, so a
// thread that another process slows down takes less of it:
//   * forward, and the position gradient alone: chunks of points (outputs are disjoint);
//   * table gradient: whole levels. The (level, plane) tables are disjoint row ranges, so the
//     thread that takes level l owns its rows and scatters into them without atomics, walking
//     the points in order. The position gradient, a sum over levels, is written per level into
//     a buffer [L, M, 3] and summed in level order afterwards.
// Every sum is therefore taken in the same order whatever the thread count and scheduling: the
// backward is bitwise deterministic. At most L threads share the table gradient.
//
// Points are processed in blocks of kBlock; within a block the loops run level, then point (its
// three axes located once, shared by the two planes that read each), so one level's tables stay
// in cache while the block's points read them.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kHashPrime = 2654435761u;  // instant-ngp's prime for y; x uses 1
constexpr int kAxes[3][2] = {{0, 1}, {1, 2}, {0, 2}};  // xy, yz, xz
constexpr int64_t kBlock = 256;  // points per block: the block's outputs (256 x 3 L F) stay in L2
constexpr int64_t kChunk = 4 * kBlock;  // points a thread takes at a time

template <typename TC, typename TE>
struct Args {
  const TC* coords;  // [M, 3]
  const TE* table;  // [E, F]
  const int64_t* res;  // [L]
  const int64_t* off;  // [L, 3]
  int64_t m;
  int64_t levels;
  int64_t feats;
  int64_t n_dense;
  uint32_t mask;
};

// A table row of two features as one 2-lane vector (GCC/clang vector extension: SSE2 on x86-64,
// NEON on arm64, scalars elsewhere): one load, multiply, add and store per corner instead of two.
// Lane-wise arithmetic, so the results are those of the scalar loop.
template <typename T>
struct PairOf;
template <>
struct PairOf<float> {
  typedef float type __attribute__((vector_size(8)));
};
template <>
struct PairOf<double> {
  typedef double type __attribute__((vector_size(16)));
};
template <typename T>
using Pair = typename PairOf<T>::type;

template <typename T>
inline Pair<T> load_pair(const T* p) {
  Pair<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_pair(T* p, Pair<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// One coordinate of one point at one level: its cell and the fraction across it.
template <typename TC>
struct Axis {
  int64_t cell;
  TC frac;
};

template <typename TC>
inline Axis<TC> axis_of(TC u, TC scale, TC last) {
  // pos = u R; cell = min(trunc(pos), R - 1) for pos >= 0, as the twin; 0 below zero and for
  // NaN (memory safety); frac = pos - cell. No floor(): a libm call on baseline x86-64.
  const TC pos = u * scale;
  TC q = pos > TC(0) ? pos : TC(0);
  q = q < last ? q : last;
  const int32_t cell = static_cast<int32_t>(q);
  return {cell, pos - static_cast<TC>(cell)};
}

// Rows of the 4 corners of cell (x, y), relative to the (level, plane)'s first row.
template <bool kDense>
inline void corner_rows(int64_t x, int64_t y, int64_t stride, uint32_t mask, int64_t row[4]) {
  if (kDense) {
    const int64_t base = x + y * stride;
    row[0] = base;
    row[1] = base + 1;
    row[2] = base + stride;
    row[3] = base + stride + 1;
  } else {  // the twin's int64 arithmetic has the same low bits as this uint32 one
    const uint32_t x0 = static_cast<uint32_t>(x), x1 = x0 + 1u;
    const uint32_t y0 = static_cast<uint32_t>(y) * kHashPrime, y1 = y0 + kHashPrime;
    row[0] = (x0 ^ y0) & mask;
    row[1] = (x1 ^ y0) & mask;
    row[2] = (x0 ^ y1) & mask;
    row[3] = (x1 ^ y1) & mask;
  }
}

template <typename TC>
inline void weights_of(TC fx, TC fy, TC w[4]) {
  const TC gx = TC(1) - fx, gy = TC(1) - fy;
  w[0] = gx * gy;
  w[1] = fx * gy;
  w[2] = gx * fy;
  w[3] = fx * fy;
}

// Forward of level l over points [m0, m1), all three planes.
template <typename TC, typename TE, int kF, bool kDense>
void forward_level(const Args<TC, TE>& a, int64_t l, int64_t m0, int64_t m1, TE* __restrict out) {
  const int64_t F = kF > 0 ? kF : a.feats;
  const int64_t res = a.res[l], stride = res + 1;
  const TC scale = static_cast<TC>(res), last = static_cast<TC>(res - 1);
  const TE* __restrict tab[3] = {a.table + a.off[l * 3] * F, a.table + a.off[l * 3 + 1] * F,
                                 a.table + a.off[l * 3 + 2] * F};
  const TC* __restrict coords = a.coords;
  const int64_t point_stride = 3 * a.levels * F, plane_stride = a.levels * F;
  for (int64_t m = m0; m < m1; ++m) {
    const Axis<TC> ax[3] = {axis_of(coords[m * 3], scale, last), axis_of(coords[m * 3 + 1], scale, last),
                            axis_of(coords[m * 3 + 2], scale, last)};
    TE* dst = out + m * point_stride + l * F;
#pragma GCC unroll 3  // constant plane axes: ax and the rows stay in registers
    for (int p = 0; p < 3; ++p) {
      const Axis<TC>& u = ax[kAxes[p][0]];
      const Axis<TC>& v = ax[kAxes[p][1]];
      int64_t row[4];
      corner_rows<kDense>(u.cell, v.cell, stride, a.mask, row);
      TC wc[4];
      weights_of(u.frac, v.frac, wc);
      const TE w0 = static_cast<TE>(wc[0]), w1 = static_cast<TE>(wc[1]);
      const TE w2 = static_cast<TE>(wc[2]), w3 = static_cast<TE>(wc[3]);
      const TE* e0 = tab[p] + row[0] * F;
      const TE* e1 = tab[p] + row[1] * F;
      const TE* e2 = tab[p] + row[2] * F;
      const TE* e3 = tab[p] + row[3] * F;
      TE* d = dst + p * plane_stride;
      if constexpr (kF == 2) {
        Pair<TE> acc = load_pair(e0) * w0;  // corner order, as the twin's addcmul chain
        acc += load_pair(e1) * w1;
        acc += load_pair(e2) * w2;
        acc += load_pair(e3) * w3;
        store_pair(d, acc);
      } else {
        for (int64_t f = 0; f < F; ++f) {
          TE acc = e0[f] * w0;
          acc += e1[f] * w1;
          acc += e2[f] * w2;
          acc += e3[f] * w3;
          d[f] = acc;
        }
      }
    }
  }
}

template <typename TC, typename TE, int kF>
void forward_points(const Args<TC, TE>& a, int64_t m0, int64_t m1, TE* out) {
  for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, m1);
    for (int64_t l = 0; l < a.levels; ++l) {
      if (l < a.n_dense) {
        forward_level<TC, TE, kF, true>(a, l, b0, b1, out);
      } else {
        forward_level<TC, TE, kF, false>(a, l, b0, b1, out);
      }
    }
  }
}

// Backward of level l over points [m0, m1): adds w_c * grad into the level's rows of gtable
// (kTable) and the position gradient into gpos[m - m0][0..3) (kPos).
template <typename TC, typename TE, int kF, bool kDense, bool kTable, bool kPos>
void backward_level(const Args<TC, TE>& a, int64_t l, int64_t m0, int64_t m1, const TE* __restrict grad,
                    TE* __restrict gtable, TC* __restrict gpos) {
  const int64_t F = kF > 0 ? kF : a.feats;
  const int64_t res = a.res[l], stride = res + 1;
  const TC scale = static_cast<TC>(res), last = static_cast<TC>(res - 1);
  int64_t first[3];
  for (int p = 0; p < 3; ++p) first[p] = a.off[l * 3 + p] * F;
  const TC* __restrict coords = a.coords;
  const TE* __restrict table = a.table;
  const int64_t point_stride = 3 * a.levels * F, plane_stride = a.levels * F;
  for (int64_t m = m0; m < m1; ++m) {
    const Axis<TC> ax[3] = {axis_of(coords[m * 3], scale, last), axis_of(coords[m * 3 + 1], scale, last),
                            axis_of(coords[m * 3 + 2], scale, last)};
    const TE* gm = grad + m * point_stride + l * F;
    TC dpos[3] = {TC(0), TC(0), TC(0)};
#pragma GCC unroll 3
    for (int p = 0; p < 3; ++p) {
      const int iu = kAxes[p][0], iv = kAxes[p][1];
      const Axis<TC>& u = ax[iu];
      const Axis<TC>& v = ax[iv];
      int64_t row[4];
      corner_rows<kDense>(u.cell, v.cell, stride, a.mask, row);
      const TE* g = gm + p * plane_stride;
      if (kPos) {
        TE gw[4];  // d out / d weight_c = <table[row_c], grad>
        if constexpr (kF == 2) {
          const Pair<TE> g2 = load_pair(g);
          for (int k = 0; k < 4; ++k) {
            const Pair<TE> prod = load_pair(table + first[p] + row[k] * 2) * g2;
            gw[k] = prod[0] + prod[1];
          }
        } else {
          for (int k = 0; k < 4; ++k) {
            const TE* e = table + first[p] + row[k] * F;
            TE s = e[0] * g[0];
            for (int64_t f = 1; f < F; ++f) s += e[f] * g[f];
            gw[k] = s;
          }
        }
        const TC g0 = static_cast<TC>(gw[0]), g1 = static_cast<TC>(gw[1]);
        const TC g2 = static_cast<TC>(gw[2]), g3 = static_cast<TC>(gw[3]);
        const TC fx = u.frac, fy = v.frac, gx = TC(1) - fx, gy = TC(1) - fy;
        dpos[iu] += scale * (gy * (g1 - g0) + fy * (g3 - g2));  // pos = u R; cell is constant
        dpos[iv] += scale * (gx * (g2 - g0) + fx * (g3 - g1));
      }
      if (kTable) {
        TC wc[4];
        weights_of(u.frac, v.frac, wc);
        if constexpr (kF == 2) {
          const Pair<TE> g2 = load_pair(g);
          for (int k = 0; k < 4; ++k) {
            TE* dst = gtable + first[p] + row[k] * 2;
            store_pair(dst, load_pair(dst) + static_cast<TE>(wc[k]) * g2);
          }
        } else {
          for (int k = 0; k < 4; ++k) {
            const TE w = static_cast<TE>(wc[k]);
            TE* dst = gtable + first[p] + row[k] * F;
            for (int64_t f = 0; f < F; ++f) dst[f] += w * g[f];
          }
        }
      }
    }
    if (kPos) {
      TC* gp = gpos + (m - m0) * 3;
      gp[0] += dpos[0];
      gp[1] += dpos[1];
      gp[2] += dpos[2];
    }
  }
}

template <typename TC, typename TE, int kF, bool kTable, bool kPos>
void backward_level_points(const Args<TC, TE>& a, int64_t l, int64_t m0, int64_t m1, const TE* grad, TE* gtable,
                           TC* gpos) {
  if (l < a.n_dense) {
    backward_level<TC, TE, kF, true, kTable, kPos>(a, l, m0, m1, grad, gtable, gpos);
  } else {
    backward_level<TC, TE, kF, false, kTable, kPos>(a, l, m0, m1, grad, gtable, gpos);
  }
}

// Runs fn() on n threads (the caller's among them). A thread that cannot be started is simply
// not there: the others take its share from the shared counter.
template <typename Fn>
void run_threads(int n, const Fn& fn) {
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) {
    try {
      pool.emplace_back(fn);
    } catch (const std::exception&) {
      break;
    }
  }
  fn();
  for (auto& th : pool) th.join();
}

// Calls body(c0, c1) for chunks [c0, c1) of [0, m), taken from a shared counter by n threads.
template <typename Body>
void for_chunks(int64_t m, int n, const Body& body) {
  std::atomic<int64_t> next{0};
  run_threads(n, [&]() {
    for (int64_t c = next.fetch_add(kChunk); c < m; c = next.fetch_add(kChunk)) body(c, std::min(c + kChunk, m));
  });
}

// Threads worth using for `work` (point, level, plane) items: one per 16k items at most (a thread
// costs tens of microseconds to start), unless `exact` (tests of the threaded paths on few points).
int thread_count(int requested, int64_t work, bool exact) {
  const int64_t useful = exact ? requested : std::max<int64_t>(1, work / 16384);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::min(requested, 256), useful)));
}

template <typename TC, typename TE, int kF>
void forward(const Args<TC, TE>& a, TE* out, int n) {
  for_chunks(a.m, n, [&](int64_t c0, int64_t c1) { forward_points<TC, TE, kF>(a, c0, c1, out); });
}

// Position gradient only: chunks of points, each point's sum over levels in level order.
template <typename TC, typename TE, int kF>
void backward_positions(const Args<TC, TE>& a, const TE* grad, TC* gcoords, int n) {
  for_chunks(a.m, n, [&](int64_t c0, int64_t c1) {
    std::fill(gcoords + c0 * 3, gcoords + c1 * 3, TC(0));
    for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const int64_t b1 = std::min(b0 + kBlock, c1);
      for (int64_t l = 0; l < a.levels; ++l) {
        backward_level_points<TC, TE, kF, false, true>(a, l, b0, b1, grad, nullptr, gcoords + b0 * 3);
      }
    }
  });
}

// Table gradient (and the position gradient when gcoords is set): whole levels per thread.
template <typename TC, typename TE, int kF>
void backward_levels(const Args<TC, TE>& a, const TE* grad, TE* gtable, TC* gcoords, int n) {
  const int64_t size = a.m * 3;
  std::unique_ptr<TC[]> per_level(gcoords != nullptr ? new TC[static_cast<size_t>(a.levels * size)] : nullptr);
  std::atomic<int64_t> next{0};
  run_threads(static_cast<int>(std::min<int64_t>(n, a.levels)), [&]() {
    for (int64_t k = next.fetch_add(1); k < a.levels; k = next.fetch_add(1)) {
      const int64_t l = a.levels - 1 - k;  // the finest levels first: hashed, they cost most
      TC* gp = per_level ? per_level.get() + l * size : nullptr;
      if (gp != nullptr) std::fill(gp, gp + size, TC(0));
      for (int64_t b0 = 0; b0 < a.m; b0 += kBlock) {
        const int64_t b1 = std::min(b0 + kBlock, a.m);
        if (gp != nullptr) {
          backward_level_points<TC, TE, kF, true, true>(a, l, b0, b1, grad, gtable, gp + b0 * 3);
        } else {
          backward_level_points<TC, TE, kF, true, false>(a, l, b0, b1, grad, gtable, nullptr);
        }
      }
    }
  });
  if (!per_level) return;
  const TC* buf = per_level.get();
  for_chunks(a.m, n, [&](int64_t c0, int64_t c1) {  // sum over levels, in level order
    for (int64_t i = c0 * 3; i < c1 * 3; ++i) gcoords[i] = buf[i];
    for (int64_t l = 1; l < a.levels; ++l) {
      const TC* src = buf + l * size;
      for (int64_t i = c0 * 3; i < c1 * 3; ++i) gcoords[i] += src[i];
    }
  });
}

template <typename TC, typename TE, int kF>
void backward(const Args<TC, TE>& a, const TE* grad, TE* gtable, TC* gcoords, int n) {
  if (gtable != nullptr) {
    backward_levels<TC, TE, kF>(a, grad, gtable, gcoords, n);
  } else if (gcoords != nullptr) {
    backward_positions<TC, TE, kF>(a, grad, gcoords, n);
  }
}

template <typename TC, typename TE>
bool make_args(Args<TC, TE>& a, const TC* coords, const TE* table, const int64_t* res, const int64_t* off,
               int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2_hashmap_size,
               int64_t n_rows) {
  if (m < 0 || levels < 1 || feats < 1 || n_dense < 0 || n_dense > levels || log2_hashmap_size < 1 ||
      log2_hashmap_size > 30) {
    return false;
  }
  for (int64_t l = 0; l < levels; ++l) {  // every row any point can reach lies in the table
    if (res[l] < 1 || res[l] > (int64_t(1) << 30)) return false;
    if (l < n_dense && (res[l] + 1) * (res[l] + 1) > (int64_t(1) << 31)) return false;
    const int64_t rows = l < n_dense ? (res[l] + 1) * (res[l] + 1) : int64_t(1) << log2_hashmap_size;
    for (int p = 0; p < 3; ++p) {
      if (off[l * 3 + p] < 0 || off[l * 3 + p] > n_rows - rows) return false;
    }
  }
  a = Args<TC, TE>{coords, table, res, off, m, levels, feats, n_dense,
                   static_cast<uint32_t>((int64_t(1) << log2_hashmap_size) - 1)};
  return true;
}

template <typename TC, typename TE>
int forward_entry(const TC* coords, const TE* table, const int64_t* res, const int64_t* off, int64_t m,
                  int64_t levels, int64_t feats, int64_t n_dense, int64_t log2, int64_t n_rows, TE* out,
                  int n_threads, int exact_threads) {
  Args<TC, TE> a;
  if (!make_args(a, coords, table, res, off, m, levels, feats, n_dense, log2, n_rows)) return 1;
  const int n = thread_count(n_threads, m * levels * 3, exact_threads != 0);
  try {
    if (feats == 2) {  // the default; other widths take the loop over a runtime F
      forward<TC, TE, 2>(a, out, n);
    } else {
      forward<TC, TE, 0>(a, out, n);
    }
  } catch (...) {
    return 2;
  }
  return 0;
}

template <typename TC, typename TE>
int backward_entry(const TC* coords, const TE* table, const int64_t* res, const int64_t* off, int64_t m,
                   int64_t levels, int64_t feats, int64_t n_dense, int64_t log2, int64_t n_rows, const TE* grad,
                   TE* gtable, TC* gcoords, int n_threads, int exact_threads) {
  Args<TC, TE> a;
  if (!make_args(a, coords, table, res, off, m, levels, feats, n_dense, log2, n_rows)) return 1;
  const int n = thread_count(n_threads, m * levels * 3, exact_threads != 0);
  try {
    if (feats == 2) {
      backward<TC, TE, 2>(a, grad, gtable, gcoords, n);
    } else {
      backward<TC, TE, 0>(a, grad, gtable, gcoords, n);
    }
  } catch (...) {
    return 2;
  }
  return 0;
}

}  // namespace

extern "C" {

int avatar_triplane_abi_version() { return 1; }

// coords [M, 3], table [E = n_rows, F], res [L], off [L, 3] (int64), all contiguous.
// Forward: out [M, 3, L, F] (written). Backward: grad [M, 3, L, F]; grad_table [E, F] is
// accumulated into (skipped when null); grad_coords [M, 3] is written (skipped when null).
// n_threads: at most that many threads, fewer on small inputs unless exact_threads is nonzero.
// Both return 0, 1 on invalid sizes or a layout that reaches outside the table (nothing
// written), 2 on an internal failure.
#define AVATAR_TRIPLANE_ENTRIES(TC, TE, SUFFIX)                                                                  \
  int avatar_triplane_fwd_##SUFFIX(const TC* coords, const TE* table, const int64_t* res, const int64_t* off,    \
                                   int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2,     \
                                   int64_t n_rows, TE* out, int n_threads, int exact_threads) {                 \
    return forward_entry<TC, TE>(coords, table, res, off, m, levels, feats, n_dense, log2, n_rows, out,         \
                                 n_threads, exact_threads);                                                     \
  }                                                                                                             \
  int avatar_triplane_bwd_##SUFFIX(const TC* coords, const TE* table, const int64_t* res, const int64_t* off,    \
                                   int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2,     \
                                   int64_t n_rows, const TE* grad, TE* grad_table, TC* grad_coords,             \
                                   int n_threads, int exact_threads) {                                          \
    return backward_entry<TC, TE>(coords, table, res, off, m, levels, feats, n_dense, log2, n_rows, grad,       \
                                  grad_table, grad_coords, n_threads, exact_threads);                           \
  }

AVATAR_TRIPLANE_ENTRIES(float, float, f32)
AVATAR_TRIPLANE_ENTRIES(double, double, f64)

#undef AVATAR_TRIPLANE_ENTRIES

}  // extern "C"
