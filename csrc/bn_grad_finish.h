// Argument checks of bn_grad_finish, shared by the CPU and CUDA kernels.
#pragma once
#include <optional>

#include "common.h"

namespace densenet_fused {

inline void check_bn_grad_finish_args(const at::Tensor& G, const at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& P, const at::Tensor& Q, at::ScalarType dtype,
                                      int64_t nchw_hw, const std::optional<at::Tensor>& G_scale) {
  const char* op = "bn_grad_finish";
  check_matrix(G, op, "G");
  check_matrix(x, op, "x");
  const int64_t M = x.size(0), C = x.size(1);
  TORCH_CHECK(G.size(0) == M && G.size(1) == C, op, ": expected G of shape ", x.sizes(),
              " (the shape of x), got ", G.sizes());
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(G.scalar_type() == acc, op, ": expected G of dtype ", acc, " for x of dtype ",
              x.scalar_type(), ", got ", G.scalar_type());
  check_same_device(G, x, op, "G");
  check_vector(mean, C, acc, x, op, "mean");
  check_vector(P, C, acc, x, op, "P");
  check_vector(Q, C, acc, x, op, "Q");
  if (G_scale.has_value()) check_vector(*G_scale, C, acc, x, op, "G_scale");
  TORCH_CHECK(at::isFloatingType(dtype), op, ": expected a floating output dtype, got ", dtype);
  TORCH_CHECK(nchw_hw >= 0 && (nchw_hw == 0 || M % nchw_hw == 0), op,
              ": expected nchw_hw = 0 (NHWC output) or a divisor of the ", M, " rows, got ", nchw_hw);
}

}  // namespace densenet_fused
