"""TLS contexts for the bulk stream, judged the same way on every Python.

Python 3.13 made its default contexts strict (VERIFY_X509_STRICT and
VERIFY_X509_PARTIAL_CHAIN): a CA without a keyUsage extension, or a leaf without an
authority key identifier, is refused. Earlier Pythons accept such chains. So that one
certificate set does not work on one interpreter and fail on the next, the bulk stream
always verifies strictly, on both ends; gRPC's own TLS (BoringSSL) is more lenient, and a
client whose bulk handshake fails for a certificate reason falls back to gRPC, saying why.
"""
from __future__ import annotations

import ssl

STRICT_FLAGS = ssl.VERIFY_X509_STRICT | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)


def client_context(ca_pem: bytes | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode() if ca_pem else None)
    context.verify_flags |= STRICT_FLAGS
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def server_context(cert_file: str, key_file: str, client_ca_file: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca_file)
        context.verify_flags |= STRICT_FLAGS
    return context


def certificate_problem(error: BaseException) -> str | None:
    """The reason, when `error` is a handshake failing over a certificate (ours or the
    peer's); None for anything else."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or str(error)
    reason = getattr(error, "reason", None) or ""  # e.g. the peer refusing our certificate
    if isinstance(error, ssl.SSLError) and "CERTIFICATE" in reason.upper():
        return reason.lower().replace("_", " ")
    return None
