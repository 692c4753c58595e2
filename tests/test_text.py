"""Words in: the tokenizer, the text encoder, CLIP's loss, the mini-CLIP, and cross-attention in the U-Net."""

import math

import pytest
import torch

from coursekit.glyphs import make_glyphs, vocabulary
from coursekit.text import (
    MiniCLIP,
    TextConfig,
    TextEncoder,
    Tokenizer,
    caption_tensors,
    clip_loss,
    contrastive_loss,
    retrieval_accuracy,
)
from coursekit.training import TrainConfig, train
from coursekit.unet import CrossAttention, UNet, UNetConfig


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(vocabulary())


def test_captions_become_word_indices_ended_and_padded(tokenizer):
    ids = tokenizer.encode(["a red 3 on the left", ""])
    assert ids.shape == (2, 12) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [tokenizer.index[w] for w in "a red 3 on the left".split()] + [tokenizer.end_id]
    assert ids[0, 7:].tolist() == [tokenizer.pad_id] * 5
    assert ids[1].tolist() == [tokenizer.end_id] + [tokenizer.pad_id] * 11  # "no prompt": the end token alone
    assert tokenizer.decode(ids) == ["a red 3 on the left", ""]
    assert tokenizer.encode("A Red 3").tolist() == tokenizer.encode("a red 3").tolist()  # one caption, any case


def test_unknown_and_overlong_captions_are_refused_with_the_words_it_knows(tokenizer):
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['cat'\].*knows: a small large red"):
        tokenizer.encode("a red cat")
    with pytest.raises(ValueError, match="at most 11 fit"):
        tokenizer.encode(" ".join(["a"] * 12))


def test_the_text_encoder_ignores_padding_and_hears_every_word(tokenizer):
    torch.manual_seed(0)
    encoder = TextEncoder(TextConfig(len(tokenizer))).eval()
    ids = tokenizer.encode(["a large blue 7 at the top", "a blue 7 above a green 2"])
    tokens, pooled = encoder(ids)
    assert tokens.shape == (2, 12, 64) and pooled.shape == (2, 64)
    shorter_tokens, shorter_pooled = encoder(ids[:, :10])  # two fewer padding positions
    assert torch.allclose(shorter_pooled, pooled, atol=1e-5)
    assert torch.allclose(shorter_tokens, tokens[:, :10], atol=1e-5)
    _, other = encoder(tokenizer.encode(["a large blue 1 at the top", "a blue 7 above a green 3"]))
    assert (other - pooled).norm(dim=1).min() > 1e-3  # one word changed: each caption's vector moves


def test_clips_loss_is_log_b_for_no_information_and_zero_for_perfect_pairs():
    assert contrastive_loss(torch.zeros(8, 8)).item() == pytest.approx(math.log(8))
    assert contrastive_loss(50 * torch.eye(8)).item() < 1e-6
    swapped = 50 * torch.eye(8)[[1, 0, 2, 3, 4, 5, 6, 7]]  # two images matched with each other's captions
    assert contrastive_loss(swapped).item() == pytest.approx(2 * 50 / 8, rel=1e-3)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(4, 5))


def test_a_short_training_teaches_mini_clip_which_caption_belongs_to_which_image(tokenizer):
    torch.manual_seed(0)
    model = MiniCLIP(TextConfig(len(tokenizer)))
    config = TrainConfig(max_steps=150, batch_size=64, learning_rate=2e-3, warmup_steps=10, ema_decay=0.0,
                         precision="fp32", device="cpu", progress=False)  # fmt: skip
    train(model, caption_tensors(make_glyphs(3000, seed=0), tokenizer), clip_loss(), config)
    model.eval()
    held_out = make_glyphs(64, seed=1)
    images, ids = caption_tensors(held_out, tokenizer)
    accuracy = retrieval_accuracy(model, images, ids)
    assert accuracy > 0.25, accuracy  # chance: about 1 in 64
    matched = model.score(images, ids).mean()
    mismatched = model.score(images, ids.roll(1, dims=0)).mean()
    assert matched > mismatched + 0.1


def test_cross_attention_reads_real_tokens_and_never_padding():
    torch.manual_seed(0)
    block = CrossAttention(channels=16, context_dim=8, num_heads=2)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    out = block(x, context, mask)
    assert out.shape == x.shape
    maps = block.last_maps
    assert maps.shape == (2, 2, 16, 5)
    assert (
        torch.allclose(maps.sum(dim=-1), torch.ones(2, 2, 16))
        and maps[~mask[:, None, None, :].expand_as(maps)].abs().max() == 0
    )
    changed_padding = context.clone()
    changed_padding[0, 3:] = 100.0
    changed_padding[1, 1:] = -100.0
    assert torch.allclose(block(x, changed_padding, mask), out, atol=1e-6)
    changed_word = context.clone()
    changed_word[0, 1] += 1.0
    assert (block(x, changed_word, mask) - out)[0].abs().max() > 1e-4


def test_a_unet_with_cross_attention_hears_the_prompt_and_asks_for_it():
    torch.manual_seed(0)
    config = UNetConfig(in_channels=4, base_channels=16, channel_multipliers=(1, 2), attention_levels=(-1,),
                        context_dim=8, num_heads=2)  # fmt: skip
    model = UNet(config)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the head starts at zero: wake it to see the prompt's effect
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990])
    context, mask = torch.randn(3, 6, 8), torch.ones(3, 6, dtype=torch.bool)
    out = model(x_t, t, context=context, context_mask=mask)
    assert out.shape == x_t.shape
    other = context.clone()
    other[:, 2] += 1.0
    assert (model(x_t, t, context=other, context_mask=mask) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-5
    assert len(model.cross_attention_maps()) == 3  # the lowest level down, the middle, the lowest level up
    maps = model.word_maps(count=2)  # the finest level with cross-attention: 4x4 here, averaged over its blocks
    assert maps.shape == (2, 6, 4, 4) and torch.allclose(maps.sum(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    with pytest.raises(ValueError, match="no cross-attention weights yet"):
        UNet(config).word_maps()
    with pytest.raises(ValueError, match="reads a prompt: pass context"):
        model(x_t, t)
    with pytest.raises(ValueError, match=r"context must have shape \(3, L, 8\)"):
        model(x_t, t, context=torch.randn(3, 6, 5))
    with pytest.raises(ValueError, match="without cross-attention"):
        UNet(UNetConfig(in_channels=4))(x_t, t, context=context)


def test_without_context_dim_the_unet_keeps_its_weights_names():
    names = set(UNet(UNetConfig()).state_dict())
    assert not any("cross" in name for name in names)  # checkpoints made before cross-attention still load
