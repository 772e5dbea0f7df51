"""A gRPC server that tests run inside a VM (process driver: it needs grpcio, the test virtualenv's).

    python grpc_app.py PORT     (returns once listening; the server keeps running in the background)

Methods of service "test.Echo", on raw bytes (no protobuf schema needed):
  Unary        -> the request, reversed, with trailing metadata x-app-host (the address the app serves)
  Fail         -> status NOT_FOUND "no such thing" (a trailers-only answer)
  Count        -> server streaming: the request is a decimal N; N messages b"0".."N-1"
  Sum          -> client streaming: the sum of the decimal numbers it was sent
"""

import os
import sys
from concurrent import futures

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-app-host", os.environ.get("HOST", "")),))
    return request[::-1]


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def count(request, context):
    for i in range(int(request)):
        yield str(i).encode()


def total(request_iterator, context):
    return str(sum(int(part) for part in request_iterator)).encode()


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Sum": grpc.stream_unary_rpc_method_handler(total),
}


def main() -> None:
    port = int(sys.argv[1])
    host = os.environ.get("HOST", "0.0.0.0")
    ready_r, ready_w = os.pipe()
    if os.fork():
        # The parent returns once the child listens (gRPC's threads do not survive a fork: the child
        # makes the server).
        os.close(ready_w)
        sys.exit(0 if os.read(ready_r, 2) == b"ok" else 1)
    os.close(ready_r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", HANDLERS),))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    os.write(ready_w, b"ok")
    os.close(ready_w)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
