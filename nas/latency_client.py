"""The client of a latency server (nas.latency_server): measure an architecture on the device
that ships it while training stays here.

A server that is down or restarting (no connection, or 503) is retried with backoff until a
total deadline; then the measurement fails with the reason (a search fails that trial and goes
on). Any other answer (a wrong token, a network over the server's limits, a candidate the
runtime cannot convert) is final and not retried.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from nas.arch import Architecture
from nas.latency import LatencyContext, LatencyError, LatencyResult

RETRY_DEADLINE_S = 120.0  # a restart of the server is waited for this long per request
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # then 8 s between tries
TIMEOUT_S = 120.0  # one request: a measurement may wait for others queued before it


class LatencyServerError(LatencyError):
    """The server refused the request, or could not be reached before the deadline."""


def server_url(url: str, flag: str = "latency server") -> str:
    """The server's base URL without a trailing '/'; anything but http(s)://HOST[:PORT] is one
    line naming the flag (an address without its scheme would otherwise be retried until the
    deadline as if the server were down)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise LatencyError(f"{flag} {url!r}: expected http://HOST:PORT (or https://), the "
                           f"address 'nas.latency serve' prints when it starts")
    return url.rstrip("/")


class LatencyClient:
    def __init__(self, url: str, token: str, *, deadline_s: float | None = None) -> None:
        self.url, self.token = server_url(url), token
        self.deadline_s = RETRY_DEADLINE_S if deadline_s is None else deadline_s

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", None)

    def context(self, *, input_size: int, device: str = "cpu", threads: int | None = None,
                runtime: str = "eager", precision: str = "fp32",
                protocol: str = "single", warm_runs: int | None = None) -> LatencyContext:
        """The context the server would measure in (its device's name above all); `warm_runs`:
        the interleaved protocol's untimed runs per block (None: the server's default)."""
        answer = self._call("POST", "/context", {
            "input_size": input_size, "device": device, "threads": threads or 1,
            "runtime": runtime, "precision": precision, "protocol": protocol,
            **_given(warm_runs=warm_runs)})
        return LatencyContext(**answer)

    def measure(self, arch: Architecture, *, num_classes: int, input_size: int,
                device: str = "cpu", threads: int | None = None, runtime: str = "eager",
                precision: str = "fp32", min_time_s: float = 1.0, max_time_s: float = 2.0,
                stop_above_ms: float | None = None, protocol: str = "single",
                reference_ms: float | None = None, warm_runs: int | None = None
                ) -> LatencyResult:
        """`protocol` interleaved: against the server's reference, at `reference_ms` (None:
        the server calibrates it; the result says what it used), with `warm_runs` untimed runs
        per block (None: the server's default)."""
        answer = self._call("POST", "/measure", {
            "arch": arch.to_dict(), "num_classes": num_classes, "input_size": input_size,
            "device": device, "threads": threads or 1, "runtime": runtime,
            "precision": precision, "min_time_s": min_time_s, "max_time_s": max_time_s,
            "stop_above_ms": stop_above_ms, "protocol": protocol,
            "reference_ms": reference_ms, **_given(warm_runs=warm_runs)})
        return LatencyResult.from_dict(answer)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        deadline, tries, last = time.monotonic() + self.deadline_s, 0, ""
        while True:
            request = urllib.request.Request(
                f"{self.url}{path}", data=data, method=method,
                headers={"Authorization": f"Bearer {self.token}",
                         "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                reason = _error_of(e)
                if e.code != 503:  # refused: asking again gets the same answer
                    raise LatencyServerError(f"latency server {self.url}: {e.code} {reason}"
                                             ) from None
                last = f"{e.code} {reason}"
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = str(getattr(e, "reason", e))
            wait = BACKOFF_S[min(tries, len(BACKOFF_S) - 1)]
            tries += 1
            if time.monotonic() + wait > deadline:
                raise LatencyServerError(f"latency server {self.url}: no answer after {tries} "
                                         f"tries in {self.deadline_s:g} s ({last})")
            if tries == 1:  # say why it waits: a server that is down looks like a hang
                print(f"latency server {self.url}: no answer ({last}); trying again for up to "
                      f"{self.deadline_s:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given: a server of a version before them refuses none unasked."""
    return {k: v for k, v in fields.items() if v is not None}


def read_token(path: str | Path, flag: str) -> str:
    """A token file's first line; a missing or empty file is one line naming the flag."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise LatencyError(f"{flag} {path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise LatencyError(f"{flag} {path}: not a text file") from None
    if len(token) < 16:
        raise LatencyError(f"{flag} {path}: the token must be at least 16 characters (e.g. "
                           f"python -c 'import secrets; print(secrets.token_hex(16))' > {path})")
    return token


def connect(url: str | None, token_file: str | None) -> LatencyClient | None:
    """The client of `--latency-server URL --latency-token-file F` (None without them);
    LatencyError names the flag at fault."""
    if bool(url) != bool(token_file):
        raise LatencyError("--latency-server and --latency-token-file go together")
    if not url:
        return None
    return LatencyClient(server_url(url, "--latency-server"),
                         read_token(token_file, "--latency-token-file"))


def _error_of(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except (ValueError, OSError, AttributeError):
        return str(e.reason)
