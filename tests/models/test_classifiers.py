"""torchvision and timm classifiers at random init: the default layer, an epoch read back from
MLflow, its ratios and maps those of a plain per-sample SVD of the tensor the tag names, the
same maps at both epochs, and the model as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mlflow_eigencam.render import render_card, to_rgb_uint8
from tests.helpers.zoo import (
    assert_state_unchanged,
    assert_strip_close,
    check_logged_epochs,
    explained_tensor,
    plain_svd,
    rows_by_epoch,
    run_two_epochs,
    state_of,
)

tv = pytest.importorskip("torchvision.models")


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


#: timm's Swin code at a fraction of swin_tiny's size (one block per stage): a 64x96 input.
SMALL_SWIN = dict(img_size=(64, 96), window_size=4, embed_dim=48, depths=(1, 1, 1, 1),
                  num_heads=(2, 2, 2, 2))

# (id, factory, input (H, W), expected tag). Small inputs; non-square where the model allows.
CASES = [
    ("resnet18", lambda: tv.resnet18(weights=None), (64, 96),
     "layer4 (auto: feature map (B, 512, 2, 3))"),
    ("mobilenet_v3_small", lambda: tv.mobilenet_v3_small(weights=None), (64, 64),
     "features (auto: feature map (B, 576, 2, 2))"),
    # features' output, copied before DenseNet's F.relu(inplace=True) runs on it.
    ("densenet121", lambda: tv.densenet121(weights=None), (64, 64),
     "features (auto: feature map (B, 1024, 2, 2))"),
    ("convnext_tiny", lambda: tv.convnext_tiny(weights=None), (64, 96),
     "features (auto: feature map (B, 768, 2, 3))"),
    ("vit_b_16", lambda: tv.vit_b_16(weights=None, image_size=64), (64, 64),
     "encoder (auto: tokens (B, 17, 768) folded to a 4x4 patch grid (1 prefix token dropped))"),
    ("swin_t", lambda: tv.swin_t(weights=None), (64, 96),
     "permute (auto: feature map (B, 768, 2, 3))"),
    ("timm_vit_small_patch16_224", _timm("vit_small_patch16_224", img_size=64), (64, 64),
     "norm (auto: tokens (B, 17, 384) folded to a 4x4 patch grid (1 prefix token dropped))"),
    ("timm_vit_small_dynamic", _timm("vit_small_patch16_224", dynamic_img_size=True), (48, 80),
     "norm (auto: tokens (B, 16, 384) folded to a 3x5 patch grid (1 prefix token dropped))"),
    ("timm_deit_small_distilled", _timm("deit_small_distilled_patch16_224", img_size=64), (64, 64),
     "norm (auto: tokens (B, 18, 384) folded to a 4x4 patch grid (2 prefix tokens dropped))"),
    # 4 register tokens after the class token: 5 prefix tokens.
    ("timm_vit_small_reg4", _timm("vit_small_patch14_reg4_dinov2", img_size=56), (56, 56),
     "norm (auto: tokens (B, 21, 384) folded to a 4x4 patch grid (5 prefix tokens dropped))"),
    ("timm_resnet18", _timm("resnet18"), (64, 96), "layer4 (auto: feature map (B, 512, 2, 3))"),
    # Channels-last stages (B, h, w, C), windowed attention inside: the last stage's norm,
    # permuted; never a block's softmax attention (B, heads, N, N) nor its qkv.
    ("timm_swin_tiny", _timm("swin_tiny_patch4_window7_224", **SMALL_SWIN),
     (64, 96), "norm (auto: channels-last feature map (B, 2, 3, 384) permuted to (B, 384, 2, 3))"),
    # Channels-last stages with an NCHW depthwise conv on part of the channels inside each
    # block: the stage, not that conv.
    ("timm_mambaout_femto", _timm("mambaout_femto"), (64, 96),
     "stages (auto: channels-last feature map (B, 2, 3, 288) permuted to (B, 288, 2, 3))"),
]


@pytest.mark.parametrize("factory, size, expected_tag", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_classifier_default_layer_and_logged_epoch(tracking_uri, factory, size, expected_tag):
    torch.manual_seed(0)
    model = factory()
    model.train()
    n = 3
    images = torch.rand(n, 3, *size)
    before = state_of(model)
    monitor = run_two_epochs(model, images, model, n_samples=n)
    assert_state_unchanged(before, model)
    assert monitor.target_layer_tag == expected_tag
    client = MlflowClient()
    tag, by_epoch, act = check_logged_epochs(client, monitor, model, images, n)
    # The maps: each logged strip equals one drawn here from the plain SVD's maps.
    maps, _ = plain_svd(act)
    for i, row in enumerate(by_epoch[0]):
        evr = [row[f"evr_{c}"] for c in (1, 2, 3)]
        expected = render_card(to_rgb_uint8(images[i].numpy(), "CHW"), maps[i],
                                explained_variance=evr, label=row["label"],
                                pred=row["prediction"], sample_id=row["sample_id"])
        assert_strip_close(client, monitor.run_id, row, expected)
    assert_state_unchanged(before, model)


def test_timm_swin_named_norm_is_explained_channels_last_permuted(tracking_uri):
    """``target_layer="norm"`` on timm's Swin: ``(B, 2, 3, 384)`` is 384 channels on the
    2x3 grid (permuted), not 2 channels on a 3x384 grid."""
    torch.manual_seed(0)
    model = _timm("swin_tiny_patch4_window7_224", **SMALL_SWIN)()
    images = torch.rand(2, 3, 64, 96)
    monitor = run_two_epochs(model, images, model, target_layer="norm", n_samples=2)
    assert monitor.target_layer_tag == "norm"
    by_epoch = rows_by_epoch(MlflowClient(), monitor.run_id)
    raw = explained_tensor(model, "norm", images)
    assert raw.shape == (2, 2, 3, 384)
    _, ratios = plain_svd(raw.transpose(0, 3, 1, 2))
    logged = np.array([[r[f"evr_{c}"] for c in (1, 2, 3)] for r in by_epoch[0]])
    np.testing.assert_allclose(logged, ratios, atol=2e-5)
