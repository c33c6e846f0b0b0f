#include "activation_kind.h"

#include <c10/util/Exception.h>

#include <string>

namespace bnext {

Act parse_activation(std::string_view name) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::Relu;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "elu") return Act::Elu;
  if (name == "silu") return Act::Silu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  TORCH_CHECK_VALUE(
      false, "bnext: unknown activation '", std::string(name),
      "'; expected one of identity, relu, leaky_relu, elu, silu, gelu, gelu_tanh");
}

bool act_invertible(Act act, double negative_slope) {
  return act == Act::Identity || act == Act::Elu ||
      (act == Act::LeakyRelu && negative_slope > 0.0);
}

}  // namespace bnext
