// The activations a fused BatchNormAct op can apply, by name, shared by the
// CPU and CUDA backends (each has its own vectorised formulas).
#pragma once
#include <string_view>
#include <type_traits>

namespace bnext {

enum class Act { Identity, Relu, LeakyRelu, Elu, Silu, Gelu, GeluTanh };

// Parses the schema's `activation` string; ValueError for an unknown name.
Act parse_activation(std::string_view name);

// Whether the input of the activation can be recovered from its output:
// identity, leaky_relu with a positive slope, elu.
bool act_invertible(Act act, double negative_slope);

// Calls fn(std::integral_constant<Act, A>{}) for the runtime `act`.
template <typename Fn>
decltype(auto) dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::Identity: return fn(std::integral_constant<Act, Act::Identity>{});
    case Act::Relu: return fn(std::integral_constant<Act, Act::Relu>{});
    case Act::LeakyRelu: return fn(std::integral_constant<Act, Act::LeakyRelu>{});
    case Act::Elu: return fn(std::integral_constant<Act, Act::Elu>{});
    case Act::Silu: return fn(std::integral_constant<Act, Act::Silu>{});
    case Act::Gelu: return fn(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: break;
  }
  return fn(std::integral_constant<Act, Act::GeluTanh>{});
}

// Like dispatch_act, for the invertible activations only (memory_saving
// has checked act_invertible before any kernel is chosen).
template <typename Fn>
decltype(auto) dispatch_invertible_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::Identity: return fn(std::integral_constant<Act, Act::Identity>{});
    case Act::LeakyRelu: return fn(std::integral_constant<Act, Act::LeakyRelu>{});
    default: break;
  }
  return fn(std::integral_constant<Act, Act::Elu>{});
}

}  // namespace bnext
