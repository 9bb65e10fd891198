# ruff: noqa: F811  (pytest fixtures imported by name are redefined as parameters)
"""lazyfs.remote against a real docker-registry on 127.0.0.1 (see lazyfs/testing/dockerregistry.py).

Images are tiny OCI layouts built here and pushed with skopeo; faults come from
lazyfs/testing/faultproxy.py.  Retries use millisecond delays so the file stays fast.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import socket
import tarfile
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from lazyfs import oci
from lazyfs.errors import FormatError, IntegrityError, NotFoundError, RemoteError
from lazyfs.remote.auth import Credentials, load_docker_credentials, parse_challenge
from lazyfs.remote.local import BlobFileSource, OCILayoutSource
from lazyfs.remote.reference import Reference, parse_reference
from lazyfs.remote.registry import RECV_BYTES, RegistrySource, RetryPolicy
from lazyfs.remote.resolve import open_source, resolve_image
from lazyfs.testing.dockerregistry import RegistryInstance, push_oci_layout
from lazyfs.testing.faultproxy import FaultProxy
from lazyfs.testing.server import listening_port, refusing_port
from lazyfs.testing.tokenserver import TokenServer
from tests.support.fixtures import (  # noqa: F401
    HTPASSWD_USER,
    TOKEN_USER,
    fault_proxy,
    htpasswd_registry,
    registry,
    token_registry,
    token_server,
)

T = TypeVar("T")
FAST = RetryPolicy(attempts=4, base_delay=0.005, max_delay=0.02, max_retry_after=0.05)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


# -- building images -------------------------------------------------------------------------


def _blob(layout: Path, data: bytes) -> str:
    digest = oci.sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _layer(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(raw.getvalue(), mtime=0)


def _image(layout: Path, arch: str, payload: bytes) -> oci.Descriptor:
    layer = _layer({"hello.txt": payload, "arch": arch.encode()})
    diff_id = oci.sha256_digest(gzip.decompress(layer))
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_OCI_MANIFEST,
            "config": {
                "mediaType": oci.MT_OCI_CONFIG,
                "digest": _blob(layout, config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": oci.MT_LAYER_GZIP, "digest": _blob(layout, layer), "size": len(layer)}
            ],
        }
    ).encode()
    return oci.Descriptor(
        oci.MT_OCI_MANIFEST,
        _blob(layout, manifest),
        len(manifest),
        platform=oci.Platform(architecture=arch, os="linux"),
    )


def _write_index(layout: Path, manifests: list[dict[str, object]]) -> None:
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": manifests}
    (layout / "index.json").write_text(json.dumps(index))


def _desc(d: oci.Descriptor, tag: str | None = None) -> dict[str, object]:
    out: dict[str, object] = json.loads(oci.msgspec.json.encode(d))
    if tag:
        out["annotations"] = {oci.ANN_REF_NAME: tag}
    return out


PAYLOAD = os.urandom(200_000)  # incompressible, so the layer blob is big enough for ranges


def build_single(layout: Path) -> oci.Descriptor:
    desc = _image(layout, "amd64", PAYLOAD)
    plain = _desc(desc, "v1")
    plain.pop("platform")
    _write_index(layout, [plain])
    return desc


def build_multi(layout: Path) -> str:
    """Two images under one OCI index tagged ``multi``; returns the index digest."""
    amd = _image(layout, "amd64", b"amd64 payload")
    arm = _image(layout, "arm64", b"arm64 payload")
    inner = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": [_desc(amd), _desc(arm)]}
    ).encode()
    digest = _blob(layout, inner)
    _write_index(
        layout,
        [
            {
                "mediaType": oci.MT_OCI_INDEX,
                "digest": digest,
                "size": len(inner),
                "annotations": {oci.ANN_REF_NAME: "multi"},
            }
        ],
    )
    return digest


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, oci.Descriptor]:
    d = tmp_path_factory.mktemp("layout")
    return d, build_single(d)


@pytest.fixture(scope="module")
def pushed(
    registry: RegistryInstance,
    layout: tuple[Path, oci.Descriptor],
) -> tuple[RegistryInstance, oci.Descriptor]:
    push_oci_layout(layout[0], f"{registry.host}/app:v1", tag="v1")
    return registry, layout[1]


@pytest.fixture(scope="module")
def htpasswd_pushed(
    htpasswd_registry: RegistryInstance, layout: tuple[Path, oci.Descriptor]
) -> RegistryInstance:
    push_oci_layout(layout[0], f"{htpasswd_registry.host}/app:v1", tag="v1", creds=HTPASSWD_USER)
    return htpasswd_registry


@pytest.fixture(scope="module")
def token_pushed(
    token_registry: RegistryInstance, layout: tuple[Path, oci.Descriptor]
) -> RegistryInstance:
    push_oci_layout(layout[0], f"{token_registry.host}/app:v1", tag="v1", creds=TOKEN_USER)
    return token_registry


def source(host: str, **kw: object) -> RegistrySource:
    return RegistrySource(host, "app", plain_http=True, retry=FAST, **kw)  # type: ignore[arg-type]


async def _layer_checks(src: RegistrySource, ref: str = "v1") -> None:
    img = await resolve_image(src, ref)
    assert img.config.architecture == "amd64"
    layer = img.layers[0]
    blob = await src.get_blob(layer.digest)
    assert len(blob) == layer.size
    for start, end in [(0, 1), (10, 5000), (layer.size - 100, layer.size), (7, 7)]:
        assert await src.read_range(layer.digest, start, end) == blob[start:end]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.extractfile("hello.txt")
        assert member is not None and member.read() == PAYLOAD


# -- references, challenges, credentials (unit) --------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", Reference("registry-1.docker.io", "library/alpine", "latest")),
        ("user/app:1.2", Reference("registry-1.docker.io", "user/app", "1.2")),
        ("docker.io/nginx:x", Reference("registry-1.docker.io", "library/nginx", "x")),
        ("localhost/a/b", Reference("localhost", "a/b", "latest")),
        ("127.0.0.1:5000/app:v1", Reference("127.0.0.1:5000", "app", "v1")),
        ("ghcr.io/o/r@sha256:" + "a" * 64, Reference("ghcr.io", "o/r", None, "sha256:" + "a" * 64)),
        ("h:1/r:t@sha256:" + "b" * 64, Reference("h:1", "r", "t", "sha256:" + "b" * 64)),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    ref = parse_reference(text)
    assert ref == expected
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("bad", ["", "UPPER/x", "a/b:bad tag", "x@sha256:12", "a//b"])
def test_parse_reference_rejects(bad: str) -> None:
    with pytest.raises(FormatError):
        parse_reference(bad)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="http://h/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "http://h/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }


def test_docker_config_formats(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    auths = {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
        "reg.example:5000": {"username": "u", "password": "p"},
    }
    cfg.write_text(json.dumps({"auths": auths}))
    assert load_docker_credentials("registry-1.docker.io", cfg) == Credentials(
        "hub", "pw:with:colons"
    )
    assert load_docker_credentials("reg.example:5000", cfg) == Credentials("u", "p")
    assert load_docker_credentials("other", cfg) is None
    assert load_docker_credentials("x", tmp_path / "missing.json") is None


# -- pulling from the real registry ---------------------------------------------------------


def test_anonymous_pull(pushed: tuple[RegistryInstance, oci.Descriptor]) -> None:
    reg, desc = pushed

    async def main() -> None:
        src = source(reg.host)
        try:
            await _layer_checks(src)
            # By digest too, and the digest is verified.
            _, mt, digest = await src.get_manifest(desc.digest)
            assert (mt, digest) == (oci.MT_OCI_MANIFEST, desc.digest)
            assert src.stats.requests > 0 and src.stats.bytes_received > desc.size
            assert src.ranges_supported()
            with pytest.raises(NotFoundError):
                await src.get_manifest("nope")
            with pytest.raises(NotFoundError):
                await src.get_blob("sha256:" + "0" * 64)
        finally:
            await src.aclose()

    run(main)


def test_open_source_registry(pushed: tuple[RegistryInstance, oci.Descriptor]) -> None:
    reg, desc = pushed

    async def main() -> None:
        src, ref = open_source(f"{reg.host}/app:v1", plain_http=True)
        assert isinstance(src, RegistrySource) and ref == "v1"
        img = await resolve_image(src, ref)
        assert img.manifest_digest == desc.digest
        await src.aclose()

    run(main)


def test_registry_port_cannot_be_taken_first(tmp_path: Path) -> None:
    """Another process holding the port a chooser would pick does not stop a registry: it
    listens where the kernel puts it and reports that port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with RegistryInstance(tmp_path) as reg:
            assert reg.port not in (0, port) and reg.pid is not None
            assert listening_port(reg.pid) == reg.port
            with urllib.request.urlopen(f"{reg.url}/v2/", timeout=5) as resp:
                assert resp.status == 200


def test_platform_selection(registry: RegistryInstance, tmp_path: Path) -> None:
    index_digest = build_multi(tmp_path)
    push_oci_layout(tmp_path, f"{registry.host}/app:multi", tag="multi", all_images=True)

    async def main() -> None:
        src = source(registry.host)
        arm = await resolve_image(src, "multi", platform="linux/arm64")
        assert arm.config.architecture == "arm64" and arm.index_digest == index_digest
        amd = await resolve_image(src, "multi")
        assert amd.config.architecture == "amd64"
        with pytest.raises(NotFoundError, match=r"linux/amd64, linux/arm64"):
            await resolve_image(src, "multi", platform="linux/s390x")
        await src.aclose()

    run(main)


# -- auth --------------------------------------------------------------------------------------


def test_htpasswd_basic_auth(
    htpasswd_pushed: RegistryInstance,
    tmp_path: Path,
) -> None:
    host = htpasswd_pushed.host

    async def main() -> None:
        src = source(host, credentials=Credentials(*HTPASSWD_USER))
        await _layer_checks(src)
        await src.aclose()
        for creds in (None, Credentials("alice", "wrong")):
            bad = source(host, credentials=creds, docker_config=tmp_path / "none.json")
            with pytest.raises(RemoteError, match=r"auth|denied"):
                await bad.get_manifest("v1")
            await bad.aclose()
        # Credentials from a docker config.json, found by host.
        cfg = tmp_path / "config.json"
        token = base64.b64encode(":".join(HTPASSWD_USER).encode()).decode()
        cfg.write_text(json.dumps({"auths": {host: {"auth": token}}}))
        src2, ref = open_source(f"{host}/app:v1", plain_http=True, docker_config=cfg)
        assert isinstance(src2, RegistrySource)
        src2.retry = FAST
        await _layer_checks(src2, ref)
        await src2.aclose()

    run(main)


def test_bearer_token_auth(
    token_pushed: RegistryInstance,
    token_server: TokenServer,
) -> None:

    async def main() -> None:
        src = source(token_pushed.host, credentials=Credentials(*TOKEN_USER))
        await _layer_checks(src)
        # One challenge, one token for the repository scope, then cache hits.
        assert src._authenticator(src.endpoints[0]).tokens_fetched == 1
        before = len(token_server.requests)
        await src.read_range(src_layer := (await resolve_image(src, "v1")).layers[0].digest, 0, 9)
        assert src_layer and len(token_server.requests) == before
        await src.aclose()
        bad = source(token_pushed.host, credentials=Credentials("bob", "nope"))
        with pytest.raises(RemoteError, match="refused"):
            await bad.get_manifest("v1")
        await bad.aclose()

    run(main)


def test_token_expiry_refetches(
    token_pushed: RegistryInstance,
    token_server: TokenServer,
) -> None:

    async def main() -> None:
        src = source(token_pushed.host, credentials=Credentials(*TOKEN_USER))
        await src.get_manifest("v1")
        auth = src._authenticator(src.endpoints[0])
        for tok in auth._tokens.values():
            tok.expires = 0.0  # as if expires_in had run out
        await src.get_manifest("v1")
        assert auth.tokens_fetched == 2
        await src.aclose()

    run(main)



def test_short_lived_tokens_are_used_and_renewed(
    token_pushed: RegistryInstance,
    token_server: TokenServer,
) -> None:
    """A token living less than the renewal margin (here 2 s) is still sent, then renewed."""
    lifetime, token_server.expires_in = token_server.expires_in, 2

    async def main() -> None:
        src = source(token_pushed.host, credentials=Credentials(*TOKEN_USER))
        await src.get_manifest("v1")
        auth = src._authenticator(src.endpoints[0])
        assert auth.tokens_fetched == 1
        await src.get_manifest("v1")  # within its life: reused
        assert auth.tokens_fetched == 1
        await trio.sleep(2.0)
        await src.get_manifest("v1")
        assert auth.tokens_fetched == 2
        await src.aclose()

    try:
        run(main)
    finally:
        token_server.expires_in = lifetime

# -- hosts.toml --------------------------------------------------------------------------------


def test_hosts_toml_mirror_down_falls_back(
    pushed: tuple[RegistryInstance, oci.Descriptor], tmp_path: Path
) -> None:
    reg, _ = pushed
    with refusing_port() as port:
        _mirror_down_falls_back(reg, f"127.0.0.1:{port}", tmp_path)


def _mirror_down_falls_back(reg: RegistryInstance, dead: str, tmp_path: Path) -> None:
    (tmp_path / reg.host).mkdir()
    (tmp_path / reg.host / "hosts.toml").write_text(
        f'server = "http://{reg.host}"\n\n'
        f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n'
    )

    async def main() -> None:
        src = RegistrySource(reg.host, "app", hosts_dir=tmp_path, retry=FAST)
        assert [e.netloc for e in src.endpoints] == [dead, reg.host]
        await _layer_checks(src)
        assert src.stats.retries == 0  # the dead mirror cost no backoff sleep
        await src.aclose()

    run(main)


# -- faults ------------------------------------------------------------------------------------


def _apply(proxy: FaultProxy, fault: str) -> None:
    match fault:
        case "503":
            proxy.fail_next(2, 503)
        case "429":
            proxy.fail_next(2, 429, retry_after="1")
        case "drop":
            proxy.drop_next(2)
        case "truncate":
            proxy.truncate_next(2)
        case "ignore_range":
            proxy.ignore_range = True
        case "no_content_length":
            proxy.no_content_length = True
        case "flip":
            proxy.flip_next(1)


@pytest.mark.parametrize(
    "fault", ["503", "429", "drop", "truncate", "ignore_range", "no_content_length", "flip"]
)
def test_fault_recovery(
    pushed: tuple[RegistryInstance, oci.Descriptor],
    fault_proxy: FaultProxy,
    fault: str,
) -> None:
    async def main() -> None:
        src = source(fault_proxy.host)
        img = await resolve_image(src, "v1")
        layer = img.layers[0]
        reference = await src.get_blob(layer.digest)
        if fault == "flip":
            # Ranges are verified by the caller (chunk digests); the source passes bytes on.
            _apply(fault_proxy, fault)
            assert await src.read_range(layer.digest, 0, 100) != reference[:100]
        else:
            for start, end in [(0, 100), (5000, 150_000), (layer.size - 10, layer.size)]:
                _apply(fault_proxy, fault)
                got = await src.read_range(layer.digest, start, end)
                assert got == reference[start:end], fault
        _apply(fault_proxy, fault)
        assert await src.get_blob(layer.digest) == reference  # whole blobs are verified
        if fault == "ignore_range":
            assert src.range_ignored and not src.ranges_supported()
            # The whole blob came back, but only what was needed was read before closing:
            # one read of what the socket held, at most RECV_BYTES (this blob is smaller; a larger
            # one: test_multirange.test_a_whole_blob_answer_is_not_read_through).
            before = src.stats.bytes_received
            assert await src.read_range(layer.digest, 0, 100) == reference[:100]
            assert src.stats.bytes_received - before <= max(100, RECV_BYTES)
        await src.aclose()

    run(main)


@pytest.mark.parametrize("status", [503, 429])
def test_persistent_failure_is_one_clean_error(
    pushed: tuple[RegistryInstance, oci.Descriptor],
    fault_proxy: FaultProxy,
    status: int,
) -> None:
    async def main() -> None:
        src = source(fault_proxy.host)
        img = await resolve_image(src, "v1")
        fault_proxy.fail_next(100, status, retry_after="0")
        seen = fault_proxy.requests
        with pytest.raises(RemoteError) as info:
            await src.read_range(img.layers[0].digest, 0, 10)
        assert "\n" not in str(info.value) and str(status) in str(info.value)
        assert fault_proxy.requests - seen == FAST.attempts
        await src.aclose()

    run(main)


def test_corrupt_blob_never_returned(
    pushed: tuple[RegistryInstance, oci.Descriptor],
    fault_proxy: FaultProxy,
) -> None:
    async def main() -> None:
        src = source(fault_proxy.host)
        img = await resolve_image(src, "v1")
        fault_proxy.flip_next(100)
        with pytest.raises(RemoteError, match="has digest"):
            await src.get_blob(img.layers[0].digest)
        await src.aclose()

    run(main)


def test_redirect_drops_authorization(
    htpasswd_pushed: RegistryInstance,
) -> None:
    with FaultProxy(htpasswd_pushed.url) as front, FaultProxy(htpasswd_pushed.url) as storage:
        # The "storage backend" authorises by URL, like a presigned S3 link.
        storage.upstream_auth = (
            "Basic " + base64.b64encode(":".join(HTPASSWD_USER).encode()).decode()
        )
        front.redirect_to = storage.url

        async def main() -> None:
            src = source(front.host, credentials=Credentials(*HTPASSWD_USER))
            await _layer_checks(src)
            await src.aclose()

        run(main)
        assert storage.requests > 0 and all(a is None for a in storage.authorization)
        assert any(a and a.startswith("Basic ") for a in front.authorization)


# -- local sources -----------------------------------------------------------------------------


def test_oci_layout_source(layout: tuple[Path, oci.Descriptor], tmp_path: Path) -> None:
    directory, desc = layout

    async def main() -> None:
        src, ref = open_source(f"oci:{directory}:v1")
        assert isinstance(src, OCILayoutSource) and ref == "v1"
        img = await resolve_image(src, ref)
        assert img.manifest_digest == desc.digest
        # Sole manifest, asked for as "latest" without such a tag.
        img2 = await resolve_image(*open_source(f"oci:{directory}"))
        assert img2.manifest_digest == desc.digest
        layer = img.layers[0]
        blob = await src.get_blob(layer.digest)
        assert await src.read_range(layer.digest, 3, 300) == blob[3:300]
        with pytest.raises(NotFoundError, match="tags: v1"):
            await src.get_manifest("other")
        with pytest.raises(RemoteError):
            await src.read_range(layer.digest, 0, layer.size + 1)

        blob_file = tmp_path / "layer.tar.gz"
        blob_file.write_bytes(blob)
        bsrc = BlobFileSource(blob_file)
        assert await bsrc.read_range(layer.digest, 10, 20) == blob[10:20]
        assert await bsrc.get_blob(layer.digest) == blob
        with pytest.raises(IntegrityError):
            await bsrc.get_blob("sha256:" + "1" * 64)
        with pytest.raises(NotFoundError):
            await bsrc.get_manifest("latest")

    run(main)


def test_concurrent_reads_bounded(pushed: tuple[RegistryInstance, oci.Descriptor]) -> None:
    reg, _ = pushed

    async def main() -> None:
        src = RegistrySource(reg.host, "app", plain_http=True, retry=FAST, max_concurrency=2)
        img = await resolve_image(src, "v1")
        layer = img.layers[0]
        blob = await src.get_blob(layer.digest)
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await src.read_range(layer.digest, i * 1000, i * 1000 + 4096)

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(one, i)
        assert all(results[i] == blob[i * 1000 : i * 1000 + 4096] for i in range(30))
        assert src._limiter(reg.host).total_tokens == 2
        await src.aclose()

    run(main)


def test_hosts_toml_parsing(tmp_path: Path) -> None:
    from lazyfs.remote.hosts import load_endpoints

    d = tmp_path / "reg.example"
    d.mkdir()
    (d / "hosts.toml").write_text(
        'server = "https://reg.example"\n'
        '[host."https://mirror.example"]\n  capabilities = ["pull"]\n  ca = "mirror.crt"\n'
        '[host."http://127.0.0.1:5999/custom"]\n  override_path = true\n  skip_verify = true\n'
    )
    eps = load_endpoints("reg.example", tmp_path)
    assert [e.url for e in eps] == [
        "https://mirror.example/v2",
        "http://127.0.0.1:5999/custom",
        "https://reg.example/v2",
    ]
    assert eps[0].capabilities == {"pull"} and eps[0].ca == (str(d / "mirror.crt"),)
    assert eps[1].skip_verify and not eps[2].skip_verify
    assert [e.url for e in load_endpoints("other", tmp_path, plain_http=True)] == [
        "http://other/v2"
    ]


def test_default_tls_is_shared_and_loads_its_cas_only_for_a_handshake() -> None:
    """Clients share one verifying context whose CA bundle is parsed at the first TLS
    handshake: a plain-HTTP registry never pays for it, a fork server pays once."""
    import ssl
    import subprocess
    import sys

    import certifi

    from lazyfs.remote.registry import default_tls

    # A fresh interpreter: making a plain-HTTP source's client must not load the bundle.
    probe = (
        "from lazyfs.remote.registry import RegistrySource, default_tls\n"
        "s = RegistrySource('127.0.0.1:9', 'x', plain_http=True)\n"
        "c = s._client(s.endpoints[0])\n"
        "assert not default_tls().get_ca_certs(), 'CA bundle loaded for plain HTTP'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
    ctx = default_tls()
    assert default_tls() is ctx
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="registry.invalid")
    want = ssl.create_default_context(cafile=certifi.where())  # what httpx builds per client
    assert ctx.get_ca_certs() == want.get_ca_certs()
