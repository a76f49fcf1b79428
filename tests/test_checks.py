"""The shared module rules (densenet_fused/_checks.py)."""
import pytest
from torch import nn

from densenet_fused._checks import HOOKS, has_hooks


def _register(module: nn.Module, attr: str):
    fn = lambda *a, **k: None  # noqa: E731
    return {"_forward_hooks": module.register_forward_hook, "_forward_pre_hooks": module.register_forward_pre_hook,
            "_backward_hooks": module.register_full_backward_hook,
            "_backward_pre_hooks": module.register_full_backward_pre_hook}[attr](fn)


@pytest.mark.parametrize("attr", HOOKS)
def test_has_hooks_sees_every_kind_of_module_hook_and_its_removal(attr):
    m = nn.BatchNorm2d(3)
    assert not has_hooks(m)
    handle = _register(m, attr)
    assert getattr(m, attr) and has_hooks(m)
    handle.remove()
    assert not has_hooks(m)


def test_hooks_names_every_hook_dict_of_a_module():
    """HOOKS lists every per-module hook dict torch keeps (a new kind in torch would be missed)."""
    m = nn.Linear(2, 2)
    hook_dicts = {name for name, v in vars(m).items() if name.endswith("hooks") and isinstance(v, dict)
                  and "state_dict" not in name and "load" not in name}
    assert set(HOOKS) <= hook_dicts
    assert hook_dicts - set(HOOKS) <= {"_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                       "_forward_pre_hooks_with_kwargs"}


def test_routed_meta_tensors_take_the_cuda_autocast_dtype():
    """Under ``launch.routing("meta")`` meta tensors take the CUDA code path, CUDA's autocast state included
    (`cost --host` runs the block as under torch.autocast on a GPU); outside it, meta has no autocast."""
    import torch

    from densenet_fused._checks import compute_dtype
    from densenet_fused.ops.launch import routing
    x, w = torch.empty((2, 3, 4, 4), device="meta"), torch.empty(3, device="meta")
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        assert compute_dtype(x, w, "t") == torch.float32
        with routing("meta"):
            assert compute_dtype(x, w, "t") == torch.bfloat16
            assert compute_dtype(x.double(), w.double(), "t", never_cast=True) == torch.float64
        assert compute_dtype(x, w, "t") == torch.float32
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
