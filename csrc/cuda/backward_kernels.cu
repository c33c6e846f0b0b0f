// Backward of (fused) batch norm on CUDA, the CPU's two passes (see
// launch.h and csrc/cpu/fused_kernels.h):
//   reduce:   grid-split sums of g and g * t per channel (float per block,
//             float64 across blocks), writing g as grad_residual if asked;
//   finalize: one thread per channel, float64: grad_weight, grad_bias and
//             the grad_input coefficients A, B, K;
//   apply:    grad_input = g * A + t * B + K, one elementwise pass.
// g = dy * act'(z) and t are rebuilt per element from the saved tensor, so
// no pre-activation or mask is ever stored.
#include "activation.cuh"
#include "device_utils.cuh"

namespace bnext::cuda {

namespace {

// A planar reduce block gets at least 4 packs per thread: with fewer, its
// fixed cost (coefficients, block sum, a partial write) dominates.
constexpr int64_t kMinPacksPerBlock = int64_t(kThreads) * 4;

// Per-channel inputs of the backward: statistics, parameters.
template <typename A>
struct ChannelStats {
  const double* mean;
  const A* invstd_or_var;
  bool from_var;
  A eps;
  const A* weight;
  const A* bias;

  __device__ __forceinline__ A invstd(int64_t c) const {
    return from_var ? A(1) / sqrt(invstd_or_var[c] + eps) : invstd_or_var[c];
  }
  __device__ __forceinline__ A w(int64_t c) const { return weight != nullptr ? weight[c] : A(1); }
  __device__ __forceinline__ A b(int64_t c) const { return bias != nullptr ? bias[c] : A(0); }

  // What rebuilds z and t: from the input, the forward's own mean_hi, alpha
  // and beta (so z, and every relu mask, is bit-identical to the forward's);
  // from the output, beta = bias (t = act^-1(y) - r - bias).
  __device__ __forceinline__ void rebuild(int64_t c, bool saved_is_output, A& mh, A& al, A& be) const {
    if (saved_is_output) {
      mh = A(0);
      al = A(1);
      be = b(c);
      return;
    }
    const double m = mean[c];
    mh = static_cast<A>(m);
    al = invstd(c) * w(c);
    be = static_cast<A>(static_cast<double>(b(c)) - (m - static_cast<double>(mh)) * static_cast<double>(al));
  }
};

// t and g of one pack, lane e using coefficients (mh, al, be)[e].
template <typename T, int kVec, Act kAct, bool kSavedIsOutput>
struct GradTerms {
  using A = acc_of<T>;
  using Fn = ActFn<kAct, A>;
  static constexpr bool kNeedsSaved = kSavedIsOutput || kAct != Act::Identity;

  __device__ __forceinline__ static void centred(
      const A (&s)[kVec], const A (&r)[kVec], bool has_residual, const A (&mh)[kVec],
      const A (&be)[kVec], A slope, A (&t)[kVec]) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if constexpr (kSavedIsOutput) {
        A u = Fn::inverse(s[e], slope);
        if (has_residual) u -= r[e];
        t[e] = u - be[e];
      } else {
        t[e] = s[e] - mh[e];
      }
    }
  }

  // Needs t from centred() first (from the input, z is rebuilt from it).
  __device__ __forceinline__ static void grad(
      const A (&dy)[kVec], const A (&s)[kVec], const A (&r)[kVec], bool has_residual,
      const A (&t)[kVec], const A (&al)[kVec], const A (&be)[kVec], A slope, A (&g)[kVec]) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if constexpr (kSavedIsOutput) {
        g[e] = Fn::vjp_at_output(dy[e], s[e], slope);
      } else if constexpr (kAct == Act::Identity) {
        g[e] = dy[e];
      } else {
        A z = t[e] * al[e] + be[e];  // as in the forward
        if (has_residual) z += r[e];
        g[e] = Fn::vjp(dy[e], z, slope);
      }
    }
  }

  __device__ __forceinline__ static void both(
      const A (&dy)[kVec], const A (&s)[kVec], const A (&r)[kVec], bool has_residual,
      const A (&mh)[kVec], const A (&al)[kVec], const A (&be)[kVec], A slope,
      A (&g)[kVec], A (&t)[kVec]) {
    centred(s, r, has_residual, mh, be, slope, t);
    grad(dy, s, r, has_residual, t, al, be, slope, g);
  }
};

template <typename T>
struct ReduceArgs {
  const T* dy;
  const T* saved;
  const T* residual;
  T* g_out;  // grad_residual, or null
  ChannelStats<acc_of<T>> st;
  acc_of<T> slope;
  acc_of<T>* part_g;   // [splits * C]
  acc_of<T>* part_gt;  // [splits * C]
};

template <typename A>
__device__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kThreads / 32], sb[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < static_cast<int>(blockDim.x / 32);
    a = warp_sum(live ? sa[lane] : A(0));
    b = warp_sum(live ? sb[lane] : A(0));
  }
}

// Planar: block (c, split) over vectors [begin, end) of channel c.
template <typename T, int kVec, Act kAct, bool kSavedIsOutput>
__global__ void __launch_bounds__(kThreads) reduce_planar_kernel(
    ReduceArgs<T> a, int64_t C, int64_t SV, int64_t vecs, int64_t chunk) {
  using A = acc_of<T>;
  using Terms = GradTerms<T, kVec, kAct, kSavedIsOutput>;
  const int64_t c = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < vecs ? begin + chunk : vecs;
  A mh[kVec], al[kVec], be[kVec];
  a.st.rebuild(c, kSavedIsOutput, mh[0], al[0], be[0]);
#pragma unroll
  for (int e = 1; e < kVec; ++e) {
    mh[e] = mh[0];
    al[e] = al[0];
    be[e] = be[0];
  }
  const bool has_res = a.residual != nullptr;
  A sg = 0, sgt = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
    const int64_t n = index_div(k, SV);
    const int64_t off = ((n * C + c) * SV + (k - n * SV)) * kVec;
    A dy[kVec], s[kVec], r[kVec], g[kVec], t[kVec];
    load_acc<T, kVec>(a.dy + off, dy);
    load_acc<T, kVec>(a.saved + off, s);
    if (has_res) load_acc<T, kVec>(a.residual + off, r);
    Terms::both(dy, s, r, has_res, mh, al, be, a.slope, g, t);
    if (a.g_out != nullptr) store_acc<T, kVec>(a.g_out + off, g);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      sg += g[e];
      sgt += g[e] * t[e];
    }
  }
  block_sum2(sg, sgt);
  if (threadIdx.x == 0) {
    a.part_g[split * C + c] = sg;
    a.part_gt[split * C + c] = sgt;
  }
}

// Channels-inner: (tx, ty) blocks as the statistics pass.
template <typename T, int kVec, Act kAct, bool kSavedIsOutput>
__global__ void __launch_bounds__(kThreads) reduce_inner_kernel(
    ReduceArgs<T> a, int64_t rows, int64_t CV, int64_t rows_per_split) {
  using A = acc_of<T>;
  using Terms = GradTerms<T, kVec, kAct, kSavedIsOutput>;
  __shared__ A s_g[kThreads * kVec];
  __shared__ A s_gt[kThreads * kVec];
  const int tx = blockDim.x;
  const int ty = blockDim.y;
  const int64_t C = CV * kVec;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  A sg[kVec], sgt[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) sg[e] = sgt[e] = 0;
  if (cv < CV) {
    A mh[kVec], al[kVec], be[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) a.st.rebuild(cv * kVec + e, kSavedIsOutput, mh[e], al[e], be[e]);
    const bool has_res = a.residual != nullptr;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += ty) {
      const int64_t off = (r * CV + cv) * kVec;
      A dy[kVec], s[kVec], rr[kVec], g[kVec], t[kVec];
      load_acc<T, kVec>(a.dy + off, dy);
      load_acc<T, kVec>(a.saved + off, s);
      if (has_res) load_acc<T, kVec>(a.residual + off, rr);
      Terms::both(dy, s, rr, has_res, mh, al, be, a.slope, g, t);
      if (a.g_out != nullptr) store_acc<T, kVec>(a.g_out + off, g);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        sg[e] += g[e];
        sgt[e] += g[e] * t[e];
      }
    }
  }
  const int tid = threadIdx.y * tx + threadIdx.x;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    s_g[tid * kVec + e] = sg[e];
    s_gt[tid * kVec + e] = sgt[e];
  }
  __syncthreads();
  if (threadIdx.y != 0 || cv >= CV) {
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    A tg = 0, tgt = 0;
    for (int yy = 0; yy < ty; ++yy) {
      tg += s_g[(yy * tx + threadIdx.x) * kVec + e];
      tgt += s_gt[(yy * tx + threadIdx.x) * kVec + e];
    }
    a.part_g[split * C + cv * kVec + e] = tg;
    a.part_gt[split * C + cv * kVec + e] = tgt;
  }
}

// The phase ops' sums (launch.h, BackwardArgs).
struct PhaseSums {
  double* sums_out;
  const double* sums_in;
  const double* count_in;
};

// Per channel, in float64 (formulas of csrc/cpu/channel_math.cpp
// backward_coeffs and the fused op's from-output adjustment). Writes the
// apply pass's coefficients [A | B | K | mh | al | be] (acc, 6 * C).
template <typename A>
__global__ void backward_finalize_kernel(
    int64_t C,
    int64_t splits,
    const A* __restrict__ part_g,
    const A* __restrict__ part_gt,
    ChannelStats<A> st,
    bool saved_is_output,
    bool train,
    double count,
    A* __restrict__ grad_weight,
    A* __restrict__ grad_bias,
    A* __restrict__ coef,
    PhaseSums phase) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) {
    return;
  }
  double s = 0.0, sgt = 0.0;
  for (int64_t p = 0; p < splits; ++p) {
    s += static_cast<double>(part_g[p * C + c]);
    sgt += static_cast<double>(part_gt[p * C + c]);
  }
  if (phase.sums_in != nullptr) {
    // The global sums, already around the float64 mean (from the input).
    s = phase.sums_in[c];
    sgt = phase.sums_in[C + c] + (st.mean[c] - static_cast<double>(static_cast<A>(st.mean[c]))) * s;
    count = phase.count_in[c];
  }
  A mh, al, be;
  st.rebuild(c, saved_is_output, mh, al, be);
  const double m = st.mean[c];
  const double is = static_cast<double>(st.invstd(c));
  const double w = static_cast<double>(st.w(c));
  if (saved_is_output) {
    BNEXT_DEVICE_REQUIRE(w != 0.0, BNEXT_MEMORY_SAVING_ZERO_WEIGHT);
  }
  // sum g * (x - mean): t is x - mh (from the input) or (x - mean) / x_per_t.
  const double x_per_t = saved_is_output ? 1.0 / (w * is) : 1.0;
  const double sx = saved_is_output ? sgt * x_per_t : sgt - (m - static_cast<double>(mh)) * s;
  if (grad_weight != nullptr) grad_weight[c] = static_cast<A>(sx * is);
  if (grad_bias != nullptr) grad_bias[c] = static_cast<A>(s);
  if (phase.sums_out != nullptr) {
    phase.sums_out[c] = s;
    phase.sums_out[C + c] = sx;
  }
  double B = 0.0, K = 0.0;
  if (train) {
    // dx = w*invstd*(g - mean(g) - (x - mean)*invstd^2*mean(g*(x - mean)))
    const double inv_n = 1.0 / count;
    const double bx = -w * is * is * is * sx * inv_n;
    K = -w * is * s * inv_n - (saved_is_output ? 0.0 : (m - static_cast<double>(mh)) * bx);
    B = bx * x_per_t;
  }
  coef[c] = static_cast<A>(w * is);
  coef[C + c] = static_cast<A>(B);
  coef[2 * C + c] = static_cast<A>(K);
  coef[3 * C + c] = mh;
  coef[4 * C + c] = al;
  coef[5 * C + c] = be;
}

// grad_input = g * A + t * B + K. g is read from g_in (pass 1's
// grad_residual, exact dtypes only) or rebuilt; t is needed only in training.
template <typename T, int kVec, Act kAct, bool kSavedIsOutput>
__global__ void __launch_bounds__(kThreads) backward_apply_kernel(
    const T* __restrict__ dy,
    const T* __restrict__ saved,
    const T* __restrict__ residual,
    const T* __restrict__ g_in,
    T* __restrict__ dx,
    const acc_of<T>* __restrict__ coef,
    int64_t nvec,
    bool channels_inner,
    int64_t SV,
    int64_t CV,
    int64_t C,
    bool train,
    acc_of<T> slope) {
  using A = acc_of<T>;
  using Terms = GradTerms<T, kVec, kAct, kSavedIsOutput>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool has_res = residual != nullptr;
  const bool need_saved = train || (g_in == nullptr && Terms::kNeedsSaved);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nvec;
       j += stride) {
    // Planar packs are one channel: its six coefficients are fetched once.
    A ca[kVec], cb[kVec], ck[kVec], mh[kVec], al[kVec], be[kVec];
    auto fetch = [&](int e, int64_t c) {
      ca[e] = coef[c];
      cb[e] = coef[C + c];
      ck[e] = coef[2 * C + c];
      mh[e] = coef[3 * C + c];
      al[e] = coef[4 * C + c];
      be[e] = coef[5 * C + c];
    };
    if (channels_inner) {
      const int64_t c0 = (j - index_div(j, CV) * CV) * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) fetch(e, c0 + e);
    } else {
      const int64_t plane = index_div(j, SV);
      fetch(0, plane - index_div(plane, C) * C);
#pragma unroll
      for (int e = 1; e < kVec; ++e) {
        ca[e] = ca[0];
        cb[e] = cb[0];
        ck[e] = ck[0];
        mh[e] = mh[0];
        al[e] = al[0];
        be[e] = be[0];
      }
    }
    A d[kVec], s[kVec], r[kVec], g[kVec], t[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) s[e] = r[e] = A(0);
    if (g_in == nullptr) {
      load_acc<T, kVec>(dy + j * kVec, d);
    }
    if (need_saved) {
      load_acc<T, kVec>(saved + j * kVec, s);
      // The residual enters t (from the output) or z (rebuilt g) only.
      if (has_res && (kSavedIsOutput || g_in == nullptr)) load_acc<T, kVec>(residual + j * kVec, r);
    }
    Terms::centred(s, r, has_res, mh, be, slope, t);
    if (g_in == nullptr) {
      Terms::grad(d, s, r, has_res, t, al, be, slope, g);
    } else {
      load_acc<T, kVec>(g_in + j * kVec, g);
    }
    A out[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      out[e] = train ? g[e] * ca[e] + t[e] * cb[e] + ck[e] : g[e] * ca[e];
    }
    store_acc<T, kVec>(dx + j * kVec, out);
  }
}

// Dispatches the activation; memory_saving (from the output) only has the
// invertible ones.
template <typename Fn>
cudaError_t dispatch_backward_act(Act act, bool saved_is_output, Fn&& fn) {
  if (saved_is_output) {
    return dispatch_invertible_act(act, [&](auto act_tag) {
      return fn(act_tag, std::true_type{});
    });
  }
  return dispatch_act(act, [&](auto act_tag) { return fn(act_tag, std::false_type{}); });
}

}  // namespace

std::size_t backward_workspace_bytes(const Shape& shape, DType dtype) {
  const std::size_t acc = dtype == DType::Double ? sizeof(double) : sizeof(float);
  const int64_t splits = max_reduction_splits(shape);
  return 2 * align256(acc * static_cast<std::size_t>(splits * shape.C)) +
      align256(acc * static_cast<std::size_t>(6 * shape.C)) + 256;
}

cudaError_t launch_batch_norm_backward(
    DType dtype,
    const Shape& shape,
    const BackwardArgs& a,
    void* workspace,
    cudaStream_t stream) {
  if (shape.C == 0) {
    return cudaSuccess;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_of<T>;
    const int vec = pick_vec<T>(
        shape.channels_inner ? shape.C : shape.S,
        {a.grad_output, a.saved, a.residual, a.grad_input, a.grad_residual});
    return dispatch_vec<T>(vec, [&](auto vec_tag) {
      constexpr int kVec = decltype(vec_tag)::value;
      return dispatch_backward_act(a.act, a.saved_is_output, [&](auto act_tag, auto saved_is_output_tag) {
        constexpr Act kAct = decltype(act_tag)::value;
        constexpr bool kSavedIsOutput = decltype(saved_is_output_tag)::value;
        const ChannelStats<A> st{a.mean, static_cast<const A*>(a.invstd_or_var),
                                 a.invstd_from_var, static_cast<A>(a.eps),
                                 static_cast<const A*>(a.weight), static_cast<const A*>(a.bias)};
        const A slope = static_cast<A>(a.negative_slope);
        const bool need_sums = a.sums_in == nullptr &&
            (a.grad_weight != nullptr || a.grad_bias != nullptr || a.grad_residual != nullptr ||
             a.sums_out != nullptr || (a.train && a.grad_input != nullptr));
        const ReductionGeometry g = need_sums
            ? reduction_geometry(shape, kVec, kMinPacksPerBlock)
            : ReductionGeometry{};
        char* base = static_cast<char*>(workspace);
        const std::size_t part_bytes = align256(sizeof(A) * static_cast<std::size_t>(g.splits * shape.C));
        A* part_g = reinterpret_cast<A*>(base);
        A* part_gt = reinterpret_cast<A*>(base + part_bytes);
        A* coef = reinterpret_cast<A*>(base + 2 * part_bytes);
        if (g.splits > 0) {
          const ReduceArgs<T> ra{static_cast<const T*>(a.grad_output),
                                 static_cast<const T*>(a.saved),
                                 static_cast<const T*>(a.residual),
                                 static_cast<T*>(a.grad_residual),
                                 st, slope, part_g, part_gt};
          if (!shape.channels_inner) {
            reduce_planar_kernel<T, kVec, kAct, kSavedIsOutput><<<g.grid, g.block, 0, stream>>>(
                ra, shape.C, shape.S / kVec, shape.N * (shape.S / kVec), g.per_split);
          } else {
            reduce_inner_kernel<T, kVec, kAct, kSavedIsOutput><<<g.grid, g.block, 0, stream>>>(
                ra, shape.count(), shape.C / kVec, g.per_split);
          }
          const cudaError_t err = cudaGetLastError();
          if (err != cudaSuccess) {
            return err;
          }
        }
        const unsigned fin_blocks = static_cast<unsigned>((shape.C + kThreads - 1) / kThreads);
        backward_finalize_kernel<A><<<fin_blocks, kThreads, 0, stream>>>(
            shape.C, g.splits, part_g, part_gt, st, kSavedIsOutput, a.train,
            static_cast<double>(shape.count()), static_cast<A*>(a.grad_weight),
            static_cast<A*>(a.grad_bias), coef, PhaseSums{a.sums_out, a.sums_in, a.count_in});
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess || a.grad_input == nullptr || shape.numel() == 0) {
          return err;
        }
        // g is reused from pass 1 only where storing it lost nothing.
        constexpr bool kExact = std::is_same_v<T, float> || std::is_same_v<T, double>;
        const void* g_src = a.g_in != nullptr ? a.g_in : a.grad_residual;
        const T* g_in = kExact ? static_cast<const T*>(g_src) : nullptr;
        const int64_t nvec = shape.numel() / kVec;
        backward_apply_kernel<T, kVec, kAct, kSavedIsOutput>
            <<<elementwise_blocks(nvec), kThreads, 0, stream>>>(
                static_cast<const T*>(a.grad_output), static_cast<const T*>(a.saved),
                static_cast<const T*>(a.residual), g_in, static_cast<T*>(a.grad_input),
                coef, nvec, shape.channels_inner, shape.S / kVec, shape.C / kVec, shape.C,
                a.train, slope);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace bnext::cuda
