"""Training curves of one or more runs, and the confusion-matrix picture test.py draws.

    python plot.py runs/resnet18                     # runs/resnet18/curves.png
    python plot.py runs/a runs/b --out compare.png   # two runs overlaid
    make plot                                        # RUN_DIR, or RUNS="runs/a runs/b"

Reads metrics.csv, the per-epoch table train.py writes into each run directory.
Needs matplotlib: pip install -r requirements-extra.txt (`make plot` does it).
"""
import argparse
import csv
import os
import re
import sys
import warnings
from pathlib import Path

import cli

COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds", "img_s"]
INSTALL = "pip install -r requirements-extra.txt"
# Fonts with Chinese, Japanese and Korean characters, used where installed for the characters
# matplotlib's own font lacks: a picture folder's class names may well be 猫 and 狗.
CJK_FONTS = ["Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Microsoft YaHei",
             "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Noto Sans CJK JP", "Arial Unicode MS"]


class PlotError(cli.UserError):
    """Something to plot from that is missing or unusable; one line for the user."""


def pyplot():
    """matplotlib's pyplot on a file-only backend (no window, works over ssh and in CI)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError(f"plotting needs matplotlib: {INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    known = {f.name for f in font_manager.fontManager.ttflist}
    plt.rcParams["font.family"] = ["sans-serif", *[f for f in CJK_FONTS if f in known]]
    return plt


def picture(example):
    """An argparse type for a picture to write, checked before any work is done: a folder and a
    type matplotlib cannot write are refused, and a name without a type gets .png (matplotlib
    would add it anyway, and the name printed must be the file's)."""
    def check(text):
        out = Path(text)
        try:
            is_dir = out.is_dir()
        except OSError as e:  # a name too long for the file system, say
            raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
        if is_dir:
            raise argparse.ArgumentTypeError(f"{text} is a folder; name the picture, e.g. {out / example}")
        if not out.suffix:
            return out.with_suffix(".png")
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:  # said when it comes to drawing
            return out
        if out.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
            raise argparse.ArgumentTypeError(f"matplotlib cannot write {out.suffix} pictures; "
                                             "use .png, .jpg, .svg or .pdf")
        return out

    check.__name__ = "picture"
    return check


def save(fig, out):
    """Write fig to out, making its folder. Characters no known font has are named in one note
    instead of a warning per character and drawing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=100)
        except (FileExistsError, NotADirectoryError):
            raise PlotError(f"{out}: cannot write it: part of its folder's path is a file") from None
        except OSError as e:  # read-only folder, full disk, ...
            raise PlotError(f"{out}: cannot write it ({e.strerror or e})") from None
    missing = set()
    for w in caught:
        glyph = re.match(r"Glyph (\d+) .*missing from font", str(w.message))
        if glyph:
            missing.add(chr(int(glyph.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        import matplotlib
        print(f"note: no font matplotlib knows has {''.join(sorted(missing)[:10])}, drawn as boxes in {out}; "
              "install one (Debian/Ubuntu: sudo apt install fonts-noto-cjk), then remove "
              f"{matplotlib.get_cachedir()}/fontlist-*.json so that matplotlib finds it", file=sys.stderr)


def metrics_csv(run):
    """A run's metrics.csv: run names its folder, or the file itself."""
    return Path(run) if os.path.isfile(run) else Path(run) / "metrics.csv"


def read_metrics(run_dir):
    """metrics.csv of a run (run_dir: its folder, or the file itself) as a dict of columns (lists of floats)."""
    path = metrics_csv(run_dir)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
    except FileNotFoundError:
        raise PlotError(f"{path}: not found; train first (python train.py), or name a run directory") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PlotError(f"{path}: cannot read it ({e})") from None
    if any(c not in header for c in COLUMNS):
        raise PlotError(f"{path}: not a metrics table of train.py")
    table = {c: [] for c in COLUMNS}
    for line, row in enumerate(rows, start=2):
        try:
            values = [float(row[c]) for c in COLUMNS]
        except (TypeError, ValueError):  # TypeError: a short row, whose missing fields read as None
            if line == len(rows) + 1:  # the last row, cut short by a kill: the epochs before it still plot
                break
            fields = ", ".join(v for v in row.values() if v is not None)
            raise PlotError(f"{path}, line {line}: not a row of numbers ({fields})") from None
        for c, v in zip(COLUMNS, values):
            table[c].append(v)
    if not table["epoch"]:
        raise PlotError(f"{path}: no finished epoch yet")
    return table


def plot_runs(run_dirs, out):
    """Loss, accuracy and learning rate against epoch, one colour per run. Returns the figure."""
    plt = pyplot()
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    for i, run_dir in enumerate(run_dirs):
        m, color, name = read_metrics(run_dir), f"C{i}", str(run_dir)
        marker = "o" if len(m["epoch"]) < 30 else None  # a few epochs read better as dots
        train = dict(color=color, marker=marker, markerfacecolor="none")  # hollow: told apart even as one dot
        loss_ax.plot(m["epoch"], m["train_loss"], "--", **train, label=f"{name} train")
        loss_ax.plot(m["epoch"], m["test_loss"], "-", color=color, marker=marker, label=f"{name} test")
        acc_ax.plot(m["epoch"], m["train_acc"], "--", **train, label=f"{name} train")
        acc_ax.plot(m["epoch"], m["test_acc"], "-", color=color, marker=marker, label=f"{name} test")
        lr_ax.plot(m["epoch"], m["lr"], "-", color=color, marker=marker, label=name)
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    # A log scale keeps an early spike of the test loss (BatchNorm statistics settling)
    # from flattening the rest of the curve. Its ticks: round numbers, written plainly (2.4, not 2.4 x 10^0).
    loss_ax.set_yscale("log")
    low, high = loss_ax.get_ylim()
    span = high / low
    if span < 10:  # within a decade the scale is nearly linear: evenly spaced ticks
        loss_ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    else:  # fewer ticks per decade the more decades there are
        subs = (1.0, 2.0, 3.0, 5.0) if span < 100 else (1.0, 2.0, 5.0) if span < 1e4 else (1.0,)
        loss_ax.yaxis.set_major_locator(LogLocator(subs=subs))
    loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    loss_ax.yaxis.set_minor_formatter(NullFormatter())
    for ax, title, ylabel in ((loss_ax, "Loss", "cross-entropy (log scale)"), (acc_ax, "Accuracy", "accuracy (%)"),
                              (lr_ax, "Learning rate (end of epoch)", "learning rate")):
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: 1, not 0.945 ... 1.065
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save(fig, out)
    plt.close(fig)
    return fig


def plot_confusion(confusion, classes, out):
    """Heatmap of a confusion matrix (rows: true class; each cell the share of its true class, in %)
    with per-class accuracy beside it."""
    import numpy as np
    plt = pyplot()
    # A folder name that is not UTF-8 holds surrogates, which no font draws: its bytes as \xc4\xf1.
    classes = [os.fsencode(name).decode("utf-8", "backslashreplace") for name in classes]
    counts = np.asarray(confusion, dtype=np.float64)
    per_row = counts.sum(1, keepdims=True).clip(min=1)
    cells = 100 * counts / per_row
    n = len(classes)
    size = max(6.0, 0.6 * n + 2)
    fig, (ax, acc_ax) = plt.subplots(1, 2, figsize=(size + 2.5, size), layout="constrained",
                                     gridspec_kw={"width_ratios": [n, 2.5]})
    image = ax.imshow(cells, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (% of each true class)")
    if n <= 20:  # numbers in the cells while they still fit
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{cells[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if cells[i, j] > 0.6 * cells.max() else "black")
    fig.colorbar(image, ax=ax, shrink=0.7)
    accuracy = 100 * np.diag(counts) / per_row[:, 0]
    acc_ax.barh(range(n), accuracy, color="C0")
    acc_ax.set_yticks(range(n), classes)
    acc_ax.invert_yaxis()
    acc_ax.set_xlim(0, 100)
    acc_ax.set_xlabel("accuracy (%)")
    acc_ax.set_title("Per class")
    for i, a in enumerate(accuracy):
        acc_ax.text(min(a + 1, 80), i, f"{a:.1f}%", va="center", fontsize=8)
    save(fig, out)
    plt.close(fig)
    return fig


def get_args_parser():
    p = cli.parser("Plot the training curves of one or more runs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.csv (or those files)")
    p.add_argument("--out", type=picture("curves.png"), default=None,
                   help="picture to write (default: RUN_DIR/curves.png for one run, runs/curves.png for several)")
    return p


def main(args):
    out = args.out or (metrics_csv(args.runs[0]).parent / "curves.png" if len(args.runs) == 1
                       else Path("runs/curves.png"))
    plot_runs(args.runs, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
