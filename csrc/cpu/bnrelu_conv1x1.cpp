// bnrelu_conv1x1 on the CPU: out = relu(x*scale + shift) @ W^T and its one-pass backward.
// Rows are processed in tiles of kTile: BN-ReLU is applied into a small per-thread tile
// (rounded to the feature dtype, as the GPU kernels feed the MMA) and multiplied by the
// weight with ATen's GEMM; the normalized (M, C) input never exists.  Reductions (dweight,
// per-channel sums) go through fixed chunks reduced in order: deterministic results.
#include <cmath>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <optional>
#include <vector>

#include "../common.h"
#include "cpu_kernels.h"

namespace densenet_fused {
namespace cpu {
namespace {

void check_pq_args(const char* op, const std::optional<at::Tensor>& P, const std::optional<at::Tensor>& Q,
                   int64_t count, int64_t C, at::ScalarType acc, const at::Tensor& x) {
  TORCH_CHECK(P.has_value() == Q.has_value(), op, ": expected P and Q together (or neither)");
  if (!P.has_value()) return;
  check_vector(*P, C, acc, x, op, "P");
  check_vector(*Q, C, acc, x, op, "Q");
  TORCH_CHECK(count > 0, op, ": expected count > 0 (values per channel) with P and Q, got ", count);
}

// The optional on-the-fly finish of the bottleneck's gradient (dout = g2, fp32/fp64):
// dB = db_scale*g2 - db_p - (db_b - db_mean)*db_q rounded to x's dtype, as bn_grad_finish writes it.
struct DbFinish {
  at::Tensor b, mean, p, q, scale;  // vectors contiguous
};

std::optional<DbFinish> check_db_finish(const char* op, const at::Tensor& dout, const at::Tensor& x, int64_t Cout,
                                        at::ScalarType acc, const std::optional<at::Tensor>& b,
                                        const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& p,
                                        const std::optional<at::Tensor>& q, const std::optional<at::Tensor>& scale) {
  const int given = b.has_value() + mean.has_value() + p.has_value() + q.has_value() + scale.has_value();
  TORCH_CHECK(given == 0 || given == 5, op,
              ": expected db_b, db_mean, db_p, db_q and db_scale together (or none), got ", given, " of them");
  const at::ScalarType dout_dtype = given ? acc : x.scalar_type();
  TORCH_CHECK(dout.scalar_type() == dout_dtype, op, ": expected dout of dtype ", dout_dtype,
              given ? " (the fp32 gradient g2 when db_b is given)" : " (the dtype of x)", ", got ",
              dout.scalar_type());
  if (!given) return std::nullopt;
  check_matrix(*b, op, "db_b");
  TORCH_CHECK(b->size(0) == dout.size(0) && b->size(1) == Cout, op, ": expected db_b of shape (", dout.size(0), ", ",
              Cout, "), got ", b->sizes());
  TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": expected db_b of dtype ", x.scalar_type(),
              " (the dtype of x), got ", b->scalar_type());
  check_same_device(*b, x, op, "db_b");
  check_vector(*mean, Cout, acc, x, op, "db_mean");
  check_vector(*p, Cout, acc, x, op, "db_p");
  check_vector(*q, Cout, acc, x, op, "db_q");
  check_vector(*scale, Cout, acc, x, op, "db_scale");
  return DbFinish{*b, mean->contiguous(), p->contiguous(), q->contiguous(), scale->contiguous()};
}

// The dB rows [r0, r0 + rows) in acc_t: finished from g2 (fin) or dout converted.
template <typename scalar_t, typename acc_t>
at::Tensor db_rows(const at::Tensor& dout, const std::optional<DbFinish>& fin, int64_t r0, int64_t rows) {
  if (!fin.has_value()) return dout.narrow(0, r0, rows).to(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t Cout = dout.size(1);
  at::Tensor out = at::empty({rows, Cout}, dout.options());
  const acc_t* gp = dout.const_data_ptr<acc_t>();
  const scalar_t* bp = fin->b.const_data_ptr<scalar_t>();
  const acc_t *mp = fin->mean.const_data_ptr<acc_t>(), *pp = fin->p.const_data_ptr<acc_t>();
  const acc_t *qp = fin->q.const_data_ptr<acc_t>(), *sp = fin->scale.const_data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t ldd = dout.stride(0), ldb = fin->b.stride(0);
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* grow = gp + (r0 + r) * ldd;
    const scalar_t* brow = bp + (r0 + r) * ldb;
    acc_t* orow = o + r * Cout;
    // bn_grad_finish's expression (no mean term for Q = 0: running statistics), rounded to the feature dtype
    for (int64_t c = 0; c < Cout; ++c)
      orow[c] = static_cast<acc_t>(
          static_cast<scalar_t>(grow[c] * sp[c] - pp[c] -
                                (qp[c] == acc_t(0) ? acc_t(0) : (static_cast<acc_t>(brow[c]) - mp[c]) * qp[c])));
  }
  return out;
}

constexpr int64_t kTile = 128;       // rows per BN-ReLU tile
constexpr int64_t kMaxChunks = 16;   // dweight partials in the backward

void check_args(const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                const at::Tensor& weight) {
  check_matrix(x, op, "x");
  const int64_t C = x.size(1);
  const auto acc = acc_type(x.scalar_type());
  check_vector(scale, C, acc, x, op, "scale");
  check_vector(shift, C, acc, x, op, "shift");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == C, op, ": expected weight of shape (out_channels, ", C,
              ") for x with ", C, " channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": expected weight of dtype ", x.scalar_type(),
              " (the dtype of x), got ", weight.scalar_type());
  check_same_device(weight, x, op, "weight");
}

// a[r, c] = relu(x[r, c] * scale[c] + shift[c]) rounded to scalar_t, stored as tile_t.
template <typename scalar_t, typename acc_t, typename tile_t>
inline void bnrelu_rows(const scalar_t* x, int64_t ld, int64_t rows, int64_t C, const acc_t* scale,
                        const acc_t* shift, tile_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* xr = x + r * ld;
    tile_t* ar = a + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t y = static_cast<acc_t>(xr[c]) * scale[c] + shift[c];
      ar[c] = static_cast<tile_t>(static_cast<scalar_t>(y <= acc_t(0) ? acc_t(0) : y));  // NaN stays NaN
    }
  }
}

// One row of the backward's elementwise part: g = dA * !(y <= 0), G += scale*g, the two
// per-channel sums, and a = relu(y) rounded to the feature dtype (the dW operand).
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void bwd_row(const scalar_t* __restrict__ x, const acc_t* __restrict__ da, const acc_t* __restrict__ scale,
                    const acc_t* __restrict__ shift, const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                    int64_t C, acc_t* __restrict__ G, acc_t* __restrict__ a, acc_t* __restrict__ sum_g,
                    acc_t* __restrict__ sum_gx) {
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    // unconditional loads and selects only, so the loop vectorizes
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t y = xv * scale[c] + shift[c];
    const acc_t d = da[c];
    const acc_t yr = static_cast<acc_t>(static_cast<scalar_t>(y));
    const bool on = !(y <= acc_t(0));  // torch's relu backward: the gradient passes a NaN
    const acc_t g = on ? d : acc_t(0);
    a[c] = on ? yr : acc_t(0);
    G[c] += scale[c] * g;
    sum_g[c] += g;
    sum_gx[c] += g * ((xv - mean[c]) * rstd[c]);
  }
}

// bn_out = (scale, shift, rstd) of the BatchNorm reading the output, from its statistics.
void fold_affine(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                 double eps, at::Tensor& bn_out) {
  const int64_t C = mean.size(0);
  const at::Tensor g = gamma.to(mean.scalar_type()).contiguous(), b = beta.to(mean.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnrelu_conv1x1_fold_affine", [&] {
    const scalar_t *mp = mean.const_data_ptr<scalar_t>(), *vp = var.const_data_ptr<scalar_t>();
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *bp = b.const_data_ptr<scalar_t>();
    scalar_t* o = bn_out.data_ptr<scalar_t>();
    const int64_t ld = bn_out.stride(0);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t r = scalar_t(1) / std::sqrt(vp[c] + static_cast<scalar_t>(eps));
      o[c] = gp[c] * r;
      o[ld + c] = bp[c] - mp[c] * o[c];
      o[2 * ld + c] = r;
    }
  });
}

void check_bn_out(const char* op, const at::Tensor& x, int64_t Cout, bool stats, const std::optional<at::Tensor>& bn_out,
                  const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& beta, double eps) {
  if (!bn_out.has_value() && !gamma.has_value() && !beta.has_value()) return;
  TORCH_CHECK(bn_out.has_value() && gamma.has_value() && beta.has_value(), op,
              ": expected bn_out, bn_gamma and bn_beta together (or none)");
  TORCH_CHECK(stats, op, ": expected stats=True with bn_out");
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(bn_out->dim() == 2 && bn_out->size(0) == 3 && bn_out->size(1) == Cout && bn_out->stride(1) == 1 &&
                  bn_out->scalar_type() == acc,
              op, ": expected bn_out of shape (3, ", Cout, ") with unit column stride and dtype ", acc, ", got ",
              bn_out->sizes(), " ", bn_out->scalar_type(), " strides ", bn_out->strides());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(*gamma, "bn_gamma"), {*beta, "bn_beta"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == Cout && t.is_floating_point(), op, ": expected ", name,
                " to be a 1-D floating tensor of ", Cout, " channels, got ", t.sizes(), " ", t.scalar_type());
  }
  TORCH_CHECK(eps >= 0, op, ": expected bn_eps >= 0, got ", eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& scale,
                                                   const at::Tensor& shift, const at::Tensor& weight,
                                                   bool stats, const std::optional<at::Tensor>& bn_out,
                                                   const std::optional<at::Tensor>& bn_gamma,
                                                   const std::optional<at::Tensor>& bn_beta, double bn_eps) {
  check_args("bnrelu_conv1x1_fwd", x, scale, shift, weight);
  const int64_t M = x.size(0), C = x.size(1), Cout = weight.size(0);
  check_bn_out("bnrelu_conv1x1_fwd", x, Cout, stats, bn_out, bn_gamma, bn_beta, bn_eps);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor out = at::empty({M, Cout}, x.options());
  const at::Tensor wt = weight.t();
  if (C == 0) out.zero_();
  if (M > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_conv1x1_fwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const acc_t* sp = scale.const_data_ptr<acc_t>();
      const acc_t* hp = shift.const_data_ptr<acc_t>();
      at::parallel_for(0, ceil_div(M, kTile), 1, [&](int64_t begin, int64_t end) {
        at::Tensor a = at::empty({kTile, C}, x.options());
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = t * kTile, rows = std::min(kTile, M - r0);
          bnrelu_rows<scalar_t, acc_t, scalar_t>(xp + r0 * x.stride(0), x.stride(0), rows, C, sp, hp,
                                                 a.data_ptr<scalar_t>());
          at::Tensor o = out.narrow(0, r0, rows);
          at::mm_out(o, a.narrow(0, 0, rows), wt);
        }
      });
    });
  }
  if (!stats || M == 0) {
    return {out, at::empty({0}, x.options().dtype(acc)), at::empty({0}, x.options().dtype(acc))};
  }
  auto [mean, var] = column_mean_var(out);
  if (bn_out.has_value()) {
    at::Tensor o = *bn_out;
    fold_affine(mean, var, *bn_gamma, *bn_beta, bn_eps, o);
  }
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout, const at::Tensor& x,
                                                   const at::Tensor& scale, const at::Tensor& shift,
                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                   const at::Tensor& rstd, const at::Tensor& G,
                                                   const std::optional<at::Tensor>& P,
                                                   const std::optional<at::Tensor>& Q, int64_t count,
                                                   const std::optional<at::Tensor>& db_b,
                                                   const std::optional<at::Tensor>& db_mean,
                                                   const std::optional<at::Tensor>& db_p,
                                                   const std::optional<at::Tensor>& db_q,
                                                   const std::optional<at::Tensor>& db_scale) {
  const char* op = "bnrelu_conv1x1_bwd";
  check_args(op, x, scale, shift, weight);
  const int64_t M = x.size(0), C = x.size(1), Cout = weight.size(0);
  const auto acc = acc_type(x.scalar_type());
  check_matrix(dout, op, "dout");
  TORCH_CHECK(dout.size(0) == M && dout.size(1) == Cout, op, ": expected dout of shape (", M, ", ", Cout,
              "), got ", dout.sizes());
  const std::optional<DbFinish> fin = check_db_finish(op, dout, x, Cout, acc, db_b, db_mean, db_p, db_q, db_scale);
  check_same_device(dout, x, op, "dout");
  check_vector(mean, C, acc, x, op, "mean");
  check_vector(rstd, C, acc, x, op, "rstd");
  check_matrix(G, op, "G");
  TORCH_CHECK(G.size(0) == M && G.size(1) == C, op, ": expected G of shape (", M, ", ", C, "), got ", G.sizes());
  TORCH_CHECK(G.scalar_type() == acc, op, ": expected G of dtype ", acc, ", got ", G.scalar_type());
  check_same_device(G, x, op, "G");
  check_pq_args(op, P, Q, count, C, acc, x);

  const int64_t ntiles = ceil_div(M, kTile);
  const int64_t nchunks = std::max<int64_t>(1, std::min(kMaxChunks, ntiles));
  const int64_t tiles_per_chunk = std::max<int64_t>(1, ceil_div(ntiles, nchunks));
  at::Tensor dw_part = at::zeros({nchunks, Cout, C}, x.options().dtype(acc));
  std::vector<double> sg(nchunks * C, 0.0), sgx(nchunks * C, 0.0);
  const at::Tensor w_acc = weight.to(acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnrelu_conv1x1_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    const acc_t* hp = shift.const_data_ptr<acc_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    acc_t* gp = G.data_ptr<acc_t>();
    const int64_t ldx = x.stride(0), ldg = G.stride(0);
    at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor a = at::empty({kTile, C}, x.options().dtype(acc));
      std::vector<acc_t> tsg(C), tsgx(C);  // per-tile sums in acc_t, chunk sums in double
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        at::Tensor dw = dw_part[chunk];
        double* s1 = sg.data() + chunk * C;
        double* s2 = sgx.data() + chunk * C;
        const int64_t t_end = std::min(ntiles, (chunk + 1) * tiles_per_chunk);
        for (int64_t t = chunk * tiles_per_chunk; t < t_end; ++t) {
          const int64_t r0 = t * kTile, rows = std::min(kTile, M - r0);
          const at::Tensor db = db_rows<scalar_t, acc_t>(dout, fin, r0, rows);
          const at::Tensor da = at::mm(db, w_acc).contiguous();  // (rows, C): dA = dout @ W
          std::fill(tsg.begin(), tsg.end(), acc_t(0));
          std::fill(tsgx.begin(), tsgx.end(), acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            bwd_row<scalar_t, acc_t>(xp + (r0 + r) * ldx, da.const_data_ptr<acc_t>() + r * C, sp, hp, mp, rp, C,
                                     gp + (r0 + r) * ldg, a.data_ptr<acc_t>() + r * C, tsg.data(), tsgx.data());
          }
          for (int64_t c = 0; c < C; ++c) {
            s1[c] += static_cast<double>(tsg[c]);
            s2[c] += static_cast<double>(tsgx[c]);
          }
          dw.addmm_(db.t(), a.narrow(0, 0, rows));  // dW += dout^T @ relu(bn(x))
        }
      }
    });
  });
  at::Tensor dweight = dw_part.sum(0);  // fixed order over chunks
  at::Tensor dgamma = at::zeros({C}, x.options().dtype(at::kDouble));
  at::Tensor dbeta = at::zeros({C}, x.options().dtype(at::kDouble));
  double* dg = dgamma.data_ptr<double>();
  double* db = dbeta.data_ptr<double>();
  for (int64_t chunk = 0; chunk < nchunks; ++chunk)
    for (int64_t c = 0; c < C; ++c) {
      db[c] += sg[chunk * C + c];
      dg[c] += sgx[chunk * C + c];
    }
  dgamma = dgamma.to(acc);
  dbeta = dbeta.to(acc);
  if (P.has_value()) {  // P += scale*dbeta/count, Q += scale*rstd*dgamma/count
    P->add_(scale * dbeta / static_cast<double>(count));
    Q->add_(scale * rstd * dgamma / static_cast<double>(count));
  }
  return {dweight, dgamma, dbeta};
}

// The schema's form: x's BatchNorm bn = [scale, shift, mean, rstd], pq = None, [] or [P, Q], finish = None,
// [] or [b, mean, p, q, scale] (csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_op(const at::Tensor& dout, const at::Tensor& x,
                                                      const at::Tensor& weight, at::TensorList bn,
                                                      const at::Tensor& G, std::optional<at::TensorList> pq_,
                                                      int64_t count, std::optional<at::TensorList> finish_) {
  const char* op = "bnrelu_conv1x1_bwd";
  const at::TensorList pq = pq_.value_or(at::TensorList()), finish = finish_.value_or(at::TensorList());
  TORCH_CHECK(bn.size() == 4, op, ": expected bn = [scale, shift, mean, rstd], got ", bn.size(), " tensors");
  TORCH_CHECK(pq.empty() || pq.size() == 2, op, ": expected pq = [] or [P, Q], got ", pq.size(), " tensors");
  TORCH_CHECK(finish.empty() || finish.size() == 5, op, ": expected finish = [] or [b, mean, p, q, scale], got ",
              finish.size(), " tensors");
  auto opt = [](at::TensorList l, size_t i) {
    return l.empty() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(l[i]);
  };
  return bwd(dout, x, bn[0], bn[1], weight, bn[2], bn[3], G, opt(pq, 0), opt(pq, 1), count, opt(finish, 0),
             opt(finish, 1), opt(finish, 2), opt(finish, 3), opt(finish, 4));
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fused, CPU, m) {
  m.impl("bnrelu_conv1x1_fwd", &fwd);
  m.impl("bnrelu_conv1x1_bwd", &bwd_op);
}

}  // namespace cpu
}  // namespace densenet_fused
