"""The cluster token and TLS on real grpc.aio servers: who gets in, who gets UNAUTHENTICATED."""
from __future__ import annotations

import argparse
import stat

import grpc
import pytest

from gridserve.common import grpcutil
from gridserve.common.errors import ConfigError
from gridserve.common.security import add_security_args, security_from_args
from gridserve.v1 import replica_pb2, replica_pb2_grpc
from support.tls import make_certs

TOKEN = "a-cluster-token-of-enough-length"


class Replica(replica_pb2_grpc.ReplicaServicer):
    async def Info(self, request, context):
        return replica_pb2.InfoResponse(replica_id="r1")

    async def Generate(self, request, context):
        yield replica_pb2.GenerateResponse(text="hi")


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_security_args(p)
    return p.parse_args(argv)


async def serve(security):
    server = grpcutil.make_server(security)
    replica_pb2_grpc.add_ReplicaServicer_to_server(Replica(), server)
    grpcutil.add_health(server)
    port = grpcutil.bind(server, "127.0.0.1", 0, security)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def info(address, security):
    async with grpcutil.channel(address, security) as ch:
        return await replica_pb2_grpc.ReplicaStub(ch).Info(replica_pb2.InfoRequest(), timeout=5)


async def generate(address, security):
    async with grpcutil.channel(address, security) as ch:
        return [r.text async for r in replica_pb2_grpc.ReplicaStub(ch).Generate(replica_pb2.GenerateRequest(),
                                                                                 timeout=5)]


async def test_calls_without_or_with_a_wrong_token_are_refused_and_the_right_one_passes():
    server, address = await serve(security_from_args(args("--cluster-token", TOKEN)))
    try:
        for sec in (None, security_from_args(args("--cluster-token", "x" * 16 + "wrong"))):
            for call in (info, generate):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(address, sec)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "cluster token" in e.value.details()
        good = security_from_args(args("--cluster-token", TOKEN))
        assert (await info(address, good)).replica_id == "r1"
        assert await generate(address, good) == ["hi"]
    finally:
        await server.stop(None)


async def test_health_probes_need_no_token():
    server, address = await serve(security_from_args(args("--cluster-token", TOKEN)))
    try:
        async with grpcutil.channel(address) as ch:
            assert await grpcutil.check_health(ch) == grpcutil.SERVING
    finally:
        await server.stop(None)


async def test_tls_with_the_cluster_ca_works_and_plaintext_clients_fail(tmp_path):
    files = make_certs(tmp_path, ["127.0.0.1"])
    tls = ("--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca", files["ca"])
    server, address = await serve(security_from_args(args("--cluster-token", TOKEN, *tls)))
    try:
        client = security_from_args(args("--cluster-token", TOKEN, "--tls-ca", files["ca"]))
        assert (await info(address, client)).replica_id == "r1"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await info(address, security_from_args(args("--cluster-token", TOKEN)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


def test_head_creates_a_private_token_file_once_and_others_find_it(tmp_path):
    made = security_from_args(args(), state_dir=tmp_path, create=True)
    path = tmp_path / "cluster-token"
    assert len(made.token) >= 32 and made.token_file == str(path.resolve())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert security_from_args(args(), state_dir=tmp_path).token == made.token
    assert security_from_args(args("--cluster-token-file", str(path))).token == made.token
    assert security_from_args(args(), state_dir=tmp_path / "elsewhere").token == ""


@pytest.mark.parametrize("argv, message", [
    (("--cluster-token", TOKEN, "--cluster-token-file", "/x"), "not both"),
    (("--cluster-token", "short"), "at least 16"),
    (("--cluster-token-file", "/no/such/file"), "/no/such/file"),
    (("--tls-cert", "/x"), "go together"),
])
def test_bad_security_flags_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        security_from_args(args(*argv))
