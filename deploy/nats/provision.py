#!/usr/bin/env python3
"""Provisions the people's read-only view of the saga's streams (see nats.conf).

For each of ORDERS, INVENTORY, PAYMENTS and ORDER_COMMANDS, once the service that owns it has
created it:
  1. in account SAGA, a durable push consumer `people-mirror` on the stream, delivering to
     people.mirror.<STREAM>;
  2. in account PEOPLE (through the $JS.people.API import), a stream of the same name mirroring
     it through that consumer.
Idempotent: run it after every start of the services; an existing consumer or mirror with the
same configuration is left as it is.

Connects as the NATS user `provision`. Reads NATS_URL (default nats://127.0.0.1:4222), NATS_USER
(default provision), NATS_PASSWORD (required) and PROVISION_WAIT_SECONDS (default 60: how long to
wait for the server and the streams). Standard library only, so it runs wherever python3 does (the
demo script, a python image in compose, the tests). Exits non-zero, with the reason, on failure.
"""

import json
import os
import socket
import sys
import time
import urllib.parse

STREAMS = ["ORDERS", "INVENTORY", "PAYMENTS", "ORDER_COMMANDS"]
CONSUMER = "people-mirror"
# Where PEOPLE reaches the consumers' RESET and the streams' info in SAGA (nats.conf imports).
SAGA_API = "$JS.saga.API"
# Where SAGA's `provision` reaches PEOPLE's stream API (nats.conf imports).
PEOPLE_API = "$JS.people.API"
SECOND_NS = 1_000_000_000


def consumer_config(stream):
    # ack_policy flow_control: the mirror acknowledges by answering flow control; the server
    # requires a 1 s heartbeat and no ack wait with it.
    return {
        "durable_name": CONSUMER,
        "name": CONSUMER,
        "description": f"Source of the PEOPLE mirror {stream} (deploy/nats/provision.py)",
        "deliver_subject": f"people.mirror.{stream}",
        "deliver_policy": "all",
        "ack_policy": "flow_control",
        "flow_control": True,
        "idle_heartbeat": SECOND_NS,
        "max_ack_pending": 1000,
    }


def mirror_config(stream):
    # Capped so that the copy cannot use up the server's store (PEOPLE may hold 2 GB in all);
    # the services' streams keep 7 days.
    return {
        "name": stream,
        "description": f"Read-only mirror of the saga's {stream} (deploy/nats/provision.py)",
        "mirror": {
            "name": stream,
            "external": {"api": SAGA_API, "deliver": ""},
            "consumer": {"name": CONSUMER, "deliver_subject": f"people.mirror.{stream}"},
        },
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "max_age": 7 * 24 * 3600 * SECOND_NS,
        "max_bytes": 256 * 1024 * 1024,
        "max_msg_size": 1024 * 1024,
        "num_replicas": 1,
        "deny_delete": True,
        "deny_purge": True,
    }


class Nats:
    """Just enough of the NATS client protocol for JetStream API requests."""

    def __init__(self, url, user, password, timeout):
        parsed = urllib.parse.urlparse(url if "://" in url else f"nats://{url}")
        self.sock = socket.create_connection((parsed.hostname, parsed.port or 4222), timeout=timeout)
        self.buf = b""
        self.sid = 0
        info = self._line()
        if not info.startswith(b"INFO "):
            raise RuntimeError(f"not a NATS server: {info[:80]!r}")
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                   "protocol": 1, "name": "provision", "lang": "python", "version": "1",
                   "user": user, "pass": password}
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:
            line = self._line()
            if line == b"PONG":
                break
            if line.startswith(b"-ERR"):
                raise RuntimeError(line.decode(errors="replace"))
        self.inbox = "_INBOX.provision." + os.urandom(8).hex()
        self._send(f"SUB {self.inbox}.* 1\r\n")

    def _send(self, text):
        self.sock.sendall(text.encode() if isinstance(text, str) else text)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed by the server")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _payload(self, size):
        while len(self.buf) < size + 2:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data

    def request(self, subject, body, timeout):
        """The JSON answer to a request, or None when nobody answers in time."""
        self.sid += 1
        reply = f"{self.inbox}.{self.sid}"
        payload = json.dumps(body).encode() if body is not None else b""
        self._send(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                line = self._line()
            except socket.timeout:
                return None
            if line == b"PING":
                self._send("PONG\r\n")
            elif line.startswith(b"-ERR"):
                # A permissions violation: the request was dropped.
                raise RuntimeError(f"{subject}: {line.decode(errors='replace')}")
            elif line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                parts = line.split()
                if parts[0] == b"HMSG":
                    header_size, total = int(parts[-2]), int(parts[-1])
                    data = self._payload(total)
                    header, data = data[:header_size], data[header_size:]
                else:
                    header, data = b"", self._payload(int(parts[-1]))
                if parts[1].decode() != reply:
                    continue
                if b" 503" in header.split(b"\r\n", 1)[0]:
                    return None  # no responders
                return json.loads(data) if data else {}


def fail(message):
    print(f"provision: {message}", file=sys.stderr)
    sys.exit(1)


def api_error(answer):
    return (answer or {}).get("error")


def main():
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    user = os.environ.get("NATS_USER", "provision")
    password = os.environ.get("NATS_PASSWORD") or fail("NATS_PASSWORD is not set")
    wait = float(os.environ.get("PROVISION_WAIT_SECONDS", "60"))
    deadline = time.monotonic() + wait

    while True:
        try:
            nats = Nats(url, user, password, timeout=5)
            break
        except (OSError, RuntimeError) as e:
            if time.monotonic() > deadline:
                fail(f"cannot connect to {url} as {user}: {e}")
            time.sleep(1)

    # The services create their streams when they start.
    for stream in STREAMS:
        while True:
            info = nats.request(f"$JS.API.STREAM.INFO.{stream}", None, timeout=5)
            if info is not None and not api_error(info):
                break
            if time.monotonic() > deadline:
                fail(f"stream {stream} does not exist after {wait:.0f} s "
                     f"(is its service running?): {api_error(info)}")
            time.sleep(1)

    for stream in STREAMS:
        created = nats.request(f"$JS.API.CONSUMER.CREATE.{stream}.{CONSUMER}",
                               {"stream_name": stream, "config": consumer_config(stream)}, timeout=5)
        if created is None or api_error(created):
            fail(f"consumer {stream}/{CONSUMER}: {api_error(created) or 'no answer'}")

        config = mirror_config(stream)
        answer = nats.request(f"{PEOPLE_API}.STREAM.CREATE.{stream}", config, timeout=5)
        if api_error(answer) and api_error(answer).get("err_code") == 10058:
            # Exists with another configuration (an older cap, say): bring it in line.
            answer = nats.request(f"{PEOPLE_API}.STREAM.UPDATE.{stream}", config, timeout=5)
        if answer is None or api_error(answer):
            fail(f"mirror {stream} in PEOPLE: {api_error(answer) or 'no answer'}")

    # Each mirror picks its consumer up within a few seconds; report where they stand.
    for stream in STREAMS:
        while True:
            info = nats.request(f"{PEOPLE_API}.STREAM.INFO.{stream}", None, timeout=5) or {}
            mirror = info.get("mirror") or {}
            if mirror.get("active", -1) >= 0 and not mirror.get("error"):
                break
            if time.monotonic() > deadline:
                fail(f"mirror {stream} is not following its origin: {mirror.get('error') or info}")
            time.sleep(0.2)
        state = info.get("state", {})
        print(f"provision: PEOPLE {stream} mirrors SAGA {stream} "
              f"(last sequence {state.get('last_seq', 0)}, lag {mirror.get('lag', 0)})")


if __name__ == "__main__":
    try:
        main()
    except (OSError, RuntimeError, ValueError) as e:
        fail(str(e))
