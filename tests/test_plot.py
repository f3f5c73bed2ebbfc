"""python -m trainer.plot: a PNG of a run's curves, and a clear message when matplotlib is missing."""

from __future__ import annotations

import json
import shutil
import struct
import sys

from trainer import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(folder):
    """A run folder's two logs for two epochs of three steps, as the trainer writes them."""
    folder.mkdir(parents=True)
    metrics = [{"epoch": e, "step": 3 * e, "train_acc": 0.5 + e / 10, "valid_acc": 0.6 + e / 10,
                "valid_loss": 1.2 / e} for e in (1, 2)]  # fmt: skip
    curves = [{"epoch": e, "last_step": 3 * e, "loss": [2.0, 1.5, 1.0], "lr": [0.1, 0.2, 0.1]} for e in (1, 2)]
    for name, rows in (("metrics.jsonl", metrics), ("curves.jsonl", curves)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_a_real_run_gives_a_png(tiny_run, tmp_path, capsys):
    out = tmp_path / "plots" / "run.png"
    assert plot.main([str(tiny_run), "--out", str(out)]) == 0
    width, height = png_size(out)
    assert width > height > 100 and out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out
    # Without --out the PNG lands in the run folder.
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("metrics.jsonl", "curves.jsonl"):
        shutil.copy(tiny_run / name, run / name)
    assert plot.main([str(run)]) == 0
    assert png_size(run / "curves.png")[0] == width


def test_missing_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    run = fake_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert plot.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trainer: error:") and "pip install -e '.[plot]'" in err
    assert not (run / "curves.png").exists()


def test_a_folder_without_logs_is_one_line_and_exit_2(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl not found" in err


def test_a_one_epoch_run_reads_right(tmp_path, monkeypatch):
    """'1 epoch', whole-epoch ticks only, a validation-loss curve, and a legend placed by the data."""
    import matplotlib.figure

    run = fake_run(tmp_path / "run")
    for name in ("metrics.jsonl", "curves.jsonl"):  # keep the first epoch only
        path = run / name
        path.write_text(path.read_text().splitlines()[0] + "\n")
    first = json.loads((run / "metrics.jsonl").read_text())  # a validation loss near the top right, as seen
    (run / "metrics.jsonl").write_text(json.dumps({**first, "valid_loss": 1.9}) + "\n")
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    assert plot.main([str(run)]) == 0
    (fig,) = figures
    assert fig._suptitle.get_text() == "run: 1 epoch, 3 steps"
    ax_loss, _, ax_acc = fig.axes
    assert list(ax_acc.get_xticks()) == [1]
    assert "validation (end of each epoch)" in [t.get_text() for t in ax_loss.get_legend().get_texts()]
    fig.canvas.draw()
    for ax in (ax_loss, ax_acc):  # no plotted point lies under a legend
        box = ax.get_legend().get_window_extent()
        for line in ax.get_lines():
            points = ax.transData.transform(line.get_xydata())
            hidden = [(x, y) for x, y in points if box.contains(x, y)]
            assert not hidden, f"{line.get_label()!r} has points under the legend of {ax.get_title()!r}"
