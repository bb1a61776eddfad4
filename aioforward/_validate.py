"""Argument checks shared by every constructor and call: each names the argument and value."""

from __future__ import annotations

from typing import Any

__all__ = ["check_bool", "check_callable", "check_int", "check_number", "check_timeout"]


def check_int(name: str, value: object, low: int, *, optional: bool = False) -> None:
    """Raise unless ``value`` is an int >= ``low`` (``None`` too when ``optional``).

    Example: ``check_int("workers", 0, 1)`` raises ``ValueError: workers must be an int >= 1,
    got 0``. A value of the wrong type (bools included) raises ``TypeError``.
    """
    if optional and value is None:
        return
    what = f"an int >= {low}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_number(
    name: str, value: object, *, positive: bool = False, optional: bool = False
) -> None:
    """Raise unless ``value`` is a real number >= 0 (> 0 when ``positive``).

    Example: ``check_number("start_timeout", "60")`` raises ``TypeError`` naming
    ``start_timeout``; ``check_number("timeout", -1)`` raises ``ValueError``.
    """
    if optional and value is None:
        return
    what = ("a number > 0" if positive else "a number >= 0") + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if not (value > 0 if positive else value >= 0):  # also refuses NaN
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_timeout(value: object, name: str = "timeout") -> None:
    """``None`` or a number >= 0 (``True`` is not a number of seconds).

    Example: ``check_timeout(True)`` raises ``TypeError: timeout must be ...``.
    """
    check_number(name, value, optional=True)


def check_bool(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool.

    Example: ``check_bool("grad", "no")`` raises ``TypeError: grad must be a bool, got 'no'``.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_callable(name: str, value: Any, *, optional: bool = True) -> None:
    """Raise ``TypeError`` unless ``value`` is callable (or ``None`` when ``optional``).

    Example: ``check_callable("initializer", 5)`` raises ``TypeError``.
    """
    if optional and value is None:
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {value!r}")
