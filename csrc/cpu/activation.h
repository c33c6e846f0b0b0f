// The activations a fused BatchNormAct kernel applies after normalization,
// vectorised over acc-dtype lanes. Each follows the formula of torch's own
// CPU kernel (relu/leaky_relu/elu/silu/gelu in ATen/native/cpu), so a fused
// result matches BN followed by the torch activation to rounding.
//
// vjp(dy, z)           = dy * f'(z), from the pre-activation z.
// inverse(y)           = f^-1(y)            } memory_saving only: the
// vjp_at_output(dy, y) = dy * f'(f^-1(y))   } activations with an inverse.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <string_view>

#include "../activation_kind.h"

namespace bnext::cpu {

template <Act A, typename acc_t>
struct ActFn {
  using V = at::vec::Vectorized<acc_t>;

  static V fwd(const V& z, const V& slope) {
    const V zero(acc_t(0)), one(acc_t(1)), half(acc_t(0.5));
    if constexpr (A == Act::Identity) {
      return z;
    } else if constexpr (A == Act::Relu) {
      return at::vec::maximum(z, zero);  // keeps NaN, like torch.relu
    } else if constexpr (A == Act::LeakyRelu) {
      return V::blendv(z * slope, z, z > zero);
    } else if constexpr (A == Act::Elu) {
      return V::blendv(z.expm1(), z, z > zero);
    } else if constexpr (A == Act::Silu) {
      return z / (one + z.neg().exp());
    } else if constexpr (A == Act::Gelu) {
      return z * half * (one + (z * V(acc_t(M_SQRT1_2))).erf());
    } else {
      return half * z * (one + tanh_inner(z).tanh());
    }
  }

  static V vjp(const V& dy, const V& z, const V& slope) {
    const V zero(acc_t(0)), one(acc_t(1)), half(acc_t(0.5));
    if constexpr (A == Act::Identity) {
      return dy;
    } else if constexpr (A == Act::Relu) {
      // A select, not dy * mask: like threshold_backward, a non-finite dy
      // where the unit is off gives 0.
      return V::blendv(zero, dy, z > zero);
    } else if constexpr (A == Act::LeakyRelu) {
      return V::blendv(dy * slope, dy, z > zero);
    } else if constexpr (A == Act::Elu) {
      return V::blendv(dy * z.exp(), dy, z > zero);
    } else if constexpr (A == Act::Silu) {
      const V s = one / (one + z.neg().exp());
      return dy * s * (one + z * (one - s));
    } else if constexpr (A == Act::Gelu) {
      const V cdf = half * (one + (z * V(acc_t(M_SQRT1_2))).erf());
      const V pdf = (z * z * V(acc_t(-0.5))).exp() * V(acc_t(0.5 * M_2_SQRTPI * M_SQRT1_2));
      return dy * (cdf + z * pdf);
    } else {
      const V t = tanh_inner(z).tanh();
      const V dinner = V(kBeta) * (one + V(acc_t(3 * kKappa)) * z * z);
      return dy * (half * (one + t) + half * z * (one - t * t) * dinner);
    }
  }

  static V inverse(const V& y, const V& slope) {
    const V zero(acc_t(0));
    if constexpr (A == Act::LeakyRelu) {
      return V::blendv(y / slope, y, y > zero);
    } else if constexpr (A == Act::Elu) {
      return V::blendv(y.log1p(), y, y > zero);
    } else {
      static_assert(A == Act::Identity, "activation has no inverse");
      return y;
    }
  }

  static V vjp_at_output(const V& dy, const V& y, const V& slope) {
    const V zero(acc_t(0)), one(acc_t(1));
    if constexpr (A == Act::LeakyRelu) {
      return V::blendv(dy * slope, dy, y > zero);  // y > 0 iff z > 0 (slope > 0)
    } else if constexpr (A == Act::Elu) {
      return V::blendv(dy * (y + one), dy, y > zero);  // exp(z) = y + 1
    } else {
      static_assert(A == Act::Identity, "activation has no inverse");
      return dy;
    }
  }

 private:
  static constexpr acc_t kBeta = acc_t(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2/pi)
  static constexpr acc_t kKappa = acc_t(0.044715);
  static V tanh_inner(const V& z) {
    return V(kBeta) * (z + V(kKappa) * z * z * z);
  }
};

}  // namespace bnext::cpu
