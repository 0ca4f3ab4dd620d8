"""gui.py: the desktop window, driven without a user on Qt's offscreen platform."""
import os
import subprocess
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

import data  # noqa: E402
import gui  # noqa: E402
import predict  # noqa: E402
from conftest import injected, ROOT  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[0] / "best.pth"


@pytest.fixture(scope="module")
def picture(tmp_path_factory, cifar_dir):
    images, _, _ = data.load_split(cifar_dir, train=False)
    path = tmp_path_factory.mktemp("gui") / "frog.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    return path


def test_open_and_run_show_the_class_and_confidence_predict_py_computes(app, checkpoint, picture):
    window = gui.MainWindow(checkpoint, language="en")
    assert window.open_image(picture)
    result = window.run()
    clf = predict.Classifier(checkpoint)
    expected = clf.top(clf.probabilities(data.load_picture(picture, 32)[None])[0], 5)
    assert [c for c, _ in result] == [c for c, _ in expected]
    best, confidence = expected[0]
    assert window.result.text() == f"{best}  ·  confidence {100 * confidence:.1f}%"
    assert [label.text() for label in window.bar_names] == [c for c, _ in expected]
    values = [bar.value() for bar in window.bars]
    assert values == sorted(values, reverse=True) and values[0] == round(1000 * confidence)
    assert not window.picture.pixmap().isNull()


def test_the_picture_is_scaled_with_its_aspect_ratio_kept(app, checkpoint, tmp_path):
    Image.new("RGB", (400, 100), (10, 200, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "small.png")
    window = gui.MainWindow(checkpoint, language="en")
    window.open_image(tmp_path / "wide.png")  # as `gui.py PICTURE` does: before the window is laid out
    window.resize(600, 700)
    window.show()
    for name, ratio in (("wide.png", 4.0), ("small.png", 1.0)):
        app.processEvents()
        window.open_image(tmp_path / name)
        app.processEvents()
        shown, room = window.picture.pixmap(), window.picture.size()
        assert abs(shown.width() / shown.height() - ratio) < 0.05
        assert shown.width() <= room.width() and shown.height() <= room.height()  # all of it is visible
        assert max(shown.width() / room.width(), shown.height() / room.height()) > 0.95  # and it fills the room
    window.close()


def test_class_names_switch_to_chinese(app, checkpoint, picture):
    window = gui.MainWindow(checkpoint, language="en")
    window.open_image(picture)
    best = window.run()[0][0]
    window.language_box.setCurrentIndex(1)
    assert window.result.text().startswith(gui.CHINESE[best]) and "置信度" in window.result.text()
    assert window.windowTitle().startswith("CIFAR-10 十分类") and window.run_button.text() == "运行"


def test_the_status_bar_names_the_network_accuracy_and_epoch(app, checkpoint):
    import torch
    ckpt = torch.load(checkpoint, weights_only=True)
    status = gui.MainWindow(checkpoint).statusBar().currentMessage()
    assert "resnet18" in status and f"{ckpt['accuracy']:.2f}%" in status and f"epoch {ckpt['epoch']}" in status


def test_run_without_a_picture_says_so_in_the_window(app, checkpoint):
    window = gui.MainWindow(checkpoint, language="en")
    assert window.run() is None
    assert window.message.text() == "Choose a picture first."


def test_an_unreadable_file_is_a_message_not_a_crash(app, checkpoint, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    window = gui.MainWindow(checkpoint, language="en")
    assert not window.open_image(tmp_path / "notes.jpg")
    assert "notes.jpg" in window.message.text() and window.run() is None


def test_a_missing_checkpoint_says_train_first(app, picture, tmp_path):
    window = gui.MainWindow(tmp_path / "runs" / "none" / "best.pth", language="en")
    window.open_image(picture)
    assert window.run() is None
    assert "make train" in window.message.text()


def test_the_model_is_loaded_once_per_checkpoint(app, checkpoint, picture, monkeypatch, tmp_path):
    loads = []
    real = predict.Classifier

    def counting(path, *a, **k):
        loads.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(predict, "Classifier", counting)
    window = gui.MainWindow(checkpoint, language="en")
    window.open_image(picture)
    window.run()
    window.run()
    assert len(loads) == 1
    other = tmp_path / "other.pth"
    other.write_bytes(checkpoint.read_bytes())
    window.set_checkpoint(other)
    window.run()
    window.set_checkpoint(checkpoint)
    window.run()
    assert len(loads) == 2


def test_a_dropped_picture_is_opened_and_classified(app, checkpoint, picture):
    window = gui.MainWindow(checkpoint, language="en")
    mime = QtCore.QMimeData()
    mime.setUrls([QtCore.QUrl.fromLocalFile(str(picture))])
    event = QtGui.QDropEvent(QtCore.QPointF(10, 10), QtCore.Qt.DropAction.CopyAction, mime,
                             QtCore.Qt.MouseButton.LeftButton, QtCore.Qt.KeyboardModifier.NoModifier)
    window.dropEvent(event)
    assert window.image_path == picture and window.last_result is not None


def test_the_default_checkpoint_is_the_newest_runs_best(app, checkpoint, tmp_path, monkeypatch):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "best.pth").write_bytes(checkpoint.read_bytes())
    monkeypatch.chdir(tmp_path)
    window = gui.MainWindow()
    assert window.checkpoint == (tmp_path / "runs" / "mine" / "best.pth").relative_to(tmp_path)
    assert "resnet18" in window.statusBar().currentMessage()


def test_a_picture_on_the_command_line_opens_and_the_window_runs(app, checkpoint, picture):
    QtCore.QTimer.singleShot(300, app.quit)
    assert gui.main([str(picture), "--checkpoint", str(checkpoint)]) == 0


def test_without_pyside6_one_line_says_how_to_install_it(tmp_path):
    env = injected(tmp_path, "import sys\nsys.modules['PySide6'] = None\n")
    proc = subprocess.run([sys.executable, str(ROOT / "gui.py")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "requirements-gui.txt" in proc.stderr
