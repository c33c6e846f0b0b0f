"""convert_batchnorm(fuse_activations=True): BN -> act and BN -> add -> act
fused in Sequentials and fx-traceable modules; the result trains like the
original (outputs, grads, running stats)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnext
from helpers import assert_close


class Block(nn.Module):
    """torchvision's BasicBlock shape: shared inplace ReLU, `out += identity`."""

    def __init__(self, c, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                           if downsample else None)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.LeakyReLU(0.2))
        self.layer = nn.Sequential(Block(8, downsample=True), Block(8))
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer(self.stem(x))
        x = F.gelu(self.bn(self.conv(x)), approximate="tanh")
        return self.head(x.mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ELU(),
                                  nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.SiLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace this
            x = -x
        return self.body(x)


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, bnext.BatchNormAct2d)]


def _train_equal(a, b, shape, steps=2, memory_format=torch.contiguous_format):
    """Both models in float64: these tests are about what the rewrite
    computes; the fused kernels' float32 accuracy is tested against torch in
    test_batchnorm_act.py (in float32 the conv weight grads of torch and
    bnext differ by rounding, ~1e-4 relative, with bnext nearer the float64
    result)."""
    a.double()
    b.double()
    for step in range(steps + 1):
        training = step < steps
        a.train(training)
        b.train(training)
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=memory_format)
        ya, yb = a(x), b(x)
        assert_close(yb, ya)
        if training:
            ya.sum().backward()
            yb.sum().backward()
            pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
            assert pa.keys() == pb.keys()
            for k in pa:
                assert_close(pb[k].grad, pa[k].grad, msg=k)
                pa[k].grad = pb[k].grad = None
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert_close(sb[k], sa[k], msg=k)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fx_fuses_activations_and_residual_adds(memory_format):
    ref = Net()
    model = bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert isinstance(model, torch.fx.GraphModule)
    fused = {name: m for name, m in model.named_modules() if isinstance(m, bnext.BatchNormAct2d)}
    # stem (leaky), 2 blocks x (bn1 relu, bn2 + add + relu), final bn + gelu_tanh
    assert {n: m.activation for n, m in fused.items()} == {
        "stem.1": "leaky_relu", "layer.0.bn1": "relu", "layer.0.bn2": "relu",
        "layer.1.bn1": "relu", "layer.1.bn2": "relu", "bn": "gelu_tanh"}
    assert fused["stem.1"].negative_slope == 0.2
    # The downsample BN feeds the add as the residual: converted, not fused.
    assert type(model.get_submodule("layer.0.downsample.1")) is bnext.BatchNorm2d
    code = model.code
    assert "add" not in code and "relu" not in code and "gelu" not in code
    _train_equal(ref, model, (4, 3, 8, 8), memory_format=memory_format)


def test_fused_layers_share_parameters_and_buffers():
    model = Net()
    bn = model.layer[0].bn1
    params = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    fused = bnext.convert_batchnorm(model, fuse_activations=True).get_submodule("layer.0.bn1")
    assert all(a is b for a, b in zip(params, (fused.weight, fused.bias, fused.running_mean,
                                               fused.running_var)))


def test_untraceable_model_falls_back_to_its_sequentials():
    ref = Untraceable()
    model = bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert type(model) is Untraceable
    assert [m.activation for m in _fused_layers(model)] == ["elu", "silu"]
    assert isinstance(model.body[2], nn.Identity) and isinstance(model.body[5], nn.Identity)
    _train_equal(ref, model, (4, 3, 5, 5))


def test_sequential_root():
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.GELU())
    model = bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert [m.activation for m in _fused_layers(model)] == ["gelu"]
    _train_equal(ref, model, (4, 3, 5, 5))


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        z = self.bn2(x)
        return F.relu(y) + y * 2 + F.relu(self.bn2(z))  # bn2 is called twice


def test_bn_output_used_elsewhere_or_bn_called_twice_is_not_fused():
    ref = SharedOutput()
    model = bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert not _fused_layers(model)
    assert type(model) is SharedOutput  # nothing fused: the module is kept as it was
    _train_equal(ref, model, (4, 4, 3, 3))


def test_unsupported_activations_are_left_alone():
    ref = nn.Sequential(nn.BatchNorm2d(4), nn.ELU(alpha=0.5), nn.BatchNorm2d(4), nn.Tanh())
    model = bnext.convert_batchnorm(copy.deepcopy(ref), fuse_activations=True)
    assert not _fused_layers(model)
    _train_equal(ref, model, (4, 4, 3, 3))


def test_memory_saving_goes_to_invertible_layers_only():
    model = bnext.convert_batchnorm(Net(), fuse_activations=True, memory_saving=True)
    flags = {m.activation: m.memory_saving for m in _fused_layers(model)}
    assert flags == {"leaky_relu": True, "relu": False, "gelu_tanh": False}
    with pytest.raises(ValueError, match="fuse_activations=True"):
        bnext.convert_batchnorm(Net(), memory_saving=True)


def test_without_fuse_activations_nothing_is_fused():
    model = bnext.convert_batchnorm(Net())
    assert type(model) is Net and not _fused_layers(model)


def test_freeze_leaves_fused_layers_alone():
    model = bnext.convert_batchnorm(Net(), fuse_activations=True)
    frozen = bnext.freeze_batchnorm(model)
    kinds = {type(m).__name__ for m in frozen.modules()}
    assert "BatchNormAct2d" in kinds and "FrozenBatchNorm2d" in kinds  # downsample BN froze
    assert len(_fused_layers(frozen)) == 6
