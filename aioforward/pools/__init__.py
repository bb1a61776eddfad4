"""The pool backends; import them from :mod:`aioforward`."""
