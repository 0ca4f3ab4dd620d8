"""web.py's tests' helpers: a checkpoint and pictures built here, web.py started as a real server on a
free loopback port, and a plain HTTP client (the standard library's) with a timeout on every request."""
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from PIL import Image

import data
import resnet
from conftest import CLASSES, ROOT, make_images

TIMEOUT = 60  # seconds for a request, and for the server to start


def write_checkpoint(path, accuracy=42.5):
    """An untrained ResNet18 as train.py saves one (no training: the tests need its answers, not good ones)."""
    torch.manual_seed(0)
    model = resnet.build_model("resnet18")
    torch.save(resnet.checkpoint(model, "resnet18", CLASSES, data.CIFAR10_MEAN, data.CIFAR10_STD, 32, "cifar10",
                                 2, accuracy, {}), path)
    return path


def write_pictures(folder):
    """Pictures of the tiny set's kind (a class colour plus noise) and what is not a picture."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = make_images(4, seed=3)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i}_3.jpg" if i == 0 else folder / f"{i}.png")
    (folder / "notes.txt").write_text("this is text, not a picture")
    return folder


class Server:
    """`python web.py ...` in its own process; .url is what it printed, .token the token it printed."""

    def __init__(self, checkpoint, *flags, env=None, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.out, self.err = Path(folder) / "web.out", Path(folder) / "web.err"
        command = [sys.executable, str(ROOT / "web.py"), "--checkpoint", str(checkpoint), "--port", "0",
                   "--device", "cpu", *map(str, flags)]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=folder)
        deadline = time.monotonic() + TIMEOUT
        while "serving on" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"web.py did not start:\n{self.out.read_text()}\n{self.err.read_text()}")
            time.sleep(0.05)
        line = next(ln for ln in self.out.read_text().splitlines() if "serving on" in ln)
        address = line.split("serving on ")[1]
        self.token = address.partition("?token=")[2] or None
        port = address.partition("?")[0].rstrip("/").rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def multipart(parts):
    """A multipart/form-data body of (field, file name, bytes) parts, and its content type."""
    boundary = "test-" + secrets.token_hex(8)
    body = b""
    for field, name, content in parts:
        filename = f'; filename="{name}"' if name is not None else ""
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{filename}\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(url, body=None, content_type=None, headers=None):
    """(status, headers, document) of one request; 4xx and 5xx are answers too."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            status, got, text = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, got, text = e.code, e.headers, e.read()
    try:
        return status, got, json.loads(text)
    except ValueError:
        return status, got, text.decode(errors="replace")


def post(url, *files, field="file"):
    """POST these picture files (paths) as `file` parts, as `curl -F file=@path` sends them."""
    return call(url, *multipart([(field, Path(f).name, Path(f).read_bytes()) for f in files]))
