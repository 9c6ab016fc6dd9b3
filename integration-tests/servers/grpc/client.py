"""The gRPC test client (grpcio) for integration-tests/tests/grpc.rs.

Usage: python client.py GEN_DIR TARGET AUTHORITY MODE [ARGS...]
Calls edge.test.Echo at TARGET (the agent) with AUTHORITY as the HTTP/2 :authority, and prints
one JSON line per call: {"code": <status>, "message": ..., "server": ..., "replies": n,
"trailers": {...}}.
MODE unary TEXT CODE: one unary call (CODE: the status the server fails with, 0 for none).
MODE stream TEXT COUNT: one server-streaming call.
MODE many N DELAY_MS TIMEOUT_S: N unary calls at once (each DELAY_MS long at the server).
MODE deadline MS DELAY_MS: one unary call with a deadline of MS milliseconds.
"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402

TARGET, AUTHORITY, MODE = sys.argv[2], sys.argv[3], sys.argv[4]
ARGS = sys.argv[5:]


def result(code, message="", server="", replies=0, trailers=()):
    return {
        "code": code.value[0],
        "message": message,
        "server": server,
        "replies": replies,
        "trailers": {k: v for k, v in trailers},
    }


def unary(stub, text, code=0, delay_ms=0, timeout=30):
    try:
        reply, call = stub.Unary.with_call(
            echo_pb2.EchoRequest(text=text, code=code, delay_ms=delay_ms), timeout=timeout
        )
        return result(call.code(), call.details() or "", reply.server, 1, call.trailing_metadata() or ())
    except grpc.RpcError as e:
        return result(e.code(), e.details() or "", trailers=e.trailing_metadata() or ())


def main():
    opts = [("grpc.default_authority", AUTHORITY), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(TARGET, options=opts) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)
        if MODE == "unary":
            print(json.dumps(unary(stub, ARGS[0], int(ARGS[1]))), flush=True)
        elif MODE == "stream":
            call = stub.Stream(echo_pb2.EchoRequest(text=ARGS[0], count=int(ARGS[1])), timeout=30)
            n, server = 0, ""
            try:
                for r in call:
                    assert r.index == n, (r.index, n)
                    n, server = n + 1, r.server
                print(json.dumps(result(call.code(), call.details() or "", server, n, call.trailing_metadata() or ())), flush=True)
            except grpc.RpcError as e:
                print(json.dumps(result(e.code(), e.details() or "", server, n, e.trailing_metadata() or ())), flush=True)
        elif MODE == "many":
            n, delay, timeout = int(ARGS[0]), int(ARGS[1]), float(ARGS[2])
            with ThreadPoolExecutor(n) as pool:
                futs = [pool.submit(unary, stub, f"call-{i}", 0, delay, timeout) for i in range(n)]
                for f in futs:
                    print(json.dumps(f.result()), flush=True)
        elif MODE == "deadline":
            print(json.dumps(unary(stub, "late", 0, int(ARGS[1]), int(ARGS[0]) / 1000)), flush=True)
        else:
            raise SystemExit(f"unknown mode {MODE}")


if __name__ == "__main__":
    main()
