"""A sweep's Optuna study kept in the run table: Optuna's JournalStorage over a DynamoDB journal backend.

Optuna's journal storage needs only two things of a backend (optuna.storages.journal.BaseJournalBackend):
append log entries in one total order that every writer agrees on, and read them back from a position.
The run table gives both without a server: entry N of group G is the item `#journal-G-<N>`, written
with `attribute_not_exists(run_id)`, so of two writers that chose the same N one fails, moves to N+1 and
tries again; a writer only takes N once it has seen N-1, so the log has no gaps and a read stops at the
first key that is not there (docs/architecture.md, "Sweeps"). Reads are strongly consistent GetItem /
BatchGetItem on the table (never an index, which may show N+1 before N).

Imports Optuna: the supervisor's layer holds it (training_infra/supervisor/layer.py); records.py and
run_requests.py never import this module, so runs without sweeps never load Optuna.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from optuna.storages.journal import BaseJournalBackend

JOURNAL_PREFIX = "#journal-"
JOURNAL_KIND = "journal"
BATCH_KEYS = 100  # BatchGetItem's most keys per call


def journal_key(group: str, number: int) -> str:
    return f"{JOURNAL_PREFIX}{group}-{number:09d}"


@dataclass
class JournalCounts:
    """What the backend asked of the table (the bench prints these)."""

    read_calls: int = 0
    items_read: int = 0
    keys_probed: int = 0
    puts: int = 0
    conflicts: int = 0


class DynamoJournalBackend(BaseJournalBackend):
    """One group's journal: an item per log entry in the run table, keyed by the group and the entry's number.

    Items carry `kind = journal` but no `created_at` and no `active`, so neither index holds them.
    """

    def __init__(self, dynamodb: Any, table: str, group: str) -> None:
        self._db, self.table, self.group = dynamodb, table, group
        self._next = 0  # the lowest entry number not known to exist
        self.counts = JournalCounts()

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """Entries from `log_number_from` to the first missing one: one key first (the usual answer when
        nothing is new), then windows doubling up to 100 keys while every key is there."""
        number, window = log_number_from, 1
        while True:
            found = self._get(range(number, number + window))
            for n in range(number, number + window):
                if n not in found:
                    self._next = max(self._next, n)
                    return
                yield found[n]
            number += window
            window = min(BATCH_KEYS, window * 2)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        for log in logs:
            body = json.dumps(log, separators=(",", ":"))
            while True:
                number = self._next
                try:
                    self._db.put_item(
                        TableName=self.table,
                        Item={
                            "run_id": {"S": journal_key(self.group, number)},
                            "kind": {"S": JOURNAL_KIND},
                            "group": {"S": self.group},
                            "seq": {"N": str(number)},
                            "log": {"S": body},
                        },
                        ConditionExpression="attribute_not_exists(run_id)",
                    )
                except ClientError as error:
                    if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
                        raise
                    self.counts.conflicts += 1
                    self._next = number + 1  # someone wrote entry `number`: it exists, so the next one has no gap
                    continue
                self.counts.puts += 1
                self._next = number + 1
                break

    def _get(self, numbers: range) -> dict[int, dict[str, Any]]:
        self.counts.keys_probed += len(numbers)
        found: dict[int, dict[str, Any]] = {}
        if len(numbers) == 1:
            self.counts.read_calls += 1
            item = self._db.get_item(
                TableName=self.table,
                Key={"run_id": {"S": journal_key(self.group, numbers[0])}},
                ConsistentRead=True,
                ProjectionExpression="seq, #log",
                ExpressionAttributeNames={"#log": "log"},
            ).get("Item")
            if item:
                found[int(item["seq"]["N"])] = json.loads(item["log"]["S"])
        else:
            keys = [{"run_id": {"S": journal_key(self.group, n)}} for n in numbers]
            request = {
                self.table: {
                    "Keys": keys,
                    "ConsistentRead": True,
                    "ProjectionExpression": "seq, #log",
                    "ExpressionAttributeNames": {"#log": "log"},
                }
            }
            while request:
                self.counts.read_calls += 1
                answer = self._db.batch_get_item(RequestItems=request)
                for item in answer.get("Responses", {}).get(self.table, []):
                    found[int(item["seq"]["N"])] = json.loads(item["log"]["S"])
                request = answer.get("UnprocessedKeys") or {}
        self.counts.items_read += len(found)
        return found
