"""Chat logs: round trip, atomic writes, clear errors for broken files (never overwritten)."""

import json

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.chat_log import ChatLog, ChatLogError, chat_path
from mlx_harmony_core.engine import Completion, Timings, Usage
from mlx_harmony_core.harmony import ToolCall


def _completion(text="Hi!", calls=()):
    return Completion(
        text,
        "thinking",
        list(calls),
        "tool_calls" if calls else "stop",
        Usage(5, 2, 1),
        Timings(ttft_s=0.1),
    )


def test_round_trip(tmp_path):
    log = ChatLog(model="demo", settings={"temperature": 0.5})
    log.add_user("hello")
    call = ToolCall("call_1", "get_time", '{"tz": "UTC"}')
    log.add_assistant(_completion("", [call]), model="demo", params=mhc.SamplingParams(top_k=3))
    log.add_tool_result("call_1", "get_time", "12:00")
    log.add_assistant(_completion("It is noon."), model="demo", params=None)
    path = tmp_path / "c.json"
    log.save(path)
    back = ChatLog.load(path)
    assert back == log.model_copy(update={"updated": back.updated})
    assert back.messages[1].params == {"top_k": 3}
    assert back.messages[1].usage["total_tokens"] == 7
    msgs = back.chat_messages()
    assert msgs[1]["tool_calls"][0]["name"] == "get_time" and msgs[1]["reasoning"] == "thinking"
    assert msgs[2] == {
        "role": "tool",
        "content": "12:00",
        "tool_call_id": "call_1",
        "name": "get_time",
    }
    # the logged conversation renders (tool result resolved by its call id)
    assert mhc.render_prompt(msgs)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"format": "mlx-harmony-core-chat", "version": 1, ', "corrupt"),
        ('{"hello": 1}', "not an mlx-harmony-core chat log"),
        ('{"format": "mlx-harmony-core-chat", "version": 99}', "upgrade"),
        (
            '{"format": "mlx-harmony-core-chat", "version": 1, "messages": [{"role": "bot"}]}',
            "messages.0.role",
        ),
        ('{"format": "mlx-harmony-core-chat", "version": 1, "surprise": 1}', "surprise"),
    ],
)
def test_broken_logs_give_clear_errors_and_stay_untouched(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ChatLogError, match=message):
        ChatLog.load(path)
    assert path.read_text() == content


def test_missing_log(tmp_path):
    with pytest.raises(ChatLogError, match="does not exist"):
        ChatLog.load(tmp_path / "none.json")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    log = ChatLog()
    log.add_user("one")
    log.save(path)
    before = path.read_text()
    log.add_user("two")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        log.save(path)
    assert path.read_text() == before  # the old version survives
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left


def test_chat_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_HARMONY_CORE_HOME", str(tmp_path))
    assert chat_path("work") == tmp_path / "chats" / "work.json"
    assert chat_path(str(tmp_path / "x.json")) == tmp_path / "x.json"
    with pytest.raises(ValueError, match="chat name"):
        chat_path("..")
    assert json.loads(ChatLog().model_dump_json())["version"] == 1
