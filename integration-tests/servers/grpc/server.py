"""The gRPC test server (grpcio) for integration-tests/tests/grpc.rs.

Usage: python server.py GEN_DIR NAME PORT [CALL_LOG]
Serves edge.test.Echo on 127.0.0.1:PORT, its replies naming NAME. Prints "ready" once serving.
With CALL_LOG, appends a line to that file as each unary call starts being handled (grpcio cancels
calls not yet handed to a handler when it stops, so a test waits for them to be handled).
SIGTERM stops it gracefully (grpcio sends GOAWAY and lets calls in progress finish, up to 10 s).
With ECHO_STREAM_ABORT=<code> in the environment, every Stream call sends its replies and then
fails with that gRPC status (so the status comes in trailers after messages).
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

NAME = sys.argv[2]
PORT = int(sys.argv[3])
CALL_LOG = sys.argv[4] if len(sys.argv) > 4 else None
STREAM_ABORT = int(os.environ.get("ECHO_STREAM_ABORT", "0"))
_log_lock = threading.Lock()


class Echo(echo_pb2_grpc.EchoServicer):
    def Unary(self, request, context):
        if CALL_LOG:
            with _log_lock, open(CALL_LOG, "a") as f:
                f.write(request.text + "\n")
        if request.delay_ms:
            time.sleep(request.delay_ms / 1000)
        if request.code:
            context.set_trailing_metadata((("x-server", NAME),))
            context.abort(grpc.StatusCode(_code(request.code)), f"{NAME}: failing as asked")
        context.set_trailing_metadata((("x-server", NAME),))
        return echo_pb2.EchoReply(text=request.text, server=NAME)

    def Stream(self, request, context):
        for i in range(request.count):
            if request.delay_ms:
                time.sleep(request.delay_ms / 1000)
            yield echo_pb2.EchoReply(text=request.text, server=NAME, index=i)
        context.set_trailing_metadata((("x-server", NAME),))
        if STREAM_ABORT:
            context.abort(grpc.StatusCode(_code(STREAM_ABORT)), f"{NAME}: stream aborted as asked")


def _code(n):
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c.value
    raise ValueError(n)


def main():
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(64))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    server.start()
    done = threading.Event()

    def stop(*_):
        server.stop(10).wait()
        done.set()

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while not done.is_set():
        done.wait(0.2)


if __name__ == "__main__":
    main()
