"""class Trainer: set up, then train, evaluate and save, epoch after epoch.

The loop reads top to bottom: fetch a batch, forward, backward, step the optimizer and the
schedule, note the loss on the device, and only at the end of an epoch talk to the host and
to the other processes (one gather), evaluate, log and save a checkpoint.

What a run's state is and how it is checkpointed lives in `state.py`; processes, devices and
signals in `runtime.py`; the run's logs in `runlog.py`; folders on disk in `checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import signal
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from trainer import checkpoint as ckpt
from trainer import recipe, runtime, schema, selection, state
from trainer.config import CUSTOM_DATA, ConfigError, TrainConfig
from trainer.console import Reporter
from trainer.data import (
    TEST_SPLIT,
    check_labels,
    make_loader,
    model_input,
    named_source,
    readable_labels,
    user_source,
)
from trainer.errors import first_line
from trainer.evaluation import EvalResult, evaluate_model, load_weights
from trainer.imagefolder import parse_image_size
from trainer.model import MODELS, build_model, import_factory, logits_of, output_classes
from trainer.runlog import RunLog

# With several processes, a stop request is agreed on (one tiny all-reduce) every this many steps.
STOP_CHECK_EVERY = 10
DIVERGED_EXIT_CODE = 3


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; exit code 128 + signum."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Diverged(Exception):
    """The loss or the weights stopped being finite; nothing after the last finite checkpoint was saved.
    The CLI exits with DIVERGED_EXIT_CODE."""


class Trainer:
    """Trains a model with SGD and the OneCycle schedule: by default the blog's network on MNIST.

    `Trainer(TrainConfig(epochs=10)).fit()` is the recipe. `model`, `train_data` and `eval_data`
    bring your own: any nn.Module that maps a batch of inputs to logits [B, C], and map-style
    Datasets of (input tensor, int label) (a TensorDataset keeps the fast path of tensors).
    `eval_data` is the validation split (`best`, early stopping); `test_data`, if given, is scored
    once, on `best`, when the run ends. Raises ConfigError / CheckpointError on user errors,
    Stopped after a signal-triggered save.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module | None = None,
        train_data: Dataset | None = None,
        eval_data: Dataset | None = None,
        class_names: list[str] | tuple[str, ...] | None = None,
        accelerator: Any = None,
        command_args: list[str] | None = None,
        test_data: Dataset | None = None,
    ) -> None:
        if (train_data is None) != (eval_data is None):
            raise ConfigError("pass both train_data and eval_data, or neither (then config.dataset is used)")
        if test_data is not None and train_data is None:
            raise ConfigError("test_data goes with train_data and eval_data; a built-in data set has its own")
        if train_data is not None and config.val_split is not None:
            raise ConfigError("val_split holds images out of a built-in data set or image folder; with train_data, "
                              "eval_data is the validation split (and test_data the test split)")  # fmt: skip
        if class_names is not None and train_data is None:
            raise ConfigError("class_names go with train_data; a built-in data set has its own")
        if train_data is None and config.dataset == CUSTOM_DATA:
            raise ConfigError(f"--dataset {CUSTOM_DATA} means data given in Python (Trainer(train_data=...))")
        # The CLI's flags, for the commands it prints; None in Python, where advice is in TrainConfig's terms.
        self.command_args = command_args
        by_path = config.resume not in (None, "latest", "auto")
        resumed_run = str(ckpt.folder_of(config.resume).absolute().parent) if by_path else None
        self.config = config = config.placed(custom_data=train_data is not None, resumed_run=resumed_run)
        runtime.launcher_argv()  # noted now, while the launcher lives (for the printed resume command)
        self.accelerator = accelerator or runtime.make_accelerator(config)
        if config.resume == "auto":  # the run folder's newest checkpoint if it has one, else a fresh start
            auto = runtime.resume_auto(Path(config.output_dir) / config.name)
            # A requeued job started from --init-from resumes its own checkpoint (whose lineage it keeps).
            init_from = config.init_from if auto is None else None
            self.config = config = dataclasses.replace(config, resume=auto, init_from=init_from)
        self.requeue_signal = runtime.requeue_signal(config.requeue_signal)
        self.threads: tuple[int, str] | None = None
        if self.accelerator.device.type == "cpu" or config.threads is not None:
            self.threads = runtime.cpu_threads(config.threads)
            torch.set_num_threads(self.threads[0])
        self.report = Reporter(self.accelerator.is_main_process, config.progress)
        if self._compile_text() != "no":  # inductor's note that a CUDA build of torch found no GPU is noise here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self.run_dir = Path(config.output_dir) / config.name
        self.num_processes = self.accelerator.num_processes
        # Memory format: the user's choice, else the device's rule (runtime.device_defaults), never a timing.
        chosen = runtime.device_defaults(self.accelerator.device)
        if config.channels_last is not None:
            chosen = {"channels_last": config.channels_last, "why": "--channels-last" if config.channels_last
                      else "--no-channels-last"}  # fmt: skip
        self.channels_last, self._memory_format_why = chosen["channels_last"], chosen["why"]
        self.log = RunLog(self.accelerator, self.run_dir)
        # A later Trainer on this folder in this process (a notebook's cell run again) takes the lock
        # from this one unless it is fitting (weakly: a lost Trainer is collected, and its lock with it).
        self._lock = ckpt.RunLock(self.run_dir, _yield_of(self))
        self._fitting, self._superseded = False, False
        self._prepared = False
        try:
            self._setup(model, train_data, eval_data, test_data, class_names)
        except BaseException:
            self.close()
            raise

    def _setup(self, model: Any, train_data: Any, eval_data: Any, test_data: Any, class_names: Any) -> None:
        config = self.config
        runtime.check_distributed(self.accelerator, "train alone and write the same files")
        from accelerate.utils import set_seed

        set_seed(config.seed)
        if model is None and config.model not in MODELS:
            import_factory(config.model)  # a --model that cannot be imported fails before any data is read
        # The samples --limit-train-batches gives an epoch: a resumed run keeps its checkpoint's.
        self.limit_samples: int | None = None
        self._resume_from = self._find_resume_point(config.resume) if config.resume is not None else None
        self._setup_data(train_data, eval_data, test_data)
        if config.limit_train_batches is not None and self._resume_from is None:
            self.limit_samples = config.limit_train_batches * self.samples_per_step
        self._setup_model(model, class_names)
        self._setup_optimizer()
        self.lineage: dict[str, Any] | None = None  # where a run started with --init-from began
        if config.init_from is not None:
            self._init_from(config.init_from)
        self._setup_schedule()
        # All at once, as accelerate expects: its optimizer wrapper keeps the step that the scheduler
        # wrapped (a scheduler made later makes torch warn about an overridden step in fp16 runs).
        self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.eval_loader, self.scheduler
        )
        if self.test_loader is not None:
            self.test_loader = self.accelerator.prepare(self.test_loader)
        self._prepared = True
        # The user's module itself: no DDP wrapper, no torch.compile wrapper (whose state_dict keys
        # gain an `_orig_mod.` prefix), so checkpoints are the same with and without --compile.
        self.module = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        if self._start_sampler(0, 0) != self.steps_per_epoch:
            raise RuntimeError(f"{len(self.train_loader)} prepared steps per epoch, {self.steps_per_epoch} planned")
        self.position = state.Position()
        self.stats = state.EpochStats()  # train_epoch sizes it when an epoch begins
        self._failed_step_rng: Any = None  # torch's generators before a step that failed in the data or model
        self._augment_pad: int | None = None
        self.stop_signal: int | None = None
        self.finished = False  # the run's end is saved (or failed): later signals are ignored
        self._last_saved: Path | None = None
        # This process's first training step and first evaluation batch (compilation, lazy set-up).
        self._warmup: dict[str, float | None] = {"train": None, "eval": None}
        self._warmup_reported = 0.0
        self._prepare_run_dir()

    @property
    def samples_per_step(self) -> int:
        """The samples of one optimizer step, all processes together: batch x processes x --grad-accum."""
        return self.config.samples_per_step(self.num_processes)

    def _samples_per_step_parts(self) -> str:
        """samples_per_step's factors, for people: `32 per process x 2 processes x 2 micro-batches`."""
        n, k = self.num_processes, self.config.grad_accum
        accumulated = f" x {k} micro-batches" if k > 1 else ""
        return f"{self.config.batch_size} per process x {n} process{'es' * (n != 1)}{accumulated}"

    @property
    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records so far (the lines of metrics.jsonl)."""
        return self.log.history

    # ------------------------------------------------------------------ setup
    def _setup_data(self, train_data: Dataset | None, eval_data: Dataset | None, test_data: Dataset | None) -> None:
        cfg, acc = self.config, self.accelerator
        if train_data is not None:
            self.data = user_source(train_data, eval_data, test_data, cfg.input_key, cfg.label_key,
                                    parse_image_size(cfg.image_size))  # fmt: skip
        else:
            self.data = self._load_data()
        self.train_size, self.valid_size = len(self.data.train), len(self.data.valid)
        # The test split when it is not the validation split itself: scored once, when the run ends.
        self.test_size = len(self.data.test) if self.data.test is not None else 0
        if self.valid_size == 0:
            raise ConfigError("the evaluation data is empty")
        if cfg.augment and len(self.data.input_shape) != 3:  # crops and flips need rows and columns
            raise ConfigError(
                f"--augment needs image inputs [C, H, W]; these inputs are {list(self.data.input_shape)}: "
                "train without it, or give images"
            )
        if self.train_size < self.samples_per_step:
            raise ConfigError(
                f"the training split has {self.train_size} samples, fewer than one step needs "
                f"({self._samples_per_step_parts()})"
            )
        device, workers = acc.device, cfg.num_workers
        self.train_loader = make_loader(self.data.train, cfg.batch_size, train=True, seed=cfg.seed, device=device,
                                        num_workers=workers)  # fmt: skip

        def evaluation_loader(split: Any) -> Any:
            return make_loader(split, cfg.eval_batch_size, train=False, seed=cfg.seed, device=device,
                               num_workers=workers)  # fmt: skip

        self.eval_loader = evaluation_loader(self.data.valid)
        self.test_loader = evaluation_loader(self.data.test) if self._tests_apart else None
        # The samplers themselves (accelerate's prepared loaders wrap them).
        self.train_sampler = self.train_loader.sampler
        self.eval_sampler = self.eval_loader.sampler
        self.test_sampler = self.test_loader.sampler if self.test_loader is not None else None

    def _load_data(self) -> Any:
        """A built-in data set or an image folder, read by one process per machine first (it
        downloads or decodes; the others then read its files). A failure on one machine stops all."""
        cfg, acc = self.config, self.accelerator
        error, source = None, None
        with acc.local_main_process_first():
            try:
                say = self.report.line if acc.is_local_main_process else (lambda _: None)
                source = named_source(cfg.dataset, cfg.data_dir, parse_image_size(cfg.image_size), say,
                                      cfg.val_split, cfg.seed, cfg.input_key, cfg.label_key)  # fmt: skip
            except ConfigError as exc:  # data missing on one machine must stop the others too
                error = exc
        runtime.agree(error, f"load the {cfg.dataset} data")
        return source

    def _setup_model(self, model: nn.Module | None, class_names: Any) -> None:
        cfg, shape = self.config, self.data.input_shape
        if class_names is not None and len(class_names) == 0:  # else taken as no names at all
            raise ConfigError('class_names is empty: give one name per class, or leave it out (then "0".."C-1")')
        given = tuple(str(n) for n in class_names) if class_names is not None else None
        if given is not None and self.data.class_names is not None and given != self.data.class_names:
            raise ConfigError(f"class_names {', '.join(given[:4])}... disagree with the data set's own "
                              f"({', '.join(self.data.class_names[:4])}...): leave class_names out")  # fmt: skip
        names = self.data.class_names or given
        if names is not None and len(set(names)) < len(names):  # predictions name classes: each name once
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"class_names name a class more than once: {', '.join(twice[:4])}")
        # --model package:factory builds it (and evaluate / predict rebuild it only when told so again).
        self.factory = cfg.model if model is None and cfg.model not in MODELS else None
        if model is None:
            if names is None:  # the default network on data given in Python: as many classes as labels
                labels = [readable_labels(d) for d in (self.data.train, self.data.valid)]
                if any(t is None for t in labels):
                    raise ConfigError(
                        f"{cfg.model} needs to know how many classes there are: pass class_names=, or model=, or "
                        "data whose labels can be read (tensors, or a Dataset with `targets`)"
                    )
                names = tuple(str(k) for k in range(int(max(t.max() for t in labels if len(t))) + 1))
            model = build_model(cfg.model, len(names), shape)
            builtin = self.factory is None
        else:
            builtin = False
        # What the checkpoint says the model is: a built-in name, else its class (module:qualname).
        self.architecture = cfg.model if builtin else f"{type(model).__module__}:{type(model).__qualname__}"
        if not builtin or self.data.class_names is None:  # the model says how many classes it tells apart
            example = self.data.example if self.data.example is not None else self.data.train[0][0]
            classes = output_classes(model, model_input(torch.as_tensor(example).unsqueeze(0), self.data.normalization))
            names = names or tuple(str(k) for k in range(classes))
            if len(names) != classes:
                raise ConfigError(
                    f"{len(names)} classes ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) for a model "
                    f"with {classes} outputs"
                )
            self.data = dataclasses.replace(self.data, class_names=names)
        self.class_names = self.data.class_names
        for split, data, loader in (("training", self.data.train, self.train_loader),
                                    ("evaluation", self.data.valid, self.eval_loader),
                                    ("test", self.data.test, self.test_loader)):  # fmt: skip
            if loader is None:
                continue
            if not check_labels(data, len(self.class_names), split) and hasattr(loader.dataset, "num_classes"):
                loader.dataset.num_classes = len(self.class_names)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"the model ({self.architecture}) has no parameters that require grad: nothing to train")
        self.model = model
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def _setup_optimizer(self) -> None:
        self.optimizer = recipe.new_optimizer(self.model, self.config)
        self.ema = recipe.new_ema(self.model, self.config.ema) if self.config.ema is not None else None

    def _init_from(self, source: str) -> None:
        """--init-from: the weights (and the EMA's) of another run's checkpoint; everything else fresh."""
        self.lineage, kept, new = state.init_weights(source, self.model, self.ema, self.architecture,
                                                     self.data.input_shape)  # fmt: skip
        fresh = f"; {len(new)} new for {len(self.class_names)} classes ({', '.join(new[:3])}{', ...' * (len(new) > 3)})"
        self.report.line(
            f"init from {self.lineage['parent']} (step {self.lineage['step']}): {len(kept)} tensors kept"
            + (fresh if new else "")
        )

    def _start_sampler(self, epoch: int, start: int) -> int:
        """Points the training sampler at sample `start` of `epoch`; returns the optimizer steps left."""
        self.train_sampler.set_position(epoch, start, self._train_samples())
        return len(self.train_loader) // self.config.grad_accum

    def _train_samples(self) -> int:
        """The samples an epoch covers: whole optimizer steps of every process (batch x processes x
        accumulation) of the split, or of --limit-train-batches steps' worth of samples as the run
        first counted them (so a resume on another number of processes trains the same epochs)."""
        per_step = self.samples_per_step
        limit = self.train_size if self.limit_samples is None else min(self.train_size, self.limit_samples)
        return limit // per_step * per_step

    @property
    def _tests_apart(self) -> bool:
        """The run has a test split apart from its validation split (scored once, at the end)."""
        return self.data.test is not None and self.data.validation != TEST_SPLIT

    def _eval_images(self, size: int) -> int:
        """The images an evaluation of a split of `size` covers: all, or the first --limit-eval-batches
        batches' worth."""
        limit, batch = self.config.limit_eval_batches, self.config.eval_batch_size
        return size if limit is None else min(size, limit * self.num_processes * batch)

    def _setup_schedule(self) -> None:
        """The LR schedule over the run, in units of one per-process batch of data (see recipe.py):
        `(steps - 1) * N + 1` units put the last optimizer step exactly on the schedule's end."""
        cfg = self.config
        # What accelerate's sharding of the drop_last loader gives each process (checked after prepare).
        self.steps_per_epoch = self._train_samples() // self.samples_per_step
        total_steps = self.steps_per_epoch * cfg.epochs
        # The step after the warm-up runs at --lr; the cosine needs one more to decay to 0.
        if cfg.schedule == "cosine" and 0 < cfg.warmup_steps >= total_steps - 1:
            raise ConfigError(
                f"--warmup-steps {cfg.warmup_steps} leaves no step for the cosine to decay in: the run has "
                f"{total_steps} optimizer steps ({cfg.epochs} epoch(s) of {self.steps_per_epoch}); warm up over "
                f"fewer than {total_steps - 1} or train longer"
            )
        units = (total_steps - 1) * self.num_processes + 1
        self.scheduler = recipe.new_schedule(self.optimizer, cfg, units, self.num_processes)

    def _prepare_run_dir(self) -> None:
        """Locks the run folder (the main process), then checks it or resumes from it."""
        cfg, acc = self.config, self.accelerator
        error: Exception | None = None
        if acc.is_main_process:
            try:
                self._lock.acquire()  # before anything is written: one writer per run folder
                ckpt.remove_stale_temporaries(self.run_dir)
                holds = [p.name for p in (self.run_dir / "metrics.jsonl", *ckpt.list_checkpoints(self.run_dir))
                         if p.exists()]  # fmt: skip
                if cfg.resume is None and holds:
                    error = ConfigError(
                        f"run folder {self.run_dir} already holds results ({', '.join(holds[:3])}); "
                        + self._say("pass --resume latest to continue it, or choose another --run-name",
                                    'pass TrainConfig(resume="latest") to continue it, or another run_name')
                    )  # fmt: skip
            except OSError as exc:
                error = ConfigError(f"cannot create the run folder {self.run_dir}: {exc.strerror}")
            except ckpt.CheckpointError as exc:
                error = exc
        runtime.agree(error, f"use the run folder {self.run_dir}")
        if self._resume_from is not None:
            self._resume(self._resume_from)
        # The settings as this run uses them, to run again with --config: the precision whatever chose
        # it, where the weights came from (--init-from, resumed or not), and never a resume of its own.
        parent = self.lineage["parent"] if self.lineage else None
        self.log.write_config(dataclasses.replace(cfg, resume=None, init_from=parent,
                                                  mixed_precision=acc.mixed_precision))  # fmt: skip
        acc.wait_for_everyone()

    def close(self) -> None:
        """Ends what this Trainer started, in order; fit() calls it on every way out, and so does a
        `with Trainer(...) as trainer:` block. Afterwards `trainer.model` is your own module.

        The run folder's lock goes first (another run may start). Then the prepared objects: the
        DistributedDataParallel wrapper lives in reference cycles, so without a collection here it
        would be destroyed by the interpreter's last garbage collection, at exit, where gloo's
        worker threads that its destruction wakes can no longer take the GIL and abort the
        process (SIGABRT: "terminate called without an active exception", after a finished run).
        The process group itself is left to `runtime.end_processes` at exit (a second Trainer in
        the same script uses it), and one that you created is left to you."""
        self.log.finish_trackers()
        self.report.close()
        self._lock.release()
        if self._prepared:
            self._prepared = False
            self.model = self.module
            self.accelerator.free_memory()  # drops accelerate's references, then gc.collect()

    def _yield_run_dir(self) -> None:
        """A later Trainer in this process wants this run folder: one never fitted closes for it."""
        if not self._fitting:
            self._superseded = True
            self.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> list[dict[str, Any]]:
        """Trains until `config.epochs` epochs are done; returns the per-epoch metrics records.

        Every way out saves what it can: a stop signal (SIGTERM, SIGINT, SIGHUP) after the current
        step; an exception from the data or the model, on one process, the state after the last
        whole step. Then close() ends what the Trainer started."""
        if self._superseded:
            raise ConfigError(
                f"this Trainer was closed when a later one took its run folder {self.run_dir}: fit that one"
            )
        self._fitting = True
        if self._complete:
            epochs = self._epochs_done
            self.report.line(f"run already complete ({epochs} epoch{'s' if epochs != 1 else ''}): {self.run_dir}")
            self.close()
            return self.history
        with runtime.StopSignals(self):
            try:
                self._announce()
                self.log.start_trackers(self.config)
                while not self._complete:
                    self._run_epoch()
                if self.stop_signal is not None:
                    self.report.line(f"{self._signal_name()} came after the last step: the run is complete")
                self._closing_summary()
                return self.history
            except Exception as exc:
                if self.num_processes > 1 and runtime.lost_peer(exc):
                    last = f"the last checkpoint, {self._last_saved}," if self._last_saved else "no checkpoint"
                    raise runtime.PeerError(
                        f"another process stopped (its own message says why), so this one stops too; {last} holds "
                        "the work"
                    ) from None
                self._after_failure(exc)
                raise
            finally:
                self.finished = True  # a signal from here on has nothing left to stop (StopSignals ignores it)
                self.close()

    @property
    def _epochs_done(self) -> int:
        return sum(not r.get("inside_epoch") for r in self.history)

    @property
    def _complete(self) -> bool:
        """Nothing is left to train: the last epoch is done, or an evaluation ended the run early."""
        return self.position.epoch >= self.config.epochs or bool(self.history and self.history[-1].get("stopped"))

    def _run_epoch(self) -> None:
        """Train, evaluate, record and save one epoch (the rest of it, after a resume). When the run
        ends (its last epoch, --early-stop, --stop-at), the test split is scored once, on `best`."""
        cfg = self.config
        train = self.train_epoch()
        if train is None:  # --early-stop or --stop-at ended the run inside the epoch
            return
        valid, averaged, eval_time = self._validate()
        record = self._epoch_record(train, valid, averaged, eval_time)
        history = [*self.history, record]
        last = self.position.epoch + 1 >= cfg.epochs
        self._decide_end(record, history, last)
        self.position.next_epoch()
        self._save(record, train["curve"])
        # Every process takes part in this agreement, also one that already holds a signal.
        # After the last epoch there is nothing left to stop: the run is complete.
        if not self._complete and self._stop_agreed(force=True):
            self._stop()

    def _validate(self) -> tuple[EvalResult, EvalResult | None, float]:
        """The validation split's evaluation of the trained weights and of the EMA's, and its seconds."""
        started, first_evaluation = time.perf_counter(), self._warmup["eval"] is None
        self.report.evaluating(self._eval_images(self.valid_size))
        valid = self.evaluate()
        averaged = self.evaluate(self.ema.module) if self.ema is not None else None
        self.report.evaluated()
        # The first evaluation batch of this process is warm-up (warmup_s), not evaluation.
        return valid, averaged, time.perf_counter() - started - valid.first_batch_s * first_evaluation

    def _evaluate_inside_epoch(self) -> bool:
        """--eval-every: an evaluation after this step, its record (no training numbers: the epoch's
        come at its end) and a checkpoint; True when it ends the run. The generators are given back
        as they were and the model goes back to training, so the training does not change."""
        generators = state.torch_rng()
        valid, averaged, eval_time = self._validate()
        record = {"epoch": self.position.epoch + 1, "step": self.position.step, "inside_epoch": True,
                  **self._evaluation_numbers(valid, averaged), "eval_time_s": eval_time,
                  "num_processes": self.num_processes, "mixed_precision": self.accelerator.mixed_precision}  # fmt: skip
        why = self._decide_end(record, [*self.history, record], last=False)
        self._save(record)
        self.model.train()
        state.set_torch_rng(generators)
        return why is not None

    def _decide_end(self, record: dict[str, Any], history: list[dict[str, Any]], last: bool) -> str | None:
        """Whether the run ends at this evaluation (its last epoch, --early-stop, --stop-at); the record
        gains the reason, what reaching the target took and, when the run ends, the test score."""
        cfg = self.config
        if cfg.target is not None and selection.target_met(record, cfg.target):  # the first time: it ends the run
            # Inside an epoch, the epoch's training so far counts too (its record comes at its end).
            inside = bool(record.get("inside_epoch"))
            record |= selection.time_to_target(history, self.stats.time_before * inside,
                                               self.position.samples_in_epoch * inside)  # fmt: skip
        why = None if last else selection.why_stop(history, cfg)
        if why is not None:
            record["stopped"] = why
        if (last or why is not None) and self._tests_apart:
            self.report.evaluating(self._eval_images(self.test_size))
            record |= self._test_on_best(history)
            self.report.evaluated()
        return why

    def _test_on_best(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The test split's score of `best`'s weights (the EMA's with --ema), when the run ends: the
        weights just evaluated, or the `best` checkpoint's, lent to the model for the evaluation
        and then given back (the run's last checkpoint holds its last weights)."""
        best = selection.best_index(history, self._best_key)
        module = self.ema.module if self.ema is not None else self.module
        where = self.run_dir / ckpt.BEST_LINK
        if best != len(history) - 1 and not where.exists():  # a branch whose best lies in the run it left
            best = len(history) - 1
        kept = None
        if best != len(history) - 1:
            kept = {k: v.clone() for k, v in module.state_dict().items()}
            load_weights(where, module)
        started = time.perf_counter()
        try:
            result = self.evaluate(self.ema.module if self.ema is not None else self.model, split="test")
        finally:
            if kept is not None:
                module.load_state_dict(kept)
        return {"test_loss": result.loss, "test_acc": result.accuracy, "test_correct": result.correct,
                "test_seen": result.seen, "test_epoch": history[best]["epoch"], "test_step": history[best]["step"],
                "test_time_s": time.perf_counter() - started}  # fmt: skip

    def train_epoch(self) -> dict[str, Any] | None:
        """Trains from the current position to the end of the epoch and returns its summary; saves
        and raises Stopped when a stop signal is agreed on mid-epoch. None: an evaluation inside the
        epoch (--eval-every) ended the run."""
        cfg, acc, pos = self.config, self.accelerator, self.position
        per_step = self.samples_per_step
        if pos.samples_in_epoch == 0:
            self.stats = state.EpochStats.empty(self.steps_per_epoch, acc.device)
        stats, first = self.stats, self.stats.filled
        remaining = self._start_sampler(pos.epoch, pos.samples_in_epoch)
        self.model.train()
        draws = self._augmentation_draws(pos.epoch)
        probe = _LossProbe(acc.device)
        show_every = max(1, remaining // 50)
        self.report.start_epoch(pos.epoch + 1, cfg.epochs, first + remaining, first)
        batches = iter(self.train_loader)
        untimed = 0  # the samples of a warm-up step, left out of the epoch's time
        t0 = time.perf_counter()
        for i in range(first, first + remaining):
            rng = state.torch_rng()
            try:  # the data and the model: a failure here leaves the state of the last whole step
                loss, correct = self._forward_backward(batches, draws)
            except Exception as exc:
                if user_error := self._user_error(exc):
                    raise user_error from None
                self._failed_step_rng = rng
                raise
            lr = self.optimizer.optimizer.param_groups[0]["lr"]  # the LR this step uses
            norm = self._optimizer_step()
            stats.add(loss, correct, lr, norm)
            pos.advance(per_step)
            if self._warmup["train"] is None:  # this process's first step: torch.compile compiles here
                self._warmup["train"] = time.perf_counter() - t0
                t0 = time.perf_counter()  # the epoch's time leaves it out: it is reported as warmup_s
                untimed = per_step
            if self.report.enabled and (i + 1 - first) % show_every == 0:  # the main process shows progress
                self.report.advance(i + 1, per_step, lr, probe.read_then_copy(loss))
            inside = i + 1 < first + remaining  # not the epoch's last step (its evaluation comes after it)
            evaluated = inside and bool(cfg.eval_every) and pos.step % cfg.eval_every == 0
            if evaluated:  # --eval-every: evaluate and save here; the training goes on as it would without
                stats.time_before += time.perf_counter() - t0
                self.report.end_epoch()
                ended = self._evaluate_inside_epoch()
                if ended:
                    return None
                self.report.start_epoch(pos.epoch + 1, cfg.epochs, first + remaining, i + 1)
                t0 = time.perf_counter()
            stopping = inside and self._stop_agreed(step=i + 1)
            if stopping or (inside and not evaluated and self._save_due()):
                stats.time_before += time.perf_counter() - t0
                t0 = time.perf_counter()
                if stopping:
                    self.report.end_epoch()
                if not evaluated:  # an evaluation inside the epoch saved this step already
                    self._save()
                if stopping:
                    self._stop()
        for _ in batches:  # lets accelerate's loader end its epoch (there is no batch left)
            raise RuntimeError(f"the loader holds more than the {remaining} planned steps")
        self.report.end_epoch()
        # The one sync of the epoch: every process's per-step loss and correct count (float32; the
        # sums are exact in double precision on the host).
        summary = stats.summary(acc.gather(stats.mine()).cpu(), cfg.samples_per_step(1))
        seconds = stats.time_before + time.perf_counter() - t0
        timed = summary["samples"] - untimed
        # An epoch whose only step was the warm-up has no timed step: no figure rather than a made-up one.
        return {**summary, "time_s": seconds, "samples_per_s": timed / seconds if timed > 0 and seconds > 0 else None}

    def _user_error(self, exc: Exception) -> ConfigError | None:
        """A step's failure that a setting fixes, as a one-line user error; None for anything else (a bug
        keeps its traceback). Both raise on every process alike, before the step changed anything."""
        text = str(exc)
        if isinstance(exc, ValueError) and "Expected more than 1 value per channel when training" in text:
            if self.config.batch_size != 1:  # the model itself narrowed the batch: not ours to explain
                return None
            return ConfigError(
                "BatchNorm needs at least 2 samples per process in each training batch, and this model has "
                "BatchNorm layers: " + self._say("pass --batch-size 2 or more", "use a batch_size of 2 or more")
            )
        # DDP's refusal of a model whose step leaves parameters without a gradient (the next step's forward).
        if not (isinstance(exc, RuntimeError) and "Expected to have finished reduction in the prior" in text):
            return None
        found = re.search(r"did not receive grad for rank \d+: ([\d ]+)", text)
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        unused = [names[int(i)] for i in found.group(1).split() if int(i) < len(names)] if found else []
        which = f" ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})" if unused else ""
        return ConfigError(
            f"the model has parameters that a step leaves without a gradient{which}, which DDP refuses by default: "
            + self._say("pass --find-unused-parameters", "pass TrainConfig(find_unused_parameters=True)")
        )

    def _forward_backward(self, batches: Any, draws: Tensor | None) -> tuple[Tensor, Tensor]:
        """One optimizer step's micro-batches, forward and backward: their mean loss (a device scalar,
        no sync) and correct count. With --grad-accum K, accelerate's accumulate() skips DDP's gradient
        all-reduce on the first K-1 and its backward() divides each loss by K: the K micro-batches
        of B make the update of one batch of K*B."""
        cfg, acc, losses, correct = self.config, self.accelerator, [], 0
        for _ in range(cfg.grad_accum):
            inputs, labels, index = next(batches)
            with acc.accumulate(self.model) if cfg.grad_accum > 1 else contextlib.nullcontext():
                x = model_input(inputs, self.data.normalization, self.channels_last)
                if draws is not None:
                    x = recipe.augment(x, draws[index], self._augment_pad)
                logits = logits_of(self.model(x))
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                acc.backward(loss)
            losses.append(loss.detach())
            correct = correct + (logits.detach().argmax(dim=1) == labels).sum()
        if cfg.grad_accum > 1 and not acc.sync_gradients:
            raise RuntimeError("accelerate's accumulation counter is out of step with the optimizer steps")
        return (losses[0] if len(losses) == 1 else torch.stack(losses).mean()), correct

    def _optimizer_step(self) -> Tensor | None:
        """Clips (once, after fp16's unscaling), steps the optimizer and the schedule, updates the EMA;
        returns the gradients' total norm before clipping (None without --clip-grad-norm)."""
        acc, opt = self.accelerator, self.optimizer
        norm = None
        if self.config.clip_grad_norm is not None:
            norm = acc.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
        if acc.scaler is None and acc.gradient_accumulation_steps == 1:
            # accelerate's optimizer wrapper would only add per-step checks (an import lookup, an
            # inspect.signature): step the wrapped optimizer directly.
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        return norm

    def _augmentation_draws(self, epoch: int) -> Tensor | None:
        """--augment: every sample's crop and flip for this epoch, on the training device."""
        if not self.config.augment:
            return None
        if self._augment_pad is None:
            height, width = self.data.input_shape[-2:]
            self._augment_pad = recipe.augment_padding(height, width)
        draws = recipe.augmentation_draws(self.train_size, self.config.seed, epoch, self._augment_pad)
        return draws.to(self.accelerator.device)

    def _save_due(self) -> bool:
        return bool(self.config.save_every) and self.position.step % self.config.save_every == 0

    def evaluate(self, model: nn.Module | None = None, split: str = "valid") -> EvalResult:
        """Exact counts over the validation split, or `split="test"` (or the first --limit-eval-batches
        batches per process), of the trained model or of `model` (the EMA's)."""
        if split not in ("valid", "test"):
            raise ConfigError(f"split is 'valid' or 'test', got {split!r}")
        loader, sampler, size = self.eval_loader, self.eval_sampler, self.valid_size
        if split == "test":
            if self.test_loader is None:
                raise ConfigError("this run has no test split apart from its validation split (which is the test "
                                  "split, or data given in Python without test_data)")  # fmt: skip
            loader, sampler, size = self.test_loader, self.test_sampler, self.test_size
        sampler.set_position(0, 0, self._eval_images(size))
        result = evaluate_model(
            self.accelerator, model or self.model, loader, len(self.class_names), self.channels_last,
            self.data.normalization,
        )  # fmt: skip
        if self._warmup["eval"] is None:
            self._warmup["eval"] = result.first_batch_s
        return result

    # ------------------------------------------------------------------ stopping
    def _stop_agreed(self, step: int = 0, force: bool = False) -> bool:
        """True when some process was asked to stop; all processes answer the same at the same step
        (with several, they agree every STOP_CHECK_EVERY steps: one tiny gather)."""
        if self.num_processes == 1:
            return self.stop_signal is not None
        if not force and step % STOP_CHECK_EVERY:
            return False
        acc = self.accelerator
        agreed = int(acc.gather(torch.tensor([int(self.stop_signal or 0)], device=acc.device)).max())
        if agreed and self.stop_signal is None:
            self.stop_signal = agreed
        return agreed > 0

    def request_stop(self, signum: int) -> None:
        """Asks the loop to save and stop after the current step (what the signal handlers call)."""
        self.stop_signal = signum

    def _signal_name(self) -> str:
        return signal.Signals(self.stop_signal).name

    def _stop(self) -> None:
        """After the stop's checkpoint: says where it is and how to go on (on the requeue signal, the
        main process requeues the Slurm job), then raises Stopped."""
        self.finished = True
        self._tell(f"stopped by {self._signal_name()}; checkpoint saved: {self._last_saved}")
        if self.stop_signal == self.requeue_signal:
            if self.accelerator.is_main_process:
                self._tell(runtime.requeue_slurm_job())
        else:
            self._tell(f"resume with: {self._how_to_resume()}")
        raise Stopped(self.stop_signal, self._last_saved)

    def _how_to_resume(self) -> str:
        """The command line that continues this run, or in Python (no command line), the config."""
        if self.command_args is None:
            return 'the same script with TrainConfig(..., resume="latest")'
        # Inside a Slurm batch job, running the job again resumes it; one process asks Slurm how.
        requeue = runtime.slurm_requeue_command(self.command_args) if self.accelerator.is_main_process else None
        return requeue or runtime.resume_command(self.command_args)

    def _tell(self, text: str, error: bool = False) -> None:
        """A line for the person (stdout, or stderr for `error`) and for the run folder's run.log,
        which keeps it when the terminal is gone (SIGHUP)."""
        (self.report.say if error else self.report.line)(text)
        self.log.note(text)

    def _after_failure(self, exc: Exception) -> None:
        """An exception is on its way out of fit(): save what is whole and say where it is.

        An exception from the data or the model (fetching a batch, forward, loss, backward) leaves
        the weights, the optimizer, the schedule and the position of the last whole step, so on one
        process they are saved. With several, the others are already waiting for this one in a
        collective (DDP's gradient all-reduce): this process only says so and leaves, and the
        others stop when the collective finds it gone; the last agreed checkpoint holds the work.
        An exception anywhere else (the optimizer's step, a save) may have left the state half
        changed: nothing more is saved."""
        if isinstance(exc, Stopped | Diverged | runtime.PeerError) or not self._prepared:
            return
        last = f"the last checkpoint, {self._last_saved}," if self._last_saved else "no checkpoint"
        if self._failed_step_rng is None:
            if not isinstance(exc, ConfigError | ckpt.CheckpointError):  # those say what happened themselves
                self._tell(f"the failure came outside the data and the model, where the state may be half changed: "
                           f"nothing more was saved; {last} holds the work", error=True)  # fmt: skip
            return
        if self.num_processes > 1:  # said by this process, whichever it is
            rank = self.accelerator.process_index
            print(f"trainer: [rank {rank}] process {rank} failed in its data or model; with several processes "
                  f"nothing more is saved: {last} holds the work", file=sys.stderr, flush=True)  # fmt: skip
            return
        if self.position.step == 0:
            self._tell("no step had finished: nothing to save", error=True)
            return
        state.set_torch_rng(self._failed_step_rng)  # the generators as the failed step found them
        try:
            self._save()
        except Exception as save_failure:  # noqa: BLE001 (the first failure is the one to report)
            self._tell(f"could not save after the failure ({first_line(save_failure)}); {last} holds the work",
                       error=True)  # fmt: skip
            return
        self._tell(f"the work up to step {self.position.step} is saved in {self._last_saved}; once the cause is "
                   f"fixed, resume with: {self._how_to_resume()}", error=True)  # fmt: skip

    # ------------------------------------------------------------------ divergence
    def _check_finite(self, record: dict[str, Any] | None) -> None:
        """The weights, this epoch's step losses so far and the validation loss are finite on every
        process, or every process raises Diverged. Checked on the one path that every epoch's record
        and every checkpoint takes (`_save`), so nothing non-finite is logged or saved; one sync."""
        acc, stats = self.accelerator, self.stats
        weights = [torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()]
        losses = stats.steps[: stats.filled, 0]
        flags = torch.stack([~torch.stack(weights).all(), ~torch.isfinite(losses).all()]).to(torch.int64)
        bad_weights, bad_loss = acc.gather(flags.unsqueeze(0)).max(dim=0).values.tolist()
        valid = record["valid_loss"] if record is not None else 0.0
        if not (bad_weights or bad_loss or not math.isfinite(valid)):
            return
        step = self.position.step
        mine = losses.tolist()
        first_bad = next((k for k, v in enumerate(mine) if not math.isfinite(v)), None)
        if first_bad is not None:
            what = f"the training loss was {mine[first_bad]} at step {step - len(mine) + first_bad + 1}"
        elif bad_loss:
            what = f"the training loss of another process stopped being finite by step {step}"
        elif not math.isfinite(valid):
            what = f"the validation loss was {valid} after step {step}"
        else:
            what = f"the weights are not finite at step {step}"
        last = self._last_saved
        kept = f"the last checkpoint, {last.name}, is finite" if last else "no checkpoint was written"
        epoch = record["epoch"] if record is not None else self.position.epoch + 1
        cfg = self.config
        advice = [self._say(f"lower --lr (this run: {cfg.lr})", f"lower lr (this run: {cfg.lr})")]
        if cfg.clip_grad_norm is None:
            advice.append(self._say("clip gradients (--clip-grad-norm 1.0)", "clip gradients (clip_grad_norm=1.0)"))
        if self.accelerator.mixed_precision != "no":
            advice.append(f"train in fp32 (this run: {self.accelerator.mixed_precision})")
        message = f"training diverged: {what} (epoch {epoch}); {kept}; {', '.join(advice[:-1])}"
        message += f" or {advice[-1]}" if len(advice) > 1 else advice[0]
        self.log.note(f"error: {message}")  # run.log keeps what happened (and so the run folder stays)
        raise Diverged(message)

    # ------------------------------------------------------------------ output
    def _announce(self) -> None:
        acc, cfg, pos = self.accelerator, self.config, self.position
        items = {
            "run": str(self.run_dir),
            "device": str(acc.device),
            "processes": self.num_processes,
            "precision": acc.mixed_precision,
            "compile": self._compile_text(),
            "memory format": f"{'channels_last' if self.channels_last else 'contiguous'} ({self._memory_format_why})",
            "global batch": f"{self.samples_per_step} ({self._samples_per_step_parts()})",
            "steps/epoch": self.steps_per_epoch,
            "epochs": cfg.epochs,
            "train images": self.train_size,
            "validation": self._validation_text(),
        }
        if self._tests_apart:
            items["test images"] = f"{self.test_size} (scored once, on best, when the run ends)"
        ends = []
        if cfg.early_stop is not None:
            ends.append(f"after {cfg.early_stop} evaluations without a better {self._best_key}")
        if cfg.stop_at is not None:
            ends.append(f"at {cfg.stop_at}")
        if ends:
            items["ends early"] = "; ".join(ends)
        if acc.mixed_precision == "bf16" and runtime.emulated_bf16(acc.device):
            self.report.warn(
                "this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX): bf16 is emulated and slower than fp32"
            )
        if self.threads is not None:
            items["threads"] = f"{self.threads[0]} ({self.threads[1]})"
            if self.threads[0] > runtime.cores():
                self.report.warn(
                    f"{self.threads[0]} threads ({self.threads[1]}) for the {runtime.cores()} cores this process may "
                    "use: threads that outnumber the cores wait on each other, and training slows down"
                )
        if pos.step:
            items["resumed at"] = f"step {pos.step} (epoch {pos.epoch + 1}, sample {pos.samples_in_epoch})"
        self.report.summary(items)
        for record in self.history:  # a resumed run's table continues where it was
            self.report.epoch_row(record)

    def _validation_text(self) -> str:
        """What the validation split is, for people."""
        n, cfg = self.valid_size, self.config
        return {
            "held-out": f"{n} images held out of the training split (by class, seed {cfg.seed})",
            "val": f"the image folder's val/ ({n} images)",
            "eval_data": f"eval_data ({n} samples)",
            "test": f"the test split ({n} images; --val-split 0: `best` is chosen on it)",
        }[self.data.validation]

    def _closing_summary(self) -> None:
        """How long it took, why it ended, the best epoch, its test score, where its checkpoint is
        and what to do with it."""
        history, epochs = self.history, self._epochs_done
        seconds = sum(r.get("epoch_time_s", 0) + r["eval_time_s"] + r.get("warmup_s", 0) + r.get("test_time_s", 0)
                      for r in history)  # fmt: skip
        last, key = history[-1], self._best_key
        best = history[selection.best_index(history, key)]
        where = self.run_dir / ckpt.BEST_LINK
        if "stopped" in last:
            when = f"at step {last['step']}, in epoch" if last.get("inside_epoch") else "after epoch"
            self._tell(f"ended {when} {last['epoch']} of {self.config.epochs}: {last['stopped']}")
        if "target_steps" in last:
            self._tell(
                f"time to {self.config.stop_at}: {last['target_train_s']:.1f} s of training and "
                f"{last['target_eval_s']:.1f} s of evaluation, {last['target_steps']} steps, "
                f"{last['target_samples']} samples"
            )
        metric = key.removesuffix("_ema").replace("_", " ")
        counts = f" ({best[key.replace('acc', 'correct')]}/{best['valid_seen']})" if "_acc" in key else ""
        self._tell(
            f"done: {epochs} epoch{'s' if epochs != 1 else ''} in {_duration(seconds)} of training and evaluation; "
            f"best {metric}{' (EMA)' if self.ema is not None else ''} {best[key]:.4f}{counts} "
            f"{_when(best)}: {where}"
        )
        if "test_acc" in last:
            self._tell(
                f"test: acc {last['test_acc']:.4f} ({last['test_correct']}/{last['test_seen']}), loss "
                f"{last['test_loss']:.4f}, of the weights {_when(best)} (scored once)"
            )
        if self.config.dataset != CUSTOM_DATA:  # the tools rebuild the data from the checkpoint
            model = f" --model {self.factory}" if self.factory else ""
            self.report.line(f"evaluate: python -m trainer.evaluate {where}{model}")
            self.report.line(f"predict:  python -m trainer.predict {where} IMAGE...{model}")

    def _take_warmup(self) -> float:
        """The warm-up seconds not reported yet (all of them in this process's first epoch, then 0)."""
        seconds = sum(v for v in self._warmup.values() if v is not None) - self._warmup_reported
        self._warmup_reported += seconds
        return seconds

    def _compile_text(self) -> str:
        plugin = self.accelerator.state.dynamo_plugin
        backend = str(getattr(plugin.backend, "value", plugin.backend)).lower()
        return "no" if backend == "no" else f"{backend} ({plugin.mode or 'default'})"

    def _epoch_record(
        self, train: dict[str, Any], valid: EvalResult, averaged: EvalResult | None, eval_time: float
    ) -> dict[str, Any]:
        record = {
            "epoch": self.position.epoch + 1,
            "step": self.position.step,
            "train_loss": train["loss"],
            "train_acc": train["acc"],
            "train_samples": train["samples"],
            **self._evaluation_numbers(valid, None),
            "lr": train["curve"]["lr"][-1],  # the LR of the epoch's last step (the scheduler is one ahead)
            "epoch_time_s": train["time_s"],
            "eval_time_s": eval_time,
            # Only in the first epoch this process runs: its first step and first evaluation batch
            # (left out of epoch_time_s and eval_time_s).
            "warmup_s": self._take_warmup(),
            "train_samples_per_s": train["samples_per_s"],
            "num_processes": self.num_processes,
            "mixed_precision": self.accelerator.mixed_precision,
        }
        if self.config.clip_grad_norm is not None:  # the norms before clipping
            record |= {"grad_norm_mean": train["grad_norm_mean"], "grad_norm_max": train["grad_norm_max"]}
        if averaged is not None:
            record |= {k: v for k, v in self._evaluation_numbers(valid, averaged).items() if k.endswith("_ema")}
        return record

    def _evaluation_numbers(self, valid: EvalResult, averaged: EvalResult | None) -> dict[str, Any]:
        """An evaluation's part of a record: the validation split's numbers (and the EMA's)."""
        numbers = {"valid_loss": valid.loss, "valid_acc": valid.accuracy, "valid_correct": valid.correct,
                   "valid_seen": valid.seen, "validation": self.data.validation}  # fmt: skip
        if averaged is not None:
            numbers |= {"valid_loss_ema": averaged.loss, "valid_acc_ema": averaged.accuracy,
                        "valid_correct_ema": averaged.correct}  # fmt: skip
        return numbers

    @property
    def _best_key(self) -> str:
        """What `best` is chosen by: --monitor, of the weights evaluate and predict use (the EMA's
        when there is one)."""
        return selection.monitored(self.config)

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> state.Parts:
        return state.Parts(self.module, self.optimizer.optimizer, self.scheduler.scheduler,
                           self.accelerator.scaler, self.ema)  # fmt: skip

    def _save(self, record: dict[str, Any] | None = None, curve: dict[str, Any] | None = None) -> None:
        """Saves a checkpoint; after an epoch, `record` (its metrics) and `curve` go to the logs first.
        Every process calls this: gathers what only it knows, the main process writes, all agree."""
        acc, pos = self.accelerator, self.position
        self._check_finite(record)
        if record is not None:
            if curve is None:  # an evaluation inside the epoch
                self.log.add_evaluation(record)
            else:
                self.log.add_epoch(record, curve)
            self.report.epoch_row(record)
        rng = {k: acc.gather(v.to(acc.device).unsqueeze(0)).cpu() for k, v in state.rng_state().items()}
        progress = {}
        if pos.samples_in_epoch:  # mid-epoch: the interrupted epoch's per-step stats of every process
            progress = {"epoch_stats": acc.gather(self.stats.mine()).cpu(), "epoch_carry": self.stats.carry}
        failure: BaseException | None = None
        if acc.is_main_process:
            try:
                extra = {"world_size": self.num_processes, "limit_samples": self.limit_samples,
                         "mixed_precision": acc.mixed_precision,
                         "history": self.log.history, "curves": self.log.curves,
                         "data_digest": self.data.digest, "lineage": self.lineage}  # fmt: skip
                metadata = state.model_metadata(self.architecture, self.factory, self.data, pos, self.history)
                contents = state.contents(self._parts(), pos, self.stats, self.config, metadata, rng, progress, extra)
                folder = ckpt.save(self.run_dir, pos.step, contents)
                if record is not None and selection.best_index(self.history, self._best_key) == len(self.history) - 1:
                    ckpt.update_best(self.run_dir, folder)
                ckpt.prune(self.run_dir, self.config.keep_last)
            except ckpt.SaveError as exc:
                failure = exc
            except OSError as exc:  # updating `best` or pruning, after the new checkpoint is complete
                failure = ckpt.SaveError(ckpt.describe_write_error(exc, "the run folder's links", self.run_dir))
            except Exception as exc:  # a bug: its traceback, after the other processes were told
                failure = exc
        runtime.agree(failure, "save a checkpoint")
        self._last_saved = self.run_dir / ckpt.step_dir_name(pos.step)

    def _find_resume_point(self, resume: str) -> Path:
        """The checkpoint to resume (every process agrees on it), checked against this run's recipe
        before any data is read or anything is written."""
        folder = runtime.agree_on_checkpoint(resume, self.run_dir, warn=self.report.warn)
        newer = [p.name for p in ckpt.list_checkpoints(self.run_dir) if ckpt.step_of(p) > ckpt.step_of(folder)]
        if resume != "latest" and newer and folder.parent.resolve() == self.run_dir.resolve():
            raise ConfigError(
                f"{self.run_dir} has checkpoints newer than {folder.name} ({', '.join(newer[:3])}); resuming "
                "the older one here would overwrite them: "
                + self._say("pass a new --run-name to branch from it", "pass a new run_name to branch from it")
            )
        saved = ckpt.read_state(folder)
        self.limit_samples = saved["limit_samples"]
        state.check_recipe(folder, saved["config"], self.config,
                           self._say("leave the flag out to continue it; a new run from its weights with a new recipe "
                                     "takes another --run-name and --init-from",
                                     "init_from= starts a new run from its weights with a new recipe"))  # fmt: skip
        return folder

    def _say(self, on_the_command_line: str, in_python: str) -> str:
        """Advice in the terms of how this run was started."""
        return in_python if self.command_args is None else on_the_command_line

    def _resume(self, folder: Path) -> None:
        acc, cfg = self.accelerator, self.config
        loaded = ckpt.load(folder)
        saved = loaded.state
        state.check_data(folder, saved["data_digest"], self.data.digest, cfg)
        if loaded.model_metadata.get("architecture") != self.architecture:
            raise ConfigError(
                f"{folder / ckpt.MODEL_NAME} holds a {loaded.model_metadata.get('architecture')!r} model, "
                f"this run builds {self.architecture!r}"
            )
        live = {"model": self.module.state_dict(), "ema": self.ema, "optimizer": self.optimizer.optimizer,
                "kind": cfg.optimizer, "scheduler": self.scheduler.scheduler, "scaler": acc.scaler,
                "world": self.num_processes}  # fmt: skip
        schema.check_tensors(folder, loaded, live, self.steps_per_epoch)  # before anything is restored
        state.check_rng(folder, loaded.rng)
        chosen = cfg.mixed_precision is not None  # on the command line, not from accelerate's config
        state.check_precision(folder, saved["mixed_precision"], acc.mixed_precision, chosen, self.report.warn)
        self.position = state.restore(folder, loaded, self._parts(), acc.process_index)
        if self.position.samples_in_epoch:
            self.stats = state.restore_epoch_stats(loaded, self.steps_per_epoch, self.num_processes,
                                                   acc.process_index, acc.device)  # fmt: skip
        self.log.history, self.log.curves = saved["history"], saved["curves"]
        self.lineage = saved["lineage"]
        if saved["world_size"] != self.num_processes and self.position.epoch < cfg.epochs:
            pos = self.position
            steps_left = self._start_sampler(pos.epoch, pos.samples_in_epoch) + (cfg.epochs - pos.epoch - 1) * (
                self.steps_per_epoch
            )
            units_left = max(steps_left - 1, 0) * self.num_processes + 1
            self.scheduler.scheduler = recipe.rescaled_schedule(
                self.scheduler.scheduler, self.optimizer.optimizer, cfg, units_left, self.num_processes
            )
            self.report.warn(
                f"resuming a {saved['world_size']}-process checkpoint on {self.num_processes} processes: the data "
                "order and LR position carry over; results will not be bitwise equal to an unbroken run"
            )
        self._last_saved = folder
        self.log.write()
        if self.position.epoch < cfg.epochs:
            self.report.line(f"resumed from {folder} (step {self.position.step})")


def _yield_of(trainer: Trainer) -> Callable[[], None]:
    """The run lock's call to `trainer._yield_run_dir`, holding the Trainer weakly."""
    ref = weakref.ref(trainer)

    def yield_run_dir() -> None:
        if (alive := ref()) is not None:
            alive._yield_run_dir()

    return yield_run_dir


def _when(record: dict[str, Any]) -> str:
    """When a record's evaluation came: after its epoch, or at its step inside the epoch."""
    return (
        f"at step {record['step']} (epoch {record['epoch']})"
        if record.get("inside_epoch")
        else (f"after epoch {record['epoch']}")
    )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


class _LossProbe:
    """The latest loss for the progress bar, read without making the host wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.value = torch.zeros((), pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False
        self.last: float | None = None

    def read_then_copy(self, loss: Tensor) -> float | None:
        if self.pending and (not self.cuda or self.event.query()):
            self.last, self.pending = float(self.value), False
        if not self.pending:
            self.value.copy_(loss.detach(), non_blocking=self.cuda)
            if self.cuda:
                self.event.record()
            self.pending = True
        return self.last
