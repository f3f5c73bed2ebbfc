"""What a run's state is, and how it goes to and from a checkpoint's contents.

A run is its weights, the optimizer (SGD's momentum buffers), the OneCycle schedule, fp16's loss
scaler, every process's random generators, and its position: the step, the epoch and the sample
inside it where the next step begins, with the finished part of an interrupted epoch. Tensors go
to safetensors files; everything else is JSON in state.json. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer import checkpoint as ckpt
from trainer import schema
from trainer.config import ConfigError, TrainConfig
from trainer.errors import first_line

# In ema.safetensors beside the averaged weights: how many updates they hold (AveragedModel's n_averaged).
EMA_COUNT = "n_averaged"
# The fields a checkpoint must agree on with the run that resumes it: those that decide the numbers
# (TrainConfig's "recipe" and "selection" groups).
# What the run is (its model and data) comes first: a resume that names another model says so.
RECIPE_CHECKED = tuple(
    sorted(
        (f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] in ("recipe", "selection")),
        key=lambda name: name not in ("model", "dataset", "image_size"),
    )
)


@dataclass
class Position:
    """Where a run is: the next optimizer step, the next epoch (0-based) and the sample inside it."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0

    def advance(self, samples: int) -> None:
        """One optimizer step that consumed `samples` (all processes together) is done."""
        self.step, self.samples_in_epoch = self.step + 1, self.samples_in_epoch + samples

    def next_epoch(self) -> None:
        """The epoch is done: the next one begins at its first sample."""
        self.epoch, self.samples_in_epoch = self.epoch + 1, 0


@dataclass
class EpochStats:
    """The running statistics of the epoch under way, so that its metrics count every step once
    however often it was stopped and resumed.

    `steps` holds this process's per-step (loss, correct, gradient norm) on the training device
    (written without a host sync); `carry` / `carry_curve` hold what a checkpoint of another world
    size had done.
    """

    steps: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    filled: int = 0
    carry: Tensor = field(default_factory=lambda: torch.zeros(0, 3))
    carry_curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # the LR of each step of this epoch so far
    time_before: float = 0.0  # seconds of this epoch spent before the last resume or save

    @classmethod
    def empty(cls, steps: int, device: torch.device) -> EpochStats:
        return cls(steps=torch.zeros(steps, 3, device=device))

    def add(self, loss: Tensor, correct: Tensor, lr: float, grad_norm: Tensor | None) -> None:
        self.steps[self.filled, 0] = loss
        self.steps[self.filled, 1] = correct
        if grad_norm is not None:
            self.steps[self.filled, 2] = grad_norm
        self.lrs.append(lr)
        self.filled += 1

    def mine(self) -> Tensor:
        """This process's steps so far, [1, steps, 3], ready to be gathered."""
        return self.steps[: self.filled].unsqueeze(0)

    def summary(self, gathered: Tensor, samples_per_step: int) -> dict[str, Any]:
        """The finished epoch from every process's per-step stats ([processes, steps, 3], host):
        its loss and accuracy per sample (exact sums in double precision), the gradient norm's mean
        and maximum, and its curves."""
        rows = torch.cat([self.carry, gathered.reshape(-1, 3)]).tolist()
        samples = len(rows) * samples_per_step
        norms = [norm for _, _, norm in rows]
        return {
            "loss": math.fsum(loss for loss, _, _ in rows) * samples_per_step / samples,
            "acc": math.fsum(correct for _, correct, _ in rows) / samples,
            "samples": samples,
            "grad_norm_mean": math.fsum(norms) / len(norms),
            "grad_norm_max": max(norms),
            "curve": {"loss": self.carry_curve + gathered[:, :, 0].mean(dim=0).tolist(), "lr": list(self.lrs)},
        }


@dataclass
class Parts:
    """The live objects a checkpoint is taken from and restored into."""

    model: torch.nn.Module  # the plain module: no DDP or torch.compile wrapper
    optimizer: torch.optim.Optimizer  # the one accelerate wraps
    scheduler: Any  # torch's OneCycleLR, the one accelerate wraps
    scaler: Any  # fp16's GradScaler, or None
    ema: Any = None  # torch's AveragedModel of the weights (--ema), or None


def contents(
    parts: Parts,
    position: Position,
    stats: EpochStats,
    config: TrainConfig,
    metadata: dict[str, str],
    rng: dict[str, Tensor],
    progress: dict[str, Tensor],
    extra: dict[str, Any],
) -> ckpt.CheckpointContents:
    """A checkpoint's contents. `rng` holds every process's generators (gathered, [N, ...]);
    `progress` the interrupted epoch's per-step stats of every process, when mid-epoch."""
    from trainer import __version__

    opt_state = parts.optimizer.state_dict()
    # SGD's and AdamW's per-parameter state is all tensors (AdamW's step too).
    optimizer_tensors = {f"state.{pid}.{name}": value for pid, entry in opt_state["state"].items()
                         for name, value in entry.items()}  # fmt: skip
    mid_epoch = position.samples_in_epoch > 0
    state = {
        "format_version": ckpt.FORMAT_VERSION,
        "trainer_version": __version__,
        "step": position.step,
        "epoch": position.epoch,
        "samples_in_epoch": position.samples_in_epoch,
        "data_order": {"seed": config.seed, "rule": "randperm(n, seed * 1000003 + epoch)"},
        "config": config.to_dict(),
        "scheduler": schema.jsonable(parts.scheduler.state_dict()),
        "optimizer_param_groups": opt_state["param_groups"],
        "epoch_lrs": stats.lrs if mid_epoch else [],
        "epoch_loss_curve": (
            stats.carry_curve + progress["epoch_stats"][:, :, 0].mean(dim=0).tolist() if mid_epoch else []
        ),
        "epoch_time_before_s": stats.time_before if mid_epoch else 0.0,
        # fp16's loss scale and its growth tracker (plain numbers): a resumed fp16 run scales as the unbroken one.
        "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        **extra,  # world_size, limit_samples, mixed_precision, history, curves, data_digest, lineage
    }
    ema = {}
    if parts.ema is not None:  # the averaged weights and buffers, and how many updates they hold
        ema = {**parts.ema.module.state_dict(), EMA_COUNT: parts.ema.n_averaged}
    return ckpt.CheckpointContents(parts.model.state_dict(), metadata, optimizer_tensors, rng, progress, state, ema)


def check_recipe(folder: Path, saved: dict[str, Any], config: TrainConfig, how_to_branch: str) -> None:
    """A resumed run keeps its recipe: every recipe field must match the checkpoint's. (An image
    folder is compared by its contents, in `check_data`, wherever it lies now.)"""
    for name in RECIPE_CHECKED:
        then, now = saved[name], getattr(config, name)
        if name == "dataset" and then.startswith("imagefolder:") and now.startswith("imagefolder:"):
            continue
        if then != now:
            raise ConfigError(
                f"checkpoint {folder} was trained with {name}={then!r}, this run has {name}={now!r}; a resumed run "
                f"keeps its recipe ({how_to_branch})"
            )


def check_data(folder: Path, saved_digest: str | None, digest: str | None, config: TrainConfig) -> None:
    """An image folder is the same data set when its contents are, wherever it lies now; at the same
    path with other contents, it is not."""
    if saved_digest != digest:
        raise ConfigError(
            f"checkpoint {folder} was trained on other images than {config.dataset.split(':', 1)[1]} holds now; a "
            "resumed run keeps its data (train a new run on the changed folder)"
        )


def restore(folder: Path, loaded: ckpt.CheckpointContents, parts: Parts, rank: int) -> Position:
    """Loads weights, optimizer, schedule, scaler and this process's generators; returns the position.
    (A checkpoint of another world size gives process `rank` the generators of `rank % saved`.)"""
    state = loaded.state
    try:
        parts.model.load_state_dict(loaded.model)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(
            f"{folder / ckpt.MODEL_NAME} does not fit the model: {str(exc).strip().splitlines()[0]}"
        ) from None
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["optimizer_param_groups"]}
    for key, value in loaded.optimizer.items():
        _, pid, name = key.split(".", 2)
        opt_state["state"].setdefault(int(pid), {})[name] = value
    parts.optimizer.load_state_dict(opt_state)
    if parts.ema is not None:
        count = loaded.ema.get(EMA_COUNT)
        weights = {k: v for k, v in loaded.ema.items() if k != EMA_COUNT}
        try:
            parts.ema.module.load_state_dict(weights)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{folder / ckpt.EMA_NAME} does not fit the model: {first_line(exc)}") from None
        if count is None:
            raise ckpt.CheckpointError(f"{folder / ckpt.EMA_NAME} lacks {EMA_COUNT}")
        parts.ema.n_averaged.copy_(count)
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("grad_scaler"):
        parts.scaler.load_state_dict(state["grad_scaler"])
    set_rng_state({k: v[rank % v.shape[0]] for k, v in loaded.rng.items()})
    return Position(step=state["step"], epoch=state["epoch"], samples_in_epoch=state["samples_in_epoch"])


def restore_epoch_stats(
    loaded: ckpt.CheckpointContents, steps_per_epoch: int, world: int, rank: int, device: Any
) -> EpochStats:
    """Mid-epoch: the finished part of the epoch. On the same world size each process takes its own
    per-step stats back; on another one the part is kept aside whole (`carry`), in the same units."""
    state = loaded.state
    stats = EpochStats.empty(steps_per_epoch, device)
    stats.lrs, stats.time_before = list(state["epoch_lrs"]), state["epoch_time_before_s"]
    done = loaded.progress["epoch_stats"]  # [saved world, steps done, 2]
    carry = loaded.progress["epoch_carry"]
    if state["world_size"] == world and carry.numel() == 0:
        stats.steps[: done.shape[1]] = done[rank].to(device)
        stats.filled = done.shape[1]
    else:
        stats.carry = torch.cat([carry, done.reshape(-1, 3)])
        stats.carry_curve = list(state["epoch_loss_curve"])
    return stats


def init_weights(
    source: str, model: torch.nn.Module, ema: Any, architecture: str, input_shape: tuple[int, ...]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """--init-from: a new run's weights (and EMA weights) from a checkpoint folder, a `best` link, a
    run folder (its best) or a model.safetensors. A classifier for another number of classes (the
    tensors whose first dimension is the class count) keeps its fresh, seeded initialisation; any
    other difference is one line. Returns the lineage (the parent's path, step and weights' sha256)
    and the names of the tensors kept and new."""
    import hashlib

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from trainer.evaluation import model_file

    files = model_file(source)
    path = files.model
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        parent = load_file(path)
        their_shape, their_classes = tuple(json.loads(meta["input_shape"])), int(meta["num_classes"])
        step = int(meta["step"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(
            f"--init-from {source}: {path} is not a checkpoint's model ({first_line(exc)})"
        ) from None
    if meta.get("architecture") != architecture:
        raise ConfigError(f"--init-from {source}: it holds a {meta.get('architecture')!r} model, this run builds "
                          f"{architecture!r}")  # fmt: skip
    if their_shape != tuple(input_shape):
        raise ConfigError(f"--init-from {source}: its model takes inputs {list(their_shape)}, this run's data are "
                          f"{list(input_shape)}")  # fmt: skip
    mine = model.state_dict()
    if set(parent) != set(mine):
        odd = sorted(set(parent) ^ set(mine))
        raise ConfigError(f"--init-from {source}: another architecture ({len(odd)} tensors differ by name, e.g. "
                          f"{odd[0]})")  # fmt: skip
    classes = next(t.shape[0] for t in reversed(list(mine.values())) if t.dim() >= 1)
    kept, new = [], []
    for name, tensor in mine.items():
        theirs = parent[name]
        if theirs.shape == tensor.shape:
            kept.append(name)
        elif (
            theirs.dim() >= 1
            and (theirs.shape[0], tensor.shape[0]) == (their_classes, classes)
            and (theirs.shape[1:] == tensor.shape[1:])
        ):
            new.append(name)  # the classifier, for another number of classes: its seeded initialisation stays
        else:
            raise ConfigError(f"--init-from {source}: {name} is {list(theirs.shape)} there, {list(tensor.shape)} here")
    model.load_state_dict({k: parent[k] if k in kept else mine[k] for k in mine})
    if ema is not None:
        ema.module.load_state_dict(model.state_dict())
        if files.ema is not None:  # the parent's averaged weights go on averaging
            averaged = load_file(files.ema)
            ema.module.load_state_dict({k: averaged[k] if k in kept else v for k, v in model.state_dict().items()})
            ema.n_averaged.fill_(1)
    lineage = {"parent": str(path.parent if files.manifest is not None else path), "step": step,
               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    return lineage, kept, new


def rng_state() -> dict[str, Tensor]:
    """This process's random generators as fixed-size int64 tensors, to be gathered on the training
    device: uint8 states by value (gloo's uint8 gather returned invalid rows for process 1 here),
    Python's and numpy's float parts by their bits (MPS has no float64)."""
    version, mt, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss_bits": float_bits([float("nan") if gauss is None else gauss]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_rest_bits"] = float_bits([pos, has_gauss, cached])
    except ImportError:
        pass
    return state


def torch_rng() -> tuple[Tensor, Tensor | None]:
    """torch's generators alone (a few microseconds), taken before every step: a model that draws
    random numbers (dropout) and then fails mid-step is saved with the draws of the last whole step."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_torch_rng(snapshot: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1])


def float_bits(values: list[float]) -> Tensor:
    """Doubles as the int64 tensor of their IEEE-754 bits (exact, and no float64 tensor anywhere)."""
    return torch.tensor(struct.unpack(f"<{len(values)}q", struct.pack(f"<{len(values)}d", *values)))


def floats(bits: Tensor) -> list[float]:
    """Undoes `float_bits`."""
    values = bits.tolist()
    return list(struct.unpack(f"<{len(values)}d", struct.pack(f"<{len(values)}q", *values)))


def _generator_states(state: dict[str, Tensor]) -> dict[str, Any]:
    """One process's generators from rng.safetensors' rows, as each generator takes them back;
    ValueError for values no generator of its kind can hold."""
    found: dict[str, Any] = {}
    for name in ("torch", "cuda"):
        if name in state:
            if state[name].numel() and not 0 <= int(state[name].min()) <= int(state[name].max()) <= 255:
                raise ValueError(f"{name}: bytes outside 0..255")
            found[name] = state[name].to(torch.uint8).clone()  # a row view: torch reads its storage
    mt = tuple(int(v) for v in state["python_mt"].tolist())
    if not all(0 <= v < 2**32 for v in mt[:-1]) or not 0 <= mt[-1] <= 624:
        raise ValueError("python: Mersenne Twister words outside 0..2**32-1 or a position outside 0..624")
    (gauss,) = floats(state["python_gauss_bits"])
    found["python"] = (3, mt, None if gauss != gauss else gauss)
    if "numpy_keys" in state:
        keys = state["numpy_keys"]
        pos, has_gauss, cached = floats(state["numpy_rest_bits"])
        if not (int(keys.min()) >= 0 and int(keys.max()) < 2**32 and pos in range(625) and has_gauss in (0, 1)
                and math.isfinite(cached)):  # fmt: skip
            raise ValueError("numpy: words outside 0..2**32-1, or a position, flag or cached value out of range")
        found["numpy"] = ("MT19937", keys.numpy().astype("uint32"), int(pos), int(has_gauss), cached)
    return found


def check_rng(folder: Path, rng: dict[str, Tensor]) -> None:
    """Every process's generators in rng.safetensors are states their generators accept: each is
    tried on a generator of its own kind made for the purpose, before anything is restored."""
    for rank in range(rng["torch"].shape[0]):
        try:
            found = _generator_states({k: v[rank] for k, v in rng.items()})
            torch.Generator().set_state(found["torch"])
            random.Random().setstate(found["python"])
            if "numpy" in found:
                import numpy as np

                np.random.RandomState().set_state(found["numpy"])
        except (ValueError, OverflowError, RuntimeError, TypeError) as exc:
            raise ckpt.CheckpointError(
                f"{folder / ckpt.RNG_NAME}: process {rank}'s random generators cannot be restored ({first_line(exc)})"
            ) from None


def set_rng_state(state: dict[str, Tensor]) -> None:
    found = _generator_states(state)
    torch.set_rng_state(found["torch"])
    random.setstate(found["python"])
    if "cuda" in found and torch.cuda.is_available():
        torch.cuda.set_rng_state(found["cuda"])
    if "numpy" in found:
        import numpy as np

        np.random.set_state(found["numpy"])


def model_metadata(
    architecture: str, factory: str | None, data: Any, position: Position, history: list[dict[str, Any]]
) -> dict[str, str]:
    """model.safetensors' metadata: what evaluate and predict need to rebuild and feed the model."""
    from trainer import __version__

    return {
        "format": "pt",
        "trainer_version": __version__,
        "architecture": architecture,
        **({"factory": factory} if factory else {}),
        "dataset": data.name,
        "num_classes": str(len(data.class_names)),
        "class_names": json.dumps(data.class_names),
        "normalization": json.dumps(data.normalization or {}),
        "input_shape": json.dumps(list(data.input_shape)),
        "epoch": str(position.epoch),
        "step": str(position.step),
        "valid_acc": repr(history[-1]["valid_acc"]) if history else "",
    }


def check_precision(folder: Path, saved: str, now: str, chosen: bool, warn: Any) -> None:
    """A resumed run keeps its precision, unless --mixed-precision asks for another one (`chosen`;
    a warning then)."""
    if now == saved:
        return
    if not chosen:  # from accelerate's config or environment: not chosen here
        raise ConfigError(
            f"checkpoint {folder} was trained in {saved} precision, and this launch would resume it in {now} "
            f"(accelerate's config or ACCELERATE_MIXED_PRECISION); launch it as it was started (the printed "
            f"resume command does), or pass --mixed-precision {now} to change precision on purpose"
        )
    warn(
        f"resuming a checkpoint trained in {saved} with --mixed-precision {now}: the run will not equal an unbroken one"
    )
