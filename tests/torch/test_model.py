"""integrations/torch/_model.py: the user's model is left as it was (flags, RNG, wrappers)."""

from __future__ import annotations

import torch
from torch import nn

from mlflow_eigencam.integrations.torch._model import keep_rows, quiet_forward
from mlflow_eigencam.pytorch import find_target_layer, preserve_training_flags, unwrap_model
from tests.helpers.torch_models import TinyCNN, TinyResNet


class NoisyInEval(nn.Module):
    """Draws random numbers in its forward whatever its mode (noise injection, MC sampling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + torch.rand_like(x))


def test_unwrap_dataparallel():
    model = TinyCNN()
    assert unwrap_model(nn.DataParallel(model)) is model


def test_preserve_training_flags_restores_mixed_flags_even_on_error():
    model = TinyResNet().train()
    model.layer2.bn1.eval()  # a frozen BatchNorm inside a training model
    before = [m.training for m in model.modules()]
    try:
        with preserve_training_flags(model):
            model.eval()
            raise KeyError("boom")
    except KeyError:
        pass
    assert [m.training for m in model.modules()] == before


def test_quiet_forward_leaves_flags_grad_and_random_stream_as_they_were():
    model = NoisyInEval().train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with quiet_forward(model) as device:
        assert device == torch.device("cpu") and not model.training and not torch.is_grad_enabled()
        model(torch.rand(1, 3, 8, 8))
    assert model.training and torch.is_grad_enabled()
    assert torch.equal(torch.rand(4), expected)


def test_find_target_layer_does_not_shift_the_users_random_stream():
    model = NoisyInEval()
    x = torch.rand(1, 3, 8, 8)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    assert find_target_layer(model, x)[0] == "conv"
    assert torch.equal(torch.rand(4), expected)


def test_keep_rows_is_a_detached_copy_of_the_kept_rows():
    source = torch.rand(5, 2, requires_grad=True) * 1.0
    kept = keep_rows(source, 3)
    assert kept.shape == (3, 2) and not kept.requires_grad and kept._base is None
    assert keep_rows(source, None).shape == (5, 2)
