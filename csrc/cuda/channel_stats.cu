// channel_stats on CUDA.  Pass 1: each block owns 32 channels x a range of rows; every
// thread runs Welford over its rows, the block merges its 8 row-groups with Chan's formula
// in a fixed order and writes one (mean, M2) partial per channel.  Pass 2 merges the
// partials of each channel in order.  Deterministic, no atomics, no host synchronization,
// workspace size a function of the shape only (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.h"

namespace densenet_fused {
namespace cuda {
namespace {

constexpr int kCh = 32;       // channels per block (one warp across channels: coalesced rows)
constexpr int kRowGroups = 8; // threads along rows
constexpr int kMaxSplits = 512;
constexpr int64_t kMinRowsPerSplit = 64;

template <typename acc_t>
__device__ inline void chan_merge(acc_t& n, acc_t& mean, acc_t& m2, acc_t nb, acc_t meanb, acc_t m2b) {
  if (nb == acc_t(0)) return;
  const acc_t nt = n + nb;
  const acc_t delta = meanb - mean;
  const acc_t wb = nb / nt;
  mean += delta * wb;
  m2 += m2b + delta * delta * n * wb;
  n = nt;
}

template <typename scalar_t, typename acc_t>
__global__ void partial_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C, int64_t ld,
                               int64_t rows_per_split, acc_t* __restrict__ part_n, acc_t* __restrict__ part_mean,
                               acc_t* __restrict__ part_m2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCh + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = min(M, r_begin + rows_per_split);
  acc_t n = 0, mean = 0, m2 = 0;
  if (c < C) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kRowGroups) {
      const acc_t v = static_cast<acc_t>(x[r * ld + c]);
      n += acc_t(1);
      const acc_t d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  }
  __shared__ acc_t sn[kRowGroups][kCh], smean[kRowGroups][kCh], sm2[kRowGroups][kCh];
  sn[threadIdx.y][threadIdx.x] = n;
  smean[threadIdx.y][threadIdx.x] = mean;
  sm2[threadIdx.y][threadIdx.x] = m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int g = 1; g < kRowGroups; ++g)
      chan_merge(n, mean, m2, sn[g][threadIdx.x], smean[g][threadIdx.x], sm2[g][threadIdx.x]);
    part_n[split * C + c] = n;
    part_mean[split * C + c] = mean;
    part_m2[split * C + c] = m2;
  }
}

template <typename acc_t>
__global__ void finish_kernel(const acc_t* __restrict__ part_n, const acc_t* __restrict__ part_mean,
                              const acc_t* __restrict__ part_m2, int64_t splits, int64_t C, double eps,
                              acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out, acc_t* __restrict__ rstd_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t s = 0; s < splits; ++s)
    chan_merge(n, mean, m2, part_n[s * C + c], part_mean[s * C + c], part_m2[s * C + c]);
  const acc_t var = m2 / n;
  mean_out[c] = mean;
  var_out[c] = var;
  rstd_out[c] = acc_t(1) / sqrt(var + static_cast<acc_t>(eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats(const at::Tensor& x, double eps) {
  check_channel_stats_args(x, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({C}, x.options().dtype(acc));
  if (C == 0) return {mean, var, rstd};
  const int64_t splits = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, ceil_div(M, kMinRowsPerSplit)));
  const int64_t rows_per_split = ceil_div(M, splits);
  at::Tensor part = at::empty({3, splits, C}, x.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* pp = part.data_ptr<acc_t>();
    dim3 grid(ceil_div(C, kCh), splits);
    dim3 block(kCh, kRowGroups);
    partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(x.const_data_ptr<scalar_t>(), M, C, x.stride(0),
                                                                rows_per_split, pp, pp + splits * C,
                                                                pp + 2 * splits * C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_kernel<acc_t><<<ceil_div(C, 128), 128, 0, stream>>>(pp, pp + splits * C, pp + 2 * splits * C, splits, C,
                                                              eps, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
                                                              rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CUDA, m) { m.impl("channel_stats", &channel_stats); }

}  // namespace cuda
}  // namespace densenet_fused
