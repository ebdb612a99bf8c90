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
// unrolled and any other F as a loop.
//
// One difference on invalid input only: the twin expects coordinates in [0, 1] (an index below
// zero makes torch raise); here the cell is also clamped below at 0 (and NaN maps to cell 0), so
// that no input can read or write outside the table.
//
// Work is split over std::threads by point. The backward's scatter-add into the table is made
// race-free and deterministic (for a given thread count) in one of two ways:
//   * partial tables: each thread adds into its own zeroed copy of the table (thread 0 into the
//     output), then the copies are summed row range by row range in thread order. One pass over
//     the points gives both gradients. Used when the copies are cheap next to the scatter itself.
//   * ownership: the (level, plane) tables are disjoint row ranges, so thread t owns the pairs
//     k = l * 3 + p with k % T == t and walks all points for those; the position gradient, a sum
//     over all pairs, then takes a second pass split by point. Used for big tables and few points.
//
// Points are processed in blocks of kBlock; within a block the loops run level, then point (its
// three axes located once, shared by the two planes that read each), so one level's tables stay
// in cache while the block's points read them.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kHashPrime = 2654435761u;  // instant-ngp's prime for y; x uses 1
constexpr int kAxes[3][2] = {{0, 1}, {1, 2}, {0, 2}};  // xy, yz, xz
constexpr int64_t kBlock = 256;  // points per block: the block's outputs (256 x 3 L F) stay in L2

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

// One coordinate of one point at one level: its cell and the fraction across it.
template <typename TC>
struct Axis {
  int64_t cell;
  TC frac;
};

template <typename TC>
inline Axis<TC> axis_of(TC u, TC scale, TC last) {
  // pos = u R; cell = min(trunc(pos), R - 1) for pos >= 0, as the twin; 0 below zero and for
  // NaN (memory safety); frac = pos - cell
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
  } else {
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

// Forward of level l over points [m0, m1), all three planes. A point's three axes are located
// once per level and shared by the two planes that read each of them.
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
#pragma GCC unroll 3  // constant plane axes: dpos and ax stay in registers
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
      for (int64_t f = 0; f < F; ++f) {
        TE acc = e0[f] * w0;  // corner order, as the twin's addcmul chain
        acc += e1[f] * w1;
        acc += e2[f] * w2;
        acc += e3[f] * w3;
        d[f] = acc;
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

// Backward of level l over points [m0, m1), for the planes whose bit is set in `planes`: adds
// w_c * grad into the rows of gtable (kTable) and the position gradient into gpos[m - m0][0..3)
// (kPos).
template <typename TC, typename TE, int kF, bool kDense, bool kTable, bool kPos>
void backward_level(const Args<TC, TE>& a, int64_t l, int64_t m0, int64_t m1, unsigned planes,
                    const TE* __restrict grad, TE* __restrict gtable, TC* __restrict gpos) {
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
      if (!((planes >> p) & 1u)) continue;
      const int iu = kAxes[p][0], iv = kAxes[p][1];
      const Axis<TC>& u = ax[iu];
      const Axis<TC>& v = ax[iv];
      int64_t row[4];
      corner_rows<kDense>(u.cell, v.cell, stride, a.mask, row);
      const TE* g = gm + p * plane_stride;
      if (kPos) {
        TE gw[4];  // d out / d weight_c = <table[row_c], grad>
        for (int k = 0; k < 4; ++k) {
          const TE* e = table + first[p] + row[k] * F;
          TE s = e[0] * g[0];
          for (int64_t f = 1; f < F; ++f) s += e[f] * g[f];
          gw[k] = s;
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
        for (int k = 0; k < 4; ++k) {
          const TE w = static_cast<TE>(wc[k]);
          TE* dst = gtable + first[p] + row[k] * F;
          for (int64_t f = 0; f < F; ++f) dst[f] += w * g[f];
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

// Backward over points [m0, m1), for the (level, plane) pairs with owned[l * 3 + p] != 0 (all
// when owned is null). Writes grad_coords[m0:m1] when kPos.
template <typename TC, typename TE, int kF, bool kTable, bool kPos>
void backward_points(const Args<TC, TE>& a, int64_t m0, int64_t m1, const TE* grad, TE* gtable, TC* gcoords,
                     const char* owned) {
  TC gpos[kBlock * 3];
  for (int64_t b0 = m0; b0 < m1; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, m1);
    if (kPos) std::fill(gpos, gpos + (b1 - b0) * 3, TC(0));
    for (int64_t l = 0; l < a.levels; ++l) {
      unsigned planes = 7u;
      if (owned != nullptr) {
        planes = (owned[l * 3] ? 1u : 0u) | (owned[l * 3 + 1] ? 2u : 0u) | (owned[l * 3 + 2] ? 4u : 0u);
        if (planes == 0) continue;
      }
      if (l < a.n_dense) {
        backward_level<TC, TE, kF, true, kTable, kPos>(a, l, b0, b1, planes, grad, gtable, gpos);
      } else {
        backward_level<TC, TE, kF, false, kTable, kPos>(a, l, b0, b1, planes, grad, gtable, gpos);
      }
    }
    if (kPos) std::copy(gpos, gpos + (b1 - b0) * 3, gcoords + b0 * 3);
  }
}

// Runs fn(t) for t in [0, n) on n threads (the caller's thread is t = 0). A failure to start a
// thread runs its share on the caller's thread instead.
template <typename Fn>
void run_threads(int n, Fn&& fn) {
  std::vector<std::thread> pool;
  std::vector<int> serial;
  for (int t = 1; t < n; ++t) {
    try {
      pool.emplace_back(fn, t);
    } catch (const std::exception&) {
      serial.push_back(t);
    }
  }
  fn(0);
  for (int t : serial) fn(t);
  for (auto& th : pool) th.join();
}

// Threads worth using for `work` (point, level, plane) items: one per 16k items at most (a
// thread costs tens of microseconds to start), unless `exact` (tests of the threaded paths).
int thread_count(int requested, int64_t work, bool exact) {
  const int64_t useful = exact ? requested : std::max<int64_t>(1, work / 16384);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::min(requested, 256), useful)));
}

template <typename TC, typename TE, int kF>
void forward(const Args<TC, TE>& a, TE* out, int n_threads) {
  const int n = thread_count(n_threads, a.m * a.levels * 3, false);
  run_threads(n, [&](int t) {
    forward_points<TC, TE, kF>(a, a.m * t / n, a.m * (t + 1) / n, out);
  });
}

template <typename TC, typename TE, int kF, bool kPos>
void backward_partial(const Args<TC, TE>& a, int64_t n_rows, const TE* grad, TE* gtable, TC* gcoords, int n) {
  const int64_t size = n_rows * a.feats;
  std::vector<TE> partial(static_cast<size_t>(size) * (n - 1));
  run_threads(n, [&](int t) {
    TE* mine = gtable;
    if (t > 0) {
      mine = partial.data() + size * (t - 1);
      std::fill(mine, mine + size, TE(0));  // first touch by the thread that uses it
    }
    backward_points<TC, TE, kF, true, kPos>(a, a.m * t / n, a.m * (t + 1) / n, grad, mine, gcoords, nullptr);
  });
  if (n == 1) return;
  run_threads(n, [&](int t) {  // sum the copies into the output, rows split by thread
    const int64_t r0 = size * t / n, r1 = size * (t + 1) / n;
    for (int k = 0; k + 1 < n; ++k) {
      const TE* src = partial.data() + size * k;
      for (int64_t i = r0; i < r1; ++i) gtable[i] += src[i];
    }
  });
}

template <typename TC, typename TE, int kF>
void backward_owned(const Args<TC, TE>& a, const TE* grad, TE* gtable, int n) {
  const int64_t pairs = a.levels * 3;
  n = static_cast<int>(std::min<int64_t>(n, pairs));
  std::vector<std::vector<char>> owned(n, std::vector<char>(pairs, 0));
  for (int64_t k = 0; k < pairs; ++k) owned[k % n][k] = 1;
  run_threads(n, [&](int t) {
    backward_points<TC, TE, kF, true, false>(a, 0, a.m, grad, gtable, nullptr, owned[t].data());
  });
}

template <typename TC, typename TE, int kF>
void backward(const Args<TC, TE>& a, int64_t n_rows, const TE* grad, TE* gtable, TC* gcoords, int n_threads,
              int strategy) {
  const int n = thread_count(n_threads, a.m * a.levels * 3, strategy != 0);
  if (gtable != nullptr) {
    // Partial tables cost a zeroing and a summing pass over (n - 1) table copies; worth it while
    // that streams no more than about twice the rows the scatter touches at random.
    const bool partial = strategy == 1 || (strategy == 0 && (n - 1) * n_rows <= 2 * a.m * a.levels * 3 &&
                                           (n - 1) * n_rows * a.feats * static_cast<int64_t>(sizeof(TE)) <=
                                               (int64_t(1) << 30));
    if (partial || n == 1) {
      if (gcoords != nullptr) {
        backward_partial<TC, TE, kF, true>(a, n_rows, grad, gtable, gcoords, n);
      } else {
        backward_partial<TC, TE, kF, false>(a, n_rows, grad, gtable, nullptr, n);
      }
      return;
    }
    backward_owned<TC, TE, kF>(a, grad, gtable, n);
  }
  if (gcoords != nullptr) {
    run_threads(n, [&](int t) {
      backward_points<TC, TE, kF, false, true>(a, a.m * t / n, a.m * (t + 1) / n, grad, nullptr, gcoords,
                                               nullptr);
    });
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
                  int n_threads) {
  Args<TC, TE> a;
  if (!make_args(a, coords, table, res, off, m, levels, feats, n_dense, log2, n_rows)) return 1;
  try {
    if (feats == 2) {  // the default; other widths take the loop over a runtime F
      forward<TC, TE, 2>(a, out, n_threads);
    } else {
      forward<TC, TE, 0>(a, out, n_threads);
    }
  } catch (...) {
    return 2;
  }
  return 0;
}

template <typename TC, typename TE>
int backward_entry(const TC* coords, const TE* table, const int64_t* res, const int64_t* off, int64_t m,
                   int64_t levels, int64_t feats, int64_t n_dense, int64_t log2, int64_t n_rows, const TE* grad,
                   TE* gtable, TC* gcoords, int n_threads, int strategy) {
  Args<TC, TE> a;
  if (!make_args(a, coords, table, res, off, m, levels, feats, n_dense, log2, n_rows) || strategy < 0 ||
      strategy > 2) {
    return 1;
  }
  try {
    if (feats == 2) {
      backward<TC, TE, 2>(a, n_rows, grad, gtable, gcoords, n_threads, strategy);
    } else {
      backward<TC, TE, 0>(a, n_rows, grad, gtable, gcoords, n_threads, strategy);
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
// strategy: 0 auto, 1 partial tables, 2 ownership by (level, plane) (see the top of the file);
// a forced strategy uses exactly n_threads threads. Both return 0, 1 on invalid sizes or a
// layout that reaches outside the table (nothing written), 2 on an internal failure.
#define AVATAR_TRIPLANE_ENTRIES(TC, TE, SUFFIX)                                                                  \
  int avatar_triplane_fwd_##SUFFIX(const TC* coords, const TE* table, const int64_t* res, const int64_t* off,    \
                                   int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2,     \
                                   int64_t n_rows, TE* out, int n_threads) {                                    \
    return forward_entry<TC, TE>(coords, table, res, off, m, levels, feats, n_dense, log2, n_rows, out,         \
                                 n_threads);                                                                    \
  }                                                                                                             \
  int avatar_triplane_bwd_##SUFFIX(const TC* coords, const TE* table, const int64_t* res, const int64_t* off,    \
                                   int64_t m, int64_t levels, int64_t feats, int64_t n_dense, int64_t log2,     \
                                   int64_t n_rows, const TE* grad, TE* grad_table, TC* grad_coords,             \
                                   int n_threads, int strategy) {                                               \
    return backward_entry<TC, TE>(coords, table, res, off, m, levels, feats, n_dense, log2, n_rows, grad,       \
                                  grad_table, grad_coords, n_threads, strategy);                                \
  }

AVATAR_TRIPLANE_ENTRIES(float, float, f32)
AVATAR_TRIPLANE_ENTRIES(double, double, f64)

#undef AVATAR_TRIPLANE_ENTRIES

}  // extern "C"
