"""``pytest-bridge images``: tags, Dockerfiles, build contexts, tool argv, the printed settings, errors.

The tools (docker, kind, ctr) are stand-in scripts here; real builds and pushes run in
e2e/test_images.py.
"""

from __future__ import annotations

import re
import shlex
import stat
import sys
from pathlib import Path

import pytest
from pytest_bridge_agent.runtime import BUNDLE_FILE, CODE_PATH, DEFAULT_NGINX_IMAGE, DEFAULT_PYTHON_IMAGE

from pytest_bridge.cli import main
from pytest_bridge.cluster import bundle, images
from pytest_bridge.cluster.bundle import Bundle
from pytest_bridge.settings import add_options, resolve

CODE = Bundle(b"PK-not-really-a-zip", "ab" * 32, "1.2.3")
REPO = Path(__file__).resolve().parents[2]


# --- names ------------------------------------------------------------------------------------


def test_agent_tag_names_version_and_code_and_changes_with_the_code() -> None:
    assert images.agent_ref("localhost:5000/team", CODE) == "localhost:5000/team/pytest-bridge-agent:1.2.3-ababababab"
    changed = Bundle(CODE.data, "cd" * 32, CODE.version)
    assert images.agent_ref("p", changed) != images.agent_ref("p", CODE)
    real = bundle.build()
    assert images.agent_ref("localhost", real).endswith(f":{real.version}-{real.short}")


def test_a_base_other_than_the_default_gets_its_own_tag() -> None:
    default = images.agent_ref("p", CODE, DEFAULT_PYTHON_IMAGE)
    mirrored = images.agent_ref("p", CODE, "mirror.internal/python:3.11.13-slim-bookworm")
    assert mirrored.startswith(default + "-") and re.fullmatch(r".*-[0-9a-f]{6}", mirrored)
    assert images.routing_ref("p", "1.2.3") == "p/pytest-bridge-routing:1.2.3"
    assert images.routing_ref("p", "1.2.3", DEFAULT_NGINX_IMAGE) == "p/pytest-bridge-routing:1.2.3"
    assert images.routing_ref("p", "1.2.3", "nginx:1.29.0") != "p/pytest-bridge-routing:1.2.3"


def test_versions_that_are_not_valid_in_a_tag_are_made_valid() -> None:
    local = Bundle(b"", "ef" * 32, "0.1.dev3+g1234.d20250101")
    assert images.agent_ref("p", local) == "p/pytest-bridge-agent:0.1.dev3-g1234.d20250101-efefefefef"


@pytest.mark.parametrize(
    ("prefix", "host"),
    [
        ("localhost", "localhost"),
        ("localhost:5000/team/", "localhost:5000"),
        ("registry.internal/a/b", "registry.internal"),
        ("myuser", "docker.io"),
        ("[::1]:5000/x", "[::1]:5000"),
    ],
)
def test_valid_prefixes_and_their_registry(prefix: str, host: str) -> None:
    cleaned = images.check_prefix(prefix)
    assert not cleaned.endswith("/")
    assert images.registry_host(cleaned) == host


@pytest.mark.parametrize("prefix", ["", "http://localhost:5000", "localhost:5000/Team", "team/app:tag", "a//b", "-x"])
def test_invalid_prefixes_are_named_with_an_example(prefix: str) -> None:
    with pytest.raises(images.ImageToolError, match=r"--registry .* e\.g\. localhost:5000/team"):
        images.check_prefix(prefix, "--registry")


# --- Dockerfiles and contexts ------------------------------------------------------------------


def _dockerfile_args(text: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for match in re.finditer(r"^ARG (\w+)(?:=(\S+))?$", text, re.M):
        found.setdefault(match[1], match[2])
    return found


def test_dockerfiles_default_to_the_stock_images_and_declare_every_build_arg() -> None:
    agent, routing = images.plan(CODE, "p")
    agent_file, routing_file = images.dockerfile(agent.dockerfile), images.dockerfile(routing.dockerfile)
    assert _dockerfile_args(agent_file)["PYTHON_IMAGE"] == DEFAULT_PYTHON_IMAGE
    assert _dockerfile_args(routing_file)["NGINX_IMAGE"] == DEFAULT_NGINX_IMAGE
    assert set(agent.build_args) <= set(_dockerfile_args(agent_file))
    assert set(routing.build_args) <= set(_dockerfile_args(routing_file))
    assert agent.build_args == {"PYTHON_IMAGE": DEFAULT_PYTHON_IMAGE, "PYTEST_BRIDGE_VERSION": "1.2.3",
                                "PYTEST_BRIDGE_CODE": CODE.digest}  # fmt: skip


def test_agent_dockerfile_puts_the_code_at_code_path_and_sets_no_env() -> None:
    text = images.dockerfile("agent.Dockerfile")
    assert f"COPY {BUNDLE_FILE} {CODE_PATH}\n" in text
    # The agent reports its own environment as the service's: an ENV would leak into it.
    for name in ("agent.Dockerfile", "routing.Dockerfile"):
        assert not re.search(r"^\s*ENV\b", images.dockerfile(name), re.M), name
    assert not re.search(r"^\s*USER\b", text, re.M)  # the pod decides; the stock image runs as root too
    assert 'io.pytest-bridge.code="${PYTEST_BRIDGE_CODE}"' in text


def test_build_context_holds_the_dockerfile_and_the_zipapp_world_readable(tmp_path: Path) -> None:
    agent, routing = images.plan(CODE, "p")
    images.write_context(agent, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dockerfile", BUNDLE_FILE]
    assert (tmp_path / BUNDLE_FILE).read_bytes() == CODE.data
    assert (tmp_path / "Dockerfile").read_text() == images.dockerfile("agent.Dockerfile")
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    routing_dir = tmp_path / "routing"
    routing_dir.mkdir()
    images.write_context(routing, routing_dir)
    assert [p.name for p in routing_dir.iterdir()] == ["Dockerfile"]


# --- argv --------------------------------------------------------------------------------------


def test_tool_argv(tmp_path: Path) -> None:
    agent, _ = images.plan(CODE, "localhost:5000/t")
    assert images.build_argv("docker", agent, tmp_path) == [
        "docker", "build", "--network=none", "--tag", "localhost:5000/t/pytest-bridge-agent:1.2.3-ababababab",
        "--build-arg", f"PYTHON_IMAGE={DEFAULT_PYTHON_IMAGE}", "--build-arg", "PYTEST_BRIDGE_VERSION=1.2.3",
        "--build-arg", f"PYTEST_BRIDGE_CODE={CODE.digest}", str(tmp_path),
    ]  # fmt: skip
    assert images.build_argv("docker", agent, tmp_path, platform="linux/arm64")[-3:-1] == ["--platform", "linux/arm64"]
    assert images.push_argv("docker", "r/x:1") == ["docker", "push", "r/x:1"]
    assert images.kind_load_argv("kind", "dev", ["a:1", "b:2"]) == [
        "kind", "load", "docker-image", "--name", "dev", "a:1", "b:2",
    ]  # fmt: skip
    assert images.save_argv("docker", ["a:1", "b:2"]) == ["docker", "save", "a:1", "b:2"]
    assert images.ctr_import_argv("ctr", "/run/containerd/containerd.sock") == [
        "ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io", "images", "import", "-",
    ]  # fmt: skip


# --- the printed settings ----------------------------------------------------------------------


class _Options:
    @staticmethod
    def pytest_addoption(parser: pytest.Parser) -> None:
        add_options(parser)


def test_printed_options_and_ini_lines_are_what_pytest_bridge_reads(pytester: pytest.Pytester) -> None:
    agent, routing = "localhost:5000/t/pytest-bridge-agent:1.2.3-ab", "localhost:5000/t/pytest-bridge-routing:1.2.3"
    text = images.settings_text(agent, routing)
    pytester.plugins.append(_Options())
    command = next(line for line in text.splitlines() if line.strip().startswith("pytest "))
    options = shlex.split(command)[1:]
    from_cli = resolve(pytester.parseconfig("-p", "no:bridge", *options), env={})
    assert (from_cli.code, from_cli.agent_image, from_cli.routing_image) == ("image", agent, routing)
    ini_lines = [line.strip() for line in text.splitlines() if line.strip().startswith("bridge_")]
    pytester.makeini("[pytest]\n" + "\n".join(ini_lines) + "\n")
    from_ini = resolve(pytester.parseconfig("-p", "no:bridge"), env={})
    assert (from_ini.code, from_ini.agent_image, from_ini.routing_image) == ("image", agent, routing)


def test_summary_says_where_the_images_are() -> None:
    built = images.plan(CODE, "p")
    assert "local Docker only" in images.summary("build", built)
    assert "pytest-bridge images push --registry" in images.summary("build", built)
    assert "able to pull" in images.summary("push", built)
    assert built[0].ref in images.summary("load", built)


# --- running the tools (stand-in scripts) ------------------------------------------------------


FAKE_TOOL = """\
#!{python}
import os, sys
from pathlib import Path
name = Path(sys.argv[0]).name
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(name + " " + " ".join(sys.argv[1:]) + "\\n")
fail = os.environ.get("FAKE_FAIL", "")
if fail and sys.argv[1:2] == [fail.split(":")[0]]:
    print(fail.split(":", 1)[1], file=sys.stderr)
    sys.exit(1)
if name == "docker" and sys.argv[1] == "save":
    sys.stdout.buffer.write(b"tarball")
if name == "ctr":
    print("imported", len(sys.stdin.buffer.read()), "bytes")
"""


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """docker, kind and ctr stand-ins on PATH; returns their log (one line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("docker", "kind", "ctr"):
        script = bin_dir / name
        script.write_text(FAKE_TOOL.format(python=sys.executable))
        script.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return log


def _calls(log: Path) -> list[str]:
    return [re.sub(r"/tmp\S*pytest-bridge-\w+-image-\S+", "CONTEXT", line) for line in log.read_text().splitlines()]


def test_push_builds_then_pushes_both_and_prints_the_settings(tools: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images", "push", "--registry", "localhost:5000/team", "-q"]) == 0
    code = bundle.build()
    agent = images.agent_ref("localhost:5000/team", code)
    routing = images.routing_ref("localhost:5000/team", code.version)
    calls = _calls(tools)
    assert calls[0] == "docker version --format {{.Server.Version}}"
    assert [c.split()[1] for c in calls[1:]] == ["build", "build", "push", "push"]
    assert calls[-2:] == [f"docker push {agent}", f"docker push {routing}"]
    out = capsys.readouterr().out
    assert f"--bridge-code=image --bridge-agent-image={agent} --bridge-routing-image={routing}" in out
    assert f"bridge_agent_image = {agent}" in out


def test_a_refused_push_says_to_log_in(
    tools: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "push:unauthorized: authentication required")
    assert main(["images", "push", "--registry", "registry.internal:5000/team", "-q"]) == 1
    err = capsys.readouterr().err
    assert "unauthorized: authentication required" in err
    assert "docker login registry.internal:5000" in err


def test_load_into_kind_and_containerd(tools: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bundle.build()
    agent, routing = images.agent_ref("localhost", code), images.routing_ref("localhost", code.version)
    assert main(["images", "load", "--kind", "-q"]) == 0
    assert _calls(tools)[-1] == f"kind load docker-image --name kind {agent} {routing}"
    assert main(["images", "load", "--kind", "dev", "-q"]) == 0
    assert _calls(tools)[-1] == f"kind load docker-image --name dev {agent} {routing}"
    assert main(["images", "load", "--containerd", "/run/c.sock", "-q"]) == 0
    assert sorted(_calls(tools)[-2:]) == [  # the two ends of one pipe: either may log first
        "ctr --address /run/c.sock --namespace k8s.io images import -", f"docker save {agent} {routing}",
    ]  # fmt: skip
    assert "loaded onto the node" in capsys.readouterr().out


def test_missing_tools_and_an_unreachable_daemon_are_named(
    tools: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tools.parent / "bin" / "kind").unlink()
    assert main(["images", "load", "--kind", "-q"]) == 1
    assert "kind not found on PATH: install kind" in capsys.readouterr().err
    monkeypatch.setenv("FAKE_FAIL", "version:Cannot connect to the Docker daemon")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nowhere.sock")
    assert main(["images", "build", "-q"]) == 1
    err = capsys.readouterr().err
    assert "docker cannot reach a Docker daemon (unix:///nowhere.sock)" in err
    monkeypatch.setenv("PATH", str(tools.parent / "empty"))
    assert main(["images", "build"]) == 1
    assert "docker not found on PATH: install Docker's command-line client" in capsys.readouterr().err


def test_dry_run_runs_nothing_but_reads_the_dockerfiles(tools: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["images", "build", "--dry-run", "--prefix", "localhost:5000/x"]) == 0
    assert _calls(tools) == []
    captured = capsys.readouterr()
    assert captured.err.count("docker build --network=none") == 2
    assert "--bridge-agent-image=localhost:5000/x/pytest-bridge-agent:" in captured.out


def test_images_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["images", "push"])
    assert "--registry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["images", "load"])
    assert "--kind" in capsys.readouterr().err
    assert main(["images", "push", "--registry", "https://x", "--dry-run"]) == 1
    assert "--registry 'https://x' is not an image name prefix" in capsys.readouterr().err


# --- rbac --------------------------------------------------------------------------------------


def test_rbac_prints_the_shipped_role_which_the_repository_links_to(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rbac"]) == 0
    printed = capsys.readouterr().out
    assert printed == (REPO / "deploy" / "rbac" / "bridge-user.yaml").read_text()
    assert (
        REPO / "deploy" / "rbac" / "bridge-user.yaml"
    ).resolve() == REPO / "pytest_bridge" / "data" / "bridge-user.yaml"
    assert printed.startswith("# Least-privilege")
    assert "kind: Role\n" in printed
