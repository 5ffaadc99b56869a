"""The README is the user's manual: every `vertical` command it shows must be one the CLI accepts
(its command, sub-command and options), so the manual cannot drift from the tool. What the
commands do is tested elsewhere on tiny builds; `./setup.sh` and `bash .ci/run` are run by CI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """The arguments of every `.venv/bin/vertical ...` line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in block.splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line.startswith(".venv/bin/vertical "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_every_vertical_command_in_the_readme_is_one_the_cli_accepts(cli):
    commands = readme_commands()
    assert len(commands) >= 8, commands
    for args in commands:
        # --help stops before anything runs, after the command line is parsed: an unknown command or
        # option still fails
        code, output = cli(*args, "--help")
        assert code == 0 and "Usage:" in output, f"vertical {shlex.join(args)}:\n{output[-400:]}"


def test_a_command_the_cli_does_not_know_fails_this_check(cli):
    code, output = cli("ask", "builds/medical", "question", "--no-such-option", "--help")
    assert code != 0 and "No such option" in output


@pytest.mark.slow
def test_the_tours_ask_and_chat_answer_with_citations_and_exit_cleanly(tiny_pack, tmp_path, tiny_model_dir):
    """`vertical ask` and `vertical chat` as the README's tour runs them, in their own processes on a
    tiny build: a cited answer, then exit status 0."""
    import subprocess
    import sys

    from vertical import pipeline

    build = tmp_path / "build"
    pipeline.build(tiny_pack, out=build, steps=["base", "index"], base_model=str(tiny_model_dir))
    vertical = [sys.executable, "-m", "vertical"]
    question = "What colour is the Zorblat fruit?"
    asked = subprocess.run([*vertical, "ask", str(build), question], capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr[-2000:]
    assert re.search(r"^\[\d\] The (Zorblat fruit|valley of Quentar)", asked.stdout, re.M), asked.stdout
    chatted = subprocess.run([*vertical, "chat", str(build)], input=f"{question}\n\n", capture_output=True,
                             text=True, timeout=300)
    assert chatted.returncode == 0, chatted.stderr[-2000:]
    assert re.search(r"^\[\d\] The (Zorblat fruit|valley of Quentar)", chatted.stdout, re.M), chatted.stdout
