"""The one root exception of vmkit and its families.

Every error vmkit raises derives from :class:`VmkitError`. Each family carries the
context a caller needs (field, state, path) and a process exit code that the CLI uses,
so scripts can tell "bad input" from "not found" from "wrong state" from "QEMU failed".
Messages say what went wrong *and* what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any, NamedTuple


class ExitCode(IntEnum):
    """Process exit codes of the ``vmkit`` command: one per error family, and one per kind of
    unusable state file (10-17, see :data:`STATE_FILE_CODES`)."""

    OK = 0
    ERROR = 1
    BAD_INPUT = 2
    NOT_FOUND = 3
    WRONG_STATE = 4
    QEMU_FAILED = 5
    HOST_MISSING = 6
    IMAGE_FAILED = 7
    TIMEOUT = 8
    CONFLICT = 9
    STATE_FILE = 10
    """A state file cannot be written (no space, I/O error) or the state-file key is unsafe."""
    NOT_A_STATE_FILE = 11
    STATE_FORMAT = 12
    """Written in a format version this vmkit does not read."""
    STATE_QEMU = 13
    """Written by an incompatible QEMU version or machine type."""
    STATE_CONFIG = 14
    """Saved from a different machine configuration."""
    STATE_AUTH = 15
    """Authentication failed: tampered, truncated, or written with another user's key."""
    STATE_DISKS = 16
    """The disks changed since the save."""
    STATE_RESTORE = 17
    """QEMU could not load the saved state."""
    MIGRATION_FAILED = 18
    PROVISION_FAILED = 19
    """A template's provisioning script failed, or a readiness probe did not pass in time."""
    UNREACHABLE = 20
    """A host (a libvirt URI given to ``--connect``) could not be reached or refused the connection."""
    EXEC_FAILED = 125
    """``vmkit exec`` only: vmkit itself failed (any other code there is the guest command's own,
    as with ``docker exec``)."""
    COMMAND_CANNOT_RUN = 126
    """``vmkit exec``: the guest could not start the command (not executable, no permission)."""
    COMMAND_NOT_FOUND = 127
    """``vmkit exec``: the guest has no such command."""
    INTERRUPTED = 130


STATE_FILE_CODES = frozenset(c for c in ExitCode if 10 <= c <= 17)
"""Every exit code that means "this state file cannot be written or used"."""


_BY_NAME: dict[str, type[VmkitError]] = {}


class VmkitError(Exception):
    """Root of every error raised by vmkit."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_NAME.setdefault(cls.__name__, cls)  # errors crossing a process boundary come back as themselves

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class Problem(NamedTuple):
    """One problem found while validating input: where it is and what to do (a named tuple, not a
    dataclass: ``dataclasses`` costs ``vmkit list`` about 10 ms to import)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ConfigError(VmkitError):
    """Bad input: one or more problems, each naming its field path."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, problems: Iterable[Problem], *, context: str = "configuration") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"invalid {context} ({n} problem{'s' if n != 1 else ''}):\n{lines}")

    @classmethod
    def single(cls, field: str, message: str) -> ConfigError:
        return cls([Problem(field, message)])


class NotFoundError(VmkitError):
    """A named thing (instance, image, file) does not exist."""

    exit_code = ExitCode.NOT_FOUND

    def __init__(self, kind: str, name: str, *, hint: str | None = None) -> None:
        super().__init__(f"{kind} {name!r} not found", hint=hint)
        self.kind = kind
        self.name = name


class AlreadyExistsError(VmkitError):
    exit_code = ExitCode.CONFLICT

    def __init__(self, kind: str, name: str, *, hint: str | None = None) -> None:
        super().__init__(f"{kind} {name!r} already exists", hint=hint)
        self.kind = kind
        self.name = name


class StateError(VmkitError):
    """An operation was asked for in a lifecycle state that does not allow it."""

    exit_code = ExitCode.WRONG_STATE

    def __init__(self, operation: str, current: str, required: Sequence[str]) -> None:
        need = " or ".join(required)
        super().__init__(
            f"cannot {operation}: the machine is {current}, it must be {need}",
        )
        self.operation = operation
        self.current = current
        self.required = tuple(required)


class QemuError(VmkitError):
    """QEMU refused a command, failed to start, or died."""

    exit_code = ExitCode.QEMU_FAILED


class HostError(VmkitError):
    """The host lacks a tool or capability vmkit needs."""

    exit_code = ExitCode.HOST_MISSING


class MigrationError(VmkitError):
    """A migration did not complete (the machine runs on the source, as before, unless the message says otherwise)."""

    exit_code = ExitCode.MIGRATION_FAILED


class ImageError(VmkitError):
    """Building, pulling or verifying a guest image failed."""

    exit_code = ExitCode.IMAGE_FAILED


class ProvisionError(VmkitError):
    """A provisioning script of the machine's template failed, or one of its probes never passed."""

    exit_code = ExitCode.PROVISION_FAILED


class CommandCannotRun(VmkitError):
    """The guest could not start a command (``guest-exec`` failed): not executable, no permission."""

    exit_code = ExitCode.COMMAND_CANNOT_RUN


class CommandNotFound(CommandCannotRun):
    """The guest has no such command."""

    exit_code = ExitCode.COMMAND_NOT_FOUND


class UnreachableError(VmkitError):
    """The host a command was sent to could not be reached (connection refused, authentication failed)."""

    exit_code = ExitCode.UNREACHABLE


class VmTimeoutError(VmkitError):
    """Something did not happen in the time allowed."""

    exit_code = ExitCode.TIMEOUT


_BY_CODE: dict[int, type[VmkitError]] = {
    ExitCode.BAD_INPUT: ConfigError,
    ExitCode.NOT_FOUND: NotFoundError,
    ExitCode.WRONG_STATE: StateError,
    ExitCode.QEMU_FAILED: QemuError,
    ExitCode.HOST_MISSING: HostError,
    ExitCode.IMAGE_FAILED: ImageError,
    ExitCode.TIMEOUT: VmTimeoutError,
    ExitCode.UNREACHABLE: UnreachableError,
    ExitCode.CONFLICT: AlreadyExistsError,
    ExitCode.COMMAND_CANNOT_RUN: CommandCannotRun,
    ExitCode.COMMAND_NOT_FOUND: CommandNotFound,
}


def error_from_code(code: int, message: str, hint: str | None = None) -> VmkitError:
    """Rebuild an error of the right family from its exit code (errors crossing a process boundary)."""
    return _rebuild(_BY_CODE.get(code, VmkitError), code, message, hint)


def error_fields(exc: VmkitError) -> dict[str, Any]:
    """An error as it crosses a process boundary (the supervisor's API and its start report)."""
    out: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                           "exit_code": int(exc.exit_code)}
    if isinstance(exc, ConfigError) and exc.problems:
        out["field"] = exc.problems[0].field  # the (first) input at fault; the message lists them all
    return out


def error_from_fields(err: Mapping[str, Any]) -> VmkitError:
    """The error :func:`error_fields` describes: its own class where this process knows it (by
    name, with the same exit code), else its family. Only message and hint are restored; other
    attributes keep their class defaults."""
    code = int(err.get("exit_code", ExitCode.ERROR))
    message, hint = str(err.get("message", "the supervisor reported an error")), err.get("hint")
    cls = _BY_NAME.get(str(err.get("type")))
    if cls is not None and int(cls.exit_code) == code:
        exc = _rebuild(cls, code, message, hint)
    else:
        exc = error_from_code(code, message, hint)
    if isinstance(exc, ConfigError) and err.get("field"):
        exc.problems = (Problem(str(err["field"]), message),)
    return exc


def _rebuild(cls: type[VmkitError], code: int, message: str, hint: str | None) -> VmkitError:
    exc = cls.__new__(cls)
    VmkitError.__init__(exc, message, hint=hint)
    if isinstance(exc, ConfigError):
        exc.problems = ()
    if int(exc.exit_code) != code and code in ExitCode._value2member_map_:
        exc.exit_code = ExitCode(code)
    return exc
