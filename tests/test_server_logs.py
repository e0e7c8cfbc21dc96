"""Request logs: one record per finished request; ``serve --log-format json``."""

import json
import logging
import subprocess
import sys

import httpx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.cli import build_parser
from mlx_harmony_core.cli.common import option_values
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.requestlog import LOGGER_NAME, JSONFormatter
from mlx_harmony_core.testing import ServerThread, free_port

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url():
    engine = mhc.load("demo")
    with ServerThread(engine, ServerOptions(model_name="demo")) as u:
        yield u


def requests(caplog) -> list[dict]:
    return [r.request for r in caplog.records if r.name == LOGGER_NAME]


def test_one_record_per_finished_request(url, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    body = {"messages": MSG, "max_tokens": 4, "n": 2}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    usage = r.json()["usage"]
    stream = {"messages": MSG, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=stream) as s:
        assert s.status_code == 200
        rid = s.headers["x-request-id"]
        s.read()
    assert httpx.post(url + "/v1/chat/completions", json={"messages": []}).status_code == 400
    logged = requests(caplog)
    assert len(logged) == 3
    first, second, bad = logged
    assert first["id"] == "abc-1" and first["model"] == "demo" and first["status"] == 200
    assert first["endpoint"] == "/v1/chat/completions" and first["method"] == "POST"
    assert first["prompt_tokens"] == 2 * usage["prompt_tokens"]  # each choice prefills
    assert first["generated_tokens"] == usage["completion_tokens"] == 8
    assert first["finish_reason"] == "length" and first["ttft_s"] > 0
    assert first["duration_s"] >= first["ttft_s"] and first["client"].startswith("127.0.0.1:")
    assert second["id"] == rid.strip() and second["generated_tokens"] == 3
    assert bad["status"] == 400 and "generated_tokens" not in bad


def test_json_formatter_writes_one_object_per_line(url, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    record = next(r for r in caplog.records if r.name == LOGGER_NAME)
    line = JSONFormatter().format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["event"] == "request" and obj["endpoint"] == "/v1/completions"
    assert obj["generated_tokens"] == 2 and obj["level"] == "info" and obj["status"] == 200
    plain = JSONFormatter().format(logging.makeLogRecord({"msg": "x %s", "args": (1,)}))
    assert json.loads(plain)["message"] == "x 1"


def test_log_format_flag():
    args = build_parser().parse_args(["serve", "--log-format", "json"])
    assert option_values(args, ServerOptions)["log_format"] == "json"
    assert option_values(build_parser().parse_args(["serve"]), ServerOptions)["log_format"] == (
        "text"
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-format", "xml"])


@pytest.mark.slow
def test_serve_log_format_json(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "--model", "demo"]
    cmd += ["--port", str(port), "--log-format", "json", "--no-web"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving demo" in proc.stdout.readline()
        body = {"prompt": "a", "max_tokens": 2}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        while True:
            line = proc.stderr.readline()
            assert line, "no request line"
            obj = json.loads(line)  # every line is JSON
            if obj.get("event") == "request":
                break
        assert obj["generated_tokens"] == 2 and obj["endpoint"] == "/v1/completions"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
