"""Security labels: resources carry R + PSY; envelopes reveal no sensitivity (at most R).

The KAP security-label rule (docs/consent.md, "Security labels"): confidentiality v3-Confidentiality `R` on everything clinical,
sensitivity v3-ActCode `PSY` on mental-health content; transport metadata (Bundle-level
labels, message headers, URLs, log lines) may carry confidentiality `R` and nothing more.

Room: consent/ (layer 1, pure core: no IO, no clock): may import the base rooms only.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..config import CS

__all__ = [
    "apply_security_labels",
    "envelope_labels",
    "label_envelope",
    "envelope_reveals_sensitivity",
    "CONFIDENTIALITY_R",
    "SENSITIVITY_PSY",
]

CONFIDENTIALITY_R = {"system": CS.V3_CONFIDENTIALITY, "code": "R"}
SENSITIVITY_PSY = {"system": CS.V3_ACTCODE, "code": "PSY"}
_CONF_ORDER = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
# Sensitivity / privacy-marking words that must not appear in transport metadata.
_SENSITIVE = re.compile(
    r"(?<![A-Za-z])(PSY|PSYTHPN|ETH|HIV|SUD|SDV|SEX|BH|MH|ETHUD|OPIOIDUD|psychotherapy[-_ ]?note|"
    r"psychotherapy|ketamine|mental[-_ ]health|kap-information-category)(?![A-Za-z])",
    re.IGNORECASE,
)
_ENVELOPE_OK = {(CS.V3_CONFIDENTIALITY, c) for c in ("U", "L", "M", "N", "R")}


def apply_security_labels(resource: dict[str, Any]) -> dict[str, Any]:
    """A copy of `resource` whose meta.security holds confidentiality R (or higher) and PSY.

    >>> [c["code"] for c in apply_security_labels({"resourceType": "Procedure"})["meta"]["security"]]
    ['R', 'PSY']
    """
    out = copy.deepcopy(resource)
    meta = out.get("meta")
    if not isinstance(meta, dict):
        meta = out["meta"] = {}
    security = [c for c in meta.get("security") or [] if isinstance(c, dict)]
    conf = [c for c in security if c.get("system") == CS.V3_CONFIDENTIALITY]
    others = [c for c in security if c.get("system") != CS.V3_CONFIDENTIALITY]
    highest = max((_CONF_ORDER.get(str(c.get("code")), -1) for c in conf), default=-1)
    keep_conf = [
        c for c in conf if _CONF_ORDER.get(str(c.get("code")), -1) == highest and highest > _CONF_ORDER["R"]
    ]
    labels = (keep_conf[:1] or [dict(CONFIDENTIALITY_R)]) + others
    if not any(c.get("system") == CS.V3_ACTCODE and c.get("code") == "PSY" for c in labels):
        labels.append(dict(SENSITIVITY_PSY))
    meta["security"] = labels
    return out


def envelope_labels() -> list[dict[str, str]]:
    """The only label a transport envelope (Bundle.meta.security) may carry."""
    return [dict(CONFIDENTIALITY_R)]


def label_envelope(bundle: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Bundle (or MessageHeader) whose own meta carries confidentiality R only."""
    out = dict(bundle)
    meta = dict(out.get("meta") or {}) if isinstance(out.get("meta"), dict) else {}
    meta["security"] = envelope_labels()
    meta.pop("tag", None)
    out["meta"] = meta
    return out


def _reveals_meta(meta: Any) -> bool:
    if not isinstance(meta, dict):
        return False
    for key in ("security", "tag"):
        for c in meta.get(key) or []:
            if not isinstance(c, dict):
                continue
            if key == "security" and (c.get("system"), c.get("code")) not in _ENVELOPE_OK:
                return True
            if key == "tag" and (
                c.get("system") == CS.INFO_CATEGORY or _SENSITIVE.search(str(c.get("code", "")))
            ):
                return True
    return False


def envelope_reveals_sensitivity(obj: Any) -> bool:
    """True when transport metadata reveals sensitivity: a Bundle/MessageHeader's own labels,
    entry URLs and request URLs, a URL or a log line (str) naming a sensitivity code.

    Resources inside a Bundle's entries may (and do) carry PSY; only the envelope is checked.
    """
    if isinstance(obj, str):
        return bool(_SENSITIVE.search(obj))
    if not isinstance(obj, dict):
        return False
    if _reveals_meta(obj.get("meta")):
        return True
    if obj.get("resourceType") != "Bundle":
        return (
            obj.get("resourceType") == "MessageHeader"
            and _SENSITIVE.search(
                " ".join(str(obj.get(k, "")) for k in ("reason", "eventUri", "eventCoding", "definition"))
            )
            is not None
        )
    for entry in obj.get("entry") or []:
        if not isinstance(entry, dict):
            continue
        texts = [
            entry.get("fullUrl"),
            (entry.get("request") or {}).get("url") if isinstance(entry.get("request"), dict) else None,
            (entry.get("request") or {}).get("ifNoneExist")
            if isinstance(entry.get("request"), dict)
            else None,
        ]
        if any(isinstance(t, str) and _SENSITIVE.search(t) for t in texts):
            return True
        res = entry.get("resource")
        if (
            isinstance(res, dict)
            and res.get("resourceType") == "MessageHeader"
            and envelope_reveals_sensitivity(res)
        ):
            return True
    return False
