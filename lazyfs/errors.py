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
