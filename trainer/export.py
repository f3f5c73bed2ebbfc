"""`python -m trainer.export CHECKPOINT --format onnx|torch-export|hf OUT`: a trained model for other tools.

The model is rebuilt as evaluate rebuilds it (`trainer.evaluation.load_model`: a built-in
architecture by name, anything else only from a `--model` factory typed again, the EMA's weights
when the checkpoint has them). Then:

- `onnx` and `torch-export` write one graph, `pixels -> logits`, that takes what predict builds:
  float32 pixels [batch, channels, height, width] on the 0-255 scale, any batch size. The
  normalisation the model was trained with is inside the graph, so a consumer feeds raw pixels.
  What the graph's inputs and outputs mean (classes, input shape, data set, source checkpoint) is
  in the file: ONNX `metadata_props`, and `trainer.json` among the `.pt2` archive's extra files.
- `hf` writes a Hugging Face-style folder: `config.json`, `model.safetensors` (the weights, with the
  metadata evaluate and predict read) and a `README.md` model card. `trainer.from_pretrained(folder)`
  loads it offline; evaluate and predict take the folder as they take a checkpoint.

Every file is written next to its final name and renamed into place: an export that fails (a full
disk, an architecture the exporter cannot express) leaves what was there before.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer import checkpoint as ckpt
from trainer.config import ConfigError
from trainer.data import model_input
from trainer.errors import HelpFormatter, Parser, fail, first_line
from trainer.evaluation import LoadedModel, load_model, recorded, recorded_config
from trainer.model import logits_of

FORMATS = ("onnx", "torch-export", "hf")
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2"}
METADATA_KEY = "trainer"  # ONNX metadata_props key, and trainer.json in a .pt2 archive
PT2_EXTRA = "trainer.json"
HF_CONFIG = "config.json"
CARD_NAME = "README.md"
# The normalisation of a graph that normalises inside itself: pixels are fed as they are.
IN_GRAPH = {"divide_by": 1.0, "mean": 0.0, "std": 1.0}
INSTALL = 'pip install -e ".[export]" in the checkout (onnx, onnxscript and onnxruntime)'
# An exported graph read back for predict: larger files are not graphs of this trainer's models.
MAX_GRAPH_BYTES = 1 << 31


class PixelsToLogits(nn.Module):
    """The exported graph: pixels on the 0-255 scale [B, C, H, W] -> logits [B, classes], the
    normalisation the model was trained with included (none for inputs that are not pixels)."""

    def __init__(self, model: nn.Module, normalization: dict[str, float] | None) -> None:
        super().__init__()
        self.model = model
        self.normalization = normalization

    def forward(self, pixels: Tensor) -> Tensor:
        return logits_of(self.model(model_input(pixels, self.normalization)))


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """What a consumer needs to feed an exported graph and read its output."""
    source = loaded.path.parent if loaded.state is not None else loaded.path
    return {
        "library": "trainer",
        "trainer_version": _version(),
        "architecture": loaded.architecture,
        "dataset": loaded.dataset,
        "class_names": list(loaded.class_names),
        "num_classes": len(loaded.class_names),
        "input_shape": list(loaded.input_shape),
        "input": "float32 pixels [batch, channels, height, width] on the 0-255 scale",
        "normalization": loaded.normalization or {},
        "weights": loaded.weights,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "source": str(source),
        "source_sha256": ckpt._sha256(loaded.path, loaded.path.stat().st_size),
    }


def _version() -> str:
    from trainer import __version__

    return __version__


def _example(loaded: LoadedModel) -> Tensor:
    """Two inputs (a batch of one lets the exporters specialise the batch dimension to 1)."""
    return torch.rand(2, *loaded.input_shape) * 255


def _graph(loaded: LoadedModel) -> PixelsToLogits:
    return PixelsToLogits(loaded.model, loaded.normalization).eval()


def export_onnx(loaded: LoadedModel, out: Path) -> Path:
    """`out` (.onnx): the model as ONNX, with a dynamic batch dimension, through torch's dynamo exporter."""
    try:
        import onnx  # noqa: F401 (the exporter needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(f"--format onnx needs onnx and onnxscript: {INSTALL}") from None
    batch = torch.export.Dim("batch")
    graph = _graph(loaded)
    with _quiet():
        try:
            program = torch.onnx.export(
                graph, (_example(loaded),), None, dynamo=True, input_names=["pixels"], output_names=["logits"],
                dynamic_shapes={"pixels": {0: batch}}, optimize=True, verbose=False,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 (an architecture ONNX cannot express: one line)
            raise ConfigError(f"ONNX cannot express this {loaded.architecture} model: {_why(exc)}") from None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(describe(loaded))
    data = proto.SerializeToString()
    _write_atomic(out, lambda tmp: tmp.write_bytes(data))
    return out


def export_pt2(loaded: LoadedModel, out: Path) -> Path:
    """`out` (.pt2): the model as a `torch.export` program with a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    with _quiet():
        try:
            program = torch.export.export(_graph(loaded), (_example(loaded),), dynamic_shapes={"pixels": {0: batch}})
        except Exception as exc:  # noqa: BLE001 (a model torch.export cannot trace: one line)
            raise ConfigError(f"torch.export cannot trace this {loaded.architecture} model: {_why(exc)}") from None
    extra = {PT2_EXTRA: json.dumps(describe(loaded))}
    _write_atomic(out, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return out


def save_pretrained(loaded: LoadedModel, out: Path) -> Path:
    """`out`: a Hugging Face-style folder (config.json, model.safetensors, README.md). An existing
    folder is replaced only when it is an earlier export of this kind (or empty)."""
    from safetensors.torch import save_file

    if out.exists() and not _replaceable(out):
        raise ConfigError(f"{out} exists and is not an exported model folder: name a new folder")
    config = describe(loaded)
    metadata = _weights_metadata(loaded)
    state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(state, tmp / ckpt.MODEL_NAME, metadata=metadata)
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_NAME).write_text(model_card(loaded, config))
        for name in (ckpt.MODEL_NAME, HF_CONFIG, CARD_NAME):
            ckpt._as_user_made(tmp / name)
            ckpt._fsync_file(tmp / name)

    _write_atomic(out, write)
    return out


def _replaceable(folder: Path) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if not names:
        return True
    try:
        config = json.loads(ckpt.read_bytes(folder / HF_CONFIG, 1 << 20))
    except (ckpt.CheckpointError, ValueError):
        return False
    return isinstance(config, dict) and config.get("library") == "trainer" and names <= {
        ckpt.MODEL_NAME, HF_CONFIG, CARD_NAME}  # fmt: skip


def _weights_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The model.safetensors metadata evaluate and predict read, as the checkpoint wrote it, and
    which weights these are (the EMA's, or the trained ones)."""
    from safetensors import safe_open

    with safe_open(loaded.path, framework="pt") as st:
        metadata = dict(st.metadata() or {})
    metadata["weights"] = loaded.weights
    return metadata


def model_card(loaded: LoadedModel, config: dict[str, Any]) -> str:
    """README.md of an exported folder: what the model is, how it was trained and scored, where it came from."""
    run = recorded_config(loaded)
    scores = _scores(loaded)
    recipe = ", ".join(
        f"{k} {run[k]}" for k in ("epochs", "batch_size", "optimizer", "lr", "schedule", "seed", "val_split",
                                  "ema", "augment", "label_smoothing", "weight_decay") if run.get(k) is not None
    )  # fmt: skip
    lineage = recorded(loaded, "lineage")
    parent = "fresh weights"
    if isinstance(lineage, dict):
        parent = f"{lineage['parent']} (step {lineage['step']}, weights sha256 {lineage['sha256']})"
    lines = [
        "---",
        "library_name: trainer",
        "tags: [image-classification]",
        "---",
        "",
        f"# {loaded.architecture} on {loaded.dataset}",
        "",
        f"An image classifier for {len(loaded.class_names)} classes ({', '.join(loaded.class_names[:20])}"
        f"{', ...' if len(loaded.class_names) > 20 else ''}), trained with "
        "trainer and exported by `python -m trainer.export`.",
        "",
        "## Inputs and outputs",
        "",
        f"- input: pixels of shape {config['input_shape']} ([channels, height, width]) on the 0-255 scale;",
        "- normalisation before the network, (x / divide_by - mean) / std: "
        f"{json.dumps(config['normalization']) if config['normalization'] else 'none (the inputs are not pixels)'};",
        "- output: logits, one per class, in the order of `class_names` in config.json;",
        f"- weights: {loaded.weights} (step {loaded.step}, epoch {loaded.epoch}).",
        "",
        "## Training",
        "",
        f"- data set: {loaded.dataset};",
        f"- recipe: {recipe or 'not recorded (exported from a weights file alone)'};",
        f"- precision: {(loaded.state or {}).get('mixed_precision', 'not recorded')}, "
        f"processes: {(loaded.state or {}).get('world_size', 'not recorded')}.",
        "",
        "## Scores",
        "",
        *scores,
        "",
        "## Lineage",
        "",
        f"- exported from {config['source']} (its {ckpt.MODEL_NAME}: sha256 {config['source_sha256']});",
        f"- its run started from {parent}.",
        "",
        "Load it offline with `trainer.from_pretrained(folder)`, or evaluate and predict with "
        "`python -m trainer.evaluate folder` and `python -m trainer.predict folder IMAGE...`.",
        "",
    ]
    return "\n".join(lines)


def _scores(loaded: LoadedModel) -> list[str]:
    """The checkpoint's own evaluation, and the test split's score when the run scored this
    checkpoint once at its end (its metrics.jsonl says so)."""
    history = (loaded.state or {}).get("history") or []
    own = history[-1] if history else {}
    lines = []
    if "valid_acc" in own:
        splits = {"held-out": "the images held out of the training split",
                  "test": "the test split (trained with --val-split 0)"}  # fmt: skip
        split = splits.get(own.get("validation"), "the validation split")
        lines.append(f"- validation accuracy {own['valid_acc']:.4f} ({own.get('valid_correct')}/"
                     f"{own.get('valid_seen')}) on {split}, at step {own['step']};")  # fmt: skip
    test = _test_score(loaded)
    if test is not None:
        lines.append(f"- **test accuracy {test['test_acc']:.4f}** ({test['test_correct']}/{test['test_seen']}) on "
                     f"the test split, scored once at the end of the run on this checkpoint.")  # fmt: skip
    else:
        lines.append("- test accuracy: not recorded for this checkpoint (`python -m trainer.evaluate` scores it).")
    return lines


def _test_score(loaded: LoadedModel) -> dict[str, Any] | None:
    if loaded.state is None:
        return None
    metrics = loaded.path.parent.parent / "metrics.jsonl"
    try:
        last = json.loads(ckpt.read_bytes(metrics, 64 << 20).decode().strip().splitlines()[-1])
    except (ckpt.CheckpointError, ValueError, IndexError, UnicodeDecodeError):
        return None
    if isinstance(last, dict) and last.get("test_step") == loaded.step and "test_acc" in last:
        return last
    return None


def from_pretrained(folder: str | os.PathLike, model: str | None = None) -> LoadedModel:
    """A folder written by `--format hf` (or `save_pretrained`), loaded offline: the model in eval
    mode on the CPU, with its class names, input shape and normalisation. A model that is not built
    in is rebuilt only from `model` ("package.module:factory"), as evaluate's --model."""
    path = Path(folder)
    try:
        config = ckpt.json_document(ckpt.read_bytes(path / HF_CONFIG, 1 << 20))
    except ValueError as exc:
        raise ckpt.CheckpointError(f"{path / HF_CONFIG} is not JSON ({first_line(exc)})") from None
    loaded = load_model(path, model)
    described = describe(loaded)
    keys = ("architecture", "class_names", "input_shape", "normalization")
    differ = [k for k in keys if not isinstance(config, dict) or config.get(k) != described[k]]
    if differ:
        raise ckpt.CheckpointError(
            f"{path / HF_CONFIG} disagrees with {ckpt.MODEL_NAME}'s metadata on {', '.join(differ)}: "
            "the weights' metadata decide how the model is fed; export it again"
        )
    return loaded


class OnnxModel(nn.Module):
    """An exported ONNX graph run by onnxruntime on the CPU, called like the torch model (for predict)."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, pixels: Tensor) -> Tensor:
        (logits,) = self.session.run(["logits"], {"pixels": pixels.detach().cpu().float().numpy()})
        return torch.from_numpy(logits)


def load_onnx(path: str | os.PathLike) -> LoadedModel:
    """An .onnx file this command wrote, for predict: its graph in onnxruntime, and what its metadata says."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"reading an ONNX model needs onnxruntime: {INSTALL}") from None
    file = Path(path)
    data = ckpt.read_bytes(file, MAX_GRAPH_BYTES)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (onnxruntime's own exception types: not an ONNX model)
        raise ckpt.CheckpointError(f"{file} is not an ONNX model onnxruntime can run ({first_line(exc)})") from None
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        info = json.loads(meta) if meta else None
        names = tuple(str(n) for n in info["class_names"])
        shape = tuple(int(d) for d in info["input_shape"])
        if len(shape) != 3 or not names:
            raise ValueError
    except (TypeError, KeyError, ValueError):
        raise ckpt.CheckpointError(f"{file} was not exported by trainer.export (no classes in its metadata)") from None
    if [i.name for i in session.get_inputs()] != ["pixels"] or [o.name for o in session.get_outputs()] != ["logits"]:
        raise ckpt.CheckpointError(f"{file}: a graph from trainer.export takes `pixels` and returns `logits`")
    return LoadedModel(OnnxModel(session), file, str(info.get("architecture")), str(info.get("dataset")), names,
                       dict(IN_GRAPH), shape, int(info.get("step", 0)), int(info.get("epoch", 0)),
                       str(info.get("weights", "trained")))  # fmt: skip


def export(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, model: str | None = None) -> Path:
    """Exports the model of `checkpoint` (a checkpoint folder, a `best` link, a run folder or a
    model.safetensors) as `fmt` to `out`; returns `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    loaded = load_model(checkpoint, model)
    target = Path(out)
    if fmt in SUFFIXES and target.suffix != SUFFIXES[fmt]:
        raise ConfigError(f"--format {fmt} writes a {SUFFIXES[fmt]} file: name OUT like {target.stem}{SUFFIXES[fmt]}")
    if fmt in SUFFIXES and target.is_dir():
        raise ConfigError(f"{target} is a folder: name the {SUFFIXES[fmt]} file to write")
    write = {"onnx": export_onnx, "torch-export": export_pt2, "hf": save_pretrained}[fmt]
    return write(loaded, target)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` creates a temporary file or folder beside `path`, which then replaces `path`
    (a folder through a rename aside, removed afterwards); on any failure `path` is as it was."""
    from safetensors import SafetensorError  # a full disk, as safetensors says it

    path.parent.mkdir(parents=True, exist_ok=True)
    # The name ends as the final one does: torch.export.save wants a .pt2.
    tmp = path.with_name(f"{ckpt.TMP_PREFIX}{os.getpid()}.{path.name}")
    old = path.with_name(f"{ckpt.TMP_PREFIX}{os.getpid()}.old.{path.name}")
    try:
        write(tmp)
        if tmp.is_file():
            ckpt._as_user_made(tmp)
            ckpt._fsync_file(tmp)
            os.replace(tmp, path)
        else:
            if path.exists():
                os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(ckpt.describe_write_error(exc, path.name, path.parent).replace(
            "earlier checkpoints and logs are intact", "nothing there was changed")) from None  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if old.exists() and not path.exists():
            os.rename(old, path)  # the new folder could not take its place: the old one is back
    ckpt._fsync_dir(path.parent)


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines, log records (graph dumps among them) and warnings are not
    the user's business; their errors are, in one line (`_why`)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _why(exc: BaseException) -> str:
    """The first line of the innermost cause (the exporters wrap theirs, with colour codes)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", first_line(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m trainer.export",
        description="Export a checkpoint's model: ONNX, a torch.export program (.pt2), or a Hugging Face-style "
        "folder (config.json, model.safetensors, README.md). The graphs take float32 pixels [batch, channels, "
        "height, width] on the 0-255 scale and normalise inside.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="a checkpoint folder (step_*), a `best` link, a model.safetensors, a run folder (its best)"
    )
    parser.add_argument("out", metavar="OUT", help="the file to write (.onnx, .pt2) or, for hf, the folder")
    parser.add_argument("--format", choices=FORMATS, required=True, type=str.lower, help="what to write")
    parser.add_argument(
        "--model", default=None, metavar="MODULE:FN",
        help="rebuild a model that is not built in with this factory (as in training); never taken from the checkpoint",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exports; returns the exit code (2 for a user error, reported in one line)."""
    args = build_parser().parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.model)
    except (ConfigError, ckpt.CheckpointError) as exc:
        return fail(str(exc))
    print(f"wrote {out} ({args.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
