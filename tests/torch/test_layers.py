"""integrations/torch/layers.py: target layers resolved by name or auto-detected (copies taken
at hook time, image-shaped maps only, prefix tokens folded onto the patch grid, square or not,
detectors inside their backbone, never a decoder), and token folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch import nn

from mlflow_eigencam.eigencam import eigencam
from mlflow_eigencam.errors import EigenCAMWarning
from mlflow_eigencam.pytorch import (
    MAX_EXTRA_TOKENS,
    EigenCAMMonitor,
    find_target_layer,
    resolve_target_layer,
    tokens_to_grid,
)
from tests.helpers.oracle import plain_svd
from tests.helpers.torch_models import (
    RecordingLogger,
    TinyClassifierWithDecoder,
    TinyCNN,
    TinyDetector,
    TinyResNet,
    TinyViT,
    all_hooks,
    table_rows,
)


class InplaceAfterFeatures(nn.Module):
    """DenseNet's pattern: ``features`` (no final ReLU), then ``F.relu(out, inplace=True)``
    on the very tensor ``features`` returned."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Attention(nn.Module):
    """timm's Attention: q/k normed as (B, heads, N, head_dim), a 4-D tensor that is no map."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // heads)
        self.k_norm = nn.LayerNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TimmLikeViT(nn.Module):
    """Patch conv -> class (+ distillation) tokens -> blocks with 4-D attention -> norm."""

    def __init__(self, dim: int = 16, patch: int = 4, prefix: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, dim))
        self.attn = Attention(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # any grid: dynamic image size
        tokens = torch.cat([self.prefix_tokens.expand(len(x), -1, -1), tokens], dim=1)
        tokens = self.norm(tokens + self.attn(tokens))
        return self.head(tokens[:, 0])


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class SwinLike(nn.Module):
    """torchvision's Swin layout: channels-last stages, ``norm``, then ``permute`` to NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 4, 4), Permute(0, 2, 3, 1), nn.LayerNorm(8))
        self.norm = nn.LayerNorm(8)
        self.permute = Permute(0, 3, 1, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.permute(self.norm(self.features(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_in_place_op_after_the_found_layer_does_not_change_epoch_0(tracking_uri):
    torch.manual_seed(0)
    model = InplaceAfterFeatures().eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model.features(x).numpy()  # before the ReLU: what `features` returned
    assert (expected < 0).any()
    logger = RecordingLogger(n_samples=4)
    monitor = EigenCAMMonitor(model, logger=logger)  # pinned: epoch 1 is the extra forward
    for epoch in range(2):
        with torch.no_grad(), monitor.capture("eval", "val"):
            monitor.update(x, None, model(x))
        monitor.epoch_end(epoch)
    monitor.close()
    assert monitor.target_layer == "features" and all_hooks(model) == 0
    assert len(logger.batches) == 2
    for batch in logger.batches:  # the auto-detected first epoch and the pinned second alike
        np.testing.assert_array_equal(batch["activations"], expected)
    rows = table_rows(MlflowClient(), monitor.run_id, "eval", "val")
    by_epoch = {e: [r["evr_1"] for r in rows if r["epoch"] == e] for e in (0, 1)}
    assert by_epoch[0] == by_epoch[1]
    _, ratios = plain_svd(expected, 3)
    np.testing.assert_allclose(by_epoch[0], ratios[:, 0], atol=2e-6)


def test_in_place_op_after_an_explicit_layer_is_not_seen_either():
    model = InplaceAfterFeatures().eval()
    x = torch.randn(2, 3, 8, 8)
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, "features", logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        model(x)
        monitor.update(x)
    with torch.no_grad():
        np.testing.assert_array_equal(logger.batches[0]["activations"], model.features(x).numpy())
    monitor.close()


@pytest.mark.parametrize("size", [(16, 16), (16, 24), (20, 12)])
@pytest.mark.parametrize("prefix", [1, 2, 5])
def test_timm_like_vit_folds_tokens_and_never_takes_the_attention_tensor(size, prefix):
    torch.manual_seed(0)
    model = TimmLikeViT(prefix=prefix).eval()
    x = torch.randn(3, 3, *size)
    logger = RecordingLogger(n_samples=3)
    monitor = EigenCAMMonitor(model, logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        monitor.update(x, None, model(x))
    grid = (size[0] // 4, size[1] // 4)
    assert monitor.target_layer == "norm"  # not attn.k_norm's (B, heads, N, head_dim)
    assert monitor.target_layer_tag == (
        f"norm (auto: tokens (B, {prefix + grid[0] * grid[1]}, 16) folded to a "
        f"{grid[0]}x{grid[1]} patch grid ({prefix} prefix token{'s' if prefix > 1 else ''} dropped))")
    # The folded grid is exactly norm's patch tokens, row-major, prefix tokens dropped.
    with torch.no_grad():
        tokens = {}
        handle = model.norm.register_forward_hook(lambda m, i, o: tokens.setdefault("t", o))
        model(x)
        handle.remove()
    expected = tokens["t"][:, prefix:].transpose(1, 2).reshape(3, 16, *grid).numpy()
    np.testing.assert_array_equal(logger.batches[0]["activations"], expected)
    # The tag's value is accepted back as target_layer.
    assert resolve_target_layer(model, monitor.target_layer_tag) == ("norm", model.norm)
    monitor.close()


@pytest.mark.parametrize("size", [(16, 24), (24, 16)])
def test_a_named_token_layer_folds_onto_the_non_square_patch_grid(size):
    model = TimmLikeViT(prefix=1).eval()
    x = torch.randn(2, 3, *size)
    logger = RecordingLogger(n_samples=4)
    monitor = EigenCAMMonitor(model, "norm", logger=logger)  # pinned: epoch 1 is the extra pass
    for epoch in range(2):
        with torch.no_grad(), monitor.capture("eval"):
            monitor.update(x, None, model(x))
        monitor.epoch_end(epoch)
    monitor.close()
    grid = (size[0] // 4, size[1] // 4)
    assert [b["activations"].shape for b in logger.batches] == [(2, 16, *grid)] * 2
    np.testing.assert_array_equal(logger.batches[0]["activations"], logger.batches[1]["activations"])
    assert monitor.target_layer_tag == "norm" and all_hooks(model) == 0


def test_a_4d_output_that_does_not_fit_the_image_is_never_chosen():
    class OnlyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flat = nn.Flatten(1)
            self.k_norm = nn.LayerNorm(8)

        def forward(self, x):  # (B, 3, 16, 16) -> (B, 2, 48, 8): heads x tokens x head_dim
            return self.k_norm(self.flat(x).reshape(len(x), 2, 48, 8))

    with pytest.raises(ValueError, match="target_layer"):
        find_target_layer(OnlyAttention(), torch.rand(2, 3, 16, 16))


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_channels_last_maps_are_skipped_for_the_nchw_permute(size):
    name, _ = find_target_layer(SwinLike(), torch.rand(2, 3, *size))
    assert name == "permute"


def test_detector_default_is_the_backbone_last_stage(tracking_uri):
    model = TinyDetector().eval()
    images = [torch.rand(3, 32, 48) for _ in range(2)]
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        out = model(images)
        monitor.update(images, None, out)
    assert monitor.target_layer == "backbone.body"
    assert monitor.target_layer_tag == ("backbone.body (auto: feature map (B, 16, 8, 12), last "
                                        "feature map of the detection backbone)")
    assert logger.batches[0]["activations"].shape == (2, 16, 8, 12)
    monitor.close()


def test_maps_equal_a_plain_svd_of_the_explained_tensor():
    torch.manual_seed(0)
    model = TimmLikeViT(prefix=2).eval()
    x = torch.randn(2, 3, 16, 24)
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        monitor.update(x, None, model(x))
    act = logger.batches[0]["activations"]
    result = eigencam(act, 3)
    maps, ratios = plain_svd(act, 3)
    np.testing.assert_allclose(result.explained_variance_ratio, ratios, atol=1e-5)
    np.testing.assert_allclose(result.maps, maps, atol=1e-4 * np.abs(maps).max())
    monitor.close()


def test_a_decoder_after_the_encoder_is_skipped_with_one_warning_naming_the_candidates():
    """A classifier with an auxiliary reconstruction head: the last map is the decoder's
    3-channel image; the encoder feeding the classification head is chosen instead."""
    model = TinyClassifierWithDecoder()
    with pytest.warns(EigenCAMWarning) as record:
        name, module = find_target_layer(model, torch.rand(2, 3, 16, 16))
    assert (name, module) == ("encoder", model.encoder)
    [message] = [str(w.message) for w in record if issubclass(w.category, EigenCAMWarning)]
    assert "chose 'encoder' and not the last feature map 'decoder' (3x16x16)" in message
    assert "upsamples after 'encoder'" in message
    assert message.split("Candidates (forward order): ", 1)[1] == (
        "encoder.2 (16x4x4), encoder.3 (16x4x4), encoder (16x4x4) <- chosen, decoder.0 (8x8x8), "
        "decoder.1 (8x8x8), decoder.2 (3x16x16), decoder (3x16x16). Pass target_layer= to choose another.")


def test_a_decoder_after_vit_tokens_keeps_the_tokens():
    """Tokens over the patch grid, then an upsampling head: the tokens are still chosen."""

    class ViTWithDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = TimmLikeViT()
            self.up = nn.ConvTranspose2d(16, 3, 4, 4)

        def forward(self, x):
            tokens = self.vit.proj(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.vit.prefix_tokens.expand(len(x), -1, -1), tokens], dim=1)
            tokens = self.vit.norm(tokens + self.vit.attn(tokens))
            grid = tokens[:, 1:].transpose(1, 2).reshape(len(x), 16, 4, 4)
            return self.vit.head(tokens[:, 0]), self.up(grid)

    model = ViTWithDecoder()
    with pytest.warns(EigenCAMWarning, match="chose 'vit.norm' and not the last feature map 'up'"):
        name, _ = find_target_layer(model, torch.rand(1, 3, 16, 16))
    assert name == "vit.norm"


def test_no_warning_when_the_last_map_is_the_coarsest():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_target_layer(TinyResNet(), torch.rand(1, 3, 32, 48))[0] == "layer4"


# --------------------------------------------------------------------------- names, tokens


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


# --------------------------------------------------------------------------- attention, layouts


class WindowAttention(nn.Module):
    """timm Swin's WindowAttention: qkv, softmax weights ``(B * windows, heads, N, N)``
    through ``attn_drop``, proj; takes and returns ``(B, h, w, C)``."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape  # one window covering the whole (small) map
        q, k, v = self.qkv(x.reshape(b, h * w, d)).reshape(
            b, h * w, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(self.softmax(q @ k.transpose(-2, -1)))  # (B, heads, hw, hw)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, h, w, d))


class SwinBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm1(x))


class TimmSwinLike(nn.Module):
    """timm's Swin layout: channels-last stages ``(B, h, w, C)``, ``norm``, head pooling over
    (h, w); the 8x8 map on a 32x32 image: attention weights (B, 2, 64, 64) fit the image too."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.layers = nn.Sequential(SwinBlock(dim), SwinBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(self.patch_embed(x).permute(0, 2, 3, 1)))
        return self.head(x.mean((1, 2)))


def test_timm_swin_like_never_takes_attention_weights_and_permutes_channels_last(tracking_uri):
    torch.manual_seed(0)
    model = TimmSwinLike().eval()
    x = torch.randn(2, 3, 32, 32)
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, logger=logger)
    for epoch in range(2):  # epoch 1: the pinned extra forward, through the same permute
        with torch.no_grad(), monitor.capture("eval"):
            monitor.update(x, None, model(x))
        monitor.epoch_end(epoch)
    monitor.close()
    assert monitor.target_layer == "norm"  # not layers.1.attn.attn_drop's (B, 2, 64, 64)
    assert monitor.target_layer_tag == ("norm (auto: channels-last feature map (B, 8, 8, 16) "
                                        "permuted to (B, 16, 8, 8))")
    with torch.no_grad():
        expected = model.norm(model.layers(model.patch_embed(x).permute(0, 2, 3, 1)))
    for batch in logger.batches:
        np.testing.assert_array_equal(batch["activations"], expected.permute(0, 3, 1, 2).numpy())
    assert resolve_target_layer(model, monitor.target_layer_tag) == ("norm", model.norm)


def test_a_named_channels_last_layer_is_permuted():
    torch.manual_seed(0)
    model = TimmSwinLike(dim=24).eval()
    x = torch.randn(2, 3, 32, 64)  # (B, 8, 16, 24): 8 channels on 16x24 fits no stride
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, "norm", logger=logger)
    for epoch in range(2):
        with torch.no_grad(), monitor.capture("eval"):
            monitor.update(x, None, model(x))
        monitor.epoch_end(epoch)
    monitor.close()
    with torch.no_grad():
        expected = model.norm(model.layers(model.patch_embed(x).permute(0, 2, 3, 1)))
    assert [b["activations"].shape for b in logger.batches] == [(2, 24, 8, 16)] * 2
    for batch in logger.batches:
        np.testing.assert_array_equal(batch["activations"], expected.permute(0, 3, 1, 2).numpy())


def test_a_named_layer_both_layouts_fit_is_refused_naming_reshape_transform():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Permute(0, 1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 32, 64)  # (B, 8, 16, 32): 8 channels at stride 2, or 32 at stride 4
    monitor = EigenCAMMonitor(model, "0", logger=RecordingLogger(n_samples=2))
    with torch.no_grad(), monitor.capture("eval"):
        out = model(x)
        with pytest.raises(ValueError, match=r"'0' outputs \(2, 8, 16, 32\).*reshape_transform"):
            monitor.update(x, None, out)
    monitor.close()
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, "0", reshape_transform=lambda t: t, logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        monitor.update(x, None, model(x))
    assert logger.batches[0]["activations"].shape == (2, 8, 16, 32)
    monitor.close()


class AttentionDownsample(nn.Module):
    """LeViT's: keys / values over all tokens (``kv``), queries over the 2x-pooled grid."""

    def __init__(self, dim: int, side: int) -> None:
        super().__init__()
        self.side = side
        self.kv = nn.Linear(dim, dim * 3)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim * 2, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        k, v = self.kv(x).split([d, 2 * d], dim=-1)
        grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)[:, :, ::2, ::2]
        q = self.q(grid.flatten(2).transpose(1, 2))
        return self.proj(torch.softmax(q @ k.transpose(1, 2), -1) @ v)


class TinyLeViT(nn.Module):
    """Patch conv (4x4 grid) -> tokens -> an attention downsample to 2x2 -> norm."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.mlp = nn.Linear(dim, dim)
        self.attn_downsample = AttentionDownsample(dim, 4)
        self.norm = nn.LayerNorm(dim * 2)
        self.head = nn.Linear(dim * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.attn_downsample(tokens)).mean(1))


def test_a_kv_projection_is_never_chosen_and_pooled_token_grids_are_followed():
    model = TinyLeViT()
    x = torch.rand(2, 3, 16, 16)
    name, _ = find_target_layer(model, x)
    assert name == "norm"  # (B, 4, 16) over the pooled 2x2 grid, not attn_downsample.kv
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, logger=logger)
    with torch.no_grad(), monitor.capture("eval"):
        monitor.update(x, None, model(x))
    assert monitor.target_layer_tag == (
        "norm (auto: tokens (B, 4, 16) folded to a 2x2 patch grid (0 prefix tokens dropped))")
    assert logger.batches[0]["activations"].shape == (2, 16, 2, 2)
    monitor.close()


class TinySSD(nn.Module):
    """torchvision's SSD layout: ``backbone.features`` then ``backbone.extra`` prediction
    levels shrinking to 2x2, the levels as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(),
                                               nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.backbone.extra = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU()) for _ in range(2)])
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> list:
        levels = [self.backbone.features(x)]
        for block in self.backbone.extra:
            levels.append(block(levels[-1]))
        return [self.head(level) for level in levels]


def test_an_ssd_backbone_is_searched_in_its_features_not_its_extras():
    name, _ = find_target_layer(TinySSD(), torch.rand(2, 3, 32, 32))
    assert name == "backbone.features"  # (B, 16, 8, 8), not backbone.extra.1's 2x2


def test_a_hybrid_vits_patch_embed_backbone_is_no_detector_backbone():
    class HybridViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.backbone = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.ReLU())
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.patch_embed.backbone(x).flatten(2).transpose(1, 2)).mean(1)

    assert find_target_layer(HybridViT(), torch.rand(1, 3, 16, 16))[0] == "norm"


class TwoBranch(nn.Module):
    """Two parallel branches of the same 4x4 size, concatenated for the head: either could
    be meant."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.left = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        both = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(both.mean((2, 3)))


def test_an_unsure_choice_is_tagged_and_warned_once_naming_the_candidates(tracking_uri):
    model = TwoBranch().eval()
    x = torch.rand(2, 3, 16, 16)
    logger = RecordingLogger(n_samples=2)
    monitor = EigenCAMMonitor(model, logger=logger)
    with pytest.warns(EigenCAMWarning) as record:
        for epoch in range(2):
            with torch.no_grad(), monitor.capture("eval"):
                monitor.update(x, None, model(x))
            monitor.epoch_end(epoch)
    monitor.close()
    [message] = [str(w.message) for w in record if issubclass(w.category, EigenCAMWarning)]
    assert "unsure, chose 'right' (12x4x4)" in message
    assert "Candidates (forward order): left (16x4x4), right (12x4x4) <- chosen" in message
    assert "Pass target_layer=" in message
    tag = "right (auto: feature map (B, 12, 4, 4), unsure: also left)"
    assert monitor.target_layer_tag == tag
    from mlflow_eigencam import _layout

    assert MlflowClient().get_run(monitor.run_id).data.tags[_layout.TAG_TARGET_LAYER] == tag
    assert resolve_target_layer(model, tag) == ("right", model.right)


def test_a_chain_of_stages_is_not_unsure():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_target_layer(TimmSwinLike(), torch.rand(1, 3, 32, 32))[0] == "norm"
        assert find_target_layer(TinyCNN(), torch.rand(1, 3, 16, 16))[0] == "features"
