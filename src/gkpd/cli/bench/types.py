"""Argument types of ``gkpd bench``: comma-separated lists of names, ratios, batches, ..."""

from __future__ import annotations

import argparse
from pathlib import Path

from gkpd.cli.common import positive_int, slack


def names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def ratios(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers > 1, got {text!r}"
            ) from None
        if not value > 1:
            raise argparse.ArgumentTypeError(
                f"each ratio must be > 1 (dense parameters / compressed parameters), got {part}"
            )
        values.append(value)
    return values


def choices(known: tuple[str, ...], *, none: bool = False):
    """``type=`` of a comma-separated subset of ``known`` (or ``none``, where allowed)."""

    def parse(text: str) -> list[str]:
        if none and text.strip() == "none":
            return []
        given = names(text)
        unknown = [n for n in given if n not in known]
        if unknown or len(set(given)) != len(given):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names among {', '.join(known)}"
                + (" (or 'none')" if none else "") + f" without repeats, got {text!r}"
            )
        return given

    return parse


def batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated distinct positive integers, got {text!r}"
        )
    return values


def input_size(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (channels, *spatial), got {text!r}"
        )
    return values


def some_ratios(text: str) -> list[float]:
    return [] if text == "none" else ratios(text)


def rounds(text: str) -> int:
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {text}")
    return value


def slacks(text: str) -> list[float]:
    return [slack(part) for part in text.split(",")]


def latency_cache(text: str) -> str | None:
    if text == "none":
        return None
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a JSON file's path")
    return text


def reference(text: str) -> dict[str, float]:
    reference = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            reference[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected METHOD=ACCURACY pairs separated by commas, got {text!r}"
            )
    return reference


def seeds(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated distinct integers >= 0, got {text!r}"
        )
    return values
