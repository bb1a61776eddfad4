"""ProcessPool: persistent, supervised torch worker processes (see ``_pool``)."""

from ._pool import ProcessPool as ProcessPool

__all__ = ["ProcessPool"]
