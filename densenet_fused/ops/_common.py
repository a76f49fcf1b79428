"""Helpers shared by the op files: dtype rules of the densenet_fused ops."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for a feature dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
