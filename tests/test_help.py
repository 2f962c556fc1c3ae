"""``--help`` of every command a user can run: each script of recipes/ and benchmarks/, ``cure-hf`` and each of
its subcommands, one subprocess each (offline). Every one must exit 0, print a usage line, and state each
argument's default at most once.

The scripts are found by glob and the subcommands from ``cure_hf.cli.build_parser()``, so a new one is covered
without editing this file. The subprocesses (each imports torch, ~10 s) are started together, a few at a time,
when the first test of this module runs; each test then waits for its own.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _scripts():
    return sorted(
        os.path.relpath(path, ROOT)
        for folder in ("recipes", "benchmarks")
        for path in glob.glob(os.path.join(ROOT, folder, "*.py"))
    )


def _subcommands():
    from cure_hf.cli import build_parser

    subparsers = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return sorted(name for action in subparsers for name in action.choices)


def _commands():
    """(test id, argv without the interpreter)."""
    commands = [(script, [script]) for script in _scripts()]
    commands.append(
        (
            "accelerate launch recipes/train_vit.py",
            [
                "-m",
                "accelerate.commands.launch",
                "--num_processes",
                "1",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "recipes/train_vit.py",
            ],
        )
    )
    commands.append(("cure-hf", ["-m", "cure_hf.cli"]))
    commands += [(f"cure-hf {name}", ["-m", "cure_hf.cli", name]) for name in _subcommands()]
    return commands


COMMANDS = dict(_commands())


def _run_help(argv):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    return subprocess.run(
        [sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def help_runs(request):
    """Test id -> future of its CompletedProcess: the commands of this module's selected tests, run concurrently."""
    wanted = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params
    ]
    workers = min(len(wanted) or 1, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield {name: pool.submit(_run_help, COMMANDS[name]) for name in dict.fromkeys(wanted)}


def help_entries(text):
    """The help text cut into blocks: an argument with its (wrapped) help, a section title, a description line.

    An argument's help continues on lines indented past the argument column (argparse puts it at 14+ columns).
    """
    entries = []
    for line in text.splitlines():
        if entries and re.match(r" {8,}\S", line):
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    return entries


STATED_DEFAULT = re.compile(r"\(default[:\s]")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help(name, help_runs):
    done = help_runs[name].result()
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{name} --help exited {done.returncode}:\n{output[-4000:]}"
    assert "usage" in output.lower(), f"{name} --help printed no usage:\n{output[-4000:]}"
    twice = [entry for entry in help_entries(done.stdout) if len(STATED_DEFAULT.findall(entry)) > 1]
    assert not twice, f"{name} --help states a default twice in:\n" + "\n".join(twice)


def test_commands_discovered():
    """The discovery finds what is there: the main recipe, both benchmarks, cure-hf evaluate and plot-history."""
    assert {"recipes/train_vit.py", "benchmarks/bench_step.py", "cure-hf evaluate", "cure-hf plot-history"} <= set(
        COMMANDS
    )


def test_console_script_is_the_tested_main():
    """``cure-hf`` (the installed console script) runs ``cure_hf.cli:main``, the function ``-m cure_hf.cli`` runs."""
    try:
        scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    except Exception as error:  # pragma: no cover - metadata of an odd install
        pytest.skip(f"no entry-point metadata: {error}")
    if "cure-hf" not in scripts:
        pytest.skip("cure_hf is not installed as a distribution (no console script)")
    assert scripts["cure-hf"] == "cure_hf.cli:main"


def test_help_entries_catch_a_repeated_default():
    """The check itself: a wrapped entry with two defaults is one entry, and two entries are two."""
    text = (
        "options:\n  --image_size IMAGE_SIZE\n                        Input size (default: the\n"
        "                        model's). (default: None)\n  --seed SEED           Seed. (default: 0)\n"
    )
    entries = help_entries(text)
    assert [len(STATED_DEFAULT.findall(entry)) for entry in entries] == [0, 2, 1]
