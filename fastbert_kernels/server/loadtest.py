"""A load test against the real server process over loopback, with a SIGTERM in the middle.

    python -m fastbert_kernels.server.loadtest CHECKPOINT [--clients 50] [--signal-after 3]
        [--texts FILE] [--hang-up 0.1] [--drain-timeout 20] [--serve-arg=--max-batch=32 ...]

It starts ``python -m fastbert_kernels serve CHECKPOINT --port 0`` (debug log, so that the server
logs every request it accepts), runs ``--clients`` concurrent clients that post batches to
``/predict`` and ``/classify`` with their own ``X-Request-ID``, some hanging up mid-request, sends
SIGTERM after ``--signal-after`` seconds, and lets the clients run on until the server refuses
connections. Then it checks, from the client side and from the server's log:

* no accepted request is lost: every request the server logged as accepted, and whose client did
  not hang up, got an HTTP answer with its own request id;
* none is answered twice (the server logs one answer per id, clients read one);
* every answer is 200 with one result per text, or an explicit 429 or 503 error body;
* the server exited with status 0, within the drain timeout and a margin;
* the drain was exercised: some requests sent before the signal were answered after it.

Bounded: each client stops at ``--max-requests`` or when the server is gone, and the whole run at
``--timeout`` seconds. Standard library only (the server needs the ``serve`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_TEXTS = (
    "a gripping, beautifully acted film",
    "dull and far too long",
    "the best thing I have seen this year",
    "it never decides what it wants to be",
    "a quiet, moving story about a family",
    "the plot makes no sense at all",
)
ACCEPTED = re.compile(r"accepted request_id=(\S+)")
ANSWERED = re.compile(r"request_id=(\S+) route=\S+ status=(\d+)")
LISTENING = re.compile(r"running on http://[^:]+:(\d+)")


@dataclasses.dataclass
class Outcome:
    """What one client saw for one request."""

    request_id: str
    texts: int
    sent: float  # time.monotonic() when the request went out
    status: int | None = None  # None: no HTTP answer
    echoed_id: str | None = None
    failure: str | None = None  # the exception, when there was no answer
    refused: bool = False  # the connection was refused: the server no longer listens
    hung_up: bool = False
    answered: float | None = None
    well_formed: bool = False


def _post(conn: http.client.HTTPConnection, path: str, body: dict, request_id: str) -> tuple[int, str | None, object]:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "X-Request-ID": request_id})
    response = conn.getresponse()
    payload = response.read()
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    return response.status, response.getheader("x-request-id"), parsed


def _well_formed(path: str, status: int, payload, texts: int) -> bool:
    if status != 200:
        return isinstance(payload, dict) and isinstance(payload.get("error"), str) and "error_type" in payload
    if path == "/classify":
        return isinstance(payload, dict) and len(payload.get("results", [])) == texts
    return isinstance(payload, list) and len(payload) == texts and all(isinstance(item, list) for item in payload)


def _hang_up(port: int, path: str, body: dict, outcome: Outcome) -> None:
    """Sends the whole request on a connection of its own, then closes it before the answer."""
    outcome.hung_up = True
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {outcome.request_id}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(head.encode() + data)
    except OSError as err:
        outcome.failure, outcome.refused = repr(err), isinstance(err, ConnectionRefusedError)


def _ask(
    conn: http.client.HTTPConnection | None, port: int, path: str, body: dict, outcome: Outcome, timeout: float
) -> http.client.HTTPConnection | None:
    """Posts on ``conn`` (opened when None) and records the answer; returns the connection to
    reuse, or None when it is closed (a failure, or a non-200 answer, which says Connection: close)."""
    try:
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        status, echoed, payload = _post(conn, path, body, outcome.request_id)
    except (OSError, http.client.HTTPException) as err:
        outcome.failure, outcome.refused = repr(err), isinstance(err, ConnectionRefusedError)
        if conn is not None:
            conn.close()
        return None
    outcome.status, outcome.echoed_id, outcome.answered = status, echoed, time.monotonic()
    outcome.well_formed = _well_formed(path, status, payload, outcome.texts)
    if status != 200:
        conn.close()
        return None
    return conn


def _client(
    number: int, port: int, texts: list[str], args, stop: threading.Event, outcomes: list[Outcome], lock
) -> None:
    rng = random.Random(number)
    conn: http.client.HTTPConnection | None = None
    for serial in range(args.max_requests):
        if stop.is_set():
            break
        batch = [rng.choice(texts) for _ in range(rng.randint(1, 8))]
        path = rng.choice(("/predict", "/classify"))
        body = {"inputs": batch} if path == "/predict" else {"texts": batch}
        outcome = Outcome(f"c{number}-{serial}", len(batch), time.monotonic())
        if rng.random() < args.hang_up:
            _hang_up(port, path, body, outcome)
        else:
            conn = _ask(conn, port, path, body, outcome, args.timeout)
        with lock:
            outcomes.append(outcome)
        if outcome.refused:
            break  # the server stopped listening: this client is done
    if conn is not None:
        conn.close()


def run(args: argparse.Namespace) -> dict:
    """Runs the load test; returns the report (``problems`` empty when every check passed)."""
    texts = list(DEFAULT_TEXTS) if args.texts is None else _read_texts(args.texts)
    log_file = tempfile.NamedTemporaryFile("w+", prefix="fastbert-loadtest-", suffix=".log", delete=False)  # noqa: SIM115 (the server writes it; the report names it)
    command = [sys.executable, "-m", "fastbert_kernels", "serve", str(args.checkpoint), "--port", "0",
               "--log-level", "debug", "--drain-timeout", str(args.drain_timeout), *args.server_args]  # fmt: skip
    server = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    problems: list[str] = []
    started = time.monotonic()
    try:
        port = _wait_for_port(Path(log_file.name), server, args.timeout)
        stop, lock, outcomes = threading.Event(), threading.Lock(), []
        clients = [
            threading.Thread(target=_client, args=(i, port, texts, args, stop, outcomes, lock), daemon=True)
            for i in range(args.clients)
        ]
        for client in clients:
            client.start()
        time.sleep(args.signal_after)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=args.drain_timeout + 30)
        except subprocess.TimeoutExpired:
            problems.append(f"the server did not exit within {args.drain_timeout + 30:g} s of SIGTERM")
            server.kill()
            code = server.wait()
        exited = time.monotonic()
        stop.set()
        for client in clients:
            client.join(timeout=args.timeout)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = Path(log_file.name).read_text()
    accepted = set(ACCEPTED.findall(log))
    answers: dict[str, list[int]] = {}
    for request_id, status in ANSWERED.findall(log):
        answers.setdefault(request_id, []).append(int(status))
    by_id = {outcome.request_id: outcome for outcome in outcomes}
    lost = sorted(
        request_id
        for request_id in accepted
        if request_id in by_id and not by_id[request_id].hung_up and by_id[request_id].status is None
    )
    twice = sorted(request_id for request_id, statuses in answers.items() if len(statuses) > 1)
    unanswered_in_log = sorted(request_id for request_id in accepted if request_id not in answers)
    wrong_id = sorted(o.request_id for o in outcomes if o.status is not None and o.echoed_id != o.request_id)
    bad_status = sorted({o.status for o in outcomes if o.status not in (None, 200, 429, 503)})
    malformed = sorted(o.request_id for o in outcomes if o.status is not None and not o.well_formed)
    never_accepted = [o for o in outcomes if o.status is None and not o.hung_up and o.request_id not in accepted]
    through_drain = [o for o in outcomes if o.status == 200 and o.sent < signalled < (o.answered or 0)]
    if code != 0:
        problems.append(f"the server exited with status {code}")
    for name, ids in (("lost (accepted, no answer)", lost), ("answered twice", twice),
                      ("accepted but never answered in the server log", unanswered_in_log),
                      ("answered with another request id", wrong_id), ("malformed answers", malformed)):  # fmt: skip
        if ids:
            problems.append(f"{len(ids)} requests {name}: {ids[:5]}")
    if bad_status:
        problems.append(f"unexpected statuses {bad_status}")
    if not through_drain:
        problems.append("no request was in flight across the signal: the drain was not exercised")
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        key = "hung up" if outcome.hung_up else str(outcome.status) if outcome.status else "no connection"
        statuses[key] = statuses.get(key, 0) + 1
    report = {
        "requests": len(outcomes),
        "accepted_by_server": len(accepted),
        "outcomes": statuses,
        "answered_across_the_signal": len(through_drain),
        "refused_before_acceptance": len(never_accepted),
        "exit_code": code,
        "exit_after_signal_s": round(exited - signalled, 3),
        "wall_s": round(time.monotonic() - started, 3),
        "server_log": log_file.name,
        "problems": problems,
    }
    return report


def _wait_for_port(log: Path, server: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = LISTENING.search(log.read_text())
        if found:
            return int(found.group(1))
        if server.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.returncode} before listening:\n{log.read_text()[-2000:]}"
            )
        time.sleep(0.05)
    raise TimeoutError(f"the server did not listen within {timeout} s")


def _read_texts(path: str) -> list[str]:
    texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--signal-after", type=float, default=3.0, help="seconds of load before SIGTERM")
    parser.add_argument("--max-requests", type=int, default=200, help="per client")
    parser.add_argument("--hang-up", type=float, default=0.1, help="the share of requests whose client hangs up")
    parser.add_argument("--drain-timeout", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on server start and each request")
    parser.add_argument("--texts", default=None, help="a file of texts, one per line (default: a few built in)")
    parser.add_argument("--serve-arg", action="append", default=[], dest="server_args",
                        help="one more option for `serve`, e.g. --serve-arg=--max-batch=32 (repeatable)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
