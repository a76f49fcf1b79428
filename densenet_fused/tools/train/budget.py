"""``--memory-budget``: the largest batch, or (``--depth auto``) the deepest DenseNet-BC, whose
bf16 training step fits a CUDA memory budget, measured with the benchmark's step and cap."""
import torch

from .config import AUTO_DEPTHS


def _fits(row: dict, budget_gb: float) -> bool:
    """A step that ran under the cap, with room left for SGD's momentum buffer: the measured peak
    is above the parameters and gradients already allocated, so parameters + gradients +
    momentum (3 x 4 bytes a parameter) + the step's peak must stay within the budget."""
    return (row["status"] == "ok" and row["peak_mb"] is not None
            and row["peak_mb"] + 3 * 4 * row["params"] / 2 ** 20 <= budget_gb * 1024)


def search_batch(make_model, image_size: int, device: torch.device, budget_gb: float, max_batch: int) -> int:
    """Largest power-of-two batch (2 .. max_batch) whose bf16 training step fits the budget (CUDA)."""
    from ..bench import Case, MemoryCap, one_step

    def builder(case, provider, dev):
        return make_model().to(dev).to(memory_format=torch.channels_last).train()

    best, batch = 0, 2
    with MemoryCap(str(device), budget_gb):
        while batch <= max_batch:
            case = Case(f"train_b{batch}", "model", batch, image_size, c0=3)
            if not _fits(one_step(case, "fused", str(device), "bf16", builder), budget_gb):
                break
            best, batch = batch, batch * 2
    torch.cuda.empty_cache()
    return best


def search_depth(device: torch.device, budget_gb: float, growth: int, batch: int, baseline: bool) -> int:
    """Deepest DenseNet-BC in AUTO_DEPTHS whose bf16 training step at ``batch`` fits the budget (CUDA)."""
    from ..bench import depth_at_budget

    provider = "torchvision" if baseline else "fused"
    rows = depth_at_budget(str(device), budget_gb, growth, [provider], AUTO_DEPTHS, batch=batch, dtype="bf16")
    best = 0
    for row in rows:
        if not _fits(row, budget_gb):
            break
        best = row["depth"]
    torch.cuda.empty_cache()
    return best
