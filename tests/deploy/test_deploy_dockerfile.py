"""deploy/Dockerfile, checked statically (no Docker here), and its health check run for real.

Static: python:3.11-slim base, a non-root numeric USER, HEALTHCHECK on /healthz with
urllib, ENTRYPOINT ``concur serve`` listening on 0.0.0.0:9000, CONCUR_CONFIG pointing
at a default config that concur's loader accepts, and every COPY source present and
enough for ``pip install .``. Live: the HEALTHCHECK command, run against a real concur.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import DEPLOY, DOCKERFILE, REPO
from fakes.fake_vllm import FakeVLLM
from fakes.harness import FAST

from concur.app import Server, build_app
from concur.config import load_settings


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment lines inside a continued instruction are removed
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer.append(line[:-1].strip())
            continue
        buffer.append(line)
        keyword, _, args = " ".join(buffer).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = []
    assert not buffer, "the Dockerfile ends inside a continued line"
    return out


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[-1]


def one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", ins.args):
                env[key] = value
    return env


def test_parser_joins_continuations() -> None:
    parsed = parse("# c\nFROM x AS b\nRUN a \\\n    # note\n    && b\nUSER 1\n")
    assert [(i.keyword, i.args) for i in parsed] == [
        ("FROM", "x AS b"),
        ("RUN", "a && b"),
        ("USER", "1"),
    ]


def test_base_image_is_python_311_slim(instructions: list[Instruction]) -> None:
    args = {
        m.group(1): m.group(2)
        for i in instructions
        if i.keyword == "ARG"
        for m in [re.fullmatch(r"(\w+)=(\S+)", i.args)]
        if m
    }
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 2, "expected a build stage and a runtime stage"
    for image in froms:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert resolved == "python:3.11-slim"


def test_runs_as_a_non_root_user(final: list[Instruction]) -> None:
    user = [i for i in final if i.keyword == "USER"]
    assert user, "the final stage must switch to a non-root USER"
    uid = user[-1].args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be numeric (runAsNonRoot checks it)"
    # Nothing after USER may need root.
    after = final[final.index(user[-1]) + 1 :]
    assert not [i for i in after if i.keyword in ("RUN", "COPY", "ADD")], after


def test_entrypoint_serves_on_all_interfaces(final: list[Instruction]) -> None:
    assert one(final, "ENTRYPOINT").exec_form() == ["concur", "serve"]
    assert one(final, "CMD").exec_form() == ["--listen", "0.0.0.0:9000"]
    assert one(final, "EXPOSE").args == "9000"
    assert one(final, "STOPSIGNAL").args == "SIGTERM"


def test_healthcheck_probes_healthz_with_urllib(final: list[Instruction]) -> None:
    check = one(final, "HEALTHCHECK")
    options, _, command = check.args.partition(" CMD ")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "http://127.0.0.1:9000/healthz" in argv[2]


def healthcheck_code() -> str:
    final_stage = stages(parse(DOCKERFILE.read_text()))[-1]
    _, _, command = one(final_stage, "HEALTHCHECK").args.partition(" CMD ")
    code: str = json.loads(command)[2]
    return code


async def run_python(code: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait()


async def test_healthcheck_command_against_a_real_concur() -> None:
    """The exact HEALTHCHECK code, pointed at a live concur's port: healthy, then not."""
    code = healthcheck_code()
    async with FakeVLLM() as fake:
        settings = load_settings(overrides={**FAST, "upstream.url": fake.url}, env={})
        server = Server(build_app(settings), "127.0.0.1", 0, drain_timeout=1.0)
        await server.start()
        live = code.replace("127.0.0.1:9000", f"127.0.0.1:{server.port}")
        try:
            assert await run_python(live) == 0
            assert await run_python(live.replace("/healthz", "/no-such-endpoint")) != 0
        finally:
            await server.stop()
        assert await run_python(live) != 0  # nothing listens any more


def test_default_config_is_installed_and_parses(final: list[Instruction]) -> None:
    env = env_of(final)
    assert env["CONCUR_CONFIG"] == "/etc/concur/concur.toml"
    assert "/opt/concur/bin" in env["PATH"].split(":")
    copies = [i.args.split() for i in final if i.keyword == "COPY" and "--from" not in i.args]
    assert ["deploy/concur.toml", "/etc/concur/concur.toml"] in copies
    settings = load_settings(DEPLOY / "concur.toml", env={})
    assert settings.upstream.url == "http://127.0.0.1:8000"  # a sidecar's engine
    assert settings.engine.kind == "vllm"


def copy_sources(instructions: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword != "COPY" or "--from" in ins.args:
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


def test_copy_sources_exist_and_are_not_ignored(instructions: list[Instruction]) -> None:
    ignored = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copy_sources(instructions):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        top = source.split("/")[0]
        assert top not in ignored, f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_build_stage_copies_what_pip_install_needs(instructions: list[Instruction]) -> None:
    """Every package directory of pyproject.toml (through the symlinks) and the readme."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {Path(s).parts[0] for s in copy_sources(stages(instructions)[0])}
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    for package in pyproject["tool"]["setuptools"]["packages"]:
        path = REPO.joinpath(*package.split("."))
        top = path.resolve().relative_to(REPO).parts[0]
        assert top in copied, f"package {package} lives in {top}/, which is not copied"
        link = path
        while link != REPO:
            if link.is_symlink():
                target = (link.parent / link.readlink()).resolve().relative_to(REPO).parts[0]
                assert target in copied, f"{link.relative_to(REPO)} -> {target}/ is not copied"
            link = link.parent
    runs = " ".join(i.args for i in stages(instructions)[0] if i.keyword == "RUN")
    assert re.search(r"\bpip (--python \S+ )?install \.(\s|$)", runs), runs
