"""`spinal-transfer serve`: a bundle (or a run) behind HTTP, with dynamic batching, health, metadata and metrics.

A Starlette app run by uvicorn. Each worker process opens the model once, as a `Predictor` (predict's
runners, `auto` included), and answers:

* `POST /predict`: one or more images, as multipart files or as the raw bytes of one image, whatever its
  content type says (named by `?name=` in the answer); JSON with the top-k classes and probabilities of each
  (`?topk=` or --topk): `{"runner": ..., "predictions": [{"name": ..., "top": [{"label": ..., "probability":
  ...}, ...]}, ...]}`, one entry per file in request order. Every image is decoded and
  preprocessed by predict.preprocess_input (in a thread, so the event loop keeps accepting) and its
  probabilities come from Predictor.batch_probabilities: the same answers as `spinal-transfer predict`.
  As `predict` skips a bad file, a file that is not a usable image (see below) is an entry of its own,
  `{"name": ..., "error": ...}` (the reason, worded as the 4xx that file alone gets, after its name), and
  the others are predicted: 200 when at least one file was; when none was, that 4xx of the first bad file.
* `GET /healthz`: 200 once the model is loaded, its files hashed and a check batch has given a softmax over
  the bundle's classes (and while the batching task runs), else 503.
* `GET /metadata`: classes, input size, runner, the bundle's digest (sha256 over its files), its temperature and
  how its probabilities are made (calibrated or the plain softmax).
* `GET /metrics`: Prometheus text: requests by endpoint and status, latency and batch-size histograms,
  errors by reason (a bad file of a request counts too, by BadImage's reason: not_an_image,
  decompression_bomb, extreme_aspect_ratio; an unknown path is not_found, a wrong method method_not_allowed).
  With several workers, prometheus_client's multiprocess mode adds them all up.
* `GET /`: a self-contained page (no outside request) to drop an image on and see the top-k bars.

Dynamic batching: preprocessed images wait on an asyncio queue; one task takes the first, then whatever
else arrives within `max_wait_ms`, up to `max_batch`, and runs them as one batch in a single model thread.
A bad upload (larger than `max_upload_mb`, a malformed form) is answered with a 4xx JSON error, and a bad
image (not an image, a decompression bomb by PIL's MAX_IMAGE_PIXELS, an extreme aspect ratio) with its
entry, before it reaches the queue, so it cannot fail anyone else's batch.
On SIGTERM uvicorn stops accepting, waits for the requests in flight (their batches still run), then the
batching task finishes whatever is queued and the process exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import io
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import torch
import uvicorn
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..data.images import BadImage
from ..evaluation.calibration import probabilities_note
from ..runs.rundir import RunDir
from .export import CONFIG_FILE, bundle_files_in
from .predict import preprocess_input, top_classes
from .predictor import Predictor

MAX_FILES = 64                     # images in one multipart request
ENDPOINTS = ("/", "/predict", "/healthz", "/metadata", "/metrics")
SETTINGS_ENV = "SPINAL_TRANSFER_SERVE"       # the settings, as JSON, for worker processes (--workers > 1)
PAGE = Path(__file__).with_name("serve_page.html")
log = logging.getLogger("uvicorn.error")     # configured by uvicorn: its lines and ours in one stream


@dataclass
class ServeSettings:
    """What one worker needs to open the model and answer requests (JSON-able: it travels to workers). The
    defaults are the command line's (cli/serve.py)."""

    source: str
    runner: str
    device: str
    max_batch: int
    max_wait_ms: float
    max_upload_mb: float
    topk: int
    verify: bool = True           # False: serve a bundle edited on purpose (predict's --no-verify)
    calibrated: bool = True       # False: the plain softmax (predict's --no-calibration)


class RequestError(Exception):
    """A request that cannot be answered with predictions: its HTTP status, a metrics reason and a message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


# --- the model ------------------------------------------------------------------------------------

def bundle_files(source: str | os.PathLike) -> list[Path]:
    """The files a source is made of: a bundle folder's files (the folder of a bundle's .onnx file too), a run's
    best checkpoint, or a checkpoint file."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if (folder / CONFIG_FILE).is_file():
        return bundle_files_in(folder)
    return [RunDir(path).best if path.is_dir() else path]


def digest_of(files: list[Path]) -> str:
    """sha256 over each file's name and sha256, in name order: changes when any file of the bundle does."""
    outer = hashlib.sha256()
    for f in files:
        inner = hashlib.sha256()
        with open(f, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{f.name}\0{inner.hexdigest()}\n".encode())
    return "sha256:" + outer.hexdigest()


class Model:
    """One worker's model: the Predictor (opened with predict's check batch: one finite score per class), and
    what /metadata says about it."""

    def __init__(self, settings: ServeSettings):
        self.predictor = Predictor(settings.source, device=settings.device, runner=settings.runner,
                                   verify=settings.verify, calibrated=settings.calibrated)
        files = bundle_files(settings.source)
        config = self.predictor.config
        self.metadata = {
            "classes": self.predictor.classes, "input_size": config["input"]["img_size"],
            "input": config["input"], "backbone": config["backbone"], "head": config["head"]["kind"],
            "runner": self.predictor.runner, "device": str(self.predictor.device), "source": str(settings.source),
            "digest": digest_of(files), "digest_files": [f.name for f in files],
            "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
            "max_upload_mb": settings.max_upload_mb, "topk": settings.topk, "version": __version__,
            "temperature": config.get("temperature") if settings.calibrated else None,
            "probabilities": probabilities_note(config, settings.calibrated),
        }


# --- dynamic batching -----------------------------------------------------------------------------

class Batcher:
    """Collects single preprocessed images into batches: the first waiting image opens a batch, which takes
    whatever else arrives within `max_wait_s`, up to `max_batch` images, then runs `run` on them in one model
    thread (so requests keep being accepted and decoded meanwhile). `close` runs what is still queued."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int], None]):
        self.run, self.max_batch, self.max_wait_s, self.on_batch = run, max_batch, max_wait_s, on_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="spinal-serve-model")
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="spinal-serve-batcher")

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """The probabilities of one preprocessed image (CHW), once its batch has run."""
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, done))
        return await done

    async def close(self) -> None:
        """Run every image queued so far, then stop (the None marks the end of the queue)."""
        if self.running:
            self.queue.put_nowait(None)
            await self.task
        self.model_thread.shutdown(wait=True)

    async def _collect(self) -> tuple[list, bool]:
        """(the next batch, whether the end marker was reached)."""
        first = await self.queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    async def _loop(self) -> None:
        end = False
        while not end:
            batch, end = await self._collect()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list) -> None:
        self.on_batch(len(batch))
        x = torch.stack([x for x, _ in batch])
        try:
            probs = await asyncio.get_running_loop().run_in_executor(self.model_thread, self.run, x)
        except Exception as e:        # the model failed: every request of this batch gets a 500, the server goes on
            for _, done in batch:
                if not done.done():
                    done.set_exception(e)
            return
        for i, (_, done) in enumerate(batch):
            if not done.done():      # its client may have gone
                done.set_result(probs[i])


# --- metrics --------------------------------------------------------------------------------------

class Metrics:
    """The Prometheus metrics of one worker. Under --workers > 1 (PROMETHEUS_MULTIPROC_DIR set before the
    workers start) their values are written to files that /metrics of any worker adds up."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("spinal_serve_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("spinal_serve_request_seconds", "time from request to response, by endpoint",
                                 ["endpoint"], registry=self.registry)
        buckets = sorted({2 ** i for i in range(int(math.log2(max_batch)) + 1)} | {max_batch})
        self.batch_size = Histogram("spinal_serve_batch_size", "images per model call (dynamic batching)",
                                    buckets=buckets, registry=self.registry)
        self.errors = Counter("spinal_serve_errors", "requests, and bad files of a request, answered with an "
                              "error, by reason", ["reason"], registry=self.registry)
        self.exposed = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed)

    def text(self) -> bytes:
        return generate_latest(self.exposed)


def metrics_middleware(app: Callable, metrics: Metrics) -> Callable:
    """ASGI middleware: counts every HTTP request by endpoint (paths other than ENDPOINTS count as "other")
    and status, and times it."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = [500]
        start = time.perf_counter()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            metrics.requests.labels(endpoint, str(status[0])).inc()
    return wrapped


# --- requests -------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes (Content-Length, else while
    it streams in); a 499 (nginx's "client closed request", for the log and /metrics) when the client leaves
    before its body has arrived."""
    too_large = RequestError(413, "too_large", f"the upload is larger than the server's limit of {limit} bytes "
                                               f"(--max-upload-mb)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:     # the client's doing, not the server's: no traceback, not counted as a 500
        raise RequestError(499, "client_disconnect", "the client closed the connection before its upload "
                                                     "ended") from None
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _image_header(data: bytes) -> bool:
    """Whether `data` starts as an image PIL can open (its header only, not a decode)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Exception:   # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        return False


async def read_images(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image of a request: every file of a multipart form, or the whole body. A body is
    taken by what it holds, not by its label: `curl --data-binary @cat.jpg` sends a JPEG as
    application/x-www-form-urlencoded and `requests.post(data=...)` sends none, so a body labelled other than an
    image is refused (415) only when it is not one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
    if not body:
        raise RequestError(400, "bad_request", "the request body is empty: send images as multipart/form-data files "
                                               "or one image as the body")
    if kind != "multipart/form-data":
        if not (kind.startswith("image/") or kind == "application/octet-stream" or _image_header(body)):
            raise RequestError(415, "unsupported_media_type",
                               f"send images as multipart/form-data files or as an image body; got "
                               f"{kind or 'no content type'} whose body is not an image")
        return [(request.query_params.get("name", "body"), body)]
    try:
        form = await MultiPartParser(request.headers, _once(body), max_files=MAX_FILES).parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):         # starlette's words for its max_files: a limit, not an error
            raise RequestError(413, "too_many_files", f"at most {MAX_FILES} images per request (serve's limit): "
                                                      f"send the rest in further requests") from None
        raise RequestError(400, "bad_request", f"malformed multipart form: {e.message}") from None
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or "file", await value.read()))
            await value.close()
    if not files:
        raise RequestError(400, "bad_request", "the multipart form holds no file")
    return files


def requested_topk(request: Request, default: int) -> int:
    raw = request.query_params.get("topk")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:      # '²' and '٣' are digits to str.isdigit
        raise RequestError(400, "bad_request", f"topk must be an integer >= 1; got {raw!r}")
    return int(raw)


def preprocess_upload(data: bytes, transform: Any) -> torch.Tensor | BadImage:
    """The model input of one uploaded image, as `predict` computes it from the same file; the BadImage, returned
    rather than raised so that the request's other files go on, when it is not an image PIL can read, is over
    PIL's decompression-bomb bound (Image.MAX_IMAGE_PIXELS) or too thin to resize."""
    try:
        return preprocess_input(data, transform)
    except BadImage as e:
        return e


def answer(runner: str, names: list[str], inputs: list[torch.Tensor | BadImage],
           rows: list[list[tuple[str, float]]]) -> dict:
    """The JSON of /predict: per file in request order, its top classes (`rows`, one per good input), or its
    error."""
    good = iter(rows)
    return {"runner": runner, "predictions": [
        {"name": name, "error": str(x)} if isinstance(x, BadImage) else
        {"name": name, "top": [{"label": c, "probability": p} for c, p in next(good)]}
        for name, x in zip(names, inputs)]}


# --- the app --------------------------------------------------------------------------------------

# long: the routes are small closures over one server's state (model, queue, metrics), defined where they share it
def create_app(settings: ServeSettings, model: Optional[Model] = None) -> Callable:
    """The ASGI app; `model` when it was opened already (one worker), else it is opened here."""
    model = model or Model(settings)
    metrics = Metrics(settings.max_batch)
    predictor = model.predictor
    limit = int(settings.max_upload_mb * 2**20)
    state = {"batcher": None, "answered": 0}
    page = PAGE.read_text()

    async def predict(request: Request) -> Response:
        batcher: Batcher = state["batcher"]
        try:
            images = await read_images(request, limit)
            topk = requested_topk(request, settings.topk)
            inputs = await asyncio.gather(*(run_in_threadpool(preprocess_upload, data, predictor.transform)
                                            for _, data in images))
            bad = [(name, x) for (name, _), x in zip(images, inputs) if isinstance(x, BadImage)]
            for _, e in bad:
                metrics.errors.labels(e.reason).inc()
            if len(bad) == len(images):          # nothing to predict: the first bad file's error, as sent alone
                name, e = bad[0]
                return JSONResponse({"error": f"{name}: {e}"}, status_code=422)
            good = [x for x in inputs if not isinstance(x, BadImage)]
            probs = torch.stack(await asyncio.gather(*(batcher.submit(x) for x in good)))
        except RequestError as e:
            metrics.errors.labels(e.reason).inc()
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:        # a model failure: reported, counted, and the server goes on
            log.exception("predict failed")
            metrics.errors.labels("internal").inc()
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        finally:
            state["answered"] += 1
        rows = top_classes(probs, predictor.classes, topk)
        return JSONResponse(answer(predictor.runner, [name for name, _ in images], inputs, rows))

    async def healthz(request: Request) -> Response:
        batcher = state["batcher"]
        ready = batcher is not None and batcher.running
        return JSONResponse({"status": "ok" if ready else "unavailable", "model": predictor.runner,
                             "digest": model.metadata["digest"]}, status_code=200 if ready else 503)

    async def metadata(request: Request) -> Response:
        return JSONResponse(model.metadata)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def json_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own errors (an unknown path: 404, a wrong method: 405) as JSON, counted by the status's
        name (not_found, method_not_allowed: a few names, never the path)."""
        metrics.errors.labels(http.HTTPStatus(exc.status_code).name.lower()).inc()
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)  # 405's Allow

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher = Batcher(predictor.batch_probabilities, settings.max_batch, settings.max_wait_ms / 1000,
                          metrics.batch_size.observe)
        batcher.start()
        state["batcher"] = batcher
        log.info(f"spinal-transfer serve: {settings.source}, runner {predictor.runner} on {predictor.device}, "
                 f"{len(predictor.classes)} classes, {model.metadata['digest']}; batches of up to "
                 f"{settings.max_batch} within {settings.max_wait_ms:g} ms; {model.metadata['probabilities']}")
        try:
            yield
        finally:
            await batcher.close()
            log.info(f"spinal-transfer serve: stopped after answering {state['answered']} /predict request(s)")

    routes = [Route("/", index), Route("/predict", predict, methods=["POST"]), Route("/healthz", healthz),
              Route("/metadata", metadata), Route("/metrics", metrics_text)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: json_error})
    return metrics_middleware(app, metrics)


def app_from_environ() -> Callable:
    """The app of a worker process (uvicorn factory under --workers > 1): settings from $SPINAL_TRANSFER_SERVE."""
    return create_app(ServeSettings(**json.loads(os.environ[SETTINGS_ENV])))


def _exit_after_drain(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(settings: ServeSettings, host: str, port: int, workers: int, drain_timeout: int,
          model: Optional[Model] = None) -> None:
    """Run the server until SIGINT/SIGTERM; then the requests in flight are answered (for up to
    `drain_timeout` seconds) before it returns. One worker serves `model` (opened here if not given); several
    each open their own copy, and their metrics are added up through a temporary multiprocess folder.
    uvicorn re-raises the SIGTERM it drained for into the handler it found: ours ends the process with
    status 0 (a stop that was asked for and done), after this function's cleanup."""
    signal.signal(signal.SIGTERM, _exit_after_drain)
    options = dict(host=host, port=port, timeout_graceful_shutdown=drain_timeout)
    if workers == 1:
        uvicorn.run(create_app(settings, model), **options)
        return
    metrics_dir = tempfile.mkdtemp(prefix="spinal-serve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    try:
        uvicorn.run(f"{__name__}:app_from_environ", factory=True, workers=workers, **options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
