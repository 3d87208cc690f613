// Copyright (c) boat-mm contributors. All rights reserved.
//
// CPU kernels of boat_mm::clustered_attention and its backward: FSLA's
// attention inside each sibling pair of clusters, fused with the gathers
// from the qkv projection and the write-back to raster order.
//
// They compute what the tensor path of boat_mm/ops/clustered_attn.py
// computes (its docstrings give the rule), differently: the tensor path
// gathers q, k and v into cluster order, runs SDPA on every sibling pair
// (2S queries x 2S keys under a mask) and permutes the result back. Here
// every (row, pair) is one task that packs its tokens' q, k and v into
// small buffers that stay in cache, and runs each cluster's queries
// against exactly its own tokens plus the `overlap` borrowed ones (about
// 30 % fewer multiply-adds than the masked pair), then writes the outputs
// straight to their raster rows. The backward recomputes the
// probabilities from the saved log-sum-exp, as flash attention does, and
// writes every row of the qkv gradient exactly once.
//
// Deterministic: a task is computed by one thread in a fixed order and
// tasks write disjoint rows, so results do not depend on the thread count.
//
// Only the CPU kernels are registered here: the schemas, the fake kernels,
// the autograd formula and the other devices' kernels are registered from
// Python (boat_mm/ops/_library.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace boat_mm {
namespace {

using simd::Simd;
using simd::exp_nonpositive;
#if BOAT_MM_X86_DISPATCH
using simd::cpu_has_avx2_fma;
#endif

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Small dense products on packed buffers.
// ---------------------------------------------------------------------------

// C[R x NV vectors] (+)= A[R x k] * B[k x NV vectors]: B and C row-major
// with strides ldb and ldc; A row-major with stride lda, or, with TransA,
// stored transposed (A[r, p] at A[p * lda + r]).
template <typename T, int Bytes, int R, int NV, bool TransA>
BOAT_MM_INLINE void gemm_tile(const T* A, int64_t lda, const T* B,
                              int64_t ldb, T* C, int64_t ldc, int64_t k,
                              bool accumulate) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  V c[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      c[r][v] = accumulate ? S::load(C + r * ldc + v * W) : V{};
    }
  }
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::load(B + p * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = TransA ? A[p * lda + r] : A[r * lda + p];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) S::store(C + r * ldc + v * W, c[r][v]);
  }
}

// Rows in tiles of R (12 accumulators with NV), then the remainder.
template <typename T, int Bytes, int NV, bool TransA>
BOAT_MM_INLINE void gemm_rows(int64_t m, int64_t k, const T* A, int64_t lda,
                              const T* B, int64_t ldb, T* C, int64_t ldc,
                              bool accumulate) {
  constexpr int R = NV == 3 ? 4 : 6;
  const int64_t row_step = TransA ? 1 : lda;
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    gemm_tile<T, Bytes, R, NV, TransA>(A + i * row_step, lda, B, ldb,
                                       C + i * ldc, ldc, k, accumulate);
  }
  A += i * row_step;
  C += i * ldc;
  switch (m - i) {
#define BOAT_MM_ROWS_CASE(REST)                                           \
  case REST:                                                             \
    if constexpr (REST < R) {                                            \
      gemm_tile<T, Bytes, REST, NV, TransA>(A, lda, B, ldb, C, ldc, k,   \
                                            accumulate);                 \
    }                                                                    \
    break;
    BOAT_MM_ROWS_CASE(1)
    BOAT_MM_ROWS_CASE(2)
    BOAT_MM_ROWS_CASE(3)
    BOAT_MM_ROWS_CASE(4)
    BOAT_MM_ROWS_CASE(5)
#undef BOAT_MM_ROWS_CASE
    default:
      break;
  }
}

// C[m x n] (+)= A[m x k] * B[k x n] (A transposed with TransA). n is
// rounded up to whole vectors: B and C must have room (and B finite
// values) up to that column. Column blocks of 3 vectors (4 rows per tile)
// or 2 (6 rows), never 1 when avoidable: a tile needs many multiply-adds
// per broadcast of A.
template <typename T, int Bytes, bool TransA = false>
BOAT_MM_INLINE void gemm(int64_t m, int64_t n, int64_t k, const T* A,
                         int64_t lda, const T* B, int64_t ldb, T* C,
                         int64_t ldc, bool accumulate) {
  constexpr int64_t W = Simd<T, Bytes>::kLanes;
  const int64_t nv = (n + W - 1) / W;
  int64_t j = 0;
  for (; nv - j >= 5 || nv - j == 3; j += 3) {
    gemm_rows<T, Bytes, 3, TransA>(m, k, A, lda, B + j * W, ldb, C + j * W,
                                   ldc, accumulate);
  }
  for (; nv - j >= 2; j += 2) {
    gemm_rows<T, Bytes, 2, TransA>(m, k, A, lda, B + j * W, ldb, C + j * W,
                                   ldc, accumulate);
  }
  if (nv - j == 1) {
    gemm_rows<T, Bytes, 1, TransA>(m, k, A, lda, B + j * W, ldb, C + j * W,
                                   ldc, accumulate);
  }
}

// row[j] = exp(row[j] - shift) for j < n; the columns [n, round_up(n, W))
// become 0. Returns the sum over j < n.
template <typename T, int Bytes>
BOAT_MM_INLINE T exp_row(T* row, int64_t n, T shift) {
  using S = Simd<T, Bytes>;
  constexpr int64_t W = S::kLanes;
  const int64_t np = round_up(n, W);
  T sum = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = typename S::V;
    for (int64_t j = n; j < np; ++j) {
      row[j] = -std::numeric_limits<float>::infinity();  // exp -> 0
    }
    V acc = {};
    for (int64_t j = 0; j < np; j += W) {
      const V e = exp_nonpositive<Bytes>(S::load(row + j) - shift);
      S::store(row + j, e);
      acc += e;
    }
    sum = S::sum(acc);
  } else {
    // float64 (the parity checks) keeps libm's exp.
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - shift);
      sum += row[j];
    }
    for (int64_t j = n; j < np; ++j) row[j] = 0;
  }
  return sum;
}

// max_{j < n} row[j].
template <typename T, int Bytes>
BOAT_MM_INLINE T row_max(const T* row, int64_t n) {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  constexpr int64_t W = S::kLanes;
  T mx = row[0];
  int64_t j = 0;
  if (n >= W) {
    V m = S::load(row);
    for (j = W; j + W <= n; j += W) {
      const V x = S::load(row + j);
      m = x > m ? x : m;
    }
    for (int64_t l = 0; l < W; ++l) mx = std::max(mx, m[l]);
  }
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// ---------------------------------------------------------------------------
// The layout of one sibling pair.
// ---------------------------------------------------------------------------

// What all tasks share. qkv is (B, N, 3C) with channels (3, heads, d); perm
// is (M = B * heads, perm_stride) with the pair p's slots at
// [p * 2S, (p + 1) * 2S); sizes holds the real-token count of every
// cluster (real tokens first in its slots).
template <typename T>
struct Problem {
  const T* qkv;
  const int64_t* perm;
  const int64_t* sizes;
  int64_t N, C, heads, d, perm_stride, P, S, overlap;
  T scale;
};

// The tokens of one (row, pair) task, packed: cluster 2j's s0 real tokens,
// then cluster 2j+1's s1. Cluster 2j's queries [0, s0) see keys
// [0, s0 + min(s1, overlap)): its own tokens and the first ones of its
// sibling; cluster 2j+1's queries [s0, s0 + s1) see keys
// [s0 - min(s0, overlap), s0 + s1): the last ones of 2j and its own.
struct PairTask {
  int64_t b, head, s0, s1, nt;
  int64_t first_slot;         // of the pair, in the (M, perm_stride) arrays
  const int64_t* slot_token;  // the pair's 2S slots

  template <typename T>
  PairTask(const Problem<T>& pb, int64_t task) {
    const int64_t m = task / pb.P, p = task % pb.P;
    b = m / pb.heads;
    head = m % pb.heads;
    s0 = pb.sizes[2 * p];
    s1 = pb.sizes[2 * p + 1];
    nt = s0 + s1;
    first_slot = m * pb.perm_stride + p * 2 * pb.S;
    slot_token = pb.perm + first_slot;
  }

  // Token and slot (within the pair) of packed position i.
  int64_t slot(int64_t i, int64_t S) const { return i < s0 ? i : S + i - s0; }
  int64_t token(int64_t i, int64_t S) const { return slot_token[slot(i, S)]; }

  struct Half {
    int64_t q0, nq, k0, nk;
  };
  Half half(int c, int64_t overlap) const {
    if (c == 0) return {0, s0, 0, s0 + std::min(s1, overlap)};
    const int64_t borrowed = std::min(s0, overlap);
    return {s0, s1, s0 - borrowed, borrowed + s1};
  }
};

// Per-thread buffers; `ld` is the row stride of the (d, tokens) and
// (queries, keys) buffers, with a vector of slack for unaligned starts.
template <typename T>
struct Buffers {
  int64_t dp, ld;
  std::vector<T> mem;
  std::vector<T*> ptr;

  Buffers(int64_t d, int64_t S, int64_t W, int count_rows, int count_trans,
          int count_scores, int count_query_rows) {
    dp = round_up(d, W);
    ld = round_up(2 * S, W) + W;
    const int64_t rows = 2 * S * dp, trans = d * ld, scores = S * ld,
                  qrows = S * dp;
    std::vector<int64_t> sizes;
    for (int i = 0; i < count_rows; ++i) sizes.push_back(rows);
    for (int i = 0; i < count_trans; ++i) sizes.push_back(trans);
    for (int i = 0; i < count_scores; ++i) sizes.push_back(scores);
    for (int i = 0; i < count_query_rows; ++i) sizes.push_back(qrows);
    int64_t total = 0;
    for (int64_t s : sizes) total += round_up(s, 16);
    // Zero once: the padding columns of the packed rows stay zero.
    mem.assign(total, T(0));
    int64_t off = 0;
    for (int64_t s : sizes) {
      ptr.push_back(mem.data() + off);
      off += round_up(s, 16);
    }
  }
};

// Packs rows of channel block `which` (0 q, 1 k, 2 v) of the pair's tokens:
// row-major (nt, dp) times `mul` into `rows` and/or dimension-major
// (d, ld) into `trans` (zero past nt). nullptr skips either. The pass
// over the queries (which = 0) also prefetches the q, k and v of the
// tokens a few places ahead: a cluster's tokens lie anywhere in the map,
// so on large maps every row is a cache miss otherwise.
template <typename T>
BOAT_MM_INLINE void pack(const Problem<T>& pb, const PairTask& t, int which,
                         T mul, int64_t dp, int64_t ld, T* rows, T* trans) {
  constexpr int64_t kAhead = 8;
  const int64_t d = pb.d, C3 = 3 * pb.C;
  const T* sample = pb.qkv + t.b * pb.N * C3 + t.head * d;
  const T* base = sample + which * pb.C;
  for (int64_t i = 0; i < t.nt; ++i) {
#if defined(__GNUC__)
    if (which == 0 && i + kAhead < t.nt) {
      const char* ahead = reinterpret_cast<const char*>(
          sample + t.token(i + kAhead, pb.S) * C3);
      for (int w = 0; w < 3; ++w) {
        const char* chunk = ahead + w * pb.C * sizeof(T);
        for (int64_t b = 0; b < d * int64_t(sizeof(T)); b += 64) {
          __builtin_prefetch(chunk + b);
        }
      }
    }
#endif
    const T* src = base + t.token(i, pb.S) * C3;
    if (rows != nullptr) {
      for (int64_t c = 0; c < d; ++c) rows[i * dp + c] = src[c] * mul;
    }
    if (trans != nullptr) {
      for (int64_t c = 0; c < d; ++c) trans[c * ld + i] = src[c];
    }
  }
  if (trans != nullptr) {
    for (int64_t c = 0; c < d; ++c) {
      std::fill(trans + c * ld + t.nt, trans + (c + 1) * ld, T(0));
    }
  }
}

// ---------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------

template <typename T, int Bytes>
BOAT_MM_INLINE void forward_impl(const Problem<T>& pb, T* out, T* lse,
                                 int64_t begin, int64_t end) {
  constexpr int64_t W = Simd<T, Bytes>::kLanes;
  const int64_t d = pb.d, S = pb.S;
  Buffers<T> buf(d, S, W, /*rows=*/2, /*trans=*/1, /*scores=*/1,
                 /*query_rows=*/1);
  const int64_t dp = buf.dp, ld = buf.ld;
  T* Q = buf.ptr[0];   // (nt, dp) queries times scale
  T* Vr = buf.ptr[1];  // (nt, dp) values
  T* Kt = buf.ptr[2];  // (d, ld) keys, dimension-major
  T* P = buf.ptr[3];   // (nq, ld) scores, then probabilities
  T* O = buf.ptr[4];   // (nq, dp) unnormalised outputs
  std::vector<T> inv(S);
  for (int64_t task = begin; task < end; ++task) {
    const PairTask t(pb, task);
    pack<T>(pb, t, 0, pb.scale, dp, ld, Q, nullptr);
    pack<T>(pb, t, 1, T(1), dp, ld, nullptr, Kt);
    pack<T>(pb, t, 2, T(1), dp, ld, Vr, nullptr);
    T* lse_pair = lse + t.first_slot;
    for (int c = 0; c < 2; ++c) {
      const auto h = t.half(c, pb.overlap);
      if (h.nq == 0) continue;
      gemm<T, Bytes>(h.nq, h.nk, d, Q + h.q0 * dp, dp, Kt + h.k0, ld, P, ld,
                     false);
      for (int64_t i = 0; i < h.nq; ++i) {
        T* row = P + i * ld;
        const T mx = row_max<T, Bytes>(row, h.nk);
        const T sum = exp_row<T, Bytes>(row, h.nk, mx);
        inv[i] = T(1) / sum;
        lse_pair[t.slot(h.q0 + i, S)] = mx + std::log(sum);
      }
      gemm<T, Bytes>(h.nq, d, h.nk, P, ld, Vr + h.k0 * dp, dp, O, dp, false);
      for (int64_t i = 0; i < h.nq; ++i) {
        T* dst = out + (t.b * pb.N + t.token(h.q0 + i, S)) * pb.C +
                 t.head * d;
        for (int64_t k = 0; k < d; ++k) dst[k] = O[i * dp + k] * inv[i];
      }
    }
  }
}

template <typename T>
void forward_base(const Problem<T>& pb, T* out, T* lse, int64_t begin,
                  int64_t end) {
  forward_impl<T, 16>(pb, out, lse, begin, end);
}

#if BOAT_MM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void forward_avx2(const Problem<T>& pb,
                                                      T* out, T* lse,
                                                      int64_t begin,
                                                      int64_t end) {
  forward_impl<T, 32>(pb, out, lse, begin, end);
}
#endif

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------

template <typename T, int Bytes>
BOAT_MM_INLINE void backward_impl(const Problem<T>& pb, const T* grad_out,
                                  const T* lse, T* grad, int64_t begin,
                                  int64_t end) {
  constexpr int64_t W = Simd<T, Bytes>::kLanes;
  const int64_t d = pb.d, S = pb.S, C = pb.C, C3 = 3 * pb.C;
  Buffers<T> buf(d, S, W, /*rows=*/5, /*trans=*/2, /*scores=*/2,
                 /*query_rows=*/1);
  const int64_t dp = buf.dp, ld = buf.ld;
  T* Q = buf.ptr[0];   // (nt, dp) queries times scale
  T* Kr = buf.ptr[1];  // (nt, dp) keys
  T* dO = buf.ptr[2];  // (nt, dp) output gradients
  T* dK = buf.ptr[3];  // (nt, dp) key gradients
  T* dV = buf.ptr[4];  // (nt, dp) value gradients
  T* Kt = buf.ptr[5];  // (d, ld) keys, dimension-major
  T* Vt = buf.ptr[6];  // (d, ld) values, dimension-major
  T* P = buf.ptr[7];   // (nq, ld) probabilities
  T* dS = buf.ptr[8];  // (nq, ld) dP, then score gradients
  T* dQ = buf.ptr[9];  // (nq, dp) query gradients / scale
  using Sv = Simd<T, Bytes>;
  using V = typename Sv::V;
  for (int64_t task = begin; task < end; ++task) {
    const PairTask t(pb, task);
    pack<T>(pb, t, 0, pb.scale, dp, ld, Q, nullptr);
    pack<T>(pb, t, 1, T(1), dp, ld, Kr, Kt);
    pack<T>(pb, t, 2, T(1), dp, ld, nullptr, Vt);
    for (int64_t i = 0; i < t.nt; ++i) {
      const T* src = grad_out + (t.b * pb.N + t.token(i, S)) * C + t.head * d;
      std::copy(src, src + d, dO + i * dp);
    }
    std::fill(dK, dK + t.nt * dp, T(0));
    std::fill(dV, dV + t.nt * dp, T(0));
    const T* lse_pair = lse + t.first_slot;
    for (int c = 0; c < 2; ++c) {
      const auto h = t.half(c, pb.overlap);
      if (h.nq == 0) continue;
      gemm<T, Bytes>(h.nq, h.nk, d, Q + h.q0 * dp, dp, Kt + h.k0, ld, P, ld,
                     false);
      gemm<T, Bytes>(h.nq, h.nk, d, dO + h.q0 * dp, dp, Vt + h.k0, ld, dS,
                     ld, false);
      for (int64_t i = 0; i < h.nq; ++i) {
        T* p = P + i * ld;
        T* ds = dS + i * ld;
        exp_row<T, Bytes>(p, h.nk, lse_pair[t.slot(h.q0 + i, S)]);
        // D_i = sum_j P_ij dP_ij (= dO_i . O_i); both are 0 past nk.
        V acc = {};
        for (int64_t j = 0; j < h.nk; j += W) {
          acc += Sv::load(p + j) * Sv::load(ds + j);
        }
        const T D = Sv::sum(acc);
        for (int64_t j = 0; j < h.nk; j += W) {
          Sv::store(ds + j, Sv::load(p + j) * (Sv::load(ds + j) - D));
        }
      }
      // dQ = scale * dS K; dK += dS^T (scale * Q); dV += P^T dO.
      gemm<T, Bytes>(h.nq, d, h.nk, dS, ld, Kr + h.k0 * dp, dp, dQ, dp,
                     false);
      gemm<T, Bytes, true>(h.nk, d, h.nq, dS, ld, Q + h.q0 * dp, dp,
                           dK + h.k0 * dp, dp, true);
      gemm<T, Bytes, true>(h.nk, d, h.nq, P, ld, dO + h.q0 * dp, dp,
                           dV + h.k0 * dp, dp, true);
      for (int64_t i = 0; i < h.nq; ++i) {
        T* dst = grad + (t.b * pb.N + t.token(h.q0 + i, S)) * C3 + t.head * d;
        for (int64_t k = 0; k < d; ++k) dst[k] = dQ[i * dp + k] * pb.scale;
      }
    }
    for (int64_t i = 0; i < t.nt; ++i) {
      T* dst = grad + (t.b * pb.N + t.token(i, S)) * C3 + t.head * d;
      std::copy(dK + i * dp, dK + i * dp + d, dst + C);
      std::copy(dV + i * dp, dV + i * dp + d, dst + 2 * C);
    }
  }
}

template <typename T>
void backward_base(const Problem<T>& pb, const T* grad_out, const T* lse,
                   T* grad, int64_t begin, int64_t end) {
  backward_impl<T, 16>(pb, grad_out, lse, grad, begin, end);
}

#if BOAT_MM_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void backward_avx2(
    const Problem<T>& pb, const T* grad_out, const T* lse, T* grad,
    int64_t begin, int64_t end) {
  backward_impl<T, 32>(pb, grad_out, lse, grad, begin, end);
}
#endif

// ---------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------

// The kernels index qkv (and, backward, its gradient) with the tokens of
// perm's first `slots` columns unchecked: refuse any outside [0, N) first,
// for callers of the op itself (the Python wrapper checks as well).
void check_perm_range(const at::Tensor& perm, int64_t slots, int64_t N) {
  if (perm.size(0) == 0) return;  // an empty batch
  const auto [low, high] = at::aminmax(perm.narrow(1, 0, slots));
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < N, "perm holds token indices in [", lo, ", ",
              hi, "], outside [0, ", N, ") for N=", N,
              " tokens; take perm from balanced_hierarchical_clustering");
}

// Checks the arguments shared by both ops; returns the cluster sizes.
std::vector<int64_t> check_layout(const at::Tensor& qkv,
                                  const at::Tensor& perm,
                                  const at::Tensor& slot_valid,
                                  int64_t num_heads, int64_t slot_size,
                                  int64_t overlap) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0,
              "clustered_attention expects qkv of shape (B, N, 3 * C), got ",
              qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat ||
                  qkv.scalar_type() == at::kDouble,
              "clustered_attention's CPU kernel supports float32 and "
              "float64, got ", qkv.scalar_type(),
              "; use the tensor implementation (impl='tensor')");
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK(num_heads >= 1 && C % num_heads == 0, "num_heads (",
              num_heads, ") must divide the ", C, " channels");
  TORCH_CHECK(slot_size >= 1 && overlap >= 0,
              "slot_size must be >= 1 and overlap >= 0, got ", slot_size,
              " and ", overlap);
  TORCH_CHECK(slot_valid.dim() == 1 && slot_valid.scalar_type() == at::kBool,
              "slot_valid must be a 1-d bool tensor, got ",
              slot_valid.sizes(), " ", slot_valid.scalar_type());
  const int64_t slots = slot_valid.size(0);
  TORCH_CHECK(slots > 0 && slots % (2 * slot_size) == 0,
              "slot_valid must cover whole sibling pairs of 2 * ", slot_size,
              " slots, got ", slots);
  TORCH_CHECK(perm.dim() == 2 && perm.scalar_type() == at::kLong &&
                  perm.size(0) == B * num_heads && perm.size(1) == slots,
              "perm must be int64 of shape (B * num_heads, slots) = (",
              B * num_heads, ", ", slots, "), the clustering's of this "
              "slot layout, got ", perm.sizes(), " ", perm.scalar_type());
  const at::Tensor valid = slot_valid.cpu().contiguous();
  const bool* v = valid.data_ptr<bool>();
  std::vector<int64_t> sizes(slots / slot_size);
  int64_t total = 0;
  for (size_t c = 0; c < sizes.size(); ++c) {
    int64_t n = 0;
    while (n < slot_size && v[c * slot_size + n]) ++n;
    for (int64_t i = n; i < slot_size; ++i) {
      TORCH_CHECK(!v[c * slot_size + i],
                  "slot_valid must list each cluster's real slots first");
    }
    sizes[c] = n;
    total += n;
  }
  TORCH_CHECK(total == N, "slot_valid has ", total,
              " real slots for N=", N, " tokens");
  check_perm_range(perm, slots, N);
  return sizes;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& qkv, const at::Tensor& perm,
                        const std::vector<int64_t>& sizes, int64_t num_heads,
                        int64_t slot_size, int64_t overlap, double scale) {
  Problem<T> pb;
  pb.qkv = qkv.data_ptr<T>();
  pb.perm = perm.data_ptr<int64_t>();
  pb.sizes = sizes.data();
  pb.N = qkv.size(1);
  pb.C = qkv.size(2) / 3;
  pb.heads = num_heads;
  pb.d = pb.C / num_heads;
  pb.perm_stride = perm.size(1);
  pb.P = static_cast<int64_t>(sizes.size()) / 2;
  pb.S = slot_size;
  pb.overlap = overlap;
  pb.scale = static_cast<T>(scale);
  return pb;
}

// (B, C, H, W) image of the value channels of qkv.
at::Tensor value_image(const at::Tensor& qkv, at::IntArrayRef hw_shape) {
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  if (hw_shape.empty()) return qkv.new_empty({0});
  TORCH_CHECK(hw_shape.size() == 2 && hw_shape[0] * hw_shape[1] == N,
              "hw_shape ", hw_shape, " does not match N=", N, " tokens");
  return qkv.narrow(2, 2 * C, C).transpose(1, 2).contiguous().view(
      {B, C, hw_shape[0], hw_shape[1]});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clustered_attention_cpu(
    const at::Tensor& qkv_in, const at::Tensor& perm_in,
    const at::Tensor& slot_valid, int64_t num_heads, int64_t slot_size,
    int64_t overlap, double scale, at::IntArrayRef hw_shape) {
  const auto sizes = check_layout(qkv_in, perm_in, slot_valid, num_heads,
                                  slot_size, overlap);
  const at::Tensor qkv = qkv_in.contiguous(), perm = perm_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  at::Tensor out = at::empty({B, N, C}, qkv.options());
  // Padding slots keep 0 (never read): a defined output, so that eager
  // and traced runs agree.
  at::Tensor lse = at::zeros(perm.sizes(), qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "clustered_attention", [&] {
    const auto pb = make_problem<scalar_t>(qkv, perm, sizes, num_heads,
                                           slot_size, overlap, scale);
    auto fn = &forward_base<scalar_t>;
#if BOAT_MM_X86_DISPATCH
    if (cpu_has_avx2_fma()) fn = &forward_avx2<scalar_t>;
#endif
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* l = lse.data_ptr<scalar_t>();
    at::parallel_for(0, B * num_heads * pb.P, 1,
                     [&](int64_t begin, int64_t end) {
                       fn(pb, o, l, begin, end);
                     });
  });
  return {out, value_image(qkv, hw_shape), lse};
}

at::Tensor clustered_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& grad_image,
    const at::Tensor& qkv_in, const at::Tensor& perm_in,
    const at::Tensor& slot_valid, const at::Tensor& lse_in,
    int64_t num_heads, int64_t slot_size, int64_t overlap, double scale) {
  const auto sizes = check_layout(qkv_in, perm_in, slot_valid, num_heads,
                                  slot_size, overlap);
  const at::Tensor qkv = qkv_in.contiguous(), perm = perm_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, N, C}),
              "grad_out must have shape ", at::IntArrayRef({B, N, C}),
              ", got ", grad_out.sizes());
  TORCH_CHECK(lse_in.sizes() == perm.sizes(), "lse must have shape ",
              perm.sizes(), ", got ", lse_in.sizes());
  const at::Tensor go = grad_out.to(qkv.scalar_type()).contiguous();
  const at::Tensor lse = lse_in.to(qkv.scalar_type()).contiguous();
  // Every row is written once: each token is a real slot exactly once per
  // (sample, head), and its q, k and v gradients come from that slot.
  at::Tensor grad = at::empty_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(
      qkv.scalar_type(), "clustered_attention_backward", [&] {
        const auto pb = make_problem<scalar_t>(qkv, perm, sizes, num_heads,
                                               slot_size, overlap, scale);
        auto fn = &backward_base<scalar_t>;
#if BOAT_MM_X86_DISPATCH
        if (cpu_has_avx2_fma()) fn = &backward_avx2<scalar_t>;
#endif
        const scalar_t* g = go.data_ptr<scalar_t>();
        const scalar_t* l = lse.data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        at::parallel_for(0, B * num_heads * pb.P, 1,
                         [&](int64_t begin, int64_t end) {
                           fn(pb, g, l, out, begin, end);
                         });
      });
  if (grad_image.numel() > 0) {
    TORCH_CHECK(grad_image.numel() == B * C * N,
                "grad_image must hold (B, C, H, W) = ", B * C * N,
                " values, got ", grad_image.sizes());
    grad.narrow(2, 2 * C, C).add_(grad_image.reshape({B, C, N}).transpose(
        1, 2));
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(boat_mm, CPU, m) {
  m.impl("clustered_attention", &clustered_attention_cpu);
  m.impl("clustered_attention_backward", &clustered_attention_backward_cpu);
}

}  // namespace boat_mm
