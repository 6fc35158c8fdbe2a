"""Rendering (``mlflow_eigencam.render``): overlays (non-square!), cards, grids and PNG bytes, checked on pixels."""

import hashlib
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from mlflow_eigencam.render import (
    COLORMAPS,
    encode_png,
    encode_webp_preview,
    overlay,
    card_geometry,
    card_layout,
    panel_size,
    render_card,
    render_grid,
    resolve_colormap,
)

JET_ZERO = (0, 0, 128)  # cv2 jet at 0, as RGB: dark blue
JET_TOP = (128, 0, 0)  # cv2 jet at 255, as RGB: dark red
OK_GREEN = (0, 130, 0)
WRONG_RED = (200, 0, 0)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def find(haystack, needle):
    """Top-left (y, x) positions where ``needle`` appears exactly in ``haystack``."""
    nh, nw = needle.shape[:2]
    hits = []
    for y in range(haystack.shape[0] - nh + 1):
        for x in range(haystack.shape[1] - nw + 1):
            if np.array_equal(haystack[y : y + nh, x : x + nw], needle):
                hits.append((y, x))
    return hits


def find_rows(haystack, needle, x):
    """Rows y where ``needle`` appears at column ``x`` (a cheaper ``find``)."""
    nh, nw = needle.shape[:2]
    return [y for y in range(haystack.shape[0] - nh + 1) if np.array_equal(haystack[y : y + nh, x : x + nw], needle)]


def count_colour(img, colour):
    return int(np.all(img == np.array(colour, np.uint8), axis=-1).sum())


# ------------------------------------------------------------------ colormaps


def test_resolve_colormap():
    # OpenCV's cv2.COLORMAP_* numbers (JET 2, VIRIDIS 16, TURBO 20, HOT 11), without OpenCV.
    assert resolve_colormap("jet") == 2
    assert resolve_colormap("Viridis") == 16
    assert resolve_colormap("COLORMAP_TURBO") == 20
    assert resolve_colormap(11) == 11
    assert resolve_colormap(np.int32(11)) == 11
    assert {"jet", "viridis", "turbo", "inferno"} <= set(COLORMAPS)
    with pytest.raises(ValueError, match=r"unknown colormap 'jett'; expected one of .*\bjet\b.*\bviridis\b"):
        resolve_colormap("jett")
    with pytest.raises(ValueError, match="unknown colormap constant 999"):
        resolve_colormap(999)
    with pytest.raises(TypeError, match="got 1.5"):
        resolve_colormap(1.5)
    with pytest.raises(TypeError, match="got True"):
        resolve_colormap(True)


# ------------------------------------------------------------------ overlay


def test_non_square_peak_lands_where_the_map_peaks():
    h, w = 20, 36  # H != W: a (height, width) dsize would put the heat in the wrong place
    cam = np.zeros((5, 9), np.float32)
    cam[1, 7] = 1.0  # off-centre: top right
    # The centre of map cell (1, 7) in image pixels (pixel centres at integer + 0.5):
    cy, cx = (1 + 0.5) * h / 5 - 0.5, (7 + 0.5) * w / 9 - 0.5  # (5.5, 29.5)

    hot = overlay(np.zeros((h, w, 3), np.uint8), cam, colormap="hot", alpha=1.0).astype(int)
    assert hot.shape == (h, w, 3)
    # "hot" is monotonic in every channel, so the brightest pixel is the hottest.
    y, x = np.unravel_index(np.argmax(hot.sum(axis=-1)), (h, w))
    assert abs(y - cy) <= 1 and abs(x - cx) <= 1
    assert hot.sum(axis=-1)[h - 1 - 5, w - 1 - 29] == 0  # the mirrored spot is cold

    jet = overlay(np.zeros((h, w, 3), np.uint8), cam, colormap="jet", alpha=1.0)
    ys, xs = np.nonzero(np.all(jet == JET_TOP, axis=-1))  # jet's top colour, RGB (not BGR)
    assert len(ys) > 0 and np.all(np.abs(ys - cy) <= 1) and np.all(np.abs(xs - cx) <= 1)
    assert tuple(jet[h - 1, 0]) == JET_ZERO  # far corner: no heat


def test_blend_arithmetic_and_flat_maps():
    img = np.full((5, 6, 3), 100, np.uint8)
    for flat in (np.zeros((2, 3)), np.full((2, 3), 5.0), -np.ones((2, 3)), np.array([[-9.0, 0, 0], [0, 0, -1]])):
        out = overlay(img, flat, alpha=0.5)
        # Flat after the ReLU: no heat, jet's zero colour everywhere, never NaN garbage.
        assert np.all(out == np.array([50, 50, 114], np.uint8))  # rint(0.5*100 + 0.5*(0, 0, 128))
    cam = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(overlay(img, cam, alpha=0.0), img)
    heat = overlay(img, cam, alpha=1.0)
    np.testing.assert_array_equal(overlay(np.zeros_like(img), cam, alpha=1.0), heat)
    expected = np.rint(0.3 * heat.astype(np.float32) + 0.7 * img.astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(overlay(img, cam, alpha=0.3), expected)


def test_relu_and_scale_invariance():
    img = rgb(8, 8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0], cam[3, 3] = 1.0, -50.0  # the negative peak must get no heat
    out = overlay(img, cam, colormap="hot", alpha=1.0).astype(int).sum(axis=-1)
    assert out[0, 0] == 255 * 3 and out[7, 7] == 0
    np.testing.assert_array_equal(overlay(img, cam), overlay(img, cam * 1024.0))
    np.testing.assert_array_equal(overlay(img, cam), overlay(img, cam.astype(np.float64)))


def test_overlay_accepts_chw_float_images():
    img = rgb(10, 12)
    chw = np.moveaxis(img, -1, 0).astype(np.float32) / 255.0
    cam = rgb(3, 3)[:, :, 0].astype(np.float32)
    np.testing.assert_array_equal(overlay(chw, cam), overlay(img, cam))


def test_overlay_argument_errors():
    img = rgb(5, 6)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        overlay(img, np.ones((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, np.ones((2, 2)), alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha must be a number"):
        overlay(img, np.ones((2, 2)), alpha="0.5")
    with pytest.raises(ValueError, match=r"cam_map must be a non-empty 2-D \(h, w\) array, got shape \(1, 2, 2\)"):
        overlay(img, np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        overlay(img, np.ones((2, 2)), colormap="nope")


# ------------------------------------------------------------------ cards


def test_tiny_images_are_upscaled_and_panels_are_exact():
    img = rgb(28, 28)
    maps = np.random.default_rng(1).standard_normal((3, 7, 7)).astype(np.float32)
    card = render_card(img, maps, explained_variance=[0.623, 0.2, 0.05], label="7", pred="7")
    assert card.dtype == np.uint8 and card.ndim == 3 and card.shape[2] == 3
    up = np.repeat(np.repeat(img, 5, axis=0), 5, axis=1)  # smallest integer factor reaching 128: 5 -> 140
    (y0,) = find_rows(card, up, x=4)
    assert card.shape[1] == 4 + 140 + 16 + 140 + 4  # a 2 x 2 card: input, PC1 / PC2, PC3
    assert y0 > 10  # titles above the panels
    cells = [(4, y0), (160, y0)]
    (y1,) = find_rows(card, overlay(up, maps[1]), x=4)
    assert y1 > y0 + 140 + 10  # the second row, under its own titles
    cells += [(4, y1), (160, y1)]
    np.testing.assert_array_equal(card[y0:y0 + 140, 4:144], up)
    for i in range(3):
        x, y = cells[i + 1]
        np.testing.assert_array_equal(card[y:y + 140, x:x + 140], overlay(up, maps[i]))
    assert card.shape[0] - (y1 + 140) > 20  # the caption, under the panels


@pytest.mark.parametrize("hw", [(28, 28), (64, 64), (224, 224), (64, 128)])
def test_card_is_near_square_and_its_text_is_legible_in_the_preview(hw):
    img = rgb(*hw)
    maps = np.random.default_rng(2).random((3, 7, 7)).astype(np.float32)
    kw = dict(explained_variance=[0.623, 0.2, 0.05], sample_id="0123456789ab")
    card = render_card(img, maps, label="7", pred="1", **kw)
    height, width = card.shape[:2]
    assert 0.7 <= width / height <= 1.5, card.shape
    # Text in MLflow's preview (longer side 256 px): measured on the pixels of the preview,
    # as the height of the caption's first line (dark text on white; "true: 7  pred: 1" has
    # no descenders, so this is the height of the digits and capitals).
    preview = np.asarray(Image.open(io.BytesIO(encode_webp_preview(card))).convert("RGB"))
    plain = render_card(img, maps, label=None, pred=None, **kw)  # the id line only
    geo = card_layout(_panel_of(hw), 4)
    scale = preview.shape[0] / height
    top, line = geo["caption_top"], geo["line"]
    band = preview[int(top * scale):int((top + line) * scale) + 1, int(8 * scale):]
    dark_rows = np.nonzero((band.min(axis=-1) < 120).any(axis=1))[0]
    assert dark_rows.size and dark_rows.max() - dark_rows.min() + 1 >= 7  # cap height
    assert geo["font_size"] * scale >= 9.5  # the font's size (em) in preview pixels
    assert plain.shape == card.shape


def _panel_of(hw):
    return panel_size(hw[0], hw[1], 128, 512)


def test_card_geometry_k1_k2_and_long_captions():
    img = rgb(32, 32)
    one = render_card(img, np.ones((1, 4, 4), np.float32), label="a", pred="b", sample_id="x")
    two = render_card(img, np.random.default_rng(3).random((2, 4, 4)), label="a", pred="b")
    assert one.shape[1] == two.shape[1] == 4 + 128 + 16 + 128 + 4  # two columns
    assert two.shape[0] > one.shape[0] + 128  # two rows
    # k = 2: the fourth cell is empty (white, title included).
    x, y, w, h = card_layout((128, 128), 3)["boxes"][2]
    assert np.all(two[y - 4 - 20:y + h, x + w + 16:] == 255)
    # A caption too long for one line goes on two, the mark stays visible.
    long = render_card(img, np.ones((1, 4, 4), np.float32), label="golden retriever " * 3,
                        pred="Labrador retriever " * 3, sample_id="0123456789ab")
    assert long.shape == one.shape
    assert count_colour(long[-30:], WRONG_RED) > 5


@pytest.mark.parametrize(
    "hw, panel",
    [((200, 300), (200, 300)), ((20, 36), (140, 252)), ((600, 800), (384, 512)), ((20, 2000), (5, 512))],
)
def test_panel_sizes(hw, panel):
    card = render_card(rgb(*hw), np.ones((1, 4, 4), np.float32))
    assert card.shape[1] == 4 + panel[1] + 16 + panel[1] + 4  # a card's two columns
    assert card.shape[0] > panel[0]


def test_caption_mark_colours():
    img, maps = rgb(32, 32), np.ones((2, 4, 4), np.float32)
    right = render_card(img, maps, label="cat", pred="cat")
    wrong = render_card(img, maps, label="cat", pred="dog")
    forced = render_card(img, maps, label="cat", pred="dog", correct=True)
    none = render_card(img, maps)
    caption = slice(-20, None)  # the caption line, under the panels
    assert count_colour(right[caption], OK_GREEN) > 5 and count_colour(right[caption], WRONG_RED) == 0
    assert count_colour(wrong[caption], WRONG_RED) > 5 and count_colour(wrong[caption], OK_GREEN) == 0
    assert count_colour(forced[caption], OK_GREEN) > 5
    assert none.shape[0] < right.shape[0]  # no caption line when there is nothing to say
    assert right.shape == wrong.shape
    # Only the caption and the left margin bar differ: panels and titles are the same pixels.
    np.testing.assert_array_equal(right[: none.shape[0] - 4, 4:], none[: none.shape[0] - 4, 4:])
    assert not np.array_equal(right, wrong)
    bar = slice(4, right.shape[0] - 4)
    assert np.all(right[bar, :3] == OK_GREEN) and np.all(wrong[bar, :3] == WRONG_RED)
    assert np.all(none[:, :4] == 255)


def test_text_is_drawn_and_does_not_widen_the_card():
    img, maps = rgb(32, 32), np.ones((1, 4, 4), np.float32)
    short = render_card(img, maps, label="a", pred="b", sample_id="0123456789ab")
    long = render_card(img, maps, label="x" * 500, pred="y" * 500, sample_id="0123456789ab")
    assert short.shape == long.shape
    dark = lambda a: int((a.max(axis=-1) < 100).sum())  # noqa: E731
    assert dark(long[-20:]) > dark(short[-20:])  # more text, clipped to the width
    # Titles: different explained variance, different title pixels, same panel pixels.
    a = render_card(img, maps, explained_variance=[0.1])
    b = render_card(img, maps, explained_variance=[0.9])
    diff_rows = np.nonzero(np.any(a != b, axis=(1, 2)))[0]
    assert len(diff_rows) and diff_rows.max() < 20


def test_card_without_components_and_errors():
    img = rgb(130, 140)
    card = render_card(img, np.zeros((0, 4, 4), np.float32))
    assert card.shape[1] == 4 + 140 + 4 and find_rows(card, img, x=4)
    with pytest.raises(ValueError, match="explained_variance has 2 values for 3 maps"):
        render_card(img, np.ones((3, 4, 4)), explained_variance=[0.5, 0.2])
    with pytest.raises(ValueError, match=r"maps must be \(k, h, w\)"):
        render_card(img, np.ones((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="min_side must be >= 1, got 0"):
        render_card(img, np.ones((1, 4, 4)), min_side=0)
    with pytest.raises(ValueError, match=r"max_side \(64\) must be >= min_side \(128\)"):
        render_card(img, np.ones((1, 4, 4)), max_side=64)


def test_same_inputs_same_card_and_bytes():
    img = rgb(28, 36, seed=3)
    maps = np.random.default_rng(4).standard_normal((3, 7, 9)).astype(np.float32)
    kw = dict(explained_variance=[0.5, 0.25, 0.125], label="cat", pred="dog", sample_id="abcdefabcdef")
    s1, s2 = render_card(img, maps, **kw), render_card(img.copy(), maps.copy(), **kw)
    np.testing.assert_array_equal(s1, s2)
    assert encode_png(s1) == encode_png(s2)


def test_png_bytes_are_the_same_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import hashlib, numpy as np
        from mlflow_eigencam.render import render_card, render_grid, encode_png
        img = np.arange(28 * 36 * 3, dtype=np.uint8).reshape(28, 36, 3)
        maps = np.sin(np.arange(3 * 7 * 9, dtype=np.float32)).reshape(3, 7, 9)
        s = render_card(img, maps, explained_variance=[0.5, 0.25, 0.125], label="cat", pred="dog")
        print(hashlib.sha256(encode_png(render_grid([s, s], epoch=2, mode="eval", ds_id="ds1"))).hexdigest())
        """
    )
    img = np.arange(28 * 36 * 3, dtype=np.uint8).reshape(28, 36, 3)
    maps = np.sin(np.arange(3 * 7 * 9, dtype=np.float32)).reshape(3, 7, 9)
    s = render_card(img, maps, explained_variance=[0.5, 0.25, 0.125], label="cat", pred="dog")
    here = hashlib.sha256(encode_png(render_grid([s, s], epoch=2, mode="eval", ds_id="ds1"))).hexdigest()
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},  # another set/dict order than this process
    ).stdout.strip()
    assert there == here


# ------------------------------------------------------------------ grids


def test_grid_lays_cards_out_four_per_row():
    cards = [rgb(50, 300, seed=i) for i in range(5)] + [rgb(60, 320, seed=9)]
    grid = render_grid(cards, epoch=3, mode="eval", ds_id="ds1")
    assert grid.shape[1] == 4 * 320 + 3 * 8  # four cells as wide as the widest card, 8 px apart
    (y0,) = find_rows(grid, cards[0], x=0)
    assert y0 > 10  # under the header
    for i in range(1, 4):
        assert find_rows(grid, cards[i], x=i * 328) == [y0]  # the first row, left to right
    assert np.all(grid[y0:y0 + 50, 300:320] == 255)  # a narrower card is padded with white
    (y1,) = find_rows(grid, cards[4], x=0)
    assert y1 >= y0 + 50 + 8  # the second row, under a gap
    assert find_rows(grid, cards[5], x=328) == [y1]
    assert np.all(grid[y1:, 2 * 328:] == 255)  # the rest of the last row is white
    assert grid.shape[0] == y1 + 60 + 1


def test_grid_header_text():
    card = rgb(40, 400)
    g1 = render_grid([card], epoch=1, mode="eval", ds_id="ds1")
    g2 = render_grid([card], epoch=2, mode="eval", ds_id="ds1")
    g3 = render_grid([card], epoch=1, mode="eval", ds_id=None)
    assert g1.shape == g2.shape == g3.shape
    (y,) = find_rows(g1, card, x=0)
    header = slice(0, y - 1)
    assert (g1[header].max(axis=-1) < 100).sum() > 50  # dark text on white
    assert not np.array_equal(g1[header], g2[header]) and not np.array_equal(g1[header], g3[header])
    np.testing.assert_array_equal(g1[y:], g2[y:])
    # A wide header widens a narrow grid instead of being cut.
    narrow = render_grid([rgb(10, 10)], epoch=123456, mode="infer", ds_id="a-long-dataset-name")
    assert narrow.shape[1] > 100


def test_grid_errors():
    with pytest.raises(ValueError, match="at least one card"):
        render_grid([], epoch=0, mode="eval", ds_id=None)
    with pytest.raises(ValueError, match=r"card 1 must be \(H, W, 3\) uint8, got shape \(4, 4, 3\) dtype float32"):
        render_grid([rgb(4, 4), np.zeros((4, 4, 3), np.float32)], epoch=0, mode="eval", ds_id=None)


# ------------------------------------------------------------------ PNG


def png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        crc = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        assert crc == zlib.crc32(data[pos + 4 : pos + 8 + length])
        kinds.append(kind.decode())
        pos += 12 + length
    return kinds


def test_encode_png_round_trips_without_metadata():
    img = rgb(17, 23)
    data = encode_png(img)
    assert data == encode_png(img.copy()) == encode_png(np.asfortranarray(img))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
    assert set(png_chunks(data)) == {"IHDR", "IDAT", "IEND"}  # no tIME / tEXt: bytes depend on pixels only
    grey = img[:, :, 0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(grey)))), grey)
    with pytest.raises(TypeError, match="uint8"):
        encode_png(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(17, 23, 4\)"):
        encode_png(np.zeros((17, 23, 4), np.uint8))


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (31, 45, 3), (5, 8), (64, 3)])
def test_encode_png_decodes_exactly_in_pillow(shape):
    # Random pixels exercise the Up filter's wrap-around (row differences modulo 256).
    img = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    data = encode_png(img)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
    with pytest.raises(ValueError, match=r"\(0, 4, 3\)"):
        encode_png(np.zeros((0, 4, 3), np.uint8))


def test_grid_from_bands_decodes_to_render_grid():
    from mlflow_eigencam.render import PNGBand, grid_bands

    wide = render_card(rgb(20, 36), np.random.default_rng(1).random((2, 5, 9)), label="a", pred="b")
    narrow = render_card(rgb(20, 20), np.random.default_rng(2).random((1, 5, 5)))
    cards = [PNGBand(wide), PNGBand(narrow), PNGBand(wide)] * 2
    assert encode_png([cards[0]]) == encode_png(wide)
    bands = grid_bands(cards, epoch=4, mode="eval", ds_id="val")
    data = encode_png(bands)
    expected = render_grid([wide, narrow, wide] * 2, epoch=4, mode="eval", ds_id="val")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)
    with pytest.raises(ValueError, match="share width"):
        encode_png([PNGBand(wide), PNGBand(narrow)])


# ------------------------------------------------------------------ card geometry


@pytest.mark.parametrize("shape, k, caption", [((32, 32), 2, True), ((20, 36), 3, True),
                                               ((32, 32), 1, False), ((64, 128), 3, True),
                                               ((30, 20), 0, True)])
def test_card_geometry_boxes_are_exactly_the_drawn_panels(shape, k, caption):
    from mlflow_eigencam import eigencam

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    maps = eigencam(rng.normal(size=(1, 6, 5, 9)).astype(np.float32), max(k, 1)).maps[0][:k]
    kwargs = {"label": "cat", "pred": "dog", "sample_id": "abc"} if caption else {}
    card = render_card(image, maps, explained_variance=[0.5] * k, **kwargs)
    geo = card_geometry(shape, k, caption=caption)
    assert geo["size"] == list(card.shape[:2])
    assert geo["titles"] == ["input"] + [f"PC{c + 1}" for c in range(k)]
    boxes = geo["boxes"]
    assert len(boxes) == k + 1 and all(type(v) is int for b in boxes for v in b)  # JSON-able
    if k == 3:  # 2 x 2
        assert boxes[0][1] == boxes[1][1] < boxes[2][1] == boxes[3][1]
    x, y, w, h = boxes[0]
    factor = int(np.ceil(128 / min(shape)))
    base = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    assert (h, w) == base.shape[:2]
    assert np.array_equal(card[y:y + h, x:x + w], base)
    for c in range(k):
        x, y, w, h = boxes[c + 1]
        assert np.array_equal(card[y:y + h, x:x + w], overlay(base, maps[c], layout="HWC"))
