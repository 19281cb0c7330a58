"""The REST API's contract: the committed OpenAPI document is the one the models generate, it is
valid, and the spec checker used by the integration tests catches what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from vmkit.api import spec, speccheck
from vmkit.errors import ConfigError, Problem, error_fields, error_from_fields

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "openapi.json"


def test_committed_document_is_the_generated_one() -> None:
    assert DOC.read_text() == spec.openapi_json(), (
        "docs/openapi.json is stale: regenerate it with `python -m vmkit.api.spec > docs/openapi.json`")


def test_document_is_valid_openapi_31() -> None:
    doc = json.loads(DOC.read_text())
    assert doc["openapi"] == "3.1.0"
    for name, schema in doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)  # raises, naming the schema path, if invalid
        assert name
    ops = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ops) == len(set(ops)) == len(spec.ROUTES)
    for item in doc["paths"].values():
        for op in item.values():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture()
def checking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    log = tmp_path / "violations.ndjson"
    monkeypatch.setenv(speccheck.ENV, str(DOC))
    monkeypatch.setenv(speccheck.LOG_ENV, str(log))
    return log


def test_spec_check_accepts_what_the_document_allows(checking: Path) -> None:
    speccheck.check("POST", "/v1/exec", request={"argv": ["uname", "-a"], "timeout": 5})
    speccheck.check("POST", "/v1/exec", status=200,
                    response={"exit_code": 0, "stdout": "", "stderr": "", "signal": None})
    speccheck.check("DELETE", "/v1/disks/disk3", request={"timeout": 5})
    speccheck.check("POST", "/v1/pause", status=409, response={"error": {
        "type": "StateError", "message": "m", "hint": None, "exit_code": 4}})
    speccheck.check("POST", "/v1/save", status=200, media="application/x-ndjson",
                    response={"progress": {"done": 1, "total": 2}})
    assert not checking.exists()


@pytest.mark.parametrize(("method", "path", "kwargs", "needle"), [
    ("POST", "/v1/exec", {"request": {"argv": "uname"}}, "request body: argv"),
    ("POST", "/v1/exec", {"request": {"argv": ["x"], "bogus": 1}}, "request body"),
    ("POST", "/v1/nope", {"request": {}}, "not in the API document"),
    ("POST", "/v1/pause", {"status": 409, "response": "plain text"}, "response 409"),
    ("GET", "/v1/state", {"status": 200, "response": {"state": "dancing", "updated_at": 1.0}}, "response 200"),
])
def test_spec_check_catches_violations(checking: Path, method: str, path: str, kwargs: dict[str, object],
                                       needle: str) -> None:
    with pytest.raises(speccheck.SpecViolation, match="API spec violation") as err:
        speccheck.check(method, path, **kwargs)  # type: ignore[arg-type]
    assert needle in str(err.value)
    assert json.loads(checking.read_text().splitlines()[0])["path"] == path


def test_config_errors_cross_the_api_with_their_field() -> None:
    fields = error_fields(ConfigError([Problem("timeout", "must be a number")], context="request"))
    assert fields["field"] == "timeout" and fields["type"] == "ConfigError" and fields["exit_code"] == 2
    back = error_from_fields(fields)
    assert isinstance(back, ConfigError) and back.problems[0].field == "timeout"


def test_machine_states_are_the_same_list_everywhere() -> None:
    from typing import get_args

    from vmkit.api.models import MachineStateName
    from vmkit.host.instance import LIVE
    from vmkit.runtime.states import LIVE_STATES, VmState

    assert set(get_args(MachineStateName)) == {s.value for s in VmState}
    assert tuple(s.value for s in LIVE_STATES) == LIVE
