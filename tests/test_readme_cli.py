"""The README's method table is generated from the registry, and the CLI's choices come from it too."""

from __future__ import annotations

import re
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


# -- the README's Python examples, run against a tiny random model (a broken example fails here) -------------------
def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _inline_calls(text: str) -> list[str]:
    """Inline code spans of the README that are whole squeezekv calls (``make_cache(...)``,
    ``squeezekv.chunked_prefill(...)``), with whitespace from line breaks folded."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced blocks out: they pair no inline span
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    return [s for s in spans if re.fullmatch(r"(squeezekv\.)?(make_cache|chunked_prefill)\(.*\)", s)]


def _example_namespace(make_model, make_ids) -> dict:
    import torch

    import squeezekv

    model = make_model("llama", head_dim=32)  # KIVI's default group of 32 channels
    ids = make_ids(1, 40)
    return {"squeezekv": squeezekv, "make_cache": squeezekv.make_cache, "model": model, "input_ids": ids, "ids": ids,
            "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "torch": torch,
            "CacheSpec": squeezekv.CacheSpec, "spec": squeezekv.CacheSpec(budget=0.3)}


def test_readme_has_the_examples_this_file_runs():
    text = (ROOT / "README.md").read_text()
    blocks = _python_blocks(text)
    assert len(blocks) >= 2 and any("model.generate" in b for b in blocks) and any("GraphDecoder" in b for b in blocks)
    calls = _inline_calls(text)
    assert any("channel=kivi" in c or "channel=\"kivi\"" in c for c in calls)
    assert any("chunked_prefill" in c for c in calls)


@pytest.mark.parametrize("index", range(len(_python_blocks((ROOT / "README.md").read_text()))))
def test_readme_python_block_runs(index, make_model, make_ids):
    """Each ```python block of the README, executed as written (GraphDecoder runs its fixed-shape steps eagerly on
    CPU) with ``model``/``inputs``/``input_ids`` a tiny random Llama and a 40-token prompt."""
    block = _python_blocks((ROOT / "README.md").read_text())[index]
    ns = _example_namespace(make_model, make_ids)
    exec(compile(block, f"README.md python block {index}", "exec"), ns)
    if "model.generate" in block:
        assert ns["out"].shape[0] == 1 and ns["out"].shape[1] > 40  # the prompt and generated tokens
    if "GraphDecoder" in block:
        assert ns["logits"].shape == (1, ns["model"].config.vocab_size)


def test_readme_inline_calls_run(make_model, make_ids):
    """The README's inline ``make_cache(...)`` / ``squeezekv.chunked_prefill(...)`` calls, as written, build a cache
    and prefill the prompt through it."""
    ns = _example_namespace(make_model, make_ids)
    calls = _inline_calls((ROOT / "README.md").read_text())
    for call in sorted(calls, key=lambda c: "chunked_prefill" in c):  # caches first: chunked_prefill needs one
        if "chunked_prefill" in call:
            ns["cache"] = ns["make_cache"](ns["model"], "window", 0.5)
            exec(call, ns)
            assert ns["cache"].get_seq_length() == ns["ids"].shape[1]
        else:
            cache = eval(call, ns)
            ns["model"](ns["ids"], cache=cache)
            assert cache.get_seq_length() == ns["ids"].shape[1]
