"""`spinal-transfer serve` as a user runs it: the real server in a subprocess on a free port, spoken to over
real HTTP. Its answers are checked against `predict` on the same files; bad uploads against their 4xx (a bad file
among good ones against its own entry) and the batch they shared; /metrics against the requests sent; SIGTERM
against a burst of requests in flight; the page in headless Chromium; the README's curl line and the deployment
examples against the CLI.

The model is the `finished_run` fixture (timm test_resnet + spinal head on digits 0-2 at 32 px) exported with
its ONNX file. The batching server runs batches of exactly 3 (`--max-batch 3` and a minute's wait), so which
requests share a batch is decided by the test, not by timing."""
from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from conftest import bomb_png, chromium_or_skip
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from spinal_transfer.data.splits import list_images  # noqa: E402
from spinal_transfer.deploy.predict import predict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOPK = 3
UPLOAD_MB = 0.05                # the batching server's --max-upload-mb: 52 kB, far above a 32-px PNG


# --- the server, as a subprocess ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m spinal_transfer serve MODEL --port P FLAGS...`, its output in a log file; `sent` counts the
    /predict requests this test module made to it."""

    def __init__(self, model: Path, log: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spinal_transfer", "serve", str(model),
                                          "--port", str(self.port), *flags],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        self.sent: Counter = Counter()
        self._lock = threading.Lock()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"serve was not ready within {timeout:.0f} s:\n{self.output()}")

    def post(self, **request) -> httpx.Response:
        """POST /predict (httpx arguments), counted in `sent` by the status it got."""
        response = httpx.post(self.url + "/predict", timeout=120, **request)
        with self._lock:
            self.sent[response.status_code] += 1
        return response

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SERVERS = {
    # the ONNX runner in batches of exactly 3 images: a batch waits up to a minute for its third
    "batching": ("--runner", "onnx", "--max-batch", "3", "--max-wait-ms", "60000", "--max-upload-mb", str(UPLOAD_MB),
                 "--topk", str(TOPK)),
    # the command line's defaults (but the port), with the PyTorch runner
    "plain": ("--runner", "torch"),
    # for the SIGTERM test (which stops it): batches of up to 64 that wait 300 ms, so requests are in flight
    "drain": ("--runner", "onnx", "--max-batch", "64", "--max-wait-ms", "300"),
}


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory) -> Path:
    from spinal_transfer.cli import main

    out = tmp_path_factory.mktemp("serve_http") / "bundle"
    assert main(["export", str(finished_run), "--out", str(out), "--format", "onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def servers(bundle, tmp_path_factory) -> dict[str, Server]:
    """The SERVERS, started together (their start-up is mostly imports: it overlaps)."""
    logs = tmp_path_factory.mktemp("logs")
    started = {name: Server(bundle, logs / f"{name}.log", *flags) for name, flags in SERVERS.items()}
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def batching(servers) -> Server:
    return servers["batching"]


@pytest.fixture(scope="module")
def plain(servers) -> Server:
    return servers["plain"]


@pytest.fixture(scope="module")
def images(three_digits) -> list[Path]:
    return [Path(p) for p in list_images([three_digits / "test"])[::12]]        # 9 images, all three classes


def expected(bundle: Path, files: list[Path], runner: str, k: int = TOPK) -> list[list[tuple[str, float]]]:
    """What `predict` says about the same files with the same runner."""
    return predict(bundle, files, workers=0, device="cpu", runner=runner).top(k)


def answered(response: httpx.Response) -> list[list[tuple[str, float]]]:
    assert response.status_code == 200, response.text
    return [[(t["label"], t["probability"]) for t in p["top"]] for p in response.json()["predictions"]]


def assert_same(ours, theirs, tol: float = 1e-5) -> None:
    assert [[c for c, _ in row] for row in ours] == [[c for c, _ in row] for row in theirs]
    for a, b in zip(ours, theirs):
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=tol)


def raw(body: bytes, content_type: str) -> dict:
    """httpx arguments of a request whose body is `body`."""
    return {"content": body, "headers": {"Content-Type": content_type}}


def png(path: Path) -> dict:
    return raw(path.read_bytes(), "image/png")


def samples(server: Server) -> dict[tuple[str, tuple], float]:
    """GET /metrics through Prometheus' own text parser: {(sample name, sorted labels): value}."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def concurrently(*calls):
    """Run the calls at once, each in its own thread; their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def sliver_png() -> bytes:
    """A real 1x3000 PNG: an aspect ratio no model input can be resized from."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (1, 3000)).save(out, "PNG")
    return out.getvalue()


def errors_by_reason(server: Server) -> dict[str, float]:
    return {dict(labels)["reason"]: v for (name, labels), v in samples(server).items()
            if name == "spinal_serve_errors_total"}


# --- answers --------------------------------------------------------------------------------------

def test_predictions_equal_predicts(batching, bundle, images):
    want = expected(bundle, images, "onnx")
    # one multipart request of 6 files (two batches of 3) ...
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images[:6]]
    response = batching.post(files=files)
    assert response.json()["runner"] == "onnx"
    assert [p["name"] for p in response.json()["predictions"]] == [p.name for p in images[:6]]
    assert_same(answered(response), want[:6])
    # ... and three raw-body requests at once (one batch of 3)
    raw = concurrently(*[lambda p=p: batching.post(**png(p)) for p in images[6:9]])
    assert_same([answered(r)[0] for r in raw], want[6:9])
    # a body is read by what it holds: an image labelled text/plain, form-urlencoded (curl --data-binary) or not at all
    labels = ("text/plain", "application/x-www-form-urlencoded", None)
    mislabelled = concurrently(*[lambda p=p, t=t: batching.post(content=p.read_bytes(), headers={"Content-Type": t}
                                                                if t else {})
                                 for p, t in zip(images[6:9], labels)])
    assert_same([answered(r)[0] for r in mislabelled], want[6:9])
    top1 = batching.post(files=files[:3], params={"topk": 1})           # ?topk= per request
    assert_same(answered(top1), [row[:1] for row in want[:3]])
    # what the server decodes, Predictor decodes the same way from the bytes of the files
    from spinal_transfer.deploy.predictor import Predictor

    assert_same(Predictor(bundle, device="cpu", runner="onnx").predict([p.read_bytes() for p in images], TOPK), want)


def test_bad_uploads_get_4xx_while_their_batch_succeeds(batching, bundle, images):
    before = samples(batching)
    goods = [lambda p=p: batching.post(**png(p)) for p in images[:3]]
    bads = {
        422: lambda: batching.post(**raw(b"this is not an image", "image/png")),
        413: lambda: batching.post(**raw(os.urandom(int(2 * UPLOAD_MB * 2**20)), "image/jpeg")),
        415: lambda: batching.post(**raw(b"{}", "application/json")),
        400: lambda: batching.post(**raw(b"--x\r\nnot a form", "multipart/form-data; boundary=y")),
    }
    bomb = lambda: batching.post(**raw(bomb_png(), "image/png"))  # noqa: E731
    sliver = lambda: batching.post(**raw(sliver_png(), "image/png"))  # noqa: E731
    *good, r422, r413, r415, r400, r_bomb, r_sliver = concurrently(*goods, *bads.values(), bomb, sliver)
    assert_same([answered(r)[0] for r in good], expected(bundle, images[:3], "onnx"))
    for status, r in zip(bads, (r422, r413, r415, r400)):
        assert r.status_code == status and r.json()["error"], (status, r.text)
    assert r_bomb.status_code == 422 and "decompression-bomb" in r_bomb.json()["error"]
    assert r_sliver.status_code == 422 and "1x3000 px, an aspect ratio beyond" in r_sliver.json()["error"]
    after = samples(batching)
    # the three good images ran as one batch (it runs only once 3 are queued); no bad one reached the model
    assert after[("spinal_serve_batch_size_count", ())] - before[("spinal_serve_batch_size_count", ())] == 1
    assert after[("spinal_serve_batch_size_sum", ())] - before[("spinal_serve_batch_size_sum", ())] == 3
    reasons = {"not_an_image": 1, "decompression_bomb": 1, "extreme_aspect_ratio": 1, "too_large": 1,
               "unsupported_media_type": 1, "bad_request": 1}
    for reason, n in reasons.items():
        key = ("spinal_serve_errors_total", (("reason", reason),))
        assert after[key] - before.get(key, 0) == n, reason
    assert httpx.get(batching.url + "/healthz").status_code == 200          # and the server goes on


def test_too_many_files_is_a_limit_and_an_empty_body_says_so(plain, images):
    """QA 28: a multipart request of 90 images was answered 400 "malformed multipart form: Too many files", and an
    empty POST 415 "no content type whose body is not an image". The one is serve's limit (413, naming it), the
    other an empty body (400, saying so)."""
    from spinal_transfer.deploy.serve import MAX_FILES

    data = images[0].read_bytes()
    many = plain.post(files=[("file", (f"{i}.png", data, "image/png")) for i in range(MAX_FILES + 1)])
    assert many.status_code == 413 and many.json()["error"].startswith(f"at most {MAX_FILES} images per request")
    exactly = plain.post(files=[("file", (f"{i}.png", data, "image/png")) for i in range(MAX_FILES)])
    assert exactly.status_code == 200 and len(exactly.json()["predictions"]) == MAX_FILES
    empty = plain.post(content=b"")
    assert empty.status_code == 400 and empty.json()["error"].startswith("the request body is empty")


def test_a_bad_file_among_good_ones_gets_its_own_entry(batching, bundle, images):
    """As `predict` skips a bad file and predicts the rest: each bad file of a multipart request is an entry
    naming it and saying why, in its place; the good files are predicted (one batch of 3) and the answer is 200."""
    before = samples(batching)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images[:3]]
    bad = {"notes.txt": b"this is not an image", "bomb.png": bomb_png(), "sliver.png": sliver_png()}
    mixed = [files[0], *[("file", (name, data, "image/png")) for name, data in bad.items()], *files[1:]]
    response = batching.post(files=mixed)
    assert response.status_code == 200, response.text
    entries = response.json()["predictions"]
    assert [e["name"] for e in entries] == [images[0].name, *bad, images[1].name, images[2].name]
    # a bad file's entry is its name and the reason the same file alone gets in its 4xx (after its name)
    alone = [batching.post(files=[("file", (name, data, "image/png"))]) for name, data in bad.items()]
    assert [r.status_code for r in alone] == [422] * 3
    assert [{"name": name, "error": r.json()["error"].removeprefix(f"{name}: ")} for name, r in zip(bad, alone)] \
        == entries[1:4]
    assert entries[1]["error"] == "not an image (unrecognised format)"
    good = [entries[0], *entries[4:]]
    assert_same([[(t["label"], t["probability"]) for t in e["top"]] for e in good],
                expected(bundle, images[:3], "onnx"))
    after = samples(batching)
    assert after[("spinal_serve_batch_size_sum", ())] - before[("spinal_serve_batch_size_sum", ())] == 3
    for reason in ("not_an_image", "decompression_bomb", "extreme_aspect_ratio"):     # the mixed request's, alone's
        key = ("spinal_serve_errors_total", (("reason", reason),))
        assert after[key] - before.get(key, 0) == 2, reason


def test_a_request_of_only_bad_files_gets_the_first_ones_4xx(batching):
    """Every file bad: the 4xx of its first bad file, as when that file is sent alone; each counted by its reason."""
    before = errors_by_reason(batching)
    response = batching.post(files=[("file", ("notes.txt", b"not an image", "image/png")),
                                    ("file", ("bomb.png", bomb_png(), "image/png"))])
    assert response.status_code == 422
    assert response.json() == {"error": "notes.txt: not an image (unrecognised format)"}
    after = errors_by_reason(batching)
    assert after["not_an_image"] - before.get("not_an_image", 0) == 1
    assert after["decompression_bomb"] - before.get("decompression_bomb", 0) == 1


def test_metrics_count_every_request(batching, images):
    concurrently(*[lambda p=p: batching.post(**png(p)) for p in images[:3]])
    got = samples(batching)
    counted = {int(dict(labels)["status"]): v for (name, labels), v in got.items()
               if name == "spinal_serve_requests_total" and dict(labels)["endpoint"] == "/predict"}
    assert counted == {s: float(n) for s, n in batching.sent.items()}        # every request, by its status
    assert got[("spinal_serve_request_seconds_count", (("endpoint", "/predict"),))] == sum(batching.sent.values())
    assert got[("spinal_serve_request_seconds_bucket", (("endpoint", "/predict"), ("le", "+Inf")))] \
        == sum(batching.sent.values())


def test_metadata_and_health(plain, bundle):
    from spinal_transfer.deploy.serve import bundle_files, digest_of

    meta = httpx.get(plain.url + "/metadata").json()
    config = json.loads((bundle / "config.json").read_text())
    assert meta["classes"] == config["classes"] and meta["input_size"] == config["input"]["img_size"] == 32
    assert meta["runner"] == "torch" and meta["max_batch"] == 32 and meta["max_wait_ms"] == 5
    assert meta["digest_files"] == ["README.md", "config.json", "model.onnx", "model.safetensors", "predict_onnx.py"]
    assert meta["digest"] == digest_of(bundle_files(bundle)) and meta["digest"].startswith("sha256:")
    assert meta["temperature"] == config["temperature"] and meta["temperature"] > 0      # finished_run is calibrated
    assert meta["probabilities"] == f"probabilities: softmax(logits / T), T = {config['temperature']:.3f}, " \
                                    "calibrated on the run's val split"
    health = httpx.get(plain.url + "/healthz")
    assert health.status_code == 200 and health.json()["digest"] == meta["digest"]


def test_unknown_paths_and_wrong_methods_are_counted_as_errors(plain):
    """404 and 405 count in spinal_serve_errors_total by a reason that never holds the path (bounded labels)."""
    before = errors_by_reason(plain)
    missing = [httpx.get(plain.url + path) for path in ("/nothing-here", "/or/here")]
    assert all(r.status_code == 404 and r.json()["error"] for r in missing)
    wrong = httpx.get(plain.url + "/predict")                  # HTTP: a 405 names the methods that are allowed
    assert wrong.status_code == 405 and wrong.json()["error"] and wrong.headers["allow"] == "POST"
    after = errors_by_reason(plain)
    assert {reason: n - before.get(reason, 0) for reason, n in after.items() if n != before.get(reason, 0)} \
        == {"not_found": 2, "method_not_allowed": 1}


def test_no_calibration_serves_the_plain_softmax_and_says_so(bundle, three_digits):
    import torch

    from spinal_transfer.cli import build_parser
    from spinal_transfer.deploy import serve

    args = build_parser("serve").parse_args(["serve", str(bundle), "--no-calibration"])
    assert args.calibrated is False
    plain = serve.Model(serve.ServeSettings(str(bundle), "torch", "cpu", 8, 5.0, 10.0, 3, calibrated=False))
    calibrated = serve.Model(serve.ServeSettings(str(bundle), "torch", "cpu", 8, 5.0, 10.0, 3))
    assert plain.metadata["temperature"] is None and calibrated.metadata["temperature"] > 0
    assert plain.metadata["probabilities"] == "probabilities: the plain softmax (calibration turned off)"
    image = str(next((three_digits / "test" / "digit_1").iterdir()))
    z = torch.log(calibrated.predictor.probabilities([image])) * calibrated.metadata["temperature"]   # logits + c
    assert torch.allclose(plain.predictor.probabilities([image]), torch.softmax(z, 1), atol=1e-6)


def test_digest_changes_with_any_file_of_the_bundle(bundle, tmp_path):
    from spinal_transfer.deploy.serve import bundle_files, digest_of

    copy = shutil.copytree(bundle, tmp_path / "b")
    first = digest_of(bundle_files(copy))
    assert digest_of(bundle_files(copy)) == first
    (copy / "notes.txt").write_text("a user's file beside the bundle")        # not the model's: not digested
    assert digest_of(bundle_files(copy)) == first
    (copy / "README.md").write_text((copy / "README.md").read_text() + "\n")
    assert digest_of(bundle_files(copy)) != first


# --- shutdown -------------------------------------------------------------------------------------

async def _burst(url: str, body: bytes, proc: subprocess.Popen, clients: int, signal_after: int) -> tuple:
    """`clients` loops POSTing `body` until the server refuses connections; SIGTERM once `signal_after`
    answers are in. Returns ([(status or error name, start, end)], time of the signal)."""
    outcomes: list[tuple] = []
    sent_at: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            t0 = time.monotonic()
            try:
                r = await http.post(url + "/predict", content=body, headers={"Content-Type": "image/png"})
                outcomes.append((r.status_code, t0, time.monotonic()))
            except httpx.TransportError as e:
                outcomes.append((type(e).__name__, t0, time.monotonic()))
                if isinstance(e, httpx.ConnectError):         # nothing listens any more
                    return

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        tasks = [asyncio.create_task(client(http)) for _ in range(clients)]
        while sum(o[0] == 200 for o in outcomes) < signal_after:
            await asyncio.sleep(0.005)
        sent_at.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 90)
    return outcomes, sent_at[0]


def test_sigterm_during_a_burst_loses_no_accepted_request(servers, images):
    server = servers["drain"]
    outcomes, signalled = asyncio.run(_burst(server.url, images[0].read_bytes(), server.proc, 16, 10))
    assert server.proc.wait(60) == 0                     # a stop that was asked for and done
    log = server.output()
    answered_by_server = int(re.search(r"stopped after answering (\d+) /predict request", log).group(1))
    ok = [o for o in outcomes if o[0] == 200]
    refused = Counter(o[0] for o in outcomes if o[0] != 200)
    # every request the server accepted was answered and its answer arrived; the rest never got in
    assert len(ok) == answered_by_server, (len(ok), answered_by_server, refused)
    assert set(refused) <= {"ConnectError", "RemoteProtocolError", "ReadError", "WriteError"}, refused
    assert any(start < signalled < end for _, start, end in ok), "no request was in flight at SIGTERM"


# --- the page, the README, the deployment examples ------------------------------------------------

_RESULT_JS = """new Promise((resolve) => { const t = setInterval(() => {
  const r = document.getElementById('result');
  if (r.dataset.state === 'done' || r.dataset.state === 'error') { clearInterval(t); resolve({state: r.dataset.state,
    top: r.dataset.top, status: document.getElementById('status').textContent,
    rows: [...r.querySelectorAll('.row')].map((e) => [e.dataset.label, Number(e.dataset.probability)])}); }
}, 50); })"""


def test_page_uploads_an_image_in_chromium(plain, bundle, images):
    from spinal_transfer.evaluation.browser import render

    chromium_or_skip()
    page = render(plain.url + "/", files={"#file": [images[4]]}, evaluate={"result": _RESULT_JS}, timeout=60)
    result = page.values["result"]
    want = expected(bundle, [images[4]], "torch", k=5)[0]
    assert result["state"] == "done", result
    assert result["top"] == want[0][0] and result["status"] == f"{images[4].name}: {want[0][0]}"
    assert_same([[tuple(r) for r in result["rows"]]], [want])
    assert not page.failed and not page.errors, (page.failed, page.errors)
    assert all(u.startswith((plain.url + "/", f"blob:{plain.url}/", "data:")) for u in page.requests), \
        page.requests                                                               # nothing from outside


def test_page_says_why_a_file_is_refused_once(plain, tmp_path):
    from spinal_transfer.evaluation.browser import render

    chromium_or_skip()
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    page = render(plain.url + "/", files={"#file": [junk]}, evaluate={"result": _RESULT_JS}, timeout=60)
    result = page.values["result"]
    assert result["state"] == "error" and result["status"] == "junk.png: not an image (unrecognised format)", result


def _serve_section() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"^## Serve it\n(.*?)(?=^## )", text, re.S | re.M).group(1)


def test_readme_curl_example_runs_against_the_server(plain, bundle, images, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("no curl on this machine")
    lines = [line.split("  #")[0].strip() for line in _serve_section().splitlines() if line.startswith("curl ")]
    assert lines, "the README's 'Serve it' section has no curl line"
    (tmp_path / "photos").mkdir()
    for line in lines:
        argv = shlex.split(line.replace("http://127.0.0.1:8000", plain.url))
        photo = next(a.split("@", 1)[1] for a in argv if "@" in a)
        shutil.copy(images[5], tmp_path / photo)
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got = [[(t["label"], t["probability"]) for t in p["top"]] for p in json.loads(out.stdout)["predictions"]]
        assert_same(got, expected(bundle, [images[5]], "torch", k=len(got[0])))


def _serve_args(argv: list[str]):
    from spinal_transfer.cli import build_parser

    assert argv[:2] == ["spinal-transfer", "serve"], argv
    return build_parser(only="serve").parse_args(argv[1:])


def test_deployment_examples_use_the_real_cli(plain):
    import yaml

    docs = list(yaml.safe_load_all((REPO / "examples" / "serve" / "kubernetes.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = _serve_args(container["command"] + container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == args.port == 8000
    assert args.host == "0.0.0.0"                   # reachable from outside the pod
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == args.port
    assert service["spec"]["selector"] == pod["metadata"]["labels"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.drain_timeout
    assert httpx.get(plain.url + probe["path"]).status_code == 200       # the probe's path on a real server

    dockerfile = (REPO / "examples" / "serve" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))      # exec form: SIGTERM reaches it
    args = _serve_args(cmd)
    assert args.host == "0.0.0.0" and f"EXPOSE {args.port}" in dockerfile
    assert f"127.0.0.1:{args.port}/healthz" in dockerfile


def test_a_bad_model_is_one_line_before_listening(bundle, tmp_path, cli_run):
    shutil.copy(bundle / "config.json", tmp_path / "config.json")          # a bundle without its weights
    res = cli_run("serve", tmp_path, "--runner", "torch", "--port", str(free_port()))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "model.safetensors" in res.stderr, res.stderr


def test_a_port_in_use_or_a_host_not_here_is_one_line_before_the_model_loads(bundle, cli_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = cli_run("serve", bundle, "--port", str(taken.getsockname()[1]))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "choose another --port" in res.stderr, res.stderr
    res = cli_run("serve", bundle, "--host", "no-such-host.invalid", "--port", str(free_port()))
    assert res.returncode == 2 and "--host no-such-host.invalid: not an address" in res.stderr, res.stderr


def test_a_client_leaving_mid_upload_is_not_a_server_error(plain, images):
    """Counted as client_disconnect (status 499), with no traceback in the log: an alert on 500s stays quiet."""
    before = errors_by_reason(plain)
    with socket.create_connection(("127.0.0.1", plain.port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                  + b"\x89PNG" * 10)
    for _ in range(100):                     # the server notices the closed connection on its next read
        if errors_by_reason(plain).get("client_disconnect", 0) > before.get("client_disconnect", 0):
            break
        time.sleep(0.05)
    after = errors_by_reason(plain)
    assert after.get("client_disconnect", 0) == before.get("client_disconnect", 0) + 1
    assert after.get("internal", 0) == before.get("internal", 0) and "ClientDisconnect" not in plain.output()
    assert plain.post(**png(images[0])).status_code == 200          # and it goes on serving


def test_a_model_that_computes_nan_is_refused_by_predict_and_serve(bundle, images, tmp_path, cli_run):
    """Weights that load but compute NaN would write NaN probabilities: the check batch every runner opens a model
    with refuses them, in one line, before any image (and before serve listens)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(bundle, broken)
    tensors = load_file(broken / "model.safetensors")
    save_file({k: t.fill_(float("nan")) if t.is_floating_point() else t for k, t in tensors.items()},
              broken / "model.safetensors")
    for args in (("predict", broken, images[0], "--out", tmp_path / "p.csv"),
                 ("serve", broken, "--port", str(free_port()))):
        res = cli_run(*args, "--runner", "torch", "--no-verify")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "non-finite scores" in res.stderr, res.stderr
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_workers_share_one_port_and_add_up_their_metrics(bundle, images, tmp_path):
    server = Server(bundle, tmp_path / "serve.log", "--workers", "2", "--runner", "onnx")
    try:
        server.wait_ready(300)
        deadline = time.monotonic() + 300                 # ready = one worker; wait for the second too
        while server.output().count("Application startup complete") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        concurrently(*[lambda p=p: server.post(**png(p)) for p in images[:8]])
        got = samples(server)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0
    finally:
        server.stop()
    assert server.sent == {200: 8}
    assert got[("spinal_serve_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 8     # both workers
    per_worker = [int(n) for n in re.findall(r"stopped after answering (\d+) /predict", server.output())]
    assert len(per_worker) == 2 and sum(per_worker) == 8, server.output()
