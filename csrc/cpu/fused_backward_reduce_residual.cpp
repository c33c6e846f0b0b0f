// The fused backward's sums with a residual (fused_backward_reduce.cpp has
// the case without).
#include "fused_backward_impl.h"

namespace bnext::cpu::act_backward_detail {

void act_backward_reduce_residual(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt) {
  dispatch_source_for<true>(dy, src, [&]<typename scalar_t, Act A, bool kOut, bool kRes>() {
    reduce_impl<scalar_t, A, kOut, kRes>(dy, src, grad_residual, sum_g, sum_gt);
  });
}

}  // namespace bnext::cpu::act_backward_detail
