"""web.py's page in a real browser: Debian's chromium driven by Playwright, against the real server.
Every request the page makes is routed: one to another host than the server is stopped, and fails
the test. A browser that cannot start fails the tests too; it does not skip them.

    python tests/test_web_page.py --checkpoint runs/resnet18/best.pth test/0_3.jpg test/1_8.jpg ...
writes docs/web-en.png and docs/web-zh.png from that browser: the README's pictures."""
import base64
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Error, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: conftest and web_server beside it

from conftest import ROOT  # noqa: E402  (it puts the project's scripts on the path)
import predict  # noqa: E402
from gui import CHINESE  # noqa: E402
from web_server import Server  # noqa: E402

pytestmark = pytest.mark.slow  # each test starts web.py and a browser

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `playwright install` cannot download a browser here
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]



@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Guarded:
    """A page whose every request is routed: to the server it goes on, elsewhere it is stopped and noted."""

    def __init__(self, browser, server, **context):
        self.origin = urlparse(server.url).netloc
        self.context = browser.new_context(**context)
        self.requests, self.outside = [], []
        self.context.route("**/*", self.route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))

    def route(self, route):
        if urlparse(route.request.url).netloc == self.origin:
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def close(self):
        self.context.close()
        assert self.outside == [], f"the page asked for {self.outside}"
        elsewhere = [u for u in self.requests if urlparse(u.removeprefix("blob:")).netloc != self.origin]
        assert elsewhere == [], f"the page asked for {elsewhere}"


@pytest.fixture
def guarded(browser, server):
    opened = []

    def open_page(path="/", url=None, **context):
        g = Guarded(browser, server, locale=context.pop("locale", "en-US"), **context)
        g.page.goto((url or server.url) + path)
        g.page.wait_for_selector("#served:not(:empty)")
        opened.append(g)
        return g.page

    yield open_page
    for g in opened:
        g.close()


def expected(work, picture):
    """What predict.py answers for the picture, with the top five."""
    _, checkpoint, _ = work
    clf = predict.Classifier(checkpoint)
    return predict.answers(clf, [(picture.name, predict.read_picture(picture, clf.image_size))], 5)[0]


def answered(page, n=1):
    """The cards, once n of them hold an answer or an error (the page's policy allows no eval: no wait_for_function)."""
    page.locator(".card .answer, .card .error").nth(n - 1).wait_for()
    return page.locator(".card")


def test_a_chosen_picture_shows_its_class_its_confidence_and_the_top_five_as_bars(guarded, work):
    _, _, pictures = work
    page = guarded()
    page.set_input_files("#files", pictures / "0_3.jpg")
    card = answered(page).first
    want = expected(work, pictures / "0_3.jpg")
    assert card.locator(".answer").inner_text() == f"{want['class']} confidence {100 * want['confidence']:.1f}%"
    bars = card.locator(".bar")
    assert bars.count() == 5
    assert [bars.nth(i).inner_text().split("\n")[0] for i in range(5)] == [t["class"] for t in want["top"]]


def test_switching_to_chinese_shows_the_chinese_class_name(guarded, work):
    _, _, pictures = work
    page = guarded()
    page.set_input_files("#files", pictures / "0_3.jpg")
    card = answered(page).first
    want = expected(work, pictures / "0_3.jpg")
    page.click("text=中文")
    assert card.locator(".answer").inner_text() == f"{CHINESE[want['class']]} 置信度 {100 * want['confidence']:.1f}%"
    assert page.title() == "CIFAR-10 十分类"
    page.click("text=English")
    assert card.locator(".answer").inner_text().startswith(want["class"])


def test_the_page_names_the_classes_in_chinese_as_the_window_does(guarded):
    assert guarded().evaluate("CHINESE") == CHINESE


def test_a_browser_set_to_chinese_opens_the_page_in_chinese(guarded):
    page = guarded(locale="zh-CN")
    assert page.title() == "CIFAR-10 十分类" and "选择图片" in page.inner_text("#drop")


def test_a_file_that_is_not_a_picture_shows_the_servers_error_line(guarded, work):
    _, _, pictures = work
    page = guarded()
    page.set_input_files("#files", pictures / "notes.txt")
    error = answered(page).first.locator(".error").inner_text()
    assert "notes.txt: cannot read picture" in error


def test_an_error_line_is_shown_as_it_is_dollar_signs_and_all(guarded):
    page = guarded()
    page.set_input_files("#files", {"name": "$&$'.txt", "mimeType": "text/plain", "buffer": b"not a picture"})
    assert "$&$'.txt: cannot read picture" in answered(page).first.locator(".error").inner_text()


def test_a_request_the_server_refuses_shows_its_line(guarded):
    page = guarded()
    page.set_input_files("#files", {"name": "big.jpg", "mimeType": "image/jpeg", "buffer": b"\xff" * 11_000_000})
    answered(page)
    assert "10 MB limit" in page.inner_text("#message")


def test_several_pictures_get_a_card_each(guarded, work):
    _, _, pictures = work
    page = guarded()
    files = sorted(p for p in pictures.iterdir() if p.suffix != ".txt")
    page.set_input_files("#files", files)
    cards = answered(page, len(files))
    names = [cards.nth(i).locator(".name").inner_text() for i in range(cards.count())]
    assert sorted(names) == sorted(p.name for p in files)
    assert page.locator(".card .answer").count() == len(files)


def give(page, picture, how):
    """Drop the picture on the page, or paste it, as a browser hands a file over."""
    page.evaluate("""([name, data, how]) => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], name, {type: "image/png"}));
        const event = how === "drop"
            ? new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true})
            : new ClipboardEvent("paste", {clipboardData: files, bubbles: true, cancelable: true});
        (how === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
    }""", [picture.name, base64.b64encode(picture.read_bytes()).decode(), how])


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_dropped_or_pasted_picture_is_classified(guarded, work, how):
    _, _, pictures = work
    page = guarded()
    give(page, pictures / "1.png", how)
    want = expected(work, pictures / "1.png")
    assert answered(page).first.locator(".answer").inner_text().startswith(want["class"])


def test_a_line_names_the_network_dataset_classes_test_accuracy_device_and_precision(guarded):
    page = guarded()
    assert page.inner_text("#served") == ("resnet18 · cifar10 · 10 classes · 42.50% test accuracy · epoch 2 · cpu · "
                                          "float32")


def test_at_a_phone_s_width_nothing_is_wider_than_the_screen(guarded, work):
    _, _, pictures = work
    page = guarded(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    page.set_input_files("#files", pictures / "0_3.jpg")
    answered(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    box = page.locator(".card").first.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 360


def test_the_page_keeps_the_token_of_its_address_for_its_requests(browser, work):
    d, checkpoint, pictures = work
    s = Server(checkpoint, "--host", "0.0.0.0", "--token", "sesame", folder=d / "token")  # noqa: S104
    try:
        g = Guarded(browser, s, locale="en-US")
        g.page.goto(s.url + "/?token=sesame")
        g.page.wait_for_selector("#served:not(:empty)")
        assert "token" not in g.page.url  # out of the address bar, kept as the server's cookie
        g.page.set_input_files("#files", pictures / "0_3.jpg")
        assert answered(g.page).first.locator(".answer").count() == 1
        g.close()
    finally:
        s.stop()


def test_a_request_to_another_host_is_stopped_and_noted(browser, server):
    g = Guarded(browser, server)
    with pytest.raises(Error):
        g.page.goto("http://example.com/")
    assert g.outside == ["http://example.com/"]
    g.outside.clear()
    g.requests.clear()
    g.close()


def screenshots(checkpoint, pictures, out=ROOT / "docs"):
    """docs/web-en.png and docs/web-zh.png: the page with these pictures answered, in each language."""
    import tempfile
    with tempfile.TemporaryDirectory() as d, sync_playwright() as p:
        server = Server(Path(checkpoint).resolve(), folder=d)
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            g = Guarded(b, server, locale="en-US", viewport={"width": 900, "height": 640})
            g.page.goto(server.url + "/")
            g.page.wait_for_selector("#served:not(:empty)")
            g.page.set_input_files("#files", [Path(p).resolve() for p in pictures])
            answered(g.page, len(pictures))
            g.page.screenshot(path=str(out / "web-en.png"), full_page=True)
            g.page.click("text=中文")
            g.page.screenshot(path=str(out / "web-zh.png"), full_page=True)
            g.close()
        finally:
            b.close()
            server.stop()


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Write docs/web-en.png and docs/web-zh.png.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("pictures", nargs="+")
    args = parser.parse_args()
    screenshots(args.checkpoint, args.pictures)
