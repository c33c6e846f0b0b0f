"""torch.export of models with bnext batch norm, in train and eval mode; and
what ONNX export does."""

import copy

import pytest
import torch

import bnext


class Net(torch.nn.Module):
    def __init__(self, momentum=0.1):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bnext.BatchNorm2d(6, momentum=momentum)
        self.bn3 = bnext.BatchNorm3d(2, affine=False)
        self.bn1 = bnext.BatchNorm1d(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        z = self.bn3(y.unflatten(1, (2, 3)))
        return self.bn1(z.flatten(1, 2).sum((2, 3)))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_export_train_runs_and_updates_buffers_like_eager(momentum, device):
    eager = Net(momentum).to(device).train()
    exported_from = copy.deepcopy(eager)
    x0 = torch.randn(4, 3, 5, 5, device=device)
    ep = torch.export.export(exported_from, (x0,))
    assert any("bnext.batch_norm_train_step" in str(n.target) for n in ep.graph.nodes)
    runner = ep.module()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5, device=device)
        torch.testing.assert_close(runner(x), eager(x))
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(runner.get_buffer(name), buf, msg=name)


def test_export_eval_equals_eager(device):
    eager = Net().to(device)
    for _ in range(2):  # non-trivial running statistics
        eager(torch.randn(4, 3, 5, 5, device=device))
    eager.eval()
    x = torch.randn(3, 3, 5, 5, device=device)
    ep = torch.export.export(copy.deepcopy(eager), (x,))
    assert any("bnext.batch_norm_eval" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), eager(x))
    x2 = torch.randn(3, 3, 5, 5, device=device)
    torch.testing.assert_close(ep.module()(x2), eager(x2))


def test_export_dynamic_batch(device):
    eager = Net().to(device).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(copy.deepcopy(eager), (torch.randn(4, 3, 5, 5, device=device),),
                             dynamic_shapes=({0: batch},))
    for n in (2, 9):
        x = torch.randn(n, 3, 5, 5, device=device)
        torch.testing.assert_close(ep.module()(x), eager(x))


def test_onnx_export_is_refused_with_the_op_name():
    """bnext ops have no ONNX translation: the TorchScript exporter stops at
    the first bnext op and names it. Workaround (README): export
    ``bnext.revert_batchnorm(model)``, which holds torch's BN modules."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnext.BatchNorm2d(4)).eval()
    with pytest.raises(torch.onnx.errors.UnsupportedOperatorError, match="bnext::batch_norm_eval"):
        torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), None, dynamo=False)
