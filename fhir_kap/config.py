"""Canonical URLs, code-system URLs, the FHIR release switch, data paths and settings.

This is the one place where the project's pins live: the FHIR releases it speaks, the
canonical base of its profiles, and the code systems it uses. Settings are built once
(`load_settings`) and passed down; nothing here is read from a global at call time.

Room: config (layer 0, base): imports only errors.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Release", "CANONICAL", "CS", "data_path", "Settings", "EndpointConfig", "load_settings"]

CANONICAL = "http://fhir-kap.example"


class Release(str, enum.Enum):
    """The FHIR release a resource is written in. R4 (4.0.1) is what EHRs speak."""

    R4 = "4.0.1"
    R5 = "5.0.0"

    @classmethod
    def parse(cls, value: str | Release | None) -> Release:
        """Accept '4.0.1', '4.0', 'R4', 'r4', '5.0.0', 'R5', ...; default R4.

        >>> Release.parse("R5"), Release.parse("4.0.1")
        (<Release.R5: '5.0.0'>, <Release.R4: '4.0.1'>)
        """
        if value is None or value == "":
            return cls.R4
        if isinstance(value, Release):
            return value
        v = str(value).strip().upper().lstrip("R")
        if v.startswith("4.0") or v == "4":
            return cls.R4
        if v.startswith("5.0") or v == "5":
            return cls.R5
        raise ConfigError(
            f"Unsupported FHIR version '{value}': use 4.0.1 (R4) or 5.0.0 (R5)", rule="fhir-version"
        )

    @property
    def short(self) -> str:
        return "r4" if self is Release.R4 else "r5"


class CS:
    """Code-system and identifier-system URLs used across the project."""

    INFO_CATEGORY = f"{CANONICAL}/CodeSystem/kap-information-category"
    COLLAB_MODEL = f"{CANONICAL}/CodeSystem/kap-collaboration-model"
    SESSION_KIND = f"{CANONICAL}/CodeSystem/kap-session-kind"
    CLEARANCE = f"{CANONICAL}/CodeSystem/kap-clearance-outcome"
    READINESS = f"{CANONICAL}/CodeSystem/kap-readiness"
    SNOMED = "http://snomed.info/sct"
    LOINC = "http://loinc.org"
    RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
    CPT = "http://www.ama-assn.org/go/cpt"
    HCPCS = "urn:oid:2.16.840.1.113883.6.285"
    NPI = "http://hl7.org/fhir/sid/us-npi"
    UCUM = "http://unitsofmeasure.org"
    V3_ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
    V3_ACTREASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
    V3_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    V3_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
    CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
    CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
    COMM_CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
    # Business-identifier systems of the clinic's own records (idempotent exchange keys).
    ID_REFERRAL = f"{CANONICAL}/sid/referral"
    ID_SESSION = f"{CANONICAL}/sid/session"
    ID_CONSENT = f"{CANONICAL}/sid/consent"
    ID_NOTE = f"{CANONICAL}/sid/note"
    ID_CLIENT_MRN = f"{CANONICAL}/sid/clinic-mrn"
    ID_PARTY = f"{CANONICAL}/sid/party"


_PKG = Path(__file__).resolve().parent


def data_path(kind: str) -> Path:
    """Where the project's data folders are: `profiles` or `mappings`.

    In a checkout (or editable install) they sit beside the package; a wheel carries
    copies under `fhir_kap/_data/`.
    """
    for candidate in (_PKG / "_data" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"Data folder '{kind}' not found beside the fhir_kap package", rule="install")


@dataclass(frozen=True)
class EndpointConfig:
    """A remote FHIR server the adapter delivers to. Secrets are *named*, never stored here.

    auth: "none" | "bearer" | "smart"; `token_env` names the environment variable holding a
    bearer token or client secret; `private_key_path` a PEM for private_key_jwt.
    """

    name: str
    base_url: str
    auth: str = "none"
    token_env: str | None = None
    client_id: str | None = None
    private_key_path: str | None = None
    key_id: str | None = None
    alg: str = "RS384"
    token_url: str | None = None
    scope: str = "system/*.read system/*.write"
    fhir_version: str | None = None  # None: negotiate from /metadata
    recipients: tuple[str, ...] = ()  # whom this server receives for: `Practitioner/x`, `SYSTEM|VALUE`


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Build with `load_settings()`; pass it down explicitly."""

    data_dir: Path = Path("fhir-kap-data")
    database_url: str | None = None  # None: SQLite file in data_dir; or postgresql://...
    fhir_version: Release = Release.R4
    max_body_bytes: int = 1_000_000
    request_timeout: float = 30.0
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    batch_size: int = 100
    clinic_org_identifier: str = f"{CANONICAL}/sid/org|kap-clinic"
    log_level: str = "INFO"
    endpoints: Mapping[str, EndpointConfig] = field(default_factory=dict)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'fhir-kap.sqlite3').as_posix()}"


_SCALARS = {f.name: f for f in fields(Settings) if f.name != "endpoints"}


def _coerce(name: str, value: Any) -> Any:
    try:
        if name == "data_dir":
            return Path(str(value))
        if name == "fhir_version":
            return Release.parse(str(value))
        if name in ("max_body_bytes", "max_attempts", "batch_size"):
            return int(value)
        if name in ("request_timeout", "backoff_base", "backoff_max"):
            return float(value)
        return None if value in ("", None) and name == "database_url" else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"Setting '{name}' has a value of the wrong type ({type(value).__name__})", rule="settings"
        ) from exc


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from an optional TOML file, then `FHIR_KAP_*` environment variables, then overrides.

    TOML keys are the field names (`data_dir = "..."`), endpoints as tables:
    `[endpoints.practice-a] base_url = "https://..."  auth = "bearer"  token_env = "PRACTICE_A_TOKEN"`.
    Environment: `FHIR_KAP_DATA_DIR`, `FHIR_KAP_DATABASE_URL`, `FHIR_KAP_FHIR_VERSION`, ...
    `FHIR_KAP_CONFIG` names the TOML file when `path` is not given.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    endpoints: dict[str, EndpointConfig] = {}
    path = path or env.get("FHIR_KAP_CONFIG")
    if path:
        import tomllib  # only when there is a file: keeps CLI start-up lean

        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"Cannot read config file '{path}': {exc.strerror}", rule="settings") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file '{path}' is not valid TOML: {exc}", rule="settings") from exc
        for key, value in raw.items():
            if key == "endpoints" and isinstance(value, dict):
                for name, ep in value.items():
                    endpoints[name] = _endpoint(name, ep)
            elif key in _SCALARS:
                values[key] = _coerce(key, value)
            else:
                raise ConfigError(f"Unknown setting '{key}' in '{path}'", rule="settings")
    for name in _SCALARS:
        env_key = f"FHIR_KAP_{name.upper()}"
        if env_key in env:
            values[name] = _coerce(name, env[env_key])
    for name, value in overrides.items():
        if name == "endpoints":
            endpoints.update(value)
        elif value is not None:
            values[name] = _coerce(name, value) if name in _SCALARS else value
    return Settings(**values, endpoints=endpoints)


def _endpoint(name: str, raw: Any) -> EndpointConfig:
    if not isinstance(raw, dict) or "base_url" not in raw:
        raise ConfigError(f"Endpoint '{name}' needs a table with base_url", rule="settings")
    known = {f.name for f in fields(EndpointConfig)} - {"name"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(
            f"Endpoint '{name}' has unknown keys: {', '.join(sorted(unknown))}", rule="settings"
        )
    if raw.get("auth", "none") not in ("none", "bearer", "smart"):
        raise ConfigError(f"Endpoint '{name}': auth must be none, bearer or smart", rule="settings")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "recipients":
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(
                    f"Endpoint '{name}': recipients must be a list of references or SYSTEM|VALUE identifiers",
                    rule="settings",
                )
            values[key] = tuple(value)
        else:
            values[key] = str(value)
    return EndpointConfig(name=name, **values)
