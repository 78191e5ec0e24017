"""Invariants of whole resources that need no FHIRPath engine (validation/, layer 1: pure core;
imports base only).

`resource_invariants(resource, rt, release)` returns the issues of one resource (not of the
resources nested in it: the validator recurses into those):

- contained resources (DomainResource dom-2..dom-5): no nested contained (dom-2), referenced from
  the container or referring to it with '#' (dom-3), no meta.versionId / lastUpdated (dom-4), no
  security labels (dom-5); each has an id, and ids are unique (`contained:id`);
- Bundle: bdl-1, bdl-2, bdl-3/bdl-4 (R4) or bdl-3a..3d (R5), bdl-5, bdl-7 (fullUrl unique, the
  versionId aside), bdl-8, bdl-9..bdl-12, bdl-13/bdl-14 (R5); fullUrl is absolute and, where it
  is a RESTful URL, ends with the resource's id (`bdl:fullUrl`); search results have ids, an
  `outcome` search entry is an OperationOutcome, and a link relation occurs once (`bdl:*`);
- narrative: `text.div` is well-formed XHTML without a DOCTYPE (txt-1, in part);
- a few invariants of single resource types: que-12 (Questionnaire), ras-2 (RiskAssessment),
  absolute code systems in ValueSet.compose (`vs:system`), composite SearchParameters with
  components (`spd:composite`).

Messages never quote free text from the resource.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from ..config import Release
from ..errors import Issue
from .paths import _expr, _pointer

_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_RESTFUL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _issue(rule: str, message: str, rt: str, path: tuple[Any, ...], code: str = "invariant") -> Issue:
    return Issue("error", code, message, _expr(rt, path), _pointer(path), rule)


def _strings(node: Any) -> Iterator[str]:
    """Every string value under `node` (nested resources included)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if type(n) is dict:
            stack.extend(n.values())
        elif type(n) is list:
            stack.extend(n)
        elif type(n) is str:
            yield n


def _dicts(node: Any) -> list[Any]:
    return [x for x in node if isinstance(x, dict)] if isinstance(node, list) else []


def resource_invariants(resource: dict[str, Any], rt: str, release: Release) -> list[Issue]:
    out: list[Issue] = []
    if "contained" in resource:
        _contained(resource, rt, out)
    if rt == "Bundle":
        _bundle(resource, release, out)
    elif rt == "Questionnaire":
        _questionnaire_items(resource.get("item"), ("item",), out)
    elif rt == "RiskAssessment":
        prediction = resource.get("prediction")
        for i, p in enumerate(prediction if isinstance(prediction, list) else []):
            v = p.get("probabilityDecimal") if isinstance(p, dict) else None
            if isinstance(v, (int, float)) and v > 100:
                out.append(_issue("ras-2", "Probability must be <= 100", rt, ("prediction", i)))
    elif rt == "ValueSet":
        _value_set(resource, out)
    elif rt == "SearchParameter":
        if resource.get("type") == "composite" and len(_dicts(resource.get("component"))) < 2:
            out.append(
                _issue("spd:composite", "A composite search parameter needs two or more components", rt, ())
            )
    text = resource.get("text")
    if isinstance(text, dict) and isinstance(text.get("div"), str):
        problem = _xhtml_problem(text["div"])
        if problem:
            out.append(_issue("txt-1", problem, rt, ("text", "div"), "value"))
    return out


# -- contained resources ----------------------------------------------------------------------


def _contained(resource: dict[str, Any], rt: str, out: list[Issue]) -> None:
    contained = resource.get("contained")
    if not isinstance(contained, list):
        return
    others = {k: v for k, v in resource.items() if k != "contained"}
    referenced = {s for s in _strings(others) if s.startswith("#")}
    for c in contained:  # a contained resource may be referenced from another one
        referenced |= {s for s in _strings(c) if s.startswith("#")}
    referenced = {s.split("|", 1)[0] for s in referenced}
    ids: set[str] = set()
    for i, c in enumerate(contained):
        if not isinstance(c, dict):
            continue
        path = ("contained", i)
        cid = c.get("id")
        if not isinstance(cid, str):
            out.append(_issue("contained:id", "A contained resource requires an id", rt, path, "required"))
        elif cid in ids:
            out.append(_issue("contained:id", "Duplicate id for a contained resource", rt, path + ("id",)))
        else:
            ids.add(cid)
        if "contained" in c:
            out.append(_issue("dom-2", "A contained resource must not contain resources", rt, path))
        refers_back = any(s == "#" for s in _strings(c))
        if not refers_back and (not isinstance(cid, str) or "#" + cid not in referenced):
            out.append(
                _issue(
                    "dom-3",
                    "A contained resource must be referenced from elsewhere in the resource or refer to it",
                    rt,
                    path,
                )
            )
        meta = c.get("meta")
        if isinstance(meta, dict):
            if "versionId" in meta or "lastUpdated" in meta:
                out.append(
                    _issue("dom-4", "A contained resource must not have a versionId or lastUpdated", rt, path)
                )
            if meta.get("security"):
                out.append(_issue("dom-5", "A contained resource must not have security labels", rt, path))


# -- Bundle -----------------------------------------------------------------------------------

_SEARCH_OR_HISTORY = ("searchset", "history")
_WRITES = ("POST", "PUT", "PATCH")


def _bundle(b: dict[str, Any], release: Release, out: list[Issue]) -> None:
    rt = "Bundle"
    kind = b.get("type")
    entries = _dicts(b.get("entry"))
    raw = b.get("entry")
    raw_entries: list[Any] = raw if isinstance(raw, list) else []
    if "total" in b and kind not in _SEARCH_OR_HISTORY:
        out.append(_issue("bdl-1", "total only when a search or history", rt, ("total",)))
    relations: set[str] = set()
    for i, link in enumerate(_dicts(b.get("link"))):
        rel = link.get("relation")
        if isinstance(rel, str):
            if rel in relations:
                out.append(_issue("bdl:link", "A link relation can only occur once", rt, ("link", i)))
            relations.add(rel)
    seen: dict[tuple[str, Any], int] = {}
    for i, e in enumerate(raw_entries):
        if not isinstance(e, dict):
            continue
        path = ("entry", i)
        res = e.get("resource")
        req = e.get("request")
        method = req.get("method") if isinstance(req, dict) else None
        if "search" in e and kind != "searchset":
            out.append(_issue("bdl-2", "entry.search only when a search", rt, path + ("search",)))
        if release is Release.R4:
            if ("request" in e) != (kind in ("batch", "transaction", "history")):
                out.append(
                    _issue(
                        "bdl-3",
                        "entry.request mandatory for batch/transaction/history, otherwise prohibited",
                        rt,
                        path,
                    )
                )
            if ("response" in e) != (kind in ("batch-response", "transaction-response", "history")):
                out.append(
                    _issue(
                        "bdl-4",
                        "entry.response mandatory for batch-response/transaction-response/history, "
                        "otherwise prohibited",
                        rt,
                        path,
                    )
                )
        else:
            _bundle_r5_entry(kind, e, method, path, out)
        if not ("resource" in e or "request" in e or "response" in e):
            out.append(
                _issue(
                    "bdl-5", "An entry must have a resource unless there's a request or response", rt, path
                )
            )
        full = e.get("fullUrl")
        if isinstance(full, str) and full:
            if "/_history/" in full:
                out.append(
                    _issue("bdl-8", "fullUrl cannot be a version specific reference", rt, path + ("fullUrl",))
                )
            if not _ABSOLUTE.match(full):
                out.append(_issue("bdl:fullUrl", "fullUrl must be an absolute URL", rt, path + ("fullUrl",)))
            elif isinstance(res, dict):
                m = _RESTFUL.search(full)
                rid = res.get("id")
                if m and m.group(1) == res.get("resourceType") and isinstance(rid, str) and m.group(2) != rid:
                    out.append(
                        _issue(
                            "bdl:fullUrl",
                            "fullUrl does not end with the resource's type and id",
                            rt,
                            path + ("fullUrl",),
                        )
                    )
            meta = res.get("meta") if isinstance(res, dict) else None
            vid = meta.get("versionId") if isinstance(meta, dict) else None
            key = (full, vid if isinstance(vid, str) else None)  # a versionId of another type: none
            if kind != "history" and key in seen:
                out.append(
                    _issue(
                        "bdl-7",
                        "fullUrl must be unique in a bundle (or the entries differ in meta.versionId)",
                        rt,
                        path + ("fullUrl",),
                    )
                )
            seen.setdefault(key, i)
        search = e.get("search")
        if kind == "searchset" and isinstance(res, dict):
            mode = search.get("mode") if isinstance(search, dict) else None
            if mode == "outcome" and res.get("resourceType") != "OperationOutcome":
                out.append(
                    _issue(
                        "bdl:search-outcome", "A search outcome entry must be an OperationOutcome", rt, path
                    )
                )
            elif mode != "outcome" and not res.get("id") and res.get("resourceType") != "OperationOutcome":
                out.append(_issue("bdl:search-id", "Search results must have ids", rt, path + ("resource",)))
    first = entries[0].get("resource") if entries else None
    first_type = first.get("resourceType") if isinstance(first, dict) else None
    if kind == "document":
        ident = b.get("identifier")
        if not (isinstance(ident, dict) and ident.get("system") and ident.get("value")):
            out.append(
                _issue("bdl-9", "A document must have an identifier with a system and a value", rt, ())
            )
        if not b.get("timestamp"):
            out.append(_issue("bdl-10", "A document must have a date (timestamp)", rt, ()))
        if first_type != "Composition":
            out.append(_issue("bdl-11", "A document must have a Composition as the first resource", rt, ()))
    elif kind == "message" and first_type != "MessageHeader":
        out.append(_issue("bdl-12", "A message must have a MessageHeader as the first resource", rt, ()))
    elif kind == "subscription-notification" and first_type != "SubscriptionStatus":
        out.append(
            _issue("bdl-13", "A subscription-notification must have a SubscriptionStatus first", rt, ())
        )


def _bundle_r5_entry(
    kind: Any, e: dict[str, Any], method: Any, path: tuple[Any, ...], out: list[Issue]
) -> None:
    rt = "Bundle"
    has_res, has_req, has_resp = "resource" in e, "request" in e, "response" in e
    if kind in ("document", "message", "searchset", "collection"):
        if not has_res or has_req or has_resp:
            out.append(
                _issue(
                    "bdl-3a",
                    f"In a {kind} bundle every entry has a resource and no request or response",
                    rt,
                    path,
                )
            )
    elif kind == "history":
        if not (has_req and has_resp) or (method in _WRITES) != has_res:
            out.append(
                _issue(
                    "bdl-3b",
                    "In a history bundle every entry has a request and a response, and a resource for "
                    "POST/PUT/PATCH",
                    rt,
                    path,
                )
            )
        if method == "PATCH":
            out.append(_issue("bdl-14", "entry.request.method PATCH not allowed for history", rt, path))
    elif kind in ("transaction", "batch"):
        if method is None or (method in _WRITES) != has_res:
            out.append(
                _issue(
                    "bdl-3c",
                    f"In a {kind} every entry has a request, and a resource exactly for POST/PUT/PATCH",
                    rt,
                    path,
                )
            )
    elif kind in ("transaction-response", "batch-response") and not has_resp:
        out.append(_issue("bdl-3d", f"In a {kind} every entry has a response", rt, path))


# -- single resource types --------------------------------------------------------------------


def _questionnaire_items(items: Any, path: tuple[Any, ...], out: list[Issue]) -> None:
    for i, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            continue
        here = path + (i,)
        when = item.get("enableWhen")
        if isinstance(when, list) and len(when) > 1 and "enableBehavior" not in item:
            out.append(
                _issue(
                    "que-12",
                    "If there are more than one enableWhen, enableBehavior must be specified",
                    "Questionnaire",
                    here,
                )
            )
        _questionnaire_items(item.get("item"), here + ("item",), out)


def _value_set(vs: dict[str, Any], out: list[Issue]) -> None:
    compose = vs.get("compose")
    if not isinstance(compose, dict):
        return
    for part in ("include", "exclude"):
        for i, inc in enumerate(_dicts(compose.get(part))):
            system = inc.get("system")
            if isinstance(system, str) and not _ABSOLUTE.match(system):
                out.append(
                    _issue(
                        "vs:system",
                        f"ValueSet.compose.{part}.system must be an absolute URI (a contained code "
                        "system is named by its canonical URL)",
                        "ValueSet",
                        ("compose", part, i, "system"),
                        "value",
                    )
                )


# -- narrative --------------------------------------------------------------------------------


XHTML_NS = "http://www.w3.org/1999/xhtml"
# Elements the FHIR narrative must not hold (txt-1: basic HTML formatting only, no scripts, forms,
# frames, objects or document-level elements).
_FORBIDDEN = frozenset(
    "script style head body html title meta link base form input button select textarea option "
    "frame frameset iframe object embed applet param noscript".split()
)


def _xhtml_problem(div: str) -> str | None:
    """Why `div` is not acceptable FHIR narrative XHTML, or None: well-formed XML, no DOCTYPE or
    entity declarations (XXE), one root <div> in the XHTML namespace (txt-3 in part), no forbidden
    element and no event attribute (txt-1 in part). Entities are XML's own only (&lt; &gt; &amp;
    &quot; &apos; and character references): `&nbsp;` or `&reg;` are not XML, as HL7's validator
    also says (write `&#160;`)."""
    from xml.parsers import expat  # only for resources with a narrative: not at start-up

    parser = expat.ParserCreate(namespace_separator=" ")
    problems: list[str] = []
    depth = [0]

    def start_doctype(*_args: Any) -> None:
        problems.append("Narrative must not declare a DOCTYPE or entities")

    def start_element(name: str, attrs: dict[str, str]) -> None:
        ns, _, local = name.rpartition(" ")
        if depth[0] == 0 and (local != "div" or ns != XHTML_NS):
            problems.append("Narrative must be a <div> in the XHTML namespace")
        elif local.lower() in _FORBIDDEN:
            problems.append("Narrative holds an element HTML formatting does not allow")
        if any(a.rpartition(" ")[2].lower().startswith("on") for a in attrs):
            problems.append("Narrative holds an event attribute")
        depth[0] += 1

    def end_element(_name: str) -> None:
        depth[0] -= 1

    parser.StartDoctypeDeclHandler = start_doctype
    parser.EntityDeclHandler = lambda *_a: problems.append("Narrative must not declare entities")
    parser.StartElementHandler = start_element
    parser.EndElementHandler = end_element
    try:
        parser.Parse(div, True)
    except expat.ExpatError as exc:
        if exc.code == expat.errors.codes[expat.errors.XML_ERROR_UNDEFINED_ENTITY]:
            return (
                "Narrative uses an entity XML does not define (only &lt; &gt; &amp; &quot; &apos; and &#N;)"
            )
        return problems[0] if problems else "Narrative is not well-formed XHTML"
    return problems[0] if problems else None
