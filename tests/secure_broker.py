"""A second, secured broker for the security tests, and its certificates.

One broker process with three client listeners and no PLAINTEXT one: SASL_PLAINTEXT (PLAIN
mechanism), SSL (server certificate from a CA generated here) and SASL_SSL. Clients reach it
through the documented settings only (`client_env`), exactly as a worker would be
configured against a secured cluster.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import socket
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from infra.kafka_broker import Broker, BrokerConfig, Listener
from tasks.settings import Settings

USER = "alice"
BROKER_USER = "broker"  # the broker's own inter-broker login
PLAIN_LOGIN = "org.apache.kafka.common.security.plain.PlainLoginModule"


@dataclass(frozen=True)
class Certificates:
    ca_file: Path  # the CA certificate clients trust (KAFKA_SSL_CAFILE)
    keystore_file: Path  # the broker's private key and certificate chain (PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")):
    """A CA and a broker certificate it signs, valid for `hosts` (IPs and DNS names in the
    subject alternative names, so hostname checks pass for either)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    no = dict.fromkeys(["content_commitment", "key_encipherment", "data_encipherment",
                        "key_agreement", "encipher_only", "decipher_only"], False)  # fmt: skip
    signing_only = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **no)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("hybrid-workflows test CA"))
        .issuer_name(_name("hybrid-workflows test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(signing_only, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    keystore = directory / "broker-keystore.pem"
    keystore.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(pem)
        + ca_cert.public_bytes(pem)
    )
    keystore.chmod(0o600)
    return Certificates(ca_file, keystore)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (the OS picks them)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _jaas(username: str, password: str, users: dict[str, str]) -> str:
    accounts = " ".join(f'user_{name}="{pw}"' for name, pw in users.items())
    return f'{PLAIN_LOGIN} required username="{username}" password="{password}" {accounts};'


@dataclass
class SecureBroker:
    broker: Broker
    certificates: Certificates
    addresses: dict[str, str]  # security protocol -> bootstrap address of its listener
    password: str  # USER's password

    def client_env(self, protocol: str) -> dict[str, str]:
        """The documented settings (environment variables) of a client of `protocol`."""
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.addresses[protocol],
            "KAFKA_SECURITY_PROTOCOL": protocol,
        }
        if protocol.startswith("SASL_"):
            env |= {
                "KAFKA_SASL_MECHANISM": "PLAIN",
                "KAFKA_SASL_USERNAME": USER,
                "KAFKA_SASL_PASSWORD": self.password,
            }
        if protocol.endswith("SSL"):
            env["KAFKA_SSL_CAFILE"] = str(self.certificates.ca_file)
        return env

    def stop(self) -> None:
        self.broker.stop()


def start_secure_broker(directory: Path, log_file: Path, timeout_s: float = 120) -> SecureBroker:
    """Generate certificates and passwords, start the broker, return once a SASL client
    gets metadata and consumer groups work."""
    certificates = make_certificates(directory / "certs")
    password, broker_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    sasl_port, ssl_port, sasl_ssl_port, controller_port = free_ports(4)
    jaas = _jaas(BROKER_USER, broker_password, {BROKER_USER: broker_password, USER: password})
    config = BrokerConfig(
        directory=directory / "broker",
        listeners=(
            Listener("SASL_PLAINTEXT", sasl_port),  # first: also the inter-broker listener
            Listener("SSL", ssl_port),
            Listener("SASL_SSL", sasl_ssl_port),
        ),
        controller_port=controller_port,
        properties={
            "sasl.enabled.mechanisms": "PLAIN",
            "sasl.mechanism.inter.broker.protocol": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": jaas,
            "listener.name.sasl_ssl.plain.sasl.jaas.config": jaas,
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(certificates.keystore_file),
            "ssl.client.auth": "none",
        },
    )
    secure = SecureBroker(
        Broker(config, log_file),
        certificates,
        {
            "SASL_PLAINTEXT": f"127.0.0.1:{sasl_port}",
            "SSL": f"127.0.0.1:{ssl_port}",
            "SASL_SSL": f"127.0.0.1:{sasl_ssl_port}",
        },
        password,
    )
    ready = Settings(_env_file=None, **_fields(secure.client_env("SASL_PLAINTEXT")))
    secure.broker.start(ready, timeout_s=timeout_s)
    return secure


def _fields(env: dict[str, str]) -> dict[str, str]:
    """Environment variables as Settings field names."""
    return {name.lower(): value for name, value in env.items()}
