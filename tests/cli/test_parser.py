"""The parser itself: -v/--verbose on either side of the subcommand, defaults in --help."""

import pytest

from gkpd.cli import build_parser


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["summary", "m"], False),
        (["-v", "summary", "m"], True),
        (["summary", "m", "-v"], True),
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
