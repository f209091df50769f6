"""Strings from the box (status.json, log lines) reach the terminal as text, never as markup or escapes.

The trainer can write status.json and the training log, so it must not be able to clear the user's
screen (`ESC [2J`), plant a hyperlink (OSC 8, or rich's `[link=...]`) or restyle the output.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from training_infra import naming
from training_infra.cli.safe_text import remote_text

CLEAR_SCREEN = "\x1b[2J"
OSC8_LINK = "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"
MARKUP_LINK = "[link=https://evil.example/]click[/link]"
# Trojan Source (CVE-2021-42574): after a right-to-left override (U+202E) a terminal shows the text
# reversed, so a line can read other than it is; isolates and marks reorder more quietly. The filter
# drops every one of them:
BIDI_CONTROLS = (
    *(chr(c) for c in range(0x202A, 0x202F)),  # LRE RLE PDF LRO RLO
    *(chr(c) for c in range(0x2066, 0x206A)),  # LRI RLI FSI PDI
    "\u200e",  # LRM
    "\u200f",  # RLM
    "\u061c",  # ALM
)
FORCED_TERMINAL = {"FORCE_COLOR": "1", "TERM": "xterm-256color"}  # rich renders as for a real terminal


def _injected_status(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "outcome": f"failed{CLEAR_SCREEN}{MARKUP_LINK}",
        "exit_code": 1,
        "instance_type": f"g5.xlarge{OSC8_LINK}",
        "market": "\u202espot\x07\x9b2J\u2066\u200f",
        "started_at": "2026-11-20T08:00:00Z",
        "ended_at": "2026-11-20T09:00:00Z",
        "message": f"bye{CLEAR_SCREEN}",
    }


def _assert_harmless(output: str) -> None:
    for sequence in (CLEAR_SCREEN, "\x1b]8;", "\x07", "\x9b", *BIDI_CONTROLS):
        assert sequence not in output, f"{sequence!r} reached the terminal"


@pytest.mark.parametrize("columns", ["250", "40"], ids=["wide", "narrow"])
def test_status_prints_status_json_fields_without_their_escape_sequences_or_markup(stacks, columns):
    stacks.put_status(_injected_status(f"inject-{columns}"))

    result = stacks.cli("status", f"inject-{columns}", "-o", "wide", env={**FORCED_TERMINAL, "COLUMNS": columns})

    assert result.exit_code == 0, result.output
    _assert_harmless(result.stdout)
    assert MARKUP_LINK in result.stdout, "markup is shown as the text it is"
    assert "g5.xlargeclick" in result.stdout and "2J" not in result.stdout, "whole sequences go, parameters too"


def test_logs_prints_log_lines_without_escape_sequences_keeping_tabs(stacks):
    logs = stacks.client("logs")
    group = stacks.outputs[naming.OUTPUT_LOG_GROUP_NAME]
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName=group, logStreamName="inject-logs")
    lines = [f"epoch 1{CLEAR_SCREEN}", f"see {OSC8_LINK}", f"{MARKUP_LINK}\tloss 0.1", "\x1b]0;new title\x07done"]
    now_ms = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName=group,
        logStreamName="inject-logs",
        logEvents=[{"timestamp": now_ms + i, "message": line} for i, line in enumerate(lines)],
    )
    stacks.put_status({"run_id": "inject-logs", "outcome": "succeeded"})

    result = stacks.cli("logs", "inject-logs")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["epoch 1", "see click", f"{MARKUP_LINK}\tloss 0.1", "done"]


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain\ttext", "plain\ttext"),
        ("two\nlines", "two\nlines"),
        (f"a{CLEAR_SCREEN}b", "ab"),
        ("\x1b[1;31mred\x1b[0m", "red"),
        (OSC8_LINK, "click"),
        ("\x1b]0;title\x07x", "x"),
        ("\x1bPdevice control\x1b\\x", "x"),
        ("\x9b31mc1\x9d0;t\x9cy", "c1y"),
        ("cr\rbs\x08nul\x00del\x7f", "crbsnuldel"),
        ("trailing escape\x1b", "trailing escape"),
    ],
)
def test_remote_text_removes_every_escape_sequence_and_control_character_but_newline_and_tab(raw, shown):
    assert remote_text(raw) == shown


@pytest.mark.parametrize("control", BIDI_CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_remote_text_removes_each_bidi_control_so_a_line_shows_in_the_order_it_was_written(control):
    assert remote_text(f"access = {control}admin{control}\tok") == "access = admin\tok"


def test_remote_text_keeps_right_to_left_letters_and_other_unicode():
    """Only the controls go: Arabic and Hebrew text, accents and emoji are shown as written."""
    text = "epoch 1 — مرحبا שלום café 🚀"
    assert remote_text(text) == text


def test_remote_text_escapes_markup_only_where_rich_would_render_it():
    from rich.console import Console

    console = Console(width=200, force_terminal=True, color_system="truecolor", highlight=False)
    with console.capture() as captured:
        console.print(remote_text(MARKUP_LINK, markup=True))
    assert captured.get().strip() == MARKUP_LINK and "\x1b]8;" not in captured.get()
    assert remote_text(MARKUP_LINK) == MARKUP_LINK
