"""Run kvpress presses on squeezekv's evaluation examples, inside kvpress's own virtual environment.

kvpress 0.5.5 pins transformers < 5.3 while squeezekv needs >= 5.23, so this file imports neither squeezekv nor
anything outside the standard library, torch, transformers and kvpress; ``squeezekv eval --kvpress-python PY``
runs it as a script with that interpreter. Input: a JSONL of examples (token ids, as squeezekv built them); output: a
JSONL of raw results (answer tokens or continuation NLL, KV bytes after the prefill), which squeezekv scores with the
same scorer as its own cells.

Protocol, the same as squeezekv's cells: the whole prompt is prefilled once with the press active (kvpress compresses
it during that forward pass), then the press is removed and the model decodes greedily (or scores the continuation in
one forward pass) with explicit position ids (true positions after the full prompt). ``press == "full"`` is a plain
``DynamicCache``: the full-cache check between the two environments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

#: our name -> (kvpress class name, extra constructor arguments, attention implementation it needs)
PRESSES: dict[str, tuple[str, dict, str]] = {
    "streamingllm": ("StreamingLLMPress", {}, "sdpa"),
    "snapkv": ("SnapKVPress", {}, "sdpa"),
    "pyramidkv": ("PyramidKVPress", {}, "sdpa"),
    "observed": ("ObservedAttentionPress", {}, "eager"),  # H2O-like: accumulated observed attention
    "expected": ("ExpectedAttentionPress", {}, "sdpa"),  # kvpress's own recent press
}


def make_press(name: str, budget: float):
    """kvpress press keeping ``budget`` of the prompt (``compression_ratio = 1 - budget``); None for ``full``."""
    if name == "full":
        return None
    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press {name!r}; choose one of: full, {', '.join(PRESSES)}")
    import kvpress

    cls_name, extra, _ = PRESSES[name]
    return getattr(kvpress, cls_name)(compression_ratio=1.0 - budget, **extra)


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def run_example(model, ex: dict, press, eos: set[int]) -> dict:
    import torch
    from transformers import DynamicCache

    prompt = ex["prompt"]
    n = len(prompt)
    dev = next(model.parameters()).device
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = press(model) if press is not None else contextlib.nullcontext()
        with ctx:
            # a generated answer needs the last position's logits only (all of them: [1, n, vocab], GBs at 8k)
            keep = 1 if ex["kind"] == "generate" else 0
            logits = model(input_ids=torch.tensor([prompt], device=dev), past_key_values=cache, use_cache=True,
                           logits_to_keep=keep).logits
        held = kv_bytes(cache)
        if ex["kind"] == "generate":
            out: list[int] = []
            nxt_logits = logits[:, -1]
            pos = n
            for _ in range(ex["max_new_tokens"]):
                nxt = int(nxt_logits.argmax(-1))
                if nxt in eos:
                    break
                out.append(nxt)
                nxt_logits = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache, use_cache=True,
                                   position_ids=torch.tensor([[pos]], device=dev)).logits[:, -1]
                pos += 1
            result = {"tokens": out}
        else:
            cont = ex["continuation"]
            all_logits = logits[:, -1:]
            if len(cont) > 1:
                pos = torch.arange(n, n + len(cont) - 1, device=dev)[None]
                rest = model(input_ids=torch.tensor([cont[:-1]], device=dev), past_key_values=cache, use_cache=True,
                             position_ids=pos).logits
                all_logits = torch.cat([all_logits, rest], dim=1)
            logp = torch.log_softmax(all_logits.float(), dim=-1)[0]
            nll = -logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).squeeze(1)
            result = {"nll": float(nll.mean())}
    return {**result, "kv_bytes_after_prefill": held, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local checkpoint folder")
    ap.add_argument("--examples", required=True, help="JSONL of examples (id, kind, prompt, ...)")
    ap.add_argument("--jobs", required=True, help="JSONL of {press, budget, example_id} to run")
    ap.add_argument("--out", required=True, help="JSONL to append raw results to")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (the squeezekv grid's)")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    import kvpress  # noqa: F401  (fails early if the environment lacks it)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = {}
    with open(args.examples, encoding="utf-8") as fh:
        for line in fh:
            ex = json.loads(line)
            examples[ex["id"]] = ex
    jobs = [json.loads(l) for l in open(args.jobs, encoding="utf-8") if l.strip()]
    for job in jobs:
        make_press(job["press"], job["budget"])  # validate every name before any compute
    tok = AutoTokenizer.from_pretrained(args.model)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    try:  # the generation config's end tokens too (a chat model's end-of-turn token), as squeezekv's grid does
        from transformers import GenerationConfig

        ids = GenerationConfig.from_pretrained(args.model).eos_token_id
        eos.update([ids] if isinstance(ids, int) else list(ids or []))
    except OSError:
        pass
    models = {}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "kvpress": version("kvpress")}
    with open(args.out, "a", encoding="utf-8") as fh:
        for i, job in enumerate(jobs):
            attn = "sdpa" if job["press"] == "full" else PRESSES[job["press"]][2]
            if attn not in models:
                models[attn] = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                                    attn_implementation=attn).to(args.device).eval()
            res = run_example(models[attn], examples[job["example_id"]], make_press(job["press"], job["budget"]),
                              eos)
            if "tokens" in res:
                res["answer"] = tok.decode(res.pop("tokens"), skip_special_tokens=True).strip()
            fh.write(json.dumps({**job, **res, "versions": versions}) + "\n")
            fh.flush()
            print(f"kvpress {i + 1}/{len(jobs)} {job['press']} {job['budget']} {job['example_id']} "
                  f"({res['seconds']:.1f}s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
