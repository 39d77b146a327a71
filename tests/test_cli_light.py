"""``squeezekv --help``, ``methods``, ``run --help`` and argument errors import neither torch nor transformers (they
took 4.5-27 s when the parser and the registry imported every method module), and the registry's source-read listing
agrees with the classes the method modules register."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

# One fresh interpreter per command: the test process has torch loaded already.
_PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from squeezekv.cli import main
code = None
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules),
                  "seconds": time.perf_counter() - t0, "out": out.getvalue(), "err": err.getvalue()}))
"""


def _probe(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "argv, code, fragment",
    [
        (["--help"], 0, "analyze-layers"),
        ([], 2, "COMMAND"),
        (["methods"], 0, "| eviction policy | `snapkv` |"),
        (["run", "--help"], 0, "--budget"),
        (["eval", "--help"], 0, "--budgets"),
        (["run", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["run", "--method", "nope"], 2, "invalid choice: 'nope'"),
        (["nope"], 2, "invalid choice: 'nope'"),
    ],
)
def test_help_methods_and_argument_errors_import_no_torch(argv, code, fragment):
    res = _probe(argv)
    assert res["code"] == code
    assert fragment in res["out"] + res["err"]
    assert res["heavy"] == [], f"squeezekv {' '.join(argv)} imported {res['heavy']}"
    assert res["seconds"] < 3.0  # measured ~0.1 s of imports; torch + transformers alone take several seconds


def test_heavy_commands_help_still_lists_their_arguments():
    # Their arguments are added when the command is chosen (which may import torch): the help is complete.
    res = _probe(["calibrate-cq", "--help"])
    assert res["code"] == 0 and "--bits" in res["out"] and "Coupled" not in res["err"]
    assert "k-means" in res["out"]


def test_methods_output_is_the_registry_table():
    from squeezekv.registry import markdown_table

    res = _probe(["methods"])
    assert res["out"].strip() == markdown_table().strip()


def test_static_listing_matches_the_registered_classes():
    # What the registry reads from the modules' source (no import) equals what the imported classes say.
    from squeezekv import registry

    registry._load()
    tables = {"policy": registry.POLICIES, "allocation": registry.ALLOCATIONS, "channel": registry.CHANNELS,
              "crosslayer": registry.CROSSLAYER}
    for key, table in tables.items():
        static = registry._static()[key]
        assert list(static) == [n for n in table if n in static]
        assert set(static) == set(table)
        for name, cls in table.items():
            row = static[name]
            assert (row["summary"], row["paper"], row["params"]) == (cls.summary, cls.paper, registry._params(cls))
            assert row["module"] == cls.__module__


def test_registering_a_class_that_disagrees_with_its_source_is_refused():
    from squeezekv import registry

    class Fake:  # pretends to live in a listed module, with a summary its source does not have
        paper = "p"
        summary = "not what policies/window.py says"

    Fake.__module__ = "squeezekv.policies.window"
    table = dict(registry.POLICIES)
    registry.POLICIES.pop("window", None)
    try:
        with pytest.raises(TypeError, match="summary"):
            registry.register_policy("window")(Fake)
    finally:
        registry.POLICIES.clear()
        registry.POLICIES.update(table)


def test_import_squeezekv_is_light_and_names_load_on_use():
    code = ("import sys, squeezekv; a = 'torch' in sys.modules; squeezekv.SqueezeCache; "
            "print(a, 'torch' in sys.modules, len(squeezekv.POLICIES))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True", "5"], (out.stdout, out.stderr, time.perf_counter() - t0)


@pytest.mark.parametrize("command", [c for c in __import__("squeezekv.cli", fromlist=["COMMANDS"]).COMMANDS
                                     if c != "methods"])
def test_every_commands_help_imports_neither_torch_nor_transformers(command):
    """``squeezekv COMMAND --help`` is instant: the command's arguments are added without importing torch."""
    code = (f"import sys\nfrom squeezekv.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
