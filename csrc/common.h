// Shared argument checks for the densenet_fused ops.  Every op validates its inputs
// here before touching memory, and every message names what was expected.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

namespace densenet_fused {

// Feature matrices are channel slices of an NHWC buffer: (rows = N*H*W, channels) with
// unit channel stride and any row stride >= channels.
inline void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": expected ", name,
              " to be a 2-D (rows = N*H*W, channels) matrix, got a ", t.dim(), "-D tensor of shape ",
              t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": expected ", name,
              " to be float64, float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": expected ", name,
              " to have unit channel stride (a channel slice of an NHWC buffer), got strides ",
              t.strides());
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), op, ": expected ", name,
              " rows not to overlap (row stride >= channels), got strides ", t.strides(), " for shape ",
              t.sizes());
}

// Accumulation dtype of a feature dtype: float64 stays float64, everything else float32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& ref,
                         const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": expected ", name, " to be a 1-D tensor of ", n,
              " channels, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on ", ref.device(), ", got ",
              t.device());
}

// Rows handled by one deterministic reduction chunk on the CPU.  The chunking depends on
// the shape only (never on the thread count), so results are bitwise reproducible.
constexpr int64_t kCpuRowsPerChunk = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_channel_stats_args(const at::Tensor& x, double eps) {
  check_matrix(x, "channel_stats", "x");
  TORCH_CHECK(x.size(0) > 0, "channel_stats: expected at least one row in x, got shape ", x.sizes());
  TORCH_CHECK(eps >= 0, "channel_stats: expected eps >= 0, got ", eps);
}

}  // namespace densenet_fused
