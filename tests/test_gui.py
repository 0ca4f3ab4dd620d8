"""gui.py: the desktop window, driven without a user on Qt's offscreen platform."""
import os
import signal
import subprocess
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402

import data  # noqa: E402
import gui  # noqa: E402
import pictures  # noqa: E402
import predict  # noqa: E402
import resnet  # noqa: E402
from conftest import injected, ROOT, write_cifar, says  # noqa: E402


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it, of a network with random weights (what the window shows
    is what predict.py computes, whatever the weights)."""
    import torch
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "best.pth"
    torch.save(resnet.checkpoint(resnet.build_model("resnet18"), "resnet18", resnet.CIFAR10_CLASSES, data.CIFAR10_MEAN,
                                 data.CIFAR10_STD, 32, "cifar10", 7, 61.25, {}), path)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    images, _, _ = data.load_split(write_cifar(tmp_path_factory.mktemp("cifar"), n_train=10, n_test=10), train=False)
    path = tmp_path_factory.mktemp("gui") / "frog.png"
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(path)
    return path


def test_open_and_run_show_the_class_and_confidence_predict_py_computes(app, checkpoint, picture):
    window = gui.MainWindow(checkpoint, language="en")
    assert window.open_image(picture)
    result = window.run()
    clf = predict.Classifier(checkpoint)
    expected = clf.top(clf.probabilities(pictures.load_picture(picture, 32)[None])[0], 5)
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


def test_in_chinese_the_status_bar_and_the_messages_are_chinese_too(app, checkpoint, picture, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: the missing checkpoint's message says to train first
    window = gui.MainWindow(checkpoint, language="zh")
    assert "测试准确率 61.25%" in window.statusBar().currentMessage() and "第 7 轮" in window.statusBar().currentMessage()
    assert window.run() is None and "图片" in window.message.text()
    (tmp_path / "notes.jpg").write_text("not a picture")
    window.open_image(tmp_path / "notes.jpg")
    assert window.message.text().startswith("无法读取这张图片：") and "notes.jpg" in window.message.text()
    assert not window.open_image(tmp_path / "nope.jpg") and says(window.message.text(), "找不到", tmp_path / "nope.jpg")
    window.language_box.setCurrentIndex(0)
    assert "61.25% test accuracy" in window.statusBar().currentMessage()
    missing = gui.MainWindow(tmp_path / "none.pth", language="zh")
    missing.open_image(picture)
    missing.run_button.click()
    assert "找不到" in missing.message.text() and "请先训练" in missing.message.text()


def test_the_five_bars_stay_hidden_until_the_first_answer(app, checkpoint, picture):
    window = gui.MainWindow(checkpoint, language="en")
    window.show()
    assert not any(bar.isVisible() or label.isVisible() for bar, label in zip(window.bars, window.bar_names))
    window.open_image(picture)
    assert not any(bar.isVisible() for bar in window.bars)
    window.run()
    assert all(bar.isVisible() and label.isVisible() for bar, label in zip(window.bars, window.bar_names))
    window.close()


def test_the_status_bar_names_the_network_accuracy_and_epoch(app, checkpoint):
    status = gui.MainWindow(checkpoint, language="en").statusBar().currentMessage()
    assert "resnet18" in status and "61.25% test accuracy" in status and "epoch 7" in status


def test_run_without_a_picture_says_so_in_the_window(app, checkpoint):
    window = gui.MainWindow(checkpoint, language="en")
    assert window.run() is None
    assert "picture" in window.message.text()


def test_an_unreadable_file_is_a_message_not_a_crash(app, checkpoint, tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    window = gui.MainWindow(checkpoint, language="en")
    assert not window.open_image(tmp_path / "notes.jpg")
    assert "notes.jpg" in window.message.text() and window.run() is None


def test_a_missing_checkpoint_says_train_first_or_where_runs_are_there_to_choose_from(app, picture, tmp_path,
                                                                                       monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    window = gui.MainWindow(tmp_path / "runs" / "none" / "best.pth", language="en")
    window.open_image(picture)
    assert window.run() is None
    said = window.message.text()
    assert said.startswith(f"{tmp_path / 'runs' / 'none' / 'best.pth'} not found") and "train" in said
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "best.pth").write_bytes(checkpoint.read_bytes())
    window = gui.MainWindow(tmp_path / "runs" / "nope.pth", language="en")
    window.open_image(picture)
    assert window.run() is None
    assert says(window.message.text(), tmp_path / "runs" / "nope.pth", "not found", "Checkpoint")


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


def test_while_the_window_is_open_ctrl_c_in_the_terminal_ends_it(app, checkpoint):
    before, during = signal.getsignal(signal.SIGINT), []
    QtCore.QTimer.singleShot(100, lambda: (during.append(signal.getsignal(signal.SIGINT)), app.quit()))
    assert gui.main(["--checkpoint", str(checkpoint)]) == 0
    assert during == [signal.SIG_DFL]  # the system's default: the process ends, no traceback
    assert signal.getsignal(signal.SIGINT) == before


@pytest.mark.slow
def test_without_pyside6_one_line_says_how_to_install_it(tmp_path):
    env = injected(tmp_path, "import sys\nsys.modules['PySide6'] = None\n")
    proc = subprocess.run([sys.executable, str(ROOT / "gui.py")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0
    assert "requirements-gui.txt" in proc.stderr


def test_no_display_is_one_line_before_qt_would_abort():
    problem = gui.platform_problem({"PATH": "/usr/bin"})
    if problem is None:
        pytest.skip("not Linux: Qt brings what it needs")
    assert "no display" in problem and "\n" not in problem
    assert gui.platform_problem({"QT_QPA_PLATFORM": "offscreen"}) is None


@pytest.mark.slow
def test_the_x11_libraries_qt_lacks_are_named_with_the_packages_that_hold_them(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    fake_ldd = tmp_path / "ldd"  # what ldd says of Qt's xcb plugin on a machine without them
    fake_ldd.write_text("#!/bin/sh\necho '\tlibxcb.so.1 => /lib/libxcb.so.1 (0x1)'\n"
                        "echo '\tlibxcb-icccm.so.4 => not found'\necho '\tlibxcb-keysyms.so.1 => not found'\n"
                        "echo '\tlibxkbcommon-x11.so.0 => not found'\n")
    fake_ldd.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    problem = gui.platform_problem({"DISPLAY": ":0"})
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1, libxkbcommon-x11.so.0" in problem
    assert "sudo apt install libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0" in problem and "\n" not in problem


@pytest.mark.slow
def test_gui_py_without_a_display_exits_with_that_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    proc = subprocess.run([sys.executable, str(ROOT / "gui.py")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "no display" in proc.stderr
