"""web.py's JSON API, against the real server on a free loopback port: predict.py's answers, bad input
answered in one line, the token, batching and the queue's bound, and the start-up errors."""
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from conftest import ROOT, injected, one_line_error, run, run_here
from web_server import Server, call, multipart, post

pytestmark = pytest.mark.slow  # each test starts web.py



def pictures_of(work):
    _, _, folder = work
    return sorted(p for p in folder.iterdir() if p.suffix != ".txt")


def still_answers(server, work):
    status, _, document = post(server.url + "/predict", pictures_of(work)[0])
    return status == 200 and document["results"][0]["class"]


def slowed(tmp_path, seconds):
    """An environment in which every forward pass takes `seconds` more: the queue fills up."""
    return injected(tmp_path, f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport predict\n"
                             "answer = predict.Classifier.probabilities\n"
                             f"predict.Classifier.probabilities = lambda self, x: (time.sleep({seconds}), "
                             "answer(self, x))[1]\n")


def test_the_api_answers_what_predict_py_json_answers_for_the_same_checkpoint_and_pictures(server, work):
    d, checkpoint, _ = work
    pictures = pictures_of(work)
    status, _, document = call(server.url + "/predict?topk=3",
                               *multipart([("file", p.name, p.read_bytes()) for p in pictures]))
    proc = run_here("predict.py", *pictures, "--checkpoint", checkpoint, "--json", "--topk", "3", cwd=d)
    expected = json.loads(proc.stdout)
    assert status == 200 and document["checkpoint"] == expected["checkpoint"]
    assert [r["path"] for r in document["results"]] == [p.name for p in pictures]
    for got, want in zip(document["results"], expected["results"]):
        assert got.keys() == want.keys() and got["class"] == want["class"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        assert [t["confidence"] for t in got["top"]] == pytest.approx([t["confidence"] for t in want["top"]], abs=1e-6)


def test_the_api_answers_one_class_by_default_as_predict_py_does(server, work):
    status, _, document = post(server.url + "/predict", pictures_of(work)[0])
    assert status == 200 and len(document["results"][0]["top"]) == 1


def test_topk_gives_that_many_classes_and_no_more_than_there_are(server, work):
    for k, n in [(5, 5), (10, 10), (50, 10)]:
        status, _, document = call(server.url + f"/predict?topk={k}",
                                   *multipart([("file", "a.png", pictures_of(work)[1].read_bytes())]))
        assert status == 200 and len(document["results"][0]["top"]) == n


def test_health_says_ready_with_the_device_the_checkpoint_and_what_it_holds(server, work):
    _, checkpoint, _ = work
    status, _, health = call(server.url + "/health")
    assert status == 200 and health["ready"] is True
    assert health["device"] == "cpu" and health["checkpoint"] == str(checkpoint)
    assert (health["network"], health["dataset"], len(health["classes"]), health["accuracy"], health["precision"]) \
        == ("resnet18", "cifar10", 10, 42.5, "float32")


def test_the_swagger_and_redoc_pages_are_off_and_the_schema_stays(server):
    assert call(server.url + "/docs")[0] == 404 and call(server.url + "/redoc")[0] == 404
    status, _, schema = call(server.url + "/openapi.json")
    assert status == 200 and {"/predict", "/health"} <= set(schema["paths"])


def huge_png():
    """A PNG of 10,000 x 10,000 pixels in a few kilobytes: more than Pillow's limit lets decode."""
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, "PNG")
    return out.getvalue()


def truncated_jpeg(work):
    whole = io.BytesIO()
    Image.open(pictures_of(work)[1]).resize((256, 256)).save(whole, "JPEG")
    return whole.getvalue()[:len(whole.getvalue()) // 2]


BAD = {  # what a user might send -> (the status, a word the error line holds)
    "not a picture": (lambda work: multipart([("file", "notes.txt", b"this is text, not a picture")]),
                      422, "notes.txt"),
    "a truncated picture": (lambda work: multipart([("file", "cut.jpg", truncated_jpeg(work))]), 422, "cut.jpg"),
    "zero bytes": (lambda work: multipart([("file", "empty.png", b"")]), 422, "empty.png"),
    "a huge pixel count": (lambda work: multipart([("file", "bomb.png", huge_png())]), 422, "pixels"),
    "a body over the limit": (lambda work: multipart([("file", "big.jpg", os.urandom(11_000_000))]), 413, "MB"),
    "too many files": (lambda work: multipart([("file", f"{i}.png", pictures_of(work)[1].read_bytes())
                                               for i in range(17)]), 400, "files"),
    "a wrong field name": (lambda work: multipart([("picture", "a.png", pictures_of(work)[1].read_bytes())]),
                           400, "file"),
    "a text field named file": (lambda work: multipart([("file", None, b"test/0_3.jpg")]), 400, "file"),
    "no form at all": (lambda work: (b'{"file": "0_3.jpg"}', "application/json"), 415, "multipart"),
}


@pytest.mark.parametrize("what", BAD)
def test_bad_input_gets_a_4xx_with_one_error_line_and_the_server_goes_on(server, work, what):
    body, status, word = BAD[what]
    got, _, document = call(server.url + "/predict", *body(work))
    assert got == status, document
    assert isinstance(document["error"], str) and "\n" not in document["error"] and word in document["error"]
    assert still_answers(server, work) and "Traceback" not in server.err.read_text()


@pytest.mark.parametrize("topk", ["0", "-1", "two", "", "%C2%B2", "1" * 5000])  # ² is a digit to str.isdigit
def test_a_bad_topk_is_a_400_with_one_line(server, work, topk):
    status, _, document = call(server.url + f"/predict?topk={topk}",
                               *multipart([("file", "a.png", pictures_of(work)[1].read_bytes())]))
    assert status == 400 and "topk" in document["error"]


def test_a_bad_picture_among_good_ones_is_a_422_and_the_good_ones_are_answered_all_the_same(server, work):
    _, _, folder = work
    status, _, document = post(server.url + "/predict", pictures_of(work)[0], folder / "notes.txt")
    assert status == 422 and "notes.txt" in document["error"]
    good, bad = document["results"]
    assert "class" in good and bad.keys() == {"path", "error"}


def test_an_unknown_address_is_a_404_in_json(server):
    status, _, document = call(server.url + "/nothing-here")
    assert status == 404 and document["error"]


def test_off_loopback_every_request_needs_the_token_and_the_page_keeps_it_as_a_cookie(work):
    d, checkpoint, _ = work
    s = Server(checkpoint, "--host", "0.0.0.0", "--token", "sesame", folder=d / "token")  # noqa: S104
    try:
        assert s.token == "sesame"
        for path in ("/", "/health", "/openapi.json"):
            status, _, document = call(s.url + path)
            assert status == 401 and "token" in document["error"]
        assert post(s.url + "/predict", pictures_of(work)[0])[0] == 401
        assert call(s.url + "/health?token=wrong")[0] == 401
        assert call(s.url + "/health", headers={"Authorization": "token sesame"})[0] == 200
        status, headers, _ = call(s.url + "/?token=sesame")
        cookie = headers["set-cookie"].split(";")[0]
        assert status == 200 and "sesame" in cookie
        assert call(s.url + "/health", headers={"Cookie": cookie})[0] == 200
    finally:
        s.stop()


def test_off_loopback_a_token_is_made_and_printed_in_the_address_unless_given(work):
    d, checkpoint, _ = work
    s = Server(checkpoint, "--host", "0.0.0.0", folder=d / "made")  # noqa: S104
    try:
        assert s.token and len(s.token) >= 16
        assert call(s.url + "/health")[0] == 401 and call(s.url + f"/health?token={s.token}")[0] == 200
    finally:
        s.stop()


def test_on_loopback_no_token_is_asked(server):
    assert server.token is None and call(server.url + "/health")[0] == 200


def test_it_prints_its_address_and_the_ssh_tunnel_to_reach_it_from_a_laptop(server):
    port = server.url.rsplit(":", 1)[1]
    printed = server.out.read_text()
    assert f"http://127.0.0.1:{port}/" in printed and f"ssh -L {port}:127.0.0.1:{port} " in printed


class Bound:
    def __init__(self, address):
        self.address = address

    def getsockname(self):
        return self.address


@pytest.mark.parametrize("address, where", [(("10.1.2.3", 8000), "10.1.2.3"), (("::1", 8000, 0, 0), "[::1]"),
                                            (("0.0.0.0", 8000), "127.0.0.1")])  # noqa: S104
def test_the_tunnel_and_curl_lines_reach_the_address_bound_or_loopback_where_every_address_is(address, where):
    import web
    _, tunnel, curl = web.addresses(Bound(address), address[0], None)
    assert f"ssh -L 8000:{where}:8000 " in tunnel and f"http://{where}:8000/predict" in curl


def concurrently(url, files, n):
    """n requests at once, each with one of files; (statuses, documents, seconds) once all are answered."""
    answers = [None] * n

    def one(i):
        answers[i] = post(url + "/predict", files[i % len(files)])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [a[0] for a in answers], [a[2] for a in answers], time.perf_counter() - start


def test_concurrent_requests_share_forward_passes_and_get_the_answers_they_get_alone(work, tmp_path):
    _, checkpoint, _ = work
    pictures, timings, alone = pictures_of(work), {}, {}
    for batch in ("32", "1"):
        s = Server(checkpoint, "--max-batch", batch, env=slowed(tmp_path, 0.3), folder=tmp_path)
        try:
            if not alone:  # each picture in a request of its own, one after another
                alone = {p.name: post(s.url + "/predict", p)[2]["results"][0] for p in pictures}
            statuses, documents, timings[batch] = concurrently(s.url, pictures, 8)
        finally:
            s.stop()
        assert statuses == [200] * 8
        for r in (document["results"][0] for document in documents):
            assert r["class"] == alone[r["path"]]["class"]
            assert r["confidence"] == pytest.approx(alone[r["path"]]["confidence"], abs=1e-6)
    # a pass per request: 8 passes of 0.3 s one after another; shared: two or three passes
    assert timings["1"] >= 2.4 and timings["32"] < 2.0, timings


def test_a_forward_pass_holds_no_more_than_max_batch_pictures(work, tmp_path):
    _, checkpoint, _ = work
    s = Server(checkpoint, "--max-batch", "3", env=slowed(tmp_path, 0.3), folder=tmp_path)
    try:
        statuses, _, _ = concurrently(s.url, pictures_of(work), 8)
        health = call(s.url + "/health")[2]
    finally:
        s.stop()
    assert statuses == [200] * 8 and health["pictures_answered"] == 8
    assert 3 <= health["forward_passes"] < 8  # passes of 3, 3 and 2 at best; some shared all the same


def test_past_the_queue_bound_a_request_gets_503_with_retry_after_and_later_ones_are_answered(work, tmp_path):
    d, checkpoint, _ = work
    picture = pictures_of(work)[0]
    s = Server(checkpoint, "--queue-size", "1", env=slowed(tmp_path, 1.5), folder=tmp_path)
    try:
        first = []
        waiting = threading.Thread(target=lambda: first.append(post(s.url + "/predict", picture)))
        waiting.start()
        time.sleep(0.5)  # the first request is in its forward pass
        status, headers, document = post(s.url + "/predict", picture)
        waiting.join(60)
        assert status == 503 and headers["retry-after"] == "1" and "busy" in document["error"]
        assert first[0][0] == 200
        assert post(s.url + "/predict", picture)[0] == 200
    finally:
        s.stop()


def test_the_port_opens_only_once_the_model_is_loaded(work, tmp_path):
    d, checkpoint, _ = work
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = injected(tmp_path, f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport resnet\n"
                             "load = resnet.load_model\n"
                             "resnet.load_model = lambda *a, **k: (time.sleep(3), load(*a, **k))[1]\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "web.py"), "--checkpoint", str(checkpoint), "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        refused, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, _, health = call(f"http://127.0.0.1:{port}/health")
                break
            except OSError:  # nothing listening yet
                refused += 1
                time.sleep(0.1)
        assert refused > 10 and status == 200 and health["ready"] is True
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("what", ["missing", "foreign", "a folder"])
def test_a_checkpoint_that_cannot_be_used_is_one_line_and_a_non_zero_exit_before_anything_binds(work, tmp_path,
                                                                                                what):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    name = {"missing": "nowhere.pth", "foreign": "notes.pth", "a folder": "."}[what]
    proc = run_here("web.py", "--checkpoint", name, "--port", "0", cwd=tmp_path, check=False)
    assert name in one_line_error(proc) and "serving" not in proc.stdout


def test_a_port_in_use_is_one_line_and_a_non_zero_exit(work, tmp_path):
    _, checkpoint, _ = work
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_here("web.py", "--checkpoint", checkpoint, "--port", port, "--device", "cpu", cwd=tmp_path,
                        check=False)
    line = one_line_error(proc)
    assert str(port) in line and "--port" in line and "serving" not in proc.stdout


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--max-batch", "0"], ["--device", "tpu"], ["--nonsense"],
                                   ["--host", "no.such.host.invalid"], ["--token", "open sesame"],
                                   ["--token", "令牌"]])
def test_a_bad_flag_is_one_line_and_a_non_zero_exit(work, tmp_path, flags):
    _, checkpoint, _ = work
    proc = run_here("web.py", "--checkpoint", checkpoint, *flags, cwd=tmp_path, check=False)
    assert flags[0] in one_line_error(proc) and "serving" not in proc.stdout


def test_without_the_web_stack_installed_it_says_what_to_install_in_one_line(work, tmp_path):
    _, checkpoint, _ = work
    env = injected(tmp_path, "import sys\nsys.modules['fastapi'] = None  # as if not installed\n")
    proc = run("web.py", "--checkpoint", checkpoint, "--port", "0", cwd=tmp_path, env=env, check=False)
    assert "requirements-web.txt" in one_line_error(proc)


def test_make_web_serves_run_dir_s_best_pth_unless_checkpoint_port_and_host_are_given():
    unset = ("MAKEFLAGS", "MAKELEVEL", "RUN_DIR", "MODEL", "DEVICE", "CHECKPOINT", "HOST", "PORT", "ARGS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["VIRTUAL_ENV"] = sys.prefix

    def command(*variables):
        out = subprocess.run(["make", "-n", "web", *variables], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=60).stdout
        return shlex.split(next(ln for ln in out.splitlines() if "web.py" in ln).split("web.py ")[1])

    assert command() == ["--checkpoint", "runs/resnet18/best.pth", "--device", "auto", "--host", "127.0.0.1",
                         "--port", "8000"]
    assert command("RUN_DIR=runs/r50")[:2] == ["--checkpoint", "runs/r50/best.pth"]
    assert command("CHECKPOINT=model/net.pth", "PORT=9000", "HOST=0.0.0.0") == [
        "--checkpoint", "model/net.pth", "--device", "auto", "--host", "0.0.0.0", "--port", "9000"]


def test_the_benchmark_times_each_number_of_clients_with_batching_on_and_off_next_to_a_cold_start(work):
    d, checkpoint, folder = work
    proc = run("bench_web.py", "--checkpoint", checkpoint, "--device", "cpu", "--picture", folder / "0_3.jpg",
               "--requests", "4", "--clients", "1", "2", "--rounds", "1", "--repeats", "1", cwd=d)
    runs = re.findall(r"^bench web batching=(on|off) clients=(\d+) requests=4x1 req_s=[\d.]+ p50_ms=[\d.]+ "
                      r"p99_ms=[\d.]+ pictures_per_pass=[\d.]+$", proc.stdout, re.M)
    assert runs == [("on", "1"), ("off", "1"), ("on", "2"), ("off", "2")]
    assert re.search(r"^bench web summary on_over_off_1=[\d.]+ on_over_off_2=[\d.]+ predict_cold_start_s=[\d.]+ ",
                     proc.stdout, re.M)


def test_the_benchmark_stops_in_one_line_when_a_server_dies_under_load(work, tmp_path):
    d, checkpoint, folder = work
    env = injected(tmp_path, f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport predict\n"
                             "predict.Classifier.probabilities = lambda self, x: os._exit(3)\n")
    proc = run("bench_web.py", "--checkpoint", checkpoint, "--device", "cpu", "--picture", folder / "0_3.jpg",
               "--requests", "4", "--clients", "2", "--rounds", "1", cwd=d, env=env, check=False)
    assert "requests failed" in one_line_error(proc)
