"""The captioned glyphs: drawn as their captions say, the same for the same seed, held-out pairs kept out."""

import pytest
import torch

from coursekit.data import load_dataset
from coursekit.glyphs import (
    COLOURS,
    HELD_OUT_PAIRS,
    SIZES,
    Glyph,
    Scene,
    make_glyphs,
    render,
    vocabulary,
)


def _ink_of(image: torch.Tensor, colour: str) -> torch.Tensor:
    """Pixels painted (mostly) in ``colour``: a (32, 32) boolean mask, from the drawn RGB values."""
    rgb = (image + 1) / 2
    target = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    painted = rgb.amax(dim=0) > 0.3
    closest = (rgb / rgb.amax(dim=0, keepdim=True).clamp(min=1e-6) - target / target.max()).abs().amax(dim=0) < 0.25
    return painted & closest


def _centre_and_height(mask: torch.Tensor) -> tuple[float, float, int]:
    rows, columns = torch.nonzero(mask, as_tuple=True)
    return rows.float().mean().item(), columns.float().mean().item(), int(rows.max() - rows.min() + 1)


def test_the_same_seed_draws_the_same_images_and_captions():
    first, again, other = make_glyphs(40, seed=3), make_glyphs(40, seed=3), make_glyphs(40, seed=4)
    assert torch.equal(first.images, again.images) and first.captions == again.captions
    assert first.captions != other.captions
    assert first.images.shape == (40, 3, 32, 32) and first.images.dtype == torch.float32
    assert first.images.min() >= -1 and first.images.max() <= 1 and first.images.min() == -1  # black background


@pytest.mark.parametrize("position", ["left", "right", "top", "bottom", "middle"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_a_glyph_is_drawn_where_its_caption_puts_it_at_its_size(position, size):
    scene = Scene((Glyph("4", "green", size=size, position=position, family="serif"),))
    row, column, height = _centre_and_height(_ink_of(render(scene), "green"))
    assert abs(height - SIZES[size]) <= 1
    expected_row = {"top": row < 14, "bottom": row > 18}.get(position, 12 <= row <= 20)
    expected_column = {"left": column < 14, "right": column > 18}.get(position, 12 <= column <= 20)
    assert expected_row and expected_column, (position, size, row, column)


def test_captions_follow_the_grammar_and_use_only_its_words():
    large_red = Glyph("3", "red", "large", "left", "bold", "italic")
    assert Scene((large_red,)).caption == "a large red bold italic 3 on the left"
    assert Scene((Glyph("7", "blue"), Glyph("2", "green")), "above").caption == "a blue 7 above a green 2"
    words = set(vocabulary())
    for caption in make_glyphs(300, seed=5, split="any").captions:
        assert set(caption.split()) <= words, caption


def test_two_glyphs_stand_as_their_relation_says():
    above = render(Scene((Glyph("1", "red"), Glyph("8", "blue")), "above"))
    left_of = render(Scene((Glyph("1", "red"), Glyph("8", "blue")), "left of"))
    red_row, red_column, _ = _centre_and_height(_ink_of(above, "red"))
    blue_row, blue_column, _ = _centre_and_height(_ink_of(above, "blue"))
    assert red_row + 8 < blue_row and abs(red_column - blue_column) < 3
    red_row, red_column, _ = _centre_and_height(_ink_of(left_of, "red"))
    blue_row, blue_column, _ = _centre_and_height(_ink_of(left_of, "blue"))
    assert red_column + 8 < blue_column and abs(red_row - blue_row) < 3


def test_held_out_pairs_never_appear_in_training_and_always_in_the_held_out_split():
    training = make_glyphs(2000, seed=0)
    assert not any(scene.held_out for scene in training.scenes)
    held_out = make_glyphs(200, seed=0, split="held_out")
    assert all(scene.glyphs[0].pair in HELD_OUT_PAIRS for scene in held_out.scenes)
    seen_pairs = {glyph.pair for scene in training.scenes for glyph in scene.glyphs}
    assert len(seen_pairs) == len(COLOURS) * 10 - len(HELD_OUT_PAIRS)  # every other pair does appear
    mixed = make_glyphs(1000, seed=0, split="any")
    assert 0 < sum(scene.held_out for scene in mixed.scenes) < 1000


def test_the_dataset_loads_like_the_others_and_splits_with_its_captions():
    held_out = load_dataset("glyphs", train=False)
    assert len(held_out) == 2000 and held_out.image_shape == (3, 32, 32) and held_out.num_classes == 10
    assert held_out.labels[0] == int(held_out.scenes[0].glyphs[0].character)
    training, rest = held_out.split(0.25, seed=0)
    assert len(training) == 1500 and len(rest) == 500
    assert all(scene.caption == caption for scene, caption in zip(rest.scenes, rest.captions))
    one_glyph = [index for index, scene in enumerate(held_out.scenes) if len(scene.glyphs) == 1]
    assert 0.65 < len(one_glyph) / len(held_out) < 0.85  # a quarter of the images hold two characters


def test_bad_scenes_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Glyph("3", "pink")
    with pytest.raises(ValueError, match="unknown character"):
        Glyph("x", "red")
    with pytest.raises(ValueError, match="need a relation"):
        Scene((Glyph("1", "red"), Glyph("2", "blue")))
    with pytest.raises(ValueError, match="count must be positive"):
        make_glyphs(0)
    with pytest.raises(ValueError, match="split must be"):
        make_glyphs(3, split="test")
