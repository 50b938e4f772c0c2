"""Certificates for TLS tests: one trusted CA, server certificates good and bad, a client cert.

`make_tls_material(tmp_path)` writes the PEM files the proxy's `TLSConfig` points at
(`ca_file`, `cert_file`, `key_file`) and builds `ssl.SSLContext`s for the fake upstream and for
test clients. trustme issues everything in memory; nothing touches the system trust store.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

import trustme

ServerCertKind = Literal["good", "wrong_name", "untrusted"]

# The names the good server certificate is valid for: the fake upstream's URL uses "localhost",
# and IP SANs let a test dial 127.0.0.1 with verification on.
SERVER_NAMES = ("localhost", "127.0.0.1")
WRONG_NAME = "wrong.example"
CLIENT_NAME = "client.example"


@final
@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """A CA (written to `ca_file`) and the certificates it issued, plus one it did not."""

    ca: trustme.CA
    ca_file: Path
    server_cert: trustme.LeafCert  # localhost + 127.0.0.1, issued by `ca`
    wrong_name_cert: trustme.LeafCert  # only WRONG_NAME, issued by `ca`
    untrusted_cert: trustme.LeafCert  # localhost + 127.0.0.1, issued by a CA not in `ca_file`
    client_cert: trustme.LeafCert  # for mTLS, issued by `ca`
    client_cert_file: Path
    client_key_file: Path

    def server_context(
        self, *, cert: ServerCertKind = "good", require_client_cert: bool = False
    ) -> ssl.SSLContext:
        """A server context presenting `cert`; with `require_client_cert`, mTLS against `ca`."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf = {
            "good": self.server_cert,
            "wrong_name": self.wrong_name_cert,
            "untrusted": self.untrusted_cert,
        }[cert]
        leaf.configure_cert(ctx)
        if require_client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, with_client_cert: bool = False) -> ssl.SSLContext:
        """A verifying client context trusting only `ca`, optionally presenting `client_cert`."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if with_client_cert:
            self.client_cert.configure_cert(ctx)
        return ctx


def make_tls_material(directory: Path) -> TLSMaterial:
    """Issue a fresh CA and certificates, writing the PEM files into `directory`."""
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    client_cert = ca.issue_cert(CLIENT_NAME)
    client_cert_file = directory / "client-cert.pem"
    client_key_file = directory / "client-key.pem"
    client_cert.cert_chain_pems[0].write_to_path(str(client_cert_file))
    for pem in client_cert.cert_chain_pems[1:]:
        pem.write_to_path(str(client_cert_file), append=True)
    client_cert.private_key_pem.write_to_path(str(client_key_file))

    return TLSMaterial(
        ca=ca,
        ca_file=ca_file,
        server_cert=ca.issue_cert(*SERVER_NAMES),
        wrong_name_cert=ca.issue_cert(WRONG_NAME),
        untrusted_cert=trustme.CA().issue_cert(*SERVER_NAMES),
        client_cert=client_cert,
        client_cert_file=client_cert_file,
        client_key_file=client_key_file,
    )
