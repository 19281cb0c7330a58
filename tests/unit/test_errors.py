"""Errors crossing a process boundary (supervisor API, start report) come back as themselves."""

from __future__ import annotations

from pathlib import Path

from vmkit.errors import (
    STATE_FILE_CODES,
    ConfigError,
    ExitCode,
    NotFoundError,
    VmkitError,
    error_fields,
    error_from_fields,
)
from vmkit.state.file import AuthenticationFailed, ConfigMismatch, StateFileError
from vmkit.state.savestate import RestoreFailed


def test_a_known_class_comes_back_as_itself() -> None:
    sent = ConfigMismatch(Path("/x/s.vmstate"), field="memory", saved="128M", current="256M")
    back = error_from_fields(error_fields(sent))
    assert type(back) is ConfigMismatch and isinstance(back, StateFileError)
    assert back.exit_code == ExitCode.STATE_CONFIG and str(back) == str(sent)
    assert back.path is None  # only message and hint travel


def test_restore_failure_keeps_its_own_exit_code() -> None:
    back = error_from_fields(error_fields(RestoreFailed(Path("/x/s"), "Missing section footer")))
    assert type(back) is RestoreFailed and back.exit_code == ExitCode.STATE_RESTORE == 17


def test_unknown_class_falls_back_to_its_exit_code() -> None:
    back = error_from_fields({"type": "SomethingNew", "message": "m", "hint": "h", "exit_code": 15})
    assert type(back) is VmkitError and back.exit_code == ExitCode.STATE_AUTH and str(back) == "m\n  hint: h"
    fam = error_from_fields({"type": "SomethingNew", "message": "gone", "exit_code": 3})
    assert type(fam) is NotFoundError and fam.exit_code == ExitCode.NOT_FOUND


def test_a_name_with_another_exit_code_is_not_trusted() -> None:
    # the class is looked up by name, but only used when the exit code agrees
    back = error_from_fields({"type": "AuthenticationFailed", "message": "m", "exit_code": 2})
    assert type(back) is ConfigError and not isinstance(back, AuthenticationFailed)


def test_state_file_codes_are_distinct() -> None:
    assert sorted(STATE_FILE_CODES) == list(range(10, 18))
    assert len(ExitCode.__members__) == len(ExitCode)  # no code is an alias of another (they would share a number)
