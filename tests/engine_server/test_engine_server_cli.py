"""``concur engine``'s command line: flags, errors, and a real process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import httpx
import pytest

from concur.sim.server import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="concur")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["engine", *argv])


def test_flags_build_the_config() -> None:
    args = parse(
        "--model", "llama-3-8b", "--tp", "1", "--kv-tokens", "100000", "--max-num-seqs", "64",
        "--speed", "20", "--model-name", "served", "--fault-metrics", "garbage",
        "--chunk-interval", "0",
    )  # fmt: skip
    assert args.func is cli.run
    config = cli.config_from_args(args)
    assert config.speed == 20.0
    assert config.served_model_name == "served"
    assert config.spec.kv_capacity_tokens == 100_000
    assert config.spec.max_num_seqs == 64
    assert config.faults.metrics == "garbage" and config.faults.completions is None
    assert config.chunk_interval == 0.0
    assert cli.config_from_args(parse()).served_model_name == "concur-sim/qwen3-32b"


def test_a_preset_is_the_measured_engine() -> None:
    config = cli.config_from_args(parse("--preset", "cpu-tiny", "--kv-tokens", "16384"))
    assert config.spec.preset == "cpu-tiny"
    assert config.spec.kv_capacity_tokens == 16_384
    assert (config.spec.block_size, config.spec.max_num_batched_tokens) == (128, 2048)
    assert config.spec.build().block_size == 128
    assert config.spec.scheduling_policy == config.spec.build().scheduling_policy == "fcfs"
    args = parse("--preset", "cpu-tiny", "--scheduling-policy", "priority")
    assert cli.config_from_args(args).spec.build().scheduling_policy == "priority"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--model", "gpt-5"), "unknown model 'gpt-5'"),
        (("--preset", "h100-huge"), "unknown engine preset 'h100-huge'"),
        (("--speed", "0"), "speed must be a positive number"),
        (("--kv-tokens", "10"), "kv_capacity_tokens must be >= 32"),
        (("--default-max-tokens", "0"), "default_max_tokens must be >= 1"),
        (("--chunk-interval", "-1"), "chunk_interval must be >= 0 seconds"),
    ],
)
def test_bad_flags_give_a_clear_error(
    argv: tuple[str, ...], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("concur engine: error: ") and words in err


def test_the_command_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "concur.sim.server.cli", "--port", "0", "--model", "llama-3-8b",
         "--tp", "1", "--kv-tokens", "20000", "--speed", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("concur engine: serving concur-sim/llama-3-8b at http://127.0.0.1:")
        assert "KV capacity 20,000 tokens, speed 50x" in line
        url = line.split(" at ")[1].split()[0]
        with httpx.Client(base_url=url, trust_env=False, timeout=10.0) as client:
            assert client.get("/health").status_code == 200
            resp = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
            assert resp.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        assert "listening" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
