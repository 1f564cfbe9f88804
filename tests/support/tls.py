"""Test certificates made with the openssl command: a CA and one cert for the given IPs and names."""
from __future__ import annotations

import subprocess
from pathlib import Path


def make_certs(folder: Path, ips: list[str], names: tuple[str, ...] = ("localhost",)) -> dict[str, str]:
    """Writes ca.pem, cert.pem and key.pem (the cert signed by the CA, valid for `ips` and `names`)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca-key.pem", "ca.pem", "key.pem", "cert.csr", "cert.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=" + ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in names]) +
                   "\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=gridserve test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=gridserve")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return {"ca": str(ca), "cert": str(cert), "key": str(key)}
