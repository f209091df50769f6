"""The training log to CloudWatch Logs, in batches cut by bytes as the PutLogEvents API counts them."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

# PutLogEvents: a batch is at most 1,048,576 bytes, counted as each message's UTF-8 bytes + 26, and
# 10,000 events; an event at most 256 KB (262,144 bytes with its 26). Reading stops at READ_BYTES.
BATCH_MAX_BYTES = 1_048_576
EVENT_OVERHEAD_BYTES = 26
BATCH_MAX_EVENTS = 10_000
EVENT_MAX_BYTES = 262_144 - EVENT_OVERHEAD_BYTES
READ_BYTES = 1_048_576


@dataclass(frozen=True)
class Event:
    timestamp_ms: int
    message: str

    @property
    def size(self) -> int:
        return len(self.message.encode()) + EVENT_OVERHEAD_BYTES


@dataclass(frozen=True)
class Batch:
    events: list[Event]
    next_offset: int  # the log's byte offset after what this batch consumed


def _message(raw: bytes) -> str:
    """A line as an event: decoded (bad bytes replaced), cut to the event limit on a character boundary."""
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    data = text.encode()
    if len(data) > EVENT_MAX_BYTES:
        text = data[:EVENT_MAX_BYTES].decode("utf-8", "ignore")
    return text


def next_batch(log: Path, offset: int, *, final: bool, now_ms: int) -> Batch | None:
    """Events after byte `offset` (None: nothing new). A last line with no newline is still being
    written and waits, unless `final`; blank lines are consumed, not sent. The batch stops before the
    line that would take it over 1,048,576 bytes or 10,000 events."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        data = handle.read(READ_BYTES)
    lines = data.splitlines(keepends=True)
    if lines and not final and not lines[-1].endswith((b"\n", b"\r")):
        lines.pop()
    events: list[Event] = []
    size = consumed = 0
    for raw in lines:
        message = _message(raw)
        if message.strip():
            event = Event(now_ms, message)
            if len(events) == BATCH_MAX_EVENTS or size + event.size > BATCH_MAX_BYTES:
                break
            events.append(event)
            size += event.size
        consumed += len(raw)
    if not consumed:
        return None
    return Batch(events, offset + consumed)


class LogShipper:
    """Sends what the training log gained since the last call; the offset moves only after a batch landed."""

    def __init__(self, aws: object, log: Path, group: str, stream: str, clock_ms) -> None:
        self.aws = aws
        self.log = log
        self.group = group
        self.stream = stream
        self.offset = 0
        self._clock_ms = clock_ms
        self._lock = threading.Lock()  # the watcher and finalize's flush: one sender, the offset only goes on

    def ship(self, *, final: bool = False) -> None:
        with self._lock:
            self._ship(final=final)

    def _ship(self, *, final: bool) -> None:
        while (batch := next_batch(self.log, self.offset, final=final, now_ms=self._clock_ms())) is not None:
            if batch.events:
                self.aws.put_log_events(
                    self.group, self.stream, [{"timestamp": e.timestamp_ms, "message": e.message} for e in batch.events]
                )
            self.offset = batch.next_offset
