"""pipelines/examples/: every command in the job files is one the real CLI takes, with options it has.

Shell scripts (SLURM) and the crontab are read line by line, ``\\`` continuations joined, and split into
commands at ``;``, ``&&``, ``||`` and ``|``; the Kubernetes manifest is read with PyYAML. Each ``medseg ...``
(also ``python -m medseg.cli`` and ``torchrun ... -m medseg.cli``) is walked down the real command tree
(``typer.main.get_command(medseg.cli.app)``): the subcommand must exist and every ``--option`` must be one of its
parameters, with a value where it takes one; ``KEY=VALUE`` overrides of ``medseg train`` must validate against
the preset. ``python -m pipelines.X`` commands are checked against what ``--help`` of that pipeline prints in a
subprocess, and torchrun's options against ``torchrun --help``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from medseg.cli import app
from medseg.config import CONFIG_DIR, load_config
from tests.helpers import REPO

EXAMPLES = REPO / "pipelines" / "examples"
CONTROL = {";", "&&", "||", "|", "&"}


@dataclass
class Invocation:
    """One command found in a file: ``medseg`` (args after it), a pipeline module, or ``torchrun``."""

    where: str
    kind: str  # "medseg", "pipeline" or "torchrun"
    args: list[str]
    module: str = ""


def logical_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined; comment lines (``#SBATCH`` too) and blank lines dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    return out


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at control operators, redirections dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    toks, out, cur, i = list(lex), [], [], 0
    while i < len(toks):
        t = toks[i]
        if t in CONTROL:
            out, cur = out + [cur], []
        elif set(t) <= set("<>&"):  # a redirection: drop it and its target
            i += 1
        elif t.isdigit() and i + 1 < len(toks) and set(toks[i + 1]) <= set("<>&"):
            pass  # the file descriptor of `2>&1`
        else:
            cur.append(t)
        i += 1
    return [c for c in out + [cur] if c]


def invocations(cmd: list[str], where: str) -> list[Invocation]:
    """The medseg / pipeline / torchrun calls in one simple command."""
    found = []
    for i, t in enumerate(cmd):
        launched = all(re.fullmatch(r"[A-Za-z_]\w*=.*|srun|exec|nice|time", w) for w in cmd[:i])
        if launched and (t == "medseg" or t.endswith("/bin/medseg")):  # the command word, not `cd /srv/medseg`
            return [*found, Invocation(where, "medseg", cmd[i + 1 :])]
        if t == "torchrun" or t.endswith("/torchrun"):
            m = cmd.index("-m", i)
            found.append(Invocation(where, "torchrun", cmd[i + 1 : m]))
        if t == "-m" and i + 1 < len(cmd):
            module = cmd[i + 1]
            if module == "medseg.cli":
                return [*found, Invocation(where, "medseg", cmd[i + 2 :])]
            if module.startswith("pipelines."):
                return [*found, Invocation(where, "pipeline", cmd[i + 2 :], module)]
    return found


def shell_invocations(path: Path) -> list[Invocation]:
    """Every invocation in a shell script (a crontab's 5 schedule fields are checked and dropped first)."""
    found = []
    for n, line in enumerate(logical_lines(path.read_text()), 1):
        if path.name == "crontab":
            if re.fullmatch(r"[A-Z_]+=.*", line):  # an environment line
                continue
            fields = line.split(None, 5)
            assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), f"{path}: {line}"
            line = fields[5]
            assert "%" not in line, f"{path}: cron turns % into a newline: {line}"
        for cmd in commands(line):
            found += invocations(cmd, f"{path.name} (line {n})")
    return found


def yaml_invocations(path: Path) -> list[Invocation]:
    """Every invocation in the containers of a Kubernetes manifest (``command`` + ``args``; ``sh -c`` scripts)."""
    found = []
    for doc in yaml.safe_load_all(path.read_text()):
        spec = doc["spec"]["template"]["spec"]
        for c in spec["containers"]:
            argv = [str(a) for a in [*c.get("command", []), *c.get("args", [])]]
            if argv[:1] in (["sh"], ["bash"], ["/bin/sh"], ["/bin/bash"]) and "-c" in argv:
                for cmd in commands(argv[argv.index("-c") + 1]):
                    found += invocations(cmd, f"{path.name} ({c['name']})")
            else:
                found += invocations(argv, f"{path.name} ({c['name']})")
    return found


def all_invocations() -> list[Invocation]:
    found = []
    for path in sorted(EXAMPLES.iterdir()):
        if path.suffix in (".sbatch", ".sh") or path.name == "crontab":
            found += shell_invocations(path)
        elif path.name.endswith(".job.yaml"):
            found += yaml_invocations(path)
    return found


# ---- the real command tree -----------------------------------------------------------------------------
def options_of(command: Any) -> dict[str, Any]:
    """``--name`` -> its click parameter, for every option of a click command (negative forms included)."""
    return {o: p for p in command.params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]}


def check_options(args: list[str], options: dict[str, Any], where: str, what: str) -> list[str]:
    """The positional arguments of ``args``, once every ``--option`` is known and has its value."""
    positional, i = [], 0
    while i < len(args):
        t = args[i]
        if t.startswith("--"):
            name = t.split("=", 1)[0]
            assert name in options, f"{where}: `{what}` has no option {name} (it has {sorted(options)})"
            if not options[name].is_flag and "=" not in t:
                assert i + 1 < len(args) and not args[i + 1].startswith("--"), f"{where}: {name} needs a value"
                i += 1
        else:
            positional.append(t)
        i += 1
    return positional


def check_medseg(inv: Invocation) -> tuple[str, list[str]]:
    """Walk ``medseg ARGS`` down the real command tree; ``(command path, its positional arguments)``."""
    cmd, path, args = typer.main.get_command(app), [], list(inv.args)
    while hasattr(cmd, "commands"):  # a group: its options, then a subcommand
        while args and args[0].startswith("--"):
            check_options(args[:1], options_of(cmd), inv.where, "medseg")
            args.pop(0)
        assert args and args[0] in cmd.commands, f"{inv.where}: `medseg {' '.join(path + args[:1])}` is no command"
        path.append(args[0])
        cmd = cmd.commands[args.pop(0)]
    positional = check_options(args, options_of(cmd), inv.where, f"medseg {' '.join(path)}")
    n_args = sum(1 for p in cmd.params if p.param_type_name == "argument")
    assert n_args or not positional, f"{inv.where}: `medseg {' '.join(path)}` takes no arguments: {positional}"
    return " ".join(path), positional


def check_train_overrides(inv: Invocation, positional: list[str]) -> None:
    """``medseg train PRESET KEY=VALUE...``: a real preset, and overrides its config validates."""
    if not positional:  # --resume RUN_DIR: the run's own config
        assert "--resume" in inv.args, f"{inv.where}: medseg train without a preset needs --resume"
        return
    preset, overrides = positional[0], positional[1:]
    assert (CONFIG_DIR / f"{preset}.yaml").is_file(), f"{inv.where}: no preset {preset!r} in {CONFIG_DIR}"
    assert all("=" in o for o in overrides), f"{inv.where}: overrides are KEY=VALUE: {overrides}"
    load_config(preset, overrides)  # unknown keys or wrong types raise ConfigError


@cache
def help_text(*argv: str) -> str:
    p = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return p.stdout + p.stderr


def check_pipeline(inv: Invocation) -> None:
    """``python -m pipelines.X ...``: the options ``--help`` of that pipeline lists, and real files/presets."""
    text = help_text(sys.executable, "-m", inv.module)
    assert "usage:" in text, f"{inv.where}: {inv.module} --help printed no usage:\n{text}"
    if inv.module == "pipelines.nightly_predict":  # one argument: the YAML config, here a file of the repo
        from pipelines.nightly_predict import load_nightly_config

        assert len(inv.args) == 1 and not inv.args[0].startswith("-"), f"{inv.where}: {inv.args}"
        load_nightly_config(REPO / inv.args[0])
        return
    known = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    i, positional, overrides = 0, [], []
    while i < len(inv.args):
        t = inv.args[i]
        if t.startswith("--"):
            assert t.split("=", 1)[0] in known, f"{inv.where}: {inv.module} has no option {t} (--help: {sorted(known)})"
            takes_value = re.search(rf"\[{re.escape(t)} [^\]]+\]", text) is not None  # usage: [--output OUTPUT]
            if t == "--set":
                overrides.append(inv.args[i + 1])
            i += 1 if takes_value else 0
        else:
            positional.append(t)
        i += 1
    assert len(positional) == 1, f"{inv.where}: {inv.module} takes one CONFIG, got {positional}"
    load_config(positional[0], overrides)


# ---- the tests ---------------------------------------------------------------------------------------------
def test_the_parsers_find_what_the_files_hold() -> None:
    assert logical_lines("a \\\n  b \\\n  c\n# x\nd\n") == ["a    b    c", "d"]
    assert commands("cd /x && python -m m a >> log 2>&1; b 'q r'") == [
        ["cd", "/x"],
        ["python", "-m", "m", "a"],
        ["b", "q r"],
    ]
    invs = all_invocations()
    by_file = {i.where.split(" ")[0] for i in invs}
    expected = {p.name for p in EXAMPLES.iterdir() if p.suffix == ".sbatch" or p.name in ("crontab",)}
    expected |= {p.name for p in EXAMPLES.glob("*.job.yaml")}
    assert by_file == expected and len(expected) >= 5
    kinds = {(i.kind, i.module or (i.args[0] if i.kind == "medseg" else "")) for i in invs}
    assert {
        ("medseg", "train"),
        ("medseg", "predict"),
        ("pipeline", "pipelines.train_evaluate_register"),
        ("pipeline", "pipelines.nightly_predict"),
        ("torchrun", ""),
    } <= kinds


@pytest.mark.parametrize("inv", [i for i in all_invocations() if i.kind == "medseg"], ids=lambda i: i.where)
def test_every_medseg_command_is_real(inv: Invocation) -> None:
    command, positional = check_medseg(inv)
    if command == "train":
        check_train_overrides(inv, positional)
    if command == "predict":
        model = inv.args[inv.args.index("--model") + 1]
        assert "--resume" in inv.args and "--tracking-uri" in inv.args
        assert model.startswith("$") or re.fullmatch(r"models:/[\w.-]+(@\w+|/\d+)", model)


@pytest.mark.parametrize("inv", [i for i in all_invocations() if i.kind == "pipeline"], ids=lambda i: i.where)
def test_every_pipeline_command_is_real(inv: Invocation) -> None:
    check_pipeline(inv)


def test_torchrun_options_are_real_and_match_the_gpus_asked_for() -> None:
    text = help_text(str(Path(sys.executable).parent / "torchrun"))
    for inv in [i for i in all_invocations() if i.kind == "torchrun"]:
        for t in inv.args:
            assert t.split("=", 1)[0] in text, f"{inv.where}: torchrun has no option {t}"
        nproc = next(t.split("=", 1)[1] for t in inv.args if t.startswith("--nproc_per_node="))
        script = (EXAMPLES / inv.where.split(" ")[0]).read_text()
        assert re.search(rf"^#SBATCH --gres=gpu:{nproc}$", script, re.M), f"{inv.where}: {nproc} ranks, other GPUs"
        assert re.search(r"^#SBATCH --nodes=1$", script, re.M)


def test_slurm_scripts_resume_log_and_take_the_tracking_server_from_the_environment() -> None:
    for path in EXAMPLES.glob("*.sbatch"):
        text = path.read_text()
        directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
        assert all(re.fullmatch(r"--[a-z-]+(=\S+)?", d) for d in directives), path
        keys = {d.split("=")[0] for d in directives}
        assert {"--gres", "--time", "--mem", "--output", "--requeue"} <= keys, f"{path.name}: {keys}"
        assert '"${MLFLOW_TRACKING_URI:?' in text and '--tracking-uri "$MLFLOW_TRACKING_URI"' in text
        assert "--resume" in text and text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    array = (EXAMPLES / "predict_array.sbatch").read_text()
    assert re.search(r"^#SBATCH --array=0-\d+", array, re.M)  # 0-based: shard I of N is the task id
    assert '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"' in array


def test_kubernetes_job_retries_by_the_pipeline_exit_codes() -> None:
    from pipelines.pipeline_steps import EXIT_EVALUATION, EXIT_LOCKED, EXIT_TRACKING, EXIT_TRAINING, EXIT_USAGE

    (job,) = yaml.safe_load_all((EXAMPLES / "train_evaluate_register.job.yaml").read_text())
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    (container,) = pod["containers"]
    fail_now = {
        c
        for r in job["spec"]["podFailurePolicy"]["rules"]
        if r["action"] == "FailJob"
        for c in r.get("onExitCodes", {}).get("values", [])
    }
    assert {EXIT_USAGE, EXIT_EVALUATION, EXIT_LOCKED} <= fail_now and not {EXIT_TRAINING, EXIT_TRACKING} & fail_now
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]} and "--resume" in container["args"]


def test_the_nightly_config_of_the_crontab_uses_the_champion_alias() -> None:
    from pipelines.nightly_predict import load_nightly_config

    cfg = load_nightly_config(EXAMPLES / "nightly.yaml")
    assert re.fullmatch(r"models:/[\w.-]+@champion", cfg.model) and cfg.resume and cfg.tracking_uri is None
    assert "MLFLOW_TRACKING_URI=" in (EXAMPLES / "crontab").read_text()
