// How a dense (N, C, *) tensor is seen per channel, by every backend:
//  - planar (NCHW-like): N planes of S contiguous elements per channel;
//  - channels-inner (NHWC-like, and every (N, C) input): N*S rows of C
//    contiguous channels.
// Kernels walk either layout natively; nothing is transposed.
#pragma once
#include <ATen/core/Tensor.h>

namespace bnext {

struct ChannelLayout {
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 0;  // product of the spatial sizes
  bool channels_inner = false;

  int64_t rows() const { return N * S; }
  int64_t count() const { return N * S; }  // elements per channel
};

// `x` must already be dense in output_memory_format(x).
ChannelLayout make_layout(const at::Tensor& x);

}  // namespace bnext
