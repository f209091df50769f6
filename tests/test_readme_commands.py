"""The commands the README and docs tell a newcomer to type are ones that work (issue 14)."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _make_commands() -> list[tuple[str, str]]:
    """Every `make ...` in inline code or a bash block, with the file it is in."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"`(make [^`]+)`", text)
        spans += [
            line.split("#")[0].strip()
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines()
        ]
        found += [
            (doc.name, span) for span in spans if span.startswith("make ") and "<" not in span and "..." not in span
        ]
    return sorted(set(found))


@pytest.mark.parametrize(("doc", "command"), _make_commands(), ids=lambda value: value)
def test_every_make_command_in_the_docs_is_one_make_accepts(doc, command):
    """`make deploy -c github_repo=...` (README step 1) failed with `make: invalid option -- 'c'`."""
    result = subprocess.run(
        ["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{doc}: `{command}`: {result.stderr.strip()}"


def test_the_readme_says_how_to_get_training_infra_on_path_before_the_first_command_using_it():
    text = (ROOT / "README.md").read_text()
    first_use = re.search(r"`training-infra (outputs|upload|launch|status|logs|fetch|cost)\b", text)
    assert first_use is not None
    assert 0 <= text.find("source .venv/bin/activate") < first_use.start()
    assert 0 <= text.find(".venv/bin/python -m training_infra") < first_use.start(), "and a way without activating"
