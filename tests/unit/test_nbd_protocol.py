"""Wire format of vmkit.nbd.protocol against the values in NBD's doc/proto.md."""

from __future__ import annotations

import struct

from vmkit.nbd import protocol as p


def test_magic_numbers_match_the_specification() -> None:
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert p.OPT_REPLY_MAGIC == 0x3E889045565A9
    assert p.REQUEST_MAGIC == 0x25609513
    assert p.SIMPLE_REPLY_MAGIC == 0x67446698
    assert p.STRUCTURED_REPLY_MAGIC == 0x668E33EF


def test_option_and_command_codes() -> None:
    assert (p.OPT_EXPORT_NAME, p.OPT_ABORT, p.OPT_LIST, p.OPT_STARTTLS) == (1, 2, 3, 5)
    assert (p.OPT_INFO, p.OPT_GO, p.OPT_STRUCTURED_REPLY) == (6, 7, 8)
    assert (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT) == (9, 10)
    assert (p.CMD_READ, p.CMD_WRITE, p.CMD_DISC, p.CMD_FLUSH, p.CMD_TRIM) == (0, 1, 2, 3, 4)
    assert (p.CMD_CACHE, p.CMD_WRITE_ZEROES, p.CMD_BLOCK_STATUS) == (5, 6, 7)
    assert p.REP_ERR_UNSUP == 2**31 + 1
    assert p.REP_ERR_UNKNOWN == 2**31 + 6
    assert p.REPLY_TYPE_ERROR == 2**15 + 1
    assert p.rep_is_error(p.REP_ERR_INVALID) and not p.rep_is_error(p.REP_ACK)
    assert p.reply_type_is_error(p.REPLY_TYPE_ERROR_OFFSET) and not p.reply_type_is_error(p.REPLY_TYPE_NONE)


def test_transmission_flag_bits() -> None:
    assert p.FLAG_HAS_FLAGS == 1
    assert p.FLAG_READ_ONLY == 2
    assert p.FLAG_SEND_WRITE_ZEROES == 64
    assert p.FLAG_CAN_MULTI_CONN == 256
    assert p.FLAG_SEND_FAST_ZERO == 2048


def test_struct_sizes() -> None:
    assert p.GREETING.size == 18
    assert p.OPTION_HEADER.size == 16
    assert p.OPTION_REPLY.size == 20
    assert p.REQUEST.size == 28
    assert p.SIMPLE_REPLY.size == 16
    assert p.STRUCTURED_REPLY.size == 20
    assert p.STRUCTURED_DATA.size == 28
    assert p.INFO_EXPORT_PAYLOAD.size == 12
    assert p.INFO_BLOCK_SIZE_PAYLOAD.size == 14


def test_request_layout_is_big_endian() -> None:
    raw = p.request(p.CMD_WRITE, 0x0102030405060708, 0x0A0B0C0D, cookie=0x1122334455667788, flags=1)
    assert raw == bytes.fromhex("25609513 0001 0001 1122334455667788 0102030405060708 0a0b0c0d")


def test_option_builders() -> None:
    data = p.info_request_data("disk", (p.INFO_NAME, p.INFO_BLOCK_SIZE))
    assert data == struct.pack(">I", 4) + b"disk" + struct.pack(">HHH", 2, 1, 3)
    meta = p.meta_context_data("", ("base:allocation",))
    assert meta == struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
    req = p.option_request(p.OPT_LIST)
    assert req == struct.pack(">QII", p.IHAVEOPT, 3, 0)
    rep = p.option_reply(p.OPT_GO, p.REP_ACK)
    assert rep == struct.pack(">QIII", p.OPT_REPLY_MAGIC, 7, 1, 0)


def test_structured_error_chunk() -> None:
    raw = p.structured_error(7, p.EINVAL, "bad")
    magic, flags, kind, cookie, length, error, mlen = p.STRUCTURED_ERROR.unpack_from(raw)
    assert (magic, flags, kind, cookie) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, 7)
    assert (length, error, mlen) == (9, 22, 3)
    assert raw[26:] == b"bad"
    # messages are cut to the protocol's string limit
    long = p.structured_error(1, p.EIO, "x" * 10000)
    assert len(long) == 26 + p.MAX_STRING
