// The fused activations on CUDA, per acc-type element (float or double),
// with the same formulas as the CPU ones (csrc/cpu/activation.h) and torch's
// own: relu keeps NaN, gelu is the erf form, gelu_tanh the tanh form.
//   fwd(z), vjp(dy, z) = dy * f'(z),
//   inverse(y) and vjp_at_output(dy, y) for the invertible ones (memory_saving).
#pragma once
#include <cuda_runtime.h>

#include <type_traits>
#include <utility>

#include "../activation_kind.h"

namespace bnext::cuda {

template <Act A, typename T>
struct ActFn {
  static constexpr T kSqrt1_2 = T(0.70710678118654752440);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267794);  // 1/sqrt(2 pi)
  static constexpr T kBeta = T(0.79788456080286535588);        // sqrt(2/pi)
  static constexpr T kKappa = T(0.044715);

  __device__ __forceinline__ static T fwd(T z, T slope) {
    if constexpr (A == Act::Identity) {
      return z;
    } else if constexpr (A == Act::Relu) {
      return z > T(0) || z != z ? z : T(0);
    } else if constexpr (A == Act::LeakyRelu) {
      return z > T(0) ? z : z * slope;
    } else if constexpr (A == Act::Elu) {
      return z > T(0) ? z : expm1(z);
    } else if constexpr (A == Act::Silu) {
      return z / (T(1) + exp(-z));
    } else if constexpr (A == Act::Gelu) {
      return z * T(0.5) * (T(1) + erf(z * kSqrt1_2));
    } else {
      return T(0.5) * z * (T(1) + tanh(kBeta * (z + kKappa * z * z * z)));
    }
  }

  __device__ __forceinline__ static T vjp(T dy, T z, T slope) {
    if constexpr (A == Act::Identity) {
      return dy;
    } else if constexpr (A == Act::Relu) {
      // A select, as threshold_backward: a non-finite dy where the unit is
      // off gives 0.
      return z > T(0) ? dy : T(0);
    } else if constexpr (A == Act::LeakyRelu) {
      return z > T(0) ? dy : dy * slope;
    } else if constexpr (A == Act::Elu) {
      return z > T(0) ? dy : dy * exp(z);
    } else if constexpr (A == Act::Silu) {
      const T s = T(1) / (T(1) + exp(-z));
      return dy * s * (T(1) + z * (T(1) - s));
    } else if constexpr (A == Act::Gelu) {
      const T cdf = T(0.5) * (T(1) + erf(z * kSqrt1_2));
      const T pdf = exp(T(-0.5) * z * z) * kInvSqrt2Pi;
      return dy * (cdf + z * pdf);
    } else {
      const T t = tanh(kBeta * (z + kKappa * z * z * z));
      const T dinner = kBeta * (T(1) + T(3) * kKappa * z * z);
      return dy * (T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * dinner);
    }
  }

  __device__ __forceinline__ static T inverse(T y, T slope) {
    if constexpr (A == Act::LeakyRelu) {
      return y > T(0) ? y : y / slope;
    } else if constexpr (A == Act::Elu) {
      return y > T(0) ? y : log1p(y);
    } else {
      static_assert(A == Act::Identity, "activation has no inverse");
      return y;
    }
  }

  __device__ __forceinline__ static T vjp_at_output(T dy, T y, T slope) {
    if constexpr (A == Act::LeakyRelu) {
      return y > T(0) ? dy : dy * slope;  // y > 0 iff z > 0 (slope > 0)
    } else if constexpr (A == Act::Elu) {
      return y > T(0) ? dy : dy * (y + T(1));  // exp(z) = y + 1
    } else {
      static_assert(A == Act::Identity, "activation has no inverse");
      return dy;
    }
  }
};

}  // namespace bnext::cuda
