"""Re-time decode at batch 32 / 4k context for standard and LCKV (same config, random init), alternating order."""
import json, sys, torch
sys.path.insert(0, "src")
from squeezekv.crosslayer.lckv import LCKVForCausalLM, make_kv_sources
from squeezekv.crosslayer.lckv.configuration import LCKVConfig
from squeezekv.crosslayer.lckv.measure import decode_throughput
def mk(layout):
    cfg = LCKVConfig(kv_sources=make_kv_sources(12, layout, 2), vocab_size=49152, hidden_size=768,
                     intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     max_position_embeddings=8192, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LCKVForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
models = {"standard": mk("standard"), "lckv": mk("sandwich")}
rows = []
with torch.no_grad():
    for rep in range(3):
        for name in (["standard", "lckv"] if rep % 2 == 0 else ["lckv", "standard"]):
            for batch in (1, 32, 256):
                r = decode_throughput(models[name], batch, 4096, 32, warmup=4)
                r.update(model=name, rep=rep, ms_per_step=1000 * r["seconds"] / 32)
                rows.append(r); print(json.dumps(r), flush=True)
                torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(sys.argv[1], "w"), indent=1)
