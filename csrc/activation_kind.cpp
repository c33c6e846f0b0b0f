#include "activation_kind.h"

#include <c10/util/Exception.h>

#include <string>

namespace bnext {

Act parse_activation(std::string_view name) {
  for (size_t i = 0; i < std::size(kActivationNames); ++i) {
    if (name == kActivationNames[i]) return static_cast<Act>(i);
  }
  // The list of names is built only here: every fused op call parses.
  std::string expected;
  for (size_t i = 0; i < std::size(kActivationNames); ++i) {
    expected += (i ? ", " : "") + std::string(kActivationNames[i]);
  }
  TORCH_CHECK_VALUE(false, "bnext: unknown activation '", std::string(name),
                    "'; expected one of ", expected);
}

bool act_invertible(Act act, double negative_slope) {
  return act == Act::Identity || act == Act::Elu ||
      (act == Act::LeakyRelu && negative_slope > 0.0);
}

}  // namespace bnext
