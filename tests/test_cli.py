"""Every numeric flag of every script is checked while the arguments are parsed: a value out of
range is one line and a non-zero exit, before any data is loaded; --help states each default once."""
import argparse
import importlib.util
import re

import pytest

import bench
import cli
import data
import export
import gui
import plot
import predict
import resnet
import train
import web
from conftest import ROOT, one_line_error, run


def parser_of_test_py():
    spec = importlib.util.spec_from_file_location("script_test", ROOT / "test.py")  # not Python's own `test`
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser()


PARSERS = {"train.py": train.get_args_parser, "test.py": parser_of_test_py,
           "predict.py": predict.get_args_parser, "bench.py": bench.get_args_parser,
           "export.py": export.get_args_parser, "data.py": data.get_args_parser, "gui.py": gui.get_args_parser,
           "plot.py": plot.get_args_parser, "web.py": web.get_args_parser}
POSITIONAL = {"predict.py": ["x.jpg"], "plot.py": ["runs/x"]}  # what each needs besides the flag


def numeric_flags():
    for script, make in PARSERS.items():
        for action in make()._actions:
            if action.option_strings and (action.type in (int, float) or getattr(action.type, "checked", False)):
                yield pytest.param(script, action, id=f"{script} {action.option_strings[0]}")


def parse(script, *args):
    return PARSERS[script]().parse_args([*POSITIONAL.get(script, []), *args])


def test_the_checked_types_accept_their_range_and_refuse_the_rest():
    positive, fraction = cli.integer(min=1), cli.real(min=0, below=1)
    assert positive("3") == 3 and fraction("0") == 0.0 and fraction("0.5") == 0.5
    for check, text, says in [(positive, "0", "must be at least 1 (got 0)"), (positive, "-1", "at least 1"),
                              (positive, "2.5", "'2.5' is not a whole number"), (fraction, "1", "less than 1"),
                              (fraction, "nan", "not a finite number"), (fraction, "inf", "not a finite number"),
                              (fraction, "-0.1", "at least 0"), (cli.real(above=0), "0", "more than 0"),
                              (cli.real(above=0), "1e39", "1e39 is beyond float32's range (±3.4e+38)"),
                              (cli.integer(max=2 ** 20), "2000000", "at most 1048576 (got 2000000)")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            check(text)


@pytest.mark.parametrize("script, action", list(numeric_flags()))
def test_every_numeric_flag_is_checked(script, action):
    assert getattr(action.type, "checked", False), f"{script} {action.option_strings[0]} takes unchecked numbers"
    flag = action.option_strings[0]
    for bad in ("nan", "-1", "abc", "1e40"):
        with pytest.raises(SystemExit) as e:
            parse(script, flag, bad)
        assert e.value.code == 2
    if action.default is not None:  # the default itself passes its own check
        assert getattr(parse(script, flag, str(action.default)), action.dest) == action.default


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--epochs", "0"]), ("train.py", ["--batch-size", "0"]), ("train.py", ["--batch-size", "-1"]),
    ("train.py", ["--subset", "0"]), ("train.py", ["--lr", "0"]), ("train.py", ["--warmup", "1"]),
    ("train.py", ["--ema", "1"]), ("train.py", ["--label-smoothing", "nan"]), ("test.py", ["--batch-size", "-1"]),
    ("predict.py", ["--topk", "0"]), ("bench.py", ["--batch-size", "0"]), ("export.py", ["--tolerance", "0"]),
    ("data.py", ["--image-size", "0"]), ("bench.py", ["--speedrun", "0"]), ("bench.py", ["--compile", "fast"]),
    ("train.py", ["--lr", "1e40"]), ("train.py", ["--weight-decay", "1e40"]),
    ("bench.py", ["--batch-size", "10000000000000000000"])])
def test_the_values_that_used_to_slip_through_are_refused_in_one_line(script, args, capsys):
    with pytest.raises(SystemExit) as e:
        parse(script, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"{PARSERS[script]().prog}: error: argument {args[0]}")


def test_data_py_takes_the_picture_sides_a_checkpoint_may_hold_as_train_py_does():
    low, high = resnet.IMAGE_SIZES  # data.py decodes a folder's pictures at --image-size; it imports no resnet
    for script in ("data.py", "train.py"):
        assert parse(script, "--image-size", str(low)).image_size == low
        assert parse(script, "--image-size", str(high)).image_size == high
        for bad in (low - 1, high + 1):
            with pytest.raises(SystemExit):
                parse(script, "--image-size", str(bad))


@pytest.mark.parametrize("script, flag, example", [("plot.py", "--out", "curves.png"),
                                                   ("test.py", "--confusion-png", "confusion.png")])
def test_a_picture_to_write_is_checked_while_the_arguments_are_parsed(script, flag, example, tmp_path, capsys):
    def picture(text):
        return getattr(parse(script, flag, text), flag.lstrip("-").replace("-", "_"))

    assert picture(str(tmp_path / "cm")) == tmp_path / "cm.png"  # the name matplotlib would write, and prints
    assert picture(str(tmp_path / "cm.SVG")) == tmp_path / "cm.SVG"
    for text, says in [(str(tmp_path), f"{tmp_path} is a folder; name the picture, e.g. {tmp_path / example}"),
                       ("cm.bmp", "matplotlib cannot write .bmp pictures; use .png, .jpg, .svg or .pdf"),
                       ("x" * 300 + ".png", f"{'x' * 300}.png: File name too long")]:  # most take 255 bytes
        with pytest.raises(SystemExit) as e:
            picture(text)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == f"{PARSERS[script]().prog}: error: argument {flag}: {says}"


@pytest.mark.parametrize("script", PARSERS)
def test_help_states_each_default_once_zero_included(script):
    parser = PARSERS[script]()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        worked_out = any(action.default is value for value in (None, False, argparse.SUPPRESS))  # said in words
        assert text.count(f"(default: {action.default})") == (0 if worked_out else 1), text
        said = text.count("(default:")
        assert said == 1 or (worked_out and said == 0), text


@pytest.mark.slow
def test_a_bad_number_stops_train_py_before_it_loads_anything(tmp_path):
    proc = run("train.py", "--epochs", "0", "--data-dir", tmp_path / "nowhere", cwd=tmp_path, check=False)
    assert one_line_error(proc) == "train.py: error: argument --epochs: must be at least 1 (got 0)"
    assert proc.returncode == 2 and not (tmp_path / "runs").exists()
    proc = run("bench.py", "--batch-size", "0", cwd=tmp_path, check=False, timeout=60)
    assert "--batch-size" in one_line_error(proc)



def ended(run, **kw):
    """cli.main(run): the exit code, as the script would end."""
    with pytest.raises(SystemExit) as e:
        cli.main(run, **kw)
    return e.value.code


def raising(error):
    def run():
        raise error
    return run


def test_every_error_of_the_user_s_input_is_one_user_error_the_copyable_modules_included():
    import device
    import failures
    import pictures
    import rundir
    for kind in (data.DataError, data.BadBatchFile, pictures.PictureError, export.ExportError, plot.PlotError,
                 rundir.TrainingError, failures.LossNotFinite):
        assert issubclass(kind, cli.UserError), kind
    ended(lambda: 0)  # cli.main counts the errors of resnet.py and device.py, which import nothing of the project
    assert issubclass(resnet.CheckpointError, cli.UserError) and issubclass(device.DeviceError, cli.UserError)


@pytest.mark.parametrize("error", [data.DataError("data: no CIFAR-10 here; run python data.py"),
                                   resnet.CheckpointError("x.pth: not a readable checkpoint")])
def test_the_one_way_out_says_a_user_error_in_one_line_and_exits_1(error, capsys):
    assert ended(raising(error)) == f"error: {error}"  # sys.exit prints it on stderr and exits 1
    assert ended(lambda: 3) == 3 and ended(lambda: "a result, not a code") == 0


def test_the_one_way_out_puts_a_failure_it_is_told_about_in_one_line_and_a_bug_keeps_its_traceback():
    def explain(e):
        return "out of memory: run again with a smaller --batch-size" if "memory" in str(e) else None
    assert ended(raising(RuntimeError("out of memory")), explain=explain).startswith("error: out of memory")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(raising(RuntimeError("a bug")), explain=explain)
    assert ended(raising(KeyboardInterrupt())) == 130
