"""The chat page at ``/``, driven in a real headless browser (Debian's chromium + chromedriver
through Selenium, never Selenium Manager) against the demo model, a scripted model and the
real SmolLM2. Without the browser these tests skip locally and fail in CI (``CI`` set).

Screenshots at desktop and phone widths go to ``$MHC_WEB_SCREENSHOTS`` (else a pytest temp
folder); the run prints where.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.chat_log import ChatLog, chat_path
from mlx_harmony_core.cli import build_parser
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.testing import ScriptedModel, ServerThread
from mlx_harmony_core.web import FILES, page_size

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "sk-web-test"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
THINK = "<|channel|>analysis<|message|>Let me think about the greeting carefully.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Hello world, nice to meet you.<|return|>"
CALL = (
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary"
    ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need {why} (CI: install chromium and chromium-driver)")
    pytest.skip(f"no {why}")


class SlowScripted(ScriptedModel):
    """A scripted model that takes ``delay`` seconds per forward pass, so a reply streams."""

    delay = 0.0

    def __call__(self, inputs: Any, cache: Any = None) -> Any:
        time.sleep(self.delay)
        return super().__call__(inputs, cache)


def script(model: ScriptedModel, encoding: Any, *replies: str) -> None:
    model.replies = [list(encoding.encode(r, allowed_special="all")) for r in replies]
    model.requests = 0


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium (pip install -e '.[test]')")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        _unavailable("chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,800")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory) -> Path:
    where = os.environ.get("MHC_WEB_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("web-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nweb page screenshots: {folder}")
    return folder


class Served:
    """A server in this process, with a record of the scheduler's handles (one a request)."""

    def __init__(self, engine: Any, options: ServerOptions) -> None:
        self.thread = ServerThread(engine, options)
        self.handles: list[Any] = []
        scheduler = self.thread.server.config.app.client.scheduler
        submit = scheduler.submit

        def recording(*args: Any, **kwargs: Any) -> Any:
            handle = submit(*args, **kwargs)
            self.handles.append(handle)
            return handle

        scheduler.submit = recording
        self.url = self.thread.__enter__()

    def close(self) -> None:
        self.thread.__exit__(None, None, None)


@pytest.fixture(scope="module")
def demo():
    served = Served(mhc.load("demo"), ServerOptions(model_name="demo"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def scripted(encoding):
    model = SlowScripted(replies=[[]])
    engine = mhc.Engine(model, encoding=encoding, context_length=4096)
    served = Served(engine, ServerOptions(model_name="scripted"))
    served.model = model  # type: ignore[attr-defined]
    yield served
    served.close()


# -- helpers ---------------------------------------------------------------------------------


def wait(driver: Any, condition: Any, timeout: float = 20, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(), message=what
    )


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait(driver, lambda: driver.execute_script("return document.body.dataset.ready"), what="ready")
    # Record every request body the page sends (a wrapper the page's own code calls through).
    driver.execute_script(
        "window.__bodies = []; const f = window.fetch;"
        "window.fetch = (u, i) => { if (i && i.body) window.__bodies.push(JSON.parse(i.body));"
        " return f(u, i); };"
    )


def bodies(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script("return window.__bodies")


def send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "message")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def busy(driver: Any) -> bool:
    return not driver.execute_script("return document.getElementById('stop').disabled")


def wait_done(driver: Any, timeout: float = 30) -> None:
    wait(driver, lambda: not busy(driver), timeout, "the reply to finish")


def messages(driver: Any) -> list[dict[str, Any]]:
    return driver.execute_script(
        "const s = window.mhc.state; return s.current ? s.convs[s.current].messages : [];"
    )


def shown(driver: Any) -> list[dict[str, str]]:
    """What the conversation view shows: role, text, reasoning, stats of each message."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(m => ({"
        " role: m.classList[1], text: m.querySelector('.content').textContent,"
        " reasoning: (m.querySelector('.reasoning-text') || {}).textContent || '',"
        " stats: (m.querySelector('.stats') || {}).textContent || ''}))"
    )


def setting(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    if driver.find_element(By.ID, "settings").get_attribute("hidden") is not None:
        driver.find_element(By.ID, "settings-toggle").click()
    field = driver.find_element(By.ID, f"set-{name}")
    field.clear()
    if value:
        field.send_keys(value)


def error_text(driver: Any) -> str:
    return driver.execute_script(
        "const e = document.getElementById('error'); return e.hidden ? '' : e.textContent"
    )


def screenshot(driver: Any, folder: Path, name: str) -> list[Path]:
    """The page at 1280x800 and at a phone's 390x844."""
    out = []
    for label, width, height, mobile in (("desktop", 1280, 800, False), ("phone", 390, 844, True)):
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )
        time.sleep(0.15)
        path = folder / f"{name}-{label}.png"
        assert driver.save_screenshot(str(path))
        out.append(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return out


# -- without a browser -----------------------------------------------------------------------


def test_page_is_small_self_contained_and_guarded(demo, encoding):
    assert page_size() < 100_000
    package = Path(mhc.__file__).parent / "web"
    for name in FILES:  # shipped in the package (the wheel takes the package folder whole)
        assert (package / name).is_file()
    html = (package / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    r = httpx.get(demo.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert httpx.get(demo.url + "/web/app.js").status_code == 200
    assert "/" not in httpx.get(demo.url + "/openapi.json").json()["paths"]
    # The page's own POSTs (same origin) pass the origin check; other origins do not.
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    same = httpx.post(demo.url + "/v1/chat/completions", json=body, headers={"Origin": demo.url})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    form = httpx.post(
        demo.url + "/v1/chat/completions",
        content=json.dumps(body),
        headers={"Origin": demo.url, "Content-Type": "text/plain"},
    )
    assert form.status_code == 415  # a same-origin POST is still JSON only
    other = httpx.post(
        demo.url + "/v1/chat/completions", json=body, headers={"Origin": "http://evil.example"}
    )
    assert other.status_code == 403
    # --no-web: no page, and no same-origin exemption
    assert build_parser().parse_args(["serve", "--no-web"]).no_web is True
    assert build_parser().parse_args(["serve"]).no_web is False
    engine = mhc.Engine(ScriptedModel(), encoding=encoding, context_length=256)
    with ServerThread(engine, ServerOptions(model_name="x", web=False)) as url:
        assert httpx.get(url + "/").status_code == 404
        assert httpx.get(url + "/web/app.js").status_code == 404
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Origin": url})
        assert r.status_code == 403


# -- in the browser ----------------------------------------------------------------------------


def test_stream_stop_settings_errors_and_reload(browser, demo, shots):
    d = browser
    open_page(d, demo.url)
    assert d.find_element("id", "model-name").text == "Model: demo"
    # Settings come from the server's schema, with its limits.
    setting(d, "max_tokens", "2000")
    setting(d, "temperature", "0.5")
    temp = d.find_element("id", "set-temperature")
    assert (temp.get_attribute("min"), temp.get_attribute("max")) == ("0", "2")
    assert d.find_element("id", "set-max_tokens").get_attribute("max") == "32768"

    # Send: the text streams in (several sizes seen), then Escape stops it mid-stream.
    send(d, "Hello")
    sizes: set[int] = set()
    deadline = time.monotonic() + 30
    while len(sizes) < 3 and time.monotonic() < deadline:
        shown_now = shown(d)
        if len(shown_now) == 2 and shown_now[1]["text"]:
            sizes.add(len(shown_now[1]["text"]))
        time.sleep(0.05)
    assert len(sizes) >= 3 and busy(d)
    from selenium.webdriver.common.keys import Keys

    d.find_element("id", "message").send_keys(Keys.ESCAPE)
    wait_done(d, 10)
    sent = bodies(d)[-1]
    assert sent["max_tokens"] == 2000 and sent["temperature"] == 0.5 and sent["stream"] is True
    handle = demo.handles[-1]
    assert handle._done.wait(10), "the server kept generating after the page stopped"
    assert handle.cancelled and handle.completion.finish_reason == "cancelled"
    assert handle.completion.usage.completion_tokens < 2000
    reply = messages(d)[-1]
    assert reply["finish_reason"] == "cancelled" and reply["content"]
    assert "stopped" in shown(d)[-1]["stats"]

    # The next request works; per-reply stats.
    setting(d, "max_tokens", "6")
    send(d, "Again, briefly")
    wait_done(d)
    assert bodies(d)[-1]["max_tokens"] == 6
    last = messages(d)[-1]
    assert last["usage"]["completion_tokens"] <= 6 and "cached_prompt_tokens" in last["usage"]
    stats = shown(d)[-1]["stats"]
    assert "TTFT" in stats and "cached" in stats, stats
    assert error_text(d) == ""

    # A bad setting: the server's own 400 text, and no empty reply left behind.
    setting(d, "temperature", "5")
    before = len(messages(d))
    send(d, "Too hot")
    wait(d, lambda: error_text(d), what="an error")
    direct = httpx.post(demo.url + "/v1/chat/completions", json={**bodies(d)[-1], "stream": True})
    assert direct.status_code == 400
    assert error_text(d) == "400: " + direct.json()["error"]["message"]
    assert "temperature" in error_text(d)
    assert len(messages(d)) == before + 1  # the user's message, no empty reply
    setting(d, "temperature", "")
    screenshot(d, shots, "demo-error")

    # A reload keeps the conversation (and the settings).
    before = shown(d)
    d.refresh()
    wait(d, lambda: d.execute_script("return document.body.dataset.ready"))
    assert shown(d) == before
    assert d.find_element("id", "set-max_tokens").get_attribute("value") == "6"


def test_reasoning_tools_regenerate_edit_and_export(browser, scripted, encoding, shots, tmp_path):
    d, model = browser, scripted.model
    model.delay = 0.03  # ~30 tokens/s: the reply streams
    script(model, encoding, THINK + FINAL)
    open_page(d, scripted.url)
    # Watch the reply as it streams: reasoning visible (open) before the answer starts.
    d.execute_script(
        "window.__seen = []; new MutationObserver(() => {"
        " const m = [...document.querySelectorAll('#log .msg.assistant')].pop(); if (!m) return;"
        " const det = m.querySelector('details');"
        " window.__seen.push([m.querySelector('.reasoning-text').textContent.length,"
        "  m.querySelector('.content').textContent.length, det.open && !det.hidden]);"
        "}).observe(document.getElementById('log'),"
        " {subtree: true, childList: true, characterData: true});"
    )
    send(d, "Hi")
    wait_done(d)
    seen = d.execute_script("return window.__seen")
    full = len("Let me think about the greeting carefully.")
    assert any(0 < r < full and c == 0 and visible for r, c, visible in seen), seen
    assert any(r == full and c > 0 for r, c, _ in seen)
    view = shown(d)[-1]
    assert view["text"] == "Hello world, nice to meet you."
    assert view["reasoning"] == "Let me think about the greeting carefully."

    # Tools: the call is shown, its result is typed in and sent back, the answer follows.
    model.delay = 0.0
    setting(d, "tools", json.dumps([WEATHER]))
    script(model, encoding, CALL, "<|channel|>final<|message|>Sunny in Paris.<|return|>", "x", "y")
    send(d, "Weather in Paris?")
    wait_done(d)
    assert bodies(d)[-1]["tools"] == [WEATHER]
    call = messages(d)[-1]["tool_calls"][0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert 'get_weather({"city": "Paris"})' in d.find_element("css selector", ".call code").text
    result = d.find_element("id", "result-" + call["id"])
    result.send_keys('{"sky": "sunny"}')
    d.find_element("css selector", ".call form button").click()
    wait(d, lambda: shown(d)[-1]["text"] == "Sunny in Paris.", what="the answer after the tool")
    wait_done(d)
    tool_msg = bodies(d)[-1]["messages"][-1]
    assert tool_msg == {
        "role": "tool",
        "content": '{"sky": "sunny"}',
        "tool_call_id": call["id"],
        "name": "get_weather",
    }
    d.find_element("id", "settings-toggle").click()  # closed: the whole conversation
    paths = screenshot(d, shots, "conversation")
    assert all(p.stat().st_size > 5000 for p in paths)

    # Export: the chat-log JSON the CLI's own loader reads, and the engine renders.
    exported = tmp_path / "exported.json"
    exported.write_text(d.execute_script("return window.mhc.exportLog()"))
    log = ChatLog.load(chat_path(str(exported)))
    assert [m.role for m in log.messages] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert log.messages[1].reasoning == "Let me think about the greeting carefully."
    assert log.messages[3].tool_calls[0].name == "get_weather"
    assert log.messages[5].usage["completion_tokens"] > 0 and log.model == "scripted"
    assert mhc.Engine(ScriptedModel(), encoding=encoding).render(log.chat_messages())
    # ... and `chat --chat FILE` resumes it and goes on (with the demo model).
    out = subprocess.run(
        [sys.executable, "-m", "mlx_harmony_core.cli", "chat", "--chat", str(exported)]
        + ["--model", "demo", "--max-tokens", "3"],
        input="And tomorrow?\n\\quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "resumed 6 messages" in out.stdout + out.stderr, out.stderr
    resumed = ChatLog.load(exported)
    assert resumed.id == log.id and len(resumed.messages) == 8

    # Regenerate: the last reply is replaced.
    count = len(messages(d))
    script(model, encoding, "<|channel|>final<|message|>Regenerated.<|return|>")
    d.find_element("id", "regen").click()
    wait(d, lambda: shown(d)[-1]["text"] == "Regenerated.", what="the regenerated reply")
    wait_done(d)
    assert len(messages(d)) == count
    assert bodies(d)[-1]["messages"][-1]["role"] == "tool"

    # Edit and resend: the first message is replaced and everything after it dropped.
    script(model, encoding, "<|channel|>final<|message|>Edited.<|return|>")
    d.find_element("css selector", "#log .msg.user .actions button").click()
    box = d.find_element("id", "message")
    assert box.get_attribute("value") == "Hi"
    send(d, "Hi, edited")
    wait_done(d)
    assert [(m["role"], m["text"]) for m in shown(d)] == [
        ("user", "Hi, edited"),
        ("assistant", "Edited."),
    ]
    setting(d, "tools", "")


def test_api_key_is_asked_once(browser, encoding):
    d = browser
    model = ScriptedModel(
        replies=[
            list(encoding.encode("<|channel|>final<|message|>Hi.<|return|>", allowed_special="all"))
        ]
    )
    engine = mhc.Engine(model, encoding=encoding, context_length=1024)
    with ServerThread(engine, ServerOptions(model_name="keyed", api_key=KEY)) as url:
        from selenium.webdriver.common.keys import Keys

        asked = "return document.getElementById('key-dialog').open"
        d.get(url + "/")
        wait(d, lambda: d.execute_script(asked), what="the key dialog")
        d.find_element("id", "key").send_keys(Keys.ESCAPE)  # no key: the server's 401 text
        wait(d, lambda: "invalid or missing API key" in error_text(d), what="the 401")
        d.refresh()
        wait(d, lambda: d.execute_script(asked), what="the key dialog")
        d.find_element("id", "key").send_keys(KEY + "\n")
        wait(d, lambda: d.execute_script("return document.body.dataset.ready"))
        assert d.find_element("id", "model-name").text == "Model: keyed"
        assert d.execute_script("return sessionStorage.getItem('mhc.key')") == KEY
        # Keyboard: Shift+Enter is a new line (nothing sent), Enter sends.

        box = d.find_element("id", "message")
        box.send_keys("one", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "two")
        assert box.get_attribute("value") == "one\ntwo" and not busy(d) and not messages(d)
        send(d, "Hello")
        wait_done(d)
        assert shown(d)[-1]["text"] == "Hi." and error_text(d) == ""
        d.refresh()  # kept for the tab: not asked again
        wait(d, lambda: d.execute_script("return document.body.dataset.ready"))
        assert not d.execute_script("return document.getElementById('key-dialog').open")
        d.execute_script("sessionStorage.clear()")


@pytest.mark.slow
def test_real_smollm2_answers_in_the_page(browser, smollm2_path, shots):
    d = browser
    engine = mhc.load(smollm2_path)
    with ServerThread(engine, ServerOptions(model_name="smollm2")) as url:
        open_page(d, url)
        setting(d, "temperature", "0")
        setting(d, "max_tokens", "24")
        send(d, "What is the capital of France?")
        wait_done(d, 120)
        text = shown(d)[-1]["text"]
        assert error_text(d) == ""
        d.find_element("id", "settings-toggle").click()  # closed: the answer in view
        screenshot(d, shots, "smollm2")
    assert re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}", text), text
    assert re.fullmatch(r"[\x20-\x7e\s\u2019]+", text), text
    assert "Paris" in text  # greedy: "The capital of France is Paris."
