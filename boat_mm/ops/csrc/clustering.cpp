// Copyright (c) boat-mm contributors. All rights reserved.
//
// CPU kernel of boat_mm::balanced_clustering: the balanced hierarchical
// clustering of feature-space local attention (FSLA), fused per tree node.
//
// It computes what the tensor implementation in boat_mm/ops/clustering.py
// computes (its docstrings give the rule), but each node of a level is one
// task that makes few passes over its tokens (in cache when the node fits):
// one per soft k-means iteration (similarities, weights and centroid sums
// fused), one for the final ratios, a radix sort, and the move of its
// tokens into the two children, after which the children's initial
// centroids are summed while they are in cache. Vectors are stored token
// by token, so a move is a few vector copies per token. The tensor
// implementation reads every token six times per level, in batched
// matmuls with two output rows.
//
// The arithmetic is the same; sums are accumulated in a different order,
// so float32 results agree up to rounding (a near-tie may rank two tokens
// the other way) and float64 results agree exactly in practice. The result
// is deterministic: every node is computed by one thread in a fixed order.
//
// Only the CPU kernel is registered here: the schema, the fake (shape)
// kernel and the other devices' kernels are registered from Python
// (boat_mm/ops/_library.py), whether or not this library is built.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"

namespace boat_mm {
namespace {

using simd::Simd;
using simd::exp_nonpositive;
#if BOAT_MM_X86_DISPATCH
using simd::cpu_has_avx2_fma;
#endif

// Real-token count of the leaves [first, first + count) of the tree: the
// first `extra` leaves hold `base + 1` tokens, the others `base`.
int64_t leaves_size(int64_t first, int64_t count, int64_t base,
                    int64_t extra) {
  const int64_t bonus =
      std::max<int64_t>(0, std::min(extra, first + count) - first);
  return count * base + bonus;
}

// Sort entries: the ratio's bit pattern (ordered like the value for the
// non-negative ratios, and like the tensor implementation's integer sort
// for anything else) with the position as tie-break, so that an unstable
// sort gives the stable order. float: both packed in one 64-bit integer.
template <typename T>
struct SortEntry;

// The ratio's bits without the sign: -0 ties with 0, and a 0/0 NaN
// (either sign, by platform) ranks after inf, as torch.sort ranks NaN; the
// same keys as the tensor and Triton implementations.
BOAT_MM_INLINE uint32_t magnitude_bits(int32_t bits) {
  return static_cast<uint32_t>(bits) & 0x7fffffffu;
}

template <>
struct SortEntry<float> {
  using type = uint64_t;
  static BOAT_MM_INLINE type make(float r, int64_t i) {
    int32_t bits;
    std::memcpy(&bits, &r, sizeof(bits));
    // Without the sign bit (see `magnitude_bits`), flipped on: the
    // signed order of the bits as unsigned order.
    const uint32_t key = magnitude_bits(bits) ^ 0x80000000u;
    return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(i);
  }
  static BOAT_MM_INLINE int64_t index(type e) {
    return static_cast<int64_t>(e & 0xffffffffu);
  }
};

template <>
struct SortEntry<double> {
  using type = std::pair<int64_t, int64_t>;
  static BOAT_MM_INLINE type make(double r, int64_t i) {
    int64_t bits;
    std::memcpy(&bits, &r, sizeof(bits));
    return {bits & std::numeric_limits<int64_t>::max(), i};
  }
  static BOAT_MM_INLINE int64_t index(const type& e) { return e.second; }
};

// Sorts packed float entries (key in the high 32 bits, position in the
// low ones, so all distinct): an LSD radix sort over the key bytes, stable,
// hence the same order as sorting the whole 64-bit values. Bytes equal
// across all entries are skipped. `tmp` holds at least `n` entries.
void radix_sort_packed(uint64_t* a, uint64_t* tmp, int64_t n) {
  constexpr int kPasses = 4;
  int64_t count[kPasses][256] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = static_cast<uint32_t>(a[i] >> 32);
    for (int p = 0; p < kPasses; ++p) ++count[p][(key >> (8 * p)) & 255];
  }
  uint64_t* src = a;
  uint64_t* dst = tmp;
  for (int p = 0; p < kPasses; ++p) {
    int64_t* c = count[p];
    if (c[(static_cast<uint32_t>(src[0] >> 32) >> (8 * p)) & 255] == n) {
      continue;  // every entry has this byte: nothing to reorder
    }
    int64_t offset = 0;
    for (int b = 0; b < 256; ++b) {
      const int64_t k = c[b];
      c[b] = offset;
      offset += k;
    }
    const int shift = 32 + 8 * p;
    for (int64_t i = 0; i < n; ++i) dst[c[(src[i] >> shift) & 255]++] = src[i];
    std::swap(src, dst);
  }
  if (src != a) std::copy(src, src + n, a);
}

template <typename T>
void sort_entries(std::vector<typename SortEntry<T>::type>& order,
                  std::vector<typename SortEntry<T>::type>& tmp) {
  if constexpr (std::is_same_v<T, float>) {
    // The radix sort pays from a few hundred entries on.
    if (order.size() >= 256) {
      tmp.resize(order.size());
      radix_sort_packed(order.data(), tmp.data(), order.size());
      return;
    }
  }
  std::sort(order.begin(), order.end());
}

// A node's vectors are stored token-major, (cap, dp), with the dimension
// d rounded up to dp = a multiple of 8 (zeros): moving a token into a
// child is a copy of a few vectors (in a dimension-major layout it would be
// d scattered scalar loads), and the similarities of a block of 8 tokens
// to a centroid end in one vector reduction. Every token's sums run in a
// fixed order that does not depend on its position in a block, so equal
// tokens get equal ratios, and results do not depend on the thread count.
constexpr int64_t kDimAlign = 8;  // a multiple of every vector width used
constexpr int64_t kBlock = 8;     // tokens per similarity block

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define BOAT_MM_HAS_SHUFFLEVECTOR 1
#else
#define BOAT_MM_HAS_SHUFFLEVECTOR 0
#endif

// sum_k a[t][k] * c[k] for the 8 tokens t of a block (rows of stride dp).
template <typename T, int Bytes>
BOAT_MM_INLINE void dot_block(const T* U, int64_t dp, const T* c, T* out) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  V a[kBlock];
  for (int t = 0; t < kBlock; ++t) a[t] = V{};
  for (int64_t v = 0; v < dp; v += W) {
    const V x = S::load(c + v);
    for (int t = 0; t < kBlock; ++t) a[t] += S::load(U + t * dp + v) * x;
  }
#if BOAT_MM_HAS_SHUFFLEVECTOR
  if constexpr (W == 8) {
    // Eight 8-lane sums at once: a tree of pairwise lane additions.
    auto hadd = [](V x, V y) {
      return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
             __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    const V h0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));
    const V h1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
    S::store(out, __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
                      __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13,
                                              14, 15));
    return;
  }
#endif
  for (int t = 0; t < kBlock; ++t) out[t] = S::sum(a[t]);
}

// sim_c[i] = <U[i], c> for the tokens i < n of a node (sim arrays hold
// n rounded up to 8). A last partial block is copied into `tail` (8 * dp,
// zero past its tokens), so that no token's sum depends on its block.
template <typename T, int Bytes>
BOAT_MM_INLINE void similarities(const T* U, int64_t dp, int64_t n,
                                 const T* c0, const T* c1, T* sim0, T* sim1,
                                 T* tail) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    dot_block<T, Bytes>(U + i * dp, dp, c0, sim0 + i);
    dot_block<T, Bytes>(U + i * dp, dp, c1, sim1 + i);
  }
  if (i < n) {
    std::copy(U + i * dp, U + n * dp, tail);
    std::fill(tail + (n - i) * dp, tail + kBlock * dp, T(0));
    dot_block<T, Bytes>(tail, dp, c0, sim0 + i);
    dot_block<T, Bytes>(tail, dp, c1, sim1 + i);
  }
}

// s_c += sum_{i < n} w_c[i] * U[i] (vectors of dp), tokens in order,
// with the DV vectors of both sums held in registers: a token's vectors
// update 2 * DV independent sums (one running sum per vector would be
// bound by the multiply-add latency).
template <typename T, int Bytes, int DV>
BOAT_MM_INLINE void accumulate_fixed(const T* U, int64_t n, const T* w0,
                                     const T* w1, T* s0, T* s1) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes, dp = DV * W;
  V a[DV], b[DV];
  for (int v = 0; v < DV; ++v) {
    a[v] = S::load(s0 + v * W);
    b[v] = S::load(s1 + v * W);
  }
  for (int64_t i = 0; i < n; ++i) {
    const T x0 = w0[i], x1 = w1[i];
    for (int v = 0; v < DV; ++v) {
      const V u = S::load(U + i * dp + v * W);
      a[v] += x0 * u;
      b[v] += x1 * u;
    }
  }
  for (int v = 0; v < DV; ++v) {
    S::store(s0 + v * W, a[v]);
    S::store(s1 + v * W, b[v]);
  }
}

// The same sums for any dp (the same order, so the same result).
template <typename T, int Bytes>
BOAT_MM_INLINE void accumulate(const T* U, int64_t dp, int64_t n,
                               const T* w0, const T* w1, T* s0, T* s1) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  switch (dp / W) {
    case 1: return accumulate_fixed<T, Bytes, 1>(U, n, w0, w1, s0, s1);
    case 2: return accumulate_fixed<T, Bytes, 2>(U, n, w0, w1, s0, s1);
    case 3: return accumulate_fixed<T, Bytes, 3>(U, n, w0, w1, s0, s1);
    case 4: return accumulate_fixed<T, Bytes, 4>(U, n, w0, w1, s0, s1);
    case 6: return accumulate_fixed<T, Bytes, 6>(U, n, w0, w1, s0, s1);
    default: break;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    for (int64_t v = 0; v < dp; v += W) {
      V a = S::load(s0 + v), b = S::load(s1 + v);
      for (int64_t i = i0; i < i1; ++i) {
        const V u = S::load(U + i * dp + v);
        a += w0[i] * u;
        b += w1[i] * u;
      }
      S::store(s0 + v, a);
      S::store(s1 + v, b);
    }
  }
}

// Weights of the initial centroids of a node whose first n0 of n real
// tokens go to child 0: the means of both parts (norm * unit / count).
template <typename T>
BOAT_MM_INLINE void init_weights(const T* norm, int64_t n, int64_t n0,
                                 T* w0, T* w1) {
  const T inv0 = T(1) / T(std::max<int64_t>(n0, 1));
  const T inv1 = T(1) / T(std::max<int64_t>(n - n0, 1));
  for (int64_t i = 0; i < n; ++i) {
    w0[i] = i < n0 ? inv0 * norm[i] : T(0);
    w1[i] = i < n0 ? T(0) : inv1 * norm[i];
  }
}

// Soft-assignment weights times norms: softmax over two centroids is the
// sigmoid of the scaled similarity difference; one exp of a non-positive
// argument gives both sigmoid(|l|) and sigmoid(-|l|) without overflow.
template <typename T>
BOAT_MM_INLINE void weight_one(T sim0, T sim1, T norm, T temperature,
                               T& w0, T& w1) {
  const T logit = (sim0 - sim1) * temperature;
  const T e = std::exp(-std::abs(logit));
  const T big = T(1) / (T(1) + e), small = e * big;
  const bool first = logit >= T(0);
  w0 = (first ? big : small) * norm;
  w1 = (first ? small : big) * norm;
}

// The weights of the n <= 8 tokens of a block.
template <typename T, int Bytes>
BOAT_MM_INLINE void block_weights(const T* sim0, const T* sim1,
                                  const T* norm, int64_t n, T temperature,
                                  T* w0, T* w1) {
  if constexpr (std::is_same_v<T, float>) {
    // float: vector exp (all lanes; those past n are not used).
    // float64 (the parity checks) keeps libm's exp.
    using S = Simd<float, Bytes>;
    using V = typename S::V;
    float nrm[kBlock] = {};
    std::copy(norm, norm + n, nrm);
    for (int64_t i = 0; i < kBlock; i += S::kLanes) {
      const V logit = (S::load(sim0 + i) - S::load(sim1 + i)) * temperature;
      const auto first = logit >= 0.0f;
      const V e = exp_nonpositive<Bytes>(first ? -logit : logit);
      const V big = 1.0f / (1.0f + e), small = e * big;
      const V nv = S::load(nrm + i);
      S::store(w0 + i, (first ? big : small) * nv);
      S::store(w1 + i, (first ? small : big) * nv);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      weight_one(sim0[i], sim1[i], norm[i], temperature, w0[i], w1[i]);
    }
  }
}

// One soft k-means step in a single pass over the node: per block of 8
// tokens, the similarities to (c0, c1), the weights, and the weighted sums
// of the same (cached) vectors; (s0, s1) become the new unnormalised
// centroids.
template <typename T, int Bytes>
BOAT_MM_INLINE void kmeans_step(const T* U, int64_t dp, int64_t n,
                                const T* c0, const T* c1, const T* norm,
                                T temperature, T* s0, T* s1, T* tail) {
  std::fill(s0, s0 + dp, T(0));
  std::fill(s1, s1 + dp, T(0));
  alignas(64) T sim0[kBlock], sim1[kBlock], w0[kBlock], w1[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    similarities<T, Bytes>(U + i * dp, dp, m, c0, c1, sim0, sim1, tail);
    block_weights<T, Bytes>(sim0, sim1, norm + i, m, temperature, w0, w1);
    accumulate<T, Bytes>(U + i * dp, dp, m, w0, w1, s0, s1);
  }
}

// x / max(||x||, 1e-12), as torch.nn.functional.normalize.
template <typename T>
BOAT_MM_INLINE void normalize(T* x, int64_t d) {
  T sq = 0;
  for (int64_t k = 0; k < d; ++k) sq += x[k] * x[k];
  const T nrm = std::max<T>(std::sqrt(sq), T(1e-12));
  for (int64_t k = 0; k < d; ++k) x[k] /= nrm;
}

struct NodeArgs {
  int64_t dp;         // padded dimension
  int64_t n;          // real tokens in the node (they come first)
  int64_t n0;         // real tokens that go to child 0
  int64_t half;       // slots per child
  int64_t pad_token;  // token index written into padding slots
  int64_t kmeans_iters;
  bool last_level;    // only the permutation is needed afterwards
  int64_t child_n0[2];  // next level: real tokens of each child's child 0
};

// Per-thread scratch space, sized for the largest node of a level.
template <typename T>
struct Scratch {
  std::vector<T> cent, sim0, sim1, w0, w1, tail;
  std::vector<int64_t> src;
  std::vector<typename SortEntry<T>::type> order, sort_tmp;
  Scratch(int64_t dp, int64_t cap)
      : cent(4 * dp),
        sim0(cap + kBlock),
        sim1(cap + kBlock),
        w0(cap),
        w1(cap),
        tail(kBlock * dp),
        src(cap) {
    order.reserve(cap);
  }
};

// Split one node: `U` ((cap, dp) unit vectors, the first `n` tokens real)
// into its two (half, dp) children in `next_U` (the same slots of the other
// buffer), with their norms in `next_norm`. `init` holds the node's
// initial centroid sums when the parent computed them (nullptr at the
// root); the children's go to `child_init`.
template <typename T, int Bytes>
BOAT_MM_INLINE void split_node_impl(const T* U, T* next_U, const T* norm,
                                    const int64_t* perm, T* next_norm,
                                    int64_t* next_perm, const T* init,
                                    T* child_init, const NodeArgs& args,
                                    T temperature, Scratch<T>& s) {
  const int64_t dp = args.dp, n = args.n, n0 = args.n0, half = args.half;
  T* c0 = s.cent.data();
  T* c1 = c0 + dp;
  T *w0 = s.w0.data(), *w1 = s.w1.data();
  T *sim0 = s.sim0.data(), *sim1 = s.sim1.data();

  // Initial centroids: means of the first n0 and of the remaining real
  // tokens in the current order, normalised.
  if (init != nullptr) {
    std::copy(init, init + 2 * dp, c0);
  } else {
    init_weights(norm, n, n0, w0, w1);
    std::fill(c0, c0 + 2 * dp, T(0));
    accumulate<T, Bytes>(U, dp, n, w0, w1, c0, c1);
  }
  normalize(c0, dp);
  normalize(c1, dp);

  // Soft k-means with two centroids.
  for (int64_t it = 0; it < args.kmeans_iters; ++it) {
    kmeans_step<T, Bytes>(U, dp, n, c0, c1, norm, temperature, c0 + 2 * dp,
                          c1 + 2 * dp, s.tail.data());
    std::copy(c0 + 2 * dp, c0 + 4 * dp, c0);
    normalize(c0, dp);
    normalize(c1, dp);
  }

  // Rank the real tokens by r = (s0 + 1) / (s1 + 1), ties by position (a
  // stable sort); padding is not ranked: it goes last in both children.
  similarities<T, Bytes>(U, dp, n, c0, c1, sim0, sim1, s.tail.data());
  auto& order = s.order;
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    T r = (sim0[i] + T(1)) / (sim1[i] + T(1));
    r = r < T(0) ? T(0) : r;  // NaN passes through, as torch.clamp
    order[i] = SortEntry<T>::make(r, i);
  }
  sort_entries<T>(order, s.sort_tmp);

  // Child 0: ranks [0, n0), then padding; child 1: ranks [n0, n), then
  // padding. Tokens keep their ascending-ratio order.
  int64_t* src = s.src.data();  // child c's sources at [c * half, ...)
  for (int64_t child = 0; child < 2; ++child) {
    const int64_t first = child == 0 ? 0 : n0;
    const int64_t count = child == 0 ? n0 : n - n0;
    int64_t* csrc = src + child * half;
    for (int64_t j = 0; j < count; ++j) {
      csrc[j] = SortEntry<T>::index(order[first + j]);
    }
    int64_t* out_perm = next_perm + child * half;
    for (int64_t j = 0; j < half; ++j) {
      out_perm[j] = j < count ? perm[csrc[j]] : args.pad_token;
    }
    if (args.last_level) continue;
    T* out_norm = next_norm + child * half;
    for (int64_t j = 0; j < count; ++j) out_norm[j] = norm[csrc[j]];
  }
  if (args.last_level) return;

  // Move the vectors into the children, and sum each child's initial
  // centroids for the next level while they are in cache.
  for (int64_t child = 0; child < 2; ++child) {
    const int64_t count = child == 0 ? n0 : n - n0;
    const int64_t* csrc = src + child * half;
    T* out = next_U + child * half * dp;
    using S = Simd<T, Bytes>;
    for (int64_t j = 0; j < count; ++j) {
      const T* from = U + csrc[j] * dp;
      for (int64_t v = 0; v < dp; v += S::kLanes) {
        S::store(out + j * dp + v, S::load(from + v));
      }
    }
    init_weights(next_norm + child * half, count, args.child_n0[child], w0,
                 w1);
    T* ci = child_init + child * 2 * dp;
    std::fill(ci, ci + 2 * dp, T(0));
    accumulate<T, Bytes>(out, dp, count, w0, w1, ci, ci + dp);
  }
}

// The same code compiled twice on x86: for AVX2 + FMA (chosen at run time
// when the CPU has them) and for the baseline instruction set.
#define BOAT_MM_SPLIT_NODE_ARGS                                          \
  const T *U, T *next_U, const T *norm, const int64_t *perm,             \
      T *next_norm, int64_t *next_perm, const T *init, T *child_init,    \
      const NodeArgs &args, T temperature, Scratch<T> &scratch
#define BOAT_MM_SPLIT_NODE_CALL(BYTES)                                   \
  split_node_impl<T, BYTES>(U, next_U, norm, perm, next_norm, next_perm, \
                            init, child_init, args, temperature, scratch)

template <typename T>
void split_node_base(BOAT_MM_SPLIT_NODE_ARGS) {
  BOAT_MM_SPLIT_NODE_CALL(16);
}

#if BOAT_MM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void split_node_avx2(
    BOAT_MM_SPLIT_NODE_ARGS) {
  BOAT_MM_SPLIT_NODE_CALL(32);
}
#endif

template <typename T>
using SplitNodeFn = void (*)(BOAT_MM_SPLIT_NODE_ARGS);

// Unit vectors and norms of the rows [begin, end) of x: (N, d) per row in,
// (total, dp) per row out, padding dimensions zero. Padding slots are not
// written (never read).
template <typename T, int Bytes>
BOAT_MM_INLINE void prepare_rows_impl(const T* x, int64_t N, int64_t d,
                                      int64_t dp, int64_t total, T* unit,
                                      T* norm, int64_t* perm, int64_t begin,
                                      int64_t end) {
  for (int64_t m = begin; m < end; ++m) {
    T* U = unit + m * total * dp;
    T* w = norm + m * total;
    int64_t* p = perm + m * total;
    for (int64_t i = 0; i < total; ++i) p[i] = std::min(i, N - 1);
    for (int64_t i = 0; i < N; ++i) {
      const T* xi = x + (m * N + i) * d;
      T sq = 0;
      for (int64_t k = 0; k < d; ++k) sq += xi[k] * xi[k];
      const T nrm = std::max<T>(std::sqrt(sq), T(1e-12));
      w[i] = nrm;
      T* ui = U + i * dp;
      for (int64_t k = 0; k < d; ++k) ui[k] = xi[k] / nrm;
      for (int64_t k = d; k < dp; ++k) ui[k] = T(0);
    }
  }
}

#define BOAT_MM_PREPARE_ARGS                                             \
  const T *x, int64_t N, int64_t d, int64_t dp, int64_t total, T *unit,  \
      T *norm, int64_t *perm, int64_t begin, int64_t end
#define BOAT_MM_PREPARE_CALL(BYTES) \
  prepare_rows_impl<T, BYTES>(x, N, d, dp, total, unit, norm, perm, begin, end)

template <typename T>
void prepare_rows_base(BOAT_MM_PREPARE_ARGS) {
  BOAT_MM_PREPARE_CALL(16);
}

#if BOAT_MM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void prepare_rows_avx2(
    BOAT_MM_PREPARE_ARGS) {
  BOAT_MM_PREPARE_CALL(32);
}
#endif

// The tree of one clustering call. Node `task` of level l (task = row *
// 2**l + node) owns slots [task * cap, (task + 1) * cap) of its row-major
// buffers at every level; its children are tasks 2 * task and 2 * task + 1
// of level l + 1, in the same slots. Vectors, norms and the permutation
// alternate between two buffers by level parity.
template <typename T>
struct Tree {
  int64_t dp, N, total, G, base, extra, num_levels, kmeans_iters;
  T temperature;
  T* unit[2];
  T* norm[2];
  int64_t* perm[2];
  SplitNodeFn<T> split_node;

  NodeArgs args_for(int64_t level, int64_t node) const {
    const int64_t leaves = G >> level;  // leaves under one node
    NodeArgs args;
    args.dp = dp;
    args.n = leaves_size(node * leaves, leaves, base, extra);
    args.n0 = leaves_size(node * leaves, leaves / 2, base, extra);
    args.half = (total >> level) / 2;
    args.pad_token = N - 1;
    args.kmeans_iters = kmeans_iters;
    args.last_level = level + 1 == num_levels;
    for (int64_t c = 0; c < 2; ++c) {
      // Child c covers leaves [first, first + leaves / 2).
      const int64_t first = node * leaves + c * (leaves / 2);
      args.child_n0[c] = leaves_size(first, leaves / 4, base, extra);
    }
    return args;
  }

  // Split node `task` of `level`; its children's initial centroid sums go
  // to child_init (4 * dp).
  void split(int64_t level, int64_t task, const T* init, T* child_init,
             Scratch<T>& scratch) const {
    const int64_t cap = total >> level;
    const int64_t off = task * cap;
    const int64_t now = level % 2, next = 1 - now;
    const NodeArgs args = args_for(level, task % (int64_t(1) << level));
    split_node(unit[now] + off * dp, unit[next] + off * dp, norm[now] + off,
               perm[now] + off, norm[next] + off, perm[next] + off, init,
               child_init, args, temperature, scratch);
  }

  // The subtree under node `task` of `level`, depth first: a child is
  // split while the vectors its parent just moved are still in cache.
  // `stack` holds 4 * dp values per remaining level.
  void subtree(int64_t level, int64_t task, const T* init, T* stack,
               Scratch<T>& scratch) const {
    split(level, task, init, stack, scratch);
    if (level + 1 == num_levels) return;
    for (int64_t c = 0; c < 2; ++c) {
      subtree(level + 1, 2 * task + c, stack + 2 * c * dp, stack + 4 * dp,
              scratch);
    }
  }
};

// The vector buffers of one call: memory of the calling thread kept
// between calls, up to kMaxKeptBytes (fresh buffers of this size cost page
// faults on every call, about a tenth of the kernel at 128^2 tokens), or a
// fresh allocation beyond that. The threads of at::parallel_for only use
// the buffers of the call that owns them.
constexpr size_t kMaxKeptBytes = size_t(64) << 20;

template <typename T>
struct Workspace {
  std::unique_ptr<T[]> fresh;
  T* data;
  explicit Workspace(int64_t count) {
    thread_local std::vector<T> kept;
    const size_t n = static_cast<size_t>(count);
    if (n * sizeof(T) > kMaxKeptBytes) {
      fresh.reset(new T[n]);
      data = fresh.get();
      return;
    }
    if (kept.size() < n) kept.resize(n);
    data = kept.data();
  }
};

template <typename T>
at::Tensor cluster_impl(const at::Tensor& x, int64_t num_levels,
                        int64_t slot_size, int64_t kmeans_iters,
                        double temperature) {
  const int64_t M = x.size(0), N = x.size(1), d = x.size(2);
  const int64_t dp = (d + kDimAlign - 1) / kDimAlign * kDimAlign;
  const int64_t total = slot_size << num_levels;
  const int64_t G = int64_t(1) << num_levels;

  SplitNodeFn<T> split_node = &split_node_base<T>;
  auto prepare_rows = &prepare_rows_base<T>;
#if BOAT_MM_X86_DISPATCH
  if (cpu_has_avx2_fma()) {
    split_node = &split_node_avx2<T>;
    prepare_rows = &prepare_rows_avx2<T>;
  }
#endif

  auto opts = x.options();
  // Per row, node after node: (cap, dp) unit vectors and (cap,) norms, in
  // two buffers used by alternate levels; padding slots are never read.
  Workspace<T> space(2 * M * total * dp);
  T* unit[2] = {space.data, space.data + M * total * dp};
  at::Tensor norm[2] = {at::empty({M, total}, opts),
                        at::empty({M, total}, opts)};
  at::Tensor perm[2] = {at::empty({M, total}, opts.dtype(at::kLong)),
                        at::empty({M, total}, opts.dtype(at::kLong))};

  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    prepare_rows(xp, N, d, dp, total, unit[0],
                 norm[0].data_ptr<T>(), perm[0].data_ptr<int64_t>(), begin,
                 end);
  });
  if (num_levels == 0) return perm[0];

  Tree<T> tree;
  tree.dp = dp;
  tree.N = N;
  tree.total = total;
  tree.G = G;
  tree.base = N / G;
  tree.extra = N % G;
  tree.num_levels = num_levels;
  tree.kmeans_iters = kmeans_iters;
  tree.temperature = static_cast<T>(temperature);
  for (int64_t i = 0; i < 2; ++i) {
    tree.unit[i] = unit[i];
    tree.norm[i] = norm[i].data_ptr<T>();
    tree.perm[i] = perm[i].data_ptr<int64_t>();
  }
  tree.split_node = split_node;

  // Level by level until there are enough independent subtrees to keep
  // the threads busy, then every subtree depth first. Each node's result
  // is the same either way, so the output does not depend on the thread
  // count. `init` holds the initial centroid sums of the next level's
  // nodes (none at the root).
  const int64_t threads = at::get_num_threads();
  int64_t level = 0;
  auto init = at::empty({2, M * G, 2 * dp}, opts);
  const T* level_init = nullptr;
  for (; level + 1 < num_levels && M * (int64_t(1) << level) < 2 * threads;
       ++level) {
    const int64_t tasks = M << level;
    T* child_init = init[level % 2].data_ptr<T>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> scratch(dp, total >> level);
      for (int64_t task = begin; task < end; ++task) {
        tree.split(level, task,
                   level_init == nullptr ? nullptr
                                         : level_init + task * 2 * dp,
                   child_init + task * 4 * dp, scratch);
      }
    });
    level_init = child_init;
  }
  at::parallel_for(0, M << level, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(dp, total >> level);
    std::vector<T> stack(4 * dp * (num_levels - level));
    for (int64_t task = begin; task < end; ++task) {
      tree.subtree(level, task,
                   level_init == nullptr ? nullptr
                                         : level_init + task * 2 * dp,
                   stack.data(), scratch);
    }
  });
  return perm[num_levels % 2];
}

at::Tensor balanced_clustering_cpu(const at::Tensor& x, int64_t num_levels,
                                   int64_t slot_size, int64_t kmeans_iters,
                                   double temperature) {
  TORCH_CHECK(x.dim() == 3,
              "balanced_clustering expects (M, N, d) vectors, got a ",
              x.dim(), "-d tensor");
  TORCH_CHECK(x.size(1) >= 1 && x.size(2) >= 1,
              "balanced_clustering needs N >= 1 tokens of d >= 1 dims, got ",
              x.sizes());
  TORCH_CHECK(num_levels >= 0 && num_levels < 31,
              "num_levels must lie in [0, 31), got ", num_levels);
  TORCH_CHECK(slot_size >= 1 && (slot_size << num_levels) >= x.size(1),
              "slot_size * 2**num_levels must hold all ", x.size(1),
              " tokens, got slot_size=", slot_size,
              ", num_levels=", num_levels);
  TORCH_CHECK((slot_size << num_levels) < (int64_t(1) << 32),
              "balanced_clustering supports fewer than 2**32 slots per row");
  TORCH_CHECK(kmeans_iters >= 0, "kmeans_iters must be >= 0, got ",
              kmeans_iters);
  // float64 stays float64 (parity checks); anything else runs in float32,
  // as in the tensor implementation.
  if (x.scalar_type() == at::kDouble) {
    return cluster_impl<double>(x.contiguous(), num_levels,
                                        slot_size, kmeans_iters,
                                        temperature);
  }
  return cluster_impl<float>(x.to(at::kFloat).contiguous(),
                                     num_levels, slot_size, kmeans_iters,
                                     temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(boat_mm, CPU, m) {
  m.impl("balanced_clustering", &balanced_clustering_cpu);
}

}  // namespace boat_mm

#ifndef BOAT_MM_CSRC_SHA
#define BOAT_MM_CSRC_SHA unknown
#endif
#define BOAT_MM_STR2(x) #x
#define BOAT_MM_STR(x) BOAT_MM_STR2(x)

// The digest of the sources this library was built from (setup.py), which
// boat_mm/ops/_sources.py reads from the file before it is loaded.
extern "C" __attribute__((used, visibility("default"))) const char
    boat_mm_csrc_sha[] = "BOAT_MM_CSRC_SHA=" BOAT_MM_STR(BOAT_MM_CSRC_SHA);

// `import boat_mm._C` loads this library, which registers the CPU kernels
// of the ops defined in boat_mm/ops/_library.py.
static struct PyModuleDef boat_mm_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "C++ kernels of boat_mm, registered as torch.ops.boat_mm.*", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&boat_mm_c_module); }
