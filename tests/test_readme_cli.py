"""The README's method table is generated from the registry, and the CLI's choices come from it too."""

from __future__ import annotations

from pathlib import Path

import pytest

from squeezekv.cli import build_parser, main
from squeezekv.registry import allocation_names, markdown_table, policy_names

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_is_the_registry_table():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- registry-table:start -->") + len("<!-- registry-table:start -->")
    end = readme.index("<!-- registry-table:end -->")
    assert readme[start:end].strip() == markdown_table().strip(), "regenerate with `squeezekv methods`"


def test_readme_first_lines_have_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:10])
    assert "squeezekv run" in head
    assert "python -m pytest -q" in head


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    assert "torch==2.13.0" in ci


def test_ci_runs_the_readme_main_job_with_progress_bars_and_through_a_terminal():
    """README command 1's main job, exactly as written (no --no-progress), piped and through a pseudo-terminal."""
    readme_cmd = (ROOT / "README.md").read_text().splitlines()
    main_job = next(line for line in readme_cmd[:10] if "squeezekv run" in line).rsplit("&&", 1)[-1].strip()
    assert main_job == "squeezekv run"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(line.startswith("squeezekv run |") for line in ci)
    assert 'script -qec "squeezekv run" /dev/null' in ci
    assert "set -euo pipefail" in ci


def test_cli_choices_come_from_the_registry():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    run.format_help()  # a command's arguments are added on first use
    by_dest = {a.dest: a for a in run._actions}
    assert list(by_dest["method"].choices) == policy_names()
    assert list(by_dest["allocation"].choices) == allocation_names()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--budget", "0"], "budget 0 is out of range"),
        (["run", "--budget", "1.5"], "budget 1.5 is out of range"),
        (["run", "--budget", "abc"], "is not a number"),
        (["run", "--max-new-tokens", "0"], "max_new_tokens=0 is out of range"),
        (["run", "--method-param", "nope=3"], "has no parameter 'nope'"),
        (["run", "--model", "/does/not/exist"], "is not a local folder"),
    ],
)
def test_cli_user_errors_exit_nonzero_without_traceback(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_cli_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--method", "nope"])
    assert exc.value.code != 0
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_cli_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in policy_names() + allocation_names():
        assert f"`{name}`" in out
