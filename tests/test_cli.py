"""The command line, run as users run it."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, check=True):
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, check=check, env=os.environ, timeout=300
    )


def test_generate_on_demo_prints_text_and_speed():
    out = run(
        "generate", "--model", "demo", "--prompt", "Hello", "--max-tokens", "8", "--seed", "1"
    )
    assert "tok/s" in out.stderr
    assert out.stdout.strip()


def test_generate_json():
    out = run("generate", "--prompt", "Hello", "--max-tokens", "5", "--temperature", "0", "--json")
    data = json.loads(out.stdout)
    assert data["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5


def test_make_test_model(tmp_path):
    out = run(
        "make-test-model",
        str(tmp_path / "m"),
        "--layers",
        "2",
        "--hidden-size",
        "32",
        "--experts",
        "2",
        "--experts-per-token",
        "1",
        "--head-dim",
        "8",
    )
    assert "wrote" in out.stdout
    assert (tmp_path / "m" / "config.json").exists()
    again = run("make-test-model", str(tmp_path / "m"), check=False)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
    ],
)
def test_cli_errors_are_clear(args, message):
    out = run(*args, check=False)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_bench_command_compares_with_mlx_lm():
    out = run(
        "bench", "--model", "demo", "--prompt-tokens", "16", "--gen-tokens", "4", "--runs", "1"
    )
    assert "speed-up decode" in out.stdout and "mlx-lm" in out.stdout
    assert "outside the forward pass" in out.stdout


def test_info_and_help_work():
    assert "bench" in run("--help").stdout


def test_every_sampling_control_is_a_flag():
    from mlx_harmony_core.cli import build_parser
    from mlx_harmony_core.config import SamplingParams

    args = build_parser().parse_args(
        [
            "generate",
            "--logit-bias",
            "5:-100,7:2.5",
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--min-p",
            "0.05",
            "--min-tokens-to-keep",
            "2",
            "--xtc-probability",
            "0.5",
            "--xtc-threshold",
            "0.2",
            "--repetition-penalty",
            "1.1",
            "--repetition-context-size",
            "32",
            "--presence-penalty",
            "0.5",
            "--frequency-penalty",
            "0.2",
            "--temperature",
            "0.8",
            "--seed",
            "3",
        ]
    )
    fields = set(SamplingParams.model_fields)
    assert fields <= set(vars(args))
    out = run(
        "generate",
        "--prompt",
        "Hi",
        "--max-tokens",
        "3",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.1",
        "--logit-bias",
        '{"13": 1.5}',
        "--json",
    )
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 3
    bad = run("generate", "--prompt", "Hi", "--logit-bias", "x:y", check=False)
    assert bad.returncode == 2 and "ID:BIAS" in bad.stderr


def test_real_model_commands(smollm2_path, tmp_path):
    """fetch-test-model prints the cached file; convert writes an mlx-lm directory; generate
    and --json-schema run on the GGUF file itself."""
    out = run("fetch-test-model")
    assert out.stdout.strip() == str(smollm2_path)
    out = run("convert", str(smollm2_path), str(tmp_path / "smol"))
    assert (tmp_path / "smol" / "config.json").is_file()
    assert run("convert", str(smollm2_path), str(tmp_path / "smol"), check=False).returncode
    out = run(
        "generate",
        "-m",
        str(smollm2_path),
        "--dequantize",
        "-p",
        "What is the capital of France? Answer in JSON.",
        "--temperature",
        "0",
        "--json-schema",
        '{"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},'
        ' "required": ["capital"], "additionalProperties": false}',
    )
    assert json.loads(out.stdout)["capital"] == "Paris"


def test_structured_flags_and_errors():
    out = run("generate", "-p", "x", "--regex", "[0-9]{4}", "--max-reasoning-tokens", "0")
    assert out.stdout.strip().isdigit() and len(out.stdout.strip()) == 4
    bad = run("generate", "-p", "x", "--regex", "(", check=False)
    assert bad.returncode != 0 and "cannot be enforced" in bad.stderr
    bad = run("generate", "-p", "x", "--max-reasoning-tokens", "-1", check=False)
    assert bad.returncode != 0 and "max-reasoning-tokens" in bad.stderr


def test_speculative_flags():
    out = run(
        "generate",
        "-p",
        "hi",
        "--max-tokens",
        "12",
        "--speculative",
        "draft",
        "--draft-model",
        "demo",
        "--temperature",
        "0",
    )
    assert "drafts" in out.stderr and "kept" in out.stderr
    plain = run("generate", "-p", "hi", "--max-tokens", "12", "--temperature", "0")
    assert out.stdout == plain.stdout
    bad = run("generate", "-p", "hi", "--draft-model", "demo", check=False)
    assert bad.returncode != 0 and "--speculative" in bad.stderr
