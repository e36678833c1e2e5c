"""The README is a front door and the guides in docs/ hold the rest: every command shown there exists with the
options shown (`mtu-export` subcommands against the CLI, `make` targets against the Makefile, `python -m` modules
against their `--help`), every linked path exists, the README stays short, and its Python quickstart runs."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import typer
from helpers import invoke

from mtu_export.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 170
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


def snippets(page: Path) -> list[str]:
    """Command lines of a page: each line of its shell blocks (continuations joined, comments cut) and each inline
    code span."""
    text = page.read_text()
    found = []
    for language, body in FENCE.findall(text):
        if language in ("bash", "sh", ""):
            for line in body.replace("\\\n", " ").splitlines():
                found.append(line.split(" # ")[0].split("  #")[0])
    prose = FENCE.sub("", text)
    found += SPAN.findall(prose.replace("\\|", "|"))
    return found


def calls(prefix: str) -> list[tuple[Path, str, str]]:
    """(page, the word after `prefix`, the rest of that command) for every `prefix WORD ...` in the pages."""
    pattern = re.compile(re.escape(prefix) + r"\s+([\w.-]+)(.*)")
    found = []
    for page in PAGES:
        for snippet in snippets(page):
            for part in re.split(r"\s(?:&&|;|\|)\s", re.sub(r'"[^"]*"', '""', snippet)):  # prompts aside
                match = pattern.search(part)
                if match:
                    found.append((page, match.group(1), match.group(2)))
    return found


@cache
def cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {
        name: {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for name, command in group.commands.items()
    }


@cache
def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@cache
def module_help(module: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"python -m {module} --help failed: {done.stderr[-500:]}"
    return done.stdout


# ------------------------------------------------------------------------------------------------------- tests
def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in "\n".join(lines), f"README.md does not link docs/{page.name}"


def test_every_linked_path_exists() -> None:
    missing = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing


def test_every_mtu_export_command_exists_with_the_options_shown() -> None:
    options = cli_options()
    shown = calls("mtu-export")
    problems = []
    for page, command, rest in shown:
        if command not in options:
            problems.append(f"{page.name}: mtu-export {command} is not a command")
            continue
        unknown = sorted(set(OPTION.findall(rest)) - options[command])
        if unknown:
            problems.append(f"{page.name}: mtu-export {command} has no {', '.join(unknown)}")
    assert len(shown) > 40 and not problems, problems  # the pages show many commands; each one checked


def test_every_make_target_exists() -> None:
    shown = calls("make")
    unknown = sorted({f"{page.name}: make {target}" for page, target, _ in shown if target not in make_targets()})
    assert len(shown) > 20 and not unknown, unknown


def test_every_python_module_runs_with_the_options_shown() -> None:
    shown = [(page, module, rest) for page, module, rest in calls("python -m") if module.startswith("mtu_export")]
    problems = []
    for page, module, rest in shown:
        text = module_help(module)
        problems += [f"{page.name}: python -m {module} has no {o}" for o in set(OPTION.findall(rest)) if o not in text]
    assert len(shown) >= 3 and not problems, problems


def test_readme_quickstart_runs(mtu_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart as written, on the shipped models, with `make demo`'s export replaced by an export of the test
    model (same tasks) and a source image in the working folder."""
    from PIL import Image

    (code,) = [body for language, body in FENCE.findall((ROOT / "README.md").read_text()) if language == "python"]
    export = tmp_path / "onnx"
    result = invoke("onnx", mtu_world, "--task", "edit", "--image-count", "0", "--out", export)
    assert result.exit_code == 0, result.output
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "source.png")
    monkeypatch.chdir(tmp_path)
    code = code.replace('"models/', f'"{ROOT}/models/').replace('"out/demo/onnx"', f'"{export}"')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["image"].shape == (64, 64, 3) and namespace["image"].dtype.name == "uint8"
    assert type(namespace["unet"]).__name__ == "UNet2DConditionModel"
