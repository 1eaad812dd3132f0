"""The repo root installs as one package, `gencli`, and the wheel holds every subpackage."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_ONLY = {"tests", "bench", "examples", "docker", ".venv", "build", "dist"}


@pytest.mark.slow
def test_wheel_holds_every_subpackage_under_gencli(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gencli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"gencli"}, top
    packages = [
        p.parent.relative_to(ROOT)
        for p in ROOT.rglob("__init__.py")
        if not (set(p.relative_to(ROOT).parts) & DEV_ONLY)
    ]
    assert len(packages) >= 6
    for pkg in packages:
        inside = "/".join(("gencli", *pkg.parts, "__init__.py"))
        assert inside in names, f"{pkg} is missing from the wheel: add it to [tool.setuptools] packages"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gencli = gencli.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_model_core_imports_nothing_else_from_gencli():
    """model/ stands alone: it may import gencli.model.* only."""
    for path in (ROOT / "model").glob("*.py"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith(("from gencli", "import gencli")):
                assert line.startswith(("from gencli.model", "import gencli.model")), f"{path.name}: {line}"


def _gencli_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (gencli.worker.batcher: worker/batcher.py)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if set(rel.parts) & DEV_ONLY:
            continue
        parts = rel.with_suffix("").parts
        name = ".".join(("gencli", *(parts[:-1] if parts[-1] == "__init__" else parts)))
        out[name] = path
    return out


def _imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The gencli modules a file imports anywhere in it: at the top, inside functions (a lazy
    import still ties the two modules together) and under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gencli"):
            for alias in node.names:  # `from gencli.model import kernels` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gencli")}
    return {m for m in found if m in modules}


def test_no_module_imports_itself_through_others():
    """No import cycle, counting lazy and TYPE_CHECKING imports: each module's dependencies can be
    read without reading it (the cache took GPTConfig from the model that built caches; the
    batcher, the context and the runner each named the others)."""
    modules = _gencli_modules()
    graph = {name: _imports_of(path, modules) - {name} for name, path in modules.items()}
    graph = {name: {d for d in deps if not name.startswith(d + ".") and d != "gencli"} for name, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                walk(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert len(modules) > 40 and sum(map(len, graph.values())) > 100  # it did read the package
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_queue_and_prep_commands_load_without_torch():
    """submit, tail, status and the rest start in about a second: torch is imported only by the
    commands that run a model (generate, worker, workers, train)."""
    light = ["submit", "tail", "status", "list", "show", "results", "cancel", "retry", "replay", "prep", "regen",
             "demo"]
    code = (
        "import sys, click\n"
        "from gencli.cli.main import main\n"
        f"for name in {light!r}:\n"
        "    assert main.get_command(click.Context(main), name) is not None, name\n"
        "    assert 'torch' not in sys.modules, name\n"
        "assert main.get_command(click.Context(main), 'generate') is not None\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # the check itself sees an import of torch


def _loaded_after(invocations: list[list[str]], modules: tuple[str, ...]) -> list[str]:
    """Which of modules a fresh interpreter has imported after running each `gencli ARGS` (each must
    exit 0)."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from gencli.cli.main import main\n"
        f"for args in {invocations!r}:\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        f"print(sorted(m for m in {modules!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout)


def test_the_command_list_loads_no_command_and_its_summaries_are_the_commands_own():
    """`gencli --help` lists commands from cli/main.py's table, importing none of them (so not
    torch); each summary there is the first line of that command's own help."""
    assert _loaded_after([["--help"]], ("torch", "celery", "sqlalchemy", "gencli.cli.generate")) == []
    import click
    from click.testing import CliRunner

    from gencli.cli.main import COMMANDS, main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "generate" in r.output and "workers" in r.output, r.output

    for name, (_, summary) in COMMANDS.items():
        assert main.get_command(click.Context(main), name).help.strip().splitlines()[0] == summary, name


def test_queue_commands_help_loads_no_store_or_celery():
    """`gencli submit --help` and the other queue commands' help start in a fraction of a second:
    their modules import the submit client (SQLAlchemy, Celery) only when they run."""
    light = ["submit", "tail", "status", "list", "show", "results", "cancel", "retry", "replay", "prep", "regen",
             "demo"]
    assert _loaded_after([[name, "--help"] for name in light], ("torch", "celery", "sqlalchemy")) == []


def test_the_version_has_one_home():
    """`gencli --version`, the API's and provenance's are pyproject.toml's."""
    import re
    from importlib import metadata

    from click.testing import CliRunner

    from gencli import __version__
    from gencli.cli.main import main

    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert __version__ == metadata.version("gencli") == declared
    assert CliRunner().invoke(main, ["--version"]).output.strip().endswith(declared)
