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


def keep_figures(monkeypatch) -> list:
    """The figures plot draws, kept as they are saved."""
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


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
    run = fake_run(tmp_path / "run")
    for name in ("metrics.jsonl", "curves.jsonl"):  # keep the first epoch only
        path = run / name
        path.write_text(path.read_text().splitlines()[0] + "\n")
    first = json.loads((run / "metrics.jsonl").read_text())  # a validation loss near the top right, as seen
    (run / "metrics.jsonl").write_text(json.dumps({**first, "valid_loss": 1.9}) + "\n")
    figures = keep_figures(monkeypatch)
    assert plot.main([str(run)]) == 0
    (fig,) = figures
    assert fig._suptitle.get_text() == "run: 1 epoch, 3 steps"
    ax_loss, _, ax_acc = fig.axes
    assert list(ax_acc.get_xticks()) == [1]
    assert "validation (each evaluation)" in [t.get_text() for t in ax_loss.get_legend().get_texts()]
    fig.canvas.draw()
    for ax in (ax_loss, ax_acc):  # no plotted point lies under a legend
        box = ax.get_legend().get_window_extent()
        for line in ax.get_lines():
            points = ax.transData.transform(line.get_xydata())
            hidden = [(x, y) for x, y in points if box.contains(x, y)]
            assert not hidden, f"{line.get_label()!r} has points under the legend of {ax.get_title()!r}"


def test_an_ema_run_draws_the_average_and_names_the_epoch_best_was_chosen_by(run_main, tiny_data, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """A real --ema run: the EMA's validation loss and accuracy are drawn (dashed, labelled), and the
    legend's best epoch is the `best` checkpoint's, chosen by the EMA's accuracy. The control: with
    the trained weights' best moved to another epoch, the legend still names the EMA's."""
    from conftest import tiny_args

    assert run_main(tiny_args(tiny_data, tmp_path, "--cpu", "--ema", "0.9")).returncode == 0
    run = tmp_path / "mnist"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best_step = int((run / "best").resolve().name.removeprefix("step_"))
    (best,) = [r for r in metrics if r["step"] == best_step]
    figures = keep_figures(monkeypatch)
    assert plot.main([str(run)]) == 0
    ax_loss, _, ax_acc = figures[-1].axes
    loss_lines, acc_lines = lines_by_label(ax_loss), lines_by_label(ax_acc)
    named = f"valid, EMA weights (best {best['valid_acc_ema']:.4f}, epoch {best['epoch']})"
    assert set(acc_lines) == {"train (running, during the epoch)", "valid, trained weights", named}
    assert list(acc_lines[named].get_ydata()) == [r["valid_acc_ema"] for r in metrics]
    assert list(acc_lines["valid, trained weights"].get_ydata()) == [r["valid_acc"] for r in metrics]
    ema_loss = loss_lines["validation, EMA weights"]
    assert list(ema_loss.get_ydata()) == [r["valid_loss_ema"] for r in metrics]
    assert list(ema_loss.get_xdata()) == [r["step"] for r in metrics]
    for ax, ema, raw in ((ax_acc, named, "valid, trained weights"), (ax_loss, "validation, EMA weights",
                                                                     "validation (each evaluation)")):  # fmt: skip
        lines = lines_by_label(ax)
        assert lines[ema].get_linestyle() != lines[raw].get_linestyle()
        assert {ema, raw} <= {t.get_text() for t in ax.get_legend().get_texts()}

    other = next(r for r in metrics if r is not best)  # the trained weights' best, moved away from the EMA's
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "valid_acc": 1.0 if r is other else 0.0}) + "\n"
                                               for r in metrics))  # fmt: skip
    assert plot.main([str(run)]) == 0
    assert named in lines_by_label(figures[-1].axes[2])


def test_a_run_without_ema_draws_no_average(tmp_path, monkeypatch):
    figures = keep_figures(monkeypatch)
    assert plot.main([str(fake_run(tmp_path / "run"))]) == 0
    ax_loss, _, ax_acc = figures[-1].axes
    assert "valid (best 0.8000, epoch 2)" in lines_by_label(ax_acc)
    assert not [label for ax in (ax_loss, ax_acc) for label in lines_by_label(ax) if "EMA" in label]
