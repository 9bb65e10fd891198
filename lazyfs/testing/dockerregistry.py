"""A private Docker distribution registry (Debian's ``docker-registry``) on 127.0.0.1.

Each :class:`RegistryInstance` listens on a port the kernel picks (port 0, read back once
bound: no other process can take it between a choice and the bind), has its own YAML config
and storage directory under ``workdir``, optional htpasswd or token auth, and is stopped by
PID (SIGTERM, wait, SIGKILL) whatever happens inside the ``with``::

    with RegistryInstance(tmp_path) as reg:
        push_oci_layout(layout_dir, f"{reg.host}/app:v1")

Fixtures wrapping it live in :mod:`tests.support.fixtures`.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyfs.ocilayout import Layout
from lazyfs.testing.server import ServerProcess, listening_port

REGISTRY_BIN = "/usr/bin/docker-registry"


@dataclass(frozen=True)
class TokenAuth:
    """The registry side of ``auth: token:``; see :mod:`lazyfs.testing.tokenserver`."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


class RegistryInstance(ServerProcess):
    name = "docker-registry"

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: tuple[str, str] | None = None,
        token: TokenAuth | None = None,
        proxy: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        #: upstream URL: this registry is a pull-through cache of it (a mirror)
        self.proxy = proxy
        self.htpasswd = htpasswd
        self.token = token
        self.port = 0  # until start() finds what the kernel bound
        self.log_path = self.workdir / "registry.log"

    def _config(self) -> str:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.htpasswd:
            user, password = self.htpasswd
            line = subprocess.run(
                ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
            ).stdout.strip()
            pw_file = self.workdir / "htpasswd"
            pw_file.write_text(line + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: lazyfs-test\n    path: {pw_file}\n"
        elif self.token:
            t = self.token
            auth = (
                "auth:\n  token:\n"
                f"    realm: {t.realm}\n    service: {t.service}\n"
                f"    issuer: {t.issuer}\n    rootcertbundle: {t.rootcertbundle}\n"
            )
        return (
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            "http:\n  addr: 127.0.0.1:0\n"
            f"{auth}" + (f"proxy:\n  remoteurl: {self.proxy}\n" if self.proxy else "")
        )

    @property
    def host(self) -> str:
        if not self.port:
            raise RuntimeError(f"{self.name} not started: no port yet")
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> RegistryInstance:
        if not Path(REGISTRY_BIN).exists():
            raise RuntimeError(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.yml"
        cfg.write_text(self._config())
        self.port = 0
        self.spawn([REGISTRY_BIN, "serve", str(cfg)], self.log_path)
        return self

    def ready(self) -> bool:
        if not self.port:
            assert self.proc is not None
            self.port = listening_port(self.proc.pid) or 0
            if not self.port:
                return False
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 with auth enabled: it is up
        except OSError:
            return False


def push_oci_layout(
    layout_dir: Path | str,
    dest_ref: str,
    *,
    tag: str = "latest",
    creds: tuple[str, str] | None = None,
    all_images: bool = False,
) -> None:
    """``skopeo copy oci:DIR:TAG docker://DEST`` over plain HTTP, keeping digests byte-exact."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise RuntimeError("skopeo is not installed")
    cmd = [
        skopeo,
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]
    if all_images:
        cmd.append("--all")
    if creds:
        cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    else:
        cmd.append("--dest-no-creds")
    cmd += [f"oci:{layout_dir}:{tag}", f"docker://{dest_ref}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {res.stderr.strip()}")


def push_one_layer(layout_dir: Path, dest_ref: str, *, tag: str = "latest") -> dict[str, Any]:
    """Push a one-layer image (digests kept) and say what the registry now holds:
    ``manifest`` (its digest), ``digest`` (the layer's) and ``blob`` (the layer's bytes)."""
    push_oci_layout(layout_dir, dest_ref, tag=tag)
    layout = Layout(Path(layout_dir))
    manifest = layout.find(tag).digest
    digest = layout.manifest(tag).layers[0].digest
    return {"manifest": manifest, "digest": digest, "blob": layout.read_blob(digest)}
