"""predict on whatever files people hand it: any size from 1x1 up, any mode and bit depth, any format
PIL writes, cut short, empty or not an image at all. Each file is predicted or refused in one line
of its own, never a traceback, and a bad file never keeps the good ones from being predicted."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from conftest import budget, reset_accelerate
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from trainer import predict
from trainer.data import load_split
from trainer.evaluation import load_model

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F"]  # 1, 8, 16 and 32 bits (integer and float)
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "]
MAX_PIXELS = 200_000  # a side up to 2000, the other as long as the pixels stay this few


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate():
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "best"


@pytest.fixture(scope="module")
def classes(checkpoint):
    return len(load_model(checkpoint).class_names)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("predict_properties")


@pytest.fixture(scope="module")
def good(tiny_data, checkpoint, folder):
    """Three test digits as 28x28 PNGs and what predict says of them alone: {path: entry}."""
    paths = []
    for i, digit in enumerate(load_split("mnist", tiny_data, train=False).images[:3].numpy()):
        paths.append(str(folder / f"good_{i}.png"))
        Image.fromarray(digit).save(paths[-1])
    code, entries, err = run(checkpoint, paths)
    assert code == 0 and not err
    return {entry["image"]: entry for entry in entries}


def run(checkpoint: Path, paths: list[str]) -> tuple[int, list[dict], str]:
    """predict.main on the files, in this process: its exit code, its JSON and its stderr, where every
    warning it lets through counts as a line of stderr (pytest would keep them from showing there)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = predict.main([str(checkpoint), *paths, "--cpu", "--json"])
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    return code, json.loads(out.getvalue()), err.getvalue() + shown


@st.composite
def pictures(draw) -> Image.Image:
    """A picture of any size and mode: a stroke (a 7) of one grey on another, perhaps see-through."""
    long = draw(st.integers(1, 2000))
    short = draw(st.integers(1, max(1, min(2000, MAX_PIXELS // long))))
    width, height = (long, short) if draw(st.booleans()) else (short, long)
    paper, ink = draw(st.integers(0, 255)), draw(st.integers(0, 255))
    grey = Image.new("L", (width, height), paper)
    corners = [(0.2, 0.15), (0.8, 0.15), (0.4, 0.85)]
    stroke = max(1, min(width, height) // draw(st.sampled_from([4, 8, 16])))
    ImageDraw.Draw(grey).line([(x * width, y * height) for x, y in corners], fill=ink, width=stroke)
    pixels, mode = np.asarray(grey), draw(st.sampled_from(MODES))
    if mode in ("I;16", "I"):  # the full 16-bit range, as a 16-bit scan has it
        return Image.fromarray((pixels.astype(np.int32) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(pixels.astype(np.float32))
    picture = grey.convert(mode)
    if mode in ("LA", "RGBA"):
        picture.putalpha(draw(st.sampled_from([255, 128, 0])))
    return picture


def encoded(picture: Image.Image, form: str) -> tuple[bytes, str]:
    """The picture in the format, or as TIFF where the format cannot hold its mode (TIFF holds them all)."""
    buffer = io.BytesIO()
    try:
        picture.save(buffer, form)
    except OSError:
        buffer, form = io.BytesIO(), "TIFF"
        picture.save(buffer, form)
    return buffer.getvalue(), FORMATS[form]


@st.composite
def files(draw, damages: tuple[str, ...] = ("none", "truncated", "empty", "garbage")) -> tuple[bytes, str, str]:
    """(contents, suffix, what was done to it): a whole picture, one cut at a drawn byte, an empty
    file, or bytes that are no image (perhaps behind a format's magic number)."""
    damage = draw(st.sampled_from(damages))
    if damage == "empty":
        return b"", draw(st.sampled_from(list(FORMATS.values()))), damage
    if damage == "garbage":
        noise = draw(st.sampled_from(MAGIC)) + draw(st.binary(min_size=1, max_size=600))
        return noise, draw(st.sampled_from(list(FORMATS.values()))), damage
    data, suffix = encoded(draw(pictures()), draw(st.sampled_from(list(FORMATS))))
    return (data[: draw(st.integers(0, len(data) - 1))] if damage == "truncated" else data), suffix, damage


def check(entry: dict, path: str, lines: list[str], classes: int) -> None:
    """A file's entry: a class among the checkpoint's, or an error that is the file's stderr line."""
    assert entry["image"] == path
    if "error" in entry:
        assert set(entry) == {"image", "error"} and path in entry["error"]
        assert f"trainer: error: {entry['error']}" in lines
        assert "\n" not in entry["error"]
    else:
        assert 0 <= entry["class"] < classes and entry["name"] == str(entry["class"])
        assert 0 <= entry["probability"] <= 1 and entry["top_k"][0]["class"] == entry["class"]


@budget(40)
@given(file=files())
def test_each_file_is_predicted_or_refused_in_one_line(checkpoint, classes, folder, file):
    data, suffix, damage = file
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        path = str(Path(scratch) / f"picture{suffix}")
        Path(path).write_bytes(data)
        code, entries, err = run(checkpoint, [path])
    assert len(entries) == 1
    check(entries[0], path, err.splitlines(), classes)
    refused = "error" in entries[0]
    event(f"{damage}: {'refused' if refused else 'predicted'}")  # pytest --hypothesis-show-statistics
    assert code == (2 if refused else 0)
    assert err.count("\n") == int(refused), err  # that one line, and nothing else
    if damage in ("empty", "garbage"):
        assert refused
    if damage == "none" and refused:  # a whole file always decodes; it may show no digit
        assert "no digit found" in entries[0]["error"], entries[0]["error"]


@budget(25)
@given(bad=st.lists(files(damages=("truncated", "empty", "garbage")), min_size=1, max_size=3), data=st.data())
def test_a_bad_file_never_stops_the_good_ones(checkpoint, classes, folder, good, bad, data):
    """Good digits and damaged files in a drawn order: every good one gets the prediction it gets alone."""
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        damaged = []
        for i, (contents, suffix, _) in enumerate(bad):
            damaged.append(str(Path(scratch) / f"bad_{i}{suffix}"))
            Path(damaged[-1]).write_bytes(contents)
        order = data.draw(st.permutations([*good, *damaged]))
        code, entries, err = run(checkpoint, order)
    lines = err.splitlines()
    assert [entry["image"] for entry in entries] == order
    for entry in entries:
        check(entry, entry["image"], lines, classes)
        if entry["image"] in good:
            assert entry["class"] == good[entry["image"]]["class"]
            assert entry["probability"] == pytest.approx(good[entry["image"]]["probability"], rel=1e-4)
    refused = [entry for entry in entries if "error" in entry]
    assert len(lines) == len(refused) and code == (2 if refused else 0)


def test_a_strip_one_pixel_high_is_one_line_and_the_next_file_is_predicted(checkpoint, classes, folder, good):
    """The issue's file: 4000x1, white. It was an IndexError in ink_of (shrunk to 256x0) and the files
    after it were never read."""
    strip = folder / "strip.png"
    Image.new("L", (4000, 1), 255).save(strip)
    digit = next(iter(good))
    code, entries, err = run(checkpoint, [str(strip), digit])
    assert code == 2
    assert err == f"trainer: error: {strip}: no digit found: nothing stands out from the background\n"
    assert entries[0] == {"image": str(strip), "error": err.removeprefix("trainer: error: ").strip()}
    assert entries[1] == good[digit]
    # Not refused for its shape: the same strip with a dark bar across its middle is read (a dash).
    with_bar = Image.new("L", (4000, 1), 255)
    with_bar.paste(0, (1500, 0, 2500, 1))
    with_bar.save(strip)
    code, entries, err = run(checkpoint, [str(strip)])
    assert code == 0 and not err and 0 <= entries[0]["class"] < classes


def test_a_bug_in_the_preprocessing_is_still_a_traceback(checkpoint, good, monkeypatch):
    """Only what a bad file raises is its line: the guard is no blanket over the code's own errors."""

    def broken(image, invert="auto"):
        raise IndexError("a bug")

    monkeypatch.setattr(predict, "to_mnist", broken)
    with pytest.raises(IndexError, match="a bug"):
        run(checkpoint, list(good))
