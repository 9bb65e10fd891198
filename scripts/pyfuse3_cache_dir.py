"""Let pyfuse3 ask the kernel to cache listings (FOPEN_CACHE_DIR) and skip FLUSH (FOPEN_NOFLUSH).

pyfuse3 (3.5) copies only ``fh`` from ``Operations.opendir``'s answer into libfuse's
``fuse_file_info``, so a filesystem cannot set ``cache_readdir``, and every ``ls``, ``find`` or
``du`` of an unchanged directory costs a round of READDIRPLUS requests.  The kernel's other way
to cache listings (answering ENOSYS to OPENDIR) is out of reach too: pyfuse3 then hands readdir
``fh=0`` and no inode, so it could not tell directories apart.

This patches the C that Cython generated for the installed pyfuse3 (its wheel ships it): an
``fh`` with bit 63 set turns on ``cache_readdir`` and ``keep_cache`` (without it, every
opendir drops the cached listing with the directory's pages) and is passed on without that bit
(``lazyfs.fs.ops.CACHE_DIR_FH``).  It then rebuilds the extension with the flags recorded in
that C file and replaces the installed one atomically.  Idempotent; run by scripts/setup.sh.

A second patch sets ``noflush`` on every answer to open and create: lazyfs's flush does
nothing (no writeback cache, no locks), yet the kernel waits for a FLUSH round trip on every
close(2), a third of the requests of a warm program start.

A third lets lazyfs answer OPENDIR and RELEASEDIR of unchanged lower directories in C, without
a round trip through Python and trio (two of them per directory per ``find``): the extension
exports ``lazyfs_cached_dirs`` (a byte per inode, 1 = answer in C) and its length, which
lazyfs sets through ctypes (``lazyfs.fs.ops.CDirs``).  Such an opendir's ``fh`` is the inode with
bit 62 set (``C_DIR_FH``), with cache_readdir and keep_cache; its releasedir is answered in C.

A fourth lets lazyfs answer ENOSYS to OPEN (the kernel's ``no_open``: from then on it sends
no OPEN and no RELEASE for files and hands every READ, WRITE, FLUSH and FSYNC ``fh`` 0).
pyfuse3's read, write, flush, fsync and release get no inode, so the patched callbacks turn
``fh`` 0 into the inode with bit 61 set (``lazyfs.fs.ops.INO_FH``); the extension exports
``lazyfs_ino_fh`` so that lazyfs can tell.  It also stops asking for atomic O_TRUNC: without
an OPEN the kernel would otherwise drop the truncation of ``open(O_TRUNC)``, which now always
arrives as a SETATTR of size 0.

A fifth adds a reader thread in C (``lazyfs_reader_start``, called by lazyfs after
``pyfuse3.init``): it waits on /dev/fuse without the GIL and answers there what needs no Python
(IOCTL, which has no handler: ENOSYS, ENOTTY to the caller, one per isatty() of every open file;
OPENDIR of a directory in the C table and RELEASEDIR of its handles), and queues every other
request for pyfuse3's workers, which then wait on an eventfd instead of /dev/fuse.  Without it
each of those requests woke the trio loop (about 0.1 ms each).  ``close()`` stops and joins the
thread before it unmounts; an unmount or abort (ENODEV) ends it and, through the queue, the
workers; the exported counters say how many requests each side took.

An unpatched pyfuse3 still works (lazyfs masks the bit itself); listings are just not cached,
every close costs a FLUSH, every opendir and every open a round trip.

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

MARK = "/* lazyfs: cache_readdir, keep_cache */"
ASSIGN = re.compile(r"^(\s*)(__pyx_cur_scope->__pyx_v_c->fi\.fh = (__pyx_t_\d+);)$", re.M)
OPENDIR = "c.fi.fh = await operations.opendir(c.ino, ctx)"
NOFLUSH_MARK = "/* lazyfs: noflush */"
# FileInfo._copy_to_fuse, which open and create answer through.
C_DIRS_MARK = "/* lazyfs: opendir in C */"
C_DIR_FH = "(((uint64_t)1) << 62)"
OPENDIR_FN = "static void __pyx_f_7pyfuse3_fuse_opendir(fuse_req_t __pyx_v_req, fuse_ino_t __pyx_v_ino, struct fuse_file_info *__pyx_v_fi) {\n"  # noqa: E501
RELEASEDIR_FN = re.compile(
    r"static void __pyx_f_7pyfuse3_fuse_releasedir\(fuse_req_t __pyx_v_req, (CYTHON_UNUSED )?"
    r"fuse_ino_t __pyx_v_ino, struct fuse_file_info \*__pyx_v_fi\) \{\n"
)
FILEINFO_FH = re.compile(r"^(\s*)__pyx_v_out->fh = __pyx_t_\d+;$", re.M)
INO_FH_MARK = "/* lazyfs: fh 0 -> inode */"
INO_FH = "(((uint64_t)1) << 61)"
# The callbacks whose Python handler gets an fh and no inode.
FH_CALLBACKS = ("read", "write", "write_buf", "flush", "release", "fsync")
READER_MARK = "/* lazyfs: reader thread */"
C_OPENDIR_TEST = (
    "  if (__pyx_v_ino < lazyfs_cached_dirs_len && lazyfs_cached_dirs[__pyx_v_ino]) {\n"
)
RECEIVE = "fuse_session_receive_buf(__pyx_v_7pyfuse3_session, "
UNMOUNT = "    fuse_session_unmount(__pyx_v_7pyfuse3_session);\n"
DESTROY = "  fuse_session_destroy(__pyx_v_7pyfuse3_session);\n"
# The reader thread's C, inserted before the C table's globals (it starts with READER_MARK).
READER_C = Path(__file__).with_name("pyfuse3_reader.c")
ATOMIC_O_TRUNC = (
    "  __pyx_v_conn->want = (__pyx_v_conn->want & (~((unsigned int)FUSE_CAP_READDIRPLUS_AUTO)));\n"
)


def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyfuse3")
    if spec is None or spec.origin is None:
        raise SystemExit("pyfuse3_cache_dir: pyfuse3 is not installed")
    return Path(spec.origin).parent


def patch_source(text: str) -> str:
    """The generated C with every patch (each applied once)."""
    return _patch_reader(_patch_ino_fh(_patch_c_dirs(_patch_noflush(_patch_opendir(text)))))


def _patch_reader(text: str) -> str:
    if READER_MARK in text:
        return text
    anchor = f"{C_DIRS_MARK}\nunsigned char *lazyfs_cached_dirs = 0;\n"
    checks = (
        (anchor, 1),
        (C_OPENDIR_TEST, 1),
        (RECEIVE, 1),
        (UNMOUNT, 1),
        (DESTROY, 1),
    )
    for s, n in checks:
        if text.count(s) != n:
            raise SystemExit(f"pyfuse3_cache_dir: {s.strip()[:40]!r} is not the expected one")
    text = text.replace(anchor, READER_C.read_text() + anchor)
    # What the reader decided to answer in C is answered in C even if the table changed since.
    text = text.replace(
        C_OPENDIR_TEST,
        C_OPENDIR_TEST.replace("if (", "if (lazyfs_in_reader || (").replace(") {", ")) {"),
    )
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
    if text.count(ATOMIC_O_TRUNC) != 1:
        raise SystemExit("pyfuse3_cache_dir: fuse_init is not the expected one")
    no_trunc = f"  {INO_FH_MARK}\n  __pyx_v_conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;\n"
    text = text.replace(ATOMIC_O_TRUNC, ATOMIC_O_TRUNC + no_trunc)
    # Exported for ctypes: its presence says fh 0 arrives as the inode.
    return text.replace(
        f"{C_DIRS_MARK}\nunsigned char *lazyfs_cached_dirs = 0;\n",
        f"{C_DIRS_MARK}\nunsigned char *lazyfs_cached_dirs = 0;\n"
        f"{INO_FH_MARK}\nint lazyfs_ino_fh = 1;\n",
        1,
    )


def _patch_c_dirs(text: str) -> str:
    if C_DIRS_MARK in text:
        return text
    if text.count(OPENDIR_FN) != 1 or len(RELEASEDIR_FN.findall(text)) != 1:
        raise SystemExit("pyfuse3_cache_dir: opendir/releasedir are not the expected ones")
    # Exported (not static) so that ctypes finds them.  Set while INIT is answered (before any
    # OPENDIR can come), then only cleared byte by byte; the C reader thread reads them without
    # a lock: a read racing a clear answers as if the OPENDIR had come just before it.
    globals_ = (
        f"{C_DIRS_MARK}\nunsigned char *lazyfs_cached_dirs = 0;\n"
        "unsigned long lazyfs_cached_dirs_len = 0;\n\n"
    )
    opendir = (
        f"  {C_DIRS_MARK}\n"
        "  if (__pyx_v_ino < lazyfs_cached_dirs_len && lazyfs_cached_dirs[__pyx_v_ino]) {\n"
        f"    __pyx_v_fi->fh = {C_DIR_FH} | __pyx_v_ino;\n"
        "    __pyx_v_fi->cache_readdir = 1;\n"
        "    __pyx_v_fi->keep_cache = 1;\n"
        "    fuse_reply_open(__pyx_v_req, __pyx_v_fi);\n"
        "    return;\n"
        "  }\n"
    )
    releasedir = (
        f"  {C_DIRS_MARK}\n"
        f"  if (__pyx_v_fi->fh & {C_DIR_FH}) {{ fuse_reply_err(__pyx_v_req, 0); return; }}\n"
    )
    text = text.replace(OPENDIR_FN, globals_ + OPENDIR_FN + opendir)
    return RELEASEDIR_FN.sub(lambda m: m.group(0) + releasedir, text)


def _patch_noflush(text: str) -> str:
    if NOFLUSH_MARK in text:
        return text
    matches = list(FILEINFO_FH.finditer(text))
    if len(matches) != 1:
        raise SystemExit("pyfuse3_cache_dir: could not find FileInfo's fh assignment")
    m = matches[0]
    patch = f"{m.group(0)}\n{m.group(1)}{NOFLUSH_MARK} __pyx_v_out->noflush = 1;"
    return text[: m.start()] + patch + text[m.end() :]


def _patch_opendir(text: str) -> str:
    if MARK in text:
        return text
    at = text.find(OPENDIR)
    if at < 0:
        raise SystemExit("pyfuse3_cache_dir: this pyfuse3's opendir is not the expected one")
    m = ASSIGN.search(text, at)
    if m is None or m.start() - at > 20_000:
        raise SystemExit("pyfuse3_cache_dir: could not find opendir's fh assignment")
    indent, stmt, var = m.group(1), m.group(2), m.group(3)
    patched = (
        f"{indent}{MARK}\n"
        f"{indent}if ({var} >> 63) {{\n"
        f"{indent}  __pyx_cur_scope->__pyx_v_c->fi.cache_readdir = 1;\n"
        f"{indent}  __pyx_cur_scope->__pyx_v_c->fi.keep_cache = 1;\n"
        f"{indent}  {var} &= ~(((uint64_t)1) << 63);\n"
        f"{indent}}}\n"
        f"{indent}{stmt}"
    )
    return text[: m.start()] + patched + text[m.end() :]


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 unless the patch is installed")
    args = p.parse_args()
    pkg = package_dir()
    src = pkg / "__init__.c"
    if not src.exists():
        raise SystemExit(f"pyfuse3_cache_dir: {src.name} missing from the installed pyfuse3")
    (so,) = [f for f in pkg.glob("__init__.*.so")]
    stamp = pkg / "lazyfs-cache-dir.built"
    text = src.read_text()
    marks = (MARK, NOFLUSH_MARK, C_DIRS_MARK, INO_FH_MARK, READER_MARK)
    patched = all(mark in text for mark in marks)
    current = patched and stamp.exists() and stamp.read_text() == str(so.stat().st_mtime_ns)
    if args.check:
        print("patched" if current else "not patched")
        return 0 if current else 1
    if current:
        return 0
    src.write_text(patch_source(text))
    with tempfile.TemporaryDirectory(dir=pkg) as tmp:
        built = Path(tmp) / so.name
        build(src, built)
        os.replace(built, so)
    stamp.write_text(str(so.stat().st_mtime_ns))
    done = "cache_readdir, noflush, opendir in C, no_open, reader thread"
    print(f"pyfuse3_cache_dir: rebuilt {so.name} with {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
