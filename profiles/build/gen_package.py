"""Generate the KAP FHIR package: StructureDefinitions, CodeSystems, ValueSets, package.json, .index.json.

    python3 profiles/build/gen_package.py

The StructureDefinitions' differentials are the data fhir_kap.validation reads its profile rules
from (cardinality, fixed/pattern values, slices, bindings, target types, kap-* constraints), so
this script is the one place the KAP profile rules are written down. Output is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

PROFILES = Path(__file__).resolve().parents[1]
C = "http://fhir-kap.example"
SCT, LOINC = "http://snomed.info/sct", "http://loinc.org"
V3_PART = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"
VERSION = "0.1.0"

CODE_SYSTEMS = {
    "kap-information-category": (
        "KAP information category",
        "What a piece of shared information is about; consents permit categories, never psychotherapy notes.",
        [
            ("session-dates", "Session dates", "Dosing and session dates."),
            ("response-themes", "Response and themes", "General response and themes, never a transcript."),
            ("safety", "Safety", "Safety notes when clinically relevant."),
            ("care-coordination", "Care coordination", "Scheduling, readiness, aftercare, what comes next."),
            ("treatment-history", "Treatment history", "Referring therapist to clinic: treatment history."),
            (
                "risk-considerations",
                "Risk considerations",
                "Referring therapist to clinic: risk considerations.",
            ),
            (
                "contraindications",
                "Contraindications",
                "Referring therapist to clinic: known contraindications.",
            ),
            (
                "psychotherapy-note",
                "Psychotherapy note",
                "Process notes, transcripts, verbatim content: never disclosed, whatever a consent says.",
            ),
        ],
    ),
    "kap-collaboration-model": (
        "KAP collaboration model",
        "How clinic and referring therapist share the work.",
        [
            (
                "dosing-only",
                "Dosing only",
                "The clinic evaluates, clears and doses; the referring therapist "
                "does preparation and integration.",
            ),
            (
                "clinic-prep-integration",
                "Clinic preparation and integration",
                "The clinic also runs preparation and integration.",
            ),
            ("shared", "Shared", "Preparation and integration are divided between the two."),
        ],
    ),
    "kap-session-kind": (
        "KAP session kind",
        "The step of the KAP care pathway a session is.",
        [
            ("intake", "Intake", "Behavioural-health intake."),
            ("screening", "Screening", "Medical screening and clearance."),
            ("preparation", "Preparation", "Preparation session."),
            ("dosing", "Dosing", "Medically monitored dosing session."),
            ("integration", "Integration", "Integration session."),
        ],
    ),
    "kap-clearance-outcome": (
        "KAP clearance outcome",
        "Result of medical screening.",
        [
            ("eligible", "Eligible", "Cleared for KAP."),
            ("not-eligible", "Not eligible", "Not cleared for KAP."),
            ("deferred", "Deferred", "Decision deferred."),
        ],
    ),
    "kap-readiness": (
        "KAP readiness",
        "Readiness for KAP at referral or intake.",
        [
            ("ready", "Ready", "Ready to start."),
            ("needs-preparation", "Needs preparation", "Needs more preparation first."),
            ("not-ready", "Not ready", "Not ready for KAP."),
        ],
    ),
}
# ValueSets: one with every code of each CodeSystem, plus subsets.
VALUE_SETS = {name: (title, name, None) for name, (title, _d, _c) in CODE_SYSTEMS.items()}
VALUE_SETS["kap-clinical-context-category"] = (
    "KAP clinical context category",
    "kap-information-category",
    ["treatment-history", "risk-considerations", "contraindications"],
)
VALUE_SETS["kap-note-category"] = (
    "KAP continuity note category",
    "kap-information-category",
    ["session-dates", "response-themes", "safety", "care-coordination"],
)


def cc(system: str, code: str) -> dict:
    return {"coding": [{"system": system, "code": code}]}


def vs(name: str) -> str:
    return f"{C}/ValueSet/{name}"


def ref(*types: str) -> list[dict]:
    return [
        {
            "code": "Reference",
            "targetProfile": [f"http://hl7.org/fhir/StructureDefinition/{t}" for t in types],
        }
    ]


def ext_slice(base: str, name: str, ext: str, lo: int, hi: str) -> dict:
    return {
        "id": f"{base}.extension:{name}",
        "path": f"{base}.extension",
        "sliceName": name,
        "min": lo,
        "max": hi,
        "type": [{"code": "Extension", "profile": [f"{C}/StructureDefinition/{ext}"]}],
    }


def slicing(path: str, disc_type: str, disc_path: str) -> dict:
    return {
        "id": path,
        "path": path,
        "slicing": {"discriminator": [{"type": disc_type, "path": disc_path}], "rules": "open"},
    }


def constraint(key: str, human: str, expression: str, severity: str = "error") -> dict:
    return {"key": key, "severity": severity, "human": human, "expression": expression}


def common_constraints(id_system: str) -> list[dict]:
    return [
        constraint(
            "kap-sec-1",
            "Security labels: confidentiality R and sensitivity PSY",
            "meta.security.where(system='http://terminology.hl7.org/CodeSystem/v3-Confidentiality' "
            "and code='R').exists() and meta.security.where(system='http://terminology.hl7.org/"
            "CodeSystem/v3-ActCode' and code='PSY').exists()",
        ),
        constraint(
            "kap-id-1",
            "At least one business identifier in the record's system",
            f"identifier.where(system='{id_system}' and value.exists()).exists()",
        ),
    ]


def el(eid: str, **kw) -> dict:
    return {"id": eid, "path": eid, **kw}


PROFILE_DEFS = {
    "kap-referral": (
        "ServiceRequest",
        "KAP referral",
        "A referral from a psychotherapist to a KAP clinic.",
        [
            el(
                "ServiceRequest",
                constraint=common_constraints(f"{C}/sid/referral")
                + [
                    constraint(
                        "kap-referral-1",
                        "meta.tag carries care-coordination from kap-information-category",
                        f"meta.tag.where(system='{C}/CodeSystem/kap-information-category' and "
                        "code='care-coordination').exists()",
                    )
                ],
            ),
            slicing("ServiceRequest.extension", "value", "url"),
            ext_slice("ServiceRequest", "collaborationModel", "kap-collaboration-model", 0, "1"),
            ext_slice("ServiceRequest", "readiness", "kap-readiness", 0, "1"),
            ext_slice("ServiceRequest", "goal", "kap-goal", 0, "*"),
            ext_slice("ServiceRequest", "clinicalContext", "kap-clinical-context", 0, "*"),
            el("ServiceRequest.identifier", min=1),
            el("ServiceRequest.intent", fixedCode="order"),
            slicing("ServiceRequest.category", "pattern", "$this"),
            el(
                "ServiceRequest.category:referral",
                path="ServiceRequest.category",
                sliceName="referral",
                min=1,
                max="1",
                patternCodeableConcept=cc(SCT, "3457005"),
            ),
            el("ServiceRequest.subject", min=1, type=ref("Patient")),
            el("ServiceRequest.requester", min=1, type=ref("Practitioner", "PractitionerRole")),
            el("ServiceRequest.performer", type=ref("Organization")),
            el("ServiceRequest.authoredOn", min=1),
        ],
    ),
    "kap-session": (
        "Procedure",
        "KAP session",
        "One step of the KAP care pathway (intake to integration).",
        [
            el(
                "Procedure",
                constraint=common_constraints(f"{C}/sid/session")
                + [
                    constraint(
                        "kap-session-1",
                        "A dosing session carries exactly one kap-dose extension",
                        f"category.coding.where(system='{C}/CodeSystem/kap-session-kind' and code='dosing')"
                        f".exists() implies extension.where(url='{C}/StructureDefinition/kap-dose').count() = 1",
                    ),
                    constraint(
                        "kap-session-2",
                        "When the session took place is given (performed[x] in R4, occurrence[x] in R5)",
                        "performed.exists()",
                    ),
                ],
            ),
            slicing("Procedure.extension", "value", "url"),
            ext_slice("Procedure", "dose", "kap-dose", 0, "1"),
            ext_slice("Procedure", "monitoring", "kap-monitoring", 0, "*"),
            ext_slice("Procedure", "contraindication", "kap-contraindication", 0, "*"),
            el("Procedure.identifier", min=1),
            el("Procedure.basedOn", min=1, max="1", type=ref("ServiceRequest")),
            el(
                "Procedure.category",
                min=1,
                binding={"strength": "required", "valueSet": vs("kap-session-kind")},
            ),
            el("Procedure.subject", type=ref("Patient")),
            el("Procedure.performer", min=1),
            el("Procedure.performer.actor", type=ref("Practitioner")),
            el(
                "Procedure.outcome", binding={"strength": "required", "valueSet": vs("kap-clearance-outcome")}
            ),
        ],
    ),
    "kap-release-of-information": (
        "Consent",
        "KAP release of information",
        "The client's consent to share KAP information with named recipients.",
        [
            el(
                "Consent",
                constraint=common_constraints(f"{C}/sid/consent")
                + [
                    constraint(
                        "kap-roi-1",
                        "A provision actor with role IRCP names the recipient",
                        f"provision.actor.where(role.coding.where(system='{V3_PART}' and code='IRCP').exists())"
                        ".exists()",
                    ),
                    constraint(
                        "kap-roi-2",
                        "Psychotherapy notes are never permitted",
                        f"provision.code.coding.where(system='{C}/CodeSystem/kap-information-category' and "
                        "code='psychotherapy-note').exists().not()",
                    ),
                ],
            ),
            el("Consent.identifier", min=1),
            el("Consent.scope", patternCodeableConcept=cc(CONSENT_SCOPE, "patient-privacy")),
            slicing("Consent.category", "pattern", "$this"),
            el(
                "Consent.category:roi",
                path="Consent.category",
                sliceName="roi",
                min=1,
                max="1",
                patternCodeableConcept=cc(LOINC, "64292-6"),
            ),
            el("Consent.patient", min=1, type=ref("Patient")),
            el("Consent.provision", min=1),
            el("Consent.provision.type", min=1, fixedCode="permit"),
            el("Consent.provision.actor", min=1),
            slicing("Consent.provision.action", "pattern", "$this"),
            el(
                "Consent.provision.action:disclose",
                path="Consent.provision.action",
                sliceName="disclose",
                min=1,
                max="1",
                patternCodeableConcept=cc(CONSENT_ACTION, "disclose"),
            ),
            el(
                "Consent.provision.code",
                min=1,
                binding={"strength": "required", "valueSet": vs("kap-information-category")},
            ),
        ],
    ),
    "kap-continuity-note": (
        "Communication",
        "KAP continuity note",
        "A consented note from the clinic to the referring therapist (never a transcript).",
        [
            el(
                "Communication",
                constraint=common_constraints(f"{C}/sid/note")
                + [
                    constraint(
                        "kap-note-1",
                        "Never a psychotherapy note: no psychotherapy-note category, no PSYTHPN "
                        "label, no transcript-like payload",
                        "category.coding.where(code='psychotherapy-note')"
                        ".exists().not() and meta.security.where(code='PSYTHPN').exists().not()",
                    ),
                    constraint(
                        "kap-note-2",
                        "A category from kap-note-category",
                        f"category.coding.where(memberOf('{vs('kap-note-category')}')).exists()",
                    ),
                ],
            ),
            el("Communication.identifier", min=1),
            el("Communication.category", min=1),
            el("Communication.subject", min=1, type=ref("Patient")),
            el("Communication.basedOn", type=ref("ServiceRequest")),
            el("Communication.about", type=ref("Procedure")),
            el("Communication.inResponseTo", type=ref("Communication")),
            el("Communication.sender", min=1),
            el("Communication.recipient", min=1),
            el("Communication.payload", min=1),
        ],
    ),
}

# Extensions: (title, context, value type or None for complex, binding VS, sub-extensions)
EXTENSIONS = {
    "kap-collaboration-model": (
        "KAP collaboration model",
        "ServiceRequest",
        "Coding",
        "kap-collaboration-model",
        [],
    ),
    "kap-readiness": ("KAP readiness", "ServiceRequest", "Coding", "kap-readiness", []),
    "kap-goal": ("KAP goal", "ServiceRequest", "string", None, []),
    "kap-clinical-context": (
        "KAP clinical context",
        "ServiceRequest",
        None,
        None,
        [
            ("category", 1, "1", "Coding", "kap-clinical-context-category"),
            ("summary", 1, "1", "string", None),
        ],
    ),
    "kap-dose": (
        "KAP dose",
        "Procedure",
        None,
        None,
        [
            ("medication", 1, "1", "CodeableConcept", None),
            ("route", 1, "1", "CodeableConcept", None),
            ("dose", 1, "1", "Quantity", None),
            ("supportPerson", 0, "1", "boolean", None),
        ],
    ),
    "kap-monitoring": (
        "KAP monitoring",
        "Procedure",
        None,
        None,
        [
            ("time", 1, "1", "dateTime", None),
            ("systolic", 0, "1", "Quantity", None),
            ("diastolic", 0, "1", "Quantity", None),
            ("heartRate", 0, "1", "Quantity", None),
            ("spo2", 0, "1", "Quantity", None),
        ],
    ),
    "kap-contraindication": ("KAP contraindication", "Procedure", "CodeableConcept", None, []),
}


def structure_definition(
    name: str,
    base_type: str,
    title: str,
    description: str,
    diff: list[dict],
    kind: str = "resource",
    context: str | None = None,
) -> dict:
    sd = {
        "resourceType": "StructureDefinition",
        "id": name,
        "url": f"{C}/StructureDefinition/{name}",
        "version": VERSION,
        "name": "".join(p.capitalize() for p in name.split("-")),
        "title": title,
        "status": "draft",
        "description": description,
        "fhirVersion": "4.0.1",
        "kind": kind,
        "abstract": False,
    }
    if context:
        sd["context"] = [{"type": "element", "expression": context}]
    sd.update(
        {
            "type": base_type,
            "baseDefinition": f"http://hl7.org/fhir/StructureDefinition/{base_type}",
            "derivation": "constraint",
            "differential": {"element": diff},
        }
    )
    return sd


def extension_sd(name: str, spec: tuple) -> dict:
    title, context, vtype, binding, subs = spec
    url = f"{C}/StructureDefinition/{name}"
    diff = [el("Extension", short=title)]
    if vtype:
        diff.append(el("Extension.extension", max="0"))
        diff.append(el("Extension.url", fixedUri=url))
        v = el("Extension.value[x]", min=1, type=[{"code": vtype}])
        if binding:
            v["binding"] = {"strength": "required", "valueSet": vs(binding)}
        diff.append(v)
    else:
        diff.append(slicing("Extension.extension", "value", "url"))
        for sub, lo, hi, t, b in subs:
            sid = f"Extension.extension:{sub}"
            diff.append(el(sid, path="Extension.extension", sliceName=sub, min=lo, max=hi))
            diff.append(el(f"{sid}.url", path="Extension.extension.url", fixedUri=sub))
            v = el(f"{sid}.value[x]", path="Extension.extension.value[x]", min=1, type=[{"code": t}])
            if b:
                v["binding"] = {"strength": "required", "valueSet": vs(b)}
            diff.append(v)
        diff.append(el("Extension.url", fixedUri=url))
        diff.append(el("Extension.value[x]", max="0"))
    return structure_definition(
        name, "Extension", title, f"{title} (KAP extension).", diff, kind="complex-type", context=context
    )


def code_system(name: str, spec: tuple) -> dict:
    title, desc, concepts = spec
    return {
        "resourceType": "CodeSystem",
        "id": name,
        "url": f"{C}/CodeSystem/{name}",
        "version": VERSION,
        "name": "".join(p.capitalize() for p in name.split("-")),
        "title": title,
        "status": "draft",
        "description": desc,
        "caseSensitive": True,
        "valueSet": vs(name),
        "content": "complete",
        "count": len(concepts),
        "concept": [{"code": c, "display": d, "definition": f} for c, d, f in concepts],
    }


def value_set(name: str, spec: tuple) -> dict:
    title, cs_name, codes = spec
    inc: dict = {"system": f"{C}/CodeSystem/{cs_name}"}
    if codes:
        inc["concept"] = [{"code": c} for c in codes]
    return {
        "resourceType": "ValueSet",
        "id": name,
        "url": vs(name),
        "version": VERSION,
        "name": "".join(p.capitalize() for p in name.split("-")),
        "title": title,
        "status": "draft",
        "description": f"{title} codes.",
        "compose": {"include": [inc]},
    }


def write(res: dict) -> str:
    fname = f"{res['resourceType']}-{res['id']}.json"
    (PROFILES / fname).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    return fname


def main() -> None:
    files = []
    for name, (base, title, desc, diff) in PROFILE_DEFS.items():
        files.append(
            (write(structure_definition(name, base, title, desc, diff)), name, "StructureDefinition", base)
        )
    for name, spec in EXTENSIONS.items():
        files.append((write(extension_sd(name, spec)), name, "StructureDefinition", "Extension"))
    for name, spec in CODE_SYSTEMS.items():
        files.append((write(code_system(name, spec)), name, "CodeSystem", None))
    for name, spec in VALUE_SETS.items():
        files.append((write(value_set(name, spec)), name, "ValueSet", None))
    pkg = {
        "name": "fhir-kap.profiles",
        "version": VERSION,
        "canonical": C,
        "title": "KAP collaborative care",
        "description": "Profiles, extensions and terminology for Ketamine-Assisted Psychotherapy "
        "collaborative care (fhir-kap).",
        "fhirVersions": ["4.0.1"],
        "type": "fhir.ig",
        "license": "Apache-2.0",
        "dependencies": {"hl7.fhir.r4.core": "4.0.1"},
    }
    (PROFILES / "package.json").write_text(json.dumps(pkg, indent=2) + "\n")
    index = {"index-version": 1, "files": []}
    for fname, rid, rtype, base in sorted(files):
        entry = {
            "filename": fname,
            "resourceType": rtype,
            "id": rid,
            "url": f"{C}/{rtype}/{rid}",
            "version": VERSION,
        }
        if rtype == "StructureDefinition":
            entry.update(
                {
                    "kind": "complex-type" if base == "Extension" else "resource",
                    "type": base,
                    "derivation": "constraint",
                }
            )
        index["files"].append(entry)
    (PROFILES / ".index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(files)} resources, package.json, .index.json")


if __name__ == "__main__":
    main()
