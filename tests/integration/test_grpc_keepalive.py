"""Channels notice a frozen peer: a stream from a SIGSTOPped server fails with UNAVAILABLE (ping timeout)
in seconds instead of stalling until something else kills that server."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from gridserve.common import grpcutil
from gridserve.v1 import replica_pb2, replica_pb2_grpc


SERVER = """
import asyncio
from gridserve.common import grpcutil
from gridserve.v1 import replica_pb2, replica_pb2_grpc

class Ticker(replica_pb2_grpc.ReplicaServicer):
    async def Generate(self, request, context):
        for i in range(100000):
            yield replica_pb2.GenerateResponse(text="x", token_ids=[i])
            await asyncio.sleep(0.05)

async def main():
    server = grpcutil.make_server()
    replica_pb2_grpc.add_ReplicaServicer_to_server(Ticker(), server)
    port = grpcutil.bind(server, "127.0.0.1", 0)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_a_stream_from_a_frozen_server_fails_within_the_ping_timeout():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        async with grpcutil.channel(f"127.0.0.1:{port}") as ch:
            call = replica_pb2_grpc.ReplicaStub(ch).Generate(replica_pb2.GenerateRequest(prompt="x"))
            for _ in range(5):
                await call.read()
            os.kill(proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with asyncio.timeout(45):  # grpc's own default would stall for a minute or more
                    while True:
                        await call.read()
        waited = time.monotonic() - frozen
        print(f"frozen server noticed after {waited:.1f}s: {err.value.details()}")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()
        proc.wait()
