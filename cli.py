"""The command line every script shares: its parser, and the checked number types of its flags.

    p = cli.parser("Train a ResNet.")
    p.add_argument("--epochs", type=cli.integer(min=1), default=40, help="passes over the training set")
    p.add_argument("--lr", type=cli.real(above=0), default=None, help="peak learning rate (default: by the batch)")

A value out of range (zero, negative, NaN, ...) is refused while the arguments are
parsed, before any data is loaded: one line, `train.py: error: argument --epochs: ...`,
and exit code 2. A value kept from an earlier command line (a run's saved recipe) is
checked as its flag would be: `cli.refused(parser, "epochs", saved, default)`. A list in a
one-line message names its first few: `cli.first_few(classes)`. Standard library only.

Every script ends the same way: `cli.main(lambda: main(args))`. An error of the user's input or
environment (a UserError) becomes one line, `error: ...`, and exit code 1; Ctrl-C exits 130,
and a reader of the output gone (`predict.py photos/ | head`) 141, quietly; file and class
names that are not UTF-8 are printed as their bytes.
UserError is defined here, the lowest module the scripts share; resnet.py and device.py import
nothing of the project (each is copied alone), so their CheckpointError and DeviceError are made
its subclasses by registration, by main, instead of by inheritance.
"""
import abc
import argparse
import io
import math
import os
import pathlib
import signal
import sys

# The errors of the two modules that import no other of the project: UserErrors all the same.
COPYABLE_ERRORS = {"resnet": "CheckpointError", "device": "DeviceError"}


class UserError(Exception, metaclass=abc.ABCMeta):
    """The user's input or environment is wrong: the message is one line that says what to do."""


def main(run, explain=None, stopped=None):
    """The one way out of every script: exits with run()'s exit code (not a number: 0). A UserError, or an
    error explain(error) puts in one line (out of memory, say; None: a bug, which keeps its
    traceback), prints `error: <line>` and exits 1; under torchrun the line names its process.
    Ctrl-C exits 130, a reader gone (`| head`) 141, quietly; stopped() is a line for either
    (how to continue), and an OSError writing the output is one line too."""
    for module, name in COPYABLE_ERRORS.items():
        if module in sys.modules:  # loaded by the script, so its errors can be raised
            UserError.register(getattr(sys.modules[module], name))
    names_as_they_are()
    try:
        code = run()
        code = code if isinstance(code, int) else 0
        flush_output()
    except BrokenPipeError:
        if stopped:
            print(f"stopped: the reader of its output has gone; {stopped()}", file=sys.stderr)
        code = reader_gone()
    except KeyboardInterrupt:
        print("\ninterrupted" + (f" at once; {stopped()}" if stopped else ""), file=sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001  all but a bug's are put in one line
        line = str(e) if isinstance(e, UserError) else explain(e) if explain else None
        if line is None and isinstance(e, OSError):
            line = output_failed(e)
        if line is None:
            raise
        where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        code = f"{where}error: {line}"
    sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: its value, or, for one worked out at run time (None) and for
    on/off switches, only the help text, which then says what happens by default."""

    def _get_help_string(self, action):
        if any(action.default is value for value in (None, False, argparse.SUPPRESS)):  # 0 == False, yet shown
            return action.help
        return super()._get_help_string(action)


def parser(description):
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.print_usage = lambda file=None: None  # a bad flag gets one line, not the usage block
    return p


def checkpoint_flags(p, models, default="runs/resnet18/best.pth"):
    """--checkpoint and --model, as each script that reads a checkpoint takes them; models: resnet.MODELS.
    default None: the newest run's best.pth, worked out at run time."""
    p.add_argument("--checkpoint", default=default, help="a .pth of train.py or of the tutorials' code"
                   + ("" if default else " (default: best.pth of the newest run under runs/)"))
    p.add_argument("--model", default=None, choices=models,
                   help="the network the checkpoint must hold (default: the one it holds)")


FLOAT32_MAX = 3.4028234663852886e38


def _checked(parse, name, min=None, max=None, above=None, below=None):
    """An argparse type: parse the text, then check it lies in the range."""
    bounds = [(min, "at least", lambda v, b: v >= b), (max, "at most", lambda v, b: v <= b),
              (above, "more than", lambda v, b: v > b), (below, "less than", lambda v, b: v < b)]
    wanted = " and ".join(f"{words} {bound:g}" if isinstance(bound, float) else f"{words} {bound}"
                          for bound, words, _ in bounds if bound is not None)

    def check(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # the training step computes in float32 at most
            raise argparse.ArgumentTypeError(f"{text} is beyond float32's range (±{FLOAT32_MAX:.3g})")
        if not all(ok(value, bound) for bound, _, ok in bounds if bound is not None):
            raise argparse.ArgumentTypeError(f"must be {wanted} (got {text})")
        return value

    check.__name__ = name  # argparse names the type in some messages
    check.checked = True
    return check


def integer(min=None, max=None):
    """A whole number in [min, max]."""
    return _checked(int, "a whole number", min=min, max=max)


def real(min=None, max=None, above=None, below=None):
    """A finite number, at least min / at most max / more than above / less than below."""
    return _checked(float, "a number", min=min, max=max, above=above, below=below)


def refused(parser, key, value, default):
    """Why parser would not give value for its setting key (the flag's type, range or choices), or None:
    a value saved with a run (edited by hand, say) checked as its flag would be."""
    if value is None:  # left to be worked out at run time, where the flag's default is too
        return None if default is None else "no value"
    if isinstance(default, bool):  # an on/off switch
        return None if isinstance(value, bool) else f"{value!r} is not on or off"
    parser.exit_on_error = False  # the error to report, not an exit
    try:
        parsed = getattr(parser.parse_args([f"--{key.replace('_', '-')}", str(value)]), key)
    except argparse.ArgumentError as e:
        return e.message
    if parsed == value and (type(parsed) is type(value) or type(parsed) is float and type(value) is int):
        return None
    return f"{value!r} is not a {'number' if type(parsed) in (int, float) else type(parsed).__name__}"


def given(parser, argv, keys):
    """The settings among keys that argv gives (by a flag, abbreviated or not), as parser reads argv;
    parser's defaults are changed on the way."""
    unset = object()
    parser.set_defaults(**dict.fromkeys(keys, unset))
    parsed = vars(parser.parse_args(argv))
    return [key for key in keys if parsed[key] is not unset]


def make_folder(path, error=OSError):
    """Make the folder path and those above it, as needed; where that fails, raise `error` (the
    script's own exception) with one line that says why."""
    try:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)  # os.makedirs says a link to nowhere less plainly
    except OSError as e:
        raise error(folder_error(path, e)) from None


def folder_error(path, error):
    """One line for an OSError from making the folder path. A file in the way is said as such: the
    system's words for it ("File exists", "Not a directory") name neither the file nor the fix."""
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        part = os.path.normpath(path)
        while part and part != os.path.dirname(part):  # a link to a disk not mounted reads as a file too
            if os.path.islink(part) and not os.path.exists(part):
                return f"{path}: cannot make this folder: {part} is a link to {os.readlink(part)}, which is not there"
            part = os.path.dirname(part)
        return f"{path}: cannot make this folder: it, or a folder on its path, is a file"
    return f"{path}: cannot make this folder ({error.strerror or error})"


def plural(n, word):
    """'1 step', '3 steps'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def first_few(names, k=5):
    """Names for a one-line message: 'cat, dog, ship', or the first k and '...'."""
    return ", ".join(map(str, names[:k])) + (", ..." if len(names) > k else "")


def names_as_they_are():
    """Print file and class names that are not UTF-8 (a GBK name from a Windows zip, say: Python
    holds its bytes as surrogates) as those bytes, instead of failing mid-output where
    the locale makes standard output strict."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")


def reader_gone():
    """After a BrokenPipeError on stdout: the exit code of a Unix tool that SIGPIPE stopped (141)."""
    _drop_output()
    return 128 + signal.SIGPIPE


def flush_output():
    """Write out what the script printed while its error handlers still run, so a failure to
    write it is theirs to say. Nothing to do where stdout was closed (`>&-`): Python's is None."""
    if sys.stdout is not None:
        sys.stdout.flush()


def output_failed(error):
    """After an OSError of a script's last word: one line for it. Where it names no file, writing
    standard output failed (`> /dev/full`, a disk that filled up)."""
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    _drop_output()
    return f"cannot write the output: {error.strerror or error}"


def _drop_output():
    """Send what is left of stdout to /dev/null, so Python's flush on the way out cannot fail
    again with a traceback."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
