"""A run folder: train a diffusion model on a dataset, load it back, sample from it.

This is the glue the command line and the later notebooks use; each piece it calls is built in
its own notebook first. A run folder holds ``checkpoint.pt`` (weights, EMA weights, optimizer,
RNG states, and the model, schedule and dataset settings needed to rebuild everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coursekit.checkpoints import CheckpointError, float_weights, load_checkpoint, load_model_weights
from coursekit.data import ImageDataset
from coursekit.device import pick_device
from coursekit.flow import FLOW_DEFAULT_NUM_STEPS, FLOW_SAMPLERS, FlowModel, flow_loss, time_grid
from coursekit.losses import diffusion_loss
from coursekit.progress import progress_bar
from coursekit.samplers import SAMPLERS, get_sampler, planned_timesteps, with_guidance
from coursekit.schedules import NoiseSchedule, make_schedule
from coursekit.training import CHECKPOINT_NAME, TrainConfig, TrainState, train
from coursekit.unet import UNet, UNetConfig

OBJECTIVES = ("eps", "flow")
SHIPPED_CHECKPOINT = Path(__file__).parent / "assets" / "digits_unet.pt"
SHIPPED_CONDITIONAL_CHECKPOINT = Path(__file__).parent / "assets" / "digits_unet_conditional.pt"
SHIPPED_ONE_STEP_CHECKPOINT = Path(__file__).parent / "assets" / "digits_unet_one_step.pt"
SHIPPED_TEXT_TO_IMAGE_CHECKPOINT = Path(__file__).parent / "assets" / "glyphs_text_to_image.pt"
DISTILL_STEPS_PER_ROUND = 400


@dataclass
class LoadedRun:
    """A trained model read back from a run folder."""

    model: UNet | FlowModel  # with the EMA weights, in eval mode
    schedule: NoiseSchedule
    metadata: dict  # dataset name, image shape, class names, model and schedule settings
    step: int  # training steps behind these weights
    loss_history: list  # (step, mean loss) pairs

    @property
    def objective(self) -> str:
        """What the model learned: "eps" (the noise, sampled by ddpm, ddim, dpm++2m) or "flow" (a
        flow-matching velocity, sampled by euler or heun)."""
        return self.metadata.get("objective", "eps")

    @property
    def prediction(self) -> str:
        """What a diffusion model outputs: "eps" (the noise; the default), "x0" or "v" (distilled students)."""
        return self.metadata.get("prediction", "eps")

    @property
    def sampling_timesteps(self) -> list[int] | None:
        """A distilled student's own DDIM timesteps (it was trained for exactly these), else None."""
        return self.metadata.get("sampling_timesteps")

    def sampling_options(self, sampler: str | None = None, num_steps: int | None = None) -> dict:
        """The keywords of :func:`generate` that this run needs: its sampler, and for a distilled student
        its prediction and timesteps. Refuses, with what to do instead, what the run cannot do."""
        sampler = sampler or default_sampler(self.model)
        check_sampler_fits(self.model, sampler)
        if self.sampling_timesteps is None:
            return {"sampler": sampler, "num_steps": num_steps, "prediction": self.prediction}
        count = len(self.sampling_timesteps)
        if sampler != "ddim" or num_steps not in (None, count):
            raise ValueError(
                f"this student was distilled for DDIM with {count} step(s): sample it with --sampler ddim "
                f"--steps {count}, or load the round distilled for the steps you want"
            )
        return {"sampler": "ddim", "timesteps": self.sampling_timesteps, "prediction": self.prediction}


def train_diffusion(
    dataset: ImageDataset,
    run_dir: str | Path,
    model_config: UNetConfig | None = None,
    schedule_name: str = "cosine",
    num_timesteps: int = 1000,
    train_config: TrainConfig | None = None,
    conditional: bool = False,
    label_dropout: float = 0.1,
    callback=None,
    extra_metadata: dict | None = None,
    objective: str = "eps",
) -> TrainState:
    """Train a U-Net noise predictor on ``dataset`` into ``run_dir`` (resuming if it holds a run).

    ``objective="flow"`` trains the same U-Net to predict the flow-matching velocity instead
    (:mod:`coursekit.flow`, notebook 06); the schedule is then unused by training and sampling.

    ``dataset`` is an :class:`ImageDataset`, or anything with its fields (``images``, ``labels``,
    ``name``, ``class_names``, ``image_shape``, ``num_classes``), such as the latent codes of
    notebook 09. ``extra_metadata`` is stored in the checkpoint beside the model settings.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    channels = dataset.image_shape[0]
    model_config = model_config or UNetConfig(in_channels=channels)
    if model_config.in_channels != channels:
        raise ValueError(f"the model expects {model_config.in_channels} channels, the data has {channels}")
    if conditional and model_config.num_classes is None:
        model_config = UNetConfig(**{**model_config.to_dict(), "num_classes": dataset.num_classes})
    model = UNet(model_config)
    schedule = make_schedule(schedule_name, num_timesteps)
    dropout = label_dropout if conditional else 0.0
    if objective == "flow":
        model = FlowModel(model)
        loss_fn = flow_loss(conditional=conditional, label_dropout=dropout, null_label=model_config.num_classes)
    else:
        loss_fn = diffusion_loss(
            schedule, conditional=conditional, label_dropout=dropout, null_label=model_config.num_classes
        )
    metadata = {
        "model_config": model_config.to_dict(),
        "schedule": {"name": schedule_name, "num_steps": num_timesteps},
        "dataset": dataset.name,
        "image_shape": list(dataset.image_shape),
        "class_names": list(dataset.class_names),
        "conditional": conditional,
        "objective": objective,
        **(extra_metadata or {}),
    }
    return train(model, dataset, loss_fn, train_config, run_dir=run_dir, callback=callback, metadata=metadata)


SHIPPED_RUNS = {
    "shipped": SHIPPED_CHECKPOINT,
    "shipped-conditional": SHIPPED_CONDITIONAL_CHECKPOINT,
    "shipped-one-step": SHIPPED_ONE_STEP_CHECKPOINT,
    "shipped-text-to-image": SHIPPED_TEXT_TO_IMAGE_CHECKPOINT,  # coursekit.text_to_image, sampled with --prompt
}  # names that --run accepts for the models inside coursekit


def checkpoint_path(run: str | Path) -> Path:
    """The checkpoint behind ``run``: a run folder's ``checkpoint.pt``, a checkpoint file itself, or one of
    the models that ship inside coursekit by name (:data:`SHIPPED_RUNS`: ``shipped-one-step``, ...)."""
    if str(run) in SHIPPED_RUNS and not Path(run).exists():
        return SHIPPED_RUNS[str(run)]
    return Path(run) if Path(run).is_file() else Path(run) / CHECKPOINT_NAME


def output_folder(run: str | Path) -> Path:
    """Where commands write what they make from ``run``: the run folder itself, the folder of a checkpoint
    file, or ``runs/<name>`` for a shipped model (never inside the installed package)."""
    if str(run) in SHIPPED_RUNS and not Path(run).exists():
        return Path("runs") / str(run)
    return Path(run).parent if Path(run).is_file() else Path(run)


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> LoadedRun:
    """Read a run folder's checkpoint back into a model (EMA weights) and its schedule (``run_dir`` may
    also name a checkpoint file or a shipped model: :func:`checkpoint_path`)."""
    return _load_model(checkpoint_path(run_dir), device)


def load_shipped_model(
    device: str | torch.device | None = None, conditional: bool = False, one_step: bool = False
) -> LoadedRun:
    """A small U-Net trained on the built-in digits that ships with coursekit (notebooks 04-11).

    ``conditional=True`` gives the one trained with class labels and label dropout (notebook 08);
    ``one_step=True`` the student distilled from the first down to one DDIM step (notebook 07).
    Made by ``python tools/make_shipped_checkpoint.py [--conditional]`` and
    ``python tools/make_distilled_checkpoint.py``; for learners who skip training.
    """
    if conditional and one_step:
        raise ValueError("the one-step model is unconditional: ask for conditional or one_step, not both")
    name = "shipped-conditional" if conditional else "shipped-one-step" if one_step else "shipped"
    return _load_model(SHIPPED_RUNS[name], device)


def _load_model(path: Path, device: str | torch.device | None) -> LoadedRun:
    payload = load_checkpoint(path)
    metadata = payload.get("metadata") or {}
    if "model_config" not in metadata or "schedule" not in metadata:
        raise CheckpointError(f"{path} holds no model settings; it was not written by train_diffusion")
    model = UNet(UNetConfig(**metadata["model_config"]))  # the config turns the stored lists back into tuples
    if metadata.get("objective", "eps") == "flow":
        model = FlowModel(model)
    load_model_weights(model, float_weights(payload["ema"]), path)
    schedule = make_schedule(metadata["schedule"]["name"], metadata["schedule"]["num_steps"])
    return LoadedRun(
        model.to(pick_device(device)).eval(),
        schedule,
        metadata,
        int(payload["step"]),
        payload.get("loss_history", []),
    )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    image_shape: tuple[int, int, int],
    count: int,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float | None = None,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 250,
    frames: int = 0,
    clip_x0: bool = True,
    progress: bool = True,
    prediction: str = "eps",
    timesteps: list[int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Draw ``count`` images in batches; returns ``(images on the CPU, frames)``.

    ``frames > 0`` keeps about that many snapshots of the first batch's trajectory (for a GIF).
    ``num_steps`` reaches every sampler (None: the sampler's own default, which for DDPM is every
    step), ``eta`` DDIM only; ``timesteps`` (instead of ``num_steps``) and ``prediction`` (what the
    model outputs) reach the diffusion samplers: a run's ``sampling_options()`` gives all of them.
    ``clip_x0`` keeps the x0 guesses and the results in the image range [-1, 1]; turn it off for
    latent codes (notebook 09), which live outside that range.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    is_flow = check_sampler_fits(model, sampler)
    options = {"num_steps": num_steps} if num_steps is not None else {}
    if timesteps is not None or prediction != "eps":
        if is_flow:
            raise ValueError("timesteps and prediction belong to the diffusion samplers; flow samplers take num_steps")
        options.update({"prediction": prediction} | ({"timesteps": list(timesteps)} if timesteps is not None else {}))
    if eta is not None:
        if sampler != "ddim":
            raise ValueError(f"eta is DDIM's option; the {sampler!r} sampler has none")
        options["eta"] = eta
    total_steps = len(timesteps) if timesteps is not None else count_sampling_steps(sampler, schedule, num_steps)
    keep_every = max(1, total_steps // frames) if frames else 0
    images, snapshots = [], []
    bar = progress_bar(total=count, desc=f"sampling ({sampler})", unit="img", disable=not progress)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        x_T = torch.randn((size, *image_shape), generator=generator).to(device)
        predictor = model
        if class_labels is not None:
            labels = torch.as_tensor(class_labels)[start : start + size].to(device)
            predictor = with_guidance(model, labels, guidance_scale)
        if start == 0 and frames:
            snapshots.append(x_T.cpu())
        if is_flow:  # a flow sampler needs no schedule: its time runs from 1 to 0
            steps = FLOW_SAMPLERS[sampler](predictor, x_T, generator=generator, clip_x0=clip_x0, **options)
        else:
            steps = get_sampler(sampler)(predictor, schedule, x_T, generator=generator, clip_x0=clip_x0, **options)
        for index, step in enumerate(steps):
            is_last = index + 1 == total_steps
            if start == 0 and frames and ((index + 1) % keep_every == 0 or is_last):
                snapshots.append(step.x.cpu())
        images.append((step.x.clamp(-1, 1) if clip_x0 else step.x).cpu())
        bar.update(size)
    bar.close()
    return torch.cat(images), snapshots


def distillation_config(max_steps: int = DISTILL_STEPS_PER_ROUND, **changes) -> TrainConfig:
    """The settings each round of :func:`distill_run` trains with unless told otherwise: a student starts as
    its teacher, so it needs a short warm-up, a small learning rate and a short EMA, not a long run."""
    settings = {"batch_size": 128, "learning_rate": 5e-4, "warmup_steps": 20, "ema_decay": 0.99, "log_every": 10}
    return TrainConfig(max_steps=max_steps, **{**settings, **changes})


def distill_run(
    run: LoadedRun,
    out_dir: str | Path,
    teacher_steps: int = 64,
    final_steps: int = 1,
    train_config: TrainConfig | None = None,
    dataset: ImageDataset | None = None,
):
    """Progressive distillation of a trained noise-predicting run (:mod:`coursekit.distill`): one run
    folder per round, ``out_dir/32-steps`` ... ``out_dir/01-steps``, each sampled with
    ``coursekit sample --run out_dir/01-steps --steps 1``. Yields each :class:`coursekit.distill.Round`."""
    from coursekit.data import load_dataset
    from coursekit.distill import progressive_distillation

    if run.objective != "eps" or run.prediction != "eps":
        raise ValueError("distill_run distils a noise-predicting run (objective 'eps'); this one is not")
    if run.metadata.get("conditional"):
        raise ValueError("distill_run distils unconditional runs; this one was trained with class labels")
    dataset = dataset or load_dataset(run.metadata["dataset"])
    train_config = train_config or distillation_config()
    metadata = {key: value for key, value in run.metadata.items() if key not in ("prediction", "sampling_timesteps")}
    yield from progressive_distillation(
        run.model, dataset, run.schedule, teacher_steps, final_steps, train_config,
        clip_x0=True, run_dir=out_dir, metadata=metadata,
    )  # fmt: skip


def default_sampler(model) -> str:
    """The sampler ``coursekit sample`` uses when none is named: DDIM, or Euler for a flow-matching model."""
    return "euler" if isinstance(model, FlowModel) else "ddim"


def count_sampling_steps(sampler: str, schedule: NoiseSchedule, num_steps: int | None = None) -> int:
    """How many steps ``sampler`` takes with ``num_steps`` (None: its default)."""
    if sampler in FLOW_SAMPLERS:
        return len(time_grid(num_steps or FLOW_DEFAULT_NUM_STEPS[sampler])) - 1
    return len(planned_timesteps(sampler, schedule, num_steps))


def check_sampler_fits(model, sampler: str) -> bool:
    """Refuse a sampler that cannot read this model's output; returns whether it is a flow sampler."""
    is_flow_model, is_flow_sampler = isinstance(model, FlowModel), sampler in FLOW_SAMPLERS
    if is_flow_model and not is_flow_sampler:
        raise ValueError(
            f"this model learned a flow-matching velocity: sample it with {' or '.join(FLOW_SAMPLERS)}, not {sampler!r}"
        )
    if is_flow_sampler and not is_flow_model:
        raise ValueError(
            f"{sampler!r} samples flow-matching models; this one predicts noise: use ddpm, ddim or dpm++2m"
        )
    if not is_flow_sampler and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS) + sorted(FLOW_SAMPLERS)}")
    return is_flow_sampler
