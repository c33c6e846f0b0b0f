// The fused backward's resident walk: sums and grad_input per channel block
// while the block is in cache (fused_kernels.h).
#include "fused_backward_impl.h"

namespace bnext::cpu {

using namespace act_backward_detail;

bool act_backward_resident(
    const at::Tensor& dy,
    const GradSource& src,
    const ActBackwardStats& stats,
    at::Tensor& grad_residual,
    at::Tensor& sum_g,
    at::Tensor& sum_gt,
    at::Tensor& dx) {
  bool done = false;
  dispatch_source(dy, src, [&]<typename scalar_t, Act A, bool kOut, bool kRes>() {
    done = resident_impl<scalar_t, A, kOut, kRes>(dy, src, stats, grad_residual, sum_g, sum_gt, dx);
  });
  return done;
}

}  // namespace bnext::cpu
