"""`spinal-transfer serve`."""
from __future__ import annotations

import argparse
import errno
import socket

from ..deploy.predict import RUNNERS, TOPK
from ..errors import ConfigError, MissingDependency
from . import finite, finite_nonnegative, port, positive_int

HOST, PORT = "127.0.0.1", 8000
MAX_BATCH, MAX_WAIT_MS, MAX_UPLOAD_MB, DRAIN_TIMEOUT_S = 32, 5.0, 10.0, 30

EXAMPLES = """\
  spinal-transfer serve bundles/pets
  spinal-transfer serve bundles/pets --host 0.0.0.0 --port 8080 --workers 2
  spinal-transfer serve bundles/pets --runner onnx-int8 --max-batch 16 --max-wait-ms 10
  spinal-transfer serve runs/pets --runner torch --device cuda
  curl -F file=@photo.jpg http://127.0.0.1:8000/predict
  curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' 'http://127.0.0.1:8000/predict?topk=3'
POST /predict takes images as multipart files (at most 64 a request) or one raw image body and answers JSON
with the top-k classes and probabilities (as `predict` computes them); GET / is a page to try it, GET /healthz
is 200 once the model is loaded and checked, GET /metadata gives the classes, input size and the bundle's
digest, GET /metrics is Prometheus text. Images arriving within --max-wait-ms run as one batch of up to
--max-batch. A bad upload (over --max-upload-mb or 64 files, or every file of it not a usable image) gets a 4xx
JSON error; a bad file among good ones gets an entry with its error, as `predict` skips it. SIGTERM answers the
requests in flight, then exits.
Needs the extra: pip install -e ".[serve]"."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="BUNDLE_OR_RUN",
                        help="bundle folder, bundle .onnx file, run folder (best.pt) or checkpoint file")
    parser.add_argument("--host", default=HOST, help=f"address to listen on (default: {HOST}; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port, default=PORT, help=f"port to listen on (default: {PORT})")
    parser.add_argument("--runner", default="auto", choices=RUNNERS,
                        help="what runs the model, as for `predict` (default: auto: int8 ONNX, else ONNX, else torch "
                             "on the CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    parser.add_argument("--max-batch", type=positive_int, default=MAX_BATCH,
                        help=f"most images per model call (default: {MAX_BATCH})")
    parser.add_argument("--max-wait-ms", type=finite_nonnegative, default=MAX_WAIT_MS,
                        help=f"how long a batch waits for more images after its first (default: {MAX_WAIT_MS:g})")
    parser.add_argument("--max-upload-mb", type=finite, default=MAX_UPLOAD_MB,
                        help=f"largest request body accepted, in MiB; larger gets 413 (default: {MAX_UPLOAD_MB:g})")
    parser.add_argument("--topk", type=positive_int, default=TOPK,
                        help=f"classes per image unless the request asks (?topk=N) (default: {TOPK})")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="server processes, each with its own copy of the model (default: 1)")
    parser.add_argument("--drain-timeout", type=positive_int, default=DRAIN_TIMEOUT_S,
                        help=f"on SIGTERM, seconds to finish the requests in flight (default: {DRAIN_TIMEOUT_S})")
    parser.add_argument("--no-calibration", dest="calibrated", action="store_false",
                        help="answer with the plain softmax, without the model's temperature (default: calibrated, "
                             "as predict; /metadata says which)")
    parser.add_argument("--no-verify", action="store_true",
                        help="serve a bundle whose files or config.json differ from the digests export recorded (a "
                             "bundle edited on purpose); without it such a bundle is refused")


def check_address(host: str, port: int) -> None:
    """ConfigError unless this process could listen on host:port now: a host that does not resolve, a port in
    use or not ours to take. Bound with SO_REUSEADDR, as uvicorn binds, so a port in TIME_WAIT counts as free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror}); give one such as "
                          f"127.0.0.1, or 0.0.0.0 for all") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            busy = e.errno == errno.EADDRINUSE
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}" +
                              ("; another server holds it: choose another --port" if busy else "")) from None


def main(args: argparse.Namespace) -> int:
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}")
    try:
        from ..deploy import serve  # lazy: torch, uvicorn, starlette, prometheus_client
    except ImportError as e:
        raise MissingDependency(f"serve needs uvicorn, starlette, python-multipart and prometheus-client ({e}): "
                                f'pip install -e ".[serve]"') from None

    check_address(args.host, args.port)      # before the model loads: a port in use is one line, not uvicorn's
    settings = serve.ServeSettings(args.model, args.runner, args.device, args.max_batch, args.max_wait_ms,
                                   args.max_upload_mb, args.topk, verify=not args.no_verify,
                                   calibrated=args.calibrated)
    model = serve.Model(settings)            # opened here: a bad bundle is one line on stderr, before listening
    if args.workers > 1:
        model = None                         # that was the check: each worker opens its own copy
    serve.serve(settings, args.host, args.port, args.workers, args.drain_timeout, model)
    return 0
