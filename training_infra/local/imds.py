"""A fake EC2 instance metadata service (IMDSv2) on a free loopback port.

The instance agent reads its identity, tags and spot notices from IMDS. Off AWS there is none, so
tests and the local demo point `AWS_EC2_METADATA_SERVICE_ENDPOINT` at this server and inject spot
interruptions and rebalance recommendations when they want one. It follows the real protocol where
the agent depends on it: a token from `PUT /latest/api/token` is required (401 without it), the
notice paths answer 404 until a notice exists, and instance tags (`meta-data/tags/instance`, a key
per line, and `.../tags/instance/<key>`) answer as they are now, so a tag added while the agent
runs (the supervisor's `training-infra:stop`) is seen at the next poll. The tags are a dict the
caller changes with `set_tag`/`remove_tag`, or a function read on every request (the local instance
reads its tags from the local AWS that way).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 - a header name


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ImdsRequest:
    """One request as the server saw it; `at` is `time.time()` on arrival."""

    at: float
    method: str
    path: str
    status: int


class FakeImds:
    """`with FakeImds(...) as imds:` then give the agent `imds.url`; `inject_*` to send notices."""

    def __init__(
        self,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "g5.xlarge",
        region: str = "us-east-1",
        availability_zone: str = "us-east-1a",
        market: str = "spot",
        tags: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None,
        account_id: str = "123456789012",
        image_id: str = "ami-0123456789abcdef0",
        private_ip: str = "10.0.0.10",
        role: tuple[str, Mapping[str, str]] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if market not in ("spot", "on-demand"):
            raise ValueError(f"market={market!r} is not allowed: use 'spot' or 'on-demand'")
        self.instance_id = instance_id
        self.instance_type = instance_type
        self.region = region
        self.availability_zone = availability_zone
        self.market = market
        self._tags_source = tags if callable(tags) else None
        self.tags: dict[str, str] = {} if callable(tags) else dict(tags or {})
        self.account_id = account_id
        self.image_id = image_id
        self.private_ip = private_ip  # each played instance its own: multi-node peers find each other by it
        # The instance role's name and its credentials document (AccessKeyId, SecretAccessKey, Token,
        # Expiration), served under meta-data/iam/security-credentials/ as EC2 does; None: no role.
        self.role = role
        self.host = host  # where it listens: a played instance's own loopback address (its private_ip)
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # token -> expiry (time.monotonic)
        self._instance_action: str | None = None
        self._rebalance: str | None = None
        self._requests: list[ImdsRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.started_at = datetime.now(UTC)

    # ---------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeImds is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeImds:
        handler = type("Handler", (_Handler,), {"imds": self})
        self._server = ThreadingHTTPServer((self.host, 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-imds", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeImds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- what tests control
    def inject_spot_interruption(self, action: str = "terminate", in_seconds: int = 120) -> None:
        """Make `spot/instance-action` answer like AWS does two minutes before reclaiming the box."""
        if action not in ("terminate", "stop", "hibernate"):
            raise ValueError(f"action={action!r} is not allowed: use terminate, stop or hibernate")
        when = _iso(datetime.now(UTC) + timedelta(seconds=in_seconds))
        with self._lock:
            self._instance_action = json.dumps({"action": action, "time": when})

    def inject_rebalance(self) -> None:
        with self._lock:
            self._rebalance = json.dumps({"noticeTime": _iso(datetime.now(UTC))})

    def clear_notices(self) -> None:
        with self._lock:
            self._instance_action = self._rebalance = None

    def set_tag(self, key: str, value: str) -> None:
        """Tag the instance, as `ec2 create-tags` does (the agent sees it at its next poll)."""
        self._own_tags()
        with self._lock:
            self.tags[key] = value

    def remove_tag(self, key: str) -> None:
        self._own_tags()
        with self._lock:
            self.tags.pop(key, None)

    def _own_tags(self) -> None:
        if self._tags_source is not None:
            raise RuntimeError("this FakeImds reads its tags from a function: change them where it reads them")

    def current_tags(self) -> dict[str, str]:
        if self._tags_source is not None:
            return dict(self._tags_source())
        with self._lock:
            return dict(self.tags)

    @property
    def requests(self) -> list[ImdsRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, path_suffix: str) -> list[ImdsRequest]:
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    # ---------------------------------------------------------------- what the server answers
    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests.append(ImdsRequest(time.time(), method, path, status))

    def _issue_token(self, ttl_header: str | None) -> tuple[int, str]:
        try:
            ttl = int(ttl_header or "")
        except ValueError:
            return 400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds"
        if not 1 <= ttl <= 21600:
            return 400, "token TTL must be 1-21600 seconds"
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
        return 200, token

    def _token_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def _document(self) -> str:
        return json.dumps(
            {
                "accountId": self.account_id,
                "architecture": "x86_64",
                "availabilityZone": self.availability_zone,
                "imageId": self.image_id,
                "instanceId": self.instance_id,
                "instanceType": self.instance_type,
                "pendingTime": _iso(self.started_at),
                "privateIp": self.private_ip,
                "region": self.region,
                "version": "2017-09-30",
            },
            indent=2,
        )

    def _lookup(self, path: str) -> str | None:
        with self._lock:
            notices = {
                "meta-data/spot/instance-action": self._instance_action,
                "meta-data/events/recommendations/rebalance": self._rebalance,
            }
        if path in notices:
            return notices[path]
        if path == "meta-data/tags/instance" or path.startswith("meta-data/tags/instance/"):
            tags = self.current_tags()
            if path == "meta-data/tags/instance":
                return "\n".join(tags)
            return tags.get(path.removeprefix("meta-data/tags/instance/"))
        fixed = {
            "meta-data/instance-id": self.instance_id,
            "meta-data/instance-type": self.instance_type,
            "meta-data/ami-id": self.image_id,
            "meta-data/placement/availability-zone": self.availability_zone,
            "meta-data/placement/region": self.region,
            "meta-data/instance-life-cycle": self.market,
            "meta-data/local-ipv4": self.private_ip,
            "dynamic/instance-identity/document": self._document(),
        }
        if self.role is not None:
            name, document = self.role
            fixed["meta-data/iam/security-credentials"] = name
            fixed[f"meta-data/iam/security-credentials/{name}"] = json.dumps({"Code": "Success", **document})
        return fixed.get(path)


class _Handler(BaseHTTPRequestHandler):
    imds: FakeImds  # set on the subclass made in FakeImds.start
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: str) -> None:
        self.imds._record(self.command, self.path, status)  # before replying: callers may check at once
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:  # noqa: N802 - http.server naming
        if self.path != TOKEN_PATH:
            self._reply(404, "Not Found")
            return
        self._reply(*self.imds._issue_token(self.headers.get(TTL_HEADER)))

    def do_GET(self) -> None:  # noqa: N802
        if not self.path.startswith("/latest/"):
            self._reply(404, "Not Found")
            return
        if not self.imds._token_valid(self.headers.get(TOKEN_HEADER)):
            self._reply(401, "Unauthorized")
            return
        try:
            body = self.imds._lookup(self.path[len("/latest/") :].rstrip("/"))
        except Exception:  # noqa: BLE001 - a tag source that failed: IMDS answers 500, the agent asks again
            self._reply(500, "Internal Server Error")
            return
        if body is None:
            self._reply(404, "Not Found")
        else:
            self._reply(200, body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass
