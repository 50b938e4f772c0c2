"""TLS origination: one verified client SSLContext per upstream, built once at start-up."""

from __future__ import annotations

import ssl

from resilient_ambassador.core.config import ListenerTLS, TLSConfig

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_context(tls: TLSConfig, *, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A client context: verification and hostname checks on unless `verify: false`, never a
    plaintext fallback. Without `ca_file`, the system store (which honours SSL_CERT_FILE and
    SSL_CERT_DIR) is used."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    ctx.minimum_version = _MIN_VERSIONS[tls.min_version]
    if tls.cert_file is not None:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:  # a tcp relay does not know the protocol inside, so it offers none
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """TLS termination on a tcp listener: the system's secure defaults, TLS 1.2 at least."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
