#!/usr/bin/env python3
"""Writes the hand-written seed corpus into fuzz/corpus/<target>/seed-*.

decode_frames seeds are frame texts. server_core seeds are byte strings in the `arbitrary`
encoding of `harness::Step` sequences (derive(Arbitrary) enums: u32 LE tag scaled by the
variant count; u8/u16 LE fields), so each one drives a meaningful scenario from the start.
Run from anywhere: python3 fuzz/seeds/gen_seeds.py
"""
import json, os, struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
FP = "ab" * 32

client = {
    "register": {"type": "register", "id": 1, "version": 1, "public_key": "BAAA", "alias": "me", "meta": {"a": [1, 2]}, "signature": "MEUC", "token": "a.b.c"},
    "join": {"type": "join", "id": 2, "namespace": "lobby", "app_type": "game", "app_version": "1.0"},
    "leave": {"type": "leave", "id": 3, "namespace": "lobby"},
    "discover": {"type": "discover", "id": 4, "namespace": "lobby", "limit": 10},
    "match": {"type": "match", "id": 5, "namespace": "lobby", "criteria": {"mode": "duel"}, "group_size": 2},
    "cancel_match": {"type": "cancel_match", "id": 6, "namespace": "lobby"},
    "relay": {"type": "relay", "id": 7, "to": FP, "payload": {"sdp": "v=0\r\n", "n": [1.5, -2, None, True]}},
    "relay_noid": {"type": "relay", "to": FP, "payload": "x"},
    "broadcast": {"type": "broadcast", "id": 8, "namespace": "lobby", "payload": [1, {"k": "v"}]},
    "create_room": {"type": "create_room", "id": 9, "room_id": "r1", "config": {"max_size": 4, "metadata": {"title": "t\u00e9"}}},
    "create_room_bare": {"type": "create_room", "id": 10, "room_id": "r2"},
    "join_room": {"type": "join_room", "id": 11, "room_id": "r1"},
    "leave_room": {"type": "leave_room", "id": 12, "room_id": "r1"},
    "room_info": {"type": "room_info", "id": 13, "room_id": "r1"},
    "kick": {"type": "kick", "id": 14, "room_id": "r1", "fingerprint": FP},
    "close_room": {"type": "close_room", "id": 15, "room_id": "r1"},
    "ping": {"type": "ping", "id": 16},
    "bye": {"type": "bye"},
}
peer = {"fingerprint": FP, "alias": "p", "meta": {"m": 1}, "app_type": "g", "app_version": "2"}
server = {
    "challenge": {"type": "challenge", "version": 1, "server_id": "peerlink", "nonce": "bm9uY2U=", "auth_required": False},
    "registered": {"type": "registered", "id": 1, "fingerprint": FP, "alias": "me", "resumed": True, "namespaces": ["lobby"], "rooms": ["r1"], "missed": 3},
    "joined": {"type": "joined", "id": 2, "namespace": "lobby", "peers": [peer], "total": 1},
    "discovered": {"type": "discovered", "id": 4, "namespace": "lobby", "peers": [peer]},
    "matched": {"type": "matched", "id": 5, "namespace": "lobby", "session_id": "00ff", "peers": [peer, peer]},
    "peer_joined": {"type": "peer_joined", "namespace": "lobby", "peer": peer},
    "peer_left": {"type": "peer_left", "namespace": "lobby", "fingerprint": FP},
    "s_relay": {"type": "relay", "from": FP, "payload": {"a": [1, 2.25, "\u2603"]}},
    "s_broadcast": {"type": "broadcast", "from": FP, "namespace": "lobby", "payload": None},
    "ok": {"type": "ok", "id": 7},
    "room_created": {"type": "room_created", "id": 9, "room_id": "r1", "owner": FP, "max_size": 4, "metadata": {"t": 1}},
    "room_joined": {"type": "room_joined", "id": 11, "room_id": "r1", "owner": FP, "max_size": 4, "peers": [peer]},
    "s_room_info": {"type": "room_info", "id": 13, "room_id": "r1", "owner": FP, "max_size": 4, "members": 2},
    "room_peer_joined": {"type": "room_peer_joined", "room_id": "r1", "peer": peer},
    "room_peer_left": {"type": "room_peer_left", "room_id": "r1", "fingerprint": FP, "kicked": True},
    "room_closed": {"type": "room_closed", "room_id": "r1"},
    "kicked": {"type": "kicked", "room_id": "r1"},
    "pong": {"type": "pong", "id": 16},
    "error": {"type": "error", "id": 3, "code": "not_in_namespace", "message": "nope"},
}
bad = {
    "non_json": "not json",
    "array": "[1,2]",
    "string": '"str"',
    "truncated": '{"type":"join","id":1,"namespace":"a"',
    "no_type": '{"id":1}',
    "unknown_type": '{"type":"teleport","id":4}',
    "missing_field": '{"type":"join","id":5}',
    "wrong_type": '{"type":"join","id":6,"namespace":7}',
    "wrong_id_type": '{"type":"join","id":"x","namespace":"a"}',
    "empty_name": '{"type":"join","id":8,"namespace":""}',
    "control_name": '{"type":"join","id":8,"namespace":"a\\u0001"}',
    "bad_fp": '{"type":"relay","id":9,"to":"abc","payload":1}',
    "forged_from": '{"type":"relay","id":3,"to":"%s","from":"%s","payload":{}}' % (FP, FP),
    "group_size_1": '{"type":"match","id":10,"namespace":"a","group_size":1}',
    "meta_array": '{"type":"register","id":11,"version":1,"public_key":"k","signature":"s","meta":[1]}',
    "dup_id": '{"type":"join","id":12,"id":13,"namespace":"a"}',
    "id_overflow": '{"type":"ping","id":18446744073709551616}',
    "neg_id": '{"type":"ping","id":-1}',
    "huge_meta": '{"type":"register","id":1,"version":1,"public_key":"k","signature":"s","meta":{"x":"%s"}}' % ("a" * 5000),
    "huge_name": '{"type":"join","id":1,"namespace":"%s"}' % ("n" * 200),
    "deep": "{\"type\":\"relay\",\"to\":\"%s\",\"payload\":%s%s}" % (FP, "[" * 200, "]" * 200),
    "too_deep": "{\"type\":\"relay\",\"to\":\"%s\",\"payload\":%s%s}" % (FP, "[" * 1000, "]" * 1000),
    "ws_payload": '{"type":"relay","to":"%s","payload":  {"a" : 1 }  }' % FP,
    "float_payload": '{"type":"broadcast","namespace":"n","payload":1e308}',
    "big_float": '{"type":"relay","from":"%s","payload":{"x":1e400}}' % FP,
    "s_unknown": '{"type":"warp"}',
    "s_bad_code": '{"type":"error","code":"whatever","message":"m"}',
    "s_meta_num": '{"type":"joined","id":1,"namespace":"n","peers":[{"fingerprint":"%s","meta":-0.0}],"total":1}' % FP,
    "escapes": '{"type":"join","id":1,"namespace":"\\ud83d\\ude00\\"\\\\"}',
    "lone_surrogate": '{"type":"join","id":1,"namespace":"\\ud800"}',
    "type_null": '{"type":null,"id":1}',
    "leading_ws": ' \n\t{"type":"bye"}',
    "trailing": '{"type":"bye"} x',
    "empty": "",
    "empty_obj": "{}",
}


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


for name, v in client.items():
    write("decode_frames", "client-" + name, json.dumps(v, separators=(",", ":"), ensure_ascii=False))
for name, v in server.items():
    write("decode_frames", "server-" + name, json.dumps(v, separators=(",", ":"), ensure_ascii=False))
for name, v in bad.items():
    write("decode_frames", "bad-" + name, v)
write("decode_frames", "bad-binary", bytes(range(256)))
write("decode_frames", "bad-invalid-utf8", b'{"type":"ping","id":1,"x":"\xff\xfe"}')

# ---- server_core -----------------------------------------------------------------------
def tag(idx, count):
    return struct.pack("<I", -(-(idx << 32) // count))

def connect(c): return tag(0, 7) + bytes([c])
# Template kinds: 0 join, 1 leave, 2 discover, 3 match(criteria), 4 match 2, 5 cancel_match,
# 6 relay, 7 big relay, 8 broadcast, 9 big broadcast, 10 create_room+config, 11 create_room,
# 12 join_room, 13 leave_room, 14 room_info, 15 kick, 16 close_room, 17 ping, 18 bye, 19 bad register
def msg(c, kind, ns=0, room=0, peer=0, id=1, n=0): return tag(1, 7) + bytes([c]) + tag(0, 3) + bytes([kind, ns, room, peer, id, n])
def raw(c, text): return tag(1, 7) + bytes([c]) + tag(2, 3)  # string takes its length from the end: keep last
def register(c, ident, variant=0): return tag(2, 7) + bytes([c, ident, variant])
def binary(c): return tag(3, 7) + bytes([c])
def sent(c, n): return tag(4, 7) + bytes([c]) + struct.pack("<H", n)
def disconnect(c): return tag(5, 7) + bytes([c])
def advance(ms): return tag(6, 7) + struct.pack("<H", ms)

def two():
    return connect(0) + connect(1) + register(0, 0) + register(1, 1)

scenarios = {
    "namespaces": two() + msg(0, 0) + msg(1, 0) + msg(0, 2, n=5) + msg(0, 8) + msg(1, 6, peer=0) + msg(0, 6, peer=1)
        + msg(0, 0, ns=1) + msg(0, 0, ns=2) + msg(1, 1) + msg(0, 17) + sent(0, 1000) + sent(1, 1000) + msg(0, 18),
    "match": two() + connect(2) + register(2, 2) + msg(0, 4) + msg(1, 4) + msg(0, 3, n=1) + msg(1, 3, n=1) + msg(2, 3, n=1)
        + msg(0, 5) + msg(2, 4, ns=1) + advance(8000) + msg(2, 5, ns=1),
    "rooms": two() + msg(0, 10, n=3) + msg(1, 12) + msg(1, 14) + msg(0, 15, peer=1) + msg(1, 12) + msg(1, 13)
        + msg(0, 11, room=1) + msg(0, 11, room=2) + msg(0, 16) + msg(0, 13, room=1) + advance(6000) + msg(1, 14, room=1),
    "resume": two() + msg(0, 0) + msg(1, 0) + msg(0, 12) + msg(0, 10) + msg(1, 12) + disconnect(0) + msg(1, 6, peer=0)
        + msg(1, 8) + msg(1, 7, peer=0, n=60) + msg(1, 6, peer=0) + msg(1, 6, peer=0) + advance(2000)
        + connect(2) + register(2, 0) + sent(2, 500) + msg(2, 14),
    "grace_expiry": two() + msg(0, 0) + msg(1, 0) + msg(0, 4) + disconnect(0) + advance(7000) + msg(1, 2),
    "replace": two() + connect(2) + register(2, 0, 1) + msg(2, 17) + msg(0, 17),
    "slow_consumer": two() + msg(0, 0) + msg(1, 0) + b"".join(msg(1, 7, peer=0, n=200) for _ in range(4))
        + b"".join(msg(1, 9, n=120) for _ in range(3)) + advance(1000) + connect(3) + register(3, 0),
    "flood": connect(0) + register(0, 0) + b"".join(msg(0, 17, id=i) for i in range(16)) + advance(500) + msg(0, 17),
    "timeouts": connect(0) + advance(5000) + connect(1) + register(1, 1) + advance(21000) + connect(2) + msg(2, 17),
    "bad_registers": connect(0) + register(0, 0, 3) + register(0, 0, 4) + connect(1) + register(1, 1, 5) + register(1, 1, 2)
        + msg(1, 19) + register(1, 1) + register(1, 1),
    "full": b"".join(connect(i) for i in range(8)) + binary(0) + binary(1) + connect(0) + msg(7, 17),
    "bye_unregistered": connect(0) + msg(0, 18) + connect(0) + msg(0, 0) + disconnect(0) + disconnect(0),
}
for name, data in scenarios.items():
    write("server_core", name, data)

# ---- room_batch ------------------------------------------------------------------------
# The first byte picks harness::room_batch's mode: b"R" (anything but S and I) raw text as a
# batch body and a relay payload, b"S" a payload signed by the harness with mutations
# ([seed, n, n x [kind, pos_lo, pos_hi, xor], body]), b"I" `arbitrary` items. Genuinely signed
# raw relay payloads (seed-relayed-*) need the harness's keys: they are written by
# `cargo test -p peerlink --test fuzz_corpus -- --ignored write_room_batch_relayed_seeds`.
U64_MAX = 2**64 - 1

def js(v): return json.dumps(v, separators=(",", ":"), ensure_ascii=False)

def data(room, e, s, kind, value):
    head = '{"t":"d","r":%s,"e":%d,"s":%d,' % (js(room), e, s)
    if kind == "j":
        return head + '"j":' + value + "}"
    return head + '"%s":%s}' % (kind, js(value))

def ack(room, e, s): return '{"t":"a","r":%s,"e":%d,"s":%d}' % (js(room), e, s)

def presence(room, e, v, ttl=None, st=None):
    out = '{"t":"p","r":%s,"e":%d,"v":%d' % (js(room), e, v)
    if ttl is not None:
        out += ',"ttl":%d' % ttl
    if st is not None:
        out += ',"st":' + st
    return out + "}"

def batch(*items): return '{"m":[' + ",".join(items) + "]}"

B64_300 = __import__("base64").b64encode(bytes(range(256)) + bytes(44)).decode()
room_batches = {
    "empty": batch(),
    "json-object": batch(data("r", 7, 1, "j", '{"a":[1,2],"b":{"c":null}}')),
    "json-array": batch(data("r", 7, 2, "j", '[1,-2.5e300,"x",true,false,null]')),
    "json-number": batch(data("r", 7, 3, "j", "0")),
    "json-string": batch(data("r", 7, 4, "j", '"h\\u00e9 \\"q\\""')),
    "json-nested": batch(data("r", 7, 5, "j", "[" * 40 + "]" * 40)),
    # Raw values are skipped, not parsed: no depth limit (serde_json's 128 is for parsing).
    "json-deep": batch(data("r", 7, 6, "j", "[" * 2000 + "]" * 2000)),
    "json-spaced": '{ "m" : [ {"t" : "d", "r" : "r", "e" : 1, "s" : 1, "j" : [ 1 , 2 ] } ] }',
    "text": batch(data("r", 1, 1, "x", "hello")),
    "text-empty": batch(data("r", 1, 1, "x", "")),
    "text-escapes": batch(data("r", 1, 2, "x", 'h\u00e9 "q"\n\\ \t\u2028 \U0001F600')),
    "text-control": batch(data("r", 1, 3, "x", "".join(chr(c) for c in range(32)) * 4)),
    "text-long": batch(data("r", 1, 4, "x", "abcdefgh" * 300)),
    "binary": batch(data("r", 2, 1, "b", "AAEC")),
    "binary-padded": batch(data("r", 2, 2, "b", "AA=="), data("r", 2, 3, "b", "AAE=")),
    "binary-empty": batch(data("r", 2, 4, "b", "")),
    "binary-long": batch(data("r", 2, 5, "b", B64_300)),
    "ack": batch(ack("r", 9, 0)),
    "ack-max": batch(ack("r", U64_MAX, U64_MAX)),
    "data-max": batch(data("r", U64_MAX, U64_MAX, "j", "1")),
    "presence": batch(presence("r", 7, 3, 1000, '{"typing":true}')),
    "presence-null": batch(presence("r", 7, 4, 1000, "null")),
    "presence-bare": batch(presence("r", 7, 5)),
    "presence-ttl-clamped": batch(presence("r", 7, 6, 10**18, '"away"')),
    "presence-max": batch(presence("r", U64_MAX, U64_MAX, U64_MAX, "[1,2,3]")),
    "room-unicode": batch(ack("caf\u00e9 \u2603", 1, 1)),
    "room-escaped": batch(ack('r"1\\', 1, 1)),
    "room-128": batch(ack("x" * 128, 1, 1)),
    "room-128-multibyte": batch(ack("\u00e9" * 64, 1, 1)),
    "room-control": batch(data("\x01" * 128, U64_MAX, U64_MAX, "x", "\x01" * 64)),
    "room-escaped-json": '{"m":[{"t":"a","r":"\\u0072\\ud83d\\ude00","e":1,"s":1}]}',
    "mixed": batch(
        data('r"1', 7, 1, "j", '{"a":[1,2]}'), data("r", 7, 2, "x", 'h\u00e9 "q"\n'), data("r", 7, 3, "b", "AP8D"),
        ack("r", 9, 0), presence("r", 7, 3, 1000, '{"typing":true}'), presence("r", 7, 4, 1000, "null"),
        ack("other", 1, 5), data("other", 2, 1, "x", "x")),
    "extra-fields": '{"m":[{"t":"a","r":"r","e":1,"s":1,"zz":[{"deep":[1]}],"x":"ignored"}],"extra":1}',
    "many": batch(*[ack("r%d" % (i % 7), i, i) for i in range(200)]),
}
bad_batches = {
    "empty": "",
    "array": "[]",
    "m-object": '{"m":{}}',
    "data-no-payload": batch('{"t":"d","r":"r","e":1,"s":1}'),
    "data-seq-0": batch('{"t":"d","r":"r","e":1,"s":0,"x":"a"}'),
    "data-two-payloads": batch('{"t":"d","r":"r","e":1,"s":1,"x":"a","b":"AA=="}'),
    "data-j-null": batch('{"t":"d","r":"r","e":1,"s":1,"j":null}'),
    "bad-base64": batch('{"t":"d","r":"r","e":1,"s":1,"b":"!!"}'),
    "base64-trailing-bits": batch('{"t":"d","r":"r","e":1,"s":1,"b":"AB=="}'),
    "ack-no-seq": batch('{"t":"a","r":"r","e":1}'),
    "presence-no-version": batch('{"t":"p","r":"r","e":1}'),
    "unknown-type": batch('{"t":"z","r":"r","e":1}'),
    "escaped-type": batch('{"t":"\\u0061","r":"r","e":1,"s":1}'),
    "empty-room": batch('{"t":"a","r":"","e":1,"s":1}'),
    "long-room": batch(ack("x" * 129, 1, 1)),
    "negative-epoch": batch('{"t":"a","r":"r","e":-1,"s":1}'),
    "epoch-overflow": batch('{"t":"a","r":"r","e":18446744073709551616,"s":1}'),
    "duplicate-field": batch('{"t":"a","r":"r","e":1,"e":2,"s":1}'),
    "one-bad-item": batch(ack("r", 1, 1), '{"t":"a"}'),
    "truncated": batch(ack("r", 1, 1))[:-3],
    "trailing": batch(ack("r", 1, 1)) + " x",
}
for name, text in room_batches.items():
    write("room_batch", "batch-" + name, b"R" + text.encode())
for name, text in bad_batches.items():
    write("room_batch", "bad-" + name, b"R" + text.encode())

def mutation(kind, pos, xor=1): return bytes([kind]) + struct.pack("<H", pos) + bytes([xor])

signed = {
    # name: (seed, mutations, body)
    "empty": (1, [], batch()),
    "mixed-body-sig": (2, [mutation(0, 0), mutation(0, 37, 0x20), mutation(1, 5), mutation(1, 63, 0x80)], room_batches["mixed"]),
    "ack-key-to": (3, [mutation(2, 0, 0x04), mutation(2, 64), mutation(3, 0), mutation(3, 31, 0xff)], room_batches["ack-max"]),
    "text-b64-text": (4, [mutation(4, 3, 0x20), mutation(5, 10, 0x01), mutation(4, 87, 0x7f), mutation(5, 0, 0x03)], room_batches["text-escapes"]),
    "presence-payload": (5, [mutation(6, 0), mutation(6, 20, 0x20), mutation(6, 300, 0x08), mutation(6, 9999, 0x40)], room_batches["presence"]),
    "binary-forged": (6, [mutation(7, 0), mutation(7, 1)], room_batches["binary-long"]),
    "control-all": (7, [mutation(0, 100), mutation(1, 30), mutation(6, 200, 0x10), mutation(7, 3)], room_batches["room-control"]),
    "bad-body": (8, [mutation(0, 2), mutation(3, 5)], bad_batches["data-two-payloads"]),
    "not-json-body": (9, [mutation(6, 150)], "not a batch \u00e9 \"\\"),
    "many": (10, [mutation(0, 1000), mutation(2, 7)], room_batches["many"]),
}
for name, (seed, muts, body) in signed.items():
    write("room_batch", "signed-" + name, b"S" + bytes([seed, len(muts)]) + b"".join(muts) + body.encode())

import random
rnd = random.Random(1)
for i in range(12):
    write("room_batch", "items-%02d" % i, b"I" + bytes(rnd.randrange(256) for _ in range(16 * (i + 1) ** 2 % 1500 + 16)))
