"""The parser itself: -v/--verbose on either side of the subcommand, defaults in --help."""

import argparse

import pytest

from gkpd.cli import build_parser


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["summary", "m"], False),
        (["-v", "summary", "m"], True),
        (["summary", "m", "-v"], True),
        (["compress", "m", "--ratio", "5", "--out", "o", "-v"], True),
        (["compress", "-v", "m", "--ratio", "5", "--out", "o"], True),
        (["summary", "--verbose", "m"], True),
        (["bench", "speed", "m", "--out", "o", "-v"], True),
    ],
)
def test_verbose_before_or_after_the_subcommand(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE (default: 128)" in text
    assert "(default: cosine)" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: gkpd)") == 1  # a help that names its default is left alone


def test_compress_takes_the_options_an_unreachable_ratio_suggests():
    from gkpd.cli.compress import _options

    argv = ["compress", "m", "--ratio", "2", "--out", "o"]
    assert "min_params" not in _options(build_parser().parse_args(argv))
    options = _options(build_parser().parse_args([*argv, "--min-params", "0",
                                                  "--allow-more-macs"]))
    assert options["min_params"] == 0 and options["allow_more_macs"] is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--min-params", "-1"])


def _parsers(parser, path=("gkpd",)):
    """``(command path, parser)`` of ``parser`` and of every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_with_a_default_shows_it():
    # `is`, not `in`/`==`: a default of 0 (--seed, --workers) equals False and is shown too
    missing = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or any(
                action.default is v for v in (None, False, argparse.SUPPRESS)
            ):
                continue
            line = " ".join(parser._get_formatter()._format_action(action).split())
            if "default" not in line:
                missing.append(f"{' '.join(path)} {action.option_strings[-1]}")
    assert not missing, missing
