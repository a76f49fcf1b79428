// Argument checks of running_stats_update, shared by the CPU and CUDA kernels, so that a
// bad list is refused before any running statistic changes.
#pragma once
#include "common.h"

namespace densenet_fused {

inline void check_running_stats_args(at::TensorList running_mean, at::TensorList running_var,
                                     at::TensorList num_batches_tracked, at::TensorList mean,
                                     at::TensorList var, at::ArrayRef<double> momentum, int64_t count) {
  const char* op = "running_stats_update";
  const size_t n = running_mean.size();
  TORCH_CHECK(running_var.size() == n && num_batches_tracked.size() == n && mean.size() == n &&
                  var.size() == n && momentum.size() == n,
              op, ": expected ", n, " entries in every list (one per BatchNorm), got running_var ",
              running_var.size(), ", num_batches_tracked ", num_batches_tracked.size(), ", mean ", mean.size(),
              ", var ", var.size(), ", momentum ", momentum.size());
  TORCH_CHECK(count > 1, op, ": expected count > 1 values per channel (unbiased variance), got ", count);
  if (n == 0) return;
  const auto stat_t = running_mean[0].scalar_type();
  const auto acc_t = mean[0].scalar_type();
  TORCH_CHECK(acc_t == at::kFloat || acc_t == at::kDouble, op,
              ": expected batch mean of dtype float32 or float64, got ", acc_t);
  for (size_t i = 0; i < n; ++i) {
    const int64_t C = running_mean[i].numel();
    TORCH_CHECK(running_mean[i].dim() == 1 && running_mean[i].is_contiguous(), op,
                ": expected running_mean[", i, "] to be a contiguous 1-D tensor, got shape ",
                running_mean[i].sizes());
    TORCH_CHECK(running_mean[i].scalar_type() == stat_t && running_var[i].scalar_type() == stat_t, op,
                ": expected every running_mean/running_var of dtype ", stat_t, ", got ",
                running_mean[i].scalar_type(), "/", running_var[i].scalar_type(), " at entry ", i);
    TORCH_CHECK(running_var[i].dim() == 1 && running_var[i].numel() == C && running_var[i].is_contiguous(), op,
                ": expected running_var[", i, "] contiguous with ", C, " channels, got shape ",
                running_var[i].sizes());
    TORCH_CHECK(num_batches_tracked[i].numel() == 1 && num_batches_tracked[i].scalar_type() == at::kLong, op,
                ": expected num_batches_tracked[", i, "] to be a one-element int64 tensor, got ",
                num_batches_tracked[i].scalar_type(), " of shape ", num_batches_tracked[i].sizes());
    TORCH_CHECK(mean[i].dim() == 1 && mean[i].numel() == C && var[i].dim() == 1 && var[i].numel() == C, op,
                ": expected mean[", i, "] and var[", i, "] of ", C, " channels, got shapes ", mean[i].sizes(),
                " and ", var[i].sizes());
    TORCH_CHECK(mean[i].scalar_type() == acc_t && var[i].scalar_type() == acc_t, op,
                ": expected every mean/var of dtype ", acc_t, ", got ", mean[i].scalar_type(), "/",
                var[i].scalar_type(), " at entry ", i);
    TORCH_CHECK(mean[i].stride(0) == 1 || C <= 1, op, ": expected mean[", i, "] with unit stride");
    TORCH_CHECK(var[i].stride(0) == 1 || C <= 1, op, ": expected var[", i, "] with unit stride");
    const auto dev = running_mean[0].device();
    for (const at::Tensor* t : {&running_mean[i], &running_var[i], &num_batches_tracked[i], &mean[i], &var[i]})
      TORCH_CHECK(t->device() == dev, op, ": expected every tensor on ", dev, ", got ", t->device(),
                  " at entry ", i);
    TORCH_CHECK(std::isfinite(momentum[i]) && momentum[i] <= 1.0, op, ": expected momentum[", i,
                "] in [0, 1] (or < 0 for momentum=None), got ", momentum[i]);
  }
}

}  // namespace densenet_fused
