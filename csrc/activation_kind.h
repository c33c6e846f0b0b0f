// The activations a fused BatchNormAct op can apply, by name, shared by the
// CPU and CUDA backends (each has its own vectorised formulas).
#pragma once
#include <string_view>

namespace bnext {

enum class Act { Identity, Relu, LeakyRelu, Elu, Silu, Gelu, GeluTanh };

// Parses the schema's `activation` string; ValueError for an unknown name.
Act parse_activation(std::string_view name);

// Whether the input of the activation can be recovered from its output:
// identity, leaky_relu with a positive slope, elu.
bool act_invertible(Act act, double negative_slope);

}  // namespace bnext
