"""The real-vLLM helpers that need no vLLM: configuration, command line, errors."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pytest

from concur.sim.realvllm import (
    BLOCK_SIZE,
    VllmServer,
    VllmServerConfig,
    VllmStartError,
    find_vllm_python,
    make_model,
)
from concur.sim.realvllm import cli as realvllm_cli
from concur.sim.realvllm.cli import config_from_args
from concur.sim.server.cli import register


def test_the_config_sizes_the_cache_in_blocks_and_leaves_one_free() -> None:
    cfg = VllmServerConfig(model=Path("/m"), kv_blocks=64)
    assert cfg.capacity_tokens == 64 * BLOCK_SIZE == 8192
    assert cfg.model_len == 63 * BLOCK_SIZE
    argv = cfg.argv("/py", 8123)
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    pairs = dict(itertools.pairwise(argv[3:]))
    assert pairs["--num-gpu-blocks-override"] == "64"
    assert pairs["--max-model-len"] == "8064"
    assert pairs["--max-num-batched-tokens"] == "2048" and pairs["--port"] == "8123"
    assert "--enable-prompt-tokens-details" in argv and "--enable-prefix-caching" in argv
    env = cfg.environment()
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ValueError, match=r"max_model_len must lie in \[1, 8064\]"):
        VllmServerConfig(model=Path("/m"), kv_blocks=64, max_model_len=8192)
    with pytest.raises(ValueError, match="kv_blocks must be >= 2"):
        VllmServerConfig(model=Path("/m"), kv_blocks=1)


def test_the_vllm_python_comes_from_the_environment_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONCUR_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert find_vllm_python() == "/opt/vllm/bin/python"


def test_no_vllm_anywhere_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    monkeypatch.delenv("CONCUR_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(
        "concur.sim.realvllm.server.Path.resolve", lambda self: tmp_path / "a" / "b" / "c"
    )
    with pytest.raises(VllmStartError, match="make vllm-venv"):
        find_vllm_python()


def test_a_failed_model_maker_reports_its_error(tmp_path: Path) -> None:
    # A Python without torch cannot make the model: the error carries its traceback.
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import no_such_module_here'\n")
    fake.chmod(0o755)
    with pytest.raises(VllmStartError, match="no_such_module_here"):
        make_model(str(fake))


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no vllm in here' >&2\nexit 3\n")
    fake.chmod(0o755)
    cfg = VllmServerConfig(model=tmp_path, kv_blocks=4, python=str(fake), startup_timeout=20)
    server = VllmServer(cfg, log_path=tmp_path / "vllm.log")
    with pytest.raises(VllmStartError, match="exited with code 3") as err:
        server.start()
    assert "no vllm in here" in str(err.value)
    assert not server.running()


def _engine_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["engine", "--vllm", *argv])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--speed", "20"), "--speed"),
        (("--fault-metrics", "500"), "--fault-metrics"),
        (("--kv-tokens", "100"), "--kv-tokens must be >= 256"),
    ],
)
def test_engine_vllm_refuses_what_only_the_simulated_engine_can_do(
    argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        config_from_args(_engine_args(*argv), python="/nonexistent/python")


def test_engine_vllm_starts_the_scheduling_policy_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(realvllm_cli, "make_model", lambda python: Path("/models/tiny"))
    for argv, policy in (((), "fcfs"), (("--scheduling-policy", "priority"), "priority")):
        config = config_from_args(_engine_args(*argv), python="/nonexistent/python")
        assert config.scheduling_policy == policy
        argv_out = config.argv("/nonexistent/python", 8000)
        assert argv_out[argv_out.index("--scheduling-policy") + 1] == policy
