#!/usr/bin/python3
"""Sends bytes to a server exactly as given (`\\r`, `\\n` written as escapes), then reads until
the server closes the connection or goes quiet for 3 s, and reports one JSON line: what came
back and whether the server closed. For HTTP/1.1 requests no real client would send
(conflicting Content-Length and Transfer-Encoding, request smuggling attempts).

usage: raw_http1.py HOST PORT REQUEST
"""

import json
import socket
import sys


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    request = sys.argv[3].encode().decode("unicode_escape").encode("latin-1")
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(request)
    sock.settimeout(3)
    received = b""
    closed = False
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                closed = True
                break
            received += data
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    print(json.dumps({"response": received.decode("latin-1"), "closed": closed}))


if __name__ == "__main__":
    main()
