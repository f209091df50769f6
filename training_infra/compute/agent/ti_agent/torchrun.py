"""A gang's training command as one torchrun launch (issue 25): what is wrapped, what runs as the user's
own torchrun, and what is refused because it would run N independent trainers writing the same keys.

Standard library only: the agent decides with it on the box (gang.py) and the CLI and the run spec refuse
the same commands at launch time (launch_rules.py), before anything is created. docs/agent.md, "Multi-node
runs", has the table.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from enum import StrEnum

# python's documented options (`python --help`): those without an argument, those with one (attached or the
# next word), and those a wrapped trainer cannot have (-c and `-` read no script, -i waits on a terminal, the
# others print and exit).
FLAGS_ALONE = frozenset("bBdEIOPqsSuvx")
FLAGS_WITH_ARGUMENT = frozenset("WX")
LONG_WITH_ARGUMENT = frozenset({"--check-hash-based-pycs"})
FLAGS_REFUSED = {
    "c": "python -c runs no script",
    "i": "python -i waits for a terminal",
    "h": "python -h prints its help and exits",
    "V": "python -V prints its version and exits",
}
TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
SHELLS = ("sh", "bash", "dash")
ALLOWED = (
    "python [python's flags] SCRIPT|-m MODULE [ARGS] (wrapped in torchrun), or your own torchrun (torchrun ..., "
    "python -m torch.distributed.run ..., or sh -c '... torchrun ...'), without unquoted ; & | < > ( ) or `"
)


class Launch(StrEnum):
    WRAPPED = "wrapped"  # `python ... SCRIPT|-m MODULE` became `python -m torch.distributed.run ...`
    USER_TORCHRUN = "user-torchrun"  # the user's own torchrun: the PET_* variables fill what it leaves out


class CommandRefused(ValueError):
    """One line: why this command cannot run as a gang (the attempt fails, or the launch is refused)."""


@dataclass(frozen=True)
class Word:
    text: str  # as the shell passes it (quotes removed)
    start: int  # where it begins in the command as typed


@dataclass(frozen=True)
class Plan:
    """How the command runs on a gang: `how`, and for a wrapped one the words before the interpreter (assignments,
    kept as typed), the interpreter, and the typed text torchrun gets (`tail`), run as given (`no_python`) or as
    torchrun's own script or module (its `python -u SCRIPT`)."""

    how: Launch
    assignments: str = ""
    interpreter: str = ""
    tail: str = ""
    no_python: bool = False


def shell_operator(command: str) -> str:
    """The first shell operator or substitution outside quotes ('' when none): what would make the command more
    than one program (`a; b`, `a | b`, `a && b`, redirections, subshells, backquotes and `$(...)`)."""
    quote, i = "", 0
    while i < len(command):
        ch = command[i]
        if quote == "'":
            quote = "" if ch == "'" else quote
        elif ch == "\\":
            i += 2
            continue
        elif ch == "`" or command.startswith("$(", i):
            return "$(" if ch == "$" else ch
        elif quote == '"':
            quote = "" if ch == '"' else quote
        elif ch in "'\"":
            quote = ch
        elif ch in ";&|<>()\n":
            return ch
        i += 1
    return ""


def words(command: str) -> list[Word]:
    """shlex's words, each with where it starts in the typed command (the wrapped command keeps the user's text
    from there on, so `$VAR`, quotes and globs mean what they meant)."""
    lexer = shlex.shlex(command, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    found, position = [], 0
    while True:
        token = lexer.get_token()
        if token is None or token == lexer.eof:
            return found
        start = position
        while start < len(command) and command[start] in " \t":
            start += 1
        found.append(Word(token, start))
        position = lexer.instream.tell()


def is_python(word: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", os.path.basename(word)) is not None


def python_target(args: list[str]) -> tuple[int, str]:
    """(index in `args` of the first word after python's options, the module after -m or ''), or CommandRefused.
    Options are read as CPython reads them: one-letter ones may be joined (-uB), -W/-X/-m take the rest of the
    word or the next one, `--` ends them."""
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return i + 1, ""
        if word in LONG_WITH_ARGUMENT:
            i += 2
            continue
        if word.startswith("--") or word == "-":
            raise CommandRefused(f"python option {word!r} cannot be wrapped in torchrun")
        if not word.startswith("-"):
            return i, ""
        letters, j = word[1:], 0
        while j < len(letters):
            letter = letters[j]
            if letter in FLAGS_ALONE:
                j += 1
                continue
            if letter in FLAGS_WITH_ARGUMENT or letter == "m":
                rest = letters[j + 1 :]
                if not rest:
                    i += 1
                    if i >= len(args):
                        raise CommandRefused(f"python option -{letter} needs a value")
                    rest = args[i]
                if letter == "m":
                    return i + 1, rest
                break
            raise CommandRefused(FLAGS_REFUSED.get(letter, f"python option -{letter} is not one python documents"))
        i += 1
    raise CommandRefused("python is given no SCRIPT or -m MODULE")


def _mentions_torchrun(text: str) -> bool:
    try:
        inner = shlex.split(text)
    except ValueError:
        return False
    return any(os.path.basename(w) == "torchrun" or w in TORCHRUN_MODULES for w in inner)


def plan(command: str) -> Plan:
    """How `command` runs on every node of a gang, or CommandRefused saying why it cannot (one line)."""
    if not command.strip():
        raise CommandRefused("the command is empty (the image's own CMD is not seen, so it cannot be wrapped)")
    try:
        typed = words(command)
    except ValueError as error:
        raise CommandRefused(f"the command does not parse as shell words ({error})") from None
    begin = 1 if typed and typed[0].text == "exec" else 0
    head = begin
    while head < len(typed) and ASSIGNMENT.fullmatch(typed[head].text):
        head += 1
    rest = typed[head:]
    if not rest:
        raise CommandRefused("the command runs no program")
    operator = shell_operator(command)
    if operator:
        raise CommandRefused(f"{operator!r} outside quotes makes it more than one program")
    program, texts = rest[0].text, [w.text for w in rest]
    if os.path.basename(program) == "torchrun":
        return Plan(Launch.USER_TORCHRUN)
    if os.path.basename(program) in SHELLS and len(texts) >= 3 and texts[1] == "-c" and _mentions_torchrun(texts[2]):
        return Plan(Launch.USER_TORCHRUN)  # a script of its own that starts torchrun
    if not is_python(program):
        raise CommandRefused(f"{program!r} is neither python nor torchrun")
    index, module = python_target(texts[1:])
    if module in TORCHRUN_MODULES:
        return Plan(Launch.USER_TORCHRUN)
    if not module and index + 1 >= len(rest):
        raise CommandRefused("python is given no SCRIPT or -m MODULE")
    assignments = command[typed[begin].start : rest[0].start].strip() if head > begin else ""
    if index == 0 or (index == 2 and texts[1] == "-m"):  # `python SCRIPT` or `python -m MODULE`: torchrun's own
        return Plan(Launch.WRAPPED, assignments, program, command[rest[1].start :])
    return Plan(Launch.WRAPPED, assignments, program, command[rest[0].start :], no_python=True)
