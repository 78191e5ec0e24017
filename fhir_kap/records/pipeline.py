"""Record → FHIR and FHIR → record pipelines: input check, mapping, profile check.

    pipeline = Pipeline.load()
    resource = pipeline.to_fhir(record, Release.R4)      # raises InputError / MappingError / ProfileError
    record = pipeline.from_fhir(resource)                # release detected from the resource's shape

Everything here is pure (layer 1 parts, composed); the CLI and the bridge do the IO.

Room: records/ (layer 1, pure core: no IO): may import the base rooms and validation/.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Release
from ..errors import InputError, Issue, KapError, ProfileError
from ..fhir.references import ResourceLookup
from ..fhir.release import detect_release
from ..validation import Validator
from .carry import apply_kept
from .ingest import Ingest
from .inputs import InputSchemas, load_input_schemas
from .mapping import Mapper

__all__ = ["Pipeline", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one document: the result, or the error that stopped it."""

    label: str
    result: dict[str, Any] | None = None
    error: KapError | None = None
    issues: tuple[Issue, ...] = ()  # warnings and information found on the way (import)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Pipeline:
    inputs: InputSchemas
    mapper: Mapper

    @classmethod
    def load(cls, profiles: Path | None = None, mappings: Path | None = None) -> Pipeline:
        return cls(load_input_schemas(profiles / "input" if profiles else None), Mapper.load(mappings))

    @staticmethod
    def validator(release: Release) -> Validator:
        return Validator.load(release)

    def to_fhir(self, record: Any, release: Release, *, kept: bool = False) -> dict[str, Any]:
        """Check a KAP record, map it, and check the FHIR result against base FHIR and the KAP profile.

        `kept`: also put back what the record kept of the FHIR it was imported from
        (`record.fhir.kept`: foreign codings, unknown extensions, elements KAP has no field for;
        `fhir-kap map` asks for it). Off by default, and never on the disclosure path: what leaves
        through `send` is what the mapping writes, nothing a partner's EHR added (free text, notes)."""
        checked = self.inputs.check(record)
        resource = self.mapper.to_fhir(checked, release)
        carry = checked.get("fhir")
        if kept and isinstance(carry, dict) and carry.get("kept"):
            left = apply_kept(resource, carry["kept"])
            if left:
                raise InputError(
                    [
                        Issue(
                            "error",
                            "value",
                            f"kept element {str(op.get('at'))[:120]} has no place in the mapped resource "
                            "(its parent is gone or not an object); remove it from fhir.kept or restore its parent",
                            f"{checked.get('record')}.fhir.kept[{i}]",
                            f"/fhir/kept/{i}",
                            "carry:not-applicable",
                        )
                        for i, op in left
                    ]
                )
        errors = [i for i in Validator.load(release).validate(resource) if i.is_error]
        if errors:
            raise ProfileError(errors)
        return resource

    def from_fhir(
        self, resource: Any, release: Release | None = None, *, default: Release = Release.R4
    ) -> dict[str, Any]:
        """Check a FHIR resource (base + KAP profile), map it back to a KAP record and check that.
        Without `release`, the resource's shape tells it, else `default`."""
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise InputError(
                "A FHIR resource must be a JSON object with a resourceType",
                pointer="/resourceType",
                expression="resourceType",
                rule="fhir:resourceType",
            )
        release = release or detect_release(resource) or default
        errors = [i for i in Validator.load(release).validate(resource) if i.is_error]
        if errors:
            raise ProfileError(errors)
        if (
            release is Release.R5
            and resource["resourceType"] == "Consent"
            and resource.get("decision") != "deny"
        ):
            # a KAP release of information is written decision deny + the grant as provision[0];
            # under decision permit, provision[0] would be an exception, not a grant
            raise InputError(
                "R5 Consent.decision must be 'deny' for a KAP release of information "
                "(its first provision is the grant)",
                pointer="/decision",
                expression="Consent.decision",
                rule="consent:r5-decision",
            )
        return self.inputs.check(self.mapper.from_fhir(resource, release))

    def map_documents(
        self, docs: Iterable[tuple[str, Any]], release: Release, *, kept: bool = False
    ) -> Iterator[Outcome]:
        """to_fhir over labelled documents; errors are returned per document, never dropped."""
        for label, doc in docs:
            try:
                yield Outcome(label, result=self.to_fhir(doc, release, kept=kept))
            except KapError as exc:
                yield Outcome(label, error=exc)

    @property
    def ingest(self) -> Ingest:
        """The one inbound path (FHIR as EHRs send it -> records with issues), on this pipeline."""
        return Ingest(self.inputs, self.mapper)

    def import_documents(
        self,
        docs: Iterable[tuple[str, Any]],
        release: Release | None = None,
        *,
        default: Release = Release.R4,
        context: ResourceLookup | None = None,
    ) -> Iterator[Outcome]:
        """Every record in labelled documents (`ingest.Ingest.document`: Bundles of any type entry
        by entry, references resolved against contained resources, the Bundle, then `context`)."""
        ingest = self.ingest
        for label, doc in docs:
            for got in ingest.document(label, doc, release=release, default=default, context=context):
                yield Outcome(got.label, result=got.result, error=got.error, issues=got.issues)


def labelled(label: str, issues: Iterable[Issue]) -> list[Issue]:
    """Prefix each issue's message with the document it came from (for multi-file output)."""
    from dataclasses import replace

    return [replace(i, message=f"{label}: {i.message}") for i in issues]
