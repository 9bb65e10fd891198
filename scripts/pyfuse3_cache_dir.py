"""Teach the installed pyfuse3 what lazyfs needs of the kernel: no OPENDIR, no OPEN, no FLUSH.

pyfuse3 (3.5) hands ``readdir``, ``read``, ``write``, ``flush``, ``fsync`` and ``release`` the
``fh`` that opendir or open answered, and no inode.  lazyfs keeps no per-open state: it answers
ENOSYS to the first OPENDIR and the first OPEN, and the kernel then sends neither again (its
``no_opendir`` and ``no_open``), nor RELEASEDIR or RELEASE, treats every directory as opened
with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR (its listing is cached) and every file with
FOPEN_KEEP_CACHE, and sends ``fh`` 0 with every later request.  The patched callbacks turn
``fh`` 0 into the inode with bit 61 set (``lazyfs.fs.ops.INO_FH``); the extension exports
``lazyfs_ino_fh`` (2: directories too) so that lazyfs can tell.  It also stops asking for
atomic O_TRUNC: without an OPEN the kernel would otherwise drop the truncation of
``open(O_TRUNC)``, which now always arrives as a SETATTR of size 0.

A second patch sets ``noflush`` on every answer to open and create: lazyfs's flush does
nothing (no writeback cache, no locks), yet the kernel waits for a FLUSH round trip on every
close(2), a third of the requests of a warm program start.

A third adds a reader thread in C (``lazyfs_reader_start``, called by lazyfs after
``pyfuse3.init``): it waits on /dev/fuse without the GIL and answers there what needs no Python
(IOCTL, which has no handler: ENOSYS, ENOTTY to the caller, one per isatty() of every open
file), and queues every other request for pyfuse3's workers, which then wait on an eventfd
instead of /dev/fuse.  Without it each of those requests woke the trio loop (about 0.1 ms
each).  ``close()`` stops and joins the thread before it unmounts; an unmount or abort (ENODEV)
ends it and, through the queue, the workers; the exported counters say how many requests each
side took.  While lazyfs says no file can have one (``lazyfs_no_capability``), it also answers
GETXATTR of security.capability (ENODATA), which the kernel asks before every write(2).
And while lazyfs has set a fast function (``lazyfs_set_fast``) and trio's thread waits for
events (it holds ``lazyfs_trio_lock`` otherwise, lazyfs.fs.fastpath), the reader calls that
function itself, under the GIL, for LOOKUP, GETATTR, READLINK, READ and READDIRPLUS, and writes
its reply: no wake-up of the trio thread, no trip through trio's scheduler (a fallback queues
as before).

A fourth lets lazyfs ask the kernel to keep symlinks' targets in their page cache
(FUSE_CAP_CACHE_SYMLINKS, when the exported ``lazyfs_cache_symlinks`` is set before
``pyfuse3.init``): without it every path walk through a symlink is a READLINK round trip (a
Debian start-up walks ``/lib`` ten times).  A symlink's target never changes: a new target is
a new inode.

It patches the C that Cython generated for the installed pyfuse3 (its wheel ships it), kept
unpatched beside it (``PRISTINE``) so that a newer set of patches starts from the original,
then rebuilds the extension with the flags recorded in that C file and replaces the installed
one atomically.  Idempotent; run by scripts/setup.sh.  A pyfuse3 patched by an older version
of this script (no pristine copy) is reinstalled first, by pip.

An unpatched pyfuse3 still works: lazyfs then answers OPENDIR and OPEN with the inode as
``fh``; listings are just not cached, every close costs a FLUSH, every opendir and every open
a round trip.

Usage: ``.venv/bin/python scripts/pyfuse3_cache_dir.py [--check]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

NOFLUSH_MARK = "/* lazyfs: noflush */"
# FileInfo._copy_to_fuse, which open and create answer through.
FILEINFO_FH = re.compile(r"^(\s*)__pyx_v_out->fh = __pyx_t_\d+;$", re.M)
INO_FH_MARK = "/* lazyfs: fh 0 -> inode */"
INO_FH = "(((uint64_t)1) << 61)"
# The callbacks whose Python handler gets an fh and no inode.
FH_CALLBACKS = ("readdirplus", "read", "write", "write_buf", "flush", "release", "fsync")
READER_MARK = "/* lazyfs: reader thread */"
SYMLINKS_MARK = "/* lazyfs: cache_symlinks flag */"
CAPABILITY_MARK = "/* lazyfs: no capability */"  # in READER_C
FAST_MARK = "/* lazyfs: fast path */"  # in READER_C
# Marks of patches this script no longer makes: a C file with one is re-patched from the original.
OLD_MARKS = ("/* lazyfs: cache_readdir, keep_cache */", "/* lazyfs: opendir in C */")
MARKS = (NOFLUSH_MARK, INO_FH_MARK, READER_MARK, SYMLINKS_MARK, CAPABILITY_MARK, FAST_MARK)
# Where the exported globals and the reader thread's C go: before the first callback.
GLOBALS_AT = "static void __pyx_f_7pyfuse3_fuse_opendir(fuse_req_t __pyx_v_req, fuse_ino_t __pyx_v_ino, struct fuse_file_info *__pyx_v_fi) {\n"  # noqa: E501
RECEIVE = "fuse_session_receive_buf(__pyx_v_7pyfuse3_session, "
UNMOUNT = "    fuse_session_unmount(__pyx_v_7pyfuse3_session);\n"
DESTROY = "  fuse_session_destroy(__pyx_v_7pyfuse3_session);\n"
# The reader thread's C (it starts with READER_MARK).
READER_C = Path(__file__).with_name("pyfuse3_reader.c")
ATOMIC_O_TRUNC = (
    "  __pyx_v_conn->want = (__pyx_v_conn->want & (~((unsigned int)FUSE_CAP_READDIRPLUS_AUTO)));\n"
)
# Where fuse_init is defined (what it reads goes before it).
INIT_AT = "static void __pyx_f_7pyfuse3_fuse_init(CYTHON_UNUSED void *__pyx_v_userdata, struct fuse_conn_info *__pyx_v_conn) {\n"  # noqa: E501
# The generated C as the wheel shipped it, kept beside the patched one.
PRISTINE = "lazyfs-pristine.c"


def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyfuse3")
    if spec is None or spec.origin is None:
        raise SystemExit("pyfuse3_cache_dir: pyfuse3 is not installed")
    return Path(spec.origin).parent


def patch_source(text: str) -> str:
    """The generated C with every patch (each applied once)."""
    return _patch_symlinks(_patch_reader(_patch_ino_fh(_patch_noflush(text))))


def _patch_symlinks(text: str) -> str:
    if SYMLINKS_MARK in text:
        return text
    if text.count(ATOMIC_O_TRUNC) != 1 or text.count(INIT_AT) != 1:
        raise SystemExit("pyfuse3_cache_dir: fuse_init is not the expected one")
    want = (
        f"  {SYMLINKS_MARK}\n"
        "  if (lazyfs_cache_symlinks && (__pyx_v_conn->capable & FUSE_CAP_CACHE_SYMLINKS))\n"
        "    __pyx_v_conn->want |= FUSE_CAP_CACHE_SYMLINKS;\n"
        # The fast path's replies are laid out for the kernel's protocol (READER_C).
        "  lazyfs_proto_minor = __pyx_v_conn->proto_minor;\n"
    )
    # Exported for ctypes, off until lazyfs sets it (lazyfs.fs.ops.cache_symlinks): a lazyfs
    # that does not know it keeps the kernel's default, so an older tree measures as it was.
    flag = f"{SYMLINKS_MARK}\nint lazyfs_cache_symlinks = 0;\nint lazyfs_proto_minor = 0;\n\n"
    text = text.replace(INIT_AT, flag + INIT_AT)
    return text.replace(ATOMIC_O_TRUNC, ATOMIC_O_TRUNC + want)


def _patch_reader(text: str) -> str:
    if READER_MARK in text:
        return text
    for s in (GLOBALS_AT, RECEIVE, UNMOUNT, DESTROY):
        if text.count(s) != 1:
            raise SystemExit(f"pyfuse3_cache_dir: {s.strip()[:40]!r} is not the expected one")
    text = text.replace(GLOBALS_AT, READER_C.read_text() + "\n" + GLOBALS_AT)
    text = text.replace(RECEIVE, "lazyfs_receive_buf(__pyx_v_7pyfuse3_session, ")
    # Joined before the unmount closes the fd it polls, and before the session goes (the
    # second call does nothing).
    stop = f"  lazyfs_reader_stop(); {READER_MARK}\n"
    return text.replace(UNMOUNT, stop + UNMOUNT).replace(DESTROY, stop + DESTROY)


def _patch_ino_fh(text: str) -> str:
    if INO_FH_MARK in text:
        return text
    for name in FH_CALLBACKS:
        head = re.compile(
            rf"^static void __pyx_f_7pyfuse3_fuse_{name}\(fuse_req_t __pyx_v_req, "
            r"(CYTHON_UNUSED )?fuse_ino_t __pyx_v_ino, [^)]*struct fuse_file_info \*__pyx_v_fi"
            r"[^)]*\) \{\n",
            re.M,
        )
        if len(head.findall(text)) != 1:
            raise SystemExit(f"pyfuse3_cache_dir: fuse_{name} is not the expected one")
        fix = (
            f"  {INO_FH_MARK}\n"
            f"  if (__pyx_v_fi->fh == 0) __pyx_v_fi->fh = {INO_FH} | __pyx_v_ino;\n"
        )
        m = head.search(text)
        assert m is not None
        text = text[: m.end()] + fix + text[m.end() :]
    if text.count(ATOMIC_O_TRUNC) != 1 or text.count(GLOBALS_AT) != 1:
        raise SystemExit("pyfuse3_cache_dir: fuse_init or fuse_opendir is not the expected one")
    no_trunc = f"  {INO_FH_MARK}\n  __pyx_v_conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;\n"
    text = text.replace(ATOMIC_O_TRUNC, ATOMIC_O_TRUNC + no_trunc)
    # Exported for ctypes: its value says which requests' fh 0 arrives as the inode (2: readdir
    # too, so that lazyfs may answer ENOSYS to OPENDIR).
    return text.replace(GLOBALS_AT, f"{INO_FH_MARK}\nint lazyfs_ino_fh = 2;\n\n{GLOBALS_AT}")


def _patch_noflush(text: str) -> str:
    if NOFLUSH_MARK in text:
        return text
    matches = list(FILEINFO_FH.finditer(text))
    if len(matches) != 1:
        raise SystemExit("pyfuse3_cache_dir: could not find FileInfo's fh assignment")
    m = matches[0]
    patch = f"{m.group(0)}\n{m.group(1)}{NOFLUSH_MARK} __pyx_v_out->noflush = 1;"
    return text[: m.start()] + patch + text[m.end() :]


def build(src: Path, out: Path) -> None:
    meta = src.read_text().split("/* BEGIN: Cython Metadata", 1)[1].split("END: Cython", 1)[0]
    dist = json.loads(meta)["distutils"]
    cc = os.environ.get("CC", "cc")
    cmd = [
        cc, "-shared", "-fPIC", "-O2",
        f"-I{sysconfig.get_paths()['include']}", f"-I{src.parent}",
        *[a for a in dist["extra_compile_args"] if not a.startswith("-W")],
        "-w", str(src), "-o", str(out), *dist["extra_link_args"],
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def original_source(pkg: Path) -> str:
    """The generated C before any patch: the pristine copy, else the installed file if no
    patch touched it (then kept as the copy), else pyfuse3 reinstalled (same version)."""
    src, pristine = pkg / "__init__.c", pkg / PRISTINE
    if pristine.exists():
        return pristine.read_text()
    text = src.read_text()
    if any(mark in text for mark in (*MARKS, *OLD_MARKS)):
        from importlib.metadata import version

        pin = f"pyfuse3=={version('pyfuse3')}"
        print(f"pyfuse3_cache_dir: reinstalling {pin} to patch it afresh")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps"]
        subprocess.run([*pip, pin], check=True)
        text = src.read_text()
    tmp = pristine.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, pristine)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 unless the patch is installed")
    args = p.parse_args()
    pkg = package_dir()
    src = pkg / "__init__.c"
    if not src.exists():
        raise SystemExit(f"pyfuse3_cache_dir: {src.name} missing from the installed pyfuse3")
    stamp = pkg / "lazyfs-cache-dir.built"
    text = src.read_text()
    (so,) = [f for f in pkg.glob("__init__.*.so")]
    patched = all(m in text for m in MARKS) and not any(m in text for m in OLD_MARKS)
    current = patched and stamp.exists() and stamp.read_text() == str(so.stat().st_mtime_ns)
    if args.check:
        print("patched" if current else "not patched")
        return 0 if current else 1
    if current:
        return 0
    src.write_text(patch_source(original_source(pkg)))
    (so,) = [f for f in pkg.glob("__init__.*.so")]  # a reinstall may have replaced it
    with tempfile.TemporaryDirectory(dir=pkg) as tmp:
        built = Path(tmp) / so.name
        build(src, built)
        os.replace(built, so)
    stamp.write_text(str(so.stat().st_mtime_ns))
    print(
        f"pyfuse3_cache_dir: rebuilt {so.name} with no_opendir/no_open, noflush, reader thread, "
        "cached symlinks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
