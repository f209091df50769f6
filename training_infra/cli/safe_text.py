"""Text that came from a training box or S3, made harmless for the user's terminal.

The instance, and so the trainer in its container, writes status.json, the log lines and the
messages that run records repeat. Printed as they are, an escape sequence could clear the screen
(`ESC [2J`), retitle the window or plant a hyperlink (OSC 8), bidi controls could show a line in
another order than its characters (Trojan Source, CVE-2021-42574), and rich would render markup
such as `[link=...]`. Every such string is printed through `remote_text`: escape sequences, every
other C0/C1 control character except newline and tab and every bidi control are removed, and, for
output that rich renders with markup, the markup is escaped. (`--output json` needs neither: its
JSON is ASCII, every one of them written as a `\\u` escape.)
"""

from __future__ import annotations

import re

# CSI (ESC [ or 0x9b ... final byte), OSC / DCS / SOS / PM / APC strings (up to BEL or ST), then any
# other ESC pair: whole sequences go, so no parameter bytes are left behind as visible junk.
_ESCAPE_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[]PX^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
# C0 but tab and newline, DEL, C1; and the bidi controls: the embeddings and overrides (U+202A-U+202E)
# and isolates (U+2066-U+2069) reorder what follows them, and the invisible marks (U+200E LRM,
# U+200F RLM, U+061C ALM) move neutral characters such as digits and punctuation across the text
# around them. In a log line each is only a way to show something other than what was written; RTL
# text stays readable without the marks (they only tune where punctuation sits).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def remote_text(value: object, *, markup: bool = False) -> str:
    """`value` as text with no control character but newline and tab; `markup=True` also escapes
    rich markup, for a string printed where rich interprets it."""
    text = _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", str(value)))
    if markup:
        from rich.markup import escape

        text = escape(text)
    return text
