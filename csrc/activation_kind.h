// The activations a fused BatchNormAct op can apply: the one table that the
// schema's `activation` argument, the CPU and CUDA backends and Python
// (bnext._C._activation_names) read. Adding one: an Act and its name here,
// its formulas in cpu/activation.h and cuda/activation.cuh, and the torch
// modules it replaces in bnext/_ops/activations.py (for the converter).
#pragma once
#include <iterator>
#include <string_view>
#include <type_traits>

namespace bnext {

enum class Act { Identity, Relu, LeakyRelu, Elu, Silu, Gelu, GeluTanh };

// Indexed by Act.
inline constexpr std::string_view kActivationNames[] = {
    "identity", "relu", "leaky_relu", "elu", "silu", "gelu", "gelu_tanh"};
static_assert(std::size(kActivationNames) == static_cast<size_t>(Act::GeluTanh) + 1,
              "one name per Act");

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
