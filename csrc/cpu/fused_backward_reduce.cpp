// The fused backward's sums, sum g and sum g*t per channel (fused_kernels.h),
// without a residual; fused_backward_reduce_residual.cpp has the rest.
#include "fused_backward_impl.h"

namespace bnext::cpu {

using namespace act_backward_detail;

void act_backward_reduce(
    const at::Tensor& dy,
    const GradSource& src,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt) {
  if (src.residual.defined()) {
    act_backward_reduce_residual(dy, src, grad_residual, sum_g, sum_gt);
    return;
  }
  dispatch_source_for<false>(dy, src, [&]<typename scalar_t, Act A, bool kOut, bool kRes>() {
    reduce_impl<scalar_t, A, kOut, kRes>(dy, src, grad_residual, sum_g, sum_gt);
  });
}

}  // namespace bnext::cpu
