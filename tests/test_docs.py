"""The manual cannot drift from the code: the site builds with --strict (a broken link, a missing
anchor or a page left out of the navigation fails), and every command shown in a shell block of
README.md, docs/ and benchmarks/README.md still composes (launch/*.py: its config with its
overrides, without running it) or still takes its flags (tools/*.py and pemt-* scripts: checked
against the tool's --help)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
# What a documented command line may start with, and what it runs
LAUNCH = re.compile(r"^(?:\S*python3?|pemt-(pretrain|finetune))\s*(launch/(pretrain|finetune)\.py)?")
TOOLS = {p.stem: p for p in (REPO / "tools").glob("*.py")}
SCRIPT_TOOLS = {f"pemt-{name.replace('_', '-')}": name for name in TOOLS}


def _commands() -> list[tuple[str, str]]:
    """(where, command) for every command line in the manual's shell blocks."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            line_no = text[: block.start()].count("\n") + 2
            joined = block.group(1).replace("\\\n", " ")
            for offset, line in enumerate(joined.splitlines()):
                command = re.split(r"\s+#\s", line)[0].strip()  # a trailing comment
                for part in re.split(r"\s*(?:&&|;|\|\|?)\s*", command):
                    if re.search(r"(launch/\w+\.py|tools/\w+\.py|\bpemt-[a-z-]+)", part):
                        found.append((f"{page.relative_to(REPO)}:{line_no + offset}", part.strip()))
    return found


COMMANDS = _commands()


def _words(command: str) -> list[str]:
    words = shlex.split(command)
    while words and ("=" in words[0] and not words[0].startswith("-") or words[0] in ("nohup", "cd")):
        words = words[1:]  # VAR=value prefixes, nohup
    return [w for w in words if not w.startswith(">") and w not in ("&", "2>&1")]


def _first_of_sweep(override: str) -> str:
    """A sweep override (`a=1,2`, `a=range(...)`) as its first point."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(override)
    if not parsed.is_sweep_override():
        return override
    first = next(iter(parsed.sweep_string_iterator()))
    return f"{parsed.get_key_element()}={first}"


@cache
def _help(tool: str) -> str:
    done = subprocess.run([sys.executable, str(TOOLS[tool]), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"tools/{tool}.py --help failed: {done.stderr[-1000:]}"
    return done.stdout


def test_the_manual_documents_commands() -> None:
    launches = [c for _, c in COMMANDS if "launch/" in c or c.startswith(("pemt-pretrain", "pemt-finetune"))]
    tools = [c for _, c in COMMANDS if "tools/" in c]
    assert len(launches) >= 15 and len(tools) >= 15, (len(launches), len(tools))  # the parser finds them


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_still_composes_or_takes_its_flags(where: str, command: str) -> None:
    words = _words(command)
    tool = next((Path(w).stem for w in words if re.fullmatch(r"(\S*/)?tools/\w+\.py", w)), None)
    script = next((w for w in words if w.startswith("pemt-")), None)
    if tool is None and script in SCRIPT_TOOLS:
        tool = SCRIPT_TOOLS[script]
    if tool is not None:
        given = {w.split("=")[0] for w in words if w.startswith("--")}
        known = set(re.findall(r"--[a-z][a-z0-9-]*", _help(tool)))
        assert given <= known, f"{where}: {command}\n  tools/{tool}.py takes no {sorted(given - known)}"
        return
    entry = next((m for w in words if (m := re.fullmatch(r"(?:\S*/)?launch/(pretrain|finetune)\.py", w))), None)
    name = entry.group(1) if entry else (script or "").removeprefix("pemt-")
    if name not in ("pretrain", "finetune"):
        pytest.skip(f"not a launch or a tool: {command}")
    start = words.index(entry.group(0)) + 1 if entry else words.index(script or "") + 1
    overrides = [
        _first_of_sweep(w)
        for w in words[start:]
        if "=" in w and not w.startswith(("-", "hydra")) and not re.search(r"\$|<|\.\.\.$", w.split("=", 1)[1])
    ]
    from pemt.config import compose_config

    try:
        compose_config(name, overrides)
    except Exception as err:  # noqa: BLE001 - any failure to compose is the drift this test is for
        pytest.fail(f"{where}: {command}\n  does not compose: {type(err).__name__}: {err}", pytrace=False)


def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "index.html").read_text().count("sharing_quality.py") >= 1
