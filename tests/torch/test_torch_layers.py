"""Target-layer detection, name resolution and token reshaping (no MLflow needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlflow_eigencam.pytorch import (
    MAX_EXTRA_TOKENS,
    find_target_layer,
    resolve_target_layer,
    tokens_to_grid,
    unwrap_model,
)
from tests.helpers.torch_models import TinyCNN, TinyResNet, TinyViT, all_hooks


def test_auto_detection_picks_resnet_layer4():
    model = TinyResNet()
    name, module = find_target_layer(model, torch.rand(2, 3, 32, 32))
    # layer4 completes after its own last ReLU; avgpool's 1x1 output does not qualify.
    assert name == "layer4" and module is model.layer4
    assert all_hooks(model) == 0


def test_auto_detection_on_sequential_cnn():
    model = TinyCNN()
    name, module = find_target_layer(model, torch.rand(1, 3, 16, 16))
    # The Sequential completes after its last ReLU, with the same 8x8 output.
    assert name == "features" and module is model.features


def test_auto_detection_restores_training_flags():
    model = TinyResNet().train()
    model.layer2.bn1.eval()
    before = [m.training for m in model.modules()]
    find_target_layer(model, torch.rand(1, 3, 32, 32))
    assert [m.training for m in model.modules()] == before


def test_auto_detection_without_feature_map_raises():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="target_layer"):
        find_target_layer(model, torch.rand(1, 3, 2, 2))


def test_auto_detection_prefers_vit_tokens_over_patch_conv():
    model = TinyViT()
    name, _ = find_target_layer(model, torch.rand(1, 3, 16, 16))
    assert name == "norm"  # the last (B, 1 + 16, D) token layer after the 4x4 patch grid


def test_resolve_by_name_module_and_ddp_prefix():
    model = TinyResNet()
    assert resolve_target_layer(model, "layer4.conv2") == ("layer4.conv2", model.layer4.conv2)
    assert resolve_target_layer(model, model.layer3) == ("layer3", model.layer3)
    assert resolve_target_layer(model, "module.layer4")[1] is model.layer4


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"'layer5'.*close names: .*layer4"):
        resolve_target_layer(TinyResNet(), "layer5")


def test_foreign_module_and_bad_type():
    with pytest.raises(ValueError, match="Conv2d is not a submodule"):
        resolve_target_layer(TinyResNet(), nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="int"):
        resolve_target_layer(TinyResNet(), 3)


def test_unwrap_dataparallel():
    model = TinyCNN()
    assert unwrap_model(nn.DataParallel(model)) is model


def test_tokens_drop_class_token_and_fold_row_major():
    tokens = torch.arange(2 * 17 * 5, dtype=torch.float32).reshape(2, 17, 5)
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 5, 4, 4)
    # grid[b, :, i, j] is patch token i * 4 + j, after the dropped class token.
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        assert torch.equal(grid[:, :, i, j], tokens[:, 1 + i * 4 + j])


def test_tokens_with_registers_and_without_class_token():
    assert tokens_to_grid(torch.rand(1, 5 + 49, 8)).shape == (1, 8, 7, 7)
    plain = torch.rand(1, 9, 4)
    assert torch.equal(tokens_to_grid(plain)[0, :, 2, 1], plain[0, 7])


def test_non_square_tokens_need_reshape_transform():
    tokens = torch.rand(2, 1 + 14 * 10, 6)  # 141 = 11 * 11 + 20 > MAX_EXTRA_TOKENS
    assert 141 - 11 * 11 > MAX_EXTRA_TOKENS
    with pytest.raises(ValueError, match="reshape_transform"):
        tokens_to_grid(tokens)

    def to_grid(t):
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], t.shape[2], 14, 10)

    assert tokens_to_grid(tokens, to_grid).shape == (2, 6, 14, 10)
    assert tokens_to_grid(tokens, grid_hw=(14, 10)).shape == (2, 6, 14, 10)


def test_reshape_transform_must_return_4d():
    with pytest.raises(ValueError, match=r"\(B, C, h, w\).*\(2, 3\)"):
        tokens_to_grid(torch.rand(2, 3, 4), lambda t: t[:, :, 0])


def test_bad_rank_raises():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        tokens_to_grid(torch.rand(2, 3))
