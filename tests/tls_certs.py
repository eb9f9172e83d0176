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


def make_certificates(d: Path) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    _key(d / "ca.key")
    _openssl("req", "-x509", "-new", "-key", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "1",
             "-subj", "/CN=kvtier test CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        _key(d / f"{name}.key")
        _openssl("req", "-new", "-key", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN=kvtier test {name}")
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", "-extfile", str(d / f"{name}.ext"))
    return Certificates(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")
