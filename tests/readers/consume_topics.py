#!/usr/bin/env python3
"""Consume osmvec's Kafka topics with clients no one here wrote, and check them.

    consume_topics.py --brokers HOST:PORT --topic NAME[:COUNT] ... [--idle-ms 3000]
                      [--timeout-s 60] [--no-cloudevents] [--kind NAME=KIND]
                      [--push-past-tail] [--dump FILE]

Each topic is read with kafka-python (pure Python, its own implementation of
the Kafka protocol) from the earliest offset of every partition (assigned
directly, no consumer group) up to the high watermarks it had when reading
began, and then until nothing new arrived for --idle-ms. Each
value is decoded by its `content-type` header with the standard library's
json or with cbor2, and checked against docs/messages.md (schema version 1):

* the topic's required fields are there with the right types
  (`schema_version` 1; the tile embedding's vector `dim` finite floats of unit
  length, a JSON array or, in CBOR, one byte string of little-endian f32);
* the key is what the value says: `z/x/y` == tile (embeddings),
  `osm_type/id` (changes), the model version (models), the refused record's
  key (dead letters); a tombstone (no value) only on the embeddings topic;
* `osmvec-idempotency-key` is the documented one (`z/x/y|model|sequence`,
  `type/id|version|sequence`, `z/x/y|tombstone|…`);
* CloudEvents binary mode (unless --no-cloudevents): `ce_specversion` 1.0,
  `ce_id` == `osmvec-idempotency-key`, `ce_source` a URI-reference,
  `ce_type` the topic's type, `ce_subject` == the key, `ce_time` RFC 3339
  (== `computed_at` of an embedding, == `timestamp_rfc3339` of a change),
  no `ce_datacontenttype` (binary mode uses `content-type`), no header twice.

With `NAME:COUNT` the topic must hold exactly COUNT distinct keys. The kind of
a topic (embeddings, changes, models, dead-letters) comes from its name
(`osmvec.tile-embeddings`, …; anything containing `tile-embeddings`,
`changes`, … works) or from `--kind NAME=KIND`. (The jobs topic of the
scale-out mode is for osmvec's workers only and LZ4-compressed; it is not
read here.) Records without value whose key is `osmvec-test-sentinel`
(tests/harness.rs `push_past_tail`, or --push-past-tail here: tansu 0.6.0
can hide a partition's last batch until more data arrives) are skipped.

Prints one JSON line {topic: {records, keys, encodings, ...}} and exits 0;
on a violation prints what, where (topic, partition, offset, key) on stderr
and exits 1. Only the standard library and the packages ops/py-readers.sh
installs.
"""

import argparse
import datetime as dt
import json
import math
import re
import sys
import time

import cbor2
import kafka
from kafka import KafkaConsumer, TopicPartition

SENTINEL = "osmvec-test-sentinel"
MAX_REPORTED = 20
RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)
TILE = re.compile(r"^(\d+)/(\d+)/(\d+)$")
# RFC 3986 characters, percent-escapes well formed, and a scheme if a colon
# comes before any "/", "?" or "#" (osmvec://host/store, urn:osmvec, /store).
URI_REFERENCE = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|(?=[^:]*(?:[/?#]|$)))"
    r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?#\[\]-]|%[0-9A-Fa-f]{2})+$"
)
CE_TYPES = {
    "embeddings": "org.osmvec.tile-embedding.v1",
    "changes": "org.osmvec.change.v1",
    "models": "org.osmvec.model.v1",
    "dead-letters": "org.osmvec.dead-letter.v1",
}
CE_TOMBSTONE = "org.osmvec.tile-embedding.deleted.v1"
KIND_BY_NAME = [
    ("tile-embeddings", "embeddings"),
    ("dead-letters", "dead-letters"),
    ("changes", "changes"),
    ("models", "models"),
]
MODEL_EVENTS = {"loaded", "promoted", "sweep-complete"}
CHANGE_ACTIONS = {"created", "modified", "deleted"}
OSM_TYPES = {"node", "way", "relation"}


class Violation(Exception):
    pass


def parse_rfc3339(s):
    if not isinstance(s, str) or not RFC3339.match(s):
        return None
    return dt.datetime.fromisoformat(s.replace("z", "Z").replace("t", "T"))


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class Checker:
    """Checks one record at a time; collects violations."""

    def __init__(self, cloudevents):
        self.cloudevents = cloudevents
        self.errors = []

    def fail(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    # -- fields ------------------------------------------------------------------

    def need(self, where, v, field, test, what):
        """Field `field` present in dict v and test(value) holds."""
        if field not in v:
            self.fail(where, f"required field {field!r} missing")
            return False
        if not test(v[field]):
            self.fail(where, f"field {field!r} = {v[field]!r:.80}: expected {what}")
            return False
        return True

    def check_embedding(self, where, key, v, encoding):
        ok = self.need(where, v, "schema_version", lambda x: x == 1, "1")
        self.need(where, v, "tile", lambda x: isinstance(x, str) and TILE.match(x), "a z/x/y string")
        for f in ("z", "x", "y", "sequence", "dim"):
            self.need(where, v, f, lambda x: is_int(x) and x >= 0, "a non-negative integer")
        self.need(where, v, "model_version", lambda x: isinstance(x, str) and x, "a version string")
        self.need(where, v, "computed_at", lambda x: parse_rfc3339(x) is not None, "an RFC 3339 time")
        self.need(where, v, "drift", lambda x: x is None or is_num(x), "a number or null")
        if "drift" in v and is_num(v["drift"]):
            if not -1e-6 <= v["drift"] <= 2 + 1e-6:
                self.fail(where, f"drift {v['drift']} is not a cosine distance (0..2)")
        if all(is_int(v.get(f)) for f in ("z", "x", "y")):
            if v.get("tile") != f"{v['z']}/{v['x']}/{v['y']}":
                self.fail(where, f"tile {v.get('tile')!r} but z/x/y {v['z']}/{v['x']}/{v['y']}")
        if v.get("tile") != key:
            self.fail(where, f"key {key!r} but value tile {v.get('tile')!r}")
        vec = v.get("vector")
        if vec is None:
            self.fail(where, "required field 'vector' missing")
            return
        if encoding == "application/cbor":
            if not isinstance(vec, bytes):
                self.fail(where, f"CBOR vector is a {type(vec).__name__}, expected a byte string of f32")
                return
            if len(vec) % 4:
                self.fail(where, f"CBOR vector of {len(vec)} bytes is not whole f32s")
                return
            import numpy as np
            floats = np.frombuffer(vec, "<f4").astype(float).tolist()
        else:
            if not isinstance(vec, list) or not all(is_num(x) for x in vec):
                self.fail(where, "JSON vector is not an array of finite numbers")
                return
            floats = vec
        if is_int(v.get("dim")) and len(floats) != v["dim"]:
            self.fail(where, f"vector of {len(floats)} floats but dim {v['dim']}")
        if not all(math.isfinite(x) for x in floats):
            self.fail(where, "vector has non-finite values")
        else:
            norm = math.sqrt(sum(x * x for x in floats))
            if abs(norm - 1.0) > 1e-4:
                self.fail(where, f"vector norm {norm}, expected L2-normalised (1)")
        return ok

    def check_change(self, where, key, v):
        self.need(where, v, "schema_version", lambda x: x == 1, "1")
        self.need(where, v, "sequence", lambda x: x is None or (is_int(x) and x >= 0), "an integer or null")
        self.need(where, v, "timestamp", lambda x: x is None or is_int(x), "Unix seconds or null")
        self.need(where, v, "timestamp_rfc3339", lambda x: x is None or parse_rfc3339(x) is not None,
                  "an RFC 3339 time or null")
        self.need(where, v, "osm_type", lambda x: x in OSM_TYPES, "node, way or relation")
        self.need(where, v, "id", is_int, "an integer")
        self.need(where, v, "version", lambda x: is_int(x) and x >= 0, "a non-negative integer")
        self.need(where, v, "action", lambda x: x in CHANGE_ACTIONS, "created, modified or deleted")
        self.need(where, v, "tiles", lambda x: isinstance(x, list) and all(
            isinstance(t, str) and TILE.match(t) for t in x), "a list of z/x/y strings")
        tags = lambda x: x is None or (isinstance(x, dict) and all(
            isinstance(a, str) and isinstance(b, str) for a, b in x.items()))
        self.need(where, v, "tags_before", tags, "an object of strings or null")
        self.need(where, v, "tags_after", tags, "an object of strings or null")
        truncated = v.get("truncated", False)
        if "truncated" in v and truncated is not True:
            self.fail(where, f"truncated = {truncated!r}: present only as true")
        if not truncated:
            if v.get("action") == "created" and v.get("tags_before") is not None:
                self.fail(where, "a created feature has tags_before")
            if v.get("action") == "deleted" and v.get("tags_after") is not None:
                self.fail(where, "a deleted feature has tags_after")
        if (v.get("timestamp") is None) != (v.get("timestamp_rfc3339") is None):
            self.fail(where, "timestamp and timestamp_rfc3339 disagree on being null")
        elif is_int(v.get("timestamp")) and parse_rfc3339(v.get("timestamp_rfc3339")):
            t = parse_rfc3339(v["timestamp_rfc3339"]).timestamp()
            if t != v["timestamp"]:
                self.fail(where, f"timestamp {v['timestamp']} but timestamp_rfc3339 {v['timestamp_rfc3339']}")
        want = f"{v.get('osm_type')}/{v.get('id')}"
        if key != want:
            self.fail(where, f"key {key!r} but value is {want!r}")

    def check_model(self, where, key, v):
        self.need(where, v, "schema_version", lambda x: x == 1, "1")
        self.need(where, v, "event", lambda x: x in MODEL_EVENTS, f"one of {sorted(MODEL_EVENTS)}")
        self.need(where, v, "model_version", lambda x: isinstance(x, str) and x, "a version string")
        self.need(where, v, "checkpoint", lambda x: isinstance(x, str), "a string")
        self.need(where, v, "created_at", lambda x: parse_rfc3339(x) is not None, "an RFC 3339 time")
        self.need(where, v, "git_revision", lambda x: isinstance(x, str), "a string")
        self.need(where, v, "training_steps", lambda x: is_int(x) and x >= 0, "a non-negative integer")
        self.need(where, v, "at", lambda x: parse_rfc3339(x) is not None, "an RFC 3339 time")
        if "eval" in v and not (v["eval"] is None or isinstance(v["eval"], dict)):
            self.fail(where, f"eval = {v['eval']!r:.80}: expected an object or null")
        if v.get("model_version") != key:
            self.fail(where, f"key {key!r} but model_version {v.get('model_version')!r}")

    def check_dead_letter(self, where, key, v):
        self.need(where, v, "schema_version", lambda x: x == 1, "1")
        for f in ("topic", "key", "error"):
            self.need(where, v, f, lambda x: isinstance(x, str), "a string")
        for f in ("payload_bytes", "outbox_id"):
            self.need(where, v, f, lambda x: is_int(x) and x >= 0, "a non-negative integer")
        for f in ("payload_head_hex", "outbox_key_hex"):
            self.need(where, v, f, lambda x: isinstance(x, str) and re.fullmatch(r"[0-9a-f]*", x),
                      "lowercase hex")
        self.need(where, v, "at", lambda x: parse_rfc3339(x) is not None, "an RFC 3339 time")
        if v.get("key") != key:
            self.fail(where, f"key {key!r} but the letter is about {v.get('key')!r}")

    # -- headers -----------------------------------------------------------------

    def check_record(self, kind, where, key, value, headers):
        """Returns the content type (None for a tombstone without one)."""
        names = [h for h, _ in headers]
        for h in set(names):
            if names.count(h) > 1:
                self.fail(where, f"header {h!r} appears {names.count(h)} times")
        hd = {}
        for h, raw in headers:
            try:
                hd[h] = None if raw is None else raw.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(where, f"header {h!r} is not UTF-8")
        ctype = hd.get("content-type")
        idk = hd.get("osmvec-idempotency-key")
        decoded = None
        if value is None:
            if kind != "embeddings":
                self.fail(where, f"a record without value (tombstone) on a {kind} topic")
            elif not TILE.match(key):
                self.fail(where, f"tombstone key {key!r} is not a tile")
            if idk is not None and not idk.startswith(f"{key}|tombstone|"):
                self.fail(where, f"tombstone idempotency key {idk!r}, expected {key}|tombstone|…")
        else:
            if ctype not in ("application/json", "application/cbor"):
                self.fail(where, f"content-type {ctype!r}: expected application/json or application/cbor")
                return ctype, None
            if kind == "dead-letters" and ctype != "application/json":
                self.fail(where, f"a dead letter with content-type {ctype}: always JSON")
            try:
                decoded = json.loads(value) if ctype == "application/json" else cbor2.loads(value)
            except (ValueError, cbor2.CBORDecodeError) as e:
                self.fail(where, f"value is not valid {ctype}: {e}")
                return ctype, None
            if not isinstance(decoded, dict):
                self.fail(where, f"value is a {type(decoded).__name__}, expected an object")
                return ctype, None
            if kind == "embeddings":
                self.check_embedding(where, key, decoded, ctype)
                want = f"{decoded.get('tile')}|{decoded.get('model_version')}|{decoded.get('sequence')}"
                if idk != want:
                    self.fail(where, f"idempotency key {idk!r}, expected {want!r}")
            elif kind == "changes":
                self.check_change(where, key, decoded)
                seq = decoded.get("sequence")
                want = f"{key}|{decoded.get('version')}|{0 if seq is None else seq}"
                if idk != want:
                    self.fail(where, f"idempotency key {idk!r}, expected {want!r}")
            elif kind == "models":
                self.check_model(where, key, decoded)
            elif kind == "dead-letters":
                self.check_dead_letter(where, key, decoded)
        if kind != "models" and not idk:
            self.fail(where, "header osmvec-idempotency-key missing")
        if self.cloudevents:
            self.check_cloudevents(kind, where, key, decoded, value is None, hd, idk)
        return ctype, decoded

    def check_cloudevents(self, kind, where, key, v, tombstone, hd, idk):
        missing = [h for h in ("ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject")
                   if not hd.get(h)]
        if missing:
            self.fail(where, f"CloudEvents headers missing: {missing}")
        if hd.get("ce_specversion", "1.0") != "1.0":
            self.fail(where, f"ce_specversion {hd['ce_specversion']!r}, expected '1.0'")
        if "ce_datacontenttype" in hd:
            self.fail(where, "ce_datacontenttype sent: binary mode uses content-type")
        if idk is not None and hd.get("ce_id") != idk:
            self.fail(where, f"ce_id {hd.get('ce_id')!r} != osmvec-idempotency-key {idk!r}")
        src = hd.get("ce_source")
        if src is not None and not URI_REFERENCE.match(src):
            self.fail(where, f"ce_source {src!r} is not a URI-reference (RFC 3986)")
        want_type = CE_TOMBSTONE if tombstone else CE_TYPES[kind]
        if hd.get("ce_type") is not None and hd["ce_type"] != want_type:
            self.fail(where, f"ce_type {hd['ce_type']!r}, expected {want_type!r}")
        if hd.get("ce_subject") is not None and hd["ce_subject"] != key:
            self.fail(where, f"ce_subject {hd['ce_subject']!r}, the key is {key!r}")
        t = hd.get("ce_time")
        if t is not None:
            pt = parse_rfc3339(t)
            if pt is None:
                self.fail(where, f"ce_time {t!r} is not RFC 3339")
            elif v is not None and kind == "embeddings" and parse_rfc3339(v.get("computed_at")):
                if pt != parse_rfc3339(v["computed_at"]):
                    self.fail(where, f"ce_time {t} but computed_at {v['computed_at']}")
            elif v is not None and kind == "changes" and parse_rfc3339(v.get("timestamp_rfc3339")):
                if pt != parse_rfc3339(v["timestamp_rfc3339"]):
                    self.fail(where, f"ce_time {t} but the change's time {v['timestamp_rfc3339']}")


# --- Kafka ------------------------------------------------------------------------

def kind_of(topic, overrides):
    if topic in overrides:
        return overrides[topic]
    for part, kind in KIND_BY_NAME:
        if part in topic:
            return kind
    raise SystemExit(f"consume_topics: cannot tell what {topic!r} holds; name its kind with "
                     f"--kind {topic}=embeddings|changes|models|dead-letters")


def partitions(consumer, topic, deadline):
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise Violation(f"topic {topic}: not found on the broker (no partitions)")
        time.sleep(0.2)


def push_past_tail(brokers, topic, parts):
    producer = kafka.KafkaProducer(bootstrap_servers=brokers, acks=1)
    for p in parts:
        producer.send(topic, key=SENTINEL.encode(), value=None, partition=p)
    producer.flush(timeout=10)
    producer.close()


def consume(args, topic, kind, checker, deadline, dump):
    consumer = KafkaConsumer(
        bootstrap_servers=args.brokers,
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        client_id="osmvec-readers",
        fetch_max_bytes=8 << 20,
    )
    try:
        parts = partitions(consumer, topic, deadline)
        if args.push_past_tail:
            push_past_tail(args.brokers, topic, parts)
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        stats = {"records": 0, "keys": 0, "encodings": {}, "partitions": len(parts),
                 "tombstones": 0, "repeats": 0, "skipped_sentinels": 0}
        last = {}
        seen_ids = set()
        # The end: every partition read up to the high watermark it had now,
        # then --idle-ms without a record. tansu 0.6.0 on memory storage
        # reports a watermark short of the last batch (quiet finds the rest);
        # on a loaded machine a fetch can stall for longer than --idle-ms
        # (the watermark keeps that from ending the read with 0 records).
        behind = {tp.partition: end for tp, end in consumer.end_offsets(tps).items() if end > 0}
        quiet = time.monotonic()
        while behind or time.monotonic() - quiet < args.idle_ms / 1000:
            if time.monotonic() > deadline:
                if behind:
                    raise Violation(f"topic {topic}: not read up to the high watermarks {behind} "
                                    f"(partition: offset) within --timeout-s {args.timeout_s}")
                raise Violation(f"topic {topic}: still receiving after --timeout-s {args.timeout_s}")
            batch = consumer.poll(timeout_ms=200)
            for tp, records in sorted(batch.items(), key=lambda kv: kv[0].partition):
                for r in records:
                    quiet = time.monotonic()
                    if behind.get(tp.partition, 1 << 62) <= r.offset + 1:
                        del behind[tp.partition]
                    key = r.key.decode("utf-8", "replace") if r.key is not None else None
                    if key == SENTINEL and r.value is None:
                        stats["skipped_sentinels"] += 1
                        continue
                    where = f"{topic}[{tp.partition}]@{r.offset} key {key!r}"
                    stats["records"] += 1
                    if key is None:
                        checker.fail(where, "record without key")
                        continue
                    ctype, decoded = checker.check_record(kind, where, key, r.value, list(r.headers or []))
                    enc = ctype if r.value is not None else "tombstone"
                    stats["encodings"][enc] = stats["encodings"].get(enc, 0) + 1
                    if r.value is None:
                        stats["tombstones"] += 1
                    idk = dict(r.headers or []).get("osmvec-idempotency-key")
                    if idk is not None:
                        stats["repeats"] += idk in seen_ids
                        seen_ids.add(idk)
                    last[key] = r.value is not None
                    if dump is not None:
                        dump.write(json.dumps({
                            "topic": topic, "partition": tp.partition, "offset": r.offset, "key": key,
                            "headers": {h: (b.decode("utf-8", "replace") if b is not None else None)
                                        for h, b in (r.headers or [])},
                            "value": jsonable(decoded, kind, ctype)}) + "\n")
        stats["keys"] = len(last)
        stats["live_keys"] = sum(last.values())
        return stats
    finally:
        consumer.close()


def jsonable(v, kind, ctype):
    """The decoded value as JSON (a CBOR vector as a list of floats)."""
    if v is None:
        return None
    if kind == "embeddings" and ctype == "application/cbor" and isinstance(v.get("vector"), bytes):
        import numpy as np
        v = dict(v, vector=np.frombuffer(v["vector"], "<f4").astype(float).tolist())
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", required=True, help="HOST:PORT[,HOST:PORT...]")
    ap.add_argument("--topic", action="append", required=True, metavar="NAME[:COUNT]")
    ap.add_argument("--idle-ms", type=int, default=3000, help="end of a topic: this long without a record")
    ap.add_argument("--timeout-s", type=float, default=60, help="for everything")
    ap.add_argument("--no-cloudevents", action="store_true", help="skip the CloudEvents header checks")
    ap.add_argument("--kind", action="append", default=[], metavar="NAME=KIND")
    ap.add_argument("--push-past-tail", action="store_true",
                    help=f"first append a {SENTINEL} record without value to every partition")
    ap.add_argument("--dump", help="write every record (JSON lines) to this file")
    args = ap.parse_args()
    overrides = {}
    for k in args.kind:
        name, _, kind = k.partition("=")
        if kind not in CE_TYPES:
            ap.error(f"--kind {k}: KIND is one of {sorted(CE_TYPES)}")
        overrides[name] = kind
    wanted = []
    for spec in args.topic:
        name, sep, count = spec.rpartition(":")
        if not sep or not count.isdigit():
            name, count = spec, None
        wanted.append((name, kind_of(name, overrides), None if count is None else int(count)))

    checker = Checker(cloudevents=not args.no_cloudevents)
    deadline = time.monotonic() + args.timeout_s
    summary = {}
    dump = open(args.dump, "w") if args.dump else None
    try:
        for name, kind, count in wanted:
            stats = consume(args, name, kind, checker, deadline, dump)
            stats["kind"] = kind
            summary[name] = stats
            if count is not None and stats["keys"] != count:
                checker.fail(name, f"{stats['keys']} distinct keys, expected {count}")
    except Violation as e:
        checker.errors.append(str(e))
    except kafka.errors.KafkaError as e:
        checker.errors.append(f"Kafka client error: {type(e).__name__}: {e}")
    finally:
        if dump:
            dump.close()
    if checker.errors:
        for e in checker.errors[:MAX_REPORTED]:
            print(f"consume_topics: {e}", file=sys.stderr)
        if len(checker.errors) > MAX_REPORTED:
            print(f"consume_topics: ... and {len(checker.errors) - MAX_REPORTED} more", file=sys.stderr)
        print(f"consume_topics: FAILED ({len(checker.errors)} violations); read so far: "
              f"{json.dumps(summary, sort_keys=True)}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
