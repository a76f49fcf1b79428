// channel_stats on the CPU: two passes (mean, then centred sum of squares) over fixed
// row chunks, accumulated in float64 and reduced in chunk order, so the result is
// deterministic and free of the cancellation of a naive sum of squares.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <vector>

#include "../common.h"
#include "cpu_kernels.h"

namespace densenet_fused {
namespace cpu {

namespace {

template <typename scalar_t>
void column_sums(const scalar_t* x, int64_t M, int64_t C, int64_t ld, const double* center,
                 bool squares, std::vector<double>& out) {
  const int64_t nchunks = ceil_div(M, kCpuRowsPerChunk);
  std::vector<double> part(nchunks * C, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* p = part.data() + chunk * C;
      const int64_t r_end = std::min(M, (chunk + 1) * kCpuRowsPerChunk);
      for (int64_t r = chunk * kCpuRowsPerChunk; r < r_end; ++r) {
        const scalar_t* row = x + r * ld;
        if (squares) {
          for (int64_t c = 0; c < C; ++c) {
            const double d = static_cast<double>(row[c]) - center[c];
            p[c] += d * d;
          }
        } else {
          for (int64_t c = 0; c < C; ++c) p[c] += static_cast<double>(row[c]);
        }
      }
    }
  });
  out.assign(C, 0.0);
  for (int64_t chunk = 0; chunk < nchunks; ++chunk)
    for (int64_t c = 0; c < C; ++c) out[c] += part[chunk * C + c];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> column_mean_var(const at::Tensor& x) {
  const int64_t M = x.size(0), C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor mean = at::empty({C}, x.options().dtype(acc));
  at::Tensor var = at::empty({C}, x.options().dtype(acc));
  if (C == 0) return {mean, var};
  std::vector<double> mu, ss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t ld = x.stride(0);
    std::vector<double> zero(C, 0.0);
    column_sums(xp, M, C, ld, zero.data(), false, mu);
    for (auto& v : mu) v /= static_cast<double>(M);
    column_sums(xp, M, C, ld, mu.data(), true, ss);
  });
  AT_DISPATCH_FLOATING_TYPES(acc, "channel_stats_cpu_out", [&] {
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* vp = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<scalar_t>(mu[c]);
      vp[c] = static_cast<scalar_t>(ss[c] / static_cast<double>(M));
    }
  });
  return {mean, var};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats(const at::Tensor& x, double eps) {
  check_channel_stats_args(x, eps);
  auto [mean, var] = column_mean_var(x);
  at::Tensor rstd = (var + eps).rsqrt_();
  return {mean, var, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) { m.impl("channel_stats", &channel_stats); }

}  // namespace cpu
}  // namespace densenet_fused
