"""Helpers for the block tests: torchvision/fused pairs with identical, non-trivial weights."""
import torch
from torch import nn
from torchvision.models.densenet import _DenseBlock

from densenet_fused import FusedDenseBlock
from densenet_fused.tools.bench import SavedBytes  # noqa: F401  (re-exported for the tests)

ODD = dict(num_layers=5, num_input_features=13, growth_rate=7, bn_size=3)  # docs/design.md section 6 sizes


def randomize_bn(module, generator=None):
    """Non-trivial affine parameters and running statistics (so eval mode tests something)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.5, 0.5, generator=generator)
                m.running_mean.uniform_(-0.3, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


def make_pair(dtype=torch.float64, drop_rate=0.0, num_layers=5, num_input_features=13, growth_rate=7, bn_size=3,
              device="cpu"):
    ref = _DenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
    randomize_bn(ref)
    ref = ref.to(device, dtype)
    fused = FusedDenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def dropout_blocks(p, num_input_features, growth_rate):
    """One layer (bn_size 2, float64) three times with the same weights: torchvision's, the fused one
    without dropout and the fused one with drop_rate ``p``."""
    ref, plain = make_pair(torch.float64, num_layers=1, num_input_features=num_input_features,
                           growth_rate=growth_rate, bn_size=2)
    dropped = FusedDenseBlock(1, num_input_features, 2, growth_rate, drop_rate=p).double()
    dropped.load_state_dict(plain.state_dict())
    return ref, plain, dropped


def new_features_in_training(plain, dropped, x):
    """The new features (the channels after x's) of ``plain`` and ``dropped`` in training mode."""
    c = x.shape[1]
    with torch.no_grad():
        return plain.train()(x)[:, c:], dropped.train()(x)[:, c:]


def run_step(block, x, grad):
    xi = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(xi)
    y.backward(grad)
    return y.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}


def assert_close(a, b, tol, what=""):
    """Relative to the reference's largest magnitude (a gradient's scale), elementwise."""
    scale = max(b.abs().max().item(), 1e-30)
    err = (a.double() - b.double()).abs().max().item() / scale
    assert err <= tol, f"{what}: max error {err:.3e} (relative to max |ref| {scale:.3e}) > {tol:.1e}"


def replay_step_from_cuda_graph(module, static_x, grad, new_x, state=None):
    """Warm up (3 eager steps on a side stream: Triton autotuning, cuDNN heuristics), capture one
    forward+backward of ``module`` on ``static_x`` in a CUDA graph, copy ``new_x`` into static_x and
    replay.  ``state``: a state_dict loaded (in place) after the warm-up and after the capture, which
    moved or only recorded running-statistics updates.  Returns the graph's output; static_x.grad and
    the parameters' .grad hold its gradients."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            module(static_x).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    if state is not None:
        module.load_state_dict(state)
    module.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = module(static_x)
        static_y.backward(grad)
    if state is not None:
        module.load_state_dict(state)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    return static_y


def assert_script_matches_eager(module, x, tol):
    """``torch.jit.script(module)``, twice in this process: the scripted module shares the eager one's
    parameters and buffers, its eval output equals eager's, and so do one training forward's output and
    running statistics (from the same state); the eager module keeps its own (fused) modules."""
    kinds = [type(m) for m in module.modules()]
    ptrs = {p.data_ptr() for p in module.parameters()} | {b.data_ptr() for b in module.buffers()}
    for attempt in range(2):
        scripted = torch.jit.script(module)
        assert isinstance(scripted, torch.jit.ScriptModule)
        assert [type(m) for m in module.modules()] == kinds, "scripting changed the eager module"
        assert {p.data_ptr() for p in scripted.parameters()} | {b.data_ptr() for b in scripted.buffers()} == ptrs
        module.eval(), scripted.eval()
        with torch.no_grad():
            assert_close(scripted(x), module(x), tol, f"attempt {attempt}: eval output")
        module.train(), scripted.train()
        state = {k: v.clone() for k, v in module.state_dict().items()}
        y_e = module(x).detach()
        after_e = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(state)
        y_s = scripted(x).detach()
        assert_close(y_s, y_e, tol, f"attempt {attempt}: training output")
        for k, v in module.state_dict().items():
            assert_close(v.double(), after_e[k].double(), tol, f"attempt {attempt}: {k} after a training forward")
        module.load_state_dict(state)


def assert_empty_batch_as_torchvision(ref, fused, shape, call=None):
    """On an empty batch of ``shape`` (N = 0), in eval and in train mode, ``fused`` does what ``ref``
    (the torchvision module with the same state) does: an empty output of the same shape and dtype,
    an empty input gradient, the same parameter gradients (zeros) and the same buffers afterwards
    (in training, num_batches_tracked counts the batch).  ``call(module, x)`` runs a module."""
    call = call or (lambda m, x: m(x))
    for mode in (False, True):
        ref.train(mode), fused.train(mode)
        results = []
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)
            x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
            y = call(m, x)
            y.sum().backward()
            results.append((y, x.grad, {n: p.grad for n, p in m.named_parameters()}, dict(m.named_buffers())))
        (y_r, dx_r, g_r, b_r), (y_f, dx_f, g_f, b_f) = results
        assert y_f.shape == y_r.shape and y_f.dtype == y_r.dtype and y_r.numel() == 0, (y_f.shape, y_r.shape)
        assert dx_f.shape == dx_r.shape
        for name, g in g_r.items():
            assert (g is None) == (g_f[name] is None) and (g is None or torch.equal(g_f[name], g)), name
        for name, b in b_r.items():
            assert torch.equal(b_f[name], b), name


def nonfinite_mismatch(got, want):
    """A message naming how the NaN / +Inf / -Inf positions of ``got`` differ from ``want``'s, or
    ``None`` when they agree and the finite entries agree to 1e-3 (relative to the largest)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        g, w = test(got), test(want)
        if not torch.equal(g, w):
            return (f"{name} at {int(g.sum())} positions, torch has {int(w.sum())}; "
                    f"first differing index {tuple(torch.nonzero(g != w)[0].tolist())}")
    fin = torch.isfinite(want)
    if fin.any():
        err = (got[fin] - want[fin]).abs().max().item() / max(want[fin].abs().max().item(), 1e-30)
        if err > 1e-3:
            return f"finite entries differ by {err:.2e} (relative)"
    return None


def assert_same_nonfinite(got: dict, want: dict):
    bad = {k: nonfinite_mismatch(got[k], want[k]) for k in want}
    bad = {k: v for k, v in bad.items() if v is not None}
    assert not bad, f"non-finite pattern differs from torch's: {bad}"


def triton_block_ops():
    """The block's ops as the eager CUDA hot path runs them when every GEMM-shaped op is Triton
    (``ops.table.TRITON_DIRECT``: the unchecked launchers), for ``ops.table.substituted``: under
    TRITON_INTERPRET=1 the block runs its CUDA kernels on CPU tensors (on CUDA, float32 without TF32 would
    run cuBLAS/cuDNN instead)."""
    from densenet_fused.ops.table import TRITON_DIRECT
    return TRITON_DIRECT
