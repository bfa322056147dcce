"""Running the ``gkpd`` command in-process, as the CLI tests do."""

import json

from gkpd.cli import main


def run(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``gkpd ARGV`` (arguments turned into str)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    """The JSON result of ``gkpd ARGV --json``, which must succeed."""
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])
