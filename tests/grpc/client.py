#!/usr/bin/python3
# The gRPC client of mesh-agent's end-to-end tests: unary calls with raw bytes (no protobuf)
# to one method, printing one JSON line per call:
#   {"code": "OK" | "UNAVAILABLE" | ..., "details": ..., "response": <the echo's JSON or null>}
# The calls are made one after the other on one channel (one HTTP/2 connection).
# Needs Debian's python3-grpcio, so run it with /usr/bin/python3 (not a pyenv python3).
#
# usage: client.py TARGET METHOD [--authority HOST:PORT] [-H name:value]... [--count N]
#                  [--timeout SECONDS]

import argparse
import json
import sys

import grpc


def metadata_pair(text):
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not name:value")
    # gRPC metadata keys are lower case; grpcio refuses others.
    return (name.strip().lower(), value.strip())


def main():
    parser = argparse.ArgumentParser(description="gRPC client for mesh-agent's tests")
    parser.add_argument("target", help="address to dial, IP:PORT")
    parser.add_argument("method", help="full method path, /package.Service/Method")
    parser.add_argument("--authority", help=":authority to send (default: the target)")
    parser.add_argument("-H", dest="metadata", action="append", type=metadata_pair, default=[])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args()

    # Retries off: each printed line is exactly one call on the wire.
    options = [("grpc.enable_retries", 0)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    with grpc.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(args.method)
        for _ in range(args.count):
            line = {"code": "OK", "details": None, "response": None}
            try:
                body = call(b"", metadata=args.metadata, timeout=args.timeout)
                try:
                    line["response"] = json.loads(body)
                except ValueError:
                    line["response"] = body.decode("utf-8", "replace")
            except grpc.RpcError as error:
                line["code"] = error.code().name
                line["details"] = error.details()
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
