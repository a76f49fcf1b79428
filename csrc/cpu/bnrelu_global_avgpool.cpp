// bnrelu_global_avgpool on the CPU: the fused DenseNet head (norm5, ReLU, global average pool;
// docs/design.md section 9).  Forward: pooled[n, c] = mean over the H*W pixels of image n of
// relu(x*scale + shift), accumulated in the accumulation dtype.  Backward (elementwise):
// g = dpooled[n, c] / (H*W) except where x*scale + shift <= 0 (a NaN passes, as in torch); dx = scale*g
// in eval, and with batch statistics dx = scale*(g - mean(g) - xhat*mean(g*xhat)) (a first pass for the two
// per-channel sums, which are also dbeta and dgamma).  Per-image partial sums are reduced in
// image order: deterministic results.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <vector>

#include "../common.h"
#include "bn_grad_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

int64_t check_args(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                   at::IntArrayRef nhw) {
  check_matrix(x, op, "x");
  TORCH_CHECK(nhw.size() == 3, op, ": expected nhw = [N, H, W] (3 ints), got ", nhw.size(), " values");
  TORCH_CHECK(nhw[0] >= 0 && nhw[1] >= 1 && nhw[2] >= 1 && nhw[0] * nhw[1] * nhw[2] == x.size(0), op,
              ": expected nhw = [N, H, W] with H, W >= 1 and N*H*W = ", x.size(0), " (the rows of x), got ", nhw);
  const auto acc = acc_type(x.scalar_type());
  check_vector(scale, x.size(1), acc, x, op, "scale");
  check_vector(shift, x.size(1), acc, x, op, "shift");
  return nhw[1] * nhw[2];
}

at::Tensor fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, at::IntArrayRef nhw) {
  const int64_t hw = check_args("bnrelu_global_avgpool_fwd", x, scale, shift, nhw);
  const int64_t N = nhw[0], C = x.size(1);
  at::Tensor out = at::empty({N, C}, x.options());
  if (N == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_global_avgpool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* hp = shift.const_data_ptr<acc_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t p = 0; p < hw; ++p) {
          const scalar_t* xr = xp + (n * hw + p) * ldx;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t y = static_cast<acc_t>(xr[c]) * sp[c] + hp[c];
            sum[c] += y <= acc_t(0) ? acc_t(0) : y;  // a NaN stays NaN
          }
        }
        for (int64_t c = 0; c < C; ++c) op_[n * C + c] = static_cast<scalar_t>(sum[c] / static_cast<acc_t>(hw));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dpooled, const at::Tensor& x,
                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                   at::IntArrayRef nhw, const at::Tensor& mean,
                                                   const at::Tensor& rstd, bool batch_stats) {
  const char* op = "bnrelu_global_avgpool_bwd";
  const int64_t hw = check_args(op, x, scale, shift, nhw);
  const int64_t N = nhw[0], M = x.size(0), C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(dpooled.dim() == 2 && dpooled.size(0) == N && dpooled.size(1) == C, op,
              ": expected dpooled of shape (", N, ", ", C, ") (images, channels), got ", dpooled.sizes());
  TORCH_CHECK(dpooled.scalar_type() == x.scalar_type(), op, ": expected dpooled of dtype ", x.scalar_type(),
              ", got ", dpooled.scalar_type());
  check_same_device(dpooled, x, op, "dpooled");
  check_vector(mean, C, acc, x, op, "mean");
  check_vector(rstd, C, acc, x, op, "rstd");
  at::Tensor dx = at::empty({M, C}, x.options());
  at::Tensor dgamma = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({C}, x.options().dtype(at::kDouble));
  if (M == 0 || C == 0) return {dx, dgamma.to(acc), dbeta.to(acc)};
  const at::Tensor d = (dpooled.to(acc) / static_cast<double>(hw)).contiguous();  // dL/dy of every pixel
  ChannelGradSums sums(N, C);  // one chunk per image
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_global_avgpool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const BnVectors<acc_t> bn(scale, shift, mean, rstd);
    const acc_t* dp = d.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    // pass 1: per-image sums of g and g*xhat (and dx = scale*g without batch statistics)
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s1(C), s2(C);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(s1.begin(), s1.end(), acc_t(0));
        std::fill(s2.begin(), s2.end(), acc_t(0));
        for (int64_t r = n * hw; r < (n + 1) * hw; ++r)
          grad_sums_pixel<scalar_t, acc_t>(xp + r * ldx, dp + n * C, bn, C, s1.data(), s2.data(),
                                           batch_stats ? nullptr : dxp + r * C, nullptr);
        sums.add(n, s1, s2);
      }
    });
    sums.reduce(dgamma.data_ptr<double>(), dbeta.data_ptr<double>());
    if (!batch_stats) return;
    // pass 2: dx = scale*g - P - (x - mean)*Q
    const MeanTerms<acc_t> pq(bn, dgamma.const_data_ptr<double>(), dbeta.const_data_ptr<double>(), M, C);
    at::parallel_for(0, M, kCpuRowsPerChunk, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        grad_dx_pixel<scalar_t, acc_t>(xp + r * ldx, dp + (r / hw) * C, bn, pq, C, dxp + r * C);
    });
  });
  return {dx, dgamma.to(acc), dbeta.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bnrelu_global_avgpool_fwd", &fwd);
  m.impl("bnrelu_global_avgpool_bwd", &bwd);
}

}  // namespace cpu
}  // namespace densenet_fused
