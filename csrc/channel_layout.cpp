#include "channel_layout.h"

namespace bnext {

ChannelLayout make_layout(const at::Tensor& x) {
  ChannelLayout L;
  L.N = x.size(0);
  L.C = x.size(1);
  L.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    L.S *= x.size(d);
  }
  // With S == 1 both layouts address memory identically; the rows walk keeps
  // the channel loop innermost, which is the one that vectorises.
  L.channels_inner = L.S == 1 || !x.is_contiguous();
  return L;
}

}  // namespace bnext
