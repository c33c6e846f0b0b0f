// out = (x - mean) * alpha + beta. Subtracting the mean before scaling keeps
// the result accurate when |mean| >> std (x - mean is exact there), at the
// cost of one extra subtraction in a memory-bound loop.
#include <ATen/Dispatch.h>

#include "kernels.h"
#include "layout.h"
#include "vec_io.h"

namespace bnext::cpu {

namespace {

template <typename scalar_t>
void normalize_impl(
    const at::Tensor& x,
    const at::Tensor& mean_t,
    const at::Tensor& alpha_t,
    const at::Tensor& beta_t,
    at::Tensor& out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  constexpr int P = IO::kParts;
  constexpr int64_t K = IO::kStep;
  constexpr int64_t W = V::size();

  const ChannelLayout L = make_layout(x);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = out.mutable_data_ptr<scalar_t>();
  const acc_t* mean = mean_t.const_data_ptr<acc_t>();
  const acc_t* alpha = alpha_t.const_data_ptr<acc_t>();
  const acc_t* beta = beta_t.const_data_ptr<acc_t>();
  const int64_t C = L.C;

  parallel_elementwise(
      L,
      [&](int64_t c, int64_t offset, int64_t len) {
        const acc_t m = mean[c], a = alpha[c], b = beta[c];
        const V vm(m), va(a), vb(b);
        const scalar_t* xi = xp + offset;
        scalar_t* yi = yp + offset;
        int64_t i = 0;
        for (; i + K <= len; i += K) {
          V v[P];
          IO::load(xi + i, v);
          #pragma GCC unroll 16
          for (int j = 0; j < P; ++j) v[j] = at::vec::fmadd(v[j] - vm, va, vb);
          IO::store(yi + i, v);
        }
        for (; i < len; ++i) {
          yi[i] = static_cast<scalar_t>((static_cast<acc_t>(xi[i]) - m) * a + b);
        }
      },
      [&](int64_t offset, int64_t nrows) {
        // Locals, not closure members: stores through yi would otherwise
        // force a reload of every captured pointer per vector (2x slower).
        const acc_t* const mean_l = mean;
        const acc_t* const alpha_l = alpha;
        const acc_t* const beta_l = beta;
        const int64_t C_l = C;
        for (int64_t r = 0; r < nrows; ++r) {
          const scalar_t* xi = xp + offset + r * C_l;
          scalar_t* yi = yp + offset + r * C_l;
          int64_t c = 0;
          for (; c + K <= C_l; c += K) {
            V v[P];
            IO::load(xi + c, v);
            #pragma GCC unroll 16
            for (int j = 0; j < P; ++j) {
              const int64_t cj = c + j * W;
              v[j] = at::vec::fmadd(
                  v[j] - V::loadu(mean_l + cj), V::loadu(alpha_l + cj), V::loadu(beta_l + cj));
            }
            IO::store(yi + c, v);
          }
          for (; c < C_l; ++c) {
            yi[c] = static_cast<scalar_t>(
                (static_cast<acc_t>(xi[c]) - mean_l[c]) * alpha_l[c] + beta_l[c]);
          }
        }
      });
}

}  // namespace

void normalize(
    const at::Tensor& x,
    const at::Tensor& mean,
    const at::Tensor& alpha,
    const at::Tensor& beta,
    at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_normalize", [&] {
        normalize_impl<scalar_t>(x, mean, alpha, beta, out);
      });
}

}  // namespace bnext::cpu
