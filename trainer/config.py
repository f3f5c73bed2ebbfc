"""The one frozen description of a run: the recipe, the data, and the infrastructure around them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
import stat
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainer.errors import ConfigError, first_line

__all__ = ["ConfigError", "TrainConfig"]

DATASETS = ("mnist", "fashion-mnist", "kmnist")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODEL_NAMES = ("blog_resnet",)  # trainer.model.MODELS, named here so the CLI needs no torch
# `--model package.module:factory`
FACTORY_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# What `best` and early stopping follow; --stop-at's targets (the EMA's with --ema: `valid_acc_ema`).
MONITORS = ("valid_acc", "valid_loss")
TARGET_PATTERN = re.compile(r"\s*(valid_(?:acc|loss)(?:_ema)?)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*")
# --val-split's default for the built-in data sets (the 5,000 of Lightning's MNIST examples); an image
# folder holds none out by default (its val/ or test/ validates).
DEFAULT_VAL_SPLIT = 5000
# The data set of a run whose data was given in Python (Trainer(..., train_data=...)).
CUSTOM_DATA = "custom"
# The fields' groups (their metadata's "group"), as --help and to_yaml() title them.
GROUP_TITLES = {"recipe": "recipe (decides the numbers)", "selection": "model selection (decides best and the end)",
                "data": "data and evaluation", "infra": "infrastructure"}  # fmt: skip
# A file of settings is a few KiB; a larger one is the wrong file, refused before it is read whole.
SETTINGS_LIMIT = 1 << 20
YAML_HEADER = """\
# trainer settings, one per TrainConfig field. `trainer --config FILE` trains with them (the flags you type
# override them) and TrainConfig.from_yaml(FILE) reads them in Python."""


# What a field of each type takes in Python, how it is stored (numpy's numbers as Python's), and its name.
_KINDS: dict[type, tuple[Any, Any, str]] = {
    int: (numbers.Integral, int, "an int"),
    float: (numbers.Real, float, "a number"),
    str: (str, str, "a str"),
    bool: (bool, bool, "a bool"),
}
_PATH = ((str, os.PathLike), os.fspath, "a str or path")  # the fields whose metadata says path=True


_BOOL, _FLOAT, _TIMESTAMP = (f"tag:yaml.org,2002:{kind}" for kind in ("bool", "float", "timestamp"))
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}  # YAML 1.1's, for the bool fields alone


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader (plain data, never an object) with settings in mind: yes/no/on/off stay
    words until a field's type decides (`mixed_precision: no` is the precision, `cpu: yes` a bool), a
    date stays a string (`run_name: 2024-06-01`), 1e-3 is a number as for the flags (YAML 1.1 reads it
    as text), and a key given twice is refused (the second would hide the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [k for k, _ in node.value if isinstance(k, yaml.ScalarNode) and not k.tag.endswith(":merge")]
        for i, key in enumerate(keys):
            if key.value in [k.value for k in keys[:i]]:
                raise yaml.constructor.ConstructorError(None, None, f"{key.value!r} is given twice", key.start_mark)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting every string that either YAML 1.1 or _Loader would read as
    another type (`'no'`, `'1e3'`), and writing each string on one line."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=None if data.isprintable() else '"')


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in found if tag not in (_BOOL, _TIMESTAMP)]
    for first, found in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
for _yaml in (_Loader, _Dumper):  # after YAML 1.1's own float, which wants a dot and a signed exponent
    _yaml.add_implicit_resolver(
        _FLOAT, re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+.0123456789")
    )
_Dumper.add_representer(str, _Dumper.represent_str)
del _yaml


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    """A dataclass field whose metadata also builds its command-line flag."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. The CLI builds its flags from these fields.

    Fields in the "recipe" group decide the numbers a run produces; the others decide where
    and how it runs. A resumed run must agree with its checkpoint on the recipe.
    """

    # --- the recipe (the blog's defaults) ---
    epochs: int = _opt(10, "number of passes over the training split", "recipe")
    batch_size: int = _opt(512, "training batch size per process", "recipe")
    lr: float = _opt(0.5, "peak learning rate of the schedule, either optimizer (cosine: after the warm-up)", "recipe")
    momentum: float = _opt(0.9, "SGD momentum (used as is only with --no-cycle-momentum)", "recipe")
    cycle_momentum: bool = _opt(True, "let OneCycle cycle momentum 0.95 -> 0.85 -> 0.95 (the blog's)", "recipe")
    seed: int = _opt(12, "seed for weights and the data order of every epoch", "recipe")
    optimizer: str = _opt("sgd", "sgd (with --momentum, the blog's) or adamw", "recipe", choices=OPTIMIZERS)
    weight_decay: float = _opt(
        0.0, "weight decay (AdamW's decoupled; SGD's L2), never on biases or norm layers' weights", "recipe"
    )
    betas: str | None = _opt(None, "AdamW's beta1,beta2 (default: 0.9,0.999)", "recipe")
    schedule: str = _opt(
        "onecycle", "LR schedule: onecycle (the blog's) or cosine (to 0 at the last step)", "recipe", choices=SCHEDULES
    )
    warmup_steps: int = _opt(0, "cosine: optimizer steps of linear warm-up to --lr", "recipe")
    grad_accum: int = _opt(
        1, "micro-batches per optimizer step (global batch = batch size x processes x this)", "recipe"
    )
    clip_grad_norm: float | None = _opt(
        None, "clip the gradients' total norm to this (after fp16's unscaling)", "recipe"
    )
    label_smoothing: float = _opt(0.0, "label smoothing of the training loss", "recipe")
    ema: float | None = _opt(
        None, "also keep an exponential moving average of the weights with this decay (e.g. 0.999)", "recipe"
    )
    augment: bool = _opt(
        False, "image data: random crops (shifts of up to 1/8 of the size) and horizontal flips", "recipe"
    )
    model: str = _opt(
        "blog_resnet",
        "network: blog_resnet, or package.module:factory, called as factory(num_classes=..., in_channels=...)",
        "recipe",
    )
    dataset: str = _opt(
        "mnist",
        "training data: mnist, fashion-mnist, kmnist, imagefolder:PATH (PATH/train/<class>/*, PATH/test/<class>/*), "
        "or hf:PATH (a Hugging Face data set saved with save_to_disk: its train, validation and test splits)",
        "recipe",
    )
    image_size: str | None = _opt(
        None, "image folders and PIL images (hf:PATH): decode them at N or HxW pixels (default: the first one's size)",
        "recipe",
    )  # fmt: skip
    input_key: str | None = _opt(
        None, "samples that are dicts (hf:PATH): the input's key (default: pixel_values, image, img or input)", "recipe"
    )
    label_key: str | None = _opt(
        None, "samples that are dicts (hf:PATH): the label's key (default: labels or label)", "recipe"
    )
    limit_train_batches: int | None = _opt(
        None, "train on at most N optimizer steps per epoch (the LR schedule is sized to it)", "recipe"
    )

    # --- model selection ---
    val_split: float | None = _opt(
        None,
        "validation images held out of the training split (stratified, seeded): N, or a fraction; 0 validates on "
        "the test split (the blog's way). Default: 5000 for the built-in data sets, none for an image folder",
        "selection",
    )
    monitor: str = _opt(
        "valid_acc", "what `best` and --early-stop follow: valid_acc (highest) or valid_loss (lowest)", "selection",
        choices=MONITORS,
    )  # fmt: skip
    early_stop: int | None = _opt(
        None, "end the run after N evaluations without an improvement of --monitor by more than --min-delta",
        "selection",
    )  # fmt: skip
    min_delta: float = _opt(0.0, "--early-stop: the least change that counts as an improvement", "selection")
    eval_every: int | None = _opt(
        None, "also evaluate and save every N optimizer steps inside an epoch (each evaluation counts for best and "
        "--early-stop; the training is the same bit for bit)", "selection",
    )  # fmt: skip
    stop_at: str | None = _opt(
        None, "end the run once an evaluation meets this target, e.g. 'valid_acc>=0.99' (time to it is recorded)",
        "selection",
    )  # fmt: skip

    # --- data and evaluation ---
    data_dir: str = _opt("./data", "folder holding (or receiving) the torchvision data sets", "data", path=True)
    eval_batch_size: int = _opt(1024, "evaluation batch size per process", "data")
    limit_eval_batches: int | None = _opt(None, "evaluate on at most N batches per process", "data")
    num_workers: int | None = _opt(
        None, "DataLoader workers for a Dataset given in Python (default: 0 on the CPU, up to 4 on a GPU)", "data"
    )

    # --- infrastructure ---
    output_dir: str = _opt("checkpoints", "root folder for run folders", "infra", path=True)
    run_name: str | None = _opt(
        None, "run folder name under --output-dir (default: the data set's name, or the image folder's)", "infra"
    )
    mixed_precision: str | None = _opt(
        None, "no, fp16 or bf16 (default: the accelerate config's, else no)", "infra", choices=PRECISIONS
    )
    cpu: bool = _opt(False, "train on the CPU even when a GPU is present (gloo for several processes)", "infra")
    channels_last: bool | None = _opt(
        None, "channels_last memory format (default: chosen by the device; the start-up summary says which)", "infra"
    )
    compile: bool = _opt(
        False, "compile the model (torch.compile through accelerate's dynamo plugin, inductor)", "infra"
    )
    compile_mode: str | None = _opt(
        None,
        "torch.compile mode (default: reduce-overhead, i.e. CUDA graphs, on a GPU; default elsewhere)",
        "infra",
        choices=COMPILE_MODES,
    )
    find_unused_parameters: bool = _opt(
        False, "several processes: let DDP allow parameters that a step leaves without a gradient (slower)", "infra"
    )
    threads: int | None = _opt(
        None,
        "torch threads per process on the CPU (default: the cores this process may use / processes on this "
        "machine, unless OMP_NUM_THREADS was set by you)",
        "infra",
    )
    resume: str | None = _opt(
        None,
        "'latest' or a checkpoint folder to continue from; 'auto': the run folder's newest intact checkpoint if it "
        "has one, else a fresh start, from --init-from's weights if given (what a requeued job runs)",
        "infra",
        path=True,
    )
    init_from: str | None = _opt(
        None,
        "start a new run from the weights of a checkpoint (folder, best link, run folder or model.safetensors), "
        "with this command's recipe; a classifier for another number of classes starts afresh",
        "infra",
        path=True,
    )
    save_every: int | None = _opt(None, "also save a checkpoint every N optimizer steps", "infra")
    requeue_signal: str | None = _opt(
        None,
        "the signal on which the trainer saves, requeues its Slurm job and stops: USR1, USR2 or none "
        "(default: USR1 inside a Slurm job, else none); pair it with sbatch --signal=USR1@120",
        "infra",
    )
    keep_last: int = _opt(3, "checkpoints kept per run besides the best one (at least 1)", "infra")
    log_with: str | None = _opt(
        None,
        "also log to experiment trackers through accelerate: tensorboard, wandb, mlflow, aim, comet_ml, clearml, "
        "dvclive, swanlab, trackio, all (those installed), comma-separated; none turns it off on --resume",
        "infra",
    )
    progress: str = _opt(
        "auto", "progress display: auto (bars on a terminal), bar or plain", "infra", choices=("auto", "bar", "plain")
    )

    def __post_init__(self) -> None:
        self._check_types()
        if self.mixed_precision is not None:  # BF16 and bf16 alike, as accelerate's own names are lower case
            object.__setattr__(self, "mixed_precision", self.mixed_precision.lower())
        positive = ("epochs", "batch_size", "eval_batch_size", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("limit_train_batches", "limit_eval_batches", "save_every", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.dataset not in (*DATASETS, CUSTOM_DATA) and not self.dataset.startswith(("imagefolder:", "hf:")):
            raise ConfigError(
                f"--dataset must be one of {', '.join(DATASETS)}, imagefolder:PATH or hf:PATH, got {self.dataset!r}"
            )
        if self.dataset in ("imagefolder:", "hf:"):
            raise ConfigError(f"--dataset {self.dataset}PATH needs the folder's PATH")
        if self.image_size is not None and not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)?", self.image_size):
            raise ConfigError(f"--image-size must be N or HxW (e.g. 32 or 24x32), got {self.image_size!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be at least 0, got {self.num_workers}")
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}")
        if self.run_name is not None and (
            not self.run_name.isprintable() or "/" in self.run_name or self.run_name[:1] in ("", ".", "-")
        ):
            raise ConfigError(
                f"--run-name must be a folder name: not empty, not starting with '.' or '-', without '/' or control "
                f"characters, got {self.run_name!r}"
            )
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.model not in MODEL_NAMES and not FACTORY_PATTERN.fullmatch(self.model):
            raise ConfigError(
                f"--model must be {' or '.join(MODEL_NAMES)} or package.module:factory, got {self.model!r}"
            )
        if not 0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a number of at least 0, got {self.weight_decay}")
        if self.betas is not None:
            if self.optimizer != "adamw":
                raise ConfigError("--betas belong to --optimizer adamw")
            self.adam_betas  # noqa: B018 (parses them)
        if self.warmup_steps < 0 or (self.warmup_steps and self.schedule != "cosine"):
            raise ConfigError(f"--warmup-steps is for --schedule cosine, at least 0, got {self.warmup_steps}")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if self.clip_grad_norm is not None and not 0 < self.clip_grad_norm < math.inf:
            raise ConfigError(f"--clip-grad-norm must be a positive number, got {self.clip_grad_norm}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ConfigError(f"--ema must be a decay in (0, 1), e.g. 0.999, got {self.ema}")
        if self.optimizer not in OPTIMIZERS or self.schedule not in SCHEDULES:
            raise ConfigError(
                f"--optimizer is one of {', '.join(OPTIMIZERS)}, --schedule one of {', '.join(SCHEDULES)}"
            )
        if self.requeue_signal is not None:
            name = self.requeue_signal.upper().removeprefix("SIG")
            if name not in ("USR1", "USR2", "NONE"):
                raise ConfigError(f"--requeue-signal must be USR1, USR2 or none, got {self.requeue_signal!r}")
            object.__setattr__(self, "requeue_signal", name.lower() if name == "NONE" else name)
        # --resume auto with --init-from: a requeued job's script passes both; the run folder decides.
        if self.init_from is not None and self.resume not in (None, "auto"):
            raise ConfigError(
                "--init-from starts a new run from a checkpoint's weights, --resume continues one: pass one of them "
                "(or --resume auto: the run folder's newest checkpoint if it has one, else a start from --init-from)"
            )
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.image_size is not None and self.dataset in DATASETS:
            raise ConfigError(f"--image-size applies to images decoded from files (an image folder, hf:PATH), "
                              f"not {self.dataset}")  # fmt: skip
        if self.compile_mode is not None and not self.compile:
            raise ConfigError("--compile-mode needs --compile")
        self._check_selection()
        for f in dataclasses.fields(self):  # what the flags' choices refuse and no check above has (--progress)
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")

    def _check_selection(self) -> None:
        if self.val_split is not None and not (
            0 <= self.val_split < 1 or (1 <= self.val_split < 2**63 and self.val_split == int(self.val_split))
        ):
            raise ConfigError(f"--val-split must be a number of images (N >= 0) or a fraction in (0, 1), got "
                              f"{self.val_split}")  # fmt: skip
        if self.monitor not in MONITORS:
            raise ConfigError(f"--monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1 optimizer step, got {self.eval_every}")
        if self.early_stop is not None and self.early_stop < 1:
            raise ConfigError(f"--early-stop must be at least 1 evaluation, got {self.early_stop}")
        if not 0 <= self.min_delta < math.inf:
            raise ConfigError(f"--min-delta must be a number of at least 0, got {self.min_delta}")
        if self.min_delta and self.early_stop is None:
            raise ConfigError("--min-delta belongs to --early-stop")
        if self.stop_at is not None:
            self.target  # noqa: B018 (parses it)

    @property
    def target(self) -> tuple[str, str, float] | None:
        """--stop-at as (metric, comparison, value), e.g. ("valid_acc", ">=", 0.99); None without it."""
        if self.stop_at is None:
            return None
        found = TARGET_PATTERN.fullmatch(self.stop_at)
        try:
            value = float(found.group(3)) if found else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(
                f"--stop-at must be METRIC>=VALUE (or <=, >, <) with METRIC valid_acc or valid_loss (or their _ema), "
                f"e.g. 'valid_acc>=0.99', got {self.stop_at!r}"
            )
        metric = found.group(1)
        if metric.endswith("_ema") and self.ema is None:
            raise ConfigError(f"--stop-at {metric} needs --ema")
        return metric, found.group(2), value

    def _check_types(self) -> None:
        """Every field holds its declared type, stored as the built-in one: any integer (numpy's too) for an
        int, any real number for a float, a str or os.PathLike for a path; a bool is no number."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), typing.get_args(hints[f.name]) or (hints[f.name],)
            if value is None and type(None) in allowed:
                continue
            kind = next(t for t in allowed if t is not type(None))
            accepted, convert, words = _PATH if f.metadata.get("path") else _KINDS[kind]
            try:
                ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
                stored = convert(value) if ok else None
            except OverflowError:  # an int too large for a float
                stored = None
            if not isinstance(stored, kind):  # refused, or a path of bytes
                raise ConfigError(f"{f.name} (--{f.name.replace('_', '-')}) must be {words}, got {value!r}")
            object.__setattr__(self, f.name, stored)

    def samples_per_step(self, processes: int) -> int:
        """The samples of one optimizer step on `processes` processes together, the global batch:
        batch size x processes x micro-batches (--grad-accum). The one place this product is made."""
        return self.batch_size * processes * self.grad_accum

    @property
    def adam_betas(self) -> tuple[float, float]:
        """--betas as two numbers."""
        try:
            b1, b2 = (float(b) for b in (self.betas or "0.9,0.999").split(","))
        except ValueError:
            raise ConfigError(f"--betas must be two numbers like 0.9,0.999, got {self.betas!r}") from None
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConfigError(f"--betas must each be in [0, 1), got {self.betas!r}")
        return b1, b2

    @property
    def trackers(self) -> list[str]:
        """--log-with as a list of tracker names (empty: no tracking)."""
        names = [n.strip() for n in (self.log_with or "").split(",") if n.strip()]
        return [] if names == ["none"] else names

    @property
    def name(self) -> str:
        """The run folder's name."""
        if self.run_name:
            return self.run_name
        if self.dataset.startswith(("imagefolder:", "hf:")):  # the folder's own name, also for `.` or `../x/`
            folder = os.path.basename(os.path.abspath(self.dataset.split(":", 1)[1]))
            return re.sub(r"[^A-Za-z0-9._-]", "_", folder).lstrip("._-") or "images"
        return self.dataset

    def placed(self, custom_data: bool = False, resumed_run: str | None = None) -> TrainConfig:
        """This config with absolute paths (a resume never depends on the working directory), the
        data set's --val-split default as a number, and, when it resumes a checkpoint by path
        without naming a run, that checkpoint's own run folder (`resumed_run`)."""
        changes: dict[str, Any] = {
            "data_dir": os.path.abspath(self.data_dir),
            "output_dir": os.path.abspath(self.output_dir),
        }
        if custom_data:
            changes["dataset"] = CUSTOM_DATA
        else:
            if self.val_split is None:  # the data set's default, as a number the checkpoint records
                changes["val_split"] = float(DEFAULT_VAL_SPLIT if self.dataset in DATASETS else 0)
            kind, _, path = self.dataset.partition(":")
            if path:  # imagefolder:PATH, hf:PATH: absolute, and the run folder named once for all
                changes["dataset"] = f"{kind}:{os.path.abspath(path)}"
                changes["run_name"] = self.name
        if resumed_run is not None and self.run_name is None:
            run = os.path.abspath(resumed_run)
            changes.update(output_dir=os.path.dirname(run), run_name=os.path.basename(run))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """Every field, in field order under its group's title, each with its help as a comment: the
        text that from_yaml() and `trainer --config` read back as this config (and any YAML reader as
        its values)."""
        lines, group = [YAML_HEADER], None
        for f in dataclasses.fields(self):
            if f.metadata["group"] != group:
                group = f.metadata["group"]
                lines.append(f"\n# --- {GROUP_TITLES[group]} ---")
            text = yaml.dump({f.name: getattr(self, f.name)}, Dumper=_Dumper, allow_unicode=True, width=math.inf)
            lines.append(f"{text.rstrip()}  # {f.metadata['help']}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """The config of a YAML file of settings (a run folder's config.yaml, or your own): the
        defaults, then the fields the file sets, checked as TrainConfig(...) checks them. Any problem
        is a one-line ConfigError naming the file."""
        settings = read_settings(path)
        try:
            return cls(**settings)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {os.fspath(path)})") from None


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields a YAML file sets, as a mapping of field names to values, read as plain data (never
    an object), with a bool field's yes/no/on/off as bools and a choice in lower case, as the flags
    take them. The values are checked by TrainConfig(...). Not a regular file (a FIFO is never
    waited on), larger than SETTINGS_LIMIT, not YAML, not a mapping, a key that is no field: a
    one-line ConfigError."""
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open would wait for a writer
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            raise ConfigError(f"the config file {where} is {kind}, not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read(SETTINGS_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {where}: {exc.strerror or exc}") from None
    if len(data) > SETTINGS_LIMIT:
        raise ConfigError(f"the config file {where} is larger than {SETTINGS_LIMIT} bytes: not a file of settings")
    try:
        settings = yaml.load(data, Loader=_Loader)  # a SafeLoader: plain data, never an object
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or first_line(exc)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"the config file {where} is not valid YAML: {problem}{at}") from None
    except RecursionError:
        raise ConfigError(f"the config file {where} is nested too deeply to be settings") from None
    if not isinstance(settings, dict):
        what = "nothing" if settings is None else f"a {type(settings).__name__}"
        raise ConfigError(f"the config file {where} holds {what}, not settings: a mapping of fields to values, "
                          "like `epochs: 10`")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in settings.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]}?" if close else "the keys are the flags' names (--batch-size: batch_size)"
            raise ConfigError(f"the config file {where} sets {key!r}, which is no setting; {hint}")
        if isinstance(value, str) and bool in (typing.get_args(hints[key]) or (hints[key],)):
            settings[key] = _BOOL_WORDS.get(value.lower(), value)
        elif isinstance(value, str) and fields[key].metadata.get("choices"):
            settings[key] = value.lower()
    return settings
