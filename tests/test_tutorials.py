"""Checkpoints the tutorials' own code saves work in predict.py, test.py, the window and export.py,
and answer as the tutorials themselves would; files that are no checkpoint say what they are."""
import importlib.util
import io
import json
import pickle
import zipfile

import pytest
import torch
from PIL import Image

import batching
import data
import export
import pictures
import predict
import resnet
import tutorial_predict
from conftest import ROOT, write_cifar, says
from tutorial_resnet import ResNet18 as TutorialResNet18

CHINESE = ["飞机", "汽车", "鸟", "猫", "鹿", "狗", "青蛙", "马", "船", "卡车"]  # the tutorial's class names


def load_script(name):
    """A script imported by its path (test.py shares its name with Python's own `test` package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_looking(model):
    """Random weights with BatchNorm statistics away from 0 and 1, and a final layer sharp
    enough that the classes' confidences differ clearly."""
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        last = model.fc if hasattr(model, "fc") else model.linear
        last.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def tutorial_files(tmp_path_factory):
    """What the tutorials leave on disk: the ResNet18 tutorial's model/net_128.pth (a bare state
    dict in its own layer names), kuangliu's checkpoint/ckpt.pth ({'net': a DataParallel state
    dict, 'acc', 'epoch'}), a sample picture and a tiny CIFAR-10."""
    d = tmp_path_factory.mktemp("tutorial")
    (d / "model").mkdir()
    torch.save(trained_looking(TutorialResNet18()).state_dict(), d / "model" / "net_128.pth")
    (d / "checkpoint").mkdir()
    kuangliu = trained_looking(resnet.build_model("resnet18"))
    torch.save({"net": {f"module.{k}": v for k, v in kuangliu.state_dict().items()}, "acc": 93.5, "epoch": 120},
               d / "checkpoint" / "ckpt.pth")
    cifar = write_cifar(d / "data", n_train=20, n_test=40)
    images, _, _ = data.load_split(cifar, train=False)
    (d / "test").mkdir()
    Image.fromarray(images[3].permute(1, 2, 0).numpy()).save(d / "test" / "0_3.jpg")
    return d


def predict_json(monkeypatch, capsys, folder, *args):
    monkeypatch.chdir(folder)
    assert predict.main(predict.get_args_parser().parse_args([*args, "--json"])) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["results"], out.err.strip().splitlines()


def test_predict_answers_the_resnet18_tutorials_checkpoint_as_its_own_predict_py(tutorial_files, monkeypatch,
                                                                                  capsys):
    name, confidence = tutorial_predict.predict_(Image.open(tutorial_files / "test" / "0_3.jpg"),
                                                  tutorial_files / "model" / "net_128.pth")
    results, notes = predict_json(monkeypatch, capsys, tutorial_files, "test/0_3.jpg",
                                  "--checkpoint", "model/net_128.pth")
    assert CHINESE[resnet.CIFAR10_CLASSES.index(results[0]["class"])] == name
    assert results[0]["confidence"] == pytest.approx(confidence, abs=1e-5)
    assert len(notes) == 1 and "model/net_128.pth" in notes[0] and "std (0.2023, 0.1994, 0.201)" in notes[0]


def test_predict_reads_kuangliu_s_checkpoint_with_its_dataparallel_prefixes(tutorial_files, monkeypatch, capsys):
    state = torch.load(tutorial_files / "checkpoint" / "ckpt.pth", weights_only=True)["net"]
    model = resnet.build_model("resnet18")
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    picture = pictures.load_picture(tutorial_files / "test" / "0_3.jpg", 32)[None]
    with torch.no_grad():
        expected = model.eval()(batching.normalize(picture, resnet.TUTORIAL_MEAN, resnet.TUTORIAL_STD)).softmax(1)[0]
    results, notes = predict_json(monkeypatch, capsys, tutorial_files, "test/0_3.jpg",
                                  "--checkpoint", "checkpoint/ckpt.pth", "--topk", "3")
    assert [t["class"] for t in results[0]["top"]] == [resnet.CIFAR10_CLASSES[i] for i in expected.topk(3).indices]
    assert results[0]["confidence"] == pytest.approx(expected.max().item(), abs=1e-5)
    assert notes == ["note: checkpoint/ckpt.pth: a kuangliu checkpoint without its normalization; assuming the "
                     "tutorials' mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.201)"]


@pytest.mark.parametrize("path", ["model/net_128.pth", "checkpoint/ckpt.pth"])
def test_test_py_scores_a_tutorials_checkpoint_with_the_tutorials_normalization(tutorial_files, path, capsys):
    test = load_script("test")
    args = test.get_args_parser().parse_args(["--checkpoint", str(tutorial_files / path), "--data-dir",
                                              str(tutorial_files / "data"), "--device", "cpu", "--amp", "off"])
    result = test.main(args)
    model, _ = resnet.load_model(tutorial_files / path)
    images, labels, _ = data.load_split(tutorial_files / "data", train=False)
    with torch.no_grad():
        predicted = model(batching.normalize(images, resnet.TUTORIAL_MEAN, resnet.TUTORIAL_STD)).argmax(1)
    assert result["accuracy"] == pytest.approx(100.0 * (predicted == labels).float().mean().item())
    assert "resnet18" in capsys.readouterr().out


def test_export_py_writes_a_tutorials_checkpoint_with_its_normalization_in_the_metadata(tutorial_files, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    out = tmp_path / "net_128.onnx"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(tutorial_files / "model" / "net_128.pth"),
                                                     "--data-dir", str(tutorial_files / "data"), "--images", "8",
                                                     "--output", str(out)]))
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert metadata["arch"] == "resnet18" and metadata["std"] == list(resnet.TUTORIAL_STD)


def test_the_window_shows_a_tutorials_checkpoint_and_what_it_assumed(tutorial_files, monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    import gui
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])  # noqa: F841
    window = gui.MainWindow(tutorial_files / "checkpoint" / "ckpt.pth", language="en")
    window.open_image(tutorial_files / "test" / "0_3.jpg")
    assert window.run() is not None
    status = window.statusBar().currentMessage()
    assert "93.50% test accuracy" in status and "epoch 120" in status and "normalization assumed" in status
    other = gui.MainWindow(tutorial_files / "model" / "net_128.pth", language="en", model="resnet50")
    other.open_image(tutorial_files / "test" / "0_3.jpg")
    assert other.run() is None and "holds a resnet18, not a resnet50" in other.message.text()


def test_gui_py_and_export_py_take_model_as_predict_py_and_test_py_do():
    import gui
    assert gui.get_args_parser().parse_args(["--model", "resnet50"]).model == "resnet50"
    assert export.get_args_parser().parse_args(["--model", "resnet50"]).model == "resnet50"


# ---------------------------------------------------------------------------
# Files that are not checkpoints: each says what it is

@pytest.mark.parametrize("content, what", [
    (b"", "an empty file"),
    (b"hello, I am a text file\n", "a text file, not a checkpoint"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "a PNG picture, not a checkpoint"),
    (b"\x00\x01\x02\x03\xfe\xff" * 10, "not a PyTorch file (it starts with 00 01 02 03 fe ff 00 01)"),
    (pickle.dumps({"net": [0.1, 0.2]}), "a Python pickle, not a PyTorch file"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, what, recwarn):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.load_checkpoint(tmp_path / "x.pth")
    assert says(str(e.value), tmp_path / "x.pth", "not a readable checkpoint", what)
    assert not recwarn.list  # torch.load's warning about the pickle's protocol is no use to the user


def test_a_checkpoint_in_the_format_of_torch_before_1_6_still_loads(tmp_path):
    state = resnet.build_model("resnet18").state_dict()
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # a pickle, magic number first
    model, _ = resnet.load_model(tmp_path / "old.pth")
    assert torch.equal(model.state_dict()["linear.weight"], state["linear.weight"])


def test_a_truncated_checkpoint_says_it_was_cut_off(tmp_path):
    buffer = io.BytesIO()
    torch.save(resnet.build_model("resnet18").state_dict(), buffer)
    (tmp_path / "cut.pth").write_bytes(buffer.getvalue()[:100_000])
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.load_checkpoint(tmp_path / "cut.pth")
    assert says(str(e.value), "cut.pth", "not a readable checkpoint", "truncated")


def test_a_zip_archive_that_is_no_pytorch_file_says_so(tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.pth", "w") as z:
        z.writestr("photos/cat.jpg", b"...")
    with pytest.raises(resnet.CheckpointError, match="a zip archive, not a PyTorch file"):
        resnet.load_checkpoint(tmp_path / "photos.pth")


def test_a_pickle_that_would_run_code_says_it_was_refused_for_that(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(resnet.CheckpointError, match="refused, as loading it could run code"):
        resnet.load_checkpoint(tmp_path / "evil.pth")

