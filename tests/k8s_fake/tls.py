"""A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI,
so the fake API server can be reached the way a pod reaches the real one: HTTPS,
verified against the service account's ca.crt."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerCertificate:
    ca: Path  # what a pod finds as /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


# P-256 keys: an RSA key takes the openssl CLI seconds to generate on a loaded machine.
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def openssl() -> str | None:
    return shutil.which("openssl")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)  # noqa: S603


def make_certificate(directory: Path, name: str = "fake") -> ServerCertificate:
    """A CA (basicConstraints CA:TRUE) and a leaf it signed for IP 127.0.0.1."""
    tool = openssl()
    if tool is None:
        raise FileNotFoundError("openssl is not on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / f"{name}-ca.key", directory / f"{name}-ca.crt"
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    _run(tool, "req", "-x509", *_EC_KEY, "-nodes", "-days", "1",
         "-subj", f"/CN={name} test CA", "-keyout", str(ca_key), "-out", str(ca),
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _run(tool, "req", *_EC_KEY, "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "authorityKeyIdentifier=keyid\n")
    _run(tool, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext))
    return ServerCertificate(ca=ca, cert=cert, key=key)
