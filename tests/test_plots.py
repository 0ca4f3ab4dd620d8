"""metrics.csv, plot.py's training curves and test.py's confusion-matrix picture."""
import csv
import os
import re
import subprocess
import sys
import warnings

import pytest
from PIL import Image

import plot
from conftest import injected, ROOT, one_line_error, run_here, says

pytestmark = pytest.mark.slow  # each test runs the scripts


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def same_value(printed, stored, printed_places, stored_places):
    """Two roundings of one number, to printed_places and to stored_places decimals: each is within half
    its last place of the number, so they differ by at most the two half places together. Rounding the
    stored text again is no check: 1.52549 prints as 1.525 and is stored as 1.5255, which rounds to 1.526."""
    return abs(float(printed) - float(stored)) <= 0.5 * (10.0 ** -printed_places + 10.0 ** -stored_places) + 1e-12


def test_metrics_csv_has_one_row_per_epoch_matching_acc_txt_and_the_printed_summary(trained_run):
    run_dir, proc = trained_run
    table = rows(run_dir)
    assert (run_dir / "metrics.csv").read_text().splitlines()[0] == \
        "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,img_s"
    assert [r["epoch"] for r in table] == ["1", "2"]
    acc = [float(ln.split("= ")[1].rstrip("%")) for ln in (run_dir / "acc.txt").read_text().splitlines()]
    assert [float(r["test_acc"]) for r in table] == acc
    for r in table:
        summary = re.search(rf"epoch +{r['epoch']}/2 \| train loss (\S+) acc +(\S+)% \| test loss (\S+) acc +(\S+)% "
                            rf"\| lr (\S+) \| \S+s (\d+) img/s", proc.stdout).groups()
        assert same_value(summary[0], r["train_loss"], 3, 4)
        assert same_value(summary[1], r["train_acc"], 2, 3)
        assert same_value(summary[2], r["test_loss"], 3, 4)
        assert same_value(summary[4], r["lr"], 4, 6)  # .6g: 6 places or more below 1
        assert float(r["epoch_seconds"]) > 0 and abs(float(r["img_s"]) - int(summary[5])) <= 1


def is_png(path, min_width, min_height):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.width >= min_width and im.height >= min_height, im.size
        assert len(im.convert("L").getcolors(maxcolors=65536) or []) > 20  # something was drawn


def test_plot_py_draws_loss_accuracy_and_learning_rate_of_a_run(trained_run, tmp_path):
    run_dir, _ = trained_run
    proc = run_here("plot.py", run_dir, "--out", tmp_path / "curves.png", cwd=tmp_path)
    assert "curves.png" in proc.stdout
    is_png(tmp_path / "curves.png", 1200, 400)


def test_a_plot_of_two_runs_names_both_in_its_legends(trained_run, tmp_path):
    run_dir, _ = trained_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())
    fig = plot.plot_runs([run_dir, other], tmp_path / "both.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Accuracy", "Learning rate (end of epoch)"]
    for ax in fig.axes:
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert str(run_dir) in legend and str(other) in legend
    is_png(tmp_path / "both.png", 1200, 400)


def test_test_py_draws_the_confusion_matrix_with_per_class_accuracy(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--confusion-png", tmp_path / "confusion.png", cwd=tmp_path)
    assert "wrote" in proc.stdout
    is_png(tmp_path / "confusion.png", 700, 500)
    fig = plot.plot_confusion([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "small.png")
    heatmap, accuracy = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["cat", "dog"]
    assert [t.get_text() for t in heatmap.texts] == ["75", "25", "0", "100"]  # row-normalized %
    assert [t.get_text() for t in accuracy.texts] == ["75.0%", "100.0%"]


CHINESE = ["狗", "猫", "船"]  # a picture folder's class names


def test_a_class_name_that_is_not_utf_8_is_drawn_as_its_bytes(tmp_path):
    gbk = os.fsdecode("狗".encode("gbk"))  # a GBK folder name as Python holds it: surrogates no font draws
    fig = plot.plot_confusion([[3, 1], [0, 4]], [gbk, "cat"], tmp_path / "cm.png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["\\xb9\\xb7", "cat"]


def test_chinese_class_names_are_drawn_with_a_chinese_font_where_one_is_installed(tmp_path, capsys):
    from matplotlib import font_manager, ft2font
    for path in font_manager.findSystemFonts():
        if ft2font.FT2Font(path).family_name in plot.CJK_FONTS:
            font_manager.fontManager.addfont(path)  # known now, even if matplotlib's font cache predates it
            break
    else:
        pytest.skip("no font with Chinese characters on this machine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot.plot_confusion([[3, 1, 0], [0, 4, 0], [0, 0, 4]], CHINESE, tmp_path / "c.png")
    assert not caught and capsys.readouterr().err == ""
    is_png(tmp_path / "c.png", 500, 400)


def test_characters_no_font_has_are_named_in_one_note_instead_of_a_warning_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plot, "CJK_FONTS", [])  # matplotlib's own font alone, which has no Chinese
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot.plot_confusion([[3, 1, 0], [0, 4, 0], [0, 0, 4]], CHINESE, tmp_path / "c.png")
    assert not caught
    note = capsys.readouterr().err.strip()
    assert "\n" not in note and note.startswith("note: no font matplotlib knows has 狗猫船, drawn as boxes in ")
    assert "fonts-noto-cjk" in note and "fontlist-*.json" in note
    is_png(tmp_path / "c.png", 500, 400)


def test_a_run_without_metrics_is_a_one_line_error(tmp_path):
    assert "metrics.csv" in one_line_error(run_here("plot.py", tmp_path, cwd=tmp_path, check=False))


def test_the_picture_s_folder_is_made_and_one_that_cannot_be_is_a_one_line_error(tmp_path):
    plot.plot_confusion([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "new" / "sub" / "c.png")
    is_png(tmp_path / "new" / "sub" / "c.png", 500, 400)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(plot.PlotError) as e:
        plot.plot_confusion([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "notes.txt" / "c.png")
    assert says(str(e.value), "notes.txt/c.png", "cannot write", "a file")


HEADER = "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,img_s\n"
ROW = "{},2.0,30.000,1.9,35.000,0.1,5.00,100.0\n"


def test_plot_py_takes_the_metrics_file_itself_and_draws_beside_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text(HEADER + ROW.format(1) + ROW.format(2))
    proc = run_here("plot.py", tmp_path / "run" / "metrics.csv", cwd=tmp_path)
    assert proc.stdout.strip() == f"wrote {tmp_path / 'run' / 'curves.png'}"
    is_png(tmp_path / "run" / "curves.png", 1200, 400)


def test_after_one_epoch_train_and_test_are_a_hollow_and_a_filled_dot(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER + ROW.format(1))
    loss_ax, acc_ax, _ = plot.plot_runs([tmp_path], tmp_path / "curves.png").axes[:3]
    for ax in (loss_ax, acc_ax):
        train, test = ax.get_lines()
        assert train.get_marker() == test.get_marker() == "o"
        assert train.get_markerfacecolor() == "none" and test.get_markerfacecolor() != "none"


def test_a_last_row_cut_short_by_a_kill_is_left_out_and_the_epochs_before_it_are_read(tmp_path):
    (tmp_path / "metrics.csv").write_text(HEADER + ROW.format(1) + ROW.format(2) + "3,1.8,33.0")
    assert plot.read_metrics(tmp_path)["epoch"] == [1.0, 2.0]


@pytest.mark.parametrize("test_losses", [
    [2.43, 1.96, 1.77],  # a short run: within a decade
    [2.4, 3.0] + [2.4 * 0.93 ** e + 0.3 for e in range(3, 41)],  # a whole run: about one decade
    [276.6, 2.19, 1.84, 1.76, 1.71],  # BatchNorm's statistics not settled in the first epoch: two decades
    [2.4, 2000.0] + [2.4 * 0.93 ** e + 0.3 for e in range(3, 41)],  # an early spike: several decades
])
def test_the_loss_axis_reads_in_plain_round_numbers(tmp_path, test_losses):
    lines = [f"{e},{loss * 0.9:.4f},30.000,{loss:.4f},35.000,0.1,5.00,100.0\n"
             for e, loss in enumerate(test_losses, start=1)]
    (tmp_path / "metrics.csv").write_text(HEADER + "".join(lines))
    loss_ax = plot.plot_runs([tmp_path], tmp_path / "curves.png").axes[0]
    low, high = loss_ax.get_ylim()
    labels = [t.get_text() for t in loss_ax.get_yticklabels() if low <= t.get_position()[1] <= high]
    assert len(labels) >= 3 and all(float(text) > 0 for text in labels), labels  # 0.3 or 2.4, not 3 x 10^-1


@pytest.mark.parametrize("epochs", [1, 2, 40])
def test_the_epoch_axis_counts_whole_epochs(tmp_path, epochs):
    (tmp_path / "metrics.csv").write_text(HEADER + "".join(ROW.format(e) for e in range(1, epochs + 1)))
    for ax in plot.plot_runs([tmp_path], tmp_path / "curves.png").axes:
        low, high = ax.get_xlim()
        ticks = [t.get_position()[0] for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
        assert ticks and all(tick == int(tick) for tick in ticks), ticks


@pytest.mark.parametrize("text, message", [
    (HEADER + ROW.format(1) + "2,x,y\n" + ROW.format(3), "metrics.csv, line 3: not a row of numbers (2, x, y"),
    (HEADER, "metrics.csv: no finished epoch yet"),
    ("\xff\xfe garbage", "metrics.csv: cannot read it"),
])
def test_a_damaged_metrics_csv_is_one_line_naming_what_is_wrong(tmp_path, text, message):
    (tmp_path / "metrics.csv").write_bytes(text.encode("latin-1"))
    assert message in one_line_error(run_here("plot.py", tmp_path, cwd=tmp_path, check=False))


def test_without_matplotlib_one_line_says_how_to_install_it(tmp_path, trained_run, cifar_dir):
    run_dir, _ = trained_run
    env = injected(tmp_path, "import sys\nsys.modules['matplotlib'] = None\n")
    proc = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(run_dir), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert "requirements-extra.txt" in one_line_error(proc)
    # test.py still evaluates, and says why there is no picture
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(run_dir / "best.pth"),
                           "--data-dir", str(cifar_dir), "--device", "cpu", "--confusion-png", str(tmp_path / "c.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "accuracy" in proc.stdout and "requirements-extra.txt" in proc.stderr
