"""Certificates for a throw-away cluster, made with the ``openssl`` CLI (no Python crypto dependency).

EC P-256 keys: generating them takes milliseconds, RSA would add a noticeable part of the start-up time.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def _ext_file(folder: Path, name: str, lines: list[str]) -> Path:
    p = folder / f"{name}.ext"
    p.write_text("\n".join(lines) + "\n")
    return p


class Pki:
    """A CA plus the leaf certificates one cluster needs, all under ``folder``."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.ca = CertPair(self.dir / "ca.crt", self.dir / "ca.key")
        self.sa_key = self.dir / "sa.key"
        self.sa_pub = self.dir / "sa.pub"

    def create_ca(self) -> None:
        _openssl(
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            str(self.ca.key),
            "-out",
            str(self.ca.cert),
            "-days",
            "3650",
            "-subj",
            "/CN=dreambooth-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )
        # The ServiceAccount token signing key (apiserver signs TokenRequest tokens, the controller-manager's
        # token controller signs legacy Secret tokens).
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(self.sa_key), cwd=self.dir)
        _openssl("ec", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub), cwd=self.dir)

    def issue(self, name: str, cn: str, *, orgs: tuple[str, ...] = (), server_sans: tuple[str, ...] = ()) -> CertPair:
        """Issue a leaf: a client certificate (CN = user, O = groups) or, with SANs, a serving certificate."""
        pair = CertPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        csr = self.dir / f"{name}.csr"
        subj = "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"
        _openssl(
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-keyout",
            str(pair.key),
            "-out",
            str(csr),
            "-subj",
            subj,
            cwd=self.dir,
        )
        ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_sans:
            ext.append("extendedKeyUsage=serverAuth,clientAuth")
            ext.append("subjectAltName=" + ",".join(server_sans))
        else:
            ext.append("extendedKeyUsage=clientAuth")
        extfile = _ext_file(self.dir, name, ext)
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(self.ca.cert),
            "-CAkey",
            str(self.ca.key),
            "-CAcreateserial",
            "-out",
            str(pair.cert),
            "-days",
            "365",
            "-extfile",
            str(extfile),
            cwd=self.dir,
        )
        csr.unlink()
        extfile.unlink()
        pair.key.chmod(0o600)
        return pair
