"""Exception types shared across lazyfs.  Each carries a one-line message for the CLI."""


class LazyfsError(Exception):
    """Base class: the CLI prints ``lazyfs: <message>`` and exits non-zero."""


class FormatError(LazyfsError):
    """A layer, TOC, footer or image document is malformed or violates an invariant."""


class IntegrityError(LazyfsError):
    """Bytes did not match their digest.  Never served: readers see EIO."""


class RemoteError(LazyfsError):
    """A registry or other source failed after retries, or refused the request."""


class NotFoundError(LazyfsError):
    """A blob, manifest, tag or path does not exist."""


def first_error(e: BaseException) -> BaseException:
    """The first leaf of an exception group, preferring a LazyfsError (trio nurseries wrap
    errors in groups; users want the one-line cause)."""
    if isinstance(e, BaseExceptionGroup):
        leaves = [first_error(x) for x in e.exceptions]
        for leaf in leaves:
            if isinstance(leaf, LazyfsError):
                return leaf
        return leaves[0] if leaves else e
    return e
