"""The dated measurement pages (docs/measurements/) are exactly what benchmarks/pages.py renders from the committed
result files; the manual's links to them resolve, and the figures a manual line quotes next to such a link are on
the linked page; the docs name no script that does not exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import pages  # noqa: E402

MANUAL = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(((?:\.\./|\./)*(?:docs/)?measurements/[^)#\s]*)(#[^)\s]*)?\)")
#: files of other projects the docs cite (the official code a method was checked against)
EXTERNAL = {"modeling_llama.py", "modify_llama_drop.py", "modify_mistral.py"}
NUMBER = re.compile(r"(?<![\w.-])\d+\.\d+(?![\w.])")


def _has_git() -> bool:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:
        return False


needs_git = pytest.mark.skipif(not _has_git(), reason="pages date legacy result files from git history")


@needs_git
def test_committed_pages_are_the_generated_pages() -> None:
    expected = pages.expected_files()
    present = {p.name: p.read_text() for p in pages.PAGES_DIR.glob("*.md")}
    assert sorted(present) == sorted(expected), "run python benchmarks/pages.py"
    for name, text in expected.items():
        assert present[name] == text, f"docs/measurements/{name} differs: run python benchmarks/pages.py"


@needs_git
def test_a_hand_edited_number_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "measurements"
    shutil.copytree(pages.PAGES_DIR, copy)
    monkeypatch.setattr(pages, "PAGES_DIR", copy)
    assert pages.main(["--check"]) == 0
    page = copy / "2026-11-26-decode-h200.md"
    text = page.read_text()
    assert "| 7318.5 |" in text  # SnapKV at batch 256 in gpu/h200_decode.json
    page.write_text(text.replace("| 7318.5 |", "| 7418.5 |", 1))
    assert pages.main(["--check"]) == 1
    page.write_text(text)
    (copy / "2026-01-01-stale.md").write_text("# a page no result gives\n")
    assert pages.main(["--check"]) == 1


@needs_git
def test_a_result_file_on_no_page_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    stray = pages.RESULTS / "gpu" / "h200_decode.json"
    topics = tuple(t for t in pages.TOPICS if t.slug != "decode-h200")
    monkeypatch.setattr(pages, "TOPICS", topics)
    with pytest.raises(ValueError, match=r"gpu/h200_decode.json is on no measurement page"):
        pages.build_pages()
    assert stray.exists()


def test_numbers_print_one_way() -> None:
    assert [pages.fmt(v) for v in (7318.512, 23.0573, 0.25274, 131072.0, 3, True, None, 1e-05)] == \
        ["7318.5", "23.06", "0.2527", "131072", "3", "true", "", "1e-05"]


def test_rows_without_ratios_get_them_against_full_of_the_same_batch() -> None:
    rows = [{"method": "full", "batch": 16, "context": 8, "tokens_per_s": 100.0},
            {"method": "full", "batch": 64, "context": 8, "tokens_per_s": 200.0},
            {"method": "snapkv", "batch": 16, "context": 8, "tokens_per_s": 150.0},
            {"method": "snapkv", "batch": 64, "context": 8, "tokens_per_s": 500.0},
            {"method": "snapkv", "batch": 256, "context": 8, "tokens_per_s": 900.0}]
    out = pages.add_ratios(rows)
    assert [r.get("tokens_per_s_vs_full") for r in out] == [1.0, 1.0, 1.5, 2.5, None]
    recorded = [{"method": "full", "batch": 1, "tokens_per_s": 1.0, "tokens_per_s_vs_full": 1.0}]
    assert pages.add_ratios(recorded) == recorded  # a recorded ratio is kept, none added


def test_a_suite_report_renders_config_versions_gpu_and_baseline_ratios() -> None:
    report = {"suite": "s", "started": "2027-01-02T03:04:05+0000",
              "config": {"description": "what it measures", "model": {"random": "micro"}},
              "versions": {"torch": "2.13.0", "transformers": "5.24.0", "squeezekv": "0.1.0",
                           "squeezekv_git": {"commit": "abc", "dirty": False}},
              "device": {"device": "cuda", "gpu": "NVIDIA H200"},
              "cases": {"full": {"kind": "decode", "settings": {"cache": {"method": "full"}},
                                 "rows": [{"batch": 1, "tokens_per_s": 50.0, "times": [1.0, 2.0]}]},
                        "snapkv": {"kind": "decode", "settings": {"cache": {"method": "snapkv"}, "baseline": "full"},
                                   "rows": [{"batch": 1, "tokens_per_s": 75.0, "tokens_per_s_vs_baseline": 1.5}]}}}
    text = "\n".join(pages.render_suite(report))
    assert "- device: NVIDIA H200" in text
    assert "torch 2.13.0, transformers 5.24.0, squeezekv 0.1.0" in text
    assert "| batch | tokens_per_s | tokens_per_s_vs_baseline |" in text
    assert "| 1 | 75 | 1.5 |" in text
    assert "times" not in text.split("</details>")[-1]  # raw per-repetition lists stay out of the tables


def _units(text: str) -> list[tuple[int, str]]:
    """Paragraphs, list items and table rows (with their first line number): what one quote of a figure spans."""
    units: list[tuple[int, list[str]]] = []
    fence = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        starts = not line.strip() or line.lstrip().startswith(("* ", "- ", "|", "#", "1. ", "> ")) or not units
        if starts:
            units.append((i, []))
        if line.strip():
            units[-1][1].append(line)
    return [(i, " ".join(lines)) for i, lines in units if lines]


def _links() -> list[tuple[Path, int, str, Path]]:
    found = []
    for doc in MANUAL:
        for i, unit in _units(doc.read_text()):
            for m in LINK.finditer(unit):
                found.append((doc, i, unit, (doc.parent / m.group(1)).resolve()))
    return found


def test_manual_links_to_measurement_pages_resolve() -> None:
    links = _links()
    assert len({target for *_, target in links}) >= 8  # the manual cites the pages of every method family
    missing = [f"{d.relative_to(ROOT)}:{i}: {t}" for d, i, _, t in links if not t.is_file()]
    assert not missing, "\n".join(missing)


def test_figures_quoted_next_to_a_measurement_link_are_on_that_page() -> None:
    """A manual line that links a measurement page quotes only numbers printed on it (as the page rounds them)."""
    wrong = []
    for doc, i, line, target in _links():
        if not target.is_file():
            continue
        page = target.read_text()
        pages_of_line = [(doc.parent / m.group(1)).resolve().read_text() for m in LINK.finditer(line)
                         if (doc.parent / m.group(1)).resolve().is_file()]
        bare = LINK.sub("]", re.sub(r"`[^`]*`", "", line))
        for number in NUMBER.findall(bare):
            if not any(number in p for p in pages_of_line or [page]):
                wrong.append(f"{doc.relative_to(ROOT)}:{i}: {number} is not on {target.name}")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_docs_name_no_script_that_does_not_exist() -> None:
    """Every ``*.sh``/``*.py`` script the manual names in backticks exists in the repository (by path or name), and
    no ``device_run.sh`` mode is named: it takes suite names."""
    names = {p.name for p in ROOT.rglob("*") if p.suffix in (".sh", ".py") and ".venv" not in p.parts}
    bad = []
    for doc in MANUAL:
        text = doc.read_text()
        for span in re.findall(r"`([^`\n]+)`", text):
            for script in re.findall(r"(?<![\w/.-])([\w./-]+\.(?:sh|py))\b", span):
                if not ((ROOT / script).exists() or Path(script).name in names | EXTERNAL):
                    bad.append(f"{doc.relative_to(ROOT)}: {script}")
        bad += [f"{doc.relative_to(ROOT)}: device_run.sh mode {m}"
                for m in re.findall(r"device_run\.sh`? (?:mode )?`?(session\w*|graph|long)\b", text)]
    assert not bad, "\n".join(sorted(set(bad)))
