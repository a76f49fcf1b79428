// bn_grad_finish on the CPU: dx = G [* G_scale] - P - (x - mean) * Q per channel slice, written in
// the requested dtype, as an NHWC (M, C) matrix or as NCHW (N, C, HW).
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../bn_grad_finish.h"

namespace densenet_fused {
namespace cpu {
namespace {

// (x - mean)*Q, 0 for Q = 0 (running statistics): torch's eval-mode BatchNorm backward has no mean
// terms, so an Inf or NaN x must not turn 0 into NaN there.
template <typename x_t, typename acc_t>
inline acc_t mean_term(x_t x, acc_t mean, acc_t q) {
  return q == acc_t(0) ? acc_t(0) : (static_cast<acc_t>(x) - mean) * q;
}

at::Tensor bn_grad_finish(const at::Tensor& G, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& P, const at::Tensor& Q, at::ScalarType dtype, int64_t nchw_hw,
                          const std::optional<at::Tensor>& G_scale) {
  check_bn_grad_finish_args(G, x, mean, P, Q, dtype, nchw_hw, G_scale);
  const int64_t M = x.size(0), C = x.size(1);
  at::Tensor out = nchw_hw > 0 ? at::empty({M / nchw_hw, C, nchw_hw}, x.options().dtype(dtype))
                               : at::empty({M, C}, x.options().dtype(dtype));
  if (M == 0 || C == 0) return out;
  const auto acc = acc_type(x.scalar_type());
  const int64_t ldg = G.stride(0), ldx = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_finish_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bn_grad_finish_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(acc, "bn_grad_finish_acc", [&] {
        using acc_t = scalar_t;
        const acc_t* gp = G.const_data_ptr<acc_t>();
        const acc_t* mp = mean.const_data_ptr<acc_t>();
        const acc_t* pp = P.const_data_ptr<acc_t>();
        const acc_t* qp = Q.const_data_ptr<acc_t>();
        const at::Tensor ones = G_scale.has_value() ? at::Tensor() : at::ones({C}, x.options().dtype(acc));
        const acc_t* sp = (G_scale.has_value() ? *G_scale : ones).const_data_ptr<acc_t>();
        const x_t* xp = x.const_data_ptr<x_t>();
        out_t* op_ = out.data_ptr<out_t>();
        at::parallel_for(0, M, kCpuRowsPerChunk, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const acc_t* grow = gp + r * ldg;
            const x_t* xrow = xp + r * ldx;
            if (nchw_hw == 0) {
              out_t* orow = op_ + r * C;
              for (int64_t c = 0; c < C; ++c)
                orow[c] = static_cast<out_t>(grow[c] * sp[c] - pp[c] - mean_term(xrow[c], mp[c], qp[c]));
            } else {
              const int64_t n = r / nchw_hw, hw = r % nchw_hw;
              out_t* obase = op_ + n * C * nchw_hw + hw;
              for (int64_t c = 0; c < C; ++c)
                obase[c * nchw_hw] =
                    static_cast<out_t>(grow[c] * sp[c] - pp[c] - mean_term(xrow[c], mp[c], qp[c]));
            }
          }
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) { m.impl("bn_grad_finish", &bn_grad_finish); }

}  // namespace cpu
}  // namespace densenet_fused
