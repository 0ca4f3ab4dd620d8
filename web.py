"""A web page and a JSON API for a trained checkpoint, for a server reached over SSH.

    python web.py                                   # the newest run's best.pth on http://127.0.0.1:8000/
    python web.py --checkpoint runs/resnet50/best.pth --port 8080 --device cuda
    python web.py --host 0.0.0.0                    # every address: a token is then required, and printed
    make web CHECKPOINT=runs/resnet18/best.pth PORT=8000
    curl -F file=@test/0_3.jpg http://127.0.0.1:8000/predict
    curl -F file=@a.jpg -F file=@b.png 'http://127.0.0.1:8000/predict?topk=5'

From a laptop: `ssh -L 8000:127.0.0.1:8000 <server>`, then open http://127.0.0.1:8000/.
The page is web.html beside this file: HTML, CSS and JavaScript in one file, served as it is,
fetching nothing from anywhere but this server. POST /predict answers with the document
`predict.py --json` prints (the same predict.answers), one result per `file` part; GET /health
says the server is ready, with what it serves; /openapi.json describes both.

The model is loaded once, before the port opens. Requests that arrive together share a forward
pass: while other requests are still being read, a pass waits up to --batch-wait-ms for their
pictures, up to --max-batch of them (--max-batch 1: a pass per request). Past --queue-size
requests in the server, the next is answered 503 with Retry-After. Bad input gets a 4xx and
{"error": "<one line>"}; the server goes on answering.
"""
import argparse
import asyncio
import concurrent.futures
import errno
import io
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402

import cli  # noqa: E402
import device  # noqa: E402
import predict  # noqa: E402
import resnet  # noqa: E402

PAGE = Path(__file__).with_name("web.html")
COOKIE = "cifar_resnet_token"
# What the page may load: only this server's own page, script and styles (blob: shows the chosen pictures).
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
          "connect-src 'self'; form-action 'none'; base-uri 'none'")

# /predict in /openapi.json: it reads its form itself (read_uploads), to answer every fault in one line.
UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
    "parameters": [{"name": "topk", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 1}}]}


def get_args_parser():
    p = cli.parser("A web page and a JSON API for a trained checkpoint.")
    cli.checkpoint_flags(p, resnet.MODELS, default=None)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (any but loopback asks for a token)")
    p.add_argument("--port", type=cli.integer(min=0, max=65535), default=8000, help="the port (0: any free one)")
    p.add_argument("--token", type=token_flag, default=None,
                   help="the token a request must carry off loopback (default: a new one, printed in the address)")
    p.add_argument("--device", default="auto", choices=device.DEVICES, help="where the model runs")
    p.add_argument("--max-batch", type=cli.integer(min=1), default=32,
                   help="pictures per forward pass, gathered from requests that arrive together (1: no batching)")
    p.add_argument("--batch-wait-ms", type=cli.real(min=0, max=1000), default=5,
                   help="how long a pass waits for the pictures of requests still being read")
    p.add_argument("--queue-size", type=cli.integer(min=1), default=64,
                   help="requests in the server at once; past it: 503 with Retry-After")
    p.add_argument("--max-files", type=cli.integer(min=1), default=16, help="pictures in one request")
    p.add_argument("--max-body-mb", type=cli.real(above=0), default=10, help="the largest request body, in MB")
    return p


def token_flag(text):
    """--token: characters that pass unchanged through an address and a cookie, as a made one's do."""
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits and . _ ~ - only (it goes in the address)")
    return text


def precision_of(clf):
    return str(next(clf.model.parameters()).dtype).removeprefix("torch.")  # float32: for_inference keeps fp32


class Refused(Exception):
    """A request answered with this status and one line saying why."""

    def __init__(self, status, message, headers=None, document=None):
        super().__init__(message)
        self.status, self.headers, self.document = status, headers, document or {}


class StartError(cli.UserError):
    """The server cannot start (the port, the address, the page); one line for the user."""


class Batcher:
    """Pictures of concurrent requests, answered in shared forward passes on one thread: the
    model exists once, and one pass at a time uses it."""

    def __init__(self, clf, max_batch, wait_s, arriving=lambda: 0):
        self.clf, self.max_batch, self.wait_s = clf, max_batch, wait_s
        self.arriving = arriving  # how many requests are being read or decoded, bound for the queue
        self.queue = asyncio.Queue()  # bounded by the requests let in (App.predict), not here
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, "model")
        self.passes = self.pictures = 0  # in /health: how full the passes run (bench_web.py prints it)

    async def probabilities(self, pictures):
        """Softmax rows for these pictures, computed in a pass shared with other requests."""
        answer = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((pictures, answer))
        return await answer

    async def gather(self):
        """The requests of the next pass: the first to come, then those on their way, for up to wait_s.
        With none on its way the pass starts at once: a lone client never waits."""
        loop = asyncio.get_running_loop()
        jobs = [await self.queue.get()]
        size, deadline = len(jobs[0][0]), loop.time() + self.wait_s
        while size < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if deadline <= loop.time() or not self.arriving():
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            size += len(job[0])
        return jobs

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self.gather()
            try:
                batch = torch.stack([p for pictures, _ in jobs for p in pictures])
                self.passes, self.pictures = self.passes + 1, self.pictures + len(batch)
                probs = await loop.run_in_executor(self.model_thread, self.clf.probabilities, batch)
            except Exception as e:  # out of memory on the device, say: these requests fail, the server goes on
                for _, answer in jobs:
                    if not answer.done():
                        answer.set_exception(e)
                continue
            start = 0
            for pictures, answer in jobs:
                if not answer.done():  # its client went away meanwhile
                    answer.set_result(probs[start:start + len(pictures)])
                start += len(pictures)


def decode(uploads, size):
    """(name, picture or PictureError) for each (name, bytes) upload, as predict.py reads a file."""
    named = []
    for name, content in uploads:
        stream = io.BytesIO(content)
        stream.name = name  # what an error line names
        named.append((name, predict.read_picture(stream, size)))
    return named


async def read_body(request, limit):
    """The request's body, or 413 past limit bytes. The rest of a body too large is read and dropped
    (up to 10 times the limit), so that the client, still sending, gets the answer."""
    from starlette.requests import ClientDisconnect
    too_large = Refused(413, f"the request is over the {limit / 1e6:g} MB limit (--max-body-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 10 * limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > 10 * limit:
                break
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, "the request ended before its body did") from None
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def read_uploads(request, max_bytes, max_files):
    """(name, bytes) of each `file` part of a multipart request, or Refused saying what is wrong."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request
    how = "send pictures as multipart/form-data parts named file: curl -F file=@picture.jpg"
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Refused(415, f"not a form upload; {how}")
    body = await read_body(request, max_bytes)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    async with Request(request.scope, replay).form(max_files=max_files, max_fields=max_files) as form:
        parts = form.getlist("file")
        if not parts:
            names = ", ".join(sorted(set(form.keys()))) or "none"
            raise Refused(400, f"no part named file (parts: {names}); {how}")
        if not all(isinstance(p, UploadFile) for p in parts):
            raise Refused(400, f"a file part holds text, not a file (curl's @ missing?); {how}")
        return [(p.filename or f"file {i + 1}", await p.read()) for i, p in enumerate(parts)]


def topk_of(request):
    text = request.query_params.get("topk", "1")
    try:  # isdigit alone admits "²", which int refuses, as it does past 4300 digits
        k = int(text) if text.isascii() and text.isdigit() else 0
    except ValueError:
        k = 0
    if k < 1:
        raise Refused(400, f"topk={text}: the number of classes to answer with, a whole number from 1")
    return k


class App:
    """The state a request needs: the classifier, the batcher, the limits and the token."""

    def __init__(self, clf, checkpoint, args, token):
        self.clf, self.checkpoint, self.args, self.token = clf, str(checkpoint), args, token
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, "decode")  # pictures.open_picture sets a global
        self.batcher = None  # made inside the server's event loop
        self.in_server = self.arriving = 0  # requests in the server; of them, those not yet queued for a pass
        self.page = PAGE.read_text(encoding="utf-8")

    def allowed(self, request):
        """Whether the request carries the token: in its address, the page's cookie, or an Authorization header."""
        if self.token is None:
            return True
        given = (request.query_params.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").partition(" ")[2])
        return secrets.compare_digest(given.encode(), self.token.encode())

    def health(self):
        ckpt = self.clf.ckpt
        return {"ready": True, "device": str(self.clf.device), "checkpoint": self.checkpoint, "network": ckpt["arch"],
                "dataset": ckpt.get("dataset"), "classes": self.clf.classes, "accuracy": ckpt.get("accuracy"),
                "epoch": ckpt.get("epoch"), "precision": precision_of(self.clf),
                "max_files": self.args.max_files, "max_body_mb": self.args.max_body_mb,
                "forward_passes": self.batcher.passes, "pictures_answered": self.batcher.pictures}

    async def predict(self, request):
        """POST /predict: predict.py's --json document for the uploaded pictures."""
        if self.in_server >= self.args.queue_size:
            raise Refused(503, f"busy: {self.in_server} requests in the server (--queue-size); try again",
                          {"Retry-After": "1"})
        self.in_server += 1
        try:
            topk, named = await self.read(request)
            pictures = [p for _, p in named if isinstance(p, torch.Tensor)]
            probs = await self.probabilities(pictures) if pictures else None
        finally:
            self.in_server -= 1
        results = predict.answers(self.clf, named, topk, probs)
        document = {"checkpoint": self.checkpoint, "results": results}
        failed = [r["error"] for r in results if "error" in r]
        if failed:  # the others are answered all the same, as predict.py answers them
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise Refused(422, failed[0] + more, document=document)
        return document

    async def read(self, request):
        """topk and the (name, picture or PictureError) pairs of a request; meanwhile it counts as arriving."""
        self.arriving += 1
        try:
            topk = topk_of(request)
            uploads = await read_uploads(request, int(self.args.max_body_mb * 1e6), self.args.max_files)
            named = await asyncio.get_running_loop().run_in_executor(self.decoder, decode, uploads,
                                                                     self.clf.image_size)
            return topk, named
        finally:
            self.arriving -= 1

    async def probabilities(self, pictures):
        try:
            return await self.batcher.probabilities(pictures)
        except RuntimeError as e:
            oom = device.out_of_memory(e)
            if oom is None:
                raise
            raise Refused(503, f"out of memory on the device: {oom}; send fewer pictures at once",
                          {"Retry-After": "1"}) from None


def build_app(state):
    """The FastAPI application: the page, /predict, /health; every error as {"error": "<one line>"}."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    class JSON(JSONResponse):
        def render(self, content):  # a file name that is not UTF-8 keeps its surrogates as \\udcXX escapes
            return json.dumps(content, ensure_ascii=False).encode("utf-8", "backslashreplace")

    def error(status, message, headers=None, document=None):
        return JSON({"error": " ".join(str(message).split()), **(document or {})}, status, headers)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher = Batcher(state.clf, state.args.max_batch, state.args.batch_wait_ms / 1000,
                                lambda: state.arriving)
        task = asyncio.create_task(state.batcher.run())
        yield
        task.cancel()

    # /docs and /redoc would load Swagger UI and ReDoc from a CDN; the schema stays at /openapi.json.
    app = FastAPI(title="CIFAR ResNet classifier", docs_url=None, redoc_url=None, lifespan=lifespan,
                  default_response_class=JSON)
    app.add_exception_handler(Refused, lambda request, e: error(e.status, e, e.headers, e.document))
    app.add_exception_handler(HTTPException, lambda request, e: error(e.status_code, e.detail, e.headers))
    # A fault of the server's own (a bug): still one line of JSON; uvicorn prints the traceback.
    app.add_exception_handler(Exception, lambda request, e: error(500, f"internal error: {type(e).__name__}: {e}"))

    @app.middleware("http")
    async def token_required(request: Request, call_next):
        if not state.allowed(request):
            return error(401, "a token is needed: open the address web.py printed (…/?token=…), or send "
                              "the header `Authorization: token <token>`")
        response = await call_next(request)
        if state.token and request.query_params.get("token"):  # the page keeps it: its requests need not carry it
            response.set_cookie(COOKIE, state.token, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(state.page, headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})

    @app.get("/health", summary="Ready, with the device, the checkpoint and what it holds")
    async def health():
        return state.health()

    @app.post("/predict", summary="Classify pictures: predict.py --json's document", openapi_extra=UPLOAD)
    async def predict_pictures(request: Request):
        return await state.predict(request)

    return app


def listening_socket(host, port):
    """A socket bound to host:port and listening, or StartError in one line (the port taken, say)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise StartError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop is not refused
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = ": another server is listening there; choose another with --port" if e.errno == errno.EADDRINUSE else ""
        raise StartError(f"cannot listen on {host}:{port} ({e.strerror}){hint}") from None
    return sock


def on_loopback(sock):
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def addresses(sock, host, token):
    """What to print: the address to open, and how to reach it from a laptop."""
    bound, port = sock.getsockname()[:2]
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    # on the server, the tunnel and curl reach the address bound: loopback only where every address is
    here = "127.0.0.1" if ipaddress.ip_address(bound).is_unspecified else bound
    shown, here = (f"[{h}]" if ":" in h else h for h in (shown, here))
    query = f"?token={token}" if token else ""
    return [f"serving on http://{shown}:{port}/{query}",
            f"from a laptop: ssh -L {port}:{here}:{port} <this server>, then open http://127.0.0.1:{port}/{query}",
            f"the API: curl -F file=@test/0_3.jpg 'http://{here}:{port}/predict{query}'"]


def main(args):
    try:  # the web stack is optional: requirements-web.txt
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (what FastAPI reads forms with)
        import uvicorn
    except ImportError as e:
        raise StartError(f"{e.name.replace('_', '-')} is not installed: pip install -r requirements-web.txt "
                         "(`make web` does it)") from None
    if not PAGE.is_file():
        raise StartError(f"{PAGE}: the page is missing; it comes with web.py")
    checkpoint = predict.chosen_checkpoint(args.checkpoint)
    clf = predict.Classifier(checkpoint, args.model, device.pick_device(args.device))
    if clf.assumed:
        print(f"note: {clf.assumed}", file=sys.stderr)
    sock = listening_socket(args.host, args.port)  # after the model: the port opens once it can answer
    token = None if on_loopback(sock) else args.token or secrets.token_urlsafe(18)
    state = App(clf, checkpoint, args, token)
    ckpt = clf.ckpt
    accuracy = f", {ckpt['accuracy']:.2f}% test accuracy" if ckpt.get("accuracy") is not None else ""
    print(f"web: {checkpoint} ({ckpt['arch']}, {len(clf.classes)} classes{accuracy}) on {clf.device}, "
          f"{precision_of(clf)}")
    for line in addresses(sock, args.host, token):
        print(f"web: {line}", flush=True)
    config = uvicorn.Config(build_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
