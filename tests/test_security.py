"""TLS, mutual TLS and bearer tokens accept the right clients and refuse the wrong ones; health stays open."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genserve.service.ops.security import TLSConfig
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from genserve.service.server import ServerOptions
from tests.serving import ServerThread


def _certificate(name: str, issuer_key, issuer_name, key, is_ca: bool = False) -> x509.Certificate:  # noqa: ANN001
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(item) -> bytes:  # noqa: ANN001
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM)
    return item.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    files = {}
    for authority in ("ca", "rogue_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"genserve test {authority}", key, None, key, is_ca=True)
        files[authority], files[f"{authority}_key"] = cert, key
    for leaf, issuer in (("server", "ca"), ("client", "ca"), ("rogue_client", "rogue_ca")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate("localhost", files[f"{issuer}_key"], files[issuer].subject, key)
        files[leaf], files[f"{leaf}_key"] = cert, key
    paths = {}
    for name, item in files.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(_pem(item))
    return paths


def _secure_stub(server: ServerThread, pki: dict[str, Path], client: str | None = None):  # noqa: ANN202
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[client].read_bytes() if client else None,
    )
    channel = grpc.secure_channel(f"localhost:{server.server.port}", credentials)
    return generate_pb2_grpc.TextGenerationStub(channel), channel


REQUEST = pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]), parameters=pb.GenerationParameters(max_new_tokens=3))


def _refused(call) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_tls_serves_tls_clients_and_refuses_plaintext(tiny, pki) -> None:
    server = ServerThread(tiny, options=ServerOptions(port=0, tls=TLSConfig(pki["server"], pki["server_key"])))
    try:
        stub, channel = _secure_stub(server, pki)
        assert stub.Generate(REQUEST, timeout=30).usage.generated_tokens == 3
        channel.close()
        plain = generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"localhost:{server.server.port}"))
        assert _refused(lambda: plain.Generate(REQUEST, timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tiny, pki) -> None:
    tls = TLSConfig(pki["server"], pki["server_key"], client_ca_file=pki["ca"])
    server = ServerThread(tiny, options=ServerOptions(port=0, tls=tls))
    try:
        stub, channel = _secure_stub(server, pki, client="client")
        assert stub.Generate(REQUEST, timeout=30).usage.generated_tokens == 3
        channel.close()
        for client in (None, "rogue_client"):
            stub, channel = _secure_stub(server, pki, client=client)
            assert _refused(lambda: stub.Generate(REQUEST, timeout=5)) == grpc.StatusCode.UNAVAILABLE
            channel.close()
    finally:
        server.close()


def test_bearer_token_auth_and_open_health(tiny) -> None:
    server = ServerThread(tiny, options=ServerOptions(port=0, auth_tokens=frozenset({"s3cret-token", "second"})))
    try:
        assert (
            server.stub.Generate(REQUEST, metadata=[("authorization", "Bearer s3cret-token")]).usage.generated_tokens
            == 3
        )
        assert server.stub.Generate(REQUEST, metadata=[("authorization", "bearer second")]).usage.generated_tokens == 3
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret-token")]):
            assert _refused(lambda: server.stub.Generate(REQUEST, metadata=metadata)) == grpc.StatusCode.UNAUTHENTICATED
            stream = lambda: list(server.stub.GenerateStream(REQUEST, metadata=metadata))  # noqa: E731
            assert _refused(stream) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(server.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert server.engine.num_running == 0
    finally:
        server.close()
