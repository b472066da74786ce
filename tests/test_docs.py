"""The documentation against the code: the configuration reference is generated, and every
command in a ```bash block of the README and docs/ is one the code accepts.

Commands on the demo run for real elsewhere: `make demo` is `raylt run configs/demo.yaml
--baseline` (the `demo_run` fixture), `raylt predict` / `tune` / `report` / `mlflow models
serve` on its model (serve/test_predict.py, experiments/test_tune.py), `raylt embed` (test_cli.py), the
cluster job (test_cluster.py). Commands on data that is not here (Places-LT images, CIFAR
pickles) are parsed, and their configs resolved with the same overrides, so a renamed flag,
key or file in the docs fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from raylt.cli import parse_args
from raylt.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_config_reference_is_generated_from_the_code():
    from raylt.config.reference import reference

    text = reference()
    assert (REPO / "docs" / "CONFIG.md").read_text() == text, (
        "docs/CONFIG.md is stale: run `raylt config --reference > docs/CONFIG.md`")
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert len(rows) > 80
    assert [r for r in rows if r.rstrip().endswith("|  |")] == []  # every key says what it does


def commands() -> list[tuple[str, str]]:
    """(file:line, command) of every line in a ```bash block, continuation lines joined and
    comments dropped."""
    out = []
    for doc in DOCS:
        lines, start = doc.read_text().splitlines(), None
        block, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("```"):
                block = line.strip() == "```bash" and not block
                i += 1
                continue
            if block and line.strip() and not line.lstrip().startswith("#"):
                start, cmd = i + 1, line.rstrip()
                while cmd.endswith("\\"):
                    i += 1
                    cmd = cmd[:-1] + " " + lines[i].strip()
                cmd = re.sub(r"\s+#\s.*$", "", cmd).strip()
                out.append((f"{doc.relative_to(REPO)}:{start}", cmd))
            i += 1
    return out


def _job_prefix(script: str) -> list[str]:
    """The `raylt` arguments a job script puts before the user's (`main(["run", CONFIG, ...`)."""
    src = (REPO / script).read_text()
    m = re.search(r"main\(\[(.*?)\*sys\.argv", src, re.S)
    assert m, f"{script} does not call raylt's main"
    return [s.strip().strip("\"'") for s in m.group(1).split(",") if s.strip()]


def raylt_argv(cmd: str) -> list[str] | None:
    """The raylt argv a documented command amounts to, or None for other tools."""
    words = shlex.split(cmd)
    if words[0] in ("raylt", ".venv/bin/raylt"):
        return words[1:]
    if "python" in words and words[words.index("python") + 1].startswith("jobs/"):
        k = words.index("python")
        return _job_prefix(words[k + 1]) + words[k + 2:]
    return None


def check(argv: list[str]) -> None:
    """Parse as `raylt` does and resolve the config with its overrides."""
    args = parse_args(argv)
    config = getattr(args, "config", None)
    if config and not config.startswith("configs/"):  # written by an earlier command (tune's best.yaml)
        assert config.endswith(".yaml"), f"config {config} is not a YAML file"
        config = None
    if hasattr(args, "overrides"):
        load_config(REPO / config if config else None, args.overrides)


def test_every_documented_command_is_one_the_code_accepts():
    found = commands()
    checked, other = [], []
    for where, cmd in found:
        argv = raylt_argv(cmd)
        if argv is None:
            other.append((where, cmd))
            continue
        try:
            check(argv)
        except (Exception, SystemExit) as e:
            pytest.fail(f"{where}: `{cmd}` is not accepted: {type(e).__name__}: {e}")
        checked.append(cmd)
    assert len(checked) >= 15, checked
    for where, cmd in other:
        words = shlex.split(cmd)
        while re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the command
            words = words[1:]
        if words[0] == "make":
            targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M)
            assert words[1] in targets, f"{where}: no make target {words[1]!r}"
        elif words[0] == "python" or words[0].endswith("/python"):
            assert (REPO / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        else:  # other tools: ray, mlflow, pip, git, export ...
            assert words[0].split("/")[-1] in {"ray", "mlflow", "pip", "git", "export", "source", "curl", "cd"}, (
                f"{where}: unknown command {cmd!r}")
