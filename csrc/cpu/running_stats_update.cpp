// running_stats_update on the CPU: nn.BatchNorm2d's training-mode update of running
// statistics for many BatchNorm layers in one call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cmath>

#include "../running_stats_update.h"

namespace densenet_fused {
namespace cpu {
namespace {

void running_stats_update(at::TensorList running_mean, at::TensorList running_var,
                          at::TensorList num_batches_tracked, at::TensorList mean, at::TensorList var,
                          at::ArrayRef<double> momentum, int64_t count) {
  check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  if (running_mean.empty()) return;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean[0].scalar_type(), "running_stats_cpu", [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean[0].scalar_type(), "running_stats_cpu_acc", [&] {
      using acc_t = scalar_t;
      for (size_t i = 0; i < running_mean.size(); ++i) {
        int64_t* nbt = num_batches_tracked[i].data_ptr<int64_t>();
        *nbt += 1;
        const acc_t f = momentum[i] < 0 ? acc_t(1) / static_cast<acc_t>(*nbt) : static_cast<acc_t>(momentum[i]);
        stat_t* rm = running_mean[i].data_ptr<stat_t>();
        stat_t* rv = running_var[i].data_ptr<stat_t>();
        const acc_t* m = mean[i].const_data_ptr<acc_t>();
        const acc_t* v = var[i].const_data_ptr<acc_t>();
        for (int64_t c = 0; c < running_mean[i].numel(); ++c) {
          rm[c] = static_cast<stat_t>((acc_t(1) - f) * static_cast<acc_t>(rm[c]) + f * m[c]);
          rv[c] = static_cast<stat_t>((acc_t(1) - f) * static_cast<acc_t>(rv[c]) +
                                      f * v[c] * static_cast<acc_t>(unbias));
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) { m.impl("running_stats_update", &running_stats_update); }

}  // namespace cpu
}  // namespace densenet_fused
