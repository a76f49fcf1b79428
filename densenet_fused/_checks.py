"""The input check shared by the fused modules (dense block, transition, head): every message
names what was expected.  Imports nothing of the package (any layer may use it)."""
from torch import Tensor


def check_input(x, channels: int, who: str, min_hw: int = 0, channels_name: str = "") -> None:
    """x: a floating-point 4-D (N, C, H, W) tensor with ``channels`` channels (``channels_name``:
    the argument that sets them, named in the message) and H, W >= ``min_hw``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: expected a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != channels:
        named = f" ({channels_name})" if channels_name else ""
        raise ValueError(f"{who}: expected input with {channels} channels{named}, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}")
    if x.shape[2] < min_hw or x.shape[3] < min_hw:
        raise ValueError(f"{who}: expected H and W >= {min_hw}, got input shape {tuple(x.shape)}")
