"""predict.py: the class and confidence of the user's own pictures."""
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batching
import data
import pictures as picture_files  # the module: "pictures" is a fixture here
import predict
import resnet
from conftest import one_line_error, run_here, says

pytestmark = pytest.mark.slow  # each test runs the scripts

LINE = r"{}: (\w+) \((\d+\.\d\d)% confidence\)"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, cifar_dir):
    """One picture per kind a user might have, made from a tiny-set test image (a 'frog'-coloured one)."""
    d = tmp_path_factory.mktemp("pictures")
    images, labels, _ = data.load_split(cifar_dir, train=False)
    rgb = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    rgb.save(d / "cifar.png")
    rgb.save(d / "photo.jpg", quality=95)
    rgb.convert("L").save(d / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "rgba.png")
    Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).save(d / "sixteen.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgb.convert("P").save(d / "palette.gif")
    rgb.resize((3000, 2000)).save(d / "large.jpg")
    (d / "notes.jpg").write_text("this is text, not a picture")
    return d, images[0], int(labels[0])


@pytest.fixture(scope="module")
def workdir(trained_run):
    run_dir, _ = trained_run
    return run_dir.parent.parent  # holds runs/resnet18/best.pth, the default checkpoint


def test_a_picture_gets_the_models_class_and_softmax_confidence(workdir, pictures):
    d, image, _ = pictures
    proc = run_here("predict.py", d / "cifar.png", cwd=workdir)
    name, confidence = re.fullmatch(LINE.format(re.escape(str(d / "cifar.png"))), proc.stdout.strip()).groups()
    model, ckpt = resnet.load_model(workdir / "runs" / "resnet18" / "best.pth")
    with torch.no_grad():
        probs = model(batching.normalize(image[None], ckpt["mean"], ckpt["std"])).softmax(1)[0]
    assert name == ckpt["classes"][int(probs.argmax())]
    assert float(confidence) == pytest.approx(100 * probs.max().item(), abs=0.006)


@pytest.mark.parametrize("name", ["photo.jpg", "gray.png", "rgba.png", "sixteen.png", "cmyk.jpg",
                                  "palette.gif", "large.jpg"])
def test_any_picture_pillow_reads_is_classified(workdir, pictures, name):
    d, _, _ = pictures
    proc = run_here("predict.py", d / name, cwd=workdir)
    assert re.fullmatch(LINE.format(re.escape(str(d / name))), proc.stdout.strip())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_picture_from_a_pipe_is_answered_as_the_same_file_is(workdir, pictures, tmp_path):
    # as `cat photo.jpg | python predict.py /dev/stdin` reads it: a stream that cannot seek
    import threading
    d, _, _ = pictures
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_bytes((d / "photo.jpg").read_bytes()), daemon=True)
    writer.start()
    from_pipe = run_here("predict.py", pipe, cwd=workdir).stdout
    writer.join(timeout=10)
    from_file = run_here("predict.py", d / "photo.jpg", cwd=workdir).stdout
    assert from_pipe.split(": ", 1)[1] == from_file.split(": ", 1)[1]


class Pipe(io.BytesIO):
    """These bytes as a pipe gives them: read once, no seeking back."""
    name = "<stdin>"  # as the interpreter's standard input is named

    def seekable(self):
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("seek")


class Stdin(io.TextIOWrapper):
    """Standard input holding these bytes; a terminal, when tty."""

    def __init__(self, content=b"", tty=False):
        super().__init__(io.BufferedReader(Pipe(content)))
        self.tty = tty

    def isatty(self):
        return self.tty


def test_a_dash_reads_the_picture_from_standard_input(workdir, pictures, monkeypatch):
    # `cat photo.jpg | python predict.py -`, the other pictures named beside it answered as well
    d, _, _ = pictures
    monkeypatch.setattr(sys, "stdin", Stdin((d / "photo.jpg").read_bytes()))
    from_stdin = run_here("predict.py", "-", d / "cifar.png", cwd=workdir).stdout.splitlines()
    from_files = run_here("predict.py", d / "photo.jpg", d / "cifar.png", cwd=workdir).stdout.splitlines()
    assert from_stdin[0] == from_files[0].replace(str(d / "photo.jpg"), "-")
    assert from_stdin[1] == from_files[1]


@pytest.mark.parametrize("stdin, message", [
    (Stdin(tty=True), "-: standard input is a terminal"),
    (Stdin(b"this is text, not a picture"), "<stdin>: cannot read picture"),
])
def test_a_dash_with_no_picture_behind_it_is_an_error_the_others_still_answered(workdir, pictures, monkeypatch,
                                                                                 stdin, message):
    d, _, _ = pictures
    monkeypatch.setattr(sys, "stdin", stdin)
    proc = run_here("predict.py", "-", d / "cifar.png", cwd=workdir, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and says(proc.stderr, "error: ", message)
    assert re.fullmatch(LINE.format(re.escape(str(d / "cifar.png"))), proc.stdout.strip())


def test_pictures_become_rgb_at_the_training_size():
    for mode in ("L", "RGBA", "P", "CMYK", "I;16", "I", "LA"):
        im = Image.new(mode, (50, 20))
        assert picture_files.to_rgb(im).mode == "RGB"
    assert picture_files.to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    for mode, white in [("I;16", 65535), ("I", 255), ("F", 1.0), ("F", 255.0)]:  # float: 0..1 or 0..255
        assert picture_files.to_rgb(Image.new(mode, (2, 2), white)).getpixel((0, 0)) == (255, 255, 255), (mode, white)
    assert picture_files.to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (127, 127, 127)
    with warnings.catch_warnings():  # a float picture's values that are no number are black, without a warning
        warnings.simplefilter("error")
        nan = Image.fromarray(np.array([[0.5, np.nan], [np.inf, 1.0]], dtype=np.float32), "F")
        assert [picture_files.to_rgb(nan).getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [127, 0, 0, 255]


def test_large_pictures_are_center_cropped_then_resized(tmp_path):
    im = np.zeros((100, 300, 3), dtype=np.uint8)
    im[:, 100:200] = 255  # the centre square is white, the sides black
    Image.fromarray(im).save(tmp_path / "wide.png")
    out = picture_files.load_picture(tmp_path / "wide.png", 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # all white, but for the resampling filter's reach just past the crop's edges
    assert out[:, :, 1:-1].min() == 255 and out.min() > 200


def test_a_bad_picture_gets_one_line_and_the_others_are_still_predicted(workdir, pictures):
    d, _, _ = pictures
    proc = run_here("predict.py", d / "cifar.png", d / "notes.jpg", d / "missing.png", d / "photo.jpg",
                    cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "notes.jpg" in errors[0] and "missing.png" in errors[1]
    assert [ln.split(":")[0] for ln in proc.stdout.splitlines()] == [str(d / "cifar.png"), str(d / "photo.jpg")]


def test_a_name_too_long_for_the_file_system_is_an_error_line_of_its_own(workdir, pictures):
    d, _, _ = pictures
    long = d / ("x" * 300 + ".jpg")  # most file systems take 255 bytes a name
    proc = run_here("predict.py", long, d / "cifar.png", cwd=workdir, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert says(proc.stderr.strip(), long, "cannot read picture", "File name too long")
    assert proc.stdout.startswith(f"{d / 'cifar.png'}: ")


def test_an_empty_name_is_an_error_line_not_the_working_folder(workdir, pictures):
    d, _, _ = pictures
    proc = run_here("predict.py", "", d / "cifar.png", cwd=workdir, check=False)  # python predict.py "$UNSET"
    assert proc.returncode == 1 and says(proc.stderr.strip(), "error: ''", "empty name")
    assert len(proc.stdout.splitlines()) == 1


def test_a_folder_part_of_which_cannot_be_read_is_an_error_line_naming_that_part(tmp_path, locked_folders):
    (tmp_path / "photos" / "locked").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a.png")
    files, errors = predict.expand_paths([str(tmp_path / "photos")])
    assert errors == [f"{tmp_path / 'photos'}: cannot read {tmp_path / 'photos' / 'locked'} (Permission denied)"]
    assert files == []


def test_a_folder_is_predicted_picture_by_picture(workdir, pictures):
    d, _, _ = pictures
    proc = run_here("predict.py", d, "--json", cwd=workdir, check=False)
    results = json.loads(proc.stdout)["results"]
    by_name = {os.path.basename(r["path"]): r for r in results}
    assert set(by_name) == {"cifar.png", "photo.jpg", "gray.png", "rgba.png", "sixteen.png", "cmyk.jpg",
                            "palette.gif", "large.jpg", "notes.jpg"}
    assert "error" in by_name["notes.jpg"] and proc.returncode == 1
    assert all(0 <= r["confidence"] <= 1 for n, r in by_name.items() if n != "notes.jpg")


def test_topk_lists_the_k_most_likely_classes_in_order(workdir, pictures):
    d, _, _ = pictures
    proc = run_here("predict.py", d / "cifar.png", "--topk", "3", "--json", cwd=workdir)
    top = json.loads(proc.stdout)["results"][0]["top"]
    assert len(top) == 3 and top[0]["confidence"] >= top[1]["confidence"] >= top[2]["confidence"]
    assert len({t["class"] for t in top}) == 3
    text = run_here("predict.py", d / "cifar.png", "--topk", "3", cwd=workdir).stdout.splitlines()
    assert len(text) == 3 and text[1].strip().startswith("2. ") and text[2].strip().startswith("3. ")


def test_json_writes_class_names_and_paths_in_any_script_as_they_are(workdir, pictures, tmp_path):
    # A folder dataset's classes are its folder names: 猫 stays 猫, not \u732b, as in the text output.
    d, _, _ = pictures
    ckpt = torch.load(workdir / "runs" / "resnet18" / "best.pth", weights_only=True)
    ckpt["classes"] = ["飞机", "汽车", "鸟", "猫", "鹿", "狗", "青蛙", "马", "船", "卡车"]
    torch.save(ckpt, tmp_path / "zh.pth")
    (tmp_path / "我的照片.png").write_bytes((d / "cifar.png").read_bytes())
    proc = run_here("predict.py", tmp_path / "我的照片.png", "--checkpoint", tmp_path / "zh.pth", "--json",
                    cwd=workdir)
    result = json.loads(proc.stdout)["results"][0]
    assert result["class"] in ckpt["classes"]
    assert f'"class": "{result["class"]}"' in proc.stdout and "我的照片.png" in proc.stdout


def test_the_default_checkpoint_is_the_newest_runs_best_and_among_several_one_line_names_it(tmp_path, trained_run,
                                                                                             pictures):
    run_dir, _ = trained_run
    for name, age in (("old", 100), ("new", 0)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        target = tmp_path / "runs" / name / "best.pth"
        target.write_bytes((run_dir / "best.pth").read_bytes())
        os.utime(target, (time.time() - age, time.time() - age))
    assert predict.latest_checkpoint(tmp_path / "runs") == tmp_path / "runs" / "new" / "best.pth"
    proc = run_here("predict.py", pictures[0] / "cifar.png", cwd=tmp_path)
    assert re.fullmatch(LINE.format(re.escape(str(pictures[0] / "cifar.png"))), proc.stdout.strip())
    newest = Path("runs", "new", "best.pth")
    assert proc.stderr.startswith("note: ") and says(proc.stderr.strip(), newest, "--checkpoint")


def test_no_checkpoint_yet_says_to_train_first(tmp_path, pictures):
    d, _, _ = pictures
    line = one_line_error(run_here("predict.py", d / "cifar.png", cwd=tmp_path, check=False))
    assert "train.py" in line and "--checkpoint" in line


def test_a_bare_state_dict_needs_no_model_flag_and_another_network_named_is_refused(workdir, pictures, tmp_path):
    d, _, _ = pictures
    ckpt = torch.load(workdir / "runs" / "resnet18" / "best.pth", weights_only=True)
    torch.save(ckpt["model"], tmp_path / "bare.pth")
    proc = run_here("predict.py", d / "cifar.png", "--checkpoint", tmp_path / "bare.pth", cwd=workdir)
    assert re.fullmatch(LINE.format(re.escape(str(d / "cifar.png"))), proc.stdout.strip())
    assert "normalization" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    line = one_line_error(run_here("predict.py", d / "cifar.png", "--checkpoint", tmp_path / "bare.pth",
                                   "--model", "resnet50", cwd=workdir, check=False))
    assert "holds a resnet18, not a resnet50" in line
