"""How fast web.py answers over loopback, with its batching on and off, next to predict.py's cold start.

    python bench_web.py --checkpoint runs/resnet18/best.pth --device cpu
    python bench_web.py --checkpoint runs/resnet18/best.pth --requests 512 --clients 1 8 32 64
    make bench-web CHECKPOINT=runs/resnet18/best.pth DEVICE=cpu

Two web.py servers run on free loopback ports, batching on (web.py's defaults) and off (--max-batch 1,
a forward pass per request). For each number of clients, that many threads, each with its own
keep-alive connection, send --requests requests in all (one picture each, as `curl -F file=@PICTURE`
sends it), to one server then the other, --rounds times, after untimed ones. A line per setting and
number of clients: requests per second (the median round), the median and 99th-percentile latency
(all rounds), and the pictures per forward pass as the server counted them. The
clients run on the same machine as the server and take their share of its cores. Then bench.py's
--cold-start: `python predict.py PICTURE` from a fresh process, the time a script pays per picture
without a server. The last line is one machine-readable summary.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import cli  # noqa: E402
import device  # noqa: E402
import pictures  # noqa: E402
import predict  # noqa: E402

ROOT = Path(__file__).resolve().parent
SETTINGS = {"on": [], "off": ["--max-batch", "1"]}


def get_args_parser():
    p = cli.parser("Time web.py's API with concurrent clients, batching on and off.")
    p.add_argument("--checkpoint", default=None, help="the .pth to serve (default: best.pth of the newest run)")
    p.add_argument("--device", default="auto", choices=device.DEVICES, help="where web.py runs the model")
    p.add_argument("--picture", default="test/0_3.jpg", help="the picture every request sends")
    p.add_argument("--requests", type=cli.integer(min=1), default=256, help="timed requests per run")
    p.add_argument("--clients", type=cli.integer(min=1), nargs="+", default=[1, 8, 32],
                   help="concurrent clients, a run each")
    p.add_argument("--rounds", type=cli.integer(min=1), default=3,
                   help="timed loads per setting and number of clients, the settings taking turns (median)")
    p.add_argument("--repeats", type=cli.integer(min=1), default=3,
                   help="predict.py cold starts (times 2, alternating with the tutorials' flow, as bench.py does)")
    return p


def start_server(checkpoint, dev, flags, folder):
    """web.py in its own process; its port, once it says it serves."""
    out = Path(folder) / "web.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "web.py"), "--checkpoint", str(checkpoint), "--port", "0",
                                 "--device", dev, *flags], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "serving on" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            said = (out.read_text().strip().splitlines() or ["no output"])[-1]
            raise cli.UserError(f"web.py did not start: {said.removeprefix('error: ')}")
        time.sleep(0.05)
    line = next(ln for ln in out.read_text().splitlines() if "serving on" in ln)
    return proc, int(line.split("serving on ")[1].split("/")[2].rsplit(":", 1)[1])


def multipart(name, content):
    boundary = "bench-web-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def load(port, body, headers, clients, requests):
    """(seconds in all, the latency of each request): clients threads sending requests between them."""
    left, lock, latencies, failures = [requests], threading.Lock(), [], []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:  # the server gone (it died, say): this client stops
                failures.append(type(e).__name__)
                break
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                failures.append(f"HTTP {response.status}")
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise cli.UserError(f"{len(failures)} requests failed ({', '.join(sorted(set(failures)))})")
    return time.perf_counter() - start, latencies


def counts(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    return health["forward_passes"], health["pictures_answered"]


def measure(port, body, headers, clients, requests):
    """(requests per second, latencies in ms, pictures per forward pass) of one timed load."""
    before = counts(port)
    seconds, latencies = load(port, body, headers, clients, requests)
    passes, pictures = (a - b for a, b in zip(counts(port), before))
    return requests / seconds, [1000 * t for t in latencies], pictures / max(passes, 1)


def run(checkpoint, dev, picture, clients, requests, rounds):
    """A line per setting and number of clients; {(setting, clients): requests per second}. Both servers
    run throughout and take turns, round after round, so that the machine's drift falls on both."""
    body, headers = multipart(Path(picture).name, Path(picture).read_bytes())
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        servers = {}
        try:
            for setting, flags in SETTINGS.items():
                (Path(folder) / setting).mkdir()
                servers[setting] = start_server(checkpoint, dev, flags, Path(folder) / setting)
                load(servers[setting][1], body, headers, max(clients), 2 * max(clients))  # warm-up: each size once
            for n in clients:
                got = {setting: [] for setting in servers}
                for _ in range(rounds):
                    for setting, (_, port) in servers.items():
                        got[setting].append(measure(port, body, headers, n, requests))
                for setting, results in got.items():
                    rates[setting, n] = statistics.median(r[0] for r in results)
                    ms = sorted(t for r in results for t in r[1])
                    print(f"bench web batching={setting} clients={n} requests={requests}x{rounds} "
                          f"req_s={rates[setting, n]:.1f} p50_ms={statistics.median(ms):.1f} "
                          f"p99_ms={ms[min(len(ms) - 1, int(0.99 * len(ms)))]:.1f} "
                          f"pictures_per_pass={statistics.median(r[2] for r in results):.2f}", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    return rates


def main(args):
    import bench  # its cold start: predict.py from a fresh process, next to the tutorials' flow
    checkpoint = predict.chosen_checkpoint(args.checkpoint)
    if not Path(args.picture).is_file():
        raise pictures.DataError(f"{args.picture}: no such picture (python data.py writes test/0_3.jpg)")
    rates = run(checkpoint, args.device, args.picture, args.clients, args.requests, args.rounds)
    cold = bench.cold_start(args.picture, args.repeats)
    predict_s = float(cold.split("predict_s=")[1].split()[0])
    gains = " ".join(f"on_over_off_{n}={rates['on', n] / rates['off', n]:.2f}" for n in args.clients)
    alone = f" server_one_client_ms={1000 / rates['on', 1]:.1f}" if 1 in args.clients else ""  # --clients 8 32: none
    print(f"bench web summary {gains} predict_cold_start_s={predict_s:.2f}{alone}")
    return 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
