"""README.md as a user reads it: its first lines give `make demo` and `make test`, every
`python X.py ...` command in its code blocks names a script that exists and whose parser
accepts those arguments as written (the commands that need downloaded data stop right after
parsing; what they do is tested on synthetic data elsewhere), and every path it names in its
file map exists."""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAX_README_LINES = 200
OPENING_LINES = 10  # the two commands a newcomer runs come first


class Parsed(Exception):
    """Raised by the patched parse_args once a command line has been accepted."""


def _commands() -> list[list[str]]:
    """Each `python X.py ...` or `torchrun ... X.py ...` command of the bash blocks, with
    backslash continuations joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if words and words[0] in ("python", "torchrun") and scripts:
                commands.append(words[scripts[0]:])
    return commands


def test_readme_opens_with_the_two_commands_and_stays_short():
    opening = README.splitlines()[:OPENING_LINES]
    assert any(line.startswith("make demo") for line in opening)
    assert any(line.startswith("make test") for line in opening)
    assert len(README.splitlines()) <= MAX_README_LINES


def test_readme_file_map_names_what_exists():
    named = re.findall(r"^\| `([^`]+)`", README, re.M)
    assert len(named) >= 10
    for entry in named:
        assert (ROOT / entry.rstrip("/")).exists(), entry


def test_every_script_runs_as_written(monkeypatch):
    commands = _commands()
    assert {c[0] for c in commands} >= {"extract.py", "pre_process.py", "align_faces.py",
                                        "train.py", "lfw_eval.py", "megaface.py",
                                        "ijb_eval.py", "export_onnx.py"}

    def accept(parser, args=None, namespace=None):
        raise Parsed(parser.parse_known_args(args, namespace))

    for script, *args in commands:
        assert (ROOT / script).is_file(), script
        main = importlib.import_module(script[:-3]).main
        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", accept)
            with pytest.raises(Parsed) as parsed:
                main(args)
        namespace, unknown = parsed.value.args[0]
        assert not unknown, (script, unknown)
