"""A desktop window: pick a picture, see its class and confidence.

    python gui.py                         # the newest run's best.pth
    python gui.py test/0_3.jpg            # open (and classify) a picture at once
    python gui.py --checkpoint runs/resnet50/best.pth
    python gui.py --checkpoint model/net_128.pth --language zh   # a checkpoint of the tutorials' code
    make gui

Choose a picture with the button, drop one on the window, or name it on the
command line. The window shows the most likely class with its confidence (the
model's softmax probability, not an accuracy) and the five most likely as
bars, in English or Chinese. The model is loaded once per checkpoint, by
predict.py's Classifier, and a picture is answered by predict.answers, as
predict.py and web.py answer it.

Scriptable without a user: MainWindow(checkpoint=None), .open_image(path), .run().
Needs Qt for Python: pip install -r requirements-gui.txt (`make gui` does it). Before
the window opens, a Linux desktop is checked for what Qt needs (a display, and the X11
libraries of Qt's xcb platform): what is missing is named in one line.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

try:
    from PySide6 import QtCore, QtGui, QtWidgets
except ImportError:
    QtWidgets = None

import cli  # noqa: E402
import pictures  # noqa: E402
import predict  # noqa: E402
import resnet  # noqa: E402

# The tutorial's Chinese class names, by the English names CIFAR-10 uses.
CHINESE = {"airplane": "飞机", "automobile": "汽车", "bird": "鸟", "cat": "猫", "deer": "鹿",
           "dog": "狗", "frog": "青蛙", "horse": "马", "ship": "船", "truck": "卡车"}
TEXT = {  # the words of the window, in both languages; {} is filled in
    "en": {"title": "CIFAR-10 classifier", "choose": "Choose picture…", "run": "Run", "model": "Checkpoint…",
           "confidence": "confidence", "drop": "Drop a picture here or choose one",
           "no_picture": "Choose a picture first.", "train_first": "No trained model yet: train one first.",
           "not_found": "{} not found.", "bad_picture": "Cannot read this picture: {}",
           "choose_checkpoint": "Choose one with “Checkpoint…”.",
           "bad_checkpoint": "Cannot use this checkpoint: {}", "no_checkpoint": "no checkpoint",
           "accuracy": "{:.2f}% test accuracy", "epoch": "epoch {}",
           "assumed": "normalization assumed: the tutorials' (mean {}, std {})"},
    "zh": {"title": "CIFAR-10 十分类", "choose": "选择图片…", "run": "运行", "model": "选择模型…",
           "confidence": "置信度", "drop": "把图片拖到这里，或点“选择图片”",
           "no_picture": "请先选择图片。", "train_first": "还没有训练好的模型：请先训练。",
           "not_found": "找不到 {}。", "bad_picture": "无法读取这张图片：{}",
           "choose_checkpoint": "请点“选择模型…”另选一个。",
           "bad_checkpoint": "无法使用这个模型文件：{}", "no_checkpoint": "没有模型",
           "accuracy": "测试准确率 {:.2f}%", "epoch": "第 {} 轮",
           "assumed": "按教程的归一化参数处理（均值 {}，标准差 {}）"},
}
TOP = 5


def default_language():
    return "zh" if QtCore.QLocale.system().language() == QtCore.QLocale.Language.Chinese else "en"


class MainWindow(QtWidgets.QMainWindow if QtWidgets else object):
    def __init__(self, checkpoint=None, language=None, model=None):
        super().__init__()
        self.language = language or default_language()
        self.arch = model  # the network a checkpoint must hold (None: the one it holds)
        self.image_path = self.checkpoint = self.last_result = None
        self.classifiers = {}  # checkpoint path -> predict.Classifier, each loaded once
        self.setAcceptDrops(True)

        self.picture = QtWidgets.QLabel(alignment=QtCore.Qt.AlignmentFlag.AlignCenter)
        self.picture.setMinimumSize(320, 240)
        # The label takes the room the layout gives it and the picture is scaled into that
        # room, again whenever the label's size changes (a pixmap-sized label gets cropped).
        self.picture.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Ignored)
        self.picture.installEventFilter(self)
        self.picture.setStyleSheet("QLabel { background: #f4f4f4; border: 1px dashed #aaa; }")
        self.choose_button = QtWidgets.QPushButton(clicked=self.choose_image)
        self.run_button = QtWidgets.QPushButton(clicked=self.run)
        self.model_button = QtWidgets.QPushButton(clicked=self.choose_checkpoint)
        self.language_box = QtWidgets.QComboBox()
        self.language_box.addItems(["English", "中文"])
        self.language_box.setCurrentIndex(1 if self.language == "zh" else 0)
        self.language_box.currentIndexChanged.connect(lambda i: self.set_language("zh" if i else "en"))
        self.result = QtWidgets.QLabel(alignment=QtCore.Qt.AlignmentFlag.AlignCenter)
        self.result.setStyleSheet("QLabel { font-size: 20px; font-weight: bold; padding: 6px; }")
        self.message = QtWidgets.QLabel(alignment=QtCore.Qt.AlignmentFlag.AlignCenter, wordWrap=True)
        self.message.setStyleSheet("QLabel { color: #b00020; }")
        self.bar_names, self.bars = [], []
        bars = QtWidgets.QGridLayout()
        for i in range(TOP):
            name, bar = QtWidgets.QLabel(), QtWidgets.QProgressBar(maximum=1000, textVisible=True)
            bars.addWidget(name, i, 0)
            bars.addWidget(bar, i, 1)
            self.bar_names.append(name)
            self.bars.append(bar)
        buttons = QtWidgets.QHBoxLayout()
        for w in (self.choose_button, self.run_button, self.model_button, self.language_box):
            buttons.addWidget(w)
        layout = QtWidgets.QVBoxLayout()
        layout.addWidget(self.picture, stretch=1)
        layout.addLayout(buttons)
        layout.addWidget(self.result)
        layout.addLayout(bars)
        layout.addWidget(self.message)
        self.setCentralWidget(QtWidgets.QWidget())
        self.centralWidget().setLayout(layout)
        self.resize(520, 600)
        self.set_language(self.language)
        self.set_checkpoint(checkpoint or predict.latest_checkpoint())

    # --- the three things a user does -------------------------------------

    def open_image(self, path):
        """Show a picture (scaled, aspect ratio kept) and make it the one Run classifies."""
        self.clear_result()
        if not os.path.exists(path):  # in the window's words; the reader's other reasons are Pillow's
            self.show_message(self.words["not_found"].format(path))
            return False
        try:  # the reader predict.py uses: what is shown is what is classified (EXIF turn included)
            im = pictures.open_picture(path, draft=(1024, 1024))
        except pictures.PictureError as e:
            self.show_message(self.words["bad_picture"].format(e))
            return False
        im.thumbnail((1024, 1024))
        image = QtGui.QImage(im.tobytes(), im.width, im.height, 3 * im.width, QtGui.QImage.Format.Format_RGB888)
        self.original = QtGui.QPixmap.fromImage(image.copy())  # copy: the bytes object goes away
        self.image_path = Path(path)
        self.show_picture()
        self.setWindowTitle(f"{self.words['title']} — {self.image_path.name}")
        return True

    def run(self):
        """Classify the open picture; returns [(class, confidence), ...] or None with a message shown."""
        if self.image_path is None:
            return self.show_message(self.words["no_picture"])
        classifier = self.classifier()
        if classifier is None:
            return None
        picture = predict.read_picture(self.image_path, classifier.image_size)
        answer = predict.answers(classifier, [(str(self.image_path), picture)], TOP)[0]  # as predict.py's
        if "error" in answer:
            return self.show_message(self.words["bad_picture"].format(answer["error"]))
        self.last_result = [(t["class"], t["confidence"]) for t in answer["top"]]
        self.show_result()
        return self.last_result

    def set_checkpoint(self, path):
        """Use this checkpoint from now on; its network, accuracy and epoch go to the status bar."""
        self.checkpoint = Path(path) if path else None
        self.clear_result()
        classifier = self.classifier()
        if classifier is not None and classifier.assumed:  # a tutorial's checkpoint
            print(f"note: {classifier.assumed}", file=sys.stderr)
        self.show_status()
        return classifier is not None

    # --- helpers -----------------------------------------------------------

    def classifier(self):
        if self.checkpoint is None:
            return self.show_message(self.words["train_first"])
        if self.checkpoint not in self.classifiers:
            if not self.checkpoint.exists():  # a name mistyped, where trained runs are there to choose from?
                hint = self.words["choose_checkpoint" if predict.trained_runs() else "train_first"]
                return self.show_message(f"{self.words['not_found'].format(self.checkpoint)} {hint}")
            try:
                self.classifiers[self.checkpoint] = predict.Classifier(self.checkpoint, self.arch)
            except resnet.CheckpointError as e:
                return self.show_message(self.words["bad_checkpoint"].format(e))
        return self.classifiers[self.checkpoint]

    def show_status(self):
        """The checkpoint's network, test accuracy and epoch in the status bar, in the window's language."""
        classifier = self.classifiers.get(self.checkpoint)
        if classifier is None:
            self.statusBar().showMessage(self.words["no_checkpoint"] if self.checkpoint is None else "")
            return
        ckpt, words = classifier.ckpt, self.words
        parts = [ckpt["arch"],
                 words["accuracy"].format(ckpt["accuracy"]) if ckpt.get("accuracy") is not None else "",
                 words["epoch"].format(ckpt["epoch"]) if ckpt.get("epoch") is not None else "",
                 words["assumed"].format(tuple(ckpt["mean"]), tuple(ckpt["std"])) if classifier.assumed else "",
                 str(self.checkpoint)]
        self.statusBar().showMessage(" · ".join(p for p in parts if p))

    def name(self, english):
        return CHINESE.get(english, english) if self.language == "zh" else english

    def show_result(self):
        (best, confidence), rest = self.last_result[0], self.last_result
        self.result.setText(f"{self.name(best)}  ·  {self.words['confidence']} {100 * confidence:.1f}%")
        for i, (label, bar) in enumerate(zip(self.bar_names, self.bars)):
            if i < len(rest):
                label.setText(self.name(rest[i][0]))
                bar.setValue(round(1000 * rest[i][1]))
                bar.setFormat(f"{100 * rest[i][1]:.1f}%")
            label.setVisible(i < len(rest))
            bar.setVisible(i < len(rest))
        self.message.clear()

    def clear_result(self):
        """No answer shown: the bars stay hidden until there is one."""
        self.last_result = None
        self.result.clear()
        self.message.clear()
        for label, bar in zip(self.bar_names, self.bars):
            label.clear()
            label.hide()
            bar.setValue(0)
            bar.hide()

    def show_message(self, text):
        self.message.setText(text)
        return None

    def show_picture(self):
        if self.image_path is None:
            return
        # Shrink smoothly; enlarge a tiny CIFAR picture as crisp pixels rather than a blur.
        enlarge = self.original.width() < self.picture.width() and self.original.height() < self.picture.height()
        mode = QtCore.Qt.TransformationMode
        self.picture.setPixmap(self.original.scaled(self.picture.size(), QtCore.Qt.AspectRatioMode.KeepAspectRatio,
                                                    mode.FastTransformation if enlarge else mode.SmoothTransformation))

    def set_language(self, language):
        self.language, self.words = language, TEXT[language]
        self.setWindowTitle(self.words["title"] + (f" — {self.image_path.name}" if self.image_path else ""))
        self.choose_button.setText(self.words["choose"])
        self.run_button.setText(self.words["run"])
        self.model_button.setText(self.words["model"])
        if self.image_path is None:
            self.picture.setText(self.words["drop"])
        if self.last_result:
            self.show_result()
        self.show_status()

    def choose_image(self):
        kinds = "Pictures (*.jpg *.jpeg *.png *.bmp *.gif *.webp *.tif *.tiff);;All files (*)"
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, self.words["choose"], "", kinds)
        if path and self.open_image(path):
            self.run()

    def choose_checkpoint(self):
        path, _ = QtWidgets.QFileDialog.getOpenFileName(self, self.words["model"], "runs", "Checkpoints (*.pth)")
        if path and self.set_checkpoint(path) and self.image_path:
            self.run()

    def eventFilter(self, watched, event):
        if watched is self.picture and event.type() == QtCore.QEvent.Type.Resize:
            self.show_picture()
        return super().eventFilter(watched, event)

    def dragEnterEvent(self, event):
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event):
        files = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if files and self.open_image(files[0]):
            self.run()


def get_args_parser():
    p = cli.parser("A window to classify pictures with a trained checkpoint.")
    p.add_argument("picture", nargs="?", default=None, help="a picture to open and classify at once")
    cli.checkpoint_flags(p, resnet.MODELS, default=None)
    p.add_argument("--language", choices=["en", "zh"], default=None,
                   help="the window's words and class names (default: the system's)")
    return p


# Qt's X11 platform plugin loads these libraries; Debian and Ubuntu name their packages by
# the library's soname (libxcb-icccm.so.4 -> libxcb-icccm4, libxkbcommon-x11.so.0 -> libxkbcommon-x11-0).
def debian_package(soname):
    name, _, version = soname.partition(".so.")
    name = name.lower()
    return f"{name}{'-' if name[-1].isdigit() else ''}{version.split('.')[0]}"


def missing_libraries(plugin):
    """The shared libraries `plugin` needs that the system does not have (ldd's "not found")."""
    if shutil.which("ldd") is None or not Path(plugin).is_file():
        return []
    out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"^\s*(\S+) => not found", out, re.M)))


def platform_problem(environ=os.environ):
    """One line on what keeps Qt from opening a window on this Linux desktop, or None.
    (Qt itself would abort with several lines; elsewhere Qt brings what it needs.)"""
    platform = environ.get("QT_QPA_PLATFORM", "")
    if not sys.platform.startswith("linux") or platform not in ("", "xcb"):
        return None  # offscreen, wayland, vnc, ...: chosen on purpose
    if not environ.get("DISPLAY") and not (environ.get("WAYLAND_DISPLAY") and platform != "xcb"):
        return ("no display to open a window on (DISPLAY is not set): run it in a desktop session, or over "
                "ssh with -X; predict.py answers on the command line")
    if environ.get("WAYLAND_DISPLAY") and not environ.get("DISPLAY"):
        return None  # Qt's Wayland plugin: no X11 libraries involved
    plugins = QtCore.QLibraryInfo.path(QtCore.QLibraryInfo.LibraryPath.PluginsPath)
    missing = missing_libraries(Path(plugins) / "platforms" / "libqxcb.so")
    if missing:
        return (f"Qt's X11 platform needs {', '.join(missing)}; on Debian/Ubuntu: sudo apt install "
                f"{' '.join(sorted({debian_package(m) for m in missing}))} (the README lists other systems)")
    return None


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if QtWidgets is None:
        raise cli.UserError("gui.py needs Qt for Python: pip install -r requirements-gui.txt")
    problem = None if QtWidgets.QApplication.instance() else platform_problem()
    if problem:
        raise cli.UserError(problem)
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    window = MainWindow(args.checkpoint, args.language, args.model)
    if args.picture and window.open_image(args.picture):
        window.run()
    window.show()
    # Ctrl-C in the terminal closes the window: Qt's event loop never lets Python's own handler run,
    # and the window has nothing to save.
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return app.exec()
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    cli.main(main)
