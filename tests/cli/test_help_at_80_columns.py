"""`--help` of every verb at 80 columns and in a pipe (issue 27): whole option names, wrapped text, no type noise."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from training_infra.cli.main import app

TYPE_NOISE = re.compile(r"<(bool|str|int|float|path|list\[[a-z]+\]|text)>", re.IGNORECASE)


def _verbs() -> list[list[str]]:
    """Every verb path: [], [launch], ..., [local, up]."""
    found: list[list[str]] = [[]]
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        found.append([name])
        found += [[name, sub] for sub in getattr(command, "commands", {})]
    return found


def _help(*verb: str) -> str:
    result = CliRunner().invoke(app, [*verb, "--help"], env={"COLUMNS": "80"}, prog_name="training-infra")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("verb", _verbs(), ids=lambda verb: " ".join(verb) or "training-infra")
def test_help_of_every_verb_fits_80_columns_uncut_and_without_type_noise(verb):
    text = _help(*verb)

    long = [line for line in text.splitlines() if len(line) > 80]
    assert not long, f"lines over 80 columns: {long}"
    assert "…" not in text
    assert not TYPE_NOISE.search(text), TYPE_NOISE.search(text)
    assert "\x1b" not in text, "no colour codes when piped"
    split = [line for line in text.splitlines() if re.search(r"[A-Za-z0-9]-$", line)]
    assert not split, f"a word or an option name broken at a hyphen: {split}"


def test_every_verb_is_listed_with_its_whole_first_sentence():
    text = _help()

    for verb in ("outputs", "upload", "launch", "status", "logs", "connect", "fetch", "stop", "cost", "local"):
        assert re.search(rf"^  {verb} ", text, re.MULTILINE), verb
    flat = " ".join(text.split())  # lines break only at spaces
    assert "Cost per run in a period, in total, and the saving against on-demand prices." in flat


def test_launch_help_groups_its_options_and_names_each_option_whole():
    text = _help("launch")

    sections = re.findall(r"^([A-Z][A-Za-z ]+):$", text, re.MULTILINE)
    assert sections == ["Resources", "Limits", "Image and command", "Secrets", "The run", "Options"]
    assert "--max-restarts-on-errors N" in text
    flat = " ".join(text.split())
    assert "NAME=arn:aws:secretsmanager:..." in flat and "training-infra:managed=true" in flat
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", text))
    assert "--instance-types" in mentioned, "named in --instance-type's help, on one line"


def test_launch_data_access_is_listed_under_image_and_command():
    text = _help("launch")

    image = text.split("\nImage and command:\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^  --data-access sync\|mount ", image, re.MULTILINE), image


def test_help_never_says_seed():
    assert "seed" not in " ".join(_help(*verb) for verb in _verbs()).lower()
