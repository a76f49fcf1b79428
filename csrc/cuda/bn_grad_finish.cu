// bn_grad_finish on CUDA: dx = G [* G_scale] - P - (x - mean) * Q, elementwise over a channel slice,
// written as NHWC (M, C) or NCHW (N, C, HW) in the requested dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../bn_grad_finish.h"

namespace densenet_fused {
namespace cuda {
namespace {

template <typename x_t, typename out_t, typename acc_t>
__global__ void finish_kernel(const acc_t* __restrict__ G, int64_t ldg, const x_t* __restrict__ x, int64_t ldx,
                              const acc_t* __restrict__ mean, const acc_t* __restrict__ P,
                              const acc_t* __restrict__ Q, const acc_t* __restrict__ S, int64_t M, int64_t C,
                              int64_t hw, out_t* __restrict__ out) {
  const int64_t total = M * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i % C;
    const acc_t g = S == nullptr ? G[r * ldg + c] : G[r * ldg + c] * S[c];  // uniform branch
    // no mean term for Q = 0 (running statistics): an Inf or NaN x must not turn it into NaN (as torch's)
    const acc_t v = g - P[c] - (Q[c] == acc_t(0) ? acc_t(0) : (static_cast<acc_t>(x[r * ldx + c]) - mean[c]) * Q[c]);
    const int64_t o = hw == 0 ? i : ((r / hw) * C + c) * hw + (r % hw);
    out[o] = static_cast<out_t>(v);
  }
}

at::Tensor bn_grad_finish(const at::Tensor& G, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& P,
                          const at::Tensor& Q, at::ScalarType dtype, int64_t nchw_hw,
                          const std::optional<at::Tensor>& G_scale) {
  check_bn_grad_finish_args(G, x, mean, P, Q, dtype, nchw_hw, G_scale);
  const int64_t M = x.size(0), C = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = nchw_hw > 0 ? at::empty({M / nchw_hw, C, nchw_hw}, x.options().dtype(dtype))
                               : at::empty({M, C}, x.options().dtype(dtype));
  if (M == 0 || C == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(M * C, threads), 65535LL * 8);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_finish_x", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_grad_finish_out", [&] {
      finish_kernel<x_t, scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          G.const_data_ptr<acc_t>(), G.stride(0), x.const_data_ptr<x_t>(), x.stride(0), mean.const_data_ptr<acc_t>(),
          P.const_data_ptr<acc_t>(), Q.const_data_ptr<acc_t>(),
          G_scale.has_value() ? G_scale->const_data_ptr<acc_t>() : nullptr, M, C, nchw_hw, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CUDA, m) { m.impl("bn_grad_finish", &bn_grad_finish); }

}  // namespace cuda
}  // namespace densenet_fused
