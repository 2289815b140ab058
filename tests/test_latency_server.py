"""The latency server as a real process on the loopback address: refusals, limits, a client that
leaves, and searches that measure there while the server is killed or restarted."""

import csv
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import optuna
import pandas as pd
import pytest
from conftest import one_line_error

import nas.latency_client
from nas import latency
from nas.arch import load_architecture
from nas.host import cpu_name
from nas.interleaved import protocol_name
from nas.latency_client import LatencyClient, LatencyServerError
from nas.search import main as search
from nas.search.objective import REUSED_FROM_ATTR

TOKEN = "0123456789abcdef0123"
SMALL = {"name": "small", "stem": {"filters": 8, "kernel": 3, "stride": 2, "act": "relu"},
         "blocks": ["mb3_k3_s2_r1_c16"], "head": {"filters": 32, "act": "relu", "hidden": 0,
                                                  "dropout": 0.0}}


def start_server(token_file, port=0, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.latency", "serve", "--port", str(port), "--token-file",
         str(token_file), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = proc.stdout.readline()
    assert "on http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.strip().rsplit(" ", 1)[-1]


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token.txt"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def server(token_file):
    proc, url = start_server(token_file, 0, "--max-params", "3000000")
    yield url, proc
    proc.terminate()
    proc.wait(10)


def post(url, path, body, token=TOKEN, raw=None, headers=None):
    """(status, answer) of one request; `raw` sends bytes as they are."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={
        **({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})})
    response = conn.getresponse()
    answer = json.loads(response.read() or b"{}")
    conn.close()
    return response.status, answer


def measure_body(**over):
    return {"arch": SMALL, "num_classes": 10, "input_size": 32, "runtime": "eager",
            "min_time_s": 0.05, "max_time_s": 0.2, **over}


def test_a_measurement_comes_back_with_the_servers_context(server):
    url, _ = server
    client = LatencyClient(url, TOKEN)
    assert client.health()["device_name"] == cpu_name()
    result = client.measure(load_architecture("mobilenet_v3_small"), num_classes=10,
                            input_size=32, runtime="eager", min_time_s=0.05, max_time_s=0.2)
    assert result.median_ms > 0 and result.runs >= 3
    assert (result.context.device_name, result.context.runtime, result.context.input_size) == (
        cpu_name(), "eager", 32)
    assert client.context(input_size=32, runtime="eager") == result.context


def test_an_interleaved_measurement_says_its_reference(server):
    url, _ = server
    client = LatencyClient(url, TOKEN)
    arch = load_architecture("mobilenet_v3_small")
    first = client.measure(arch, num_classes=10, input_size=32, runtime="eager",
                           protocol="interleaved")
    assert first.context.protocol == protocol_name() and first.reference_ms > 0
    assert first.raw_ms > 0
    given = client.measure(arch, num_classes=10, input_size=32, runtime="eager",
                           protocol="interleaved", reference_ms=10.0)
    assert given.reference_ms == 10.0
    assert given.median_ms == pytest.approx(10.0 * first.median_ms / first.reference_ms,
                                            rel=0.3)  # the same ratio, another yardstick
    assert client.context(input_size=32, runtime="eager",
                          protocol="interleaved") == first.context
    # the warm runs a client asks for are the ones measured and named, 0 as before them
    cold = client.measure(arch, num_classes=10, input_size=32, runtime="eager",
                          protocol="interleaved", reference_ms=10.0, warm_runs=0)
    assert cold.context.protocol == "interleaved:mnasnet_a1"
    assert client.context(input_size=32, runtime="eager", protocol="interleaved",
                          warm_runs=3).protocol == "interleaved-warm3:mnasnet_a1"


@pytest.mark.parametrize("request_, status, fragment", [
    ({"token": None}, 401, "missing or wrong token"),
    ({"token": "x" * 20}, 401, "missing or wrong token"),
    ({"raw": b"{not json"}, 400, "not JSON"),
    ({"raw": b"[1, 2]"}, 400, "expected a JSON object"),
    ({"body": measure_body(arch={**SMALL, "blocks": ["mb3_k9_s1_r1_c16"]})}, 400, "kernel"),
    ({"body": measure_body(extra=1)}, 400, "unknown field 'extra'"),
    ({"body": measure_body(max_time_s=1e9)}, 400, "max_time_s"),
    ({"body": {**measure_body(), "arch": "mobilenet_v2"}}, 400, "arch: expected"),
    ({"body": measure_body(arch=load_architecture("mobilenet_v2").to_dict(), num_classes=1000)},
     422,
     "parameters; this server measures at most 3,000,000"),
    ({"body": measure_body(runtime="tflite")}, 422, "tflite"),
    ({"body": measure_body(protocol="rmit")}, 400, "protocol: one of"),
    ({"body": measure_body(protocol="interleaved", warm_runs=17)}, 400,
     "warm_runs: an integer from 0 to 16"),
    ({"raw": b"{}", "headers": {"Content-Length": str(2 << 20)}}, 413, "at most 1,048,576"),
])
def test_bad_requests_are_refused_with_one_line_and_the_server_keeps_serving(
        server, request_, status, fragment):
    url, proc = server
    got, answer = post(url, "/measure", request_.get("body", measure_body()),
                       token=request_.get("token", TOKEN), raw=request_.get("raw"),
                       headers=request_.get("headers"))
    assert got == status and fragment in answer["error"], answer
    assert post(url, "/measure", measure_body())[0] == 200  # still serving
    assert proc.poll() is None


def test_a_client_that_leaves_mid_measurement_does_not_stop_the_server(server):
    url, proc = server
    parts = urllib.parse.urlsplit(url)
    data = json.dumps(measure_body(min_time_s=0.5, max_time_s=1.0)).encode()
    with socket.create_connection((parts.hostname, parts.port)) as s:
        s.sendall(b"POST /measure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                  TOKEN.encode() + b"\r\nContent-Length: " + str(len(data)).encode() +
                  b"\r\n\r\n" + data)
        time.sleep(0.2)  # measuring now; the client goes
    status, answer = post(url, "/measure", measure_body())
    assert status == 200 and answer["median_ms"] > 0
    proc.terminate()
    log = proc.communicate(timeout=60)[1].splitlines()
    measures = [line for line in log if " POST /measure " in line]
    assert len(measures) == 2 and all(" 200 " in line for line in measures)  # one line each


def test_two_clients_are_measured_one_at_a_time(server):
    url, proc = server
    answers = []

    def one():
        answers.append(post(url, "/measure", measure_body(min_time_s=0.3, max_time_s=0.4)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a[0] for a in answers] == [200, 200]
    proc.terminate()
    log = [line.split() for line in proc.communicate(timeout=10)[1].splitlines()
           if " POST /measure " in line]
    # the second waited for the first: its request took at least the first's measuring time
    took = sorted(float(parts[parts.index("ms") - 1]) for parts in log)
    assert took[1] >= took[0] + 250


def test_the_server_refuses_to_start_without_a_real_token(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abc")
    assert latency.main(["serve", "--token-file", str(short), "--port", "0"]) == 2
    one_line_error(capsys, "nas.latency serve", "at least 16 characters")
    assert latency.main(["serve", "--token-file", str(tmp_path / "none"), "--port", "0"]) == 2
    one_line_error(capsys, "nas.latency serve", "cannot be read")



def test_the_server_refuses_an_address_it_cannot_listen_on_in_one_line(server, token_file,
                                                                        capsys):
    url, _ = server
    port = urllib.parse.urlsplit(url).port
    # the port the running server holds; then one out of range (was a traceback) and limits
    assert latency.main(["serve", "--token-file", str(token_file), "--port", str(port)]) == 2
    one_line_error(capsys, "nas.latency serve", f"--port {port}: cannot listen there")
    for flags, fragment in ((["--port", "65536"], "from 0 to 65535"),
                            (["--port", "0", "--max-params", "0"], "--max-params: 0 is too small"),
                            (["--port", "0", "--max-macs", "-1"], "--max-macs: -1 is too small")):
        with pytest.raises(SystemExit) as stop:
            latency.main(["serve", "--token-file", str(token_file), *flags])
        assert stop.value.code == 2
        one_line_error(capsys, "nas.latency serve", fragment)


def test_nas_latency_measures_on_the_server(server, token_file, capsys):
    url, _ = server
    assert latency.main(["mobilenet_v3_small", "--server", url, "--token-file", str(token_file),
                         "--runtime", "eager", "--input-size", "32", "--protocol", "single",
                         "--min-time", "0.05", "--max-time", "0.2"]) == 0
    assert "mobilenet_v3_small" in capsys.readouterr().out
    # by default interleaved, as the search: every row against the server's one calibration
    out = token_file.parent / "lat.csv"
    assert latency.main(["mobilenet_v3_small", "mobilenet_v2@0.5", "--server", url,
                         "--token-file", str(token_file), "--runtime", "eager", "--input-size",
                         "32", "--csv", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["mobilenet_v3_small", "mobilenet_v2@0.5"]
    assert "ratio to mnasnet_a1" in table[4]
    rows = list(csv.DictReader(out.open()))
    assert {r["protocol"] for r in rows} == {protocol_name()}
    assert rows[0]["reference_ms"] == rows[1]["reference_ms"]
    assert latency.main(["torchvision:resnet18", "--server", url, "--token-file",
                         str(token_file), "--runtime", "eager"]) == 2
    one_line_error(capsys, "nas.latency", "no description to send")



def test_python_m_nas_latency_refuses_a_wrong_token_in_one_line(server, tmp_path):
    # as users run it: `python -m nas.latency` executes the file as __main__, and the client
    # raises nas.latency's LatencyError, which that copy's `except` did not catch (a traceback)
    url, _ = server
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not-the-servers-token\n")
    for args, fragment in ((["--server", url, "--token-file", str(wrong)], "401"),
                           (["--server", url.split("//", 1)[1], "--token-file", str(wrong)],
                            "expected http://HOST:PORT")):
        got = subprocess.run([sys.executable, "-m", "nas.latency", "mobilenet_v3_small", *args],
                             capture_output=True, text=True, timeout=120)
        lines = got.stderr.strip().splitlines()
        assert got.returncode == 2 and len(lines) == 1 and "Traceback" not in got.stderr, got
        assert lines[0].startswith("nas.latency: error: ") and fragment in lines[0], lines


def test_a_server_address_is_checked_before_anything_is_asked(capsys):
    from nas.latency import LatencyError
    from nas.latency_client import connect, server_url

    assert server_url("http://device:8765/") == "http://device:8765"
    assert server_url("https://10.0.0.2") == "https://10.0.0.2"
    # without a scheme urllib calls it an unknown url type, which the client would retry
    # until its deadline as if the server were down
    for bad in ("device:8765", "127.0.0.1:8765", "ftp://device", "http://", "http://h:port"):
        with pytest.raises(LatencyError, match="--server .*expected http://HOST:PORT"):
            server_url(bad, "--server")
        with pytest.raises(LatencyError, match="latency server"):
            LatencyClient(bad, TOKEN)
    with pytest.raises(LatencyError, match="--latency-server 'device:8765'"):
        connect("device:8765", "token.txt")


TINY = ["--space", "tiny", "--val-size", "30", "--proxy-images", "64", "--proxy-batch", "32",
        "--input-size", "32", "--latency-time", "0.1", "--target-ms", "1", "--proxy-epochs",
        "1", "--runtime", "eager", "--sampler", "random", "--latency-protocol", "single"]


def study_of(runs, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / name / 'study.db'}")


def test_a_search_measures_on_the_server_and_a_dead_server_fails_only_its_trials(
        image_folder, token_file, tmp_path, monkeypatch):
    proc, url = start_server(token_file)
    flags = [*TINY, "--data", str(image_folder), "--runs-dir", str(tmp_path), "--name", "s",
             "--latency-server", url, "--latency-token-file", str(token_file)]
    try:
        assert search([*flags, "--trials", "2"]) == 0
    finally:
        proc.terminate()
        log = proc.communicate(timeout=10)[1]
    front = pd.read_csv(tmp_path / "s" / "front_latency.csv")  # re-measured at the end
    assert log.count(" POST /measure ") == len({t.user_attrs["arch"]
                                                 for t in study_of(tmp_path).trials}) + len(front)
    meta = json.loads((tmp_path / "s" / "run.json").read_text())
    assert meta["settings"]["latency_device"] == cpu_name()  # the server's
    # the server is gone: the search starts (its context was cached? no: it is asked) ...
    monkeypatch.setattr(nas.latency_client, "RETRY_DEADLINE_S", 1.0)
    assert search([*flags, "--trials", "3"]) == 2  # ... and cannot: one line, nothing run
    # a server that goes away mid-search fails the trials it should measure; the search goes on
    proc, url = start_server(token_file, urllib.parse.urlsplit(url).port)
    calls = []
    real = nas.latency_client.LatencyClient.measure

    def kill_after_context(self, *a, **kw):
        calls.append(1)
        proc.kill()
        proc.wait(10)
        return real(self, *a, **kw)

    monkeypatch.setattr(nas.latency_client.LatencyClient, "measure", kill_after_context)
    assert search([*flags, "--trials", "4"]) == 0
    trials = study_of(tmp_path).trials
    # every new trial that had to be measured failed; one whose architecture the study had
    # evaluated takes that result without asking the server (GP may propose it again)
    measured = [t for t in trials[2:] if REUSED_FROM_ATTR not in t.user_attrs]
    reused = [t for t in trials[2:] if REUSED_FROM_ATTR in t.user_attrs]
    assert measured and all(t.state == optuna.trial.TrialState.FAIL
                            and "LatencyServerError" in t.user_attrs["fail_reason"]
                            and "no answer" in t.user_attrs["fail_reason"] for t in measured)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials[:2] + reused)
    assert pd.read_csv(tmp_path / "s" / "trials.csv").shape[0] == 4


def test_a_server_restarting_within_the_deadline_is_waited_for(image_folder, token_file,
                                                                tmp_path, monkeypatch, capsys):
    proc, url = start_server(token_file)
    port = urllib.parse.urlsplit(url).port
    client = LatencyClient(url, TOKEN, deadline_s=30)
    proc.terminate()
    proc.wait(10)
    restarted = []
    timer = threading.Timer(1.0, lambda: restarted.append(start_server(token_file, port)[0]))
    timer.start()
    try:
        result = client.measure(load_architecture("mobilenet_v3_small"), num_classes=10,
                                input_size=32, runtime="eager", min_time_s=0.05,
                                max_time_s=0.2)
        assert result.median_ms > 0
    finally:
        timer.join()
        for p in restarted:
            p.terminate()
            p.wait(10)
    capsys.readouterr()
    with pytest.raises(LatencyServerError, match="no answer after"):
        LatencyClient(url, TOKEN, deadline_s=1).health()
    # the wait is said once, when it starts (a server that is down looks like a hang)
    waiting = capsys.readouterr().err.strip().splitlines()
    assert len(waiting) == 1 and "no answer" in waiting[0] and "up to 1 s" in waiting[0]
