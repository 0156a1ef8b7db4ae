"""Every command in the ``bash`` blocks of README.md and docs/*.md is exercised, so the docs cannot drift from
the code. Each test is parametrized over (file, command); the curl lines of every file share one server.

* ``automl-tl ...``: parsed by the CLI's own argparse parser (parsing only: placeholder paths are fine);
* ``curl ...``: run as written through bash against a real Serve app on a free port of 127.0.0.1, with
  a.jpg and b.jpg real JPEGs in the working folder; each answers HTTP 200 with the JSON its endpoint promises;
* ``make T``: T is a Makefile target;
* ``ray job submit``: parsed by Ray's own click command, with the runtime env and working dir of
  ``examples/04_ray_job_submit.sh`` (run for real by tests/test_jobs.py) and an entrypoint the CLI accepts;
* ``serve run automl_tl.serve:app k=v ...``: Serve's parser, then the app builder with those arguments;
* ``.venv/bin/python SCRIPT ...``: the script exists and declares the subcommand and flags used; an example
  script must be one tests/test_examples.py smoke-tests;
* ``.venv/bin/python -m automl_tl.MODULE ...``: the module exists and its argparse declares what is used;
* ``export VAR=...`` / ``VAR=... cmd``: the variable is one the code or an example reads (or a --token-env).

Any other command fails ``test_every_readme_command_is_covered``: a new kind needs a mechanism here first.
benchmarks/README.md is rendered from benchmarks/results/*.json; it must equal what they render today.

    .venv/bin/python -m pytest -q tests/test_readme.py
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from automl_tl.inference.artifact import write_artifact
from automl_tl.cli import build_parser
from automl_tl.serve import start_server, stop_server
from tests.scenarios._common import free_port

from .conftest import REPO_ROOT
from .test_artifact import CLASSES, make_member

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
DOC_TEXTS = {p.relative_to(REPO_ROOT).as_posix(): p.read_text(encoding="utf-8") for p in DOC_FILES}
README_TEXT = DOC_TEXTS["README.md"]
README_MAX_LINES = 250
EXAMPLES = REPO_ROOT / "examples"
README_ADDRESS = "http://127.0.0.1:8000"
TOKEN = "readme-token-2c9e41"
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def readme_commands(text: str) -> list[str]:
    """The commands of every bash block, continuation lines joined; trailing comments stay (bash drops them)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def split_command(command: str) -> tuple[list[str], list[str]]:
    """(variables it sets, by ``export`` or as ``VAR=value`` prefixes; its words), split as the shell would."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["export"]:
        return [w.split("=", 1)[0] for w in words[1:]], []
    assigned = []
    while words and _ASSIGNMENT.match(words[0]):
        assigned.append(words.pop(0).split("=", 1)[0])
    return assigned, words


def kind(command: str) -> str:
    argv = split_command(command)[1]
    if not argv:
        return "env"
    if argv[0] in ("automl-tl", "curl", "make"):
        return argv[0]
    if argv[:3] == ["ray", "job", "submit"]:
        return "ray-job"
    if argv[:2] == ["serve", "run"]:
        return "serve-run"
    if argv[0] == ".venv/bin/python" and argv[1:2] and argv[1].endswith(".py"):
        return "script"
    if argv[0] == ".venv/bin/python" and argv[1:3] and argv[1] == "-m" and argv[2].startswith("automl_tl."):
        return "module"
    return "uncovered"


COMMANDS = [(name, command) for name, text in DOC_TEXTS.items() for command in readme_commands(text)]
TOKEN_ENVS = sorted({v for text in DOC_TEXTS.values() for v in re.findall(r"--token-env (\w+)", text)})


def of_kind(name: str) -> list[Any]:
    """pytest params of the commands of one kind, each named by its file and text."""
    return [pytest.param(c, id=f"{f}: {c}") for f, c in COMMANDS if kind(c) == name]


def assert_cli_parses(argv: list[str], command: str) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits with 2 on anything it rejects
        pytest.fail(f"automl-tl rejects the README command {command!r} (exit {exc.code}); see the error above")
    assert callable(args.func)


def test_every_readme_command_is_covered() -> None:
    uncovered = [f"{f}: {c}" for f, c in COMMANDS if kind(c) == "uncovered"]
    assert not uncovered, f"command(s) that no test covers: {uncovered}; add a mechanism to {__file__}"
    readme_kinds = {kind(c) for f, c in COMMANDS if f == "README.md"}
    assert {"automl-tl", "make", "curl"} <= readme_kinds, "no bash block found: is the extractor broken?"
    assert {f for f, _ in COMMANDS} == set(DOC_TEXTS), "a docs page without a bash block: give it a real command"


def test_readme_is_short_and_links_every_docs_page() -> None:
    lines = README_TEXT.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES}, the rest in docs/"
    assert README_TEXT.startswith("# automl_tl\n") and "make demo" in README_TEXT.split("## ")[0]
    for name in DOC_TEXTS:
        assert name == "README.md" or f"]({name})" in README_TEXT, f"README.md does not link {name}"


@pytest.mark.parametrize("name", sorted(DOC_TEXTS))
def test_relative_links_point_to_files_that_exist(name: str) -> None:
    base = (REPO_ROOT / name).parent
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", DOC_TEXTS[name]):
        if "://" not in target:
            assert (base / target).exists(), f"{name}: link to {target}, which does not exist"


@pytest.mark.parametrize("command", of_kind("automl-tl"))
def test_automl_tl_command_parses(command: str) -> None:
    assert_cli_parses(split_command(command)[1][1:], command)


@pytest.mark.parametrize("command", of_kind("make"))
def test_make_target_exists(command: str) -> None:
    targets = set(re.findall(r"^([\w.-]+):", (REPO_ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    for target in split_command(command)[1][1:]:
        assert target in targets, f"{command!r}: the Makefile has no target {target!r}"


@pytest.mark.parametrize("command", [pytest.param(c, id=f"{f}: {c}") for f, c in COMMANDS if split_command(c)[0]])
def test_environment_variables_are_ones_something_reads(command: str) -> None:
    """A misspelt variable (RAY_AUTH_MOD) would be silently ignored by every program: catch it here."""
    files = [*(REPO_ROOT / "automl_tl").rglob("*.py"), *EXAMPLES.iterdir()]
    corpus = "\n".join(p.read_text(encoding="utf-8") for p in files if p.is_file())
    named = set(TOKEN_ENVS)
    for name in split_command(command)[0]:
        assert name in named or re.search(rf"\b{name}\b", corpus), f"{command!r}: nothing reads ${name}"


@pytest.mark.parametrize("command", of_kind("ray-job"))
def test_ray_job_submit_is_the_tested_examples_form(command: str) -> None:
    from ray.dashboard.modules.job.cli import submit

    params = submit.make_context("submit", split_command(command)[1][3:]).params  # click parses; nothing runs
    example = (EXAMPLES / "04_ray_job_submit.sh").read_text(encoding="utf-8")
    found = re.search(r"^RUNTIME_ENV='(.*)'$", example, re.M)
    assert found and json.loads(params["runtime_env_json"]) == json.loads(found.group(1)), "runtime env differs"
    assert params["working_dir"] == "." and '--working-dir . --runtime-env-json "$RUNTIME_ENV"' in example
    entrypoint = list(params["entrypoint"])
    assert entrypoint[0] == "automl-tl" and f"-- automl-tl {entrypoint[1]} " in example, entrypoint
    assert_cli_parses(entrypoint[1:], command)


def _argparse_surface(path: Path) -> tuple[set[str], set[str]]:
    """Subcommands and option strings a script's argparse declares, read from its source: importing the
    benchmarks would load torch and Ray, and their parsers are built inside main()."""
    subcommands: set[str] = set()
    options: set[str] = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if node.func.attr == "add_parser":
                subcommands.update(names[:1])
            elif node.func.attr == "add_argument":
                options.update(n for n in names if n.startswith("-"))
    return subcommands, options


@pytest.mark.parametrize("command", of_kind("script"))
def test_script_declares_what_the_command_uses(command: str) -> None:
    script, *rest = split_command(command)[1][1:]
    path = REPO_ROOT / script
    assert path.is_file(), f"{command!r}: {script} does not exist"
    subcommands, options = _argparse_surface(path)
    if subcommands:
        assert rest and rest[0] in subcommands, f"{command!r}: subcommand must be one of {sorted(subcommands)}"
    unknown = [w for w in rest if w.startswith("-") and w.split("=", 1)[0] not in options]
    assert not unknown, f"{command!r}: {script} declares no {unknown}; it has {sorted(options)}"
    if path.parent == EXAMPLES:
        assert path.name in (REPO_ROOT / "tests" / "test_examples.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("command", of_kind("module"))
def test_module_declares_what_the_command_uses(command: str) -> None:
    module, *rest = split_command(command)[1][2:]
    path = REPO_ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{command!r}: no module {module} (at {path.relative_to(REPO_ROOT)})"
    source = path.read_text(encoding="utf-8")
    assert re.search(r"^if __name__ == .__main__.:", source, re.M), f"{command!r}: {module} cannot run with -m"
    subcommands, options = _argparse_surface(path)
    if subcommands:
        assert rest and rest[0] in subcommands, f"{command!r}: subcommand must be one of {sorted(subcommands)}"
    unknown = [w for w in rest if w.startswith("-") and w.split("=", 1)[0] not in options]
    assert not unknown, f"{command!r}: {module} declares no {unknown}; it has {sorted(options)}"


PYTHON_BLOCKS = [pytest.param(block, id=f"{name}: python block {i}") for name, text in DOC_TEXTS.items()
                 for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M))]  # fmt: skip


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_python_snippet_compiles_and_names_the_public_api(block: str) -> None:
    import automl_tl

    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "automl_tl":
            assert hasattr(automl_tl, node.attr), f"automl_tl.{node.attr} does not exist"


# --- benchmarks/README.md, rendered from benchmarks/results/*.json ------------------------------------------


def _renderer() -> Any:
    spec = importlib.util.spec_from_file_location("render_readme", REPO_ROOT / "benchmarks" / "render_readme.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_readme_is_what_the_committed_results_render() -> None:
    page = (REPO_ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    assert page == _renderer().render(), "benchmarks/README.md is stale: run .venv/bin/python benchmarks/render_readme.py"


def test_benchmarks_readme_shows_every_result_file_with_its_date(tmp_path: Path) -> None:
    render = _renderer().render
    results = sorted(p.name for p in (REPO_ROOT / "benchmarks" / "results").glob("*.json"))
    page = render()
    for name in results:
        if not name.endswith("_smoke.json"):
            assert f"(results/{name})" in page, f"{name} is not on the page"
    (tmp_path / "sweep_overhead.json").write_text(json.dumps({"date": "2030-01-02", "machine": "8 CPUs"}))
    (tmp_path / "new_bench.json").write_text(json.dumps({"date": "2030-01-03", "speed": {"a": 12.345, "b": [1, 2]}}))
    (tmp_path / "serve_smoke.json").write_text(json.dumps({"date": "2030-01-04"}))
    page = render(tmp_path)
    assert "measured 2030-01-02 on 8 CPUs" in page  # an older file without the expected keys still renders
    assert "| speed.a | 12.3 |" in page and "| speed.b | 1, 2 |" in page  # an unknown benchmark: its numbers
    assert "2030-01-04" not in page  # smoke-test runs are not published


# --- the commands that need an artifact, and a server ------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose artifact holds one small real member (as tests/test_serve.py builds them)."""
    root = tmp_path_factory.mktemp("readme_run")
    write_artifact(root / "artifact", CLASSES, [make_member("a", 96)], [1.0], 1.2,
                   metrics={"best_member": "a"}, method="greedy")  # fmt: skip
    return root


@pytest.mark.parametrize("command", of_kind("serve-run"))
def test_serve_run_builds_the_app_from_its_arguments(command: str, run_dir: Path) -> None:
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.scripts import convert_args_to_dict, run

    params = run.make_context("run", split_command(command)[1][2:]).params
    module, _, name = params["config_or_import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    arguments = convert_args_to_dict(params["arguments"])
    assert "artifact" in arguments, command
    arguments["artifact"] = str(run_dir / "artifact")  # the README's placeholder, made real
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, arguments), Application)


@pytest.fixture(scope="module")
def server(ray_session: Any, run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The README's server on a free port: ``/`` open, ``/secure`` with a bearer token; and a folder holding
    a.jpg and b.jpg for the curl lines to upload."""
    images = tmp_path_factory.mktemp("readme_images")
    for seed, name in enumerate(("a.jpg", "b.jpg")):
        pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, quality=90)
    port = free_port()  # the README's 8000 may be taken on this machine
    try:
        url = start_server(run_dir, mode="ensemble", port=port, cpus_per_replica=0.5)
        secure = start_server(run_dir, port=port, token=TOKEN, name="secure", route_prefix="/secure",
                              cpus_per_replica=0.5)  # fmt: skip
        yield {"open": url, "secure": secure, "cwd": images}
    finally:
        stop_server()


def run_curl(command: str, base: str, cwd: Path, token: str) -> tuple[str, Any]:
    """(HTTP status, parsed body) of the command run through bash with only its address changed."""
    line = command.replace(README_ADDRESS, base).replace("curl ", "curl -w '\\n%{http_code}' ", 1)
    env = {**os.environ, **{name: token for name in TOKEN_ENVS}}
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{line}\nfailed ({proc.returncode}): {proc.stderr}"
    body, _, status = proc.stdout.rpartition("\n")
    return status, json.loads(body) if body.strip() else None


@pytest.mark.slow
@pytest.mark.parametrize("command", of_kind("curl"))
def test_curl_command_gets_its_answer(command: str, server: dict[str, Any]) -> None:
    assert README_ADDRESS in command, f"{command!r}: the README's server is {README_ADDRESS}"
    auth = "Authorization: Bearer" in command
    base = server["secure"] if auth else server["open"]
    status, answer = run_curl(command, base, server["cwd"], TOKEN)
    assert status == "200", f"{command!r}: HTTP {status}: {answer}"
    if "/v1/predict" in command:
        k = int(m.group(1)) if (m := re.search(r"top_k=(\d+)", command)) else 5
        sent = len(re.findall(r"\b[ab]\.jpg\b", command))
        assert answer["mode"] == "ensemble" and len(answer["predictions"]) == sent, answer
        for prediction in answer["predictions"]:
            assert set(prediction["labels"]) <= set(CLASSES) and len(prediction["labels"]) == min(k, len(CLASSES))
            assert prediction["probabilities"] == sorted(prediction["probabilities"], reverse=True)
            assert prediction["timing"]["forward_ms"] >= 0
    elif command.rstrip().endswith("/v1/healthz"):
        assert answer["status"] == "ready"
    elif command.rstrip().endswith("/v1/metadata"):
        assert answer["class_names"] == list(CLASSES)
    else:
        pytest.fail(f"{command!r}: no check for this endpoint in {__file__}")
    if auth:  # the token really is checked: the same line with a wrong one is refused
        assert run_curl(command, base, server["cwd"], "wrong-token")[0] == "401"
