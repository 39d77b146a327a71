"""The shared generation loops (squeezekv.generation) against hand-written references, and the package's import
structure around them: runner.py is only the ``run`` command, and no import circle passes through eval/, the runner or
generation.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import squeezekv
from squeezekv import generation

SRC = Path(squeezekv.__file__).parent


def _forward(model, ids, cache):
    return model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[:, -1]  # [1, vocab]


@pytest.mark.parametrize("keep_eos", [False, True])
def test_greedy_equals_a_hand_loop_and_stops_at_eos(make_model, make_ids, keep_eos):
    model = make_model("llama", layers=2)
    prompt = make_ids(1, 30)[0].tolist()
    ref, cache = [], DynamicCache(config=model.config)
    logits = _forward(model, prompt, cache)
    for _ in range(8):
        ref.append(int(logits.argmax(-1)))
        logits = _forward(model, [ref[-1]], cache)
    cache = DynamicCache(config=model.config)
    logits = generation.prefill(model, prompt, cache, "cpu")
    assert generation.greedy(model, cache, logits, 8, set(), "cpu", keep_eos=keep_eos) == ref
    # the 4th greedy token as end of sequence: decoding stops at its first occurrence (included with keep_eos)
    cache = DynamicCache(config=model.config)
    logits = generation.prefill(model, prompt, cache, "cpu")
    got = generation.greedy(model, cache, logits, 8, {ref[3]}, "cpu", keep_eos=keep_eos)
    stop = ref.index(ref[3])
    assert got == ref[: stop + 1 if keep_eos else stop]


def test_stepwise_and_one_pass_logprobs_equal_one_forward_of_the_whole_text(make_model, make_ids):
    """Full cache: the continuation's log-probabilities, one token per step or in one pass, equal those of a single
    forward pass over prompt + continuation."""
    model = make_model("llama", layers=2)
    ids = make_ids(1, 40)[0].tolist()
    prompt, cont = ids[:30], ids[30:]
    whole = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, 29:39].float(), -1)  # [10, vocab]
    ref = whole.gather(1, torch.tensor(cont)[:, None]).squeeze(1)  # [10]
    cache = DynamicCache(config=model.config)
    one = generation.continuation_logprobs(model, cache, generation.prefill(model, prompt, cache, "cpu"), cont, "cpu")
    cache = DynamicCache(config=model.config)
    steps = generation.stepwise_logprobs(model, cache, generation.prefill(model, prompt, cache, "cpu"), cont, "cpu")
    assert one.shape == (10,) and len(steps) == 10
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(steps), ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 39  # the last continuation token is scored, not fed


def test_chunked_prefill_is_squeezekv_chunked_prefill(make_model, make_ids):
    model = make_model("llama", layers=2)
    ids = make_ids(1, 50)
    a = squeezekv.make_cache(model, "h2o", 20)
    b = squeezekv.make_cache(model, "h2o", 20)
    got = generation.prefill(model, ids[0].tolist(), a, "cpu", chunk=16)
    want = squeezekv.chunked_prefill(model, ids, b, 16)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert a.physical_lengths() == b.physical_lengths()


@pytest.mark.parametrize("call, fragment", [
    (lambda m, c, l: generation.greedy(m, c, l, -1, set(), "cpu"), "max_new_tokens=-1"),
    (lambda m, c, l: generation.stepwise_logprobs(m, c, l, [], "cpu"), "continuation is empty"),
    (lambda m, c, l: generation.continuation_logprobs(m, c, l, [], "cpu"), "continuation is empty"),
    (lambda m, c, l: generation.prefill(m, [3, 4], c, "cpu", chunk=0), "chunk=0"),
])
def test_bad_arguments_raise_naming_them(make_model, call, fragment):
    model = make_model("llama", layers=2)
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match=fragment):
        call(model, cache, torch.zeros(1, 128))


# -- import structure -----------------------------------------------------------------------------------------------
def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (top-level and function-level imports alike)."""
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (p, is_pkg) in mods.items():
        base = m.split(".") if is_pkg else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circle_through_eval_runner_or_generation():
    graph = _import_graph()
    watched = [m for m in graph if m.startswith("squeezekv.eval") or m in ("squeezekv.runner", "squeezekv.generation")]
    circles = sorted(m for m in watched if m in _reaches(graph, m))
    assert circles == [], f"modules that import themselves back: {circles}"


def test_runner_is_only_the_run_command():
    """Nothing but the run command imports squeezekv.runner: helpers live in generation.py and eval/tasks.py."""
    graph = _import_graph()
    importers = sorted(m for m, deps in graph.items() if "squeezekv.runner" in deps)
    assert importers == ["squeezekv.commands.run"]
