"""A gang's training command as one torchrun launch (issue 25): what is wrapped, what runs as the user's
own torchrun, and what is refused because it would run N independent trainers writing the same keys.

Standard library only: the agent decides with it on the box (gang.py) and the CLI and the run spec refuse
the same commands at launch time (launch_rules.py), before anything is created. docs/agent.md, "Multi-node
runs", has the table.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Iterable
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
    "python -m torch.distributed.run ..., or sh -c '...' with torchrun the program of one of its commands) "
    "without the options the gang sets; `env NAME=value` before python and output redirections at the end (> FILE, "
    "2>&1) are kept; no other unquoted ; & | < > ( ) or `"
)

# torchrun's options as torch 2.13's own parser declares them (torch.distributed.run.get_args_parser(); a test checks
# this table against it). `True`: the option takes a value. Where torch is importable (the CLI's venv, a box with
# torch) the table is read from torch's parser itself.
TORCHRUN_OPTIONS: dict[str, bool] = {
    **dict.fromkeys(("-h", "--help", "--standalone", "-m", "--module", "--no-python", "--no_python", "--run-path",
                     "--run_path", "--virtual-local-rank", "--virtual_local_rank"), False),
    **dict.fromkeys(("--nnodes", "--nproc-per-node", "--nproc_per_node", "--rdzv-backend", "--rdzv_backend",
                     "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id", "--rdzv_id", "--rdzv-conf", "--rdzv_conf",
                     "--max-restarts", "--max_restarts", "--monitor-interval", "--monitor_interval", "--start-method",
                     "--start_method", "--event-log-handler", "--event_log_handler", "--role", "--log-dir",
                     "--log_dir", "-r", "--redirects", "-t", "--tee", "--local-ranks-filter", "--local_ranks_filter",
                     "--duplicate-stdout-filters", "--duplicate_stdout_filters", "--duplicate-stderr-filters",
                     "--duplicate_stderr_filters", "--node-rank", "--node_rank", "--master-addr", "--master_addr",
                     "--master-port", "--master_port", "--local-addr", "--local_addr", "--logs-specs", "--logs_specs",
                     "--numa-binding", "--numa_binding", "--signals-to-handle", "--signals_to_handle",
                     "--shutdown-timeout", "--shutdown_timeout"), True),
}  # fmt: skip
# torch.distributed.launch (deprecated) adds one flag of its own.
LAUNCH_OPTIONS = {"--use-env": False, "--use_env": False}
# The options a gang's agent sets (PET_*): a user's value would make node 0 train alone or each node wait on a
# store of its own. The key is the option's first spelling in torch's parser (its `dest` with dashes).
GANG_OPTIONS = frozenset(
    {"--standalone", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--node-rank", "--master-addr",
     "--master-port"}
)  # fmt: skip
GANG_OPTIONS_WHY = {
    "--standalone": "it starts a rendezvous of one node on localhost",
    "--nnodes": "the gang's size is the agent's PET_NNODES",
    "--rdzv-backend": "the gang meets through c10d (PET_RDZV_BACKEND)",
    "--rdzv-endpoint": "the gang meets at node 0's store (PET_RDZV_ENDPOINT)",
    "--rdzv-id": "the gang's id is <run>-<attempt> (PET_RDZV_ID)",
}
# The same settings as torchrun reads them from the environment (PET_<OPTION>), and the store sharing a replacement
# needs off (pytorch#135712): the agent sets them for the gang; a user's value would override the gang's.
GANG_ENV = frozenset(
    {"PET_STANDALONE", "PET_NNODES", "PET_RDZV_BACKEND", "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "PET_NODE_RANK",
     "PET_MASTER_ADDR", "PET_MASTER_PORT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
)  # fmt: skip
_GANG_ENV_SET = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(sorted(GANG_ENV)) + r")=")
SHELL_RESERVED = frozenset({"if", "then", "else", "elif", "do", "while", "until", "{", "!", "time", "exec"})


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
    launcher: str = ""  # `env A=1 ` as typed, before the interpreter (env runs torchrun, whose workers inherit)


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


@functools.cache
def _torch_parser_options() -> dict[str, bool] | None:
    try:
        from torch.distributed.run import get_args_parser  # noqa: PLC0415  (optional: the box may have no torch)
    except ImportError:
        return None
    return {o: a.nargs != 0 for a in get_args_parser()._actions for o in a.option_strings}  # noqa: SLF001


def torchrun_options(module: str = "", *, from_torch: bool = False) -> dict[str, bool]:
    """Each option string of torchrun -> whether it takes a value: on the box (`from_torch`) from torch's own parser
    where torch is importable there, else (and always at launch, which must not import torch) torch 2.13's table."""
    table = (_torch_parser_options() if from_torch else None) or TORCHRUN_OPTIONS
    return {**table, **(LAUNCH_OPTIONS if module == "torch.distributed.launch" else {})}


def _canonical(option: str, table: dict[str, bool]) -> str:
    """`option` as torch's parser names it (argparse takes a unique prefix of a long option, `--nnode`, as it)."""
    if option in table:
        return option.replace("_", "-")
    found = [o for o in table if o.startswith("--") and o.startswith(option)] if option.startswith("--") else []
    names = {o.replace("_", "-") for o in found}
    if len(names) != 1:
        raise CommandRefused(f"torchrun option {option!r} is not one torchrun has (or names more than one)")
    return names.pop()


def _nnodes_allows_only(value: str, nodes: int) -> bool:
    """`--nnodes N` or `N:N`: a range whose minimum is below N lets torchrun start (and, after a lost node, go on)
    with fewer nodes than the gang, so the survivors would never wait for the replacement."""
    low, _, high = value.partition(":")
    return low.strip() == str(nodes) and (not high or high.strip() == str(nodes))


def check_torchrun_args(args: list[str], nodes: int | None, module: str = "", *, from_torch: bool = False) -> None:
    """CommandRefused (one line) when the user's torchrun options set what the gang sets: which option, its value,
    and what is allowed (leave it out: the agent sets PET_*). Options up to the training script only: what follows
    it is the script's. `nodes` None: the gang's size is unknown here, so only an --nnodes of 1 is refused."""
    table, i = torchrun_options(module, from_torch=from_torch), 0
    while i < len(args):
        word = args[i]
        if word == "--" or not word.startswith("-") or word == "-":
            return  # the training script (or `--` before it): the rest is the script's
        name, has_value, value = word, False, ""
        if word.startswith("--"):
            name, has_value, value = word.partition("=")
            name = _canonical(name, table)
            takes = table.get(name, False)
        else:
            name, value, has_value = word[:2], word[2:], len(word) > 2
            if name not in table:
                raise CommandRefused(f"torchrun option {name!r} is not one torchrun has")
            takes = table[name]
            if not takes and has_value:  # -m joined with other letters: not a form torchrun's parser documents
                raise CommandRefused(f"torchrun option {word!r} is not one torchrun has")
        if takes and not has_value:
            i += 1
            if i >= len(args):
                raise CommandRefused(f"torchrun option {name} needs a value")
            value = args[i]
        shown = f"{name}={value}" if takes else name
        if name in GANG_OPTIONS:
            if name == "--nnodes" and (
                _nnodes_allows_only(value, nodes) if nodes else value.strip() not in {"1", "1:1"}
            ):
                i += 1
                continue
            why = GANG_OPTIONS_WHY.get(name, "the gang's c10d rendezvous on node 0 decides it")
            if name == "--nnodes" and nodes:
                why = f"a gang of {nodes} nodes takes --nnodes {nodes} or none"
            raise CommandRefused(f"torchrun {shown} contradicts the gang: {why}; leave it out (the agent sets PET_*)")
        i += 1


def _simple_commands(script: str) -> list[list[str]]:
    """The words of each simple command of a shell script (split at ; & | && || newlines and parentheses)."""
    lexer = shlex.shlex(script.replace("\n", ";"), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands, current, target = [], [], False
    for token in lexer:
        if target:  # a redirection's file (or fd): not a word of the command
            target = False
        elif token and all(ch in ";&|()<>" for ch in token) and ("<" in token or ">" in token):
            if current and current[-1].isdigit():  # `2>&1` lexes as 2, >&, 1: the 2 is the fd, not a word
                current.pop()
            target = True
        elif token and all(ch in ";&|()<>" for ch in token):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def _torchrun_args(texts: list[str]) -> tuple[list[str], str] | None:
    """(torchrun's own arguments, its module) when `texts` (a simple command) runs torchrun as its program."""
    head = 0
    while head < len(texts) and (texts[head] in SHELL_RESERVED or ASSIGNMENT.fullmatch(texts[head])):
        head += 1
    rest = texts[head:]
    try:
        rest = rest[_env_prefix(rest) :]
    except CommandRefused:
        return None
    if not rest:
        return None
    if os.path.basename(rest[0]) == "torchrun":
        return rest[1:], "torch.distributed.run"
    if is_python(rest[0]):
        try:
            index, module = python_target(rest[1:])
        except CommandRefused:
            return None
        if module in TORCHRUN_MODULES:
            return rest[1 + index :], module
    return None


def _script_torchruns(script: str) -> list[tuple[list[str], str]]:
    try:
        commands = _simple_commands(script)
    except ValueError:
        return []
    return [found for c in commands if (found := _torchrun_args(c)) is not None]


# An output redirection at the end of the command (`> log`, `>> log`, `2>&1`, `&> log`, `2> err`): kept as typed
# after the wrapped torchrun, whose workers inherit its stdout and stderr, so it means what it meant. Input (`<`)
# and anything else stay refused.
REDIRECTION = re.compile(r"[0-9]*(?:&>>?|>>?|>\||>&)")
DUPLICATION = re.compile(r"[0-9]*>&(?:[0-9]+|-)")


def _typed(command: str, typed: list[Word], i: int) -> str:
    """Word i as typed (quotes kept)."""
    stop = typed[i + 1].start if i + 1 < len(typed) else len(command)
    return command[typed[i].start : stop].strip()


def _redirections_from(command: str, typed: list[Word], k: int) -> bool:
    """Whether words k.. are all output redirections (`>f`, `> f`, `2>&1`, `&>> f`) with plain targets."""
    i = k
    while i < len(typed):
        op = REDIRECTION.match(command, typed[i].start)
        if op is None:
            return False
        if DUPLICATION.fullmatch(typed[i].text) and _typed(command, typed, i) == typed[i].text:
            i += 1
            continue
        target = _typed(command, typed, i)[op.end() - typed[i].start :]
        if not target:  # the operator alone: its target is the next word
            i += 1
            if i >= len(typed):
                return False
            target = _typed(command, typed, i)
        if shell_operator(target):
            return False
        i += 1
    return True


def _trailing_redirections(command: str, typed: list[Word]) -> int:
    """Where the command's trailing output redirections begin (len(typed) when it has none)."""
    return next(k for k in range(len(typed) + 1) if _redirections_from(command, typed, k))


def _env_prefix(texts: list[str]) -> int:
    """Words of a leading `env [NAME=value ...]` (0 when the program is not env); options of env are refused."""
    if not texts or os.path.basename(texts[0]) != "env":
        return 0
    i = 1
    while i < len(texts) and ASSIGNMENT.fullmatch(texts[i]):
        i += 1
    if i < len(texts) and texts[i].startswith("-"):
        raise CommandRefused(f"env option {texts[i]!r} cannot be wrapped (env NAME=value ... PROGRAM only)")
    return i


def gang_env_problem(names: Iterable[str]) -> str:
    """'' when none of `names` is a variable the agent sets for the gang, else why (one line)."""
    taken = sorted(set(names) & GANG_ENV)
    if not taken:
        return ""
    why = "the agent sets it for the gang (node 0's c10d rendezvous of all N nodes)"
    return f"{', '.join(taken)} set by the run: {why}"


def plan(command: str, nodes: int | None = None, *, from_torch: bool = False) -> Plan:
    """How `command` runs on every node of a gang of `nodes`, or CommandRefused saying why it cannot (one line).
    `from_torch`: read torchrun's options from torch's own parser when torch is importable (the agent on the box)."""
    if not command.strip():
        raise CommandRefused("the command is empty (the image's own CMD is not seen, so it cannot be wrapped)")
    try:
        typed = words(command)
    except ValueError as error:
        raise CommandRefused(f"the command does not parse as shell words ({error})") from None
    if nodes is None or nodes > 1:  # `PET_NNODES=1 torchrun ...`, `env PET_STANDALONE=1 ...`, `sh -c 'export ...'`
        problem = gang_env_problem(m.group(1) for m in _GANG_ENV_SET.finditer(command))
        if problem:
            raise CommandRefused(problem.replace("set by the run", "set in the command"))
    begin = 1 if typed and typed[0].text == "exec" else 0
    head = begin
    while head < len(typed) and ASSIGNMENT.fullmatch(typed[head].text):
        head += 1
    end = _trailing_redirections(command, typed)
    rest = typed[head:end]
    if not rest:
        raise CommandRefused("the command runs no program")
    operator = shell_operator(command[: typed[end].start] if end < len(typed) else command)
    if operator in ("<", ">"):
        raise CommandRefused(f"{operator!r} outside quotes: only output redirections at the end (> FILE, >> FILE, "
                             "2>&1, &> FILE) can be wrapped")  # fmt: skip
    if operator:
        raise CommandRefused(f"{operator!r} outside quotes makes it more than one program")
    texts = [w.text for w in rest]
    own = _torchrun_args(texts)
    if own is not None:
        check_torchrun_args(own[0], nodes, own[1], from_torch=from_torch)
        return Plan(Launch.USER_TORCHRUN)
    if os.path.basename(texts[0]) in SHELLS and len(texts) >= 3 and texts[1] == "-c":
        torchruns = _script_torchruns(texts[2])
        if not torchruns:
            raise CommandRefused(f"{texts[0]} -c runs torchrun as none of its commands' program")
        for args, module in torchruns:
            check_torchrun_args(args, nodes, module, from_torch=from_torch)
        return Plan(Launch.USER_TORCHRUN)  # a script of its own that starts torchrun
    assignments = command[typed[begin].start : rest[0].start].strip() if head > begin else ""
    skip = _env_prefix(texts)
    launcher = command[rest[0].start : rest[skip].start] if skip and skip < len(rest) else ""
    rest, texts = rest[skip:], texts[skip:]
    program = texts[0] if texts else "env"
    if not is_python(program):
        raise CommandRefused(f"{program!r} is neither python nor torchrun")
    index, module = python_target(texts[1:])
    if not module and index + 1 >= len(rest):
        raise CommandRefused("python is given no SCRIPT or -m MODULE")
    if index == 0 or (index == 2 and texts[1] == "-m"):  # `python SCRIPT` or `python -m MODULE`: torchrun's own
        return Plan(Launch.WRAPPED, assignments, program, command[rest[1].start :], launcher=launcher)
    return Plan(Launch.WRAPPED, assignments, program, command[rest[0].start :], no_python=True, launcher=launcher)
