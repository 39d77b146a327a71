"""Merge the records of channel_eval.py runs (every results/channel/cpu_smollm2*.jsonl, deduplicated by cell and
example: repeated cells gave identical records) into cpu_smollm2_all.jsonl and cpu_smollm2_summary.json and print the
table of docs/channel.md. The five runs' own files were folded into cpu_smollm2_all.jsonl, which holds every record."""
from pathlib import Path
import json, math, sys
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / 'src')); sys.path.insert(0, str(HERE))

from channel_eval import summarise, cells
from squeezekv.eval.grid import read_records
base = HERE / 'results' / 'channel'
recs = [r for f in sorted(base.glob('cpu_smollm2*.jsonl')) for r in read_records(f)]
seen = set(); allr = []
for r in recs:
    k = (r['cell'], r['example_id'])
    if k in seen: continue
    seen.add(k); allr.append(r)
# keep only cells complete on every example of the full cell
ex = {r['example_id'] for r in allr if r['cell'] == 'full'}
order = list(cells(Path('/tmp/cq')))
complete = [c for c in order if {r['example_id'] for r in allr if r['cell'] == c} >= ex]
partial = [c for c in order if c not in complete and any(r['cell'] == c for r in allr)]
with open(base / 'cpu_smollm2_all.jsonl', 'w') as fh:
    for r in allr: fh.write(json.dumps(r) + '\n')
summ = summarise([r for r in allr if r['cell'] in complete + partial])
a = json.loads((base / 'cpu_smollm2.json').read_text()) if (base / 'cpu_smollm2.json').exists() else {}
out = {"model": "SmolLM2-135M-Instruct", "device": "cpu (2 shared cores)", "dtype": "float32",
       "examples": sorted(ex), "complete_cells": complete, "partial_cells": partial,
       "cells": {c: cells(Path('/tmp/cq'))[c] for c in complete + partial},
       "calibration": {"cq1": "4096 tokens, 10 Lloyd iterations", "cq2": "2048 tokens, 6 Lloyd iterations",
                       "text": "Linux kernel documentation pages < 20000 characters, path order"},
       "summary": summ}
(base / 'cpu_smollm2_summary.json').write_text(json.dumps(out, indent=2, default=str))
print("| cell | needle retrieved | PPL essays | PPL linux-doc | KV bytes / prompt token | vs full |")
print("|---|---|---|---|---|---|")
for c in complete + partial:
    r = summ[c]
    print(f"| `{c}` | {round(r['needle_retrieval'] * r['needle_n'])}/{r['needle_n']} | {r.get('ppl_essays', float('nan')):.2f} | {r.get('ppl_linux-doc', float('nan')):.2f} | {r['kv_bytes_per_token']:.0f} | {r.get('kv_bytes_vs_full', float('nan')):.3f} |")
print("partial:", partial)
