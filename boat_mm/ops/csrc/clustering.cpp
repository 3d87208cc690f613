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
// tokens into the two children, which also sums the children's initial
// centroids. The tensor implementation reads every token six times per
// level, in batched matmuls with two output rows.
//
// The arithmetic is the same; sums are accumulated in a different order,
// so float32 results agree up to rounding (a near-tie may rank two tokens
// the other way) and float64 results agree exactly in practice. The result
// is deterministic: every node is computed by one thread in a fixed order.
//
// The schema is registered here; the fake (shape) kernel is registered from
// Python (boat_mm/ops/clustering.py) so that torch.compile can trace it.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

template <>
struct SortEntry<float> {
  using type = uint64_t;
  static BOAT_MM_INLINE type make(float r, int64_t i) {
    int32_t bits;
    std::memcpy(&bits, &r, sizeof(bits));
    // Flipping the sign bit maps signed order to unsigned order.
    const uint32_t key = static_cast<uint32_t>(bits) ^ 0x80000000u;
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
    return {bits, i};
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

// A node's vectors are stored dimension-major, (d, cap): the similarities
// of a block of tokens to the centroids and the centroid sums are then
// vertical multiply-adds over tokens, with no horizontal sum per token.
// Summation orders are fixed, so results do not depend on the thread
// count.
//

// sim_c[i] = sum_k c[k] * U[k, i] for the tokens i < n of a node; every
// token sums over k in order, in the vector blocks and in the tail alike.
template <typename T, int Bytes>
BOAT_MM_INLINE void similarities(const T* U, int64_t cap, int64_t n,
                                 int64_t d, const T* c0, const T* c1,
                                 T* sim0, T* sim1) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    V a0 = {}, a1 = {}, b0 = {}, b1 = {};
    for (int64_t k = 0; k < d; ++k) {
      const T* row = U + k * cap + i;
      const V u0 = S::load(row), u1 = S::load(row + W);
      const T x0 = c0[k], x1 = c1[k];
      a0 += x0 * u0;
      a1 += x0 * u1;
      b0 += x1 * u0;
      b1 += x1 * u1;
    }
    S::store(sim0 + i, a0);
    S::store(sim0 + i + W, a1);
    S::store(sim1 + i, b0);
    S::store(sim1 + i + W, b1);
  }
  for (; i < n; ++i) {
    T a = 0, b = 0;
    for (int64_t k = 0; k < d; ++k) {
      a += c0[k] * U[k * cap + i];
      b += c1[k] * U[k * cap + i];
    }
    sim0[i] = a;
    sim1[i] = b;
  }
}

// s_c[k] = sum_{i < n} w_c[i] * U[k, i]: the (unnormalised) centroids.
// With `copy_to`, the rows are also copied there (same (d, cap) layout) in
// the same pass.
template <typename T, int Bytes>
BOAT_MM_INLINE void weighted_sums(const T* U, int64_t cap, int64_t n,
                                  int64_t d, const T* w0, const T* w1,
                                  T* s0, T* s1, T* copy_to = nullptr) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  for (int64_t k = 0; k < d; ++k) {
    const T* row = U + k * cap;
    T* out = copy_to == nullptr ? nullptr : copy_to + k * cap;
    V a0 = {}, a1 = {}, b0 = {}, b1 = {};
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const V u0 = S::load(row + i), u1 = S::load(row + i + W);
      if (out != nullptr) {
        S::store(out + i, u0);
        S::store(out + i + W, u1);
      }
      a0 += S::load(w0 + i) * u0;
      a1 += S::load(w0 + i + W) * u1;
      b0 += S::load(w1 + i) * u0;
      b1 += S::load(w1 + i + W) * u1;
    }
    T t0 = S::sum(a0 + a1), t1 = S::sum(b0 + b1);
    for (; i < n; ++i) {
      if (out != nullptr) out[i] = row[i];
      t0 += w0[i] * row[i];
      t1 += w1[i] * row[i];
    }
    s0[k] = t0;
    s1[k] = t1;
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

template <typename T, int Bytes>
BOAT_MM_INLINE void weights(const T* sim0, const T* sim1, const T* norm,
                            int64_t n, T temperature, T* w0, T* w1) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    // float: vector exp. float64 (the parity checks) keeps libm's exp.
    using S = Simd<float, Bytes>;
    using V = typename S::V;
    for (; i + S::kLanes <= n; i += S::kLanes) {
      const V logit = (S::load(sim0 + i) - S::load(sim1 + i)) * temperature;
      const auto first = logit >= 0.0f;
      const V e = exp_nonpositive<Bytes>(first ? -logit : logit);
      const V big = 1.0f / (1.0f + e), small = e * big;
      const V nrm = S::load(norm + i);
      S::store(w0 + i, (first ? big : small) * nrm);
      S::store(w1 + i, (first ? small : big) * nrm);
    }
  }
  for (; i < n; ++i) {
    weight_one(sim0[i], sim1[i], norm[i], temperature, w0[i], w1[i]);
  }
}

// One soft k-means step in a single pass over the node: per block of
// tokens, the similarities to (c0, c1), the weights, and their products
// with the same (cached) vectors accumulated per coordinate into vector
// partial sums; (s0, s1) are the new unnormalised centroids. Sums run in
// the order of similarities() and weighted_sums() (one pass instead of
// two over the node). `acc` holds 4 * d vectors.
template <typename T, int Bytes>
BOAT_MM_INLINE void kmeans_step(const T* U, int64_t cap, int64_t n,
                                int64_t d, const T* c0, const T* c1,
                                const T* norm, T temperature, T* acc,
                                T* s0, T* s1) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  std::fill(acc, acc + 4 * d * W, T(0));
  T* acc_a0 = acc;  // child 0 weights, first W tokens of a block
  T* acc_a1 = acc + d * W;
  T* acc_b0 = acc + 2 * d * W;  // child 1 weights
  T* acc_b1 = acc + 3 * d * W;
  T sim0[2 * W], sim1[2 * W], w0[2 * W], w1[2 * W];
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    similarities<T, Bytes>(U + i, cap, 2 * W, d, c0, c1, sim0, sim1);
    weights<T, Bytes>(sim0, sim1, norm + i, 2 * W, temperature, w0, w1);
    const V wa0 = S::load(w0), wa1 = S::load(w0 + W);
    const V wb0 = S::load(w1), wb1 = S::load(w1 + W);
    for (int64_t k = 0; k < d; ++k) {
      const T* row = U + k * cap + i;
      const V u0 = S::load(row), u1 = S::load(row + W);
      S::store(acc_a0 + k * W, S::load(acc_a0 + k * W) + wa0 * u0);
      S::store(acc_a1 + k * W, S::load(acc_a1 + k * W) + wa1 * u1);
      S::store(acc_b0 + k * W, S::load(acc_b0 + k * W) + wb0 * u0);
      S::store(acc_b1 + k * W, S::load(acc_b1 + k * W) + wb1 * u1);
    }
  }
  const int64_t tail = n - i;
  similarities<T, Bytes>(U + i, cap, tail, d, c0, c1, sim0, sim1);
  weights<T, Bytes>(sim0, sim1, norm + i, tail, temperature, w0, w1);
  for (int64_t k = 0; k < d; ++k) {
    const T* row = U + k * cap + i;
    T t0 = S::sum(S::load(acc_a0 + k * W) + S::load(acc_a1 + k * W));
    T t1 = S::sum(S::load(acc_b0 + k * W) + S::load(acc_b1 + k * W));
    for (int64_t j = 0; j < tail; ++j) {
      t0 += w0[j] * row[j];
      t1 += w1[j] * row[j];
    }
    s0[k] = t0;
    s1[k] = t1;
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
  int64_t d;
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
  std::vector<T> cent, sim0, sim1, w0, w1;
  std::vector<int64_t> src;
  std::vector<typename SortEntry<T>::type> order, sort_tmp;
  std::vector<T> acc;  // k-means partial sums, 4 * d vectors of <= 32 B
  // A node's vectors in child order; not zero-filled (fully written
  // before it is read).
  std::unique_ptr<T[]> children;
  Scratch(int64_t d, int64_t cap)
      : cent(4 * d),
        sim0(cap),
        sim1(cap),
        w0(cap),
        w1(cap),
        src(cap),
        acc(4 * d * (32 / sizeof(T))),
        children(new T[d * cap]) {
    order.reserve(cap);
  }
};

// Split one node: `U` ((d, cap) unit vectors, the first `n` tokens real;
// rewritten in place as its two (d, half) children) and `norm` (their
// norms; children go to `next_norm`). `init` holds the node's initial
// centroid sums when the parent computed them (nullptr at the root); the
// children's go to `child_init`.
template <typename T, int Bytes>
BOAT_MM_INLINE void split_node_impl(T* U, const T* norm, const int64_t* perm,
                                    T* next_norm, int64_t* next_perm,
                                    const T* init, T* child_init,
                                    const NodeArgs& args, T temperature,
                                    Scratch<T>& s) {
  const int64_t d = args.d, n = args.n, n0 = args.n0, half = args.half;
  const int64_t cap = 2 * half;
  T* c0 = s.cent.data();
  T* c1 = c0 + d;
  T *w0 = s.w0.data(), *w1 = s.w1.data();
  T *sim0 = s.sim0.data(), *sim1 = s.sim1.data();

  // Initial centroids: means of the first n0 and of the remaining real
  // tokens in the current order, normalised.
  if (init != nullptr) {
    std::copy(init, init + 2 * d, c0);
  } else {
    init_weights(norm, n, n0, w0, w1);
    weighted_sums<T, Bytes>(U, cap, n, d, w0, w1, c0, c1);
  }
  normalize(c0, d);
  normalize(c1, d);

  // Soft k-means with two centroids.
  for (int64_t it = 0; it < args.kmeans_iters; ++it) {
    kmeans_step<T, Bytes>(U, cap, n, d, c0, c1, norm, temperature,
                          s.acc.data(), c0 + 2 * d, c1 + 2 * d);
    std::copy(c0 + 2 * d, c0 + 4 * d, c0);
    normalize(c0, d);
    normalize(c1, d);
  }

  // Rank the real tokens by r = (s0 + 1) / (s1 + 1), ties by position (a
  // stable sort); padding is not ranked: it goes last in both children.
  similarities<T, Bytes>(U, cap, n, d, c0, c1, sim0, sim1);
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

  // Move the vectors into child order through the scratch buffer (the
  // children occupy the node's own memory), and on the way back compute
  // each child's initial centroid sums for the next level, in the order
  // weighted_sums() would use there.
  T* tmp = s.children.get();
  for (int64_t k = 0; k < d; ++k) {
    const T* row = U + k * cap;
    for (int64_t child = 0; child < 2; ++child) {
      const int64_t count = child == 0 ? n0 : n - n0;
      const int64_t* csrc = src + child * half;
      T* out_row = tmp + child * d * half + k * half;
      for (int64_t j = 0; j < count; ++j) out_row[j] = row[csrc[j]];
    }
  }
  for (int64_t child = 0; child < 2; ++child) {
    const int64_t count = child == 0 ? n0 : n - n0;
    init_weights(next_norm + child * half, count, args.child_n0[child], w0,
                 w1);
    T* ci = child_init + child * 2 * d;
    weighted_sums<T, Bytes>(tmp + child * d * half, half, count, d, w0, w1,
                            ci, ci + d, U + child * d * half);
  }
}

// The same code compiled twice on x86: for AVX2 + FMA (chosen at run time
// when the CPU has them) and for the baseline instruction set.
#define BOAT_MM_SPLIT_NODE_ARGS                                          \
  T *U, const T *norm, const int64_t *perm, T *next_norm,                \
      int64_t *next_perm, const T *init, T *child_init,                  \
      const NodeArgs &args, T temperature, Scratch<T> &scratch
#define BOAT_MM_SPLIT_NODE_CALL(BYTES)                                 \
  split_node_impl<T, BYTES>(U, norm, perm, next_norm, next_perm, init, \
                            child_init, args, temperature, scratch)

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

// The tree of one clustering call. Node `task` of level l (task = row *
// 2**l + node) owns slots [task * cap, (task + 1) * cap) of its row-major
// buffers at every level; its children are tasks 2 * task and 2 * task + 1
// of level l + 1, in the same slots. Norms and the permutation alternate
// between two buffers by level parity; vectors are rewritten in place.
template <typename T>
struct Tree {
  int64_t d, N, total, G, base, extra, num_levels, kmeans_iters;
  T temperature;
  T* unit;
  T* norm[2];
  int64_t* perm[2];
  SplitNodeFn<T> split_node;

  NodeArgs args_for(int64_t level, int64_t node) const {
    const int64_t leaves = G >> level;  // leaves under one node
    NodeArgs args;
    args.d = d;
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
  // to child_init (4 * d).
  void split(int64_t level, int64_t task, const T* init, T* child_init,
             Scratch<T>& scratch) const {
    const int64_t cap = total >> level;
    const int64_t off = task * cap;
    const int64_t now = level % 2, next = 1 - now;
    const NodeArgs args = args_for(level, task % (int64_t(1) << level));
    split_node(unit + off * d, norm[now] + off, perm[now] + off,
               norm[next] + off, perm[next] + off, init, child_init, args,
               temperature, scratch);
  }

  // The subtree under node `task` of `level`, depth first: a child is
  // split while the vectors its parent just moved are still in cache.
  // `stack` holds 4 * d values per remaining level.
  void subtree(int64_t level, int64_t task, const T* init, T* stack,
               Scratch<T>& scratch) const {
    split(level, task, init, stack, scratch);
    if (level + 1 == num_levels) return;
    for (int64_t c = 0; c < 2; ++c) {
      subtree(level + 1, 2 * task + c, stack + 2 * c * d, stack + 4 * d,
              scratch);
    }
  }
};

template <typename T>
at::Tensor cluster_impl(const at::Tensor& x, int64_t num_levels,
                        int64_t slot_size, int64_t kmeans_iters,
                        double temperature) {
  const int64_t M = x.size(0), N = x.size(1), d = x.size(2);
  const int64_t total = slot_size << num_levels;
  const int64_t G = int64_t(1) << num_levels;

  SplitNodeFn<T> split_node = &split_node_base<T>;
#if BOAT_MM_X86_DISPATCH
  if (cpu_has_avx2_fma()) split_node = &split_node_avx2<T>;
#endif

  auto opts = x.options();
  // Per row, node after node: (d, cap) unit vectors and (cap,) norms;
  // padding slots are never read.
  auto unit = at::empty({M, d, total}, opts);
  at::Tensor norm[2] = {at::empty({M, total}, opts),
                        at::empty({M, total}, opts)};
  at::Tensor perm[2] = {at::empty({M, total}, opts.dtype(at::kLong)),
                        at::empty({M, total}, opts.dtype(at::kLong))};

  const T* xp = x.data_ptr<T>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* U = unit.data_ptr<T>() + m * d * total;
      T* w = norm[0].data_ptr<T>() + m * total;
      int64_t* p = perm[0].data_ptr<int64_t>() + m * total;
      for (int64_t i = 0; i < total; ++i) p[i] = std::min(i, N - 1);
      for (int64_t i = 0; i < N; ++i) {
        const T* xi = xp + (m * N + i) * d;
        T sq = 0;
        for (int64_t k = 0; k < d; ++k) sq += xi[k] * xi[k];
        w[i] = std::max<T>(std::sqrt(sq), T(1e-12));
      }
      // Transpose in blocks of tokens, so that each coordinate's row is
      // written in runs rather than one element per token.
      constexpr int64_t kRun = 64;
      for (int64_t i0 = 0; i0 < N; i0 += kRun) {
        const int64_t i1 = std::min(N, i0 + kRun);
        for (int64_t k = 0; k < d; ++k) {
          T* row = U + k * total;
          for (int64_t i = i0; i < i1; ++i) {
            row[i] = xp[(m * N + i) * d + k] / w[i];
          }
        }
      }
    }
  });
  if (num_levels == 0) return perm[0];

  Tree<T> tree;
  tree.d = d;
  tree.N = N;
  tree.total = total;
  tree.G = G;
  tree.base = N / G;
  tree.extra = N % G;
  tree.num_levels = num_levels;
  tree.kmeans_iters = kmeans_iters;
  tree.temperature = static_cast<T>(temperature);
  tree.unit = unit.data_ptr<T>();
  for (int64_t i = 0; i < 2; ++i) {
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
  auto init = at::empty({2, M * G, 2 * d}, opts);
  const T* level_init = nullptr;
  for (; level + 1 < num_levels && M * (int64_t(1) << level) < 2 * threads;
       ++level) {
    const int64_t tasks = M << level;
    T* child_init = init[level % 2].data_ptr<T>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> scratch(d, total >> level);
      for (int64_t task = begin; task < end; ++task) {
        tree.split(level, task,
                   level_init == nullptr ? nullptr
                                         : level_init + task * 2 * d,
                   child_init + task * 4 * d, scratch);
      }
    });
    level_init = child_init;
  }
  at::parallel_for(0, M << level, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch(d, total >> level);
    std::vector<T> stack(4 * d * (num_levels - level));
    for (int64_t task = begin; task < end; ++task) {
      tree.subtree(level, task,
                   level_init == nullptr ? nullptr
                                         : level_init + task * 2 * d,
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

TORCH_LIBRARY(boat_mm, m) {
  m.def(
      "balanced_clustering(Tensor x, int num_levels, int slot_size, "
      "int kmeans_iters, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(boat_mm, CPU, m) {
  m.impl("balanced_clustering", &balanced_clustering_cpu);
}

}  // namespace boat_mm

// `import boat_mm._C` loads this library, which registers the op above.
static struct PyModuleDef boat_mm_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "C++ kernels of boat_mm, registered as torch.ops.boat_mm.*", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&boat_mm_c_module); }
