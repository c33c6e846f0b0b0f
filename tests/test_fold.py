"""fold_batchnorm against torch.nn.utils.fusion and against the unfolded
model, for every foldable layer type, on Sequential, fx-traceable and
untraceable models."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnext
from bnext.tools.fold import fold_into

LAYERS = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), nn.BatchNorm1d, (3, 4, 9)),
    ("conv2d", lambda: nn.Conv2d(4, 6, 3), nn.BatchNorm2d, (3, 4, 7, 7)),
    ("conv3d", lambda: nn.Conv3d(4, 6, 3), nn.BatchNorm3d, (2, 4, 5, 5, 5)),
    ("conv2d-grouped-nobias", lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d, (3, 4, 7, 7)),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, (3, 4, 9)),
    ("convT2d", lambda: nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d, (3, 4, 5, 5)),
    ("convT3d-nobias", lambda: nn.ConvTranspose3d(4, 6, 3, bias=False), nn.BatchNorm3d, (2, 4, 3, 3, 3)),
    ("convT2d-grouped", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d, (3, 4, 5, 5)),
    ("linear", lambda: nn.Linear(4, 6), nn.BatchNorm1d, (5, 4)),
]


def _eval_bn(cls, c, affine=True):
    bn = cls(c, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return bn.eval()


@pytest.mark.parametrize("name,make,bn_cls,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_fold_into_matches_torch_fusion_and_unfolded(name, make, bn_cls, shape):
    torch.manual_seed(0)
    layer, bn = make().eval(), _eval_bn(bn_cls, 6)
    x = torch.randn(shape)
    folded = fold_into(layer, bn)
    torch.testing.assert_close(folded(x), bn(layer(x)))
    grouped_transposed = "convT" in name and layer.groups > 1
    if not grouped_transposed:  # torch's fusion does not handle grouped transposed convs
        if name == "linear":
            ref = fuse_linear_bn_eval(layer, bn)
        else:
            ref = fuse_conv_bn_eval(layer, bn, transpose="convT" in name)
        torch.testing.assert_close(folded.weight, ref.weight)
        torch.testing.assert_close(folded.bias, ref.bias)


class Block(nn.Module):
    """fx-traceable: residual add, a BN after an add (not foldable), a shared
    conv called twice, a BN after a functional op (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = bnext.BatchNorm2d(8)
        self.bn_add = nn.BatchNorm2d(8)
        self.bn_shared = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        r = self.bn_add(y + z)
        s = self.bn_shared(self.conv2(r))
        return self.head(s.sum((2, 3), keepdim=True))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = y * 2
        return self.bn(y)


def _warm(model, shape):
    model.train()
    for _ in range(3):
        model(torch.randn(shape) * 2 + 0.5)
    return model.eval()


def _count(model, types):
    return sum(isinstance(m, types) for m in model.modules())


def test_fold_fx_model():
    torch.manual_seed(0)
    model = _warm(Block(), (6, 3, 6, 6))
    before = copy.deepcopy(model.state_dict())
    folded = bnext.fold_batchnorm(model)
    assert isinstance(folded, torch.fx.GraphModule)
    # bn1, bn2, bn_shared (into a private copy of the twice-called conv2) and
    # the head's BN fold; bn_add follows an add and stays.
    bns = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 and isinstance(bns[0], bnext.BatchNorm2d)  # only bn_add stays
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x))
    for k, v in model.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_fold_sequential():
    torch.manual_seed(0)
    model = _warm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.ConvTranspose2d(8, 4, 2, stride=2), bnext.BatchNorm2d(4),
                                nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6)),
                  (4, 3, 6, 6))
    folded = bnext.fold_batchnorm(model)
    assert _count(folded, nn.modules.batchnorm._BatchNorm) == 0
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x))


def test_fold_untraceable_falls_back_to_sequentials():
    torch.manual_seed(0)
    model = _warm(Untraceable(), (4, 3, 6, 6))
    folded = bnext.fold_batchnorm(model)
    assert not isinstance(folded, torch.fx.GraphModule)
    assert isinstance(folded.features[1], nn.Identity) and isinstance(folded.features[4], nn.Identity)
    assert type(folded.bn) is bnext.BatchNorm2d  # unfoldable: bnext's eval kernel
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x))


def test_frozen_bn_folds_and_train_bn_does_not():
    torch.manual_seed(0)
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (4, 3, 6, 6))
    frozen = bnext.freeze_batchnorm(copy.deepcopy(model))
    folded = bnext.fold_batchnorm(frozen)
    assert _count(folded, bnext.FrozenBatchNorm2d) == 0
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model(x))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        bnext.fold_batchnorm(model)


@pytest.mark.parametrize("bn_kind", ["bnext", "torch"])
def test_fold_exported_program(bn_kind):
    torch.manual_seed(0)
    ns = bnext if bn_kind == "bnext" else nn
    model = _warm(nn.Sequential(
        nn.Conv2d(3, 4, 3), ns.BatchNorm2d(4), nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 1, bias=False, groups=2), ns.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 16, 3), ns.BatchNorm1d(3),
    ), (5, 3, 6, 6))
    ep = torch.export.export(model, (torch.randn(2, 3, 6, 6),))
    folded = bnext.fold_batchnorm(ep)
    assert isinstance(folded, torch.export.ExportedProgram)
    targets = [str(n.target) for n in folded.graph.nodes]
    assert not any("batch_norm" in t for t in targets), targets
    assert not any("running_mean" in k for k in folded.state_dict)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded.module()(x), model(x))
