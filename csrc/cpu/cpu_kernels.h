// CPU kernel entry points shared between ops (bnrelu_conv1x1 reuses channel_stats).
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace densenet_fused {
namespace cpu {

// (mean, biased var) of every column of x (M, C), in float64 for float64 x else float32.
std::tuple<at::Tensor, at::Tensor> column_mean_var(const at::Tensor& x);

}  // namespace cpu
}  // namespace densenet_fused
