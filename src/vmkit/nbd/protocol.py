"""NBD wire format: magic numbers, flags, option/command/reply codes and packed structs.

Everything here follows the NBD protocol document (NetworkBlockDevice/nbd ``doc/proto.md``).
All integers on the wire are big-endian. The constants are plain ``int`` so the server's hot
path compares machine integers; the ``*_NAMES`` tables give names for logs and errors.

Only the fixed newstyle handshake is spoken (no oldstyle, no TLS, no extended headers).
"""

from __future__ import annotations

import struct
from typing import Final

# --- magic numbers -------------------------------------------------------------------------
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- handshake flags (server, 16 bits) and client flags (32 bits) --------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1
CLIENT_FLAGS_KNOWN: Final = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (16 bits) ----------------------------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- options -------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_PEEK_EXPORT: Final = 4
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10
OPT_EXTENDED_HEADERS: Final = 11

OPT_NAMES: Final[dict[int, str]] = {
    OPT_EXPORT_NAME: "EXPORT_NAME",
    OPT_ABORT: "ABORT",
    OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT",
    OPT_STARTTLS: "STARTTLS",
    OPT_INFO: "INFO",
    OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# --- option reply types --------------------------------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
_REP_ERR: Final = 1 << 31
REP_ERR_UNSUP: Final = _REP_ERR + 1
REP_ERR_POLICY: Final = _REP_ERR + 2
REP_ERR_INVALID: Final = _REP_ERR + 3
REP_ERR_PLATFORM: Final = _REP_ERR + 4
REP_ERR_TLS_REQD: Final = _REP_ERR + 5
REP_ERR_UNKNOWN: Final = _REP_ERR + 6
REP_ERR_SHUTDOWN: Final = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD: Final = _REP_ERR + 8
REP_ERR_TOO_BIG: Final = _REP_ERR + 9

REP_NAMES: Final[dict[int, str]] = {
    REP_ACK: "ACK",
    REP_SERVER: "SERVER",
    REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY",
    REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM",
    REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}


def rep_is_error(rep: int) -> bool:
    return bool(rep & _REP_ERR)


# --- NBD_INFO types (inside NBD_REP_INFO) --------------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- commands and command flags ------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
CMD_RESIZE: Final = 8

CMD_NAMES: Final[dict[int, str]] = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
    CMD_RESIZE: "RESIZE",
}

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# --- structured reply flags and chunk types ------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET: Final = (1 << 15) + 2


def reply_type_is_error(kind: int) -> bool:
    return bool(kind & (1 << 15))


# --- errors (transmission phase) -----------------------------------------------------------
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

ERROR_NAMES: Final[dict[int, str]] = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

# --- base:allocation meta context ----------------------------------------------------------
META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

# --- sizes and limits ----------------------------------------------------------------------
MAX_PAYLOAD: Final = 32 * 1024 * 1024  # 2**25: the largest READ/WRITE payload accepted
MAX_STRING: Final = 4096  # longest export name / query / message the protocol allows
MAX_OPTION_DATA: Final = 64 * 1024  # larger option payloads are drained and refused
EXPORT_NAME_ZEROES: Final = 124

# --- packed structs ------------------------------------------------------------------------
#: server greeting: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
#: client flags, sent once after the greeting
CLIENT_FLAGS = struct.Struct(">I")
#: option request header: IHAVEOPT, option, length
OPTION_HEADER = struct.Struct(">QII")
#: option reply header: OPT_REPLY_MAGIC, option, reply type, length
OPTION_REPLY = struct.Struct(">QIII")
#: reply to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zeroes unless NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_INFO_EXPORT payload: type, size, transmission flags
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
#: NBD_INFO_BLOCK_SIZE payload: type, minimum, preferred, maximum
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
#: transmission request: magic, command flags, type, cookie, offset, length
REQUEST = struct.Struct(">IHHQQI")
#: simple reply: magic, error, cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
#: structured reply chunk header: magic, flags, type, cookie, payload length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: OFFSET_DATA chunk header including its 64-bit offset (data follows)
STRUCTURED_DATA = struct.Struct(">IHHQIQ")
#: ERROR chunk header including error and message length (message follows)
STRUCTURED_ERROR = struct.Struct(">IHHQIIH")
#: one block status descriptor: extent length, status flags
BLOCK_DESCRIPTOR = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

assert GREETING.size == 18
assert OPTION_HEADER.size == 16
assert OPTION_REPLY.size == 20
assert REQUEST.size == 28
assert SIMPLE_REPLY.size == 16
assert STRUCTURED_REPLY.size == 20
assert STRUCTURED_DATA.size == 28
assert STRUCTURED_ERROR.size == 26


# --- small builders (handshake and tests; the hot path packs in place) ---------------------
def option_request(option: int, data: bytes = b"") -> bytes:
    """An option request as a client sends it."""
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def info_request_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def meta_context_data(name: str, queries: tuple[str, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    parts = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        parts += [U32.pack(len(qb)), qb]
    return b"".join(parts)


def request(cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 0, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def structured_error(cookie: int, error: int, message: str = "", *, done: bool = True) -> bytes:
    msg = message.encode()[:MAX_STRING]
    return (
        STRUCTURED_ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE if done else 0,
            REPLY_TYPE_ERROR,
            cookie,
            6 + len(msg),
            error,
            len(msg),
        )
        + msg
    )
