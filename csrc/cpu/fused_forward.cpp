// Forward of the fused ops: normalization, residual add and activation in
// one pass, so the pre-activation never reaches memory.
#include <ATen/Dispatch.h>

#include "fused_kernels.h"
#include "step_drivers.h"

namespace bnext::cpu {

namespace {

template <typename scalar_t, Act A, bool kRes>
void normalize_act_impl(
    const at::Tensor& x,
    const at::Tensor& residual,
    const at::Tensor& mean_hi,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    double negative_slope,
    at::Tensor& out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  using Fn = ActFn<A, acc_t>;
  using Coefs = ChannelCoefs<acc_t, 3, IO::kParts>;
  constexpr int P = IO::kParts;

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = kRes ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  const Coefs coefs{{mean_hi.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(),
                     beta.const_data_ptr<acc_t>()}};
  const V slope(static_cast<acc_t>(negative_slope));

  const ChannelLayout L = make_layout(x);
  elementwise_steps<IO::kStep>(
      L, coefs, StepOutput::of(L, yp, kRes ? 3 : 2),
      [=](int64_t i, int64_t n, const typename Coefs::Set& s, bool stream) BNEXT_STEP {
        V v[P], r[P];
        IO::load_n(xp + i, v, n);
        if constexpr (kRes) IO::load_n(rp + i, r, n);
#pragma GCC unroll 4
        for (int j = 0; j < P; ++j) {
          V z = at::vec::fmadd(v[j] - s.v[0][j], s.v[1][j], s.v[2][j]);
          if constexpr (kRes) z = z + r[j];
          v[j] = Fn::fwd(z, slope);
        }
        IO::store_n(yp + i, v, n, stream);
      });
}

}  // namespace

void normalize_act(
    const at::Tensor& x,
    const at::Tensor& residual,
    const at::Tensor& mean_hi,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    ActSpec spec,
    at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_normalize_act", [&] {
        dispatch_act(spec.act, [&](auto a) {
          if (residual.defined()) {
            normalize_act_impl<scalar_t, decltype(a)::value, true>(
                x, residual, mean_hi, alpha, beta, spec.negative_slope, out);
          } else {
            normalize_act_impl<scalar_t, decltype(a)::value, false>(
                x, residual, mean_hi, alpha, beta, spec.negative_slope, out);
          }
        });
      });
}

}  // namespace bnext::cpu
