"""torch.compile of a function containing a FusedDenseBlock: same output, gradients and
running statistics as eager (the ops' fake implementations let it trace)."""
import torch

from blockutil import assert_close, make_pair


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    _, eager = make_pair(torch.float32, num_layers=3, num_input_features=8, growth_rate=4, bn_size=2)
    _, compiled_block = make_pair(torch.float32, num_layers=3, num_input_features=8, growth_rate=4, bn_size=2)
    compiled_block.load_state_dict(eager.state_dict())

    def head(block, x):
        return torch.relu(block(x)).mean(dim=(2, 3))

    compiled = torch.compile(head)
    x = torch.randn(2, 8, 6, 5)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = head(eager.train(), xe)
    yc = compiled(compiled_block.train(), xc)
    ye.sum().backward()
    yc.sum().backward()
    assert_close(yc, ye, 1e-5, "output")
    assert_close(xc.grad, xe.grad, 1e-5, "input grad")
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled_block.parameters()):
        assert_close(p_c.grad, p_e.grad, 1e-5, name)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_block.buffers()):
        assert_close(b_c.double(), b_e.double(), 1e-5, name)  # running statistics updated once, as eager
    assert int(compiled_block.denselayer1.norm1.num_batches_tracked) == 1


def test_torch_compile_whole_converted_model_eval_and_one_training_step():
    """torch.compile of a whole converted torchvision DenseNet (tiny: CI has 2 cores): eval output,
    then one training step (output, input and parameter gradients, running statistics) as eager."""
    import copy

    import torchvision

    from blockutil import randomize_bn
    from densenet_fused import FusedDenseBlock, convert
    torch.manual_seed(0)
    eager = convert(randomize_bn(torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                             bn_size=2, num_classes=3)))
    assert sum(isinstance(m, FusedDenseBlock) for m in eager.modules()) == 2
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(compiled.eval()(x), eager.eval()(x), 1e-5, "eval output")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager.train()(xe), compiled.train()(xc)
    grad = torch.linspace(-1, 1, ye.numel()).view_as(ye)
    ye.backward(grad)
    yc.backward(grad)
    assert_close(yc, ye, 1e-5, "train output")
    assert_close(xc.grad, xe.grad, 1e-4, "input grad")
    for (name, p_e), p_c in zip(eager.named_parameters(), model.parameters()):
        assert_close(p_c.grad, p_e.grad, 1e-4, name)
    for (name, b_e), b_c in zip(eager.named_buffers(), model.buffers()):
        assert_close(b_c.double(), b_e.double(), 1e-5, name)
