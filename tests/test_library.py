"""The Trainer as a library: your own model and your own Dataset, with the CLI's guarantees (exact
counts, the exact LR schedule, signal-safe checkpoints, bitwise resume, one-line errors)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import budget, fork_processes, reset_accelerate
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import MAX_LR, assert_one_cycle
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from trainer import Stopped, TrainConfig, Trainer
from trainer import checkpoint as ckpt
from trainer.config import ConfigError

FEATURES, CLASSES = 20, 3
N_TRAIN, N_EVAL = 512, 101  # 101: no batch size or process count used here divides it
BATCH = 16
EPOCHS = 3
TIMING_KEYS = ("epoch_time_s", "eval_time_s", "warmup_s", "train_samples_per_s")
SEQUENTIAL = "torch.nn.modules.container:Sequential"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


def make_vectors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable float vectors: class k is a fixed random centre plus unit noise (the centres are
    shared by every split)."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[labels] + torch.randn(n, FEATURES, generator=g), labels


class Vectors(Dataset):
    """A plain map-style Dataset (not a TensorDataset): one (float vector, int label) per index.

    Armed with `signal_after`, it sends this process `signum` when that many samples have been
    read since arming: a stop at a chosen point of the run, driven by the data, not by a clock."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels.tolist()
        self.pid = os.getpid()
        self.reads = 0
        self.signal_after: int | None = None
        self.signum = signal.SIGTERM

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        if self.reads == self.signal_after:
            os.kill(self.pid, self.signum)
        return self.inputs[index], self.labels[index]


def vectors(n: int = N_TRAIN, seed: int = 1) -> Vectors:
    return Vectors(*make_vectors(n, seed))


def make_mlp(outputs: int = CLASSES) -> nn.Module:
    """The same initial weights every time (torch's global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, outputs))


def config(out: Path, run_name: str = "mlp", **kw) -> TrainConfig:
    values = dict(epochs=EPOCHS, batch_size=BATCH, eval_batch_size=BATCH, lr=MAX_LR, output_dir=str(out),
                  run_name=run_name, cpu=True, progress="plain", channels_last=False)  # fmt: skip
    return TrainConfig(**{**values, **kw})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.find_latest(run) / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def check_run(run: Path, nproc: int, class_names: list[str]) -> None:
    """Exact counts, OneCycle's last LR on the last step, a checkpoint of the user's own model."""
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["valid_seen"] for r in rows] == [N_EVAL] * EPOCHS
    assert all(r["num_processes"] == nproc for r in rows)
    assert rows[-1]["valid_acc"] >= 0.9, rows[-1]  # chance is 1/3
    lrs = [lr for c in read_jsonl(run / "curves.jsonl") for lr in c["lr"]]
    assert len(lrs) == rows[-1]["step"] == EPOCHS * (N_TRAIN // (BATCH * nproc))
    assert_one_cycle(lrs)  # ends at max_lr / 25 / 1e4 exactly
    latest = ckpt.find_latest(run)
    ckpt.verify(latest)
    assert sorted(load_file(latest / "model.safetensors")) == sorted(make_mlp().state_dict())
    with safe_open(latest / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == SEQUENTIAL
    assert json.loads(meta["class_names"]) == class_names
    assert json.loads(meta["input_shape"]) == [FEATURES]


def test_custom_model_on_a_plain_dataset_one_process(tmp_path):
    """Your MLP and your Dataset: every eval sample counted once, the schedule's last step exact,
    the checkpoint holds your model's own keys, and fit() returns what metrics.jsonl holds."""
    model = make_mlp()
    trainer = Trainer(config(tmp_path), model=model, train_data=vectors(), eval_data=vectors(N_EVAL, seed=2),
                      class_names=["a", "b", "c"])  # fmt: skip
    history = trainer.fit()
    run = tmp_path / "mlp"
    assert history == read_jsonl(run / "metrics.jsonl")
    check_run(run, 1, ["a", "b", "c"])
    # The module passed in is the one trained: it holds the final checkpoint's weights.
    assert_same_weights(final_weights(run), {k: v.detach() for k, v in model.state_dict().items()})


def train_two(args: list[str]) -> int:
    """In each forked process: the same script as on one process (no class names: "0".."2")."""
    trainer = Trainer(config(Path(args[0]), "two"), model=make_mlp(), train_data=vectors(),
                      eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    trainer.fit()
    return 0


@pytest.mark.slow
def test_custom_model_on_a_plain_dataset_two_processes(tmp_path):
    """The same script on 2 gloo processes: still 101 of 101 counted, the last LR exact, and no
    DDP `module.` prefix in the checkpoint."""
    forked = fork_processes([str(tmp_path)], nproc=2, target=train_two)
    result = forked.wait(600)
    assert result.codes == [0, 0], forked.read(0) + forked.read(1)
    check_run(tmp_path / "two", 2, ["0", "1", "2"])


def run_mlp(out: Path, run_name: str, train: Dataset | None = None, **kw) -> list[dict]:
    trainer = Trainer(config(out, run_name, **kw), model=make_mlp(), train_data=train or vectors(),
                      eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    return trainer.fit()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resume_latest_equals_an_unbroken_run(tmp_path, signum):
    """A SIGTERM (or Ctrl-C) in the middle of epoch 2 saves a checkpoint and raises Stopped; the
    same script with resume="latest" then ends with the weights and metrics of a run never stopped."""
    unbroken = run_mlp(tmp_path, "unbroken", num_workers=0)

    train = vectors()
    trainer = Trainer(config(tmp_path, "broken", num_workers=0), model=make_mlp(), train_data=train,
                      eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    train.reads, train.signal_after = 0, N_TRAIN + 7 * BATCH + 3  # a read during epoch 2's 8th step
    train.signum = signum
    try:
        with pytest.raises(Stopped) as stopped:
            trainer.fit()
    except KeyboardInterrupt:  # would otherwise end the whole pytest session
        pytest.fail("the SIGINT escaped fit() as a KeyboardInterrupt")
    steps_per_epoch = N_TRAIN // BATCH
    run = tmp_path / "broken"
    assert stopped.value.signum == signum
    assert Path(stopped.value.checkpoint) == ckpt.find_latest(run)
    ckpt.verify(Path(stopped.value.checkpoint))
    step = ckpt.step_of(Path(stopped.value.checkpoint))
    assert steps_per_epoch < step < 2 * steps_per_epoch, step  # mid-epoch: the data position matters
    assert len(read_jsonl(run / "metrics.jsonl")) == 1

    reset_accelerate()
    resumed = Trainer(config(tmp_path, "broken", num_workers=0, resume="latest"), model=make_mlp(),
                      train_data=vectors(), eval_data=vectors(N_EVAL, seed=2)).fit()  # fmt: skip
    assert deterministic(resumed) == deterministic(unbroken)
    assert deterministic(read_jsonl(run / "metrics.jsonl")) == deterministic(
        read_jsonl(tmp_path / "unbroken" / "metrics.jsonl")
    )
    assert read_jsonl(run / "curves.jsonl") == read_jsonl(tmp_path / "unbroken" / "curves.jsonl")
    assert_same_weights(final_weights(run), final_weights(tmp_path / "unbroken"))

    # Negative control: the comparison can fail (another seed, another data order, other weights).
    reset_accelerate()
    other = run_mlp(tmp_path, "other-seed", seed=13, num_workers=0)
    assert deterministic(other) != deterministic(unbroken)
    a, b = final_weights(tmp_path / "other-seed"), final_weights(tmp_path / "unbroken")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_tensor_dataset_fast_path_gives_the_plain_dataset_numbers(tmp_path):
    """The same float vectors as a TensorDataset (one index op per batch) or as a plain Dataset
    (a DataLoader) train the same run."""
    x, y = make_vectors(N_TRAIN, 1)
    fast = run_mlp(tmp_path, "fast", train=TensorDataset(x, y))
    reset_accelerate()
    plain = run_mlp(tmp_path, "plain", train=Vectors(x, y))
    assert deterministic(fast) == deterministic(plain)
    assert_same_weights(final_weights(tmp_path / "fast"), final_weights(tmp_path / "plain"))

    # Negative control: the same samples stored in another order are another run.
    reset_accelerate()
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(5))
    shuffled = run_mlp(tmp_path, "shuffled", train=TensorDataset(x[perm], y[perm]))
    assert deterministic(shuffled) != deterministic(fast)


def test_default_network_on_python_data_counts_classes_from_the_labels(tmp_path):
    """No model and no class names: the default network gets max label + 1 classes, over both
    splits (here the evaluation data holds a class the training data lacks), named "0".."3"."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (64, 1, 12, 12), generator=g, dtype=torch.uint8)
    train = TensorDataset(images[:48], torch.randint(0, 3, (48,), generator=g))
    test = TensorDataset(images[48:], torch.tensor([3] + [0] * 15))
    cfg = config(tmp_path, "default-net", epochs=1, limit_train_batches=2, channels_last=True)
    history = Trainer(cfg, train_data=train, eval_data=test).fit()
    assert history[-1]["valid_seen"] == 16
    with safe_open(ckpt.find_latest(tmp_path / "default-net") / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["class_names"]) == ["0", "1", "2", "3"]
    assert json.loads(meta["input_shape"]) == [1, 12, 12]


class Unlabelled(Dataset):
    """A Dataset whose labels are known only by reading its samples (no `labels` or `targets`)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.samples = list(zip(inputs, labels.tolist()))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples[index]


class Mapped(Vectors):
    """Samples as dicts, as some libraries return them: not the (input, label) pairs asked for."""

    def __getitem__(self, index: int) -> dict:
        return {"x": self.inputs[index], "y": self.labels[index]}


class Squeezed(nn.Module):
    """Logits of shape [B] instead of [B, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(1)


@pytest.mark.parametrize(
    "case",
    ["train-without-eval", "eval-without-train", "output-not-2d", "output-too-few-classes",
     "too-few-class-names", "train-smaller-than-a-batch",
     "label-read-beyond-the-outputs", "label-read-beyond-the-outputs-in-a-worker", "empty-train",
     "dict-samples", "string-label-read-in-a-worker", "uint8-images-channels-last"],
)  # fmt: skip
def test_bad_inputs_are_one_line_config_errors(tmp_path, case):
    """Each mistake is a ConfigError of one line, before a single epoch is logged."""
    kwargs = {"model": make_mlp(), "train_data": vectors(), "eval_data": vectors(N_EVAL, seed=2)}
    settings = {}
    if case == "train-without-eval":
        del kwargs["eval_data"]
    elif case == "eval-without-train":
        del kwargs["train_data"]
    elif case == "output-not-2d":
        kwargs["model"] = Squeezed()
    elif case == "output-too-few-classes":  # the labels go up to 2: three classes, two logits
        kwargs["model"] = make_mlp(outputs=2)
    elif case == "too-few-class-names":
        kwargs["class_names"] = ["a", "b"]
    elif case == "train-smaller-than-a-batch":
        kwargs["train_data"] = vectors(BATCH - 1)
    elif case.startswith("label-read-beyond-the-outputs"):  # known only once the samples are read
        kwargs["model"] = make_mlp(outputs=2)
        kwargs["train_data"] = Unlabelled(*make_vectors(N_TRAIN, 1))
        kwargs["eval_data"] = Unlabelled(*make_vectors(N_EVAL, 2))
        settings["num_workers"] = 1 if case.endswith("worker") else 0
    elif case == "empty-train":
        kwargs["train_data"] = vectors(0)
    elif case == "dict-samples":
        kwargs["train_data"] = Mapped(*make_vectors(N_TRAIN, 1))
    elif case == "string-label-read-in-a-worker":  # the first sample is fine; a later one is not
        kwargs["train_data"] = Unlabelled(*make_vectors(N_TRAIN, 1))
        kwargs["train_data"].samples[5] = (kwargs["train_data"].samples[5][0], "five")
        settings["num_workers"] = 1
    elif case == "uint8-images-channels-last":  # CIFAR-10's .data layout, [N, 32, 32, 3]
        images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
        kwargs = {"train_data": TensorDataset(images, torch.arange(64) % 3),
                  "eval_data": TensorDataset(images[:8], torch.arange(8) % 3)}  # fmt: skip
    with pytest.raises(ConfigError) as error:
        Trainer(config(tmp_path, **settings), **kwargs).fit()
    message = str(error.value)
    assert message and "\n" not in message, message
    assert not (tmp_path / "mlp" / "metrics.jsonl").exists()


def train_two_then_stop(args: list[str]) -> int:
    """In each forked process: the script on 2 processes; process 0 gets a SIGTERM from its data
    during epoch 2 (the processes agree on stopping within 10 steps)."""
    train = vectors()
    trainer = Trainer(config(Path(args[0]), "elastic", num_workers=0), model=make_mlp(), train_data=train,
                      eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    if os.environ["RANK"] == "0":
        per_epoch = N_TRAIN // 2  # each process reads half of every epoch
        train.reads, train.signal_after, train.signum = 0, per_epoch + 3 * BATCH + 5, signal.SIGTERM
    try:
        trainer.fit()
    except Stopped as stopped:
        return 128 + stopped.signum
    return 0


@pytest.mark.slow
def test_a_python_dataset_run_stopped_on_two_processes_resumes_on_one(tmp_path):
    """Elastic resume on the DataLoader path: 2 processes stop mid-epoch, 1 process finishes the
    run; the interrupted epoch still trains every sample once, evaluation still counts all 101,
    and the schedule still ends on OneCycle's final LR at the last step."""
    forked = fork_processes([str(tmp_path)], nproc=2, target=train_two_then_stop)
    result = forked.wait(600)
    assert result.codes == [143, 143], forked.read(0) + forked.read(1)
    run = tmp_path / "elastic"
    step = ckpt.step_of(ckpt.find_latest(run))
    per_epoch_two = N_TRAIN // (BATCH * 2)
    assert per_epoch_two < step < 2 * per_epoch_two, step

    history = Trainer(config(tmp_path, "elastic", resume="latest"), model=make_mlp(), train_data=vectors(),
                      eval_data=vectors(N_EVAL, seed=2)).fit()  # fmt: skip
    assert [r["num_processes"] for r in history] == [2, 1, 1]
    assert [r["valid_seen"] for r in history] == [N_EVAL] * EPOCHS
    assert [r["train_samples"] for r in history] == [N_TRAIN] * EPOCHS  # the stopped epoch: every sample once
    done_on_one = (N_TRAIN - (step - per_epoch_two) * BATCH * 2) // BATCH
    assert history[-1]["step"] == step + done_on_one + N_TRAIN // BATCH
    lrs = [lr for c in read_jsonl(run / "curves.jsonl") for lr in c["lr"]]
    assert len(lrs) == history[-1]["step"]
    assert lrs[-1] == pytest.approx(MAX_LR / 25 / 1e4, rel=1e-9)
    assert history[-1]["valid_acc"] >= 0.9


class OtherMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_resuming_with_a_model_of_another_class_is_refused(tmp_path):
    """The checkpoint records the model's class; another class is refused in one line, and the run
    folder is left as it was."""
    run_mlp(tmp_path, "mlp", epochs=1)
    before = sorted(p.name for p in (tmp_path / "mlp").iterdir())
    reset_accelerate()
    with pytest.raises(ConfigError, match="holds a 'torch.nn.modules.container:Sequential' model") as error:
        Trainer(config(tmp_path, "mlp", epochs=1, resume="latest"), model=OtherMLP(), train_data=vectors(),
                eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
    assert "\n" not in str(error.value) and "OtherMLP" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "mlp").iterdir()) == before


class Augmented(Vectors):
    """Adds noise from torch's global generator to every sample read, as a random augmentation does."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        inputs, label = super().__getitem__(index)
        return inputs + 0.5 * torch.randn(FEATURES), label


def test_a_datasets_own_randomness_does_not_depend_on_workers(tmp_path, monkeypatch):
    """Augmentations drawn from torch's global generator give the same run with 0 or 2 workers (each
    sample is read with the generator seeded from seed, epoch and index)."""
    from trainer import data

    def run(name: str, workers: int) -> list[dict]:
        reset_accelerate()
        train = Augmented(*make_vectors(N_TRAIN, 1))
        trainer = Trainer(config(tmp_path, name, epochs=2, num_workers=workers), model=make_mlp(), train_data=train,
                          eval_data=vectors(N_EVAL, seed=2))  # fmt: skip
        return deterministic(trainer.fit())

    assert run("w0", 0) == run("w2", 2)
    # Negative control: without the per-sample seeding, worker processes draw other noise.
    monkeypatch.setattr(data, "_seeded", lambda base, index: contextlib.nullcontext())
    assert run("plain-w0", 0) != run("plain-w2", 2)


# Values of every kind a Python caller may pass: Python's and numpy's numbers, bools, strings, paths.
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.just(10**400), st.floats(),
    st.integers(-1000, 1000).map(np.int64), st.integers(0, 255).map(np.uint8), st.booleans().map(np.bool_),
    st.floats(width=32).map(np.float32), st.floats().map(np.float64),
    st.text(max_size=8), st.text(max_size=8).map(Path), st.just(b"bytes"),
)  # fmt: skip
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def plain(name: str, value: object) -> object:
    """The built-in value a numpy number or a path stands for (a numpy bool stands for none)."""
    if isinstance(value, np.integer | np.floating):
        return value.item()
    return str(value) if isinstance(value, Path) and FIELDS[name].metadata.get("path") else value


@budget(300)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), ANY_VALUE, max_size=3))
def test_config_takes_numbers_and_paths_of_any_kind_as_builtin_values_or_refuses_them(values):
    """numpy's integers and reals, and paths for the path fields, are taken exactly where Python's
    int, float and str are, and stored as those, equal to them; anything else is a ConfigError, never
    another exception."""
    builtin = {name: plain(name, value) for name, value in values.items()}
    try:
        config = TrainConfig(**values)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        with pytest.raises(ConfigError):
            TrainConfig(**builtin)
        return
    assert config == TrainConfig(**builtin)
    for name, value in values.items():
        stored = getattr(config, name)
        if value is None:
            assert stored is None
        elif isinstance(value, Path):
            assert FIELDS[name].metadata.get("path") and stored == str(value) and type(stored) is str
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            assert type(stored) in (int, float) and stored == value, (name, value, stored)
        else:
            assert type(stored) in (bool, str), (name, value, stored)


def test_config_names_the_field_of_a_value_of_the_wrong_type():
    with pytest.raises(ConfigError, match=r"^epochs \(--epochs\) must be an int, got 2\.5$"):
        TrainConfig(epochs=2.5)
    config = TrainConfig(output_dir=Path("runs"), epochs=np.int64(3), lr=np.float32(0.25))
    assert (config.output_dir, config.epochs, config.lr) == ("runs", 3, 0.25)
    assert (type(config.epochs), type(config.lr)) == (int, float)


def test_a_trainer_never_fitted_yields_its_run_folder_to_the_next_one_in_the_process(tmp_path):
    """A notebook: a cell that builds a Trainer, run twice. The second Trainer takes the folder from
    the first, which was never fitted; fitting the first afterwards says why it cannot."""
    first = Trainer(config(tmp_path), make_mlp(), vectors(), vectors(N_EVAL, seed=2))
    second = Trainer(config(tmp_path), make_mlp(), vectors(), vectors(N_EVAL, seed=2))
    assert len(second.fit()) == EPOCHS
    with pytest.raises(ConfigError, match="closed when a later one took its run folder .*: fit that one"):
        first.fit()
    reset_accelerate()
    lost = Trainer(config(tmp_path, "lost"), make_mlp(), vectors(), vectors(N_EVAL, seed=2))
    del lost  # a Trainer nobody holds any more is collected, and its lock with it
    import gc

    gc.collect()
    Trainer(config(tmp_path, "lost"), make_mlp(), vectors(), vectors(N_EVAL, seed=2)).close()


def test_a_trainer_that_is_fitting_keeps_its_run_folder_from_another_in_the_process(tmp_path, capsys):
    """fit() in a thread (a notebook's background job): it trains without signal handlers, says so,
    a second Trainer in the process cannot take the folder while it is fitting, and request_stop
    from another thread stops it after the current step, saved."""
    import threading

    reached, go = threading.Event(), threading.Event()

    class Waits(nn.Module):  # its second forward waits until the test has tried the folder
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.calls = make_mlp(), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 2:
                reached.set()
                assert go.wait(120)
            return self.mlp(x)

    fitting = Trainer(config(tmp_path), Waits(), vectors(), vectors(N_EVAL, seed=2))
    ended: list[BaseException] = []

    def fit() -> None:
        try:
            fitting.fit()
        except BaseException as exc:  # noqa: BLE001 (the test looks at it)
            ended.append(exc)

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        assert reached.wait(120)
        with pytest.raises(ckpt.CheckpointError, match="in use by another Trainer in this process, which is fitting"):
            Trainer(config(tmp_path), make_mlp(), vectors(), vectors(N_EVAL, seed=2))
        fitting.request_stop(signal.SIGTERM)
    finally:
        go.set()
        thread.join(120)
    assert len(ended) == 1 and isinstance(ended[0], Stopped), ended
    assert ended[0].checkpoint == ckpt.find_latest(tmp_path / "mlp")  # mid-epoch 1: the step it was in, saved
    assert ckpt.step_of(ended[0].checkpoint) < len(vectors()) // BATCH
    ckpt.verify(ended[0].checkpoint)
    assert "fit() runs outside the main thread, which alone receives signals" in capsys.readouterr().err
