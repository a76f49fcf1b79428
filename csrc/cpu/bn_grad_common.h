// The BatchNorm input gradient of the CPU ops whose backward ends in a BatchNorm-ReLU read from x
// (bnrelu_avgpool_conv1x1, bnrelu_global_avgpool; bnrelu_maxpool shares the chunked sums).  With
// d the gradient reaching relu(x*scale + shift), g = d except where x*scale + shift <= 0 (there 0:
// torch's relu backward, which passes the gradient of a NaN) and
// xhat = (x - mean)*rstd:
//   pass 1: per-channel sums of g (dbeta) and g*xhat (dgamma), accumulated per fixed chunk and
//           reduced in chunk order (deterministic whatever the thread count); dx = scale*g with
//           running statistics (then it is the whole gradient);
//   pass 2: with batch statistics, dx = scale*g - P - (x - mean)*Q with P = scale*mean(g) and
//           Q = scale*rstd*mean(g*xhat).
#pragma once
#include <ATen/ATen.h>
#include <vector>

namespace densenet_fused {
namespace cpu {

// The per-channel vectors of a BatchNorm-ReLU, in the accumulation dtype.
template <typename acc_t>
struct BnVectors {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  const acc_t* rstd;
  BnVectors(const at::Tensor& scale_, const at::Tensor& shift_, const at::Tensor& mean_, const at::Tensor& rstd_)
      : scale(scale_.const_data_ptr<acc_t>()),
        shift(shift_.const_data_ptr<acc_t>()),
        mean(mean_.const_data_ptr<acc_t>()),
        rstd(rstd_.const_data_ptr<acc_t>()) {}
};

// sum(g) and sum(g*xhat) per channel over fixed chunks: a chunk adds its partial sums (acc_t)
// into its own float64 slots; reduce() adds the slots in chunk order.
class ChannelGradSums {
 public:
  ChannelGradSums(int64_t nchunks, int64_t channels)
      : C_(channels), sg_(nchunks * channels, 0.0), sgx_(nchunks * channels, 0.0) {}

  template <typename acc_t>
  void add(int64_t chunk, const std::vector<acc_t>& g, const std::vector<acc_t>& gx) {
    double* s1 = sg_.data() + chunk * C_;
    double* s2 = sgx_.data() + chunk * C_;
    for (int64_t c = 0; c < C_; ++c) {
      s1[c] += static_cast<double>(g[c]);
      s2[c] += static_cast<double>(gx[c]);
    }
  }

  // dbeta += sum(g), dgamma += sum(g*xhat) (float64, C channels), chunk by chunk in order
  void reduce(double* dgamma, double* dbeta) const {
    const int64_t nchunks = C_ == 0 ? 0 : static_cast<int64_t>(sg_.size()) / C_;
    for (int64_t chunk = 0; chunk < nchunks; ++chunk)
      for (int64_t c = 0; c < C_; ++c) {
        dbeta[c] += sg_[chunk * C_ + c];
        dgamma[c] += sgx_[chunk * C_ + c];
      }
  }

 private:
  int64_t C_;
  std::vector<double> sg_, sgx_;
};

// P = scale*dbeta/count and Q = scale*rstd*dgamma/count, computed in float64, kept in acc_t.
template <typename acc_t>
struct MeanTerms {
  std::vector<acc_t> P, Q;
  MeanTerms(const BnVectors<acc_t>& bn, const double* dgamma, const double* dbeta, int64_t count, int64_t C)
      : P(C), Q(C) {
    for (int64_t c = 0; c < C; ++c) {
      P[c] = static_cast<acc_t>(static_cast<double>(bn.scale[c]) * dbeta[c] / static_cast<double>(count));
      Q[c] = static_cast<acc_t>(static_cast<double>(bn.scale[c]) * static_cast<double>(bn.rstd[c]) * dgamma[c] /
                                static_cast<double>(count));
    }
  }
};

// Pass 1 on one pixel (C channels of x, d): s1 += g, s2 += g*xhat; dx = scale*g when dx is not
// null; relu_sum += relu(x*scale + shift) when it is not null (an op's recomputed activation).
template <typename scalar_t, typename acc_t>
inline void grad_sums_pixel(const scalar_t* x, const acc_t* d, const BnVectors<acc_t>& bn, int64_t C, acc_t* s1,
                            acc_t* s2, scalar_t* dx, acc_t* relu_sum) {
  const acc_t *sp = bn.scale, *hp = bn.shift, *mp = bn.mean, *rp = bn.rstd;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t y = xv * sp[c] + hp[c];
    const bool on = !(y <= acc_t(0));  // torch's relu backward: the gradient passes a NaN
    const acc_t gv = on ? d[c] : acc_t(0);
    if (relu_sum) relu_sum[c] += on ? y : acc_t(0);
    s1[c] += gv;
    s2[c] += gv * ((xv - mp[c]) * rp[c]);
    if (dx) dx[c] = static_cast<scalar_t>(sp[c] * gv);
  }
}

// Pass 2 on one pixel: dx = scale*g - P - (x - mean)*Q.
template <typename scalar_t, typename acc_t>
inline void grad_dx_pixel(const scalar_t* x, const acc_t* d, const BnVectors<acc_t>& bn, const MeanTerms<acc_t>& t,
                          int64_t C, scalar_t* dx) {
  const acc_t *sp = bn.scale, *hp = bn.shift, *mp = bn.mean;
  const acc_t *P = t.P.data(), *Q = t.Q.data();
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t gv = xv * sp[c] + hp[c] <= acc_t(0) ? acc_t(0) : d[c];
    dx[c] = static_cast<scalar_t>(sp[c] * gv - P[c] - (xv - mp[c]) * Q[c]);
  }
}

}  // namespace cpu
}  // namespace densenet_fused
