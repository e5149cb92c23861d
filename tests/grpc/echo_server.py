#!/usr/bin/python3
# The gRPC echo of mesh-agent's end-to-end tests, like the Gateway API conformance echo's gRPC
# side: every unary call, whatever its service and method, is answered with a JSON report of
# what arrived -- the pod, its namespace, the method (full path), the metadata and the
# authority. Metadata `x-echo-grpc-status: <code>` makes it answer that status instead.
#
# No protobuf: a generic handler with identity serializers takes and returns raw bytes.
# Needs Debian's python3-grpcio, so run it with /usr/bin/python3 (not a pyenv python3).
#
# usage: echo_server.py --port PORT --pod NAME --namespace NAMESPACE [--tag TAG]

import argparse
import json
import signal
import sys
import threading
from concurrent import futures

import grpc

STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


def authority_of(context):
    """The :authority of the call: grpcio keeps it beside the method, not in the metadata."""
    event = getattr(context, "_rpc_event", None)
    details = getattr(event, "call_details", None)
    host = getattr(details, "host", None)
    if isinstance(host, bytes):
        return host.decode("utf-8", "replace")
    return host


class Echo(grpc.GenericRpcHandler):
    def __init__(self, pod, namespace):
        self.pod = pod
        self.namespace = namespace

    def service(self, handler_call_details):
        method = handler_call_details.method

        def answer(request, context):
            metadata = {}
            for key, value in context.invocation_metadata():
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                metadata.setdefault(key, []).append(value)
            wanted = metadata.get("x-echo-grpc-status")
            if wanted:
                try:
                    status = STATUS_BY_CODE[int(wanted[0])]
                except (ValueError, KeyError):
                    status = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(status, "status requested by x-echo-grpc-status")
            report = {
                "pod": self.pod,
                "namespace": self.namespace,
                "method": method,
                "metadata": metadata,
                "authority": authority_of(context),
                "peer": context.peer(),
                "requestBytes": len(request),
            }
            return json.dumps(report).encode()

        return grpc.unary_unary_rpc_method_handler(answer)


def main():
    parser = argparse.ArgumentParser(description="gRPC echo for mesh-agent's tests")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pod", required=True)
    parser.add_argument("--namespace", required=True)
    # Names the process among others (ps, logs); not used otherwise.
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((Echo(args.pod, args.namespace),))
    if server.add_insecure_port(f"0.0.0.0:{args.port}") == 0:
        print(f"cannot listen on port {args.port}", file=sys.stderr, flush=True)
        return 1
    server.start()
    print(f"serving on {args.port}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(grace=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
