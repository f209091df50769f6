"""Hourly prices for the CLI: AWS's own (Price List API, spot price history), cached in a small file.

The price code lives with the supervisor (`training_infra/supervisor/runtime/prices.py`: its
Lambda package is stdlib and boto3 only) and is shared from there, as the run records are. This
module adds what only the CLI has: a file cache under the user's cache directory, and clients
made from the CLI's session. `on_demand_price` is the built-in table, the offline fallback.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.config

from training_infra.cache import cache_dir
from training_infra.supervisor.runtime.prices import (
    BUILT_IN_NOTE,
    BUILT_IN_ON_DEMAND,
    PRICE_LIST_REGION,
    Prices,
    Quote,
    cap_message,
    dollars,
    under_cap,
)

if TYPE_CHECKING:
    from training_infra.cli.aws import Aws

__all__ = [
    "BUILT_IN_NOTE",
    "ON_DEMAND_USD_PER_HOUR",
    "FileCache",
    "Prices",
    "Quote",
    "cap_message",
    "dollars",
    "on_demand_price",
    "prices_for",
    "under_cap",
]

ON_DEMAND_USD_PER_HOUR = BUILT_IN_ON_DEMAND
# One try, short timeouts: a Price List API that does not answer means the built-in table, not a wait.
_PRICE_LIST_CONFIG = botocore.config.Config(
    retries={"mode": "standard", "max_attempts": 1}, connect_timeout=3, read_timeout=5
)


def on_demand_price(instance_type: str) -> float | None:
    """The built-in table's list price, or None for a type it does not know (the offline fallback)."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


class FileCache:
    """A JSON file of {key: [saved_at, value]}: read once per process, written whole on each put.

    A cache that cannot be read or written is an empty cache: prices are asked again, never wrong.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "prices.json"
        self._entries: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                entries = {}
            self._entries = entries if isinstance(entries, dict) else {}
        return self._entries

    def get(self, key: str, max_age: float) -> Any:
        saved = self._load().get(key)
        fresh = isinstance(saved, list) and len(saved) == 2 and isinstance(saved[0], (int, float))
        return saved[1] if fresh and 0 <= time.time() - saved[0] <= max_age else None

    def put(self, key: str, value: Any) -> None:
        entries = self._load()
        entries[key] = [time.time(), value]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as handle:
                json.dump(entries, handle)
            os.replace(handle.name, self.path)
        except OSError:
            pass  # a read-only home: no cache, same prices


def prices_for(aws: Aws, *, cache: FileCache | None = None) -> Prices:
    """Prices in the CLI's region with the file cache; the Price List client (us-east-1, AWS_ENDPOINT_URL
    honoured) is made only when a list price is not cached."""

    def price_list() -> Any:
        return aws.session.create_client("pricing", region_name=PRICE_LIST_REGION, config=_PRICE_LIST_CONFIG)

    return Prices(ec2=aws.client("ec2"), region=aws.region_name, pricing=price_list, cache=cache or FileCache())
