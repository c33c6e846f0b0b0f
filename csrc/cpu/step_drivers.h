// Drivers for kernels written as one "step": K = VecIO::kStep elements that
// share a channel (planar layout) or K consecutive channels of one row
// (channels-inner layout). A step receives its per-channel coefficients as
// vectors (broadcast, or loaded at its channels), so one step body serves
// both layouts, and the last, partial step of a run (n < K) goes through the
// same body with partial loads instead of a scalar copy of the arithmetic.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cache_policy.h"
#include "layout.h"
#include "vec_io.h"

// Steps are small lambdas called from several places in a driver; GCC
// otherwise declines to inline them and passes their vectors through memory.
#define BNEXT_STEP __attribute__((always_inline))

namespace bnext::cpu {

// NC per-channel arrays of T, each presented to a step as NV vectors.
template <typename T, int NC, int NV>
struct ChannelCoefs {
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  struct Set {
    V v[NC][NV];
  };
  const T* p[NC];

  BNEXT_STEP void broadcast(int64_t c, Set& s) const {
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
      const V b(p[k][c]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) s.v[k][j] = b;
    }
  }
  // Channels [c, c + n); lanes past n are zero.
  BNEXT_STEP void load(int64_t c, int64_t n, Set& s) const {
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        const int64_t cnt = std::clamp<int64_t>(n - j * W, 0, W);
        const T* q = p[k] + c + j * W;
        s.v[k][j] = cnt == W ? V::loadu(q) : (cnt > 0 ? V::loadu(q, cnt) : V(T(0)));
      }
    }
  }
  // out = lo's coefficients for a step's first n elements, hi's for the
  // rest (a step across the boundary of two planes).
  BNEXT_STEP static void blend(const Set& lo, const Set& hi, int64_t n, Set& out) {
#pragma GCC unroll 8
    for (int k = 0; k < NC; ++k) {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        const int64_t cnt = std::clamp<int64_t>(n - j * W, 0, W);
        out.v[k][j] = V::set(hi.v[k][j], lo.v[k][j], cnt);
      }
    }
  }
};

// Two coefficient groups of different types (e.g. acc-dtype and float64).
template <typename A, typename B>
struct CoefPair {
  struct Set {
    typename A::Set a;
    typename B::Set b;
  };
  A a;
  B b;
  BNEXT_STEP void broadcast(int64_t c, Set& s) const {
    a.broadcast(c, s.a);
    b.broadcast(c, s.b);
  }
  BNEXT_STEP void load(int64_t c, int64_t n, Set& s) const {
    a.load(c, n, s.a);
    b.load(c, n, s.b);
  }
  BNEXT_STEP static void blend(const Set& lo, const Set& hi, int64_t n, Set& out) {
    A::blend(lo.a, hi.a, n, out.a);
    B::blend(lo.b, hi.b, n, out.b);
  }
};

// Channels-inner rows are walked in memory order, one row after another:
// a long stride per step (channel step first, or rows interleaved) defeats
// the hardware prefetcher. Reductions sum kReduceRowGroup rows into float
// accumulators (L1-resident, C per sum), then widen them into the
// thread's double partials: four terms per lane, few enough that the
// cancelling gradient sums keep float32 accuracy.
constexpr int kReduceRowGroup = 4;

// Wide rows (kSpreadChannels or more channels): the flush pass every 4
// rows is a larger share of the work, and from 512 channels those L1
// accumulators (2 C floats, plus 2 C doubles of partials) no longer fit
// L1 beside the rows streaming through it. There,
// kReduceRowGroup rows spaced nrows / kReduceRowGroup apart are summed in
// float registers, pairwise, and added into the double partials: the same
// four float terms per lane, one double update per four rows, no flush
// pass. The rows are spaced apart, not adjacent, because adjacent rows
// interleaved within one page defeat the hardware prefetcher; spaced rows
// are separate sequential streams. Below kSpreadChannels the row walk wins.
constexpr int64_t kSpreadChannels = 256;
// Blocks of the spread walk from kManyChannels channels: longer than the
// statistics' 8-16 rows, to keep each spaced stream going.
constexpr int64_t kSpreadBlockRows = 64;

// Rows per block of the spread walk, for elements of elem_bytes.
inline int64_t spread_block_rows(int64_t C, int64_t elem_bytes) {
  return C >= kManyChannels ? kSpreadBlockRows : reduce_block_rows(C, elem_bytes);
}
// Whether reduce_steps takes the spread walk (channels-inner rows of
// kSpreadChannels or more; the register walk never fits that many).
inline bool spread_walk(const ChannelLayout& L) {
  return L.channels_inner && L.C >= kSpreadChannels;
}

// Narrow rows (C a multiple of the step, at most kRegisterRowSteps steps,
// and the row's coefficients and float sums fitting the vector register
// file): the register walk goes through rows in memory order like the row
// walk, but keeps every channel's coefficients and float sums in registers
// for the whole block, so a step is two loads and no L1 accumulator
// traffic (the row walk's step is five loads and two stores).
constexpr int kRegisterRowSteps = 8;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
// Registers left for a step's own loads and temporaries.
constexpr int kStepScratchRegisters = 8;
// The register walk widens its sums into double every kReduceRowGroup rows,
// like the row walk (bitwise the same sums). Fewer widenings would be
// faster, but 8 float terms per lane lose float32 accuracy on long
// channels (test_large_tensors_match_torch's 64-channel case).

// Whether elementwise_steps may write with streaming stores
// (cache_policy.h). Only where every 64-byte line of the output is written
// whole by them: a line written partly by a streaming store and partly by a
// normal one (an unaligned plane start, an overlapping last step) costs a
// read-modify-write in memory, more than streaming saves.
//   stream: runs (planes, rows) are whole lines; every walk may stream.
//   flat:   planes are not whole lines; elementwise_steps streams them with
//           the flat walk (flat_plane_steps), which steps through a task's
//           planes at line-aligned offsets, across plane boundaries.
//           Other walks write them with normal stores.
struct StepOutput {
  bool stream = false;
  bool flat = false;
  int64_t line_elems = 0;  // output elements per 64-byte line

  // For a pass that reads and writes `tensors` tensors of the output's size
  // (the output included) and writes the output at `base`.
  template <typename T>
  static StepOutput of(const ChannelLayout& L, const T* base, int tensors) {
    constexpr int64_t kLine = 64;
    const int64_t elem = static_cast<int64_t>(sizeof(T));
    const int64_t run_bytes = (L.channels_inner ? L.C : L.S) * elem;
    if (reinterpret_cast<uintptr_t>(base) % kLine != 0 ||
        !stream_stores(tensors * L.N * L.C * L.S * elem,
                       L.channels_inner && run_bytes >= kWideRowBytes)) {
      return {};
    }
    const bool whole = run_bytes % kLine == 0;
    return {whole, !whole && !L.channels_inner, kLine / elem};
  }
  // A task's tail fence is needed.
  bool any() const {
    return stream || flat;
  }
};

// Every step of one plane [offset, offset + S) with coefficient set s (the
// planar half of elementwise_steps).
template <int64_t K, typename Set, typename Step>
BNEXT_STEP void plane_steps(Step& step_l, const Set& s, int64_t offset, int64_t S, bool stream) {
  if (S < K) {
    step_l(offset, S, s, false);
  } else {
    // Streaming runs are whole lines, so whole steps (StepOutput::of).
    int64_t i = 0;
    for (; i + K <= S; i += K) step_l(offset + i, K, s, stream);
    if (i < S) {
      // float32/float64 steps (K no wider than a float vector) end with a
      // masked partial step where AVX-512 has masks, as torch's loop does:
      // an overlapping full step rewrites lines just written. Half-type
      // steps keep the overlap, which is cheaper than their masked
      // conversion.
      if constexpr (kMaskedPartialSteps && K <= Vectorized<float>::size()) {
        step_l(offset + i, S - i, s, false);
      } else {
        step_l(offset + S - K, K, s, false);
      }
    }
  }
}

// Every step of planes [begin, end) (plane p: channel p % C, at p * S,
// S >= K) at element offsets that are multiples of K: a step across two
// planes gets the first plane's coefficients in its lower lanes, the
// second's in the rest. With line_elems (output elements per 64-byte line)
// nonzero, full steps inside the task's whole lines stream; the partial
// steps at the task's ends do not. The same elements
// get the same coefficients as plane by plane, so results are bitwise the
// same.
template <int64_t K, typename Coefs, typename Step>
BNEXT_STEP void flat_plane_steps(
    Step& step_l, const Coefs& coefs_l, int64_t C, int64_t S, int64_t begin, int64_t end,
    int64_t line_elems) {
  using Set = typename Coefs::Set;
  const int64_t first = begin * S, last = end * S;
  // Steps in [s0, s1) stream: whole lines of this task only (none when
  // line_elems is 0).
  const int64_t s0 = line_elems > 0 ? (first + line_elems - 1) / line_elems * line_elems : 0;
  const int64_t s1 = line_elems > 0 ? last / line_elems * line_elems : 0;
  int64_t c = begin % C;
  int64_t plane_end = first + S;
  Set s;
  coefs_l.broadcast(c, s);
  int64_t i = first;
  // Up to the first multiple of K: inside the first plane, since S >= K.
  if (const int64_t head = (K - i % K) % K; head > 0) {
    step_l(i, head, s, false);
    i += head;
  }
  for (; i + K <= last; i += K) {
    if (i == plane_end) {
      if (++c == C) c = 0;
      plane_end += S;
      coefs_l.broadcast(c, s);
    }
    const bool st = i >= s0 && i + K <= s1;
    if (i + K <= plane_end) {
      step_l(i, K, s, st);
    } else {
      // Across the boundary; the next plane is longer than the rest of
      // the step (S >= K), so it ends after this step.
      if (++c == C) c = 0;
      Set next, both;
      coefs_l.broadcast(c, next);
      Coefs::blend(s, next, plane_end - i, both);
      step_l(i, K, both, st);
      s = next;
      plane_end += S;
    }
  }
  // Less than a step is left, so it lies in the current plane: had that
  // plane ended at i, the next (S >= K elements) would have held one more
  // full step.
  if (i < last) {
    step_l(i, last - i, s, false);
  }
}

// step(i, n, set, stream) for steps covering every element; i is the
// element offset of the step, and `stream` says whether its (full) store
// may stream. A planar run of len >= K elements ends in a masked partial
// step for float32/float64 with AVX-512 (plane_steps); otherwise its last
// step is moved back to end at len, overlapping the one before (a partial
// step through a buffer cost as much as the rest of a 7x7 bf16 plane).
// Overlapped elements are computed twice from the same inputs, so a step
// must never write memory it reads (every caller writes a fresh output).
// Longer than a screen for the reason reduce_steps is: its walks (planar
// runs, flat streamed planes, paired rows) are lambdas over the same local
// step and coefficient copies, chosen once at the end.
template <int64_t K, typename Coefs, typename Step>
void elementwise_steps(
    const ChannelLayout& L, const Coefs& coefs, StepOutput out, Step&& step) {
  using Set = typename Coefs::Set;
  // Every task works on local copies of the step and the coefficient
  // pointers: vector stores are may_alias, so pointers read through a
  // reference would be reloaded after each store.
  parallel_elementwise(
      L,
      [&](int64_t begin, int64_t end) {
        const Coefs coefs_l = coefs;
        auto step_l = step;
        const int64_t S = L.S;
        const bool stream = out.stream;
        if (out.flat && S >= K) {
          flat_plane_steps<K>(step_l, coefs_l, L.C, S, begin, end, out.line_elems);
          return;
        }
        // Channel of plane p is p % C; stepped, not divided: a 64-bit
        // division per 7x7 plane costs as much as normalizing it.
        int64_t c = begin % L.C;
        for (int64_t p = begin; p < end; ++p) {
          const int64_t offset = p * S;
          Set s;
          coefs_l.broadcast(c, s);
          plane_steps<K>(step_l, s, offset, S, stream);
          if (++c == L.C) {
            c = 0;
          }
        }
      },
      [&](int64_t offset, int64_t nrows) {
        const Coefs coefs_l = coefs;
        auto step_l = step;
        const bool stream = out.stream;
        const int64_t C = L.C;
        const int64_t full = C - C % K;
        // Rows r and r + h (h: half the task's rows) share each load of a
        // step's coefficients: a float32 grad_input step loads six
        // coefficient vectors (three float64 arrays) for two of data, so
        // at many channels the coefficient loads were most of the step.
        // Far-apart rows, not adjacent ones, for the prefetcher (see the
        // spread walk below).
        const int64_t h = nrows / 2;
        const int64_t apart = h * C;
        // fn(c, n, set, stream) for every step of a row, with the step's
        // coefficients; full steps with a literal K, so every length check
        // folds away.
        auto row_steps = [&](auto&& fn) BNEXT_STEP {
          for (int64_t c = 0; c < full; c += K) {
            Set s;
            coefs_l.load(c, K, s);
            fn(c, K, s, stream);
          }
          if (full < C) {
            Set s;
            coefs_l.load(full, C - full, s);
            fn(full, C - full, s, false);
          }
        };
        for (int64_t r = 0; r < h; ++r) {
          const int64_t base = offset + r * C;
          row_steps([&](int64_t c, int64_t n, const Set& s, bool st) BNEXT_STEP {
            step_l(base + c, n, s, st);
            step_l(base + apart + c, n, s, st);
          });
        }
        for (int64_t r = 2 * h; r < nrows; ++r) {
          const int64_t base = offset + r * C;
          row_steps([&](int64_t c, int64_t n, const Set& s, bool st) BNEXT_STEP {
            step_l(base + c, n, s, st);
          });
        }
      },
      out.any());
}

// Float lanes of sum(g) and sum(g * t), widened into double lanes after a
// few terms: the gradient sums cancel heavily (g is close to zero-mean), and
// 8 float terms per lane keep their rounding far below float32 tolerance.
template <typename acc_t, int P>
struct PairLanes {
  using V = Vectorized<acc_t>;
  using D = Vectorized<double>;
  using Widen = ToDouble<acc_t>;
  static constexpr int Q = P * Widen::kParts;
  V s[P], st[P];
  D ds[Q], dst[Q];

  PairLanes() {
    clear_float();
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      ds[q] = D(0.0);
      dst[q] = D(0.0);
    }
  }
  void clear_float() {
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      s[j] = V(acc_t(0));
      st[j] = V(acc_t(0));
    }
  }
  BNEXT_STEP void add(const V* g, const V* t) {
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      s[j] = s[j] + g[j];
      st[j] = at::vec::fmadd(g[j], t[j], st[j]);
    }
  }
  void flush() {
    add_double(s, st);
    clear_float();
  }
  // Adds float sums of g and g * t (fg, fgt), widened, to the double lanes.
  BNEXT_STEP void add_double(const V* fg, const V* fgt) {
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      D a[Widen::kParts], b[Widen::kParts];
      Widen::apply(fg[j], a);
      Widen::apply(fgt[j], b);
#pragma GCC unroll 8
      for (int q = 0; q < Widen::kParts; ++q) {
        ds[j * Widen::kParts + q] = ds[j * Widen::kParts + q] + a[q];
        dst[j * Widen::kParts + q] = dst[j * Widen::kParts + q] + b[q];
      }
    }
  }
  // Adds other's sums (flushed) into this one's double lanes.
  void merge(PairLanes& other) {
    other.flush();
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      ds[q] = ds[q] + other.ds[q];
      dst[q] = dst[q] + other.dst[q];
    }
  }
  // Flushes, then returns the horizontal totals (one channel's run). The
  // Q double lanes are added vertically first: one horizontal sum per
  // total, not one per lane (a 14x14 bfloat16 plane's two chains took 16,
  // as many instructions as summing the plane).
  std::pair<double, double> totals() {
    flush();
    D a = ds[0], b = dst[0];
#pragma GCC unroll 8
    for (int q = 1; q < Q; ++q) {
      a = a + ds[q];
      b = b + dst[q];
    }
    return {hsum(a), hsum(b)};
  }
};

// sum(g) and sum(g * t) over one planar run [offset, offset + len) whose
// steps share the coefficient set s, in float64. step(i, n, s, g, t) as in
// reduce_steps.
template <typename IO, typename Set, typename Step>
BNEXT_STEP std::pair<double, double> run_pair_sums(
    Step& step_l, const Set& s, int64_t offset, int64_t len) {
  using V = typename IO::V;
  using Lanes = PairLanes<typename IO::acc_t, IO::kParts>;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  constexpr int kFlushPairs = 8;  // two chains x 8 steps between flushes
  Lanes l0, l1;  // two independent chains hide FMA latency
  V g[P], t[P];
  // Flushes only before a chain's ninth float term: a plane of a few
  // dozen steps (14x14) is widened twice in all, at the end (merge,
  // totals), not four times.
  int64_t i = 0;
  int64_t pairs = 0;  // terms per lane in each chain since its flush
  while (i + 2 * K <= len) {
    if (pairs == kFlushPairs) {
      l0.flush();
      l1.flush();
    }
    const int64_t start = i;
    const int64_t stop = std::min(len, i + 2 * K * kFlushPairs);
    for (; i + 2 * K <= stop; i += 2 * K) {
      step_l(offset + i, K, s, g, t);
      l0.add(g, t);
      step_l(offset + i + K, K, s, g, t);
      l1.add(g, t);
    }
    pairs = (i - start) / (2 * K);
  }
  if (pairs == kFlushPairs && i < len) {
    l0.flush();
    l1.flush();
  }
  if (i + K <= len) {  // at most one full step is left
    step_l(offset + i, K, s, g, t);
    l1.add(g, t);
    i += K;
  }
  if (i < len) {
    if (len >= K) {  // the last step ends at len (zero_lanes_below)
      step_l(offset + len - K, K, s, g, t);
      zero_step_lanes_below<P>(g, K - (len - i));
      zero_step_lanes_below<P>(t, K - (len - i));  // 0 * inf would be NaN
    } else {
      step_l(offset + i, len - i, s, g, t);
    }
    l0.add(g, t);
  }
  l0.merge(l1);
  return l0.totals();
}

// Per-channel sum(g) and sum(g * t) in float64, where step(i, n, set, g, t)
// yields P acc vectors of g and t for a step (lanes past n must give g = 0).
// Deterministic for a given thread count: fixed chunks, fixed combine order.
// Longer than a screen on purpose: its five walks (planar runs, row,
// spread, register and small-plane block walks) are lambdas over the same
// local step, coefficient copies and per-thread partials, and the choice
// between them is made once at the end; as separate functions each would
// take those as a dozen parameters.
template <typename IO, typename Coefs, typename Step>
void reduce_steps(
    const ChannelLayout& L,
    const Coefs& coefs,
    Step&& step,
    double* sum_g,
    double* sum_gt) {
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  using Set = typename Coefs::Set;
  using Lanes = PairLanes<acc_t, IO::kParts>;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  // Channels per small-plane block: their lanes (384 bytes each for
  // float32, 768 for bfloat16) stay within half of L1.
  constexpr int64_t kBlockLanes = 16384 / static_cast<int64_t>(sizeof(Lanes));
  constexpr int64_t kBlockSumsMaxPlane = 64;

  const int64_t C = L.C;
  const int64_t Cpad = (C + K - 1) / K * K;  // full-vector stores at the tail
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * 2 * Cpad, 0.0);

  auto run = [&](int tid, int64_t c, int64_t offset, int64_t len) {
    const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
    auto step_l = step;
    Set s;
    coefs_l.broadcast(c, s);
    const auto [a, b] = run_pair_sums<IO>(step_l, s, offset, len);
    double* part = partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    part[c] += a;
    part[Cpad + c] += b;
  };

  // Vectors a step keeps live in the register walk: its coefficients and
  // its two float sums.
  constexpr int64_t kRegsPerStep =
      static_cast<int64_t>(sizeof(Set) / sizeof(V)) + 2 * P;
  const int64_t row_steps = C / K;
  const bool in_registers = L.channels_inner && C % K == 0 && row_steps >= 1 &&
      row_steps <= kRegisterRowSteps &&
      row_steps * kRegsPerStep <= kVectorRegisters - kStepScratchRegisters;

  const bool row_walk = L.channels_inner && !spread_walk(L) && !in_registers;
  // Float accumulators of the row walk, zero between flushes.
  std::vector<acc_t> float_partial(
      row_walk ? static_cast<size_t>(nthreads) * 2 * Cpad : 0, acc_t(0));

  auto rows = [&](int tid, int64_t offset, int64_t nrows) {
    constexpr int64_t W = V::size();
    const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
    auto step_l = step;
    double* const ps = partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    double* const pst = ps + Cpad;
    acc_t* const fs = float_partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    acc_t* const fst = fs + Cpad;
    const int64_t full = C - C % K;
    // One step of one row into the float accumulators (lanes past n add 0).
    auto add_step = [&](int64_t i, int64_t c, int64_t n) BNEXT_STEP {
      Set s;
      coefs_l.load(c, n, s);
      V g[P], t[P];
      step_l(i, n, s, g, t);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        acc_t* a = fs + c + j * W;
        acc_t* b = fst + c + j * W;
        (V::loadu(a) + g[j]).store(a);
        at::vec::fmadd(g[j], t[j], V::loadu(b)).store(b);
      }
    };
    int64_t r = 0;
    while (r < nrows) {
      const int64_t stop = std::min(nrows, r + kReduceRowGroup);
      for (; r < stop; ++r) {
        const int64_t base = offset + r * C;
        for (int64_t c = 0; c < full; c += K) add_step(base + c, c, K);  // literal K
        if (full < C) add_step(base + full, full, C - full);
      }
      for (int64_t c = 0; c < Cpad; c += W) {
        add_widened(ps, pst, c, V::loadu(fs + c), V::loadu(fst + c));
        V(acc_t(0)).store(fs + c);
        V(acc_t(0)).store(fst + c);
      }
    }
  };

  // Spread walk (above): kReduceRowGroup rows of one step at a time.
  auto spread_rows = [&](int tid, int64_t offset, int64_t nrows) {
    constexpr int64_t W = V::size();
    const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
    auto step_l = step;
    double* const ps = partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    double* const pst = ps + Cpad;
    const int64_t full = C - C % K;
    auto widen_add = [&](int64_t c, const V* sg, const V* sgt) BNEXT_STEP {
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) add_widened(ps, pst, c + j * W, sg[j], sgt[j]);
    };
    // Rows i, i + stride: their float sums (one rounding each).
    auto pair = [&](int64_t i, int64_t stride, int64_t n, const Set& s, V* sg, V* sgt)
        BNEXT_STEP {
      V g0[P], t0[P], g1[P], t1[P];
      step_l(i, n, s, g0, t0);
      step_l(i + stride, n, s, g1, t1);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        sg[j] = g0[j] + g1[j];
        sgt[j] = at::vec::fmadd(g1[j], t1[j], g0[j] * t0[j]);
      }
    };
    static_assert(kReduceRowGroup == 4, "the spread walk sums two pairs of rows");
    auto group = [&](int64_t i, int64_t stride, int64_t c, int64_t n) BNEXT_STEP {
      Set s;
      coefs_l.load(c, n, s);
      V sa[P], sta[P], sb[P], stb[P];
      pair(i, stride, n, s, sa, sta);
      pair(i + 2 * stride, stride, n, s, sb, stb);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        sa[j] = sa[j] + sb[j];
        sta[j] = sta[j] + stb[j];
      }
      widen_add(c, sa, sta);
    };
    auto single = [&](int64_t i, int64_t c, int64_t n) BNEXT_STEP {
      Set s;
      coefs_l.load(c, n, s);
      V g[P], t[P];
      step_l(i, n, s, g, t);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) t[j] = g[j] * t[j];
      widen_add(c, g, t);
    };
    const int64_t h = nrows / kReduceRowGroup;
    const int64_t stride = h * C;
    for (int64_t r = 0; r < h; ++r) {
      const int64_t base = offset + r * C;
      for (int64_t c = 0; c < full; c += K) group(base + c, stride, c, K);  // literal K
      if (full < C) group(base + full, stride, full, C - full);
    }
    for (int64_t r = h * kReduceRowGroup; r < nrows; ++r) {
      const int64_t base = offset + r * C;
      for (int64_t c = 0; c < full; c += K) single(base + c, c, K);
      if (full < C) single(base + full, full, C - full);
    }
  };

  // Register walk (above) for NS steps per row.
  auto register_rows = [&](auto ns, int tid, int64_t offset, int64_t nrows) BNEXT_STEP {
    constexpr int NS = decltype(ns)::value;
    constexpr int64_t W = V::size();
    const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
    auto step_l = step;
    double* const ps = partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    double* const pst = ps + Cpad;
    Set s[NS];
    V sg[NS][P], sgt[NS][P];
#pragma GCC unroll 8
    for (int st = 0; st < NS; ++st) {
      coefs_l.load(st * K, K, s[st]);
#pragma GCC unroll 4
      for (int j = 0; j < P; ++j) {
        sg[st][j] = V(acc_t(0));
        sgt[st][j] = V(acc_t(0));
      }
    }
    int64_t r = 0;
    while (r < nrows) {
      const int64_t stop = std::min(nrows, r + kReduceRowGroup);
      for (; r < stop; ++r) {
        const int64_t base = offset + r * NS * K;
#pragma GCC unroll 8
        for (int st = 0; st < NS; ++st) {
          V g[P], t[P];
          step_l(base + st * K, K, s[st], g, t);
#pragma GCC unroll 4
          for (int j = 0; j < P; ++j) {
            sg[st][j] = sg[st][j] + g[j];
            sgt[st][j] = at::vec::fmadd(g[j], t[j], sgt[st][j]);
          }
        }
      }
#pragma GCC unroll 8
      for (int st = 0; st < NS; ++st) {
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          add_widened(ps, pst, st * K + j * W, sg[st][j], sgt[st][j]);
          sg[st][j] = V(acc_t(0));
          sgt[st][j] = V(acc_t(0));
        }
      }
    }
  };
  // Small planes of at most kBlockSumsMaxPlane elements
  // (parallel_channel_blocks): a channel's double lanes stay in a stack
  // array over the whole batch and are reduced once, at the end, where the
  // per-plane walk reduced them at every 7x7 plane. Each step is widened
  // into double at once. The per-plane walk's 7x7 planes give most lanes a
  // single float term; letting terms build up in float lanes here would
  // cost accuracy on the weight gradient. 14x14 planes are faster with
  // the per-plane walk and keep it.
  auto block_sums = [&](int tid, int64_t c0, int64_t c1) {
    const Coefs coefs_l = coefs;  // local copies: see elementwise_steps
    auto step_l = step;
    const int64_t S = L.S, tail = S % K;
    Lanes lanes[kBlockLanes];
    V g[P], t[P];
    for (int64_t n = 0; n < L.N; ++n) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t offset = (n * C + c) * S;
        Lanes& l = lanes[c - c0];
        Set s;
        coefs_l.broadcast(c, s);
        auto add = [&]() BNEXT_STEP {
          V gt[P];
#pragma GCC unroll 4
          for (int j = 0; j < P; ++j) gt[j] = g[j] * t[j];
          l.add_double(g, gt);
        };
        for (int64_t i = 0; i + K <= S; i += K) {
          step_l(offset + i, K, s, g, t);
          add();
        }
        if (tail > 0) {  // the last step ends at S (zero_lanes_below)
          step_l(offset + S - K, K, s, g, t);
          zero_step_lanes_below<P>(g, K - tail);
          zero_step_lanes_below<P>(t, K - tail);
          add();
        }
      }
    }
    double* part = partial.data() + static_cast<size_t>(tid) * 2 * Cpad;
    for (int64_t c = c0; c < c1; ++c) {
      const auto [a, b] = lanes[c - c0].totals();
      part[c] += a;
      part[Cpad + c] += b;
    }
  };

  const int64_t elem_bytes = static_cast<int64_t>(sizeof(typename IO::scalar_type));
  // Three tensors: grad_input's pass reads g's and t's sources again and
  // writes its output.
  if (L.S <= kBlockSumsMaxPlane &&
      parallel_channel_blocks(L, elem_bytes, K, kBlockLanes, /*tensors=*/3, block_sums)) {
    // Every channel was summed by block_sums.
  } else if (in_registers) {
    parallel_reduce_chunks(
        L, run,
        [&](int tid, int64_t offset, int64_t nrows) {
          auto with = [&](auto ns) {
            if constexpr (decltype(ns)::value * kRegsPerStep <=
                          kVectorRegisters - kStepScratchRegisters) {
              register_rows(ns, tid, offset, nrows);
            }
          };
          static_assert(kRegisterRowSteps == 8, "one case per step count");
          switch (row_steps) {
            case 1: with(std::integral_constant<int, 1>{}); break;
            case 2: with(std::integral_constant<int, 2>{}); break;
            case 3: with(std::integral_constant<int, 3>{}); break;
            case 4: with(std::integral_constant<int, 4>{}); break;
            case 5: with(std::integral_constant<int, 5>{}); break;
            case 6: with(std::integral_constant<int, 6>{}); break;
            case 7: with(std::integral_constant<int, 7>{}); break;
            default: with(std::integral_constant<int, 8>{}); break;
          }
        },
        reduce_block_rows(C, elem_bytes));
  } else if (spread_walk(L)) {
    parallel_reduce_chunks(L, run, spread_rows, spread_block_rows(C, elem_bytes));
  } else {
    parallel_reduce_chunks(L, run, rows, reduce_block_rows(C, elem_bytes));
  }

  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < nthreads; ++t) {
      a += partial[static_cast<size_t>(t) * 2 * Cpad + c];
      b += partial[static_cast<size_t>(t) * 2 * Cpad + Cpad + c];
    }
    sum_g[c] = a;
    sum_gt[c] = b;
  }
}

}  // namespace bnext::cpu
