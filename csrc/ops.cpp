// Op schemas of the densenet_fused library.  CPU kernels live in cpu/, CUDA kernels in
// cuda/ (CUDA builds only); Triton kernels (bnrelu_conv1x1, bnrelu_conv3x3, bn_scale_shift on
// CUDA) and the ATen bnrelu_conv3x3 are registered from densenet_fused/ops/*.py.
// Fake (meta) implementations are registered in densenet_fused/ops/*.py.
#include <Python.h>
#include <torch/library.h>

#ifndef TORCH_VERSION_BUILT
#define TORCH_VERSION_BUILT "unknown"
#endif

TORCH_LIBRARY(densenet_fused, m) {
  // Per-channel batch statistics of a channel slice x (M, C) of an NHWC buffer:
  // mean, biased variance and rstd = 1/sqrt(var + eps).  float32 results (float64 for
  // float64 input), computed with a shifted two-pass / Chan merge (no cancellation).
  m.def("channel_stats(Tensor x, float eps) -> (Tensor mean, Tensor var, Tensor rstd)");
  // Finish the BatchNorm input gradient of a channel slice: dx = G - P - (x - mean) * Q.
  // Q already carries the rstd factor (Q = sum_l gamma_l*rstd_l^2*sum(g_l*xhat_l)/M), which
  // keeps the identity exact when BN layers reading the channel have different eps.
  // Output (M, C) contiguous in `dtype`, or (M/nchw_hw, C, nchw_hw) (NCHW) when nchw_hw > 0.
  // With G_scale, G is multiplied per channel first: dx = G*G_scale - P - (x - mean)*Q (the
  // input gradient of one BatchNorm in one pass: G = g after the ReLU mask, G_scale = gamma*rstd).
  m.def("bn_grad_finish(Tensor G, Tensor x, Tensor mean, Tensor P, Tensor Q, ScalarType dtype, "
        "int nchw_hw=0, Tensor? G_scale=None) -> Tensor");
  // A BatchNorm's folded affine map from statistics: rstd = 1/sqrt(var + eps),
  // scale = gamma*rstd, shift = beta - mean*scale, in the dtype of mean.
  m.def("bn_scale_shift(Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps) "
        "-> (Tensor scale, Tensor shift, Tensor rstd)");
  // Running mean/var/num_batches_tracked update of many BatchNorm layers in one call,
  // as nn.BatchNorm2d does in training (momentum < 0 means momentum=None: cumulative average;
  // running_var gets the unbiased variance var * count / (count - 1)).
  m.def("running_stats_update(Tensor(a!)[] running_mean, Tensor(b!)[] running_var, "
        "Tensor(c!)[] num_batches_tracked, Tensor[] mean, Tensor[] var, float[] momentum, "
        "int count) -> ()");
  // out = relu(x * scale + shift) @ weight^T with x (M, C) strided, weight (Cout, C).
  // With stats=True also the per-channel mean and biased variance of out as stored.
  // With bn_out (3, Cout) (stats=True), also the folded affine map of the BatchNorm that reads out
  // (weight bn_gamma, bias bn_beta, eps bn_eps) from those statistics, as bn_scale_shift computes it:
  // bn_out[0] = scale, bn_out[1] = shift, bn_out[2] = rstd (one launch less per layer on CUDA).
  m.def("bnrelu_conv1x1_fwd(Tensor x, Tensor scale, Tensor shift, Tensor weight, bool stats, "
        "Tensor(a!)? bn_out=None, Tensor? bn_gamma=None, Tensor? bn_beta=None, float bn_eps=0.0) "
        "-> (Tensor out, Tensor mean, Tensor var)");
  // One-pass backward of bnrelu_conv1x1 with g = (dout @ weight) * (x*scale+shift > 0), x's BatchNorm
  // given as bn = [scale, shift, mean, rstd]: G += scale * g (in place), returns dweight = dout^T @
  // relu(x*scale+shift) (fp32/fp64), dgamma = sum(g * (x - mean) * rstd), dbeta = sum(g) per channel.
  // With pq = [P, Q] (the block's per-channel BN-gradient scalars, docs/design.md section 2 fact 3) it also
  // accumulates P += scale*dbeta/count and Q += scale*rstd*dgamma/count in place.
  // With finish = [b, mean, p, q, scale], dout is the fp32 (fp64) gradient g2 after BN2's ReLU and the op
  // finishes BN2's input gradient tile by tile as bn_grad_finish does (one launch and a write and read of dB
  // less): dB = scale*dout - p - (b - mean)*q, rounded to x's dtype, is the dout of the formulas above
  // (b: the bottleneck, x's dtype; the vectors: Cout channels, fp32/fp64).  Python: ops.options.
  m.def("bnrelu_conv1x1_bwd(Tensor dout, Tensor x, Tensor weight, Tensor[] bn, Tensor(a!) G, "
        "Tensor(b!)[]? pq=None, int count=0, Tensor[]? finish=None) -> (Tensor dweight, Tensor dgamma, Tensor dbeta)");
  // out[0] (a channel slice of the buffer) = conv3x3(relu(b*scale + shift), weight) with bn = [scale, shift],
  // pad 1 applied to the activated values.  out = [out, mean, var] (contiguous vectors of C + k channels: the
  // block's statistics of the buffer up to and including out) also writes the batch mean and biased variance
  // of out as stored into their last k entries; out = [out, mean, var, folded] with fold = [gamma, beta] and
  // fold_eps also the folded map (scale, shift, rstd) into folded (3, C + k) of the BatchNorm reading all
  // C + k channels (the next layer's norm1), as bn_scale_shift computes it.  impl: "aten" / "triton" on
  // CUDA, "" for the default.  drop_p > 0: dropout of out (before its statistics) with the Philox mask of
  // drop_seed (int64, 1 element).  Kernels: densenet_fused/ops/bnrelu_conv3x3.py (ATen on CPU and CUDA,
  // Triton).  Python: ops.options (StatsOut, FoldBN, Dropout).
  m.def("bnrelu_conv3x3_fwd(Tensor b, Tensor[] bn, Tensor weight, int[] nhw, Tensor(a!)[] out, str impl=\"\", "
        "Tensor[]? fold=None, float fold_eps=0.0, float drop_p=0.0, Tensor? drop_seed=None) -> ()");
  // Backward through conv3x3 and BN2's ReLU, bn = [scale, shift, mean, rstd]: g2 = dA2 * (b*scale+shift > 0),
  // dweight, and dgamma = sum(g2 * (b - mean) * rstd), dbeta = sum(g2) per channel; with count > 0 also BN2's
  // input-gradient scalars p = scale*dbeta/count, q = scale*rstd*dgamma/count (zeros when count = 0).
  // With finish = [x, mean, p, q], dy is the block's fp32 gradient sum G of the new channels, finished on
  // the fly as in bn_grad_finish: dy = G - p - (x - mean) * q (in b's dtype).  drop_p > 0: dy is the
  // gradient of the forward's dropout output, masked by the same Philox mask (drop_seed).
  m.def("bnrelu_conv3x3_bwd(Tensor dy, Tensor b, Tensor[] bn, Tensor weight, int[] nhw, str impl=\"\", "
        "int count=0, Tensor[]? finish=None, float drop_p=0.0, Tensor? drop_seed=None) "
        "-> (Tensor g2, Tensor dweight, Tensor dgamma, Tensor dbeta, Tensor p, Tensor q)");
  // stem
  // The stem's BatchNorm-ReLU and 3x3/2 max pool (padding 1) on conv0's output y, an (N*H*W, C)
  // NHWC matrix (nhw = [N, H, W]): out[o, c] = the maximum over window o of relu(y*scale + shift)
  // rounded to y's dtype, index[o, c] = kh*3 + kw of that maximum (int8; torch's max_pool2d tie
  // rule: the first maximum in scan order, a NaN always taken, padding never chosen).  out and index
  // are contiguous (N*Hp*Wp, C) with Hp = (H - 1)/2 + 1, Wp = (W - 1)/2 + 1.
  // Kernels: csrc/cpu/bnrelu_maxpool.cpp (CPU), densenet_fused/ops/bnrelu_maxpool.py (Triton, CUDA).
  m.def("bnrelu_maxpool_fwd(Tensor y, Tensor scale, Tensor shift, int[] nhw) -> (Tensor out, Tensor index)");
  // Its backward: g = dout routed to each window's maximum (index), times the ReLU mask
  // relu(y*scale + shift) > 0; dgamma = sum(g*(y - mean)*rstd), dbeta = sum(g) per channel, and the
  // BatchNorm input gradient dy = scale*(g - dbeta/count - (y - mean)*rstd*dgamma/count) with batch
  // statistics (count = values per channel), dy = scale*g with running statistics (count = 0).
  // dy (N*H*W, C) contiguous in y's dtype; dgamma, dbeta float32 (float64 for float64 y).
  m.def("bnrelu_maxpool_bwd(Tensor dout, Tensor index, Tensor y, Tensor scale, Tensor shift, Tensor mean, "
        "Tensor rstd, int[] nhw, int count) -> (Tensor dy, Tensor dgamma, Tensor dbeta)");
  // transition and head
  // The fused transition (BN-ReLU-conv1x1-avgpool2x2) with the pool applied first, in the GEMM's
  // prologue: out = avgpool2x2(relu(x*scale + shift)) @ weight^T, x (N*H*W, C) NHWC rows (strided),
  // nhw = [N, H, W]; out (N*(H/2)*(W/2), Cout) in x's dtype, odd H/W floored as nn.AvgPool2d(2, 2), written
  // in place: a contiguous matrix or rows of a wider one with unit channel stride (the first C_0 channels of
  // the next dense block's NHWC buffer, so the block copies nothing).
  m.def("bnrelu_avgpool_conv1x1_fwd(Tensor x, Tensor scale, Tensor shift, Tensor weight, int[] nhw, "
        "Tensor(a!) out) -> ()");
  // Its backward: g = (dout @ weight)/4 on the 4 pixels of each window * (x*scale+shift > 0);
  // dweight = dout^T @ the pooled activation (fp32/fp64), dgamma = sum(g*(x - mean)*rstd), dbeta = sum(g);
  // dx (N*H*W, C) contiguous in x's dtype: scale*g, and with batch_stats the whole BatchNorm input
  // gradient scale*(g - mean(g) - xhat*mean(g*xhat)) over every pixel (the floored ones included).
  m.def("bnrelu_avgpool_conv1x1_bwd(Tensor dout, Tensor x, Tensor scale, Tensor shift, Tensor weight, int[] nhw, "
        "Tensor mean, Tensor rstd, bool batch_stats) -> (Tensor dx, Tensor dweight, Tensor dgamma, Tensor dbeta)");
  // The fused head (norm5, ReLU, global average pool): pooled (N, C) in x's dtype, the mean over each
  // image's H*W rows of relu(x*scale + shift).
  m.def("bnrelu_global_avgpool_fwd(Tensor x, Tensor scale, Tensor shift, int[] nhw) -> Tensor");
  // Its backward: g = dpooled/(H*W) * (x*scale+shift > 0); dx as bnrelu_avgpool_conv1x1_bwd's.
  m.def("bnrelu_global_avgpool_bwd(Tensor dpooled, Tensor x, Tensor scale, Tensor shift, int[] nhw, Tensor mean, "
        "Tensor rstd, bool batch_stats) -> (Tensor dx, Tensor dgamma, Tensor dbeta)");
}

extern "C" {
// Importing densenet_fused._C loads this library and with it the registrations above.
static PyModuleDef densenet_fused_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&densenet_fused_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "TORCH_VERSION_BUILT", TORCH_VERSION_BUILT);
#ifdef DENSENET_FUSED_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
}
