from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coursekit.checkpoints import CheckpointError
from coursekit.data import ImageDataset, load_dataset
from coursekit.latent import (
    Autoencoder,
    AutoencoderConfig,
    LatentDataset,
    autoencoder_loss,
    decode_latents,
    encode_dataset,
    latent_unet_config,
    load_autoencoder,
    train_autoencoder,
    train_latent_diffusion,
)
from coursekit.runs import generate, load_run
from coursekit.training import TrainConfig
from coursekit.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_config(steps: int) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        batch_size=32,
        learning_rate=3e-3,
        warmup_steps=20,
        precision="fp32",
        device="cpu",
        progress=False,
        checkpoint_every_steps=None,
        checkpoint_every_minutes=None,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default autoencoder after 150 steps on the digits (about 2 s), and its codes."""
    digits, held_out = load_dataset("digits"), load_dataset("digits", train=False)
    run_dir = tmp_path_factory.mktemp("autoencoder")
    torch.manual_seed(0)  # the initial weights
    state = train_autoencoder(digits, run_dir, train_config=_train_config(150))
    autoencoder = load_autoencoder(run_dir)
    latents = encode_dataset(autoencoder, digits)
    return SimpleNamespace(
        digits=digits, held_out=held_out, run_dir=run_dir, state=state, autoencoder=autoencoder, latents=latents
    )


@pytest.fixture(scope="module")
def latent_run(trained, tmp_path_factory):
    """A tiny conditional latent diffusion run of a few steps on those codes."""
    run_dir = tmp_path_factory.mktemp("latent-diffusion")
    config = UNetConfig(in_channels=4, base_channels=8, channel_multipliers=(1, 2))
    train_latent_diffusion(
        trained.latents, trained.run_dir, run_dir, model_config=config, train_config=_train_config(3), conditional=True
    )
    return run_dir


# ----------------------------------------------------------------------------- the autoencoder


@pytest.mark.parametrize(
    ("channels", "size", "num_downsamples", "latent_shape"),
    [(1, 16, 2, (4, 4, 4)), (1, 28, 2, (4, 7, 7)), (3, 32, 3, (4, 4, 4))],
)
def test_codes_are_f_times_smaller_and_decode_to_the_image_shape(channels, size, num_downsamples, latent_shape):
    autoencoder = Autoencoder(in_channels=channels, base_channels=8, num_downsamples=num_downsamples)
    images = torch.rand(2, channels, size, size) * 2 - 1
    codes = autoencoder.encode(images)
    assert codes.shape == (2, *latent_shape)
    assert autoencoder.latent_shape((channels, size, size)) == latent_shape
    assert autoencoder.decode(codes).shape == images.shape
    assert autoencoder(images).shape == images.shape


def test_sizes_and_channels_that_do_not_fit_raise_clear_errors(tmp_path):
    autoencoder = Autoencoder(base_channels=8)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*num_downsamples = 4, got 15x15"):
        autoencoder.encode(torch.zeros(2, 1, 15, 15))
    with pytest.raises(ValueError, match=r"= 8, got 28x28"):
        Autoencoder(base_channels=8, num_downsamples=3).latent_shape((1, 28, 28))
    with pytest.raises(ValueError, match="1 channel"):
        autoencoder.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="batch dimension"):
        autoencoder.encode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        autoencoder.decode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        AutoencoderConfig(latent_channels=0)
    with pytest.raises(ValueError, match="num_downsamples"):
        AutoencoderConfig(num_downsamples=-1)
    with pytest.raises(ValueError, match="latent_noise"):
        autoencoder_loss(latent_noise=-0.1)
    odd = ImageDataset(torch.zeros(4, 1, 15, 15), torch.zeros(4, dtype=torch.long), ["blank"], "odd")
    with pytest.raises(ValueError, match="divisible"):
        train_autoencoder(odd, tmp_path, train_config=_train_config(1))
    assert list(tmp_path.iterdir()) == []  # refused before training: no half-made run folder


def test_decoded_images_always_lie_in_the_image_range():
    autoencoder = Autoencoder(base_channels=8)
    images = autoencoder.decode(100 * torch.randn(8, 4, 4, 4))  # codes far outside anything seen
    assert images.shape == (8, 1, 16, 16)
    assert images.min() >= -1 and images.max() <= 1  # the decoder ends in tanh


class _PerfectAutoencoder(nn.Module):
    """Codes are the images themselves: any reconstruction error is the latent noise."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents


def test_the_loss_of_a_perfect_autoencoder_is_the_variance_of_the_latent_noise():
    images = torch.rand(4096, 1, 4, 4) * 2 - 1
    labels = torch.zeros(4096, dtype=torch.long)
    perfect = _PerfectAutoencoder()
    assert autoencoder_loss(0.0)(perfect, (images,), torch.Generator().manual_seed(0)) == 0
    # E[(sigma * eps)^2] = sigma^2; 65,536 draws give the mean to about 0.6%
    loss = autoencoder_loss(0.3)(perfect, (images, labels), torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(0.09, rel=0.03)
    again = autoencoder_loss(0.3)(perfect, (images, labels), torch.Generator().manual_seed(0))
    assert torch.equal(loss, again)  # the noise comes from the generator alone


def test_without_latent_noise_the_loss_is_the_reconstruction_error():
    autoencoder = Autoencoder(base_channels=8)
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    loss = autoencoder_loss(0.0)(autoencoder, (images,), torch.Generator())
    torch.testing.assert_close(loss, F.mse_loss(autoencoder(images), images))


# ----------------------------------------------------------------------------- run folders


def test_a_short_training_reconstructs_held_out_digits(trained):
    held_out = trained.held_out.images
    mean_image = trained.digits.images.mean(dim=0, keepdim=True)
    baseline = F.mse_loss(mean_image.expand_as(held_out), held_out).item()  # about 0.18
    with torch.no_grad():
        error = F.mse_loss(trained.autoencoder(held_out), held_out).item()
    # Measured: about 0.007 after 150 steps (seeds 0 and 1), 25 times below the mean-image baseline
    assert error < 0.1 * baseline
    losses = [loss for _, loss in trained.state.loss_history]
    assert losses[-1] < losses[0] / 5


def test_a_trained_autoencoder_loads_back_identically(trained):
    loaded = load_autoencoder(trained.run_dir)
    assert not loaded.training and loaded.config == AutoencoderConfig()
    images = trained.held_out.images[:32]
    with torch.no_grad():
        assert torch.equal(loaded(images), trained.state.ema_model(images))
    # A run folder resumes like any other: the same settings continue, other settings are refused
    state = train_autoencoder(trained.digits, trained.run_dir, train_config=_train_config(150))
    assert state.step == 150
    with pytest.raises(CheckpointError, match="latent_noise"):
        train_autoencoder(trained.digits, trained.run_dir, train_config=_train_config(150), latent_noise=0.2)


def test_loading_an_autoencoder_from_the_wrong_folder_raises(tmp_path, latent_run):
    with pytest.raises(CheckpointError, match="no autoencoder checkpoint"):
        load_autoencoder(tmp_path)
    with pytest.raises(CheckpointError, match="diffusion model: load that with coursekit.runs.load_run"):
        load_autoencoder(latent_run)


# ----------------------------------------------------------------------------- latent codes


def test_encoded_dataset_has_unit_std_and_keeps_its_labels(trained):
    latents, digits, autoencoder = trained.latents, trained.digits, trained.autoencoder
    assert latents.images.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (latents.name, latents.image_shape, len(latents), latents.num_classes) == (
        "digits-latent",
        (4, 4, 4),
        len(digits),
        10,
    )
    assert torch.equal(latents.labels, digits.labels)
    picked = torch.tensor([0, 7, 500, len(digits) - 1])  # each code belongs to its own image and label
    with torch.no_grad():
        codes = autoencoder.encode(digits.images[picked]) * latents.scale
    torch.testing.assert_close(latents.images[picked], codes)
    # Batches do not change the codes
    few = digits.subset(torch.arange(50))
    torch.testing.assert_close(
        encode_dataset(autoencoder, few, batch_size=7, scale=latents.scale).images, latents.images[:50]
    )


def test_held_out_codes_keep_the_training_scale(trained):
    latents = trained.latents
    held_out = encode_dataset(trained.autoencoder, trained.held_out, scale=latents.scale)
    assert held_out.scale == latents.scale
    assert held_out.images.std().item() == pytest.approx(1.0, abs=0.1)  # close, not exactly 1
    own_scale = encode_dataset(trained.autoencoder, trained.held_out)
    assert own_scale.scale != latents.scale
    torch.testing.assert_close(held_out.images, own_scale.images * latents.scale / own_scale.scale)


def test_decoding_the_codes_gives_the_reconstructions(trained):
    latents, images = trained.latents, trained.digits.images[:64]
    decoded = decode_latents(trained.autoencoder, latents.images[:64], latents.scale, batch_size=10)
    with torch.no_grad():
        torch.testing.assert_close(decoded, trained.autoencoder(images), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        decode_latents(trained.autoencoder, latents.images[:4], scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        encode_dataset(trained.autoencoder, trained.held_out, scale=-1.0)
    with pytest.raises(ValueError, match="one label per code"):
        LatentDataset(latents.images, latents.labels[:5], latents.class_names, "bad", latents.scale)


# ----------------------------------------------------------------------------- diffusion on the codes


def test_the_default_latent_unet_denoises_4x4_codes():
    model = UNet(latent_unet_config(4))
    sizes = []
    for level in model.down_levels:
        level.register_forward_hook(lambda module, args, out: sizes.append(out.shape[-1]))
    codes = torch.randn(2, 4, 4, 4)
    assert model(codes, torch.tensor([0, 999])).shape == codes.shape
    assert sizes == [4, 2]


def test_a_latent_diffusion_run_stores_its_scale_and_samples_digits(trained, latent_run):
    run = load_run(latent_run)
    assert run.metadata["latent"] == {"scale": trained.latents.scale, "autoencoder_dir": str(trained.run_dir)}
    assert run.metadata["image_shape"] == [4, 4, 4] and run.metadata["dataset"] == "digits-latent"
    assert run.schedule.name == "linear"  # codes cannot be clipped, so not the cosine schedule (see its docstring)
    codes, _ = generate(
        run.model,
        run.schedule,
        tuple(run.metadata["image_shape"]),
        6,
        num_steps=4,
        class_labels=torch.arange(6),
        clip_x0=False,
        progress=False,
    )
    images = decode_latents(trained.autoencoder, codes, run.metadata["latent"]["scale"])
    assert images.shape == (6, *trained.digits.image_shape)
    assert images.min() >= -1 and images.max() <= 1


def test_codes_from_another_autoencoder_are_refused(trained, tmp_path):
    latents = trained.latents
    wrong = LatentDataset(torch.randn(8, 4, 2, 2), latents.labels[:8], latents.class_names, "other", 1.0)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        train_latent_diffusion(wrong, trained.run_dir, tmp_path, train_config=_train_config(1))
    assert list(tmp_path.iterdir()) == []


def test_generate_without_clipping_returns_latent_codes_uncut(latent_run):
    # Unit-std codes often lie outside [-1, 1]; generate must not clamp them when clip_x0=False.
    run = load_run(latent_run)
    codes, _ = generate(run.model, run.schedule, (4, 4, 4), 4, num_steps=4, clip_x0=False, progress=False)
    # A barely trained model predicts almost no noise, so DDIM scales x_T up far beyond 1
    assert codes.abs().max() > 1
