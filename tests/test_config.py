"""Configuration: defaults, every source, precedence, clear errors, example and show."""

from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from pydantic import ValidationError

from concur._cli_config import add_config_arguments, parse_listen, settings_from_args
from concur._idle import IdleRule
from concur.cli import main
from concur.config import (
    AdmissionSettings,
    ConfigError,
    ControlSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
    explain,
    iter_fields,
    load_settings,
    parse_set_value,
    render_effective,
    render_example,
)
from concur.policies import AIMDParams, FitParams, PolicySettings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CONCUR_* variable from the outer environment may leak into a test."""
    for name in list(os.environ):
        if name.upper().startswith("CONCUR_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``concur ARGV`` in-process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- defaults


def test_defaults() -> None:
    s = load_settings(env={})
    assert s.upstream.url == "http://127.0.0.1:8000"
    assert s.upstream.connect_timeout == 2.0
    assert s.upstream.first_byte_timeout == 600.0
    assert s.upstream.read_timeout == 600.0
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 9000
    assert s.server.max_body_bytes == 32 * 1024 * 1024
    assert s.server.drain_timeout == 30.0
    assert s.server.admin_token is None
    assert s.server.log_format == "text"
    assert s.server.log_level == "info"
    assert s.engine.kind == "vllm"
    assert s.engine.metrics_url is None
    assert (s.engine.poll_interval, s.engine.poll_timeout, s.engine.stale_after) == (0.5, 2.0, 3.0)
    assert s.control.interval == 1.0
    assert s.control.failure_mode == "hold"
    assert s.admission.identity == [
        "header:X-Concur-Agent-Id",
        "header:X-Session-Id",
        "header:session_id",
        "body:session_id",
    ]
    assert s.admission.anonymous == "bypass"
    assert s.admission.done_header == "X-Concur-Agent-Done"
    assert s.admission.idle_timeout == 300.0
    assert s.admission.idle_timeout_min == 15.0
    assert s.admission.idle_pause_factor == 4.0
    assert s.admission.idle_timeout_new == 30.0
    assert s.admission.disconnect_grace == 5.0
    assert s.admission.max_queue_wait == 60.0
    assert s.admission.retry_after == 5.0
    assert s.admission.max_queue_len == 10000
    assert s.admission.max_identity_bytes == 256
    assert s.policy.name == "aimd"
    assert s.policy.aimd.high == 0.85
    assert s.policy.aimd.low == 0.75


def test_derived_values() -> None:
    s = load_settings(env={}, overrides={"upstream.url": "http://vllm:8000/"})
    assert s.upstream.url == "http://vllm:8000"  # trailing slash dropped
    assert s.metrics_url() == "http://vllm:8000/metrics"
    s = load_settings(env={}, overrides={"engine.kind": "llamacpp"})
    assert s.metrics_url() == "http://127.0.0.1:8000/slots"
    s = load_settings(env={}, overrides={"engine.metrics_url": "http://m:9/x"})
    assert s.metrics_url() == "http://m:9/x"
    assert s.gate_options() == {
        "max_queue_len": 10000,
        "max_queue_wait": 60.0,
        "retry_after": 5.0,
        "idle": IdleRule(
            longest=300.0, shortest=15.0, factor=4.0, first=30.0, disconnect_grace=5.0
        ),
    }
    assert s.admission.identity_sources()[0] == ("header", "X-Concur-Agent-Id")
    assert s.admission.identity_sources()[-1] == ("body", "session_id")


# ----------------------------------------------------------------------- sources


def test_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
        [upstream]
        url = "https://engine.example:8443"
        read_timeout = 120
        [server]
        port = 9100
        log_format = "json"
        [admission]
        identity = ["header:X-Run", "body:user"]
        [policy]
        name = "static:12"
        [policy.aimd]
        high = 0.9
        """.replace("        ", ""),
    )
    s = load_settings(path, env={})
    assert s.upstream.url == "https://engine.example:8443"
    assert s.upstream.read_timeout == 120.0
    assert s.server.port == 9100
    assert s.server.log_format == "json"
    assert s.admission.identity == ["header:X-Run", "body:user"]
    assert s.policy.name == "static:12"
    assert s.policy.aimd.high == 0.9
    assert s.policy.aimd.low == 0.75  # untouched fields keep their defaults
    assert s.server.host == "127.0.0.1"


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_file(tmp_path: Path, suffix: str) -> None:
    path = write(
        tmp_path / f"c{suffix}",
        "engine:\n  kind: sglang\n  poll_interval: 0.25\n"
        "control:\n  failure_mode: closed\n"
        "policy:\n  aimd:\n    pressure: [kv]\n"
        "server:\n",  # a section whose children are all commented out reads as null
    )
    s = load_settings(path, env={})
    assert s.engine.kind == "sglang"
    assert s.engine.poll_interval == 0.25
    assert s.control.failure_mode == "closed"
    assert s.policy.aimd.pressure == ("kv",)
    assert s.server == ServerSettings()


def test_env_nested(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CONCUR_POLICY__AIMD__HIGH": "0.9",
        "CONCUR_POLICY__NAME": "aimd:kv",
        "CONCUR_UPSTREAM__URL": "http://vllm:8000",
        "CONCUR_SERVER__PORT": "9300",
        "CONCUR_SERVER__ADMIN_TOKEN": "s3cret",
        "concur_server__log_level": "DEBUG",  # names and levels are case-insensitive
        "CONCUR_ADMISSION__IDENTITY": "header:X-Run, body:session_id",  # comma list
        "CONCUR_POLICY__FIT__PRESSURE": '["working_set"]',  # or JSON
        "CONCUR_POLICY__AIMD__PRESSURE": "kv,projected",
    }
    s = load_settings(env=env)
    assert s.policy.aimd.high == 0.9
    assert s.policy.name == "aimd:kv"
    assert s.upstream.url == "http://vllm:8000"
    assert s.server.port == 9300
    assert s.server.admin_token is not None
    assert s.server.admin_token.get_secret_value() == "s3cret"
    assert s.server.log_level == "debug"
    assert s.admission.identity == ["header:X-Run", "body:session_id"]
    assert s.policy.fit.pressure == ("working_set",)
    assert s.policy.aimd.pressure == ("kv", "projected")
    # The same through the real process environment and the plain constructor.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert load_settings() == s == Settings()
    # Keyword arguments beat the environment in the plain constructor too.
    assert Settings(server={"port": 9400}).server.port == 9400


def test_overrides_dotted() -> None:
    s = load_settings(
        env={},
        overrides={
            "policy.aimd.high": 0.95,
            "policy.aimd.low": 0.85,
            "upstream.url": "http://x:1",
            "admission.max_queue_len": 5,
            "server.admin_token": "t",
        },
    )
    assert (s.policy.aimd.high, s.policy.aimd.low) == (0.95, 0.85)
    assert s.upstream.url == "http://x:1"
    assert s.admission.max_queue_len == 5


def test_config_file_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write(tmp_path / "a.toml", "[server]\nport = 9001\n")
    b = write(tmp_path / "b.yaml", "server:\n  port: 9002\n")
    assert load_settings(env={"CONCUR_CONFIG": str(a)}).server.port == 9001
    # an explicit file wins over CONCUR_CONFIG
    assert load_settings(b, env={"CONCUR_CONFIG": str(a)}).server.port == 9002
    monkeypatch.setenv("CONCUR_CONFIG", str(a))
    assert Settings().server.port == 9001
    assert settings_from_args(cli_args([])).server.port == 9001
    assert settings_from_args(cli_args(["--config", str(b)])).server.port == 9002


# -------------------------------------------------------------------- precedence

# Each field is set by a different subset of sources; the highest one must win.
PRECEDENCE = {
    # field: (file, env, --set, command flag) values; None = not set by that source
    "server.host": ("10.0.0.1", None, None, None),
    "server.port": (9001, "9002", None, None),
    "upstream.url": ("http://file:1", "http://env:2", "http://set:3", None),
    "policy.name": ("fit", "epp", "unlimited", "static:7"),
    "policy.aimd.high": (0.91, None, "0.92", None),
    "admission.max_queue_len": (None, "11", None, 12),
    "engine.kind": (None, None, None, None),
}


def _expected(values: tuple[Any, ...]) -> Any:
    for value in reversed(values):
        if value is not None:
            return value
    return None


def _get(s: Settings, dotted: str) -> Any:
    obj: Any = s
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_precedence_field_by_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file_data: dict[str, Any] = {}
    sets, flags = [], {}
    for key, (file_v, env_v, set_v, flag_v) in PRECEDENCE.items():
        if file_v is not None:
            node = file_data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = file_v
        if env_v is not None:
            monkeypatch.setenv("CONCUR_" + key.replace(".", "__").upper(), env_v)
        if set_v is not None:
            sets += ["--set", f"{key}={set_v}"]
        if flag_v is not None:
            flags[key] = flag_v
    path = write(tmp_path / "c.yaml", yaml.safe_dump(file_data))
    s = settings_from_args(cli_args(["--config", str(path), *sets]), **flags)
    defaults = load_settings(env={})
    for key, values in PRECEDENCE.items():
        want = _expected(values)
        got = _get(s, key)
        if want is None:
            assert got == _get(defaults, key), key
        else:
            assert str(got) == str(want), key


def test_precedence_load_settings(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[server]\nport = 1\nhost = '0.0.0.0'\ndrain_timeout = 5\n")
    env = {"CONCUR_SERVER__PORT": "2", "CONCUR_SERVER__HOST": "::"}
    s = load_settings(path, overrides={"server.port": 3}, env=env)
    assert s.server.port == 3  # override > env > file
    assert s.server.host == "::"  # env > file
    assert s.server.drain_timeout == 5.0  # file > default
    assert s.server.max_body_bytes == 32 * 1024 * 1024  # default


def test_command_flags_and_listen() -> None:
    args = cli_args(["--set", "server.drain_timeout=5", "--set", "policy.name=fit"])
    s = settings_from_args(
        args, listen="0.0.0.0:9600", upstream__url="http://up:8000", **{"policy.name": None}
    )
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9600)
    assert s.server.drain_timeout == 5.0  # other server settings go beside --listen
    assert s.upstream.url == "http://up:8000"
    assert s.policy.name == "fit"  # a None flag is "not given"
    s = settings_from_args(args, listen=":9700")
    assert (s.server.host, s.server.port) == ("127.0.0.1", 9700)
    assert parse_listen("[::1]:80") == ("::1", 80)


def test_set_values_json_or_text() -> None:
    assert parse_set_value('["kv"]') == ["kv"]
    assert parse_set_value('{"high": 0.9}') == {"high": 0.9}
    assert parse_set_value("null") is None
    assert parse_set_value('"quoted"') == "quoted"
    assert parse_set_value("http://x:1") == "http://x:1"
    assert parse_set_value("0.9") == "0.9"  # the field's type converts it
    s = settings_from_args(
        cli_args(
            [
                "--set",
                "server.admin_token=123",
                "--set",
                'policy.aimd={"high": 0.9, "pressure": ["kv"]}',
                "--set",
                "policy.aimd.hit_floor=0.3",
                "--set",
                "policy.aimd.pause=false",
                "--set",
                "admission.identity=header:A,body:user",
            ]
        )
    )
    assert s.server.admin_token is not None
    assert s.server.admin_token.get_secret_value() == "123"
    assert s.policy.aimd.high == 0.9
    assert s.policy.aimd.pressure == ("kv",)
    assert s.policy.aimd.hit_floor == 0.3
    assert s.policy.aimd.pause is False
    assert s.admission.identity == ["header:A", "body:user"]


# ------------------------------------------------------------------------ errors


def test_cli_bad_value_from_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONCUR_POLICY__AIMD__HIGH", "1.7")
    code, out, err = run_cli(["config", "show"], capsys)
    assert code == 2
    assert out == ""
    assert "policy.aimd.high = 1.7 (from CONCUR_POLICY__AIMD__HIGH): must be <= 1.5" in err


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "policy.aimd.high=1.7",
            "policy.aimd.high = 1.7 (from --set policy.aimd.high): must be <= 1.5",
        ),
        ("server.port=70000", "server.port = 70000 (from --set server.port): must be <= 65535"),
        ("server.port=abc", "server.port = abc (from --set server.port): must be a whole number"),
        (
            "server.log_format=xml",
            "server.log_format = xml (from --set server.log_format): "
            "must be one of 'text' or 'json'",
        ),
        ("control.failure_mode=panic", "control.failure_mode = panic"),
        (
            "upstream.url=ftp://x",
            "upstream.url = ftp://x (from --set upstream.url): "
            "must be an http:// or https:// URL with a host",
        ),
        ("upstream.url=http://", "must be an http:// or https:// URL with a host"),
        (
            "engine.poll_interval=0",
            "engine.poll_interval = 0 (from --set engine.poll_interval): must be > 0",
        ),
        ("admission.identity=cookie:x", "admission.identity = cookie:x"),
        ("admission.identity=body:model", "must be header:<Name>"),
        ("admission.done_header=bad header", "must be a valid HTTP header name"),
        ("admission.anonymous=drop", "must be one of 'gate' or 'bypass'"),
        ("policy.name=magic", "policy.name = magic (from --set policy.name): unknown policy"),
        ("policy.name=static:0", "static:N needs a whole number N >= 1"),
        ("policy.name=aimd:nope", "unknown aimd preset 'nope'"),
        ("policy.aimd.pressure=kv,heat", "unknown pressure source 'heat'"),
        ("server=3", "server = 3 (from --set server): must be a table"),
    ],
)
def test_cli_bad_values(setting: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["config", "show", "--set", setting], capsys)
    assert code == 2, err
    assert out == ""
    assert expected in err


def test_cli_reports_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["config", "show", "--set", "server.port=0", "--set", "upstream.read_timeout=-1"], capsys
    )
    assert code == 2
    assert "server.port = 0" in err
    assert "upstream.read_timeout = -1" in err


def test_bad_value_in_file_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.toml", "[policy.aimd]\nbeta = 1.5\n")
    code, _, err = run_cli(["config", "show", "--config", str(path)], capsys)
    assert code == 2
    assert f"policy.aimd.beta = 1.5 (from {path}): must be < 1.0" in err


def test_cross_field_low_high(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CONCUR_POLICY__AIMD__LOW": "0.9"})
    msg = str(info.value)
    assert msg.startswith("policy.aimd: low (0.9) must be below high (0.85)")
    assert "policy.aimd.low from CONCUR_POLICY__AIMD__LOW" in msg
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"policy.aimd.low": 0.8, "policy.aimd.high": 0.8})
    assert "low (0.8) must be below high (0.8)" in str(info.value)
    with pytest.raises(ConfigError, match=r"policy\.fit: low \(0\.9\) must be below high"):
        load_settings(env={}, overrides={"policy.fit.low": 0.9})
    # A preset's values count too: aimd:paper has high 0.5.
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"policy.name": "aimd:paper", "policy.aimd.low": 0.6})
    msg = str(info.value)
    assert "preset aimd:paper" in msg
    assert "low (0.6) must be below high (0.5)" in msg
    assert "policy.aimd.low from override" in msg


def test_cross_field_stale_after(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["config", "show", "--set", "engine.stale_after=0.5"], capsys)
    assert code == 2
    assert "engine: stale_after (0.5) must exceed poll_interval (0.5)" in err
    assert "engine.stale_after from --set engine.stale_after" in err


def test_unknown_keys_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.toml", "[server]\nprot = 9001\n")
    code, _, err = run_cli(["config", "show", "--config", str(path)], capsys)
    assert code == 2
    assert f"server.prot = 9001 (from {path}): unknown setting; allowed here: host, port" in err

    path = write(tmp_path / "d.yaml", "servers:\n  port: 1\n")
    with pytest.raises(ConfigError, match=r"servers = .*unknown setting; allowed here: upstream"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match=r"policy\.aimd\.hgih = 1 \(from override\): unknown"):
        load_settings(env={}, overrides={"policy.aimd.hgih": 1})
    with pytest.raises(ConfigError, match=r"from CONCUR_POLICY__AIMD__HGIH\): unknown setting"):
        load_settings(env={"CONCUR_POLICY__AIMD__HGIH": "1"})


def test_env_name_typos_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="use CONCUR_UPSTREAM__URL"):
        load_settings(env={"CONCUR_UPSTREAM_URL": "http://x:1"})
    with pytest.raises(ConfigError, match=r"CONCUR_UPSTREEM__URL.*unknown section 'upstreem'"):
        load_settings(env={"CONCUR_UPSTREEM__URL": "http://x:1"})
    # Other CONCUR_* variables (not settings) are left alone.
    assert load_settings(env={"CONCUR_SOMETHING_ELSE": "1"}) == load_settings(env={})


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    code, _, err = run_cli(["config", "show", "--config", str(missing)], capsys)
    assert code == 2
    assert f"config file {missing}: not found" in err
    with pytest.raises(ConfigError, match=r"nope\.yaml \(from CONCUR_CONFIG\): not found"):
        load_settings(env={"CONCUR_CONFIG": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match=r"unknown type '\.ini'"):
        load_settings(write(tmp_path / "c.ini", "x=1"), env={})


def test_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "c.toml", "[server]\nport = 9001\nhost = \n")
    code, _, err = run_cli(["config", "show", "--config", str(path)], capsys)
    assert code == 2
    assert f"config file {path}: invalid TOML" in err
    assert "line 3" in err


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "server:\n  port: [1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid YAML: .*line 2"):
        load_settings(path, env={})
    path = write(tmp_path / "l.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(path, env={})


def test_bad_set_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["config", "show", "--set", "policy.aimd.high"], capsys)
    assert code == 2
    assert "expected KEY=VALUE" in err
    with pytest.raises(SystemExit) as info:
        settings_from_args(cli_args([]), listen="nowhere")
    assert info.value.code == 2


# ---------------------------------------------------------------- example / show


def test_example_parses_to_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["config", "example"], capsys)
    assert code == 0
    assert out == render_example()
    tomllib.loads(out)
    defaults = load_settings(env={})
    assert load_settings(write(tmp_path / "ex.toml", out), env={}) == defaults
    # Uncommenting every value must still give the defaults: the values shown are right.
    uncommented = re.sub(r"(?m)^# (\w+ = (?!\(unset\)))", r"\1", out)
    assert uncommented != out
    data = tomllib.loads(uncommented)
    assert data["policy"]["aimd"]["high"] == 0.85
    assert load_settings(write(tmp_path / "ex2.toml", uncommented), env={}) == defaults


def test_example_lists_every_field() -> None:
    text = render_example()
    tables: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif m := re.match(r"^# (\w+) = ", line):
            tables.setdefault(current, []).append(m.group(1))
    fields = list(iter_fields())
    assert len(fields) > 40
    for path, _field in fields:
        table, name = ".".join(path[:-1]), path[-1]
        assert name in tables.get(table, []), ".".join(path)
    # ... each with a description on the line above and its env var.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^# \w+ = ", line):
            above = lines[i - 1]
            assert above.startswith("# ") and "env CONCUR_" in above, line
            assert "(undocumented)" not in above, line


@pytest.mark.parametrize(
    "model",
    [
        UpstreamSettings,
        ServerSettings,
        EngineSettings,
        ControlSettings,
        AdmissionSettings,
        Settings,
    ],
)
def test_every_field_has_a_description(model: type[Settings]) -> None:
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name}"


def test_show_masks_admin_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONCUR_SERVER__ADMIN_TOKEN", "s3cret-token")
    for fmt in ("toml", "json", "yaml"):
        code, out, err = run_cli(["config", "show", "--format", fmt], capsys)
        assert code == 0, err
        assert "s3cret" not in out
        assert "***" in out
    code, out, _ = run_cli(["config", "show", "--format", "json"], capsys)
    assert json.loads(out)["server"]["admin_token"] == "***"
    s = load_settings()
    assert "s3cret" not in repr(s)
    assert "s3cret" not in render_effective(s, "toml")


def test_show_formats_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["config", "show", "--set", "server.port=9123", "--set", "policy.aimd.high=0.9"]
    code, out, _ = run_cli([*argv, "--format", "toml"], capsys)
    assert code == 0
    data = tomllib.loads(out)
    assert data["server"]["port"] == 9123
    assert "admin_token" not in data["server"]  # unset: shown as a comment
    expected = load_settings(env={}, overrides={"server.port": 9123, "policy.aimd.high": 0.9})
    assert load_settings(write(tmp_path / "s.toml", out), env={}) == expected
    code, out, _ = run_cli([*argv, "--format", "yaml"], capsys)
    assert load_settings(write(tmp_path / "s.yaml", out), env={}) == expected
    code, out, _ = run_cli([*argv, "--format", "json"], capsys)
    assert json.loads(out)["policy"]["aimd"]["high"] == 0.9
    with pytest.raises(ValueError, match="unknown format"):
        render_effective(expected, "ini")


def test_show_resolves_aimd_preset(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        ["config", "show", "--set", "policy.name=aimd:paper", "--set", "policy.aimd.alpha=4"],
        capsys,
    )
    assert code == 0
    aimd = tomllib.loads(out)["policy"]["aimd"]
    assert (aimd["high"], aimd["low"], aimd["hit_floor"], aimd["alpha"]) == (0.5, 0.2, 0.2, 4)


def test_config_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["config"], capsys)
    assert code == 0
    assert "show" in out and "example" in out


def test_upstream_ca_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(pem))
    s = load_settings(env={"CONCUR_UPSTREAM__CA_FILE": str(pem)})
    assert s.upstream.ca_file == str(pem)
    assert load_settings(overrides={"upstream.ca_file": " "}, env={}).upstream.ca_file is None

    missing = tmp_path / "nope.pem"
    code, _, err = run_cli(["config", "show", "--set", f"upstream.ca_file={missing}"], capsys)
    assert code == 2
    assert f"{missing}: no such file; give a PEM file of CA certificates" in err

    garbage = write(tmp_path / "garbage.pem", "not a certificate\n")
    code, _, err = run_cli(["config", "show", "--set", f"upstream.ca_file={garbage}"], capsys)
    assert code == 2
    assert f"upstream.ca_file = {garbage}" in err and "not a readable PEM file" in err


# ------------------------------------------------------- one load, every problem


def test_every_problem_is_reported_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONCUR_UPSTREAM_URL", "http://x:1")  # one underscore: a typo
    monkeypatch.setenv("CONCUR_ENGINE__POLL_INTERVAL", "soon")
    missing = tmp_path / "nope.toml"
    argv = ["config", "show", "--config", str(missing), "--set", "server.port"]
    argv += ["--set", "policy.name=aimdd", "--set", "policy.aimd.high=1.7"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    for line in (
        "--set 'server.port': expected KEY=VALUE",
        "CONCUR_UPSTREAM_URL (environment): sections and fields are joined by a double "
        "underscore: use CONCUR_UPSTREAM__URL",
        f"config file {missing}: not found",
        "engine.poll_interval = soon (from CONCUR_ENGINE__POLL_INTERVAL): must be a number",
        "policy.name = aimdd (from --set policy.name): unknown policy 'aimdd'",
        "policy.aimd.high = 1.7 (from --set policy.aimd.high): must be <= 1.5",
    ):
        assert line in err, line


def test_bad_policy_name_is_reported_beside_its_bad_parameters() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, overrides={"policy.name": "static:0", "policy.fit.high": 9})
    assert [p.split(" (from")[0] for p in info.value.problems] == [
        'policy.name = "static:0"',
        "policy.fit.high = 9",
    ]


def test_listen_refused_beside_set_server_host_or_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for given, key in (
        ("server.port=banana", "server.port"),
        ("server.host=0.0.0.0", "server.host"),
        ('server={"port": 9100}', "server"),
    ):
        with pytest.raises(SystemExit) as info:
            settings_from_args(cli_args(["--set", given]), listen="0.0.0.0:9600")
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"--listen 0.0.0.0:9600 and --set {key} both set the listen address" in err
        assert "give one: --listen HOST:PORT, or --set server.host=HOST" in err
    # The bad value the flag would have hidden is reported too.
    with pytest.raises(SystemExit):
        settings_from_args(cli_args(["--set", "server.port=banana"]), listen=":9600")
    assert "server.port = banana (from --set server.port): must be a whole number" in (
        capsys.readouterr().err
    )


def test_upstream_urls_is_gone() -> None:
    with pytest.raises(ConfigError, match=r"upstream\.urls = .*unknown setting; allowed here: url"):
        load_settings(env={}, overrides={"upstream.urls": ["http://x:1"]})


def test_proxy_timeouts_default_to_the_configs() -> None:
    from concur.proxy import ProxyOptions

    options, upstream = ProxyOptions(upstream="http://x:1"), UpstreamSettings()
    assert options.connect_timeout == upstream.connect_timeout
    assert options.first_byte_timeout == upstream.first_byte_timeout
    assert options.read_timeout == upstream.read_timeout


# -------------------------------------------------- one wording for every payload


def test_explain_words_a_policy_payload_like_the_config() -> None:
    with pytest.raises(ValidationError) as info:
        PolicySettings.model_validate({"name": "aimd", "aimd": {"hihg": 0.9}})
    assert explain(info.value, PolicySettings) == [
        "aimd.hihg = 0.9: unknown setting; allowed here: " + ", ".join(AIMDParams.model_fields)
    ]
    with pytest.raises(ValidationError) as info:
        PolicySettings.model_validate({"name": "aimdd", "aimd": {"high": 2, "low": 0.9}})
    problems = explain(info.value, PolicySettings)
    assert problems[0].startswith('name = "aimdd": unknown policy')
    assert problems[1] == "aimd.high = 2: must be <= 1.5"


def test_explain_never_echoes_a_large_input() -> None:
    with pytest.raises(ValidationError) as info:
        PolicySettings.model_validate({"name": "x" * 100_000})
    (problem,) = explain(info.value, PolicySettings)
    assert problem.startswith('name = "xxx') and "unknown policy" in problem
    assert len(problem) < 700


# -------------------------------------------------------- docs and TOML by library


def test_example_docs_come_from_attribute_docstrings() -> None:
    text = render_example()
    # Written as docstrings under the fields, in concur/config and in the policies.
    for model, name in (
        (UpstreamSettings, "connect_timeout"),
        (AIMDParams, "initial_window"),
        (FitParams, "pause"),
        (PolicySettings, "epp"),
    ):
        doc = model.model_fields[name].description
        assert doc, f"{model.__name__}.{name}"
        assert f"# {doc}" in text, doc
    assert "# Seconds to wait for a TCP/TLS connection to the engine. [> 0; env" in text
    # Only a docstring's first paragraph, without reST markup, on one line.
    engine_aware = AIMDParams.model_fields["engine_aware"].description or ""
    assert ":mod:" in engine_aware
    assert "(see concur.policies.engine_load)" in text


def test_show_toml_round_trips_every_kind_of_value(tmp_path: Path) -> None:
    values = {
        "server.host": 'hôst "quoted" \\ back',
        "server.admin_token": "s3cret",
        "admission.identity": ["header:X-Run", "body:user"],
        "policy.name": "fit",
        "policy.fit.pressure": ["working_set"],
        "policy.aimd.hit_floor": 0.25,
        "engine.metrics_url": "http://m:9/x",
    }
    settings = load_settings(env={}, overrides=values)
    text = render_effective(settings, "toml")
    assert 'identity = ["header:X-Run", "body:user"]' in text  # one line per value
    data = tomllib.loads(text)
    assert data["server"]["host"] == values["server.host"]
    assert data["server"]["admin_token"] == "***"
    back = load_settings(
        write(tmp_path / "show.toml", text), env={}, overrides={"server.admin_token": "s3cret"}
    )
    assert back == settings
