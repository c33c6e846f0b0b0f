// The fused backward's grad_input pass (fused_kernels.h).
#include "fused_backward_impl.h"

namespace bnext::cpu {

using namespace act_backward_detail;

void act_backward_elementwise(
    const at::Tensor& dy,
    const GradSource& src,
    const at::Tensor& grad_residual,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& K,
    at::Tensor& dx) {
  dispatch_source(dy, src, [&]<typename scalar_t, Act Ac, bool kOut, bool kRes>() {
    elementwise_impl<scalar_t, Ac, kOut, kRes>(dy, src, grad_residual, A, B, K, dx);
  });
}

}  // namespace bnext::cpu
