import pytest
import torch

from coursekit.embeddings import sinusoidal_embedding
from coursekit.mlp import MLPDenoiser
from coursekit.unet import UNet, UNetConfig, count_parameters


@pytest.mark.parametrize("size", [16, 28, 32, 15, 9])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input_shape(size, channels):
    model = UNet(in_channels=channels, base_channels=8)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_mnist_sizes_go_28_14_7_and_back():
    model = UNet(in_channels=1, base_channels=8, channel_multipliers=(1, 2, 2))
    seen = []
    for level in model.down_levels:
        level.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    model(torch.randn(1, 1, 28, 28), torch.tensor([5]))
    assert seen == [28, 14, 7]


def _randomise_head(model):
    # The head starts at zero (so training starts from "predict no noise"), which also blocks
    # gradients to everything before it on the first step; give it weights for these tests.
    torch.nn.init.normal_(model.head.weight, std=0.1)


def test_every_parameter_receives_a_gradient():
    model = UNet(in_channels=3, base_channels=8, num_classes=4, attention_levels=(1,), num_res_blocks=2)
    _randomise_head(model)
    x = torch.randn(4, 3, 12, 12)
    labels = torch.tensor([0, 3, 4, 4])  # 4 = the "no label" token
    model(x, torch.tensor([1, 50, 500, 999]), class_labels=labels).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_a_class_label_changes_the_output():
    model = UNet(base_channels=8, num_classes=10)
    _randomise_head(model)
    x, t = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1), torch.tensor([10, 10])
    out = model(x, t, class_labels=torch.tensor([3, 7]))
    assert not torch.allclose(out[0], out[1])
    unlabelled = model(x, t)  # no labels: the "no label" token
    assert torch.allclose(unlabelled, model(x, t, class_labels=torch.full((2,), model.null_label)))


def test_the_timestep_changes_the_output():
    model = UNet(base_channels=8)
    _randomise_head(model)
    x = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([0, 900]))
    assert not torch.allclose(out[0], out[1])


def test_wrong_input_raises_clear_errors():
    model = UNet(in_channels=1, base_channels=8)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.randn(1, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]), class_labels=torch.tensor([0, 1]))
    conditional = UNet(base_channels=8, num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        conditional(torch.randn(1, 1, 8, 8), torch.tensor([0]), class_labels=torch.tensor([7]))
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_multipliers=(1, 2), attention_levels=(2,))


def test_width_and_depth_are_configurable():
    small = count_parameters(UNet(base_channels=8))
    wide = count_parameters(UNet(base_channels=16))
    deep = count_parameters(UNet(base_channels=8, num_res_blocks=2))
    assert small < wide and small < deep
    config = UNetConfig(base_channels=8)
    assert UNet(config, num_classes=2).config.num_classes == 2


def test_sinusoidal_embedding_is_smooth_and_distinct():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 500]), 32)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb[0], torch.cat([torch.zeros(16), torch.ones(16)]))
    assert (emb[0] - emb[1]).norm() < (emb[0] - emb[2]).norm()
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(torch.tensor([1]), 7)


def test_mlp_denoiser_shapes_and_errors():
    model = MLPDenoiser()
    assert model(torch.randn(5, 2), torch.arange(5)).shape == (5, 2)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(5, 3), torch.arange(5))


def test_a_condition_vector_stands_in_for_the_label_lookup():
    model = UNet(num_classes=3, base_channels=8, channel_multipliers=(1, 2)).eval()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide any difference
    x_t, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 700])
    labels = torch.tensor([0, 2])
    vectors = model.class_embedding(labels)
    with torch.no_grad():
        assert torch.allclose(model(x_t, t, condition=vectors), model(x_t, t, class_labels=labels), atol=1e-6)
        assert not torch.allclose(model(x_t, t, condition=vectors.flip(0)), model(x_t, t, class_labels=labels))
    with pytest.raises(ValueError, match="one embedding vector per image"):
        model(x_t, t, condition=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="not both"):
        model(x_t, t, class_labels=labels, condition=vectors)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(base_channels=8)(x_t, t, condition=torch.zeros(2, 32))


def test_a_float64_unet_runs_and_agrees_with_float32():
    torch.manual_seed(0)
    model = UNet(base_channels=8)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        single = model(x, t)
        double = model.double()(x.double(), t)
    assert double.dtype == torch.float64
    assert torch.allclose(double.float(), single, atol=1e-5)


def test_unet_shapes_and_the_diagram_follow_the_network():
    import matplotlib

    matplotlib.use("Agg")
    from coursekit.plots import draw_unet, unet_shapes

    model = UNet(in_channels=1, base_channels=32, channel_multipliers=(1, 2, 2), attention_levels=(-1,))
    shapes = unet_shapes(model, image_size=16)
    assert list(shapes) == ["stem", "down 0", "down 1", "down 2", "middle", "up 0", "up 1", "up 2", "head"]
    assert shapes["stem"] == (32, 16, 16) and shapes["down 1"] == (64, 8, 8) and shapes["down 2"] == (64, 4, 4)
    assert shapes["middle"] == (64, 4, 4) and shapes["up 0"] == (64, 4, 4) and shapes["up 2"] == (32, 16, 16)
    assert shapes["head"] == (1, 16, 16)
    assert unet_shapes(model, image_size=28)["down 2"] == (64, 7, 7)  # MNIST: 28 -> 14 -> 7
    ax = draw_unet(model, image_size=16)
    labels = " ".join(text.get_text() for text in ax.texts)
    for name, (channels, height, width) in shapes.items():
        assert f"{channels} x {height} x {width}" in labels, name
    assert "attention" in labels
