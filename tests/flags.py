"""Global state that tests change, always restored (a failing test never leaves the next one
on another code path)."""
import contextlib

import torch


@contextlib.contextmanager
def tf32_disabled():
    """TF32 off for cuBLAS and cuDNN inside the block, the previous values restored after it
    (set and restored by hand: pytest's monkeypatch undoes a torch backend flag by deleting
    the attribute, which torch's backend modules refuse)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def patched(obj, **attrs):
    """Replace attributes of obj inside the block; always restored, even when the body fails."""
    saved = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)
