"""README says what the program does: its CLI table lists exactly the commands and options `--help` shows, and
its shell examples work when pasted into a shell."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import typer.main

from tests.conftest import REPO
from webhooks.review.auth import parse_users, verify_password
from worker.cli import app

README = (REPO / "README.md").read_text(encoding="utf-8")


def cli_section() -> str:
    start = README.index("## The CLI")
    return README[start : README.index("\n## ", start + 1)]


def commands_from_help() -> dict[str, set[str]]:
    """Every leaf command (``events list``) and its options, as `--help` shows them (the same click objects)."""
    found: dict[str, set[str]] = {}

    def walk(command: typer.main.TyperGroup, prefix: list[str]) -> None:
        for name, sub in command.commands.items():
            if isinstance(sub, typer.main.TyperGroup):
                walk(sub, [*prefix, name])
                continue
            options = {o for p in sub.params if p.param_type_name == "option" for o in p.opts if o.startswith("--")}
            found[" ".join([*prefix, name])] = options - {"--help"}

    walk(typer.main.get_command(app), [])  # type: ignore[arg-type]
    return found


def commands_from_readme(known: set[str]) -> dict[str, set[str]]:
    """Each table row's first cell: backticked usages, each starting with a command; every --option named in the row."""
    found: dict[str, set[str]] = {}
    for line in cli_section().splitlines():
        if not line.startswith("| `"):
            continue
        first, rest = line[2:].split(" | ", 1)
        for usage in re.findall(r"`([^`]+)`", first):
            words = usage.split()
            name = " ".join(words[:2]) if " ".join(words[:2]) in known else words[0]
            # Options a row's description spells out (hold and capture share consume's) count as the row's.
            found.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", usage + " " + rest))
    return found


class TestCliTable:
    def test_lists_every_command_and_nothing_else(self) -> None:
        helped = commands_from_help()
        documented = commands_from_readme(set(helped))
        assert sorted(documented) == sorted(helped)

    def test_each_command_row_names_exactly_its_options(self) -> None:
        helped = commands_from_help()
        documented = commands_from_readme(set(helped))
        wrong = {
            name: {"missing from README": sorted(helped[name] - opts), "not in --help": sorted(opts - helped[name])}
            for name, opts in documented.items()
            if name in helped and opts != helped[name]
        }
        assert wrong == {}

    def test_margin_names_its_window(self) -> None:
        # The row the issue found wrong: margin needs --since and --until.
        (row,) = [line for line in cli_section().splitlines() if line.startswith("| `margin")]
        assert "--since ISO --until ISO" in row


class TestReviewUsersExample:
    def test_the_hash_password_line_works_pasted_into_a_shell(self) -> None:
        (line,) = [ln for ln in README.splitlines() if "hash-password" in ln and ln.startswith("export")]
        command = line.split("#")[0].strip()
        script = f'{command}\nprintf "%s" "$REVIEW_USERS"'
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # The prompts read stdin when there is no terminal (the password typed twice).
        out = subprocess.run(
            ["bash", "-c", script.replace("python ", f"{sys.executable} ", 1)],
            input="s3cret $HOME `x`\ns3cret $HOME `x`\n",
            capture_output=True,
            text=True,
            env=env,
            start_new_session=True,
            timeout=60,
            check=True,
        ).stdout
        users = parse_users(out)
        assert list(users) == ["alice"]
        assert verify_password("s3cret $HOME `x`", users["alice"].password_hash)

    def test_the_pasted_form_keeps_the_dollar_signs(self) -> None:
        (line,) = [ln for ln in README.splitlines() if ln.startswith("export REVIEW_USERS='")]
        real = "alice:scrypt$16384$8$1$c2FsdA$a2V5"
        pasted = re.sub(r"alice:scrypt\$[^,']+", lambda _: real, line)
        pasted = re.sub(r",bob:scrypt\$[^']+", "", pasted)
        out = subprocess.run(
            ["bash", "-c", f'{pasted}\nprintf "%s" "$REVIEW_USERS"'], capture_output=True, text=True, check=True
        ).stdout
        assert out == real
