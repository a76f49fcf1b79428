// bnrelu_maxpool on the CPU: the stem's BatchNorm-ReLU-3x3/2 max pool (pad 1) on conv0's output
// y (an (N*H*W, C) NHWC matrix), and its backward (docs/design.md section 9).
//
// Forward: out = max over each window of relu(y*scale + shift) rounded to y's dtype (what a
// torch BatchNorm-ReLU chain in that dtype feeds the pool), the window position kh*3 + kw of the
// maximum as int8.  Tie rule of torch's max_pool2d: the first maximum in scan order (strict >), a
// NaN always taken, padding never chosen.
// Backward: g = dout routed to each window's maximum, masked by relu > 0 or NaN (torch's relu
// backward).  Pass 1 runs over the pooled outputs (reading y only at the maxima) for dbeta = sum(g),
// dgamma = sum(g*xhat); pass 2
// over y's rows collects g of a row from the one or two pooled rows whose windows cover it (rows in
// parallel, no atomics) and writes dy = scale*(g - dbeta/count - xhat*dgamma/count), or scale*g for running
// statistics (count = 0).  Reductions go through fixed chunks reduced in order: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "bn_grad_common.h"

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

// The channel loops of the hot paths, with restrict pointers (the pointers come from tensors and
// vectors the compiler cannot prove distinct) and unconditional loads and selects only, so that they
// vectorize.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void activate_row(const scalar_t* __restrict__ y, const acc_t* __restrict__ s,
                                            const acc_t* __restrict__ h, int64_t C, acc_t* __restrict__ a) {
  for (int64_t c = 0; c < C; ++c) a[c] = bnrelu<scalar_t, acc_t>(y[c], s[c], h[c]);
}

// torch's rule: strict >, a NaN always taken
template <typename acc_t>
inline void max_update(const acc_t* __restrict__ v, int64_t C, int32_t k, acc_t* __restrict__ best,
                       int32_t* __restrict__ arg) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t x = v[c], m = best[c];
    const int32_t i = arg[c];
    const bool take = (x > m) | (x != x);
    best[c] = take ? x : m;
    arg[c] = take ? k : i;
  }
}

template <typename scalar_t, typename acc_t>
inline void widen(const int8_t* __restrict__ index, const scalar_t* __restrict__ d, int64_t C,
                  int32_t* __restrict__ kv, acc_t* __restrict__ dv) {
  for (int64_t c = 0; c < C; ++c) {
    kv[c] = index[c];
    dv[c] = static_cast<acc_t>(d[c]);
  }
}

template <typename acc_t>
inline void route(const int32_t* __restrict__ kv, const acc_t* __restrict__ dv, int32_t code, int64_t C,
                  acc_t* __restrict__ g) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = dv[c];
    g[c] += kv[c] == code ? d : acc_t(0);
  }
}

// dy = scale*(gc - a - xhat*b) for one pixel with batch statistics (z null), dy = scale*gc with running
// ones, gc = g*!(relu <= 0) (torch's relu backward: a NaN passes).  With running statistics z += 0*xhat
// where gc = 0: torch's dgamma = sum(gc*xhat) over every pixel is NaN where a pixel no window took (or
// whose ReLU is off) has a non-finite xhat, which pass 1 (the maxima only) does not see.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void bn_backward_pixel(const scalar_t* __restrict__ y, const acc_t* __restrict__ g,
                                                 const acc_t* __restrict__ s, const acc_t* __restrict__ h,
                                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                                 const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t C,
                                                 scalar_t* __restrict__ dy, acc_t* __restrict__ z) {
  if (z == nullptr) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t yv = y[c];
      const acc_t gv = g[c], sc = s[c];
      const acc_t gc = bnrelu<scalar_t, acc_t>(yv, sc, h[c]) <= acc_t(0) ? acc_t(0) : gv;
      const acc_t xhat = (static_cast<acc_t>(yv) - mean[c]) * rstd[c];
      dy[c] = static_cast<scalar_t>(sc * (gc - a[c] - xhat * b[c]));
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t yv = y[c];
    const acc_t gv = g[c], sc = s[c];
    const acc_t gc = bnrelu<scalar_t, acc_t>(yv, sc, h[c]) <= acc_t(0) ? acc_t(0) : gv;
    const acc_t xhat = (static_cast<acc_t>(yv) - mean[c]) * rstd[c];
    dy[c] = static_cast<scalar_t>(sc * gc);
    z[c] += gc == acc_t(0) ? acc_t(0) * xhat : acc_t(0);
  }
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
      // one activated input row at a time (each y value activated 1.5 times on average), running maxima of
      // the output row with int32 window positions: same-width selects, so the channel loops vectorize
      std::vector<acc_t> act(g.W * C), best(g.Wp * C);
      std::vector<int32_t> arg(g.Wp * C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.Hp, oh = row % g.Hp;
        bool first_row = true;  // a window's first valid position is taken unconditionally
        for (int64_t kh = 0; kh < kPoolK; ++kh) {
          const int64_t ih = oh * kPoolStride - kPoolPad + kh;
          if (ih < 0 || ih >= g.H) continue;
          for (int64_t iw = 0; iw < g.W; ++iw) {
            const scalar_t* yr = yp + ((n * g.H + ih) * g.W + iw) * ld;
            activate_row<scalar_t, acc_t>(yr, sp, hp, C, act.data() + iw * C);
          }
          for (int64_t ow = 0; ow < g.Wp; ++ow) {
            acc_t* b = best.data() + ow * C;
            int32_t* bi = arg.data() + ow * C;
            bool first = first_row;
            for (int64_t kw = 0; kw < kPoolK; ++kw) {
              const int64_t iw = ow * kPoolStride - kPoolPad + kw;
              if (iw < 0 || iw >= g.W) continue;
              const acc_t* v = act.data() + iw * C;
              const int32_t k = static_cast<int32_t>(kh * kPoolK + kw);
              if (first) {
                for (int64_t c = 0; c < C; ++c) {
                  b[c] = v[c];
                  bi[c] = k;
                }
                first = false;
                continue;
              }
              max_update<acc_t>(v, C, k, b, bi);
            }
          }
          first_row = false;
        }
        scalar_t* oo = outp + row * g.Wp * C;
        int8_t* io = ip + row * g.Wp * C;
        for (int64_t e = 0; e < g.Wp * C; ++e) {
          oo[e] = static_cast<scalar_t>(best[e]);
          io[e] = static_cast<int8_t>(arg[e]);
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
  ChannelGradSums sums(nchunks, C);
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
        const int64_t r_end = std::min(rows, (chunk + 1) * rows_per_chunk);
        for (int64_t row = chunk * rows_per_chunk; row < r_end; ++row) {
          const int64_t n = row / g.Hp, oh = row % g.Hp;
          std::fill(t1.begin(), t1.end(), acc_t(0));
          std::fill(t2.begin(), t2.end(), acc_t(0));
          for (int64_t ow = 0; ow < g.Wp; ++ow) {
            const int64_t o = row * g.Wp + ow;
            // element offset of each window position's y row; -1 outside y (padding) and for k >= 9
            int64_t off[16];
            std::fill(off, off + 16, int64_t(-1));
            for (int64_t kh = 0; kh < kPoolK; ++kh) {
              const int64_t ih = oh * kPoolStride - kPoolPad + kh;
              if (ih < 0 || ih >= g.H) continue;
              for (int64_t kw = 0; kw < kPoolK; ++kw) {
                const int64_t iw = ow * kPoolStride - kPoolPad + kw;
                if (iw >= 0 && iw < g.W) off[kh * kPoolK + kw] = ((n * g.H + ih) * g.W + iw) * ld;
              }
            }
            const int8_t* io = ip + o * C;
            const scalar_t* d = dp + o * C;
            bool any_bad = false;
            for (int64_t c = 0; c < C; ++c) {
              const uint8_t k = static_cast<uint8_t>(io[c]);
              const int64_t base = off[k & 15];
              const bool ok = (k < 16) & (base >= 0);
              any_bad |= !ok;
              const scalar_t yv = yp[(ok ? base : 0) + c];
              const bool on = ok & !(bnrelu<scalar_t, acc_t>(yv, sp[c], hp[c]) <= acc_t(0));
              const acc_t dv = on ? static_cast<acc_t>(d[c]) : acc_t(0);
              t1[c] += dv;
              t2[c] += dv * ((static_cast<acc_t>(yv) - mp[c]) * rp[c]);
            }
            if (any_bad) bad[chunk] = 1;
          }
          sums.add(chunk, t1, t2);
        }
      }
    });
    for (int64_t chunk = 0; chunk < nchunks; ++chunk)
      TORCH_CHECK(!bad[chunk], op, ": expected index values in [0, 9) pointing inside y (the forward's window "
                  "index), got an out-of-range entry");
    double* dgp = dgamma.data_ptr<double>();
    double* dbp = dbeta.data_ptr<double>();
    sums.reduce(dgp, dbp);
    // pass 2 over y's rows: g of a row from the (one or two) pooled rows whose windows cover it, in the
    // order (oh0, ow0), (oh0, ow0 + 1), (oh0 + 1, ow0), (oh0 + 1, ow0 + 1) for each pixel (as the Triton
    // kernel gathers it), then the BatchNorm input gradient
    std::vector<acc_t> a(C, acc_t(0)), b(C, acc_t(0));
    if (count > 0) {
      for (int64_t c = 0; c < C; ++c) {
        a[c] = static_cast<acc_t>(dbp[c] / static_cast<double>(count));
        b[c] = static_cast<acc_t>(dgp[c] / static_cast<double>(count));
      }
    }
    scalar_t* dyp = dy.data_ptr<scalar_t>();
    // running statistics: per y row (n, ih), the 0*xhat terms of dgamma pass 1 did not see (0 or NaN)
    std::vector<acc_t> zrows(count > 0 ? 0 : g.N * g.H * C, acc_t(0));
    at::parallel_for(0, g.N * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> grow(g.W * C), dv(C);
      std::vector<int32_t> kv(C);  // the window index widened: same-width selects vectorize
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.H, ih = row % g.H;
        std::fill(grow.begin(), grow.end(), acc_t(0));
        // windows covering ih: oh0 = ih/2 with window row kh = ih%2 + 1, and for odd ih also oh0 + 1 (kh = 0)
        const int64_t oh0 = ih / kPoolStride;
        for (int64_t dh = 0; dh < 2; ++dh) {
          const int64_t oh = oh0 + dh;
          if (dh == 1 && (ih % kPoolStride != 1 || oh >= g.Hp)) continue;
          const int64_t kh = dh ? 0 : ih % kPoolStride + kPoolPad;
          for (int64_t ow = 0; ow < g.Wp; ++ow) {
            const int64_t o = (n * g.Hp + oh) * g.Wp + ow;
            const int8_t* io = ip + o * C;
            const scalar_t* d = dp + o * C;
            widen<scalar_t, acc_t>(io, d, C, kv.data(), dv.data());
            for (int64_t kw = 0; kw < kPoolK; ++kw) {
              const int64_t iw = ow * kPoolStride - kPoolPad + kw;
              if (iw < 0 || iw >= g.W) continue;
              const int32_t code = static_cast<int32_t>(kh * kPoolK + kw);
              route<acc_t>(kv.data(), dv.data(), code, C, grow.data() + iw * C);
            }
          }
        }
        for (int64_t iw = 0; iw < g.W; ++iw) {
          const int64_t p = (n * g.H + ih) * g.W + iw;
          bn_backward_pixel<scalar_t, acc_t>(yp + p * ld, grow.data() + iw * C, sp, hp, mp, rp, a.data(), b.data(), C,
                                             dyp + p * C, count > 0 ? nullptr : zrows.data() + row * C);
        }
      }
    });
    if (count == 0) {
      for (int64_t row = 0; row < g.N * g.H; ++row)
        for (int64_t c = 0; c < C; ++c) dgp[c] += static_cast<double>(zrows[row * C + c]);
    }
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
