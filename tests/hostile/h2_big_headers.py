#!/usr/bin/python3
"""An HTTP/2 client that sends one request with an oversized header block (one header of the
given size, spread over CONTINUATION frames as any client must), then reports as one JSON line
how the server answered: the response status if any, the GOAWAY error code if any, whether the
stream was reset and whether the connection was closed.

usage: h2_big_headers.py HOST PORT BYTES AUTHORITY
"""

import json
import select
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def main():
    host, port, size, authority = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sock = socket.create_connection((host, port), timeout=10)
    # h2 checks header sizes against the peer's SETTINGS; the point here is to exceed them.
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.local_settings.max_header_list_size = 1 << 24
    sock.sendall(conn.data_to_send())
    report = {"status": None, "goaway": None, "reset": None, "closed": False}
    headers = [
        (":method", "GET"),
        (":path", "/big-http2"),
        (":scheme", "http"),
        (":authority", authority),
        ("x-big", "a" * size),
    ]
    try:
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
    except (BrokenPipeError, ConnectionResetError):
        report["closed"] = True
    timeout = 5
    while not report["closed"]:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            break
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            report["closed"] = True
            break
        if not data:
            report["closed"] = True
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            events = []
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                report["status"] = int(dict(event.headers).get(b":status", b"0"))
            elif isinstance(event, h2.events.StreamReset):
                report["reset"] = int(event.error_code)
            elif isinstance(event, h2.events.ConnectionTerminated):
                report["goaway"] = int(event.error_code)
        sock.sendall(conn.data_to_send())
        timeout = 1
    print(json.dumps(report))


if __name__ == "__main__":
    main()
