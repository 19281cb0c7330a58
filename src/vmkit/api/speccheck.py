"""Check requests and responses against the OpenAPI document, as they happen (a test instrument).

When ``VMKIT_API_SPEC_CHECK`` names an OpenAPI document (the test-suite sets it to the committed
``docs/openapi.json``), :class:`vmkit.api.SupervisorClient` passes every request body and every
response (each line of a stream) through :func:`check`: a violation raises
:class:`SpecViolation` and is appended to the file named by ``VMKIT_API_SPEC_LOG``, so a test run
fails even where a CLI subprocess swallowed the error. This is what Firecracker's
``swagger_validator.py`` does for its integration tests. Needs ``jsonschema`` (a development
dependency); without the variable nothing is imported.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from vmkit.errors import VmkitError

ENV = "VMKIT_API_SPEC_CHECK"
LOG_ENV = "VMKIT_API_SPEC_LOG"


class SpecViolation(VmkitError):
    """A request or response that the OpenAPI document does not allow."""


def enabled() -> bool:
    return bool(os.environ.get(ENV))


@functools.cache
def _load(path: str) -> tuple[dict[str, Any], list[tuple[re.Pattern[str], str]], Any]:
    from jsonschema import Draft202012Validator  # noqa: F401  (fails early if missing)
    from referencing import Registry, Resource

    # the document's references, made absolute once, resolve in the registry below
    doc = json.loads(Path(path).read_text().replace('"#/components/', '"urn:vmkit-openapi#/components/'))
    templates = [(re.compile("^" + re.sub(r"\{[^/]+\}", "[^/]+", p) + "$"), p) for p in doc["paths"]]
    registry: Any = Registry().with_resource("urn:vmkit-openapi", Resource.from_contents(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": doc["components"]}))
    return doc, templates, registry


def _validate(schema: dict[str, Any], instance: Any, registry: Any) -> str | None:
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema, registry=registry).iter_errors(instance), key=lambda e: e.path)
    if not errors:
        return None
    e = errors[0]
    return f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"


def check(method: str, path: str, *, request: Any = None, status: int | None = None, response: Any = None,
          media: str = "application/json") -> None:
    """Raise :class:`SpecViolation` if the request body, or the response with ``status``, breaks the spec."""
    spec_path = os.environ.get(ENV)
    if not spec_path:
        return
    doc, templates, registry = _load(spec_path)
    route = path.split("?", 1)[0]
    template = next((t for rx, t in templates if rx.match(route)), None)
    problem: str | None = None
    op = doc["paths"].get(template or "", {}).get(method.lower()) if template else None
    if op is None:
        problem = f"{method} {route} is not in the API document"
    elif status is None:  # the request
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if request is not None and body is None:
            problem = f"{method} {route} takes no JSON body"
        elif body is not None and request is not None:
            problem = _validate(body["schema"], request, registry)
            problem = problem and f"request body: {problem}"
    else:
        answers = op["responses"]
        answer = answers.get(str(status)) or answers.get("default")
        if answer is None:
            problem = f"status {status} is not documented"
        else:
            content = answer.get("content", {})
            schema = (content.get(media) or {}).get("schema")
            if schema is None and content:
                problem = f"status {status} answers {media}, the document says {', '.join(content)}"
            elif schema is not None:
                problem = _validate(schema, response, registry)
                problem = problem and f"response {status}: {problem}"
    if problem:
        message = f"API spec violation: {method} {route}: {problem}"
        log = os.environ.get(LOG_ENV)
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps({"method": method, "path": route, "problem": problem}) + "\n")
        raise SpecViolation(message)
