"""IMDSv2 over plain HTTP (urllib), in-process: the watchers poll it every second for nothing."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

TOKEN_TTL_SECONDS = 21600
TIMEOUT_SECONDS = 2.0


class ImdsError(OSError):
    """IMDS did not answer, or answered neither 200 nor 404."""


class Imds:
    """One token for the whole agent, renewed before it expires and whenever IMDS says 401.

    `get` answers the body, or None for 404 (no notice, no such tag); anything else raises.
    Thread-safe: every watcher shares one instance.
    """

    def __init__(self, endpoint: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._clock = clock
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        # noqa: S310 below: the URL is the IMDS endpoint (http), never a file: or custom scheme.
        request = urllib.request.Request(f"{self.endpoint}/latest/{path}", method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, ""
        except (OSError, ValueError, http.client.HTTPException) as error:  # IncompleteRead: cut mid-answer
            raise ImdsError(f"IMDS at {self.endpoint} did not answer: {error}") from error

    def token(self, *, renew: bool = False) -> str:
        with self._lock:
            if renew or not self._token or self._clock() >= self._renew_at:
                status, body = self._request(
                    "PUT", "api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
                )
                if status != 200 or not body:
                    raise ImdsError(f"IMDS at {self.endpoint} gave no token (HTTP {status})")
                self._token = body
                self._renew_at = self._clock() + TOKEN_TTL_SECONDS / 2
            return self._token

    def get(self, path: str) -> str | None:
        for attempt in (1, 2):
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self.token(renew=attempt == 2)})
            if status == 200:
                return body
            if status == 404:
                return None
            if status != 401:
                raise ImdsError(f"IMDS {path}: HTTP {status}")
        raise ImdsError(f"IMDS {path}: token refused twice")
