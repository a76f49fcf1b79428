// running_stats_update on CUDA: up to kPerLaunch BatchNorm layers per launch, one block
// per layer.  num_batches_tracked is read on the device (momentum=None needs it), so the
// update never synchronizes with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../running_stats_update.h"

namespace densenet_fused {
namespace cuda {
namespace {

constexpr int kPerLaunch = 32;

template <typename stat_t, typename acc_t>
struct Entry {
  stat_t* rm;
  stat_t* rv;
  int64_t* nbt;
  const acc_t* mean;
  const acc_t* var;
  int64_t C;
  double momentum;
};

template <typename stat_t, typename acc_t>
struct Batch {
  Entry<stat_t, acc_t> e[kPerLaunch];
};

template <typename stat_t, typename acc_t>
__global__ void update_kernel(Batch<stat_t, acc_t> batch, acc_t unbias) {
  const Entry<stat_t, acc_t>& e = batch.e[blockIdx.x];
  const int64_t nbt = *e.nbt + 1;
  __syncthreads();  // every thread has read the old count before it is written
  if (threadIdx.x == 0) *e.nbt = nbt;
  const acc_t f = e.momentum < 0 ? acc_t(1) / static_cast<acc_t>(nbt) : static_cast<acc_t>(e.momentum);
  for (int64_t c = threadIdx.x; c < e.C; c += blockDim.x) {
    e.rm[c] = static_cast<stat_t>((acc_t(1) - f) * static_cast<acc_t>(e.rm[c]) + f * e.mean[c]);
    e.rv[c] = static_cast<stat_t>((acc_t(1) - f) * static_cast<acc_t>(e.rv[c]) + f * e.var[c] * unbias);
  }
}

void running_stats_update(at::TensorList running_mean, at::TensorList running_var,
                          at::TensorList num_batches_tracked, at::TensorList mean, at::TensorList var,
                          at::ArrayRef<double> momentum, int64_t count) {
  check_running_stats_args(running_mean, running_var, num_batches_tracked, mean, var, momentum, count);
  if (running_mean.empty()) return;
  const c10::cuda::CUDAGuard guard(running_mean[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = running_mean.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean[0].scalar_type(), "running_stats_cuda", [&] {
    using stat_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean[0].scalar_type(), "running_stats_cuda_acc", [&] {
      using acc_t = scalar_t;
      const acc_t unbias = static_cast<acc_t>(static_cast<double>(count) / static_cast<double>(count - 1));
      for (int64_t start = 0; start < n; start += kPerLaunch) {
        Batch<stat_t, acc_t> batch;
        const int64_t cnt = std::min<int64_t>(kPerLaunch, n - start);
        for (int64_t j = 0; j < cnt; ++j) {
          const int64_t i = start + j;
          batch.e[j] = {running_mean[i].data_ptr<stat_t>(), running_var[i].data_ptr<stat_t>(),
                        num_batches_tracked[i].data_ptr<int64_t>(), mean[i].const_data_ptr<acc_t>(),
                        var[i].const_data_ptr<acc_t>(), running_mean[i].numel(), momentum[i]};
        }
        update_kernel<stat_t, acc_t><<<cnt, 256, 0, stream>>>(batch, unbias);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CUDA, m) { m.impl("running_stats_update", &running_stats_update); }

}  // namespace cuda
}  // namespace densenet_fused
