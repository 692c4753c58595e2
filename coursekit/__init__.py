"""coursekit: every piece the diffusion course builds, tested.

Read the modules in pipeline order: schedules -> forward -> losses -> embeddings, mlp, unet ->
samplers -> data -> plots (then training, checkpoints and quality; then latent and editing, the
pieces of part two).
"""

from coursekit.data import (
    DatasetDownloadError,
    ImageDataset,
    from_unit_range,
    load_dataset,
    make_points,
    to_unit_range,
)
from coursekit.device import pick_device
from coursekit.forward import add_noise, posterior_mean_variance, predict_x0
from coursekit.losses import noise_prediction_loss
from coursekit.mlp import MLPDenoiser
from coursekit.samplers import (
    ddim_sample,
    ddim_steps,
    ddpm_sample,
    ddpm_steps,
    dpm_solver_sample,
    dpm_solver_steps,
    with_guidance,
)
from coursekit.schedules import NoiseSchedule, make_schedule
from coursekit.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "DatasetDownloadError",
    "ImageDataset",
    "MLPDenoiser",
    "NoiseSchedule",
    "UNet",
    "UNetConfig",
    "add_noise",
    "ddim_sample",
    "ddim_steps",
    "ddpm_sample",
    "ddpm_steps",
    "dpm_solver_sample",
    "dpm_solver_steps",
    "from_unit_range",
    "load_dataset",
    "make_points",
    "make_schedule",
    "noise_prediction_loss",
    "pick_device",
    "posterior_mean_variance",
    "predict_x0",
    "to_unit_range",
    "with_guidance",
]
