"""data.py: fetching and checking CIFAR-10, loading it as tensors, and the on-device loader."""
import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import batching
import data
from conftest import make_archive, one_line_error, run, run_here, write_cifar, says


# --- augmentation and normalization, exact on known tensors -----------------

def test_crop_flip_equals_slicing_the_zero_padded_image_then_mirroring_the_chosen_ones():
    images = torch.arange(3 * 3 * 32 * 32, dtype=torch.int64).view(3, 3, 32, 32).to(torch.uint8)
    dy, dx, mirror = torch.tensor([0, 8, 2]), torch.tensor([3, 5, 0]), torch.tensor([False, True, True])
    out = batching.crop_flip(images, dy, dx, mirror, pad=4)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    assert torch.equal(out[0], padded[0, :, 0:32, 3:35])
    assert torch.equal(out[1], padded[1, :, 8:40, 5:37].flip(-1))
    assert torch.equal(out[2], padded[2, :, 2:34, 0:32].flip(-1))
    # offset 4 on both axes, unmirrored, is the image itself
    centre, keep = torch.tensor([4, 4, 4]), torch.tensor([False] * 3)
    assert torch.equal(batching.crop_flip(images, centre, centre, keep), images)


def test_normalize_uses_the_true_cifar_statistics():
    assert data.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = batching.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)
    expected = [(1 - m) / s for m, s in zip(data.CIFAR10_MEAN, data.CIFAR10_STD)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))
    nhwc = batching.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD, torch.channels_last)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, out)


# --- the loader ---------------------------------------------------------------

def labelled(n):
    """Images whose first pixel holds their own index, so batches can be traced back."""
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 4:28, 4:28] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    return images, torch.arange(n) % 10


def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def make_loader(n=100, batch=10, seed=0, rank=0, world=1, train=True):
    images, labels = labelled(n)
    labels = torch.arange(n)  # label = index: shows exactly which images a batch holds
    return batching.CifarLoader(images, labels, batch, data.CIFAR10_MEAN, data.CIFAR10_STD, train=train,
                            device="cpu", seed=seed, rank=rank, world_size=world)


def test_shuffling_is_reproducible_for_a_seed_and_differs_between_epochs_and_seeds():
    a, b = make_loader(seed=1), make_loader(seed=1)
    assert torch.equal(epoch_labels(a, 3), epoch_labels(b, 3))
    assert not torch.equal(epoch_labels(a, 3), epoch_labels(a, 4))
    assert not torch.equal(epoch_labels(a, 3), epoch_labels(make_loader(seed=2), 3))


def test_a_training_epoch_sees_each_image_at_most_once_in_full_batches():
    loader = make_loader(n=105, batch=10)
    batches = [y for _, y in loader]
    assert len(loader) == len(batches) == 10 and all(len(y) == 10 for y in batches)
    seen = torch.cat(batches)
    assert len(seen.unique()) == 100


def test_training_batches_are_normalized_float_images_of_the_input_size():
    x, y = next(iter(make_loader()))
    assert x.dtype == torch.float32 and x.shape == (10, 3, 32, 32)


def test_shards_of_each_step_are_disjoint_and_cover_the_global_batch():
    whole = make_loader(batch=12, seed=5)
    shards = [make_loader(batch=12, seed=5, rank=r, world=3) for r in range(3)]
    for steps in zip(whole, *shards):
        (x, y), parts = steps[0], steps[1:]
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)  # same crops and flips too


def test_evaluation_covers_every_image_once_in_order_and_shards_split_it():
    loader = make_loader(n=95, batch=10, train=False)
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(95))
    shards = [torch.cat([y for _, y in make_loader(n=95, batch=10, train=False, rank=r, world=4)])
              for r in range(4)]
    assert torch.equal(torch.cat(shards), torch.arange(95))


def test_evaluation_batches_are_not_augmented():
    images, labels = labelled(20)
    loader = batching.CifarLoader(images, labels, 20, (0, 0, 0), (1, 1, 1), train=False, device="cpu")
    x, _ = next(iter(loader))
    torch.testing.assert_close(x, images.float() / 255)


# --- reading the batch files -------------------------------------------------

def test_a_split_loads_as_uint8_images_int64_labels_and_class_names(cifar_dir):
    images, labels, classes = data.load_split(cifar_dir, train=True)
    assert images.dtype == torch.uint8 and images.shape == (200, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (200,)
    assert classes[0] == "airplane" and len(classes) == 10
    test_images, _, _ = data.load_split(cifar_dir, train=False, subset=30)
    assert test_images.shape == (30, 3, 32, 32)


def test_rows_are_read_in_channel_height_width_order(tmp_path):
    root = write_cifar(tmp_path, n_train=10, n_test=10)
    images, _, _ = data.load_split(root, train=False)
    import pickle
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f)["data"][0]
    assert images[0, 1, 2, 3] == row[1 * 1024 + 2 * 32 + 3]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "unreadable"),
    ("shape", "uint8 of shape"),
    ("labels", "labels outside"),
])
def test_a_damaged_batch_file_is_named_in_the_error(tmp_path, damage, message):
    root = write_cifar(tmp_path, n_train=20, n_test=10)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        import pickle
        batch = pickle.loads(path.read_bytes())
        if damage == "shape":
            batch["data"] = batch["data"][:, :100]
        else:
            batch["labels"][0] = 10
        path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataError, match=message) as e:
        data.load_split(root, train=True)
    assert "data_batch_2" in str(e.value)


def test_batches_that_hold_no_images_are_one_error_not_a_division_by_zero_later(tmp_path):
    import pickle
    root = write_cifar(tmp_path, n_train=20, n_test=10)
    path = root / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({**batch, "data": batch["data"][:0], "labels": []}))
    with pytest.raises(data.DataError) as e:
        data.load_split(root, train=False)
    said = str(e.value)
    assert said.startswith(f"{root / 'cifar-10-batches-py'}: ") and "no images" in said and "python data.py" in said
    assert len(data.load_split(root, train=True)[1]) == 20


def test_a_batch_file_that_would_run_code_is_refused(tmp_path):
    root = write_cifar(tmp_path, n_train=10, n_test=10)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(data.DataError, match="test_batch"):
        data.load_split(root, train=False)
    assert not marker.exists()


def test_a_checkpoint_naming_a_dataset_this_project_does_not_load_asks_for_dataset(tmp_path, cifar_dir):
    with pytest.raises(data.DataError) as e:
        data.run_test_split({"dataset": "imagenet"}, data_dir=cifar_dir)
    assert says(str(e.value), "'imagenet'", "--dataset")
    assert data.run_test_split({"dataset": "imagenet"}, data_dir=cifar_dir, dataset="cifar10")[4] == "cifar10"


# --- fetching: archive, MD5, download ----------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    src = write_cifar(tmp_path_factory.mktemp("src"), n_train=20, n_test=10)
    return make_archive(src, tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz")


def test_a_good_archive_is_extracted_and_a_second_prepare_does_nothing(tmp_path, archive):
    path, md5 = archive
    out = data.prepare(tmp_path / "d", archive=path, md5=md5)
    assert data.is_prepared(tmp_path / "d") and out == tmp_path / "d" / "cifar-10-batches-py"
    stamp = (out / "test_batch").stat().st_mtime_ns
    data.prepare(tmp_path / "d", archive=tmp_path / "not-there.tar.gz", md5=md5)
    assert (out / "test_batch").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["cifar-10-batches-py"]


def test_a_dataset_folder_with_files_missing_is_replaced_by_the_archive_s_with_a_note(tmp_path, archive, capsys):
    path, md5 = archive
    out = data.prepare(tmp_path / "d", archive=path, md5=md5)
    (out / "test_batch").unlink()
    (out / "data_batch_2").unlink()
    assert data.prepare(tmp_path / "d", archive=path, md5=md5) == out
    assert data.is_prepared(tmp_path / "d") and [p.name for p in (tmp_path / "d").iterdir()] == [out.name]
    assert f"note: {out} lacks data_batch_2, test_batch; the archive's copy replaces it" in capsys.readouterr().out


def test_a_whole_copy_another_process_put_in_place_meanwhile_is_kept(tmp_path, archive, monkeypatch, capsys):
    path, md5 = archive
    theirs = data.prepare(tmp_path / "other", archive=path, md5=md5)
    (theirs / "marker").write_text("")
    real, calls = data.read_batch, []

    def meanwhile(*args, **kwargs):  # while this one checks its extracted batches, the other one finishes
        if not calls:
            shutil.copytree(theirs, tmp_path / "d" / theirs.name)
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "read_batch", meanwhile)
    out = data.prepare(tmp_path / "d", archive=path, md5=md5)
    assert (out / "marker").exists() and [p.name for p in (tmp_path / "d").iterdir()] == [out.name]
    assert "lacks" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["data_dir", "samples"])
def test_a_file_where_a_folder_is_to_be_made_is_named_as_such(tmp_path, archive, where):
    path, md5 = archive
    (tmp_path / "notes").write_text("mine")
    folders = {"data_dir": tmp_path / "d", "samples": tmp_path / "s", where: tmp_path / "notes" / "sub"}
    with pytest.raises(data.DataError) as e:
        data.prepare(folders["data_dir"], archive=path, md5=md5)
        images, labels, _ = data.load_split(folders["data_dir"], train=False)
        data.write_samples(images, labels, folders["samples"])
    assert says(str(e.value), folders[where], "cannot make this folder", "is a file")
    assert (tmp_path / "notes").read_text() == "mine"


def test_the_run_s_data_folder_with_files_gone_is_named_with_what_is_missing_and_scored_without_the_rest(tmp_path,
                                                                                                         cifar_dir):
    import shutil
    shutil.copytree(cifar_dir, tmp_path / "data")
    ckpt = {"dataset": "cifar10", "image_size": 32}
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1").unlink()  # test.py needs no training batch
    images, _, _, _, _ = data.run_test_split(ckpt, remembered=tmp_path / "data")
    assert len(images) > 0
    (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(data.DataError) as e:
        data.run_test_split(ckpt, remembered=tmp_path / "data")
    said = str(e.value)
    assert said.startswith(f"{tmp_path / 'data' / 'cifar-10-batches-py' / 'test_batch'}: missing") and "data.py" in said


def test_the_official_md5_is_checked_and_a_mismatch_leaves_no_dataset_and_says_how_to_pass_a_trusted_copy(
        tmp_path, archive):
    path, md5 = archive
    assert data.CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"
    with pytest.raises(data.DataError) as e:
        data.prepare(tmp_path / "d", archive=path)
    assert says(str(e.value), path, md5, data.CIFAR10_MD5, "--md5")
    assert not data.is_prepared(tmp_path / "d")


def test_an_md5_in_capitals_is_the_same_sum_and_one_that_is_no_sum_is_refused_while_parsing(tmp_path, archive,
                                                                                            capsys):
    path, md5 = archive
    assert data.prepare(tmp_path / "d", archive=path, md5=md5.upper()) == tmp_path / "d" / "cifar-10-batches-py"
    parser = data.get_args_parser()
    for bad in ("xyz", md5[:-1], md5 + "0"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--md5", bad])
        assert says(capsys.readouterr().err.strip(), f"{parser.prog}: error: argument --md5: {bad!r}", "MD5")
    assert parser.parse_args(["--md5", ""]).md5 == ""  # no check


def test_an_archive_that_is_a_folder_is_named_as_one(tmp_path):
    (tmp_path / "downloads").mkdir()
    with pytest.raises(data.DataError) as e:
        data.prepare(tmp_path / "d", archive=tmp_path / "downloads")
    assert says(str(e.value), "downloads is a folder", "--archive", "cifar-10-python.tar.gz")


def test_an_archive_missing_batch_files_leaves_no_dataset(tmp_path):
    src = write_cifar(tmp_path / "src", n_train=10, n_test=10)
    (src / "cifar-10-batches-py" / "data_batch_5").unlink()
    path, md5 = make_archive(src, tmp_path / "partial.tar.gz")
    with pytest.raises(data.DataError, match="does not hold"):
        data.prepare(tmp_path / "d", archive=path, md5=md5)
    assert not (tmp_path / "d").exists()  # the folder it made for the dataset is gone too
    (tmp_path / "mine").mkdir()  # a folder that was there before stays
    with pytest.raises(data.DataError, match="does not hold"):
        data.prepare(tmp_path / "mine", archive=path, md5=md5)
    assert list((tmp_path / "mine").iterdir()) == []


@pytest.mark.parametrize("name, damage, problem", [  # problem: a regular expression
    ("data_batch_3", lambda batch: b"junk", r"unreadable \(UnpicklingError: [^;]+\)"),
    ("data_batch_3", lambda batch: {**batch, "labels": [10] * len(batch["labels"])}, r"labels outside 0\.\.9"),
    ("batches.meta", lambda meta: {**meta, "label_names": []}, "no list of label_names"),
])
def test_an_archive_with_a_damaged_batch_file_names_the_file_in_it_not_the_temporary_folder(
        tmp_path, name, damage, problem):
    import pickle
    src = write_cifar(tmp_path / "src", n_train=10, n_test=10)
    file = src / "cifar-10-batches-py" / name
    damaged = damage(pickle.loads(file.read_bytes()))
    file.write_bytes(damaged if isinstance(damaged, bytes) else pickle.dumps(damaged, protocol=2))
    path, md5 = make_archive(src, tmp_path / "bad.tar.gz")
    with pytest.raises(data.DataError) as e:
        data.prepare(tmp_path / "d", archive=path, md5=md5)
    # the file named within the archive, and no advice to delete a prepared folder: the archive is what to replace
    assert re.fullmatch(re.escape(f"{path}: cifar-10-batches-py/{name}: ") + problem
                        + re.escape("; the archive is damaged, or not the official CIFAR-10 one"), str(e.value))
    assert not (tmp_path / "d").exists()


class Server:
    """Serves one directory on 127.0.0.1; `lie_about_length` sends fewer bytes than it announces."""

    def __init__(self, directory, lie_about_length=False):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def copyfile(self, source, outputfile):
                body = source.read()
                outputfile.write(body[:len(body) // 2] if lie_about_length else body)

        handler = functools.partial(Handler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_from_a_url_then_verify_and_extract(tmp_path, archive):
    path, md5 = archive
    server = Server(path.parent)
    try:
        data.prepare(tmp_path / "d", url=server.url + path.name, md5=md5)
    finally:
        server.close()
    assert data.is_prepared(tmp_path / "d")
    assert not list((tmp_path / "d").glob("*.part"))


def test_the_url_can_come_from_the_cifar_url_environment_variable(tmp_path, archive, monkeypatch):
    path, md5 = archive
    server = Server(path.parent)
    monkeypatch.setenv("CIFAR_URL", server.url + path.name)
    try:
        data.prepare(tmp_path / "d", md5=md5)
    finally:
        server.close()
    assert data.is_prepared(tmp_path / "d")


def test_a_download_cut_off_halfway_leaves_nothing_that_looks_finished(tmp_path, archive):
    path, md5 = archive
    server = Server(path.parent, lie_about_length=True)
    try:
        with pytest.raises(data.DataError):
            data.prepare(tmp_path / "d", url=server.url + path.name, md5=md5)
    finally:
        server.close()
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_offline_gives_one_line_that_says_to_pass_archive_or_url(tmp_path):
    proc = run("data.py", "--data-dir", tmp_path / "d", "--url", "http://127.0.0.1:9/cifar-10-python.tar.gz",
               cwd=tmp_path, check=False)
    line = one_line_error(proc)
    assert says(line, "--archive", "--url") and "ARCHIVE=" not in line
    assert not (tmp_path / "d").exists()  # no empty data folder to wonder about


@pytest.mark.slow
def test_data_py_extracts_an_archive_and_writes_sample_pictures(tmp_path, archive):
    path, md5 = archive
    proc = run_here("data.py", "--data-dir", "d", "--archive", path, "--md5", md5, cwd=tmp_path)
    assert "0_3.jpg" in proc.stdout
    assert data.is_prepared(tmp_path / "d")
    # the tiny archive's test split holds one picture per class
    assert sorted(p.name for p in (tmp_path / "test").iterdir()) == [f"{c}_0.jpg" for c in range(10)]
    again = run_here("data.py", "--data-dir", "d", "--archive", tmp_path / "elsewhere.tar.gz", cwd=tmp_path)
    assert again.stdout.startswith(f"note: {Path('d') / 'cifar-10-batches-py'} is complete already; "
                                   f"{tmp_path / 'elsewhere.tar.gz'} is not read\n")


@pytest.mark.slow
def test_a_data_folder_that_cannot_be_made_is_one_line(tmp_path, archive):
    path, md5 = archive
    (tmp_path / "a-file").write_text("")
    proc = run_here("data.py", "--data-dir", "a-file/d", "--archive", path, "--md5", md5, cwd=tmp_path, check=False)
    assert "a-file" in one_line_error(proc)


def test_samples_are_the_first_ten_test_pictures_of_each_class_named_label_index(tmp_path, cifar_dir):
    from PIL import Image
    images, labels, _ = data.load_split(cifar_dir, train=False)
    data.write_samples(images, labels, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{c}_{k}.jpg" for c in range(10) for k in range(10))
    fourth_airplane = int((labels == 0).nonzero()[3])
    picture = np.asarray(Image.open(tmp_path / "0_3.jpg")).astype(int)
    assert picture.shape == (32, 32, 3)
    distances = [np.abs(picture - im.permute(1, 2, 0).numpy()).mean() for im in images]
    assert int(np.argmin(distances)) == fourth_airplane  # JPEG is lossy, but this is the one
