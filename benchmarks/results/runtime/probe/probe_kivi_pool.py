"""Exploratory (not a result page): time the KIVI pool decode kernel alone at 8B shape, 8k, b16/b64, per config."""
import itertools, json, os, sys, torch
sys.path.insert(0, "src")
from squeezekv.channel import kivi_triton as kt
from squeezekv.channel.kernels import KiviKernelConfig
from squeezekv.runtime.kivi_pool import KiviPool
out = []
for b in (64,):
    pool = KiviPool([8320], b, 8, 128, bits=2, group_size=32, residual=128, dtype=torch.bfloat16, device="cuda")
    for t in (pool.kcode[0], pool.vcode[0]):
        t.random_(0, 256)
    for t in (pool.kscale[0], pool.vscale[0], pool.kzero[0], pool.vzero[0], pool.keys[0], pool.values[0]):
        t.normal_()
    pool.nq[0].fill_(8192)
    slots = torch.arange(b, device="cuda")
    lens = torch.full((b, 8), 129, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    byts = b * 8 * 8192 * (32 + 32 + 8 + 8 + 2 * 128 * 2 / 32)
    args = (q, pool.kcode[0], pool.vcode[0], pool.kscale[0], pool.kzero[0], pool.vscale[0], pool.vzero[0], slots,
            pool.nq[0], pool.keys[0], pool.values[0], lens, 2, 32, 0.088)
    for var, bn, w, pps in itertools.product(("planes", "interleaved"), (None, 128, 256), (2, 4), (4,)):
        try:
            cfg = KiviKernelConfig(variant=var, block_n=bn, num_warps=w, programs_per_sm=pps)
            for _ in range(3):
                kt.pool_decode_attend(*args, config=cfg)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(20):
                kt.pool_decode_attend(*args, config=cfg)
            e1.record(); torch.cuda.synchronize()
            ms = e0.elapsed_time(e1) / 20
            out.append(dict(batch=b, variant=var, block_n=bn, warps=w, pps=pps, ms=ms, tb_s=byts / ms / 1e9))
        except Exception as e:
            out.append(dict(batch=b, variant=var, block_n=bn, warps=w, pps=pps, error=str(e)[:200]))
        print(json.dumps(out[-1]), flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "kivi_pool_probe.json"), "w"), indent=1)
