"""Beyond CIFAR-10: CIFAR-100 and the user's own picture folders, end to end."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import pictures
import resnet
from conftest import (FINE_CLASSES, QUICK, ROOT, make_archive, one_line_error, run_here, write_cifar100,
                      write_folder, says)


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory):
    root = write_cifar100(tmp_path_factory.mktemp("c100"))
    return make_archive(root, root / "cifar-100-python.tar.gz", folder="cifar-100-python")


@pytest.mark.slow
def test_cifar100_from_its_archive_trains_evaluates_and_predicts_with_its_fine_label_names(tmp_path,
                                                                                           cifar100_archive):
    archive, md5 = cifar100_archive
    proc = run_here("data.py", "--dataset", "cifar100", "--data-dir", "data", "--archive", archive, "--md5", md5,
                    cwd=tmp_path)
    assert "CIFAR-100 ready in data/cifar-100-python" in proc.stdout
    assert (tmp_path / "test" / "cifar100").is_dir()  # CIFAR-10's test/<label>_<k>.jpg stay its own
    run_here("train.py", "--dataset", "cifar100", "--data-dir", "data", "--epochs", "1", *QUICK, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "runs" / "resnet18" / "best.pth", weights_only=True)
    assert ckpt["dataset"] == "cifar100" and ckpt["classes"] == FINE_CLASSES and ckpt["num_classes"] == 100
    assert ckpt["mean"] == list(data.CIFAR100_MEAN) and ckpt["std"] == list(data.CIFAR100_STD)
    proc = run_here("test.py", "--checkpoint", "runs/resnet18/best.pth", "--device", "cpu", cwd=tmp_path)
    assert re.search(r"^accuracy \d+\.\d\d% \(\d+/100\)", proc.stdout, re.M)
    assert "fine07" in proc.stdout  # per-class lines name the fine classes
    sample = sorted((tmp_path / "test" / "cifar100").glob("*_0.jpg"))[0]
    proc = run_here("predict.py", sample, "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["results"][0]["class"] in FINE_CLASSES


@pytest.mark.slow
def test_cifar100_is_checked_against_its_own_official_md5(tmp_path, cifar100_archive):
    archive, _ = cifar100_archive  # our tiny archive is not the official file
    proc = run_here("data.py", "--dataset", "cifar100", "--data-dir", "data", "--archive", archive, cwd=tmp_path,
                    check=False)
    assert "expected eb9058c3a382ffc7106e4002c42a8d85" in one_line_error(proc)
    assert "CIFAR-100" in one_line_error(proc) and not (tmp_path / "data" / "cifar-100-python").exists()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A ResNet18 trained for one epoch on a picture folder (odd files included), at 40x40."""
    work = tmp_path_factory.mktemp("folder-run")
    write_folder(work / "photos")
    # all 36 pictures of each split, so that the normalization is the whole folder's
    proc = run_here("train.py", "--dataset", "folder", "--data-dir", "photos", "--image-size", "40", "--epochs", "1",
                    "--out-dir", "runs/photos", *QUICK, "--subset", "36", "--batch-size", "12", cwd=work)
    return work, proc


@pytest.mark.slow
def test_a_picture_folder_trains_with_its_folder_names_as_classes_and_skips_what_is_not_a_picture(folder_run):
    work, proc = folder_run
    assert "skipped 4 of 40 files in photos/train" in proc.stderr  # the hidden .DS_Store is not counted
    for name in ("notes.txt", "broken.jpg", "empty.png", "README.txt"):
        assert name in proc.stderr
    assert "Traceback" not in proc.stderr
    ckpt = torch.load(work / "runs" / "photos" / "best.pth", weights_only=True)
    assert ckpt["dataset"] == "folder" and ckpt["classes"] == ["cat", "dog", "ship"]
    assert ckpt["image_size"] == 40 and ckpt["num_classes"] == 3
    images, _, _ = data.load_split(work / "photos", train=True, dataset="folder", image_size=40)
    assert ckpt["mean"] == pytest.approx((images.double() / 255).mean((0, 2, 3)).tolist(), abs=1e-4)
    assert ckpt["mean"] != pytest.approx(list(data.CIFAR10_MEAN), abs=0.01)


@pytest.mark.slow
def test_predict_and_test_use_a_folder_trained_model_with_no_extra_flags(folder_run):
    work, _ = folder_run
    proc = run_here("predict.py", "photos/test/dog/003.png", "--checkpoint", "runs/photos/best.pth", "--topk", "3",
                    "--json", cwd=work)
    result = json.loads(proc.stdout)["results"][0]
    assert result["class"] in ("cat", "dog", "ship")
    assert sorted(t["class"] for t in result["top"]) == ["cat", "dog", "ship"]
    proc = run_here("test.py", "--checkpoint", "runs/photos/best.pth", "--device", "cpu", cwd=work)
    assert re.search(r"^accuracy \d+\.\d\d% \(\d+/36\)", proc.stdout, re.M)  # 3 classes x 12 test pictures
    assert re.search(r"^ +ship +\d+\.\d\d%", proc.stdout, re.M)


@pytest.mark.slow
def test_names_that_are_not_utf_8_train_and_print_as_their_bytes_where_the_locale_is_strict(tmp_path):
    dog = "狗".encode("gbk")  # as a zip made on a Chinese Windows unpacks on Linux: not UTF-8
    photos = write_folder(tmp_path / "photos", per_class=6, classes=("cat", "dog"), odd_files=False)
    for split in ("train", "test"):
        os.rename(photos / split / "dog", os.fsencode(photos / split) + b"/" + dog)
    os.rename(photos / "test" / "cat" / "000.jpg", os.fsencode(photos / "test" / "cat") + b"/" + dog + b".jpg")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # what a UTF-8 desktop locale gives

    def run_strict(script, *args):
        proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
        return proc.stdout

    run_strict("train.py", "--dataset", "folder", "--data-dir", "photos", "--out-dir", "run", "--epochs", "1",
               *QUICK, "--batch-size", "4")
    figures = run_strict("test.py", "--checkpoint", "run/best.pth", "--confusion-png", "cm.png")
    assert re.search(rb"^ +" + dog + rb" +\d+\.\d\d%", figures, re.M) and b"wrote cm.png" in figures
    answers = run_strict("predict.py", "photos/test/cat", "--checkpoint", "run/best.pth", "--topk", "2")
    assert b"photos/test/cat/" + dog + b".jpg: " in answers
    assert answers.count(dog + b" (") == 6  # each picture's two guesses name both classes
    document = json.loads(run_strict("predict.py", "photos/test/cat", "--checkpoint", "run/best.pth",
                                     "--json").decode())  # UTF-8, the names escaped as \udcb9
    assert b"photos/test/cat/" + dog + b".jpg" in [os.fsencode(r["path"]) for r in document["results"]]


def test_the_decoded_pictures_are_cached_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "photos", per_class=4, odd_files=False)
    decoded = []
    real = pictures.load_picture
    monkeypatch.setattr(pictures, "load_picture", lambda path, size: decoded.append(path) or real(path, size))

    first, labels, classes = pictures.load_folder(root, train=True, image_size=32)
    assert len(decoded) == 12 and (root / ".cache" / "train-32px.npz").is_file()
    decoded.clear()
    again, again_labels, _ = pictures.load_folder(root, train=True, image_size=32)
    assert decoded == [] and torch.equal(again, first) and torch.equal(again_labels, labels)

    pictures.load_folder(root, train=True, image_size=48)  # another size: its own cache
    assert len(decoded) == 12
    decoded.clear()
    (root / "train" / "dog" / "000.jpg").unlink()
    (root / "train" / "ship" / "999.png").write_bytes((root / "train" / "ship" / "001.png").read_bytes())
    changed, changed_labels, _ = pictures.load_folder(root, train=True, image_size=32)
    assert len(decoded) == 12 and len(changed) == 12
    assert changed_labels.bincount().tolist() == [4, 3, 5]


def test_a_class_folder_linked_in_from_elsewhere_is_read_and_a_link_loop_is_not_followed(tmp_path):
    elsewhere = write_folder(tmp_path / "elsewhere", per_class=3, odd_files=False)
    root = tmp_path / "photos"
    shutil.copytree(elsewhere, root, ignore=shutil.ignore_patterns("cat"))
    (root / "train" / "cat").symlink_to(elsewhere / "train" / "cat", target_is_directory=True)
    (root / "train" / "dog" / "loop").symlink_to(root / "train", target_is_directory=True)
    images, labels, classes = pictures.load_folder(root, train=True, image_size=32)
    assert classes == ["cat", "dog", "ship"] and labels.bincount().tolist() == [3, 3, 3]


def test_a_class_folder_part_of_which_cannot_be_read_is_one_line_in_test_py_naming_that_part(tmp_path, locked_folders):
    root = write_folder(tmp_path / "photos", per_class=3, odd_files=False)
    (root / "test" / "cat" / "locked").mkdir()
    model = resnet.build_model("resnet18", 3)
    torch.save(resnet.checkpoint(model, "resnet18", ["cat", "dog", "ship"], (0.5,) * 3, (0.25,) * 3, 32, "folder", 1,
                                 50.0, {}), tmp_path / "best.pth")
    proc = run_here("test.py", "--checkpoint", tmp_path / "best.pth", "--data-dir", root, "--device", "cpu",
                    cwd=tmp_path, check=False)
    assert says(one_line_error(proc), "cannot read", root / "test" / "cat" / "locked", "Permission denied")


def test_a_training_class_folder_without_pictures_is_refused_by_name_and_the_test_split_may_lack_one(tmp_path,
                                                                                                      capsys):
    root = write_folder(tmp_path / "photos", per_class=2, odd_files=False)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("pictures to come")
    with pytest.raises(data.DataError) as e:
        pictures.load_folder(root, train=True, image_size=32)
    assert says(str(e.value), "photos/train", "no readable pictures", "bird")
    capsys.readouterr()
    _, labels, classes = pictures.load_folder(root, train=False, image_size=32)
    assert classes == ["bird", "cat", "dog", "ship"] and labels.bincount().tolist() == [0, 2, 2, 2]
    note = capsys.readouterr().err
    assert note.startswith("note: ") and says(note, root / "test", "bird")


def test_a_test_class_folder_train_does_not_have_is_refused_in_one_line_naming_it_cached_or_not(tmp_path):
    root = write_folder(tmp_path / "photos", per_class=3, odd_files=False)
    pictures.load_folder(root, train=False, image_size=32)  # cached, as it was
    (root / "test" / "dog").rename(root / "test" / "wolf")
    for _ in range(2):  # the split changed: the cache is not used, and no new one is written
        with pytest.raises(data.DataError) as e:
            pictures.load_folder(root, train=False, image_size=32)
        said = str(e.value)
        assert "wolf" in said and "3 files" in said and str(root / "train") in said and "\n" not in said


@pytest.mark.slow
def test_train_py_refuses_a_test_class_the_training_split_lacks_before_training(tmp_path):
    root = write_folder(tmp_path / "photos", per_class=3, odd_files=False)
    (root / "test" / "zebra").mkdir()
    (root / "test" / "cat" / "000.jpg").rename(root / "test" / "zebra" / "000.jpg")
    proc = run_here("train.py", "--dataset", "folder", "--data-dir", "photos", *QUICK, cwd=tmp_path, check=False)
    assert "zebra" in one_line_error(proc) and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_folder_without_class_folders_is_a_one_line_error(tmp_path):
    (tmp_path / "photos" / "train").mkdir(parents=True)
    proc = run_here("train.py", "--dataset", "folder", "--data-dir", "photos", *QUICK, cwd=tmp_path, check=False)
    assert "photos/test/<class>/" in one_line_error(proc)
    (tmp_path / "photos" / "test").mkdir()
    proc = run_here("train.py", "--dataset", "folder", "--data-dir", "photos", *QUICK, cwd=tmp_path, check=False)
    assert "no class folders" in one_line_error(proc)


def test_a_folder_of_one_class_is_refused_naming_it(tmp_path):
    root = write_folder(tmp_path / "photos", per_class=2, classes=("cat",), odd_files=False)
    with pytest.raises(data.DataError) as e:
        data.prepare(root, dataset="folder")
    assert says(str(e.value), "photos/train", "one class folder", "cat")


def test_steps_of_one_picture_at_8_pixels_are_one_line_before_anything_is_written(tmp_path):
    # the last block's maps are then 1 x 1: BatchNorm would have one value per channel to normalize
    write_folder(tmp_path / "photos", per_class=2, odd_files=False)
    proc = run_here("train.py", "--dataset", "folder", "--data-dir", "photos", "--image-size", "8", "--batch-size", "1",
                    "--device", "cpu", "--epochs", "1", cwd=tmp_path, check=False)
    assert "steps of 1 picture per process at --image-size 8" in one_line_error(proc)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cifar_pictures_keep_their_size(tmp_path, cifar_dir):
    proc = run_here("train.py", "--data-dir", cifar_dir, "--image-size", "64", *QUICK, cwd=tmp_path, check=False)
    assert "--image-size is for folder datasets" in one_line_error(proc)


@pytest.mark.parametrize("other", ["another process here", "a process of another machine with the same pid"])
def test_processes_that_build_the_cache_at_the_same_time_do_not_trip_over_each_other(tmp_path, capsys, monkeypatch,
                                                                                      other):
    # under torchrun every process decodes a new folder; here a second one writes and renames
    # the cache while the first is between writing its copy and renaming it
    root = write_folder(tmp_path / "photos", per_class=2, odd_files=False)
    real_savez, others = np.savez, []

    def savez(path, **arrays):
        real_savez(path, **arrays)
        if not others:
            others.append(1)
            with monkeypatch.context() as other_process:
                if other == "another process here":
                    other_process.setattr(os, "getpid", lambda: 99999)
                else:  # the folder is shared by the machines of a multi-node job
                    other_process.setattr(socket, "gethostname", lambda: "node-2")
                pictures.load_folder(root, train=True, image_size=32)

    monkeypatch.setattr(np, "savez", savez)
    images, _, _ = pictures.load_folder(root, train=True, image_size=32)
    assert others and capsys.readouterr().err == ""
    assert [p.name for p in (root / ".cache").iterdir()] == ["train-32px.npz"]
    with np.load(root / ".cache" / "train-32px.npz") as z:
        assert np.array_equal(z["images"], images.numpy())


def test_a_folder_that_cannot_hold_the_cache_still_loads_and_says_so(tmp_path, capsys):
    root = write_folder(tmp_path / "photos", per_class=2, odd_files=False)
    (root / ".cache").write_text("a file where the cache folder would go")
    images, labels, _ = pictures.load_folder(root, train=False, image_size=32)
    assert len(images) == 6 and "cannot cache the decoded pictures" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_cache_write_cut_short_leaves_no_half_written_file(tmp_path, capsys, monkeypatch, failure):
    root = write_folder(tmp_path / "photos", per_class=2, odd_files=False)

    def savez(path, **arrays):
        Path(path).write_bytes(b"half a cache")
        raise failure

    monkeypatch.setattr(np, "savez", savez)
    if isinstance(failure, OSError):  # a full disk: the pictures still load, only uncached
        images, _, _ = pictures.load_folder(root, train=True, image_size=32)
        assert len(images) == 6 and "No space left on device" in capsys.readouterr().err
    else:
        with pytest.raises(KeyboardInterrupt):
            pictures.load_folder(root, train=True, image_size=32)
    assert list((root / ".cache").iterdir()) == []


def test_a_copy_left_by_a_writer_killed_mid_write_is_removed_on_the_next_load(tmp_path):
    root = write_folder(tmp_path / "photos", per_class=2, odd_files=False)
    pictures.load_folder(root, train=True, image_size=32)
    cache = root / ".cache"
    abandoned, in_progress = cache / "train-32px.npz.node-1-4242.tmp.npz", cache / "train-32px.npz.node-2-4343.tmp.npz"
    abandoned.write_bytes(b"half a cache")  # a kill -9 came while writing it, half an hour ago
    os.utime(abandoned, (abandoned.stat().st_atime, abandoned.stat().st_mtime - 1800))
    in_progress.write_bytes(b"being written")  # by another process, now
    images, _, _ = pictures.load_folder(root, train=True, image_size=32)  # from the cache
    assert len(images) == 6
    assert sorted(p.name for p in cache.iterdir()) == ["train-32px.npz", in_progress.name]


@pytest.mark.slow
def test_evaluating_on_a_folder_with_other_classes_is_a_one_line_error(folder_run):
    work, _ = folder_run
    write_folder(work / "other", per_class=2, classes=("apple", "pear", "plum"), odd_files=False)
    proc = run_here("test.py", "--checkpoint", "runs/photos/best.pth", "--data-dir", "other", "--device", "cpu",
                    cwd=work, check=False)
    assert "cat, dog, ship" in one_line_error(proc)


@pytest.mark.slow
def test_resuming_a_folder_run_after_a_class_folder_was_added_is_one_line_and_keeps_the_run(folder_run, tmp_path):
    work, _ = folder_run
    shutil.copytree(work / "photos", tmp_path / "photos")
    shutil.copytree(work / "runs", tmp_path / "runs")
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "photos" / split / "cat", tmp_path / "photos" / split / "bird")
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs" / "photos").iterdir()}
    proc = run_here("train.py", "--resume", "runs/photos/last.pth", "--data-dir", "photos", "--device", "cpu",
                    cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr  # after the skipped odd files, one line:
    assert proc.stderr.splitlines()[-1].startswith(
        "error: runs/photos/last.pth: the run trained on 3 classes (cat, dog, ship) and the data now has 4 classes "
        "(bird, cat, dog, ship)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs" / "photos").iterdir()} == before


@pytest.mark.slow
def test_resuming_without_the_runs_data_folder_names_the_folder_it_trained_on(folder_run, tmp_path):
    work, _ = folder_run
    shutil.copytree(work / "runs", tmp_path / "runs")
    proc = run_here("train.py", "--resume", "runs/photos/last.pth", "--device", "cpu", cwd=tmp_path, check=False)
    assert one_line_error(proc).endswith(f"--data-dir {(work / 'photos').resolve()}")
