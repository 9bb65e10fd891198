"""Write a mount's upper directory as an uncompressed OCI layer tar (``lazyfs commit``).

The tar is written here, header by header, rather than through :mod:`tarfile`: PAX records must
carry raw bytes as Go's archive/tar (containerd) writes them - binary xattrs such as
``security.capability`` would otherwise need ``hdrcharset=BINARY``, which GNU tar warns about -
and whiteouts, kept in the upper directory under the name they hide, become OCI ``.wh.NAME``
entries, whose names can exceed 255 bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from lazyfs.fs.upper import _PIN, _RDIR, Upper, _proc_fd, is_whiteout_at, reserved_xattr

BLOCK = 512
_REG, _LNK, _SYM, _CHR, _BLK, _DIR, _FIFO, _PAX = b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"
# Octal header fields hold at most this many digits (the last byte is NUL); larger values go
# in a PAX record.
_LIMITS = {8: 0o7777777, 12: 0o77777777777}
# xattrs that describe the host, not the image: SELinux labels are reassigned on unpack.
_SKIP_XATTRS = frozenset({"security.selinux"})


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_records(records: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for key, value in records:
        body = b" " + key.encode("utf-8") + b"=" + value + b"\n"
        size = len(body) + 1  # the length prefix counts its own digits: find the fixpoint
        while len(str(size)) + len(body) != size:
            size = len(str(size)) + len(body)
        out += str(size).encode("ascii") + body
    return bytes(out)


def _pad(n: int) -> bytes:
    return bytes(-n % BLOCK)


class TarWriter:
    """A PAX tar stream: ustar headers, a PAX extended header before any entry whose name,
    link, numbers or xattrs do not fit one.  Deterministic: no user/group names, no atime."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def _header(self, name: bytes, kind: bytes, fields: dict[str, int], link: bytes) -> bytes:
        h = bytearray(BLOCK)
        h[0:100] = name[:100].ljust(100, b"\0")
        h[100:108] = _octal(fields.get("mode", 0), 8)
        h[108:116] = _octal(fields.get("uid", 0), 8)
        h[116:124] = _octal(fields.get("gid", 0), 8)
        h[124:136] = _octal(fields.get("size", 0), 12)
        h[136:148] = _octal(fields.get("mtime", 0), 12)
        h[148:156] = b" " * 8
        h[156:157] = kind
        h[157:257] = link[:100].ljust(100, b"\0")
        h[257:265] = b"ustar\x0000"
        h[329:337] = _octal(fields.get("devmajor", 0), 8)
        h[337:345] = _octal(fields.get("devminor", 0), 8)
        h[148:156] = b"%06o\0 " % sum(h)
        return bytes(h)

    def add(
        self,
        name: str,
        kind: bytes,
        st: os.stat_result,
        *,
        size: int = 0,
        link: str = "",
        xattrs: list[tuple[str, bytes]] | None = None,
        data: BinaryIO | None = None,
    ) -> None:
        if kind == _DIR:
            name += "/"
        raw_name = os.fsencode(name)
        raw_link = os.fsencode(link)
        records: list[tuple[str, bytes]] = []
        if len(raw_name) > 100 or not raw_name.isascii():
            records.append(("path", raw_name))
        if len(raw_link) > 100 or not raw_link.isascii():
            records.append(("linkpath", raw_link))
        sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        fields = {
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": size,
            "mtime": sec,
        }
        if kind in (_CHR, _BLK):
            fields["devmajor"], fields["devminor"] = os.major(st.st_rdev), os.minor(st.st_rdev)
        for key in ("uid", "gid", "size", "mtime", "devmajor", "devminor"):
            value = fields.get(key, 0)
            if value < 0 or value > _LIMITS[12 if key in ("size", "mtime") else 8]:
                if key.startswith("dev"):
                    raise OSError(errno.EOVERFLOW, "device number too large for a tar", name)
                records.append((key, str(value).encode("ascii")))
                fields[key] = 0
        if nsec and sec >= 0:
            records.append(("mtime", f"{sec}.{nsec:09d}".encode("ascii")))  # exact, no float
        records += [(f"SCHILY.xattr.{k}", v) for k, v in xattrs or ()]
        if records:
            payload = _pax_records(sorted(dict(records).items()))
            self.f.write(self._header(b"././@PaxHeader", _PAX, {"size": len(payload)}, b""))
            self.f.write(payload + _pad(len(payload)))
        self.f.write(self._header(raw_name, kind, fields, raw_link))
        if data is not None:
            left = size
            while left:
                piece = data.read(min(left, 1024 * 1024))
                if not piece:
                    raise OSError(errno.EAGAIN, "upper changed during commit", name)
                self.f.write(piece)
                left -= len(piece)
            self.f.write(_pad(size))

    def close(self) -> None:
        self.f.write(bytes(2 * BLOCK))


def _tar_order(name: str) -> tuple[int, bytes]:
    # Markers first: an applier that processes ".wh.x" after a same-layer "x" would delete the
    # new "x" (containerd removes the path a whiteout names).  Bytes order is locale-proof.
    rank = 0 if name == Upper.OPAQUE else 1 if Upper.is_marker(name) else 2
    return rank, os.fsencode(name)


def _listing(dfd: int) -> list[tuple[str, str]]:
    """(tar name, name in the directory) of what to archive, reversed for list.pop()."""
    out: list[tuple[str, str]] = []
    for name in os.listdir(dfd):
        if Upper.is_temp(name):
            continue
        tar_name = name
        if not Upper.is_marker(name):
            pin = os.open(name, _PIN, dir_fd=dfd)
            try:
                if is_whiteout_at(pin):
                    tar_name = Upper.WHITEOUT_PREFIX + name
            finally:
                os.close(pin)
        out.append((tar_name, name))
    return sorted(out, key=lambda t: _tar_order(t[0]), reverse=True)


def _xattrs(pin: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    proc = _proc_fd(pin)  # the pinned inode itself, never a path re-walk
    for key in sorted(os.listxattr(proc)):
        if key in _SKIP_XATTRS or reserved_xattr(key):
            continue
        try:
            out.append((key, os.getxattr(proc, key)))
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return out


def _write_tree(tar: TarWriter, root_fd: int) -> None:
    seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> first archived name
    # Frames: (directory fd, archive prefix, entries left).  Depth-first, pre-order.
    stack: list[tuple[int, str, list[tuple[str, str]]]] = [(os.dup(root_fd), "", [])]
    stack[0][2].extend(_listing(root_fd))
    try:
        while stack:
            dfd, prefix, names = stack[-1]
            if not names:
                stack.pop()
                os.close(dfd)
                continue
            tar_name, name = names.pop()
            arcname = prefix + tar_name
            pin = os.open(name, _PIN, dir_fd=dfd)
            try:
                st = os.fstat(pin)
                kind = stat.S_IFMT(st.st_mode)
                if tar_name != name:  # a whiteout
                    tar.add(arcname, _REG, st)
                    continue
                if kind == stat.S_IFSOCK:
                    continue  # tar has no socket type; GNU tar skips them too
                key = (st.st_dev, st.st_ino)
                if kind != stat.S_IFDIR and st.st_nlink > 1:
                    if key in seen:
                        tar.add(arcname, _LNK, st, link=seen[key])
                        continue
                    seen[key] = arcname
                xattrs = _xattrs(pin)
                if kind == stat.S_IFREG:
                    with open(_proc_fd(pin), "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        tar.add(arcname, _REG, st, size=size, xattrs=xattrs, data=f)
                elif kind == stat.S_IFDIR:
                    tar.add(arcname, _DIR, st, xattrs=xattrs)
                    sub = os.open(name, _RDIR, dir_fd=dfd)
                    try:
                        if not os.path.samestat(os.fstat(sub), st):
                            raise OSError(errno.EAGAIN, "upper changed during commit", arcname)
                        frame = (sub, arcname + "/", _listing(sub))
                    except BaseException:
                        os.close(sub)
                        raise
                    stack.append(frame)
                elif kind == stat.S_IFLNK:
                    link = os.readlink(name, dir_fd=dfd)
                    tar.add(arcname, _SYM, st, link=link, xattrs=xattrs)
                elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                    tar.add(arcname, _CHR if kind == stat.S_IFCHR else _BLK, st, xattrs=xattrs)
                elif kind == stat.S_IFIFO:
                    tar.add(arcname, _FIFO, st, xattrs=xattrs)
            finally:
                os.close(pin)
    finally:
        for dfd, *_ in stack:
            os.close(dfd)


def commit_layer(upper_root: str | os.PathLike[str], out_tar: str | os.PathLike[str]) -> None:
    """Write the upper directory as an uncompressed OCI layer tar (PAX).

    Deterministic: entries depth-first, markers then names in byte order within a directory,
    no user/group names, no atime/ctime.  The upper root itself is not an entry.  Hardlinks are
    found by (st_dev, st_ino); xattrs become SCHILY.xattr.* (minus host-only ones); whiteouts
    become OCI ``.wh.NAME`` entries and the opaque marker is kept; temp names and sockets are
    skipped.  Symlinks are archived, never followed.  The tar is written to a temp file next to
    ``out_tar`` and renamed, so a failure leaves no partial output.  Quiesce the mount first.
    """
    out = Path(out_tar)
    real_root = os.path.realpath(upper_root)
    real_dir = os.path.realpath(out.parent)
    if real_dir == real_root or real_dir.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError("the layer tar cannot be written inside the upper directory")
    root_fd = os.open(upper_root, _RDIR)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                tar = TarWriter(f)
                _write_tree(tar, root_fd)
                tar.close()
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        os.close(root_fd)
