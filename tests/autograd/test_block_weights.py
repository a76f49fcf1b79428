"""The block's weights as the kernels read them (densenet_fused/autograd/block.py: _compute_weights,
_weight_views): one cast copy per step, each layer's W1 and W2 views of it in the parameter's own layout."""
import pytest
import torch

from densenet_fused.autograd.block import PARAMS_PER_LAYER, BlockSpec, _compute_weights, _weight_views


def _params(layouts, c0=5, k=3, cb=6, dtype=torch.float32):
    """A block's parameter list (6 per layer) with the W2s in the given layouts: "contiguous",
    "channels_last", or "transposed" (a non-contiguous view that is neither)."""
    g = torch.Generator().manual_seed(0)
    params = []
    for l, layout in enumerate(layouts):
        c_l = c0 + l * k
        w1 = torch.randn(cb, c_l, 1, 1, generator=g, dtype=dtype)
        w2 = torch.randn(k, cb, 3, 3, generator=g, dtype=dtype)
        if layout == "channels_last":
            w2 = w2.to(memory_format=torch.channels_last)
        elif layout == "transposed":
            w2 = torch.randn(k, cb, 3, 3, generator=g, dtype=dtype).transpose(2, 3)
        params += [torch.randn(c_l, dtype=dtype), torch.randn(c_l, dtype=dtype), w1,
                   torch.randn(cb, dtype=dtype), torch.randn(cb, dtype=dtype), w2]
    return params


def _spec(num, dtype):
    return BlockSpec(layers=[None] * num, num_input_features=5, growth_rate=3, training=True, dtype=dtype)


@pytest.mark.parametrize("layouts", [("contiguous",) * 3, ("channels_last",) * 3,
                                     ("channels_last", "contiguous", "channels_last"),
                                     ("contiguous", "transposed", "channels_last")])
def test_cast_weights_equal_each_parameter_cast_in_its_layout(layouts):
    params = _params(layouts)
    spec = _spec(len(layouts), torch.bfloat16)
    flats = _compute_weights(spec, params, torch.device("cpu"))
    assert len(flats) == 1 and flats[0].dtype == torch.bfloat16  # one cast copy
    w1c, w2c = _weight_views(spec, params, flats)
    all_cl = all(layout == "channels_last" for layout in layouts)
    for l in range(len(layouts)):
        w1, w2 = params[PARAMS_PER_LAYER * l + 2], params[PARAMS_PER_LAYER * l + 5]
        assert w1c[l].shape == (w1.shape[0], w1.shape[1])
        assert torch.equal(w1c[l], w1.view(w1.shape[0], -1).to(torch.bfloat16))
        assert torch.equal(w2c[l], w2.to(torch.bfloat16))
        assert w1c[l].untyped_storage().data_ptr() == flats[0].untyped_storage().data_ptr()  # views, no copy
        assert w2c[l].untyped_storage().data_ptr() == flats[0].untyped_storage().data_ptr()
        # the kernels read W2 in the parameters' layout when every W2 is channels-last, else contiguous
        if all_cl:
            assert w2c[l].is_contiguous(memory_format=torch.channels_last) and not w2c[l].is_contiguous()
        else:
            assert w2c[l].is_contiguous()


def test_no_cast_copy_where_the_parameters_have_the_compute_dtype():
    params = _params(("channels_last", "contiguous"))
    spec = _spec(2, torch.float32)
    assert _compute_weights(spec, params, torch.device("cpu")) == ()
    w1c, w2c = _weight_views(spec, params, ())
    assert w2c[0] is params[5] and w2c[1] is params[11]
    assert w1c[0].data_ptr() == params[2].data_ptr()


def test_the_graph_drops_the_weight_views_after_backward_and_a_second_backward_takes_them_again():
    """The forward's views (and the cast weights behind them) are not kept by the graph past its backward;
    with retain_graph a second backward rebuilds them and gives the same gradients."""
    from densenet_fused import FusedDenseBlock
    torch.manual_seed(0)
    blk = FusedDenseBlock(2, 5, 2, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 5, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x)
    assert out.grad_fn.weight_views is not None and len(out.grad_fn.weight_views[0]) == 2
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    assert out.grad_fn.weight_views is None
    first = [p.grad.clone() for p in blk.parameters()] + [x.grad.clone()]
    for p in blk.parameters():
        p.grad = None
    x.grad = None
    out.backward(g)
    second = [p.grad for p in blk.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
