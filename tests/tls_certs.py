"""Test helper: a throwaway CA with a server certificate (for 127.0.0.1 / localhost) and a
client certificate, made with the openssl command."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(path))


# What Python 3.13's strict verification (VERIFY_X509_STRICT) and RFC 5280 ask of a chain:
# a CA marked critical CA:TRUE that may sign certificates, key identifiers linking each
# leaf to it, and leaves that say what they are for (and, for a server, its names).
_CA_EXTENSIONS = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                  "subjectKeyIdentifier=hash")
_LEAF_EXTENSIONS = {
    "server": ("keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth",
               "subjectAltName=IP:127.0.0.1,DNS:localhost"),
    "client": ("keyUsage=critical,digitalSignature", "extendedKeyUsage=clientAuth", "subjectAltName=DNS:client"),
}
_LEAF_COMMON = ("basicConstraints=critical,CA:FALSE", "subjectKeyIdentifier=hash",
                "authorityKeyIdentifier=keyid,issuer")


def make_certificates(d: Path, conforming: bool = True) -> Certificates:
    """conforming=False: a CA with no keyUsage extension and leaves with no key identifiers,
    as many private CAs are made; strict verification (Python 3.13's default) refuses it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    _key(d / "ca.key")
    ca_ext = [a for e in _CA_EXTENSIONS for a in ("-addext", e)] if conforming else []
    _openssl("req", "-x509", "-new", "-key", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "1",
             "-subj", "/CN=kvtier test CA", "-nodes", "-config", _empty_config(d), *ca_ext)
    for name, extensions in _LEAF_EXTENSIONS.items():
        _key(d / f"{name}.key")
        _openssl("req", "-new", "-key", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN=kvtier test {name}", "-config", _empty_config(d))
        if not conforming:
            extensions = [e for e in extensions if e.startswith(("subjectAltName", "extendedKeyUsage"))]
        (d / f"{name}.ext").write_text("\n".join((*extensions, *(_LEAF_COMMON if conforming else ()))) + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", "-extfile", str(d / f"{name}.ext"))
    return Certificates(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def _empty_config(d: Path) -> str:
    """A minimal openssl config, so the machine's default one (which may add extensions of
    its own, such as a v3_ca section) does not change the certificates."""
    path = d / "openssl.cnf"
    path.write_text("[req]\ndistinguished_name = dn\n[dn]\n")
    return str(path)
