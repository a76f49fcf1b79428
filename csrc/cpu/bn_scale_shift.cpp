// bn_scale_shift on the CPU: rstd = 1/sqrt(var + eps), scale = gamma*rstd, shift = beta - mean*scale.
#include <ATen/Dispatch.h>
#include <cmath>

#include "../common.h"

namespace densenet_fused {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                              const at::Tensor& mean, const at::Tensor& var,
                                                              double eps) {
  const char* op = "bn_scale_shift";
  TORCH_CHECK(mean.dim() == 1 && (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble), op,
              ": expected mean to be a 1-D float32/float64 tensor, got ", mean.sizes(), " ", mean.scalar_type());
  const int64_t C = mean.size(0);
  check_vector(var, C, mean.scalar_type(), mean, op, "var");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(gamma, "gamma"), {beta, "beta"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_floating_point(), op, ": expected ", name,
                " to be a 1-D floating tensor of ", C, " channels, got ", t.sizes(), " ", t.scalar_type());
    check_same_device(t, mean, op, name);
  }
  TORCH_CHECK(eps >= 0, op, ": expected eps >= 0, got ", eps);
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  const at::Tensor g = gamma.to(mean.scalar_type()).contiguous(), b = beta.to(mean.scalar_type()).contiguous();
  at::Tensor scale = at::empty_like(m), shift = at::empty_like(m), rstd = at::empty_like(m);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_scale_shift_cpu", [&] {
    const scalar_t *mp = m.const_data_ptr<scalar_t>(), *vp = v.const_data_ptr<scalar_t>();
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    scalar_t *sp = scale.data_ptr<scalar_t>(), *hp = shift.data_ptr<scalar_t>(), *rp = rstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      rp[c] = scalar_t(1) / std::sqrt(vp[c] + static_cast<scalar_t>(eps));
      sp[c] = gp[c] * rp[c];
      hp[c] = bp[c] - mp[c] * sp[c];
    }
  });
  return {scale, shift, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) { m.impl("bn_scale_shift", &bn_scale_shift); }

}  // namespace cpu
}  // namespace densenet_fused
