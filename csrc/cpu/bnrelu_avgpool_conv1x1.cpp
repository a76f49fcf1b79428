// bnrelu_avgpool_conv1x1 on the CPU: the fused DenseNet transition (docs/design.md section 9).
// Forward: out = avgpool2x2(relu(x*scale + shift)) @ W^T, the pool applied before the 1x1
// convolution (both linear: they commute), inside the GEMM's prologue: each pooled row is the
// average of its 4 pixels' BN-ReLU, built in a small per-thread tile (rounded to the feature
// dtype, as the GPU kernel feeds the MMA) and multiplied with ATen's GEMM.  Odd H/W are floored
// (the last row/column dropped) as nn.AvgPool2d(2, 2) does.
// Backward: dW = dout^T @ pooled activation (recomputed), g = (dout @ W)/4 spread to the 4
// pixels times the ReLU mask; dx = scale*g in eval, and with batch statistics the whole
// BatchNorm input gradient dx = scale*(g - mean(g) - xhat*mean(g*xhat)) over every pixel of x
// (second pass; the dropped pixels get only the mean terms).  Reductions go through fixed
// chunks reduced in order: deterministic results.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "bn_grad_common.h"

namespace densenet_fused {
namespace cpu {
namespace {

constexpr int64_t kTile = 64;        // pooled rows per tile
constexpr int64_t kMaxChunks = 16;   // dweight / per-channel sum partials in the backward

struct Geometry {
  int64_t n, h, w, ho, wo, mo;
  // first pixel (row of x) of pooled row r
  int64_t base(int64_t r) const {
    const int64_t img = r / (ho * wo), rem = r % (ho * wo);
    return (img * h + 2 * (rem / wo)) * w + 2 * (rem % wo);
  }
};

Geometry check_args(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                    const at::Tensor& weight, at::IntArrayRef nhw) {
  check_matrix(x, op, "x");
  TORCH_CHECK(nhw.size() == 3, op, ": expected nhw = [N, H, W] (3 ints), got ", nhw.size(), " values");
  const int64_t n = nhw[0], h = nhw[1], w = nhw[2];
  TORCH_CHECK(n >= 0 && h >= 0 && w >= 0 && n * h * w == x.size(0), op, ": expected nhw = [N, H, W] with N*H*W = ",
              x.size(0), " (the rows of x), got ", nhw);
  TORCH_CHECK(h >= 2 && w >= 2, op, ": expected H >= 2 and W >= 2 (a 2x2 average pool), got H=", h, ", W=", w);
  const int64_t C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  check_vector(scale, C, acc, x, op, "scale");
  check_vector(shift, C, acc, x, op, "shift");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == C, op, ": expected weight of shape (out_channels, ", C,
              ") for x with ", C, " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": expected weight of dtype ", x.scalar_type(),
              " (the dtype of x), got ", weight.scalar_type());
  check_same_device(weight, x, op, "weight");
  return {n, h, w, h / 2, w / 2, n * (h / 2) * (w / 2)};
}

// The gradient reaching each of the 4 pixels of the windows of a tile of pooled rows, before the
// ReLU mask: (dout @ W)/4, (rows, C) contiguous in acc_t.
inline at::Tensor window_grad(const at::Tensor& dout_acc, const at::Tensor& w_acc) {
  return at::mm(dout_acc, w_acc).mul_(0.25);
}

// a[r, c] = mean over the 2x2 window of pooled row r0 + r of relu(x*scale + shift), rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void pooled_rows(const scalar_t* x, int64_t ldx, const Geometry& g, int64_t r0, int64_t rows, int64_t C,
                 const acc_t* scale, const acc_t* shift, scalar_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t p = g.base(r0 + r);
    const scalar_t* x00 = x + p * ldx;
    const scalar_t* x01 = x00 + ldx;
    const scalar_t* x10 = x + (p + g.w) * ldx;
    const scalar_t* x11 = x10 + ldx;
    scalar_t* ar = a + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t s = scale[c], h = shift[c];
      const acc_t y00 = static_cast<acc_t>(x00[c]) * s + h, y01 = static_cast<acc_t>(x01[c]) * s + h;
      const acc_t y10 = static_cast<acc_t>(x10[c]) * s + h, y11 = static_cast<acc_t>(x11[c]) * s + h;
      // relu as torch's: a NaN stays NaN
      const acc_t sum = (y00 <= 0 ? acc_t(0) : y00) + (y01 <= 0 ? acc_t(0) : y01) + (y10 <= 0 ? acc_t(0) : y10) +
                        (y11 <= 0 ? acc_t(0) : y11);
      ar[c] = static_cast<scalar_t>(sum * acc_t(0.25));
    }
  }
}

void fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
         at::IntArrayRef nhw, const at::Tensor& out) {
  const char* op = "bnrelu_avgpool_conv1x1_fwd";
  const Geometry g = check_args(op, x, scale, shift, weight, nhw);
  const int64_t C = x.size(1), Cout = weight.size(0);
  check_matrix(out, op, "out");
  TORCH_CHECK(out.size(0) == g.mo && out.size(1) == Cout, op, ": expected out of shape (", g.mo, ", ", Cout,
              ") (N*(H/2)*(W/2) pooled rows, out_channels), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, ": expected out of dtype ", x.scalar_type(),
              " (the dtype of x), got ", out.scalar_type());
  TORCH_CHECK(out.size(0) <= 1 || out.stride(0) >= Cout, op, ": expected out's rows not to overlap (row stride >= ",
              Cout, "), got strides ", out.strides());
  check_same_device(out, x, op, "out");
  if (g.mo == 0) return;
  if (C == 0) {
    out.zero_();
    return;
  }
  const at::Tensor wt = weight.t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_avgpool_conv1x1_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* hp = shift.const_data_ptr<acc_t>();
    at::parallel_for(0, ceil_div(g.mo, kTile), 1, [&](int64_t begin, int64_t end) {
      at::Tensor a = at::empty({kTile, C}, x.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * kTile, rows = std::min(kTile, g.mo - r0);
        pooled_rows<scalar_t, acc_t>(xp, x.stride(0), g, r0, rows, C, sp, hp, a.data_ptr<scalar_t>());
        at::Tensor o = out.narrow(0, r0, rows);  // rows of a strided slice (a block's buffer) or contiguous
        at::mm_out(o, a.narrow(0, 0, rows), wt);
      }
    });
  });
}

// With running statistics, the pixels the floor drops (last row / column of odd H / W) get gradient 0,
// and the op never reads them; but torch's transition convolves before it pools and its BatchNorm
// backward sums over every pixel, so a non-finite value there makes dgamma (0*xhat) and that
// channel's dweight (0*relu(y)) NaN: dgamma += 0*xhat, z_w += 0*relu(y) over those pixels.
template <typename scalar_t, typename acc_t>
void dropped_nonfinite(const scalar_t* xp, int64_t ldx, const Geometry& g, const BnVectors<acc_t>& bn, int64_t C,
                       double* dgamma, double* z_w) {
  for (int64_t nh = 0; nh < g.n * g.h; ++nh) {
    const int64_t hh = nh % g.h;
    for (int64_t ww = (hh >= 2 * g.ho ? 0 : 2 * g.wo); ww < g.w; ++ww) {
      const scalar_t* xr = xp + (nh * g.w + ww) * ldx;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t xv = static_cast<acc_t>(xr[c]);
        const acc_t y = xv * bn.scale[c] + bn.shift[c];
        dgamma[c] += static_cast<double>(acc_t(0) * ((xv - bn.mean[c]) * bn.rstd[c]));
        z_w[c] += static_cast<double>(acc_t(0) * (y <= acc_t(0) ? acc_t(0) : y));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& x,
                                                               const at::Tensor& scale, const at::Tensor& shift,
                                                               const at::Tensor& weight, at::IntArrayRef nhw,
                                                               const at::Tensor& mean, const at::Tensor& rstd,
                                                               bool batch_stats) {
  const char* op = "bnrelu_avgpool_conv1x1_bwd";
  const Geometry g = check_args(op, x, scale, shift, weight, nhw);
  const int64_t M = x.size(0), C = x.size(1), Cout = weight.size(0);
  const auto acc = acc_type(x.scalar_type());
  check_matrix(dout, op, "dout");
  TORCH_CHECK(dout.size(0) == g.mo && dout.size(1) == Cout, op, ": expected dout of shape (", g.mo, ", ", Cout,
              ") (N*(H/2)*(W/2) pooled rows, out_channels), got ", dout.sizes());
  TORCH_CHECK(dout.scalar_type() == x.scalar_type(), op, ": expected dout of dtype ", x.scalar_type(), ", got ",
              dout.scalar_type());
  check_same_device(dout, x, op, "dout");
  check_vector(mean, C, acc, x, op, "mean");
  check_vector(rstd, C, acc, x, op, "rstd");

  // every pixel is written, except the ones the floor drops in eval mode (their gradient is 0)
  const bool dropped = g.h != 2 * g.ho || g.w != 2 * g.wo;
  at::Tensor dx = batch_stats || !dropped ? at::empty({M, C}, x.options()) : at::zeros({M, C}, x.options());
  const int64_t ntiles = ceil_div(g.mo, kTile);
  const int64_t nchunks = std::max<int64_t>(1, std::min(kMaxChunks, ntiles));
  const int64_t tiles_per_chunk = std::max<int64_t>(1, ceil_div(ntiles, nchunks));
  at::Tensor dw_part = at::zeros({nchunks, Cout, C}, x.options().dtype(acc));
  ChannelGradSums sums(nchunks, C);
  at::Tensor dgamma = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({C}, x.options().dtype(at::kDouble));
  if (g.mo == 0 || C == 0) {
    dx.zero_();
    return {dx, at::zeros({Cout, C}, x.options().dtype(acc)), dgamma.to(acc), dbeta.to(acc)};
  }
  const at::Tensor w_acc = weight.to(acc);
  std::vector<double> z_w(C, 0.0);  // 0*relu(y) over the dropped pixels (running statistics): 0 or NaN

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_avgpool_conv1x1_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const BnVectors<acc_t> bn(scale, shift, mean, rstd);
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t ldx = x.stride(0);
    // pass 1: dW, the per-channel sums (and dx = scale*g without batch statistics)
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor a = at::empty({kTile, C}, x.options().dtype(acc));
      std::vector<acc_t> tsg(C), tsgx(C);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        at::Tensor dw = dw_part[chunk];
        const int64_t t_end = std::min(ntiles, (chunk + 1) * tiles_per_chunk);
        for (int64_t t = chunk * tiles_per_chunk; t < t_end; ++t) {
          const int64_t r0 = t * kTile, rows = std::min(kTile, g.mo - r0);
          const at::Tensor db = dout.narrow(0, r0, rows).to(acc);
          const at::Tensor da = window_grad(db, w_acc);
          const acc_t* dap = da.const_data_ptr<acc_t>();
          acc_t* ap = a.data_ptr<acc_t>();
          std::fill(tsg.begin(), tsg.end(), acc_t(0));
          std::fill(tsgx.begin(), tsgx.end(), acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = g.base(r0 + r);
            const int64_t pix[4] = {p, p + 1, p + g.w, p + g.w + 1};
            acc_t* ar = ap + r * C;
            std::fill(ar, ar + C, acc_t(0));
            for (int q = 0; q < 4; ++q)
              grad_sums_pixel<scalar_t, acc_t>(xp + pix[q] * ldx, dap + r * C, bn, C, tsg.data(), tsgx.data(),
                                               batch_stats ? nullptr : dxp + pix[q] * C, ar);
            for (int64_t c = 0; c < C; ++c)  // the pooled activation as the forward fed the GEMM
              ar[c] = static_cast<acc_t>(static_cast<scalar_t>(ar[c] * acc_t(0.25)));
          }
          sums.add(chunk, tsg, tsgx);
          dw.addmm_(db.t(), a.narrow(0, 0, rows));  // dW += dout^T @ pooled relu(bn(x))
        }
      }
    });
    sums.reduce(dgamma.data_ptr<double>(), dbeta.data_ptr<double>());
    if (!batch_stats) {
      if (dropped) dropped_nonfinite<scalar_t, acc_t>(xp, ldx, g, bn, C, dgamma.data_ptr<double>(), z_w.data());
      return;
    }
    // pass 2: dx = scale*g - P - (x - mean)*Q
    const MeanTerms<acc_t> pq(bn, dgamma.const_data_ptr<double>(), dbeta.const_data_ptr<double>(), M, C);
    at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * kTile, rows = std::min(kTile, g.mo - r0);
        const at::Tensor da = window_grad(dout.narrow(0, r0, rows).to(acc), w_acc);
        const acc_t* dap = da.const_data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t p = g.base(r0 + r);
          const int64_t pix[4] = {p, p + 1, p + g.w, p + g.w + 1};
          for (int q = 0; q < 4; ++q)
            grad_dx_pixel<scalar_t, acc_t>(xp + pix[q] * ldx, dap + r * C, bn, pq, C, dxp + pix[q] * C);
        }
      }
    });
    // the pixels the floor dropped (last row / column of odd H / W): g = 0, only the mean terms
    if (!dropped) return;
    at::parallel_for(0, g.n * g.h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nh = begin; nh < end; ++nh) {
        const int64_t hh = nh % g.h;
        for (int64_t ww = (hh >= 2 * g.ho ? 0 : 2 * g.wo); ww < g.w; ++ww) {
          const int64_t pix = nh * g.w + ww;
          const scalar_t* xr = xp + pix * ldx;
          scalar_t* dxr = dxp + pix * C;
          for (int64_t c = 0; c < C; ++c)
            dxr[c] = static_cast<scalar_t>(-pq.P[c] - (static_cast<acc_t>(xr[c]) - bn.mean[c]) * pq.Q[c]);
        }
      }
    });
  });
  at::Tensor dweight = dw_part.sum(0);  // fixed order over chunks
  if (std::any_of(z_w.begin(), z_w.end(), [](double v) { return std::isnan(v); }))
    dweight.add_(at::tensor(z_w, x.options().dtype(at::kDouble)).to(acc).unsqueeze(0));
  return {dx, dweight, dgamma.to(acc), dbeta.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bnrelu_avgpool_conv1x1_fwd", &fwd);
  m.impl("bnrelu_avgpool_conv1x1_bwd", &bwd);
}

}  // namespace cpu
}  // namespace densenet_fused
