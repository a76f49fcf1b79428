// bnrelu_maxpool on the CPU: the stem's BatchNorm-ReLU-3x3/2 max pool (pad 1) on conv0's output
// y (an (N*H*W, C) NHWC matrix), and its backward (DESIGN section 9).
//
// Forward: out = max over each window of relu(y*scale + shift) rounded to y's dtype (what a
// torch BatchNorm-ReLU chain in that dtype feeds the pool), the window position kh*3 + kw of the
// maximum as int8.  Tie rule of torch's max_pool2d: the first maximum in scan order (strict >), a
// NaN always taken, padding never chosen.
// Backward: g = dout routed to each window's maximum, masked by relu > 0.  Pass 1 runs over the
// pooled outputs (reading y only at the maxima) for dbeta = sum(g), dgamma = sum(g*xhat); pass 2
// over y's pixels gathers g from the at most 2x2 windows that contain the pixel (no scatter, no
// atomics) and writes dy = scale*(g - dbeta/count - xhat*dgamma/count), or scale*g for running
// statistics (count = 0).  Reductions go through fixed chunks reduced in order: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"

namespace densenet_fused {
namespace cpu {
namespace {

constexpr int64_t kPoolK = 3, kPoolStride = 2, kPoolPad = 1;

inline int64_t pooled_size(int64_t s) { return (s + 2 * kPoolPad - kPoolK) / kPoolStride + 1; }

struct Geometry {
  int64_t N, H, W, C, Hp, Wp;
};

Geometry check_common(const char* op, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                      at::IntArrayRef nhw) {
  check_matrix(y, op, "y");
  TORCH_CHECK(nhw.size() == 3 && nhw[0] > 0 && nhw[1] > 0 && nhw[2] > 0 && nhw[0] * nhw[1] * nhw[2] == y.size(0),
              op, ": expected nhw = [N, H, W] (positive) with N*H*W = ", y.size(0), " rows of y, got ", nhw);
  const int64_t C = y.size(1);
  const auto acc = acc_type(y.scalar_type());
  check_vector(scale, C, acc, y, op, "scale");
  check_vector(shift, C, acc, y, op, "shift");
  TORCH_CHECK(scale.stride(0) == 1 || C <= 1, op, ": expected scale with unit stride");
  TORCH_CHECK(shift.stride(0) == 1 || C <= 1, op, ": expected shift with unit stride");
  return {nhw[0], nhw[1], nhw[2], C, pooled_size(nhw[1]), pooled_size(nhw[2])};
}

// relu(y*scale + shift) rounded to scalar_t, in acc_t.  A NaN stays NaN (torch.relu propagates it).
template <typename scalar_t, typename acc_t>
inline acc_t bnrelu(scalar_t y, acc_t s, acc_t h) {
  const acc_t z = static_cast<acc_t>(y) * s + h;
  return static_cast<acc_t>(static_cast<scalar_t>(z < acc_t(0) ? acc_t(0) : z));
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                       at::IntArrayRef nhw) {
  const char* op = "bnrelu_maxpool_fwd";
  const Geometry g = check_common(op, y, scale, shift, nhw);
  const int64_t P = g.N * g.Hp * g.Wp, C = g.C;
  at::Tensor out = at::empty({P, C}, y.options());
  at::Tensor index = at::empty({P, C}, y.options().dtype(at::kChar));
  if (P == 0 || C == 0) return {out, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bnrelu_maxpool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* hp = shift.const_data_ptr<acc_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    int8_t* ip = index.data_ptr<int8_t>();
    const int64_t ld = y.stride(0);
    at::parallel_for(0, g.N * g.Hp, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.Hp, oh = row % g.Hp;
        for (int64_t ow = 0; ow < g.Wp; ++ow) {
          const int64_t o = row * g.Wp + ow;
          int8_t* io = ip + o * C;
          bool first = true;  // the window's first valid position is taken unconditionally
          for (int64_t kh = 0; kh < kPoolK; ++kh) {
            const int64_t ih = oh * kPoolStride - kPoolPad + kh;
            if (ih < 0 || ih >= g.H) continue;
            for (int64_t kw = 0; kw < kPoolK; ++kw) {
              const int64_t iw = ow * kPoolStride - kPoolPad + kw;
              if (iw < 0 || iw >= g.W) continue;
              const scalar_t* yr = yp + ((n * g.H + ih) * g.W + iw) * ld;
              const int8_t k = static_cast<int8_t>(kh * kPoolK + kw);
              if (first) {
                for (int64_t c = 0; c < C; ++c) {
                  best[c] = bnrelu<scalar_t, acc_t>(yr[c], sp[c], hp[c]);
                  io[c] = k;
                }
                first = false;
                continue;
              }
              for (int64_t c = 0; c < C; ++c) {
                const acc_t v = bnrelu<scalar_t, acc_t>(yr[c], sp[c], hp[c]);
                const bool take = (v > best[c]) || std::isnan(v);
                best[c] = take ? v : best[c];
                io[c] = take ? k : io[c];
              }
            }
          }
          scalar_t* oo = outp + o * C;
          for (int64_t c = 0; c < C; ++c) oo[c] = static_cast<scalar_t>(best[c]);
        }
      }
    });
  });
  return {out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& index,
                                                   const at::Tensor& y, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& mean,
                                                   const at::Tensor& rstd, at::IntArrayRef nhw, int64_t count) {
  const char* op = "bnrelu_maxpool_bwd";
  const Geometry g = check_common(op, y, scale, shift, nhw);
  const int64_t P = g.N * g.Hp * g.Wp, C = g.C, M = y.size(0);
  const auto acc = acc_type(y.scalar_type());
  check_vector(mean, C, acc, y, op, "mean");
  check_vector(rstd, C, acc, y, op, "rstd");
  TORCH_CHECK(mean.stride(0) == 1 || C <= 1, op, ": expected mean with unit stride");
  TORCH_CHECK(rstd.stride(0) == 1 || C <= 1, op, ": expected rstd with unit stride");
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == P && dout.size(1) == C && dout.is_contiguous(), op,
              ": expected dout to be a contiguous (", P, ", ", C, ") matrix (N*Hp*Wp pooled rows), got shape ",
              dout.sizes(), " strides ", dout.strides());
  TORCH_CHECK(dout.scalar_type() == y.scalar_type(), op, ": expected dout of dtype ", y.scalar_type(), ", got ",
              dout.scalar_type());
  check_same_device(dout, y, op, "dout");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == P && index.size(1) == C && index.is_contiguous() &&
                  index.scalar_type() == at::kChar,
              op, ": expected index to be a contiguous int8 (", P, ", ", C, ") matrix, got ", index.scalar_type(),
              " of shape ", index.sizes(), " strides ", index.strides());
  check_same_device(index, y, op, "index");
  TORCH_CHECK(count == 0 || count > 1, op,
              ": expected count = 0 (running statistics) or the values per channel (> 1), got ", count);

  at::Tensor dy = at::empty({M, C}, y.options());
  at::Tensor dgamma = at::zeros({C}, y.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({C}, y.options().dtype(at::kDouble));
  if (C == 0) return {dy, dgamma.to(acc), dbeta.to(acc)};
  // pass 1 over pooled rows (n, oh), fixed chunks of rows: shape-only, so bitwise reproducible
  const int64_t rows = g.N * g.Hp;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kCpuRowsPerChunk / g.Wp);
  const int64_t nchunks = ceil_div(rows, rows_per_chunk);
  std::vector<double> sg(nchunks * C, 0.0), sgx(nchunks * C, 0.0);
  std::vector<char> bad(nchunks, 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bnrelu_maxpool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* dp = dout.const_data_ptr<scalar_t>();
    const int8_t* ip = index.const_data_ptr<int8_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* hp = shift.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    const int64_t ld = y.stride(0);
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> t1(C), t2(C);  // per-row sums in acc_t, chunk sums in double
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        double* s1 = sg.data() + chunk * C;
        double* s2 = sgx.data() + chunk * C;
        const int64_t r_end = std::min(rows, (chunk + 1) * rows_per_chunk);
        for (int64_t row = chunk * rows_per_chunk; row < r_end; ++row) {
          const int64_t n = row / g.Hp, oh = row % g.Hp;
          std::fill(t1.begin(), t1.end(), acc_t(0));
          std::fill(t2.begin(), t2.end(), acc_t(0));
          for (int64_t ow = 0; ow < g.Wp; ++ow) {
            const int64_t o = row * g.Wp + ow;
            for (int64_t c = 0; c < C; ++c) {
              const int64_t k = ip[o * C + c];
              const int64_t ih = oh * kPoolStride - kPoolPad + k / kPoolK;
              const int64_t iw = ow * kPoolStride - kPoolPad + k % kPoolK;
              if (k < 0 || k >= kPoolK * kPoolK || ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) {
                bad[chunk] = 1;
                continue;
              }
              const scalar_t yv = yp[((n * g.H + ih) * g.W + iw) * ld + c];
              if (!(bnrelu<scalar_t, acc_t>(yv, sp[c], hp[c]) > acc_t(0))) continue;
              const acc_t d = static_cast<acc_t>(dp[o * C + c]);
              t1[c] += d;
              t2[c] += d * ((static_cast<acc_t>(yv) - mp[c]) * rp[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            s1[c] += static_cast<double>(t1[c]);
            s2[c] += static_cast<double>(t2[c]);
          }
        }
      }
    });
    for (int64_t chunk = 0; chunk < nchunks; ++chunk)
      TORCH_CHECK(!bad[chunk], op, ": expected index values in [0, 9) pointing inside y (the forward's window "
                  "index), got an out-of-range entry");
    double* dgp = dgamma.data_ptr<double>();
    double* dbp = dbeta.data_ptr<double>();
    for (int64_t chunk = 0; chunk < nchunks; ++chunk)
      for (int64_t c = 0; c < C; ++c) {
        dbp[c] += sg[chunk * C + c];
        dgp[c] += sgx[chunk * C + c];
      }
    // pass 2 over y's pixels: gather g from the windows containing each pixel (fixed order)
    std::vector<acc_t> a(C, acc_t(0)), b(C, acc_t(0));
    if (count > 0) {
      for (int64_t c = 0; c < C; ++c) {
        a[c] = static_cast<acc_t>(dbp[c] / static_cast<double>(count));
        b[c] = static_cast<acc_t>(dgp[c] / static_cast<double>(count));
      }
    }
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gv(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.H, ih = row % g.H;
        // windows containing ih: oh = ih/2 (kh = ih%2 + 1), and for odd ih also oh + 1 (kh = 0)
        const int64_t oh0 = ih / kPoolStride, kh0 = ih % kPoolStride + kPoolPad;
        const bool has_h1 = (ih % kPoolStride == 1) && oh0 + 1 < g.Hp;
        for (int64_t iw = 0; iw < g.W; ++iw) {
          const int64_t ow0 = iw / kPoolStride, kw0 = iw % kPoolStride + kPoolPad;
          const bool has_w1 = (iw % kPoolStride == 1) && ow0 + 1 < g.Wp;
          std::fill(gv.begin(), gv.end(), acc_t(0));
          for (int64_t dh = 0; dh < 2; ++dh) {
            if (dh == 1 && !has_h1) continue;
            for (int64_t dw = 0; dw < 2; ++dw) {
              if (dw == 1 && !has_w1) continue;
              const int64_t o = (n * g.Hp + oh0 + dh) * g.Wp + ow0 + dw;
              const int8_t k = static_cast<int8_t>((dh ? 0 : kh0) * kPoolK + (dw ? 0 : kw0));
              const int8_t* io = ip + o * C;
              const scalar_t* d = dp + o * C;
              for (int64_t c = 0; c < C; ++c) gv[c] += io[c] == k ? static_cast<acc_t>(d[c]) : acc_t(0);
            }
          }
          const int64_t p = (n * g.H + ih) * g.W + iw;
          const scalar_t* yr = yp + p * ld;
          scalar_t* dr = dyp + p * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gc = bnrelu<scalar_t, acc_t>(yr[c], sp[c], hp[c]) > acc_t(0) ? gv[c] : acc_t(0);
            const acc_t xhat = (static_cast<acc_t>(yr[c]) - mp[c]) * rp[c];
            dr[c] = static_cast<scalar_t>(sp[c] * (gc - a[c] - xhat * b[c]));
          }
        }
      }
    });
  });
  return {dy, dgamma.to(acc), dbeta.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bnrelu_maxpool_fwd", &fwd);
  m.impl("bnrelu_maxpool_bwd", &bwd);
}

}  // namespace cpu
}  // namespace densenet_fused
