"""A latency server on the target device: it measures architectures sent to it with nas.latency's
protocol, in the runtime the client asks for, one at a time, and answers with the device's
context. Training stays where the GPUs or cores are; latency is taken where the network ships.

    python -m nas.latency serve --port 8765 --token-file token.txt          # on the device
    python -m nas.search --latency-server http://device:8765 --latency-token-file token.txt ...

HTTP (the standard library's ThreadingHTTPServer: nothing to install on a device beside nas and
torch), JSON in and out, never pickles or code:

    GET  /health    {"device_name", "devices", "runtimes", "torch"}       (no token)
    POST /context   {input_size, device, threads, runtime, precision} -> LatencyContext
    POST /measure   {arch, num_classes, input_size, device, threads, runtime, precision,
                     min_time_s, max_time_s, stop_above_ms} -> LatencyResult

Every POST carries `Authorization: Bearer <token>` (compared in constant time). The
architecture goes through nas.arch's strict parser; the body, the network's parameters and its
multiply-adds are limited; measurements are serialized by one lock, so two searches sharing a
device do not disturb each other's timings. One log line per request.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from nas.arch import ArchError, Architecture
from nas.cli import HelpFormatter, Parser, int_in_range
from nas.cost import count_macs, count_params
from nas.host import cpu_name
from nas.interleaved import (
    MAX_WARM_RUNS,
    WARM_RUNS_PER_BLOCK,
    measure_interleaved,
    protocol_name,
    warm_runs_of,
)
from nas.latency import DEVICES, LatencyError, latency_context, measure_latency
from nas.latency_client import read_token
from nas.model import TooLargeError, build_model
from nas.runtimes import RUNTIME_NAMES
from nas.runtimes.base import LATENCY_CALIBRATION_IMAGES

MAX_BODY_BYTES = 1 << 20  # an architecture is a few KiB of JSON
MAX_PARAMS = 100_000_000
MAX_MACS = 50_000_000_000
MAX_MEASURE_S = 30.0  # a client may not hold the device longer per network
MEASURE_FIELDS = {"arch", "num_classes", "input_size", "device", "threads", "runtime",
                  "precision", "min_time_s", "max_time_s", "stop_above_ms", "protocol",
                  "reference_ms", "warm_runs"}
CONTEXT_FIELDS = {"input_size", "device", "threads", "runtime", "precision", "protocol",
                  "warm_runs"}
PROTOCOLS = ("single", "interleaved")


class Refused(Exception):
    """A request the server answers with a 4xx and one line saying why."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class LatencyService:
    """What the handler calls: checks, limits and the one measurement at a time."""

    def __init__(self, token: str, *, max_params: int = MAX_PARAMS, max_macs: int = MAX_MACS,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self.token, self.max_params, self.max_macs, self.max_body = (
            token, max_params, max_macs, max_body)
        self.lock = threading.Lock()  # one measurement at a time: the others queue

    def authorized(self, header: str | None) -> bool:
        given = (header or "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, self.token.encode())

    def health(self) -> dict[str, Any]:
        from nas.runtimes import RUNTIMES

        installed = []
        for name in RUNTIME_NAMES:
            try:
                RUNTIMES[name].check()
                installed.append(name)
            except Exception:  # noqa: BLE001 - not installed here: not offered
                pass
        return {"device_name": cpu_name(), "devices": ["cpu"] + (
            [f"cuda ({torch.cuda.get_device_name(0)})"] if torch.cuda.is_available() else []),
            "runtimes": installed, "torch": torch.__version__}

    def context(self, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, CONTEXT_FIELDS)
        return dataclasses.asdict(_context(body))

    def measure(self, body: dict[str, Any]) -> dict[str, Any]:
        _only(body, MEASURE_FIELDS)
        if "arch" not in body or not isinstance(body["arch"], dict):
            raise Refused(HTTPStatus.BAD_REQUEST, "arch: expected an architecture as a JSON "
                                                  "object (nas.arch's format)")
        try:
            arch = Architecture.from_dict(body["arch"], where="arch")
        except ArchError as e:
            raise Refused(HTTPStatus.BAD_REQUEST, str(e)) from None
        num_classes = _int(body, "num_classes", 1000, 1, 100_000)
        ctx = _context(body)
        min_s, max_s = (_seconds(body, "min_time_s", 1.0), _seconds(body, "max_time_s", 2.0))
        if min_s > max_s:
            raise Refused(HTTPStatus.BAD_REQUEST, "min_time_s must be <= max_time_s")
        bound = body.get("stop_above_ms")
        if bound is not None and not (isinstance(bound, (int, float)) and bound > 0):
            raise Refused(HTTPStatus.BAD_REQUEST, "stop_above_ms: a number of ms > 0, or null")
        try:
            model = build_model(arch, num_classes=num_classes)
        except TooLargeError as e:
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, f"arch: {e}") from None
        params = count_params(model)
        if params > self.max_params:
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY,
                          f"arch: {params:,} parameters; this server measures at most "
                          f"{self.max_params:,}")
        macs = count_macs(model, ctx.input_size)
        if macs > self.max_macs:
            raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY,
                          f"arch: {macs:,} multiply-adds at {ctx.input_size}x{ctx.input_size}; "
                          f"this server measures at most {self.max_macs:,}")
        calibration = None
        if ctx.precision != "fp32":  # quantization ranges do not change an int8 graph's time
            calibration = torch.randn(LATENCY_CALIBRATION_IMAGES, 3, ctx.input_size, ctx.input_size,
                                      generator=torch.Generator().manual_seed(0))
        protocol = body.get("protocol", "single")
        reference_ms = body.get("reference_ms")
        if reference_ms is not None and not (isinstance(reference_ms, (int, float))
                                             and reference_ms > 0):
            raise Refused(HTTPStatus.BAD_REQUEST, "reference_ms: a number of ms > 0, or null")
        with self.lock:
            try:
                if protocol == "interleaved":
                    result = measure_interleaved(
                        model, ctx.input_size, device=ctx.device, threads=ctx.threads,
                        runtime=ctx.runtime, precision=ctx.precision, num_classes=num_classes,
                        reference_ms=reference_ms, calibration=calibration,
                        warm_runs_per_block=warm_runs_of(ctx.protocol)).as_result()
                else:
                    result = measure_latency(
                        model, ctx.input_size, device=ctx.device, threads=ctx.threads,
                        runtime=ctx.runtime, precision=ctx.precision, min_time_s=min_s,
                        max_time_s=max_s, stop_above_ms=bound, calibration=calibration)
            except Exception as e:  # noqa: BLE001 - the candidate's: a converter's refusal, OOM
                reason = (str(e).splitlines() or [""])[0]
                raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, reason if isinstance(
                    e, LatencyError) else f"{type(e).__name__}: {reason}") from None
        return result.to_dict()


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Refused(HTTPStatus.BAD_REQUEST, f"unknown field {unknown[0]!r}; allowed: "
                                              f"{sorted(allowed)}")


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise Refused(HTTPStatus.BAD_REQUEST, f"{key}: an integer from {lo} to {hi}")
    return value


def _seconds(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if not (isinstance(value, (int, float)) and 0 <= value <= MAX_MEASURE_S):
        raise Refused(HTTPStatus.BAD_REQUEST, f"{key}: seconds from 0 to {MAX_MEASURE_S:g}")
    return float(value)


def _context(body: dict[str, Any]):
    protocol = body.get("protocol", "single")
    if protocol not in PROTOCOLS:
        raise Refused(HTTPStatus.BAD_REQUEST, f"protocol: one of {list(PROTOCOLS)}")
    try:
        context = latency_context(
            _int(body, "input_size", 224, 1, 4096), device=str(body.get("device", "cpu")),
            threads=_int(body, "threads", 1, 1, 4096),
            runtime=str(body.get("runtime", "eager")),
            precision=str(body.get("precision", "fp32")))
    except LatencyError as e:
        raise Refused(HTTPStatus.UNPROCESSABLE_ENTITY, str(e)) from None
    warm = _int(body, "warm_runs", WARM_RUNS_PER_BLOCK, 0, MAX_WARM_RUNS)
    if protocol == "interleaved":
        context = dataclasses.replace(context, protocol=protocol_name(warm_runs=warm))
    return context


class Handler(BaseHTTPRequestHandler):
    service: LatencyService  # set on the subclass serve() makes
    server_version = "nas-latency/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # one line per request, from _answer, instead of http.server's own

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        start = time.perf_counter()
        if self.path == "/health":
            self._answer(HTTPStatus.OK, self.service.health(), start)
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"}, start)

    def do_POST(self) -> None:  # noqa: N802
        start = time.perf_counter()
        routes = {"/measure": self.service.measure, "/context": self.service.context}
        try:
            if self.path not in routes:
                raise Refused(HTTPStatus.NOT_FOUND, f"no such path {self.path}")
            if not self.service.authorized(self.headers.get("Authorization")):
                raise Refused(HTTPStatus.UNAUTHORIZED, "missing or wrong token")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            if int(length) > self.service.max_body:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"body of {int(length):,} bytes; at most "
                              f"{self.service.max_body:,}")
            try:
                body = json.loads(self.rfile.read(int(length)))
            except (ValueError, UnicodeDecodeError) as e:
                raise Refused(HTTPStatus.BAD_REQUEST, f"not JSON ({type(e).__name__})") from None
            if not isinstance(body, dict):
                raise Refused(HTTPStatus.BAD_REQUEST, "expected a JSON object")
            answer, status = routes[self.path](body), HTTPStatus.OK
        except Refused as e:
            answer, status = {"error": str(e).splitlines()[0]}, e.status
        except Exception as e:  # noqa: BLE001 - a bug or a runtime's failure: answered, logged
            answer = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        if status >= 400:
            self.close_connection = True  # the body may not have been read
        self._answer(status, answer, start)

    def _answer(self, status: HTTPStatus, answer: dict[str, Any], start: float) -> None:
        data = json.dumps(answer).encode()
        detail = answer.get("error") or (f"{answer['median_ms']:.3f} ms"
                                         if "median_ms" in answer else "")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left mid-measurement: nothing to answer
            detail += " (client gone)"
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.client_address[0]} {self.command} "
              f"{self.path} {int(status)} {1000 * (time.perf_counter() - start):.0f} ms "
              f"{detail}".rstrip(), file=sys.stderr, flush=True)


def make_server(service: LatencyService, host: str = "127.0.0.1", port: int = 0
                ) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nas.latency serve", formatter_class=HelpFormatter,
               description="Serve latency measurements of this device to nas.search, "
                           "nas.latency and nas.confirm on other machines.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; only on a network "
                        "you trust, the token is sent in the clear)")
    p.add_argument("--port", type=int_in_range(0, 65535), default=8765,
                   help="0: any free port (printed)")
    p.add_argument("--token-file", required=True, help="file holding the shared token")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="the device clients may ask for (also cpu)")
    p.add_argument("--max-params", type=int_in_range(1), default=MAX_PARAMS,
                   help="networks with more parameters are refused (422)")
    p.add_argument("--max-macs", type=int_in_range(1), default=MAX_MACS,
                   help="multiply-adds at the requested input size; more are refused (422)")
    return p


def serve(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        token = read_token(args.token_file, "--token-file")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise LatencyError("--device cuda: no CUDA GPU on this machine")
        service = LatencyService(token, max_params=args.max_params, max_macs=args.max_macs)
    except (LatencyError, OSError) as e:
        print(f"nas.latency serve: error: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(service, args.host, args.port)
    except OSError as e:  # the port taken, an unknown host name, a port below 1024 unprivileged
        print(f"nas.latency serve: error: --host {args.host} --port {args.port}: cannot listen "
              f"there ({e.strerror or e})", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"nas.latency serve: {cpu_name()} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0

