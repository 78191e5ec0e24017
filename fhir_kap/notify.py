"""Rest-hook notifications for partners without a FHIR server of their own.

The payload names an event and a resource id, nothing else: no patient data ever goes into a
webhook. The partner fetches the resource from the bridge with its token, which is where
consent is checked and the read audited. Each notification is signed:
`X-KAP-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the partner's webhook
secret, and `X-KAP-Timestamp` (Unix seconds) so a receiver can refuse replays.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from . import jsonio

__all__ = ["EVENT_COMMUNICATION", "EVENT_TASK", "Notifier", "NotifyResult", "sign"]

EVENT_COMMUNICATION = "communication-available"
EVENT_TASK = "referral-status-changed"
log = logging.getLogger("fhir_kap.notify")


@dataclass(frozen=True)
class NotifyResult:
    delivered: bool
    status: int | None = None
    error: str | None = None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class Notifier:
    """Posts id-only notifications to registered rest-hooks (best effort, bounded by a timeout)."""

    def __init__(self, timeout: float = 5.0, user_agent: str = "fhir-kap-bridge") -> None:
        self.timeout = timeout
        self.user_agent = user_agent

    @staticmethod
    def payload(event: str, resource_ref: str) -> bytes:
        """The notification body: `{"event": ..., "resource": "Type/id"}`."""
        return jsonio.dumps({"event": event, "resource": resource_ref})

    def notify(self, url: str, event: str, resource_ref: str, *, secret: str | None = None) -> NotifyResult:
        """POST the notification; never raises (a failed hook must not fail the request)."""
        body = self.payload(event, resource_ref)
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": self.user_agent, "X-KAP-Timestamp": ts}
        if secret:
            headers["X-KAP-Signature"] = sign(secret, ts, body)
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("webhook failed", extra={"event": event, "resource": resource_ref,
                                                 "error": type(exc).__name__})
            return NotifyResult(False, None, type(exc).__name__)
        ok = 200 <= status < 300
        if not ok:
            log.warning("webhook refused", extra={"event": event, "resource": resource_ref, "status": status})
        return NotifyResult(ok, status, None if ok else f"HTTP {status}")
