"""The tensor-core attention backward's performance model, on paper (part of ``python -m pyllm gpu-model``).

Inputs produced by the code, as for the forward (gpu_model.py): ``nvcc -Xptxas -v`` on
csrc/cuda/attention_tc_bwd.cu (registers, spills per instantiation) and the kernel's tile
configuration read from the C++ templates (``pyllm._C_emu.attention_tc_bwd_configs()``).
The per-step work (one CTA, one query tile) is counted from the kernel's loops; the same model is
applied to FlashAttention-2's backward tile shapes (its sm80 launch configuration, read from
flash_bwd_launch_template.h) and the result is the ratio of the two estimates: "modelled at x% of
FA2's backward". Paper estimates, not measurements.
"""
from __future__ import annotations

import re

from . import gpu_model

SOURCE = "csrc/cuda/attention_tc_bwd.cu"
BEGIN, END = "<!-- gpu-model-bwd:begin -->", "<!-- gpu-model-bwd:end -->"

# FlashAttention-2 backward, sm80, >= 144 KiB shared memory per block: head dim 64: 128 queries x
# 128 keys, 8 warps; head dim 128: 64 queries x 128 keys, 8 warps; head dim 256: 64 x 64, 8 warps
# (Flash_bwd_kernel_traits). Shared memory: Q and dO double-buffered (single at 256: FA2's A100
# setting, No_double_buffer), K, V, dS and P (the fp32 dQ staging reuses it; approximate).
FA2_BWD_TILES = {64: dict(head_dim=64, keys=128, queries=128, threads=256, split=1, qdo_buffers=2),
                 128: dict(head_dim=128, keys=128, queries=64, threads=256, split=1, qdo_buffers=2),
                 256: dict(head_dim=256, keys=64, queries=64, threads=256, split=1, qdo_buffers=1)}
for _c in FA2_BWD_TILES.values():
    _d, _n, _m = _c["head_dim"], _c["keys"], _c["queries"]
    _c["smem"] = 2 * (_c["qdo_buffers"] * 2 * _m * _d + 2 * _n * _d + 2 * _n * _m)


def configs() -> list[dict]:
    import pyllm._C_emu as emu

    keys = ["head_dim", "keys", "queries", "threads", "smem", "split", "dq_keys", "dq_smem"]
    return [dict(zip(keys, row)) for row in emu.attention_tc_bwd_configs()]


def step_work(c: dict) -> dict:
    """Work of one CTA for one query tile (no mask, no dropout), counted from the kernel's loops:
    five m16n8k16 products (S^T, dP^T, dV, dK, dQ) of keys x queries x head dim each; ldmatrix
    of the operands; cp.async of the Q and dO tiles; the dS^T tile written to shared memory; the
    dQ tile added to global memory with fp32 atomics (one per element). With split column parts
    (head dims above 128: ``split`` CTAs per key block) each CTA computes S^T and dP^T in full and
    a 1 / split share of dV, dK and dQ: ``mma`` counts what runs, ``flops`` only the useful share
    (5 products / split), the quantity TFLOP/s figures count."""
    d, n, m, warps, s = c["head_dim"], c["keys"], c["queries"], c["threads"] // 32, c.get("split", 1)
    dh = d // s
    mma = (2 * d + 3 * dh) * (n // 16) * (m // 8) // 16
    useful = 5 * (n // 16) * (m // 8) * (d // 16) / s
    per_warp_keys = n // warps
    kts = per_warp_keys // 16
    # S^T and dP^T: per k-step, A of K and V (one x4 each per 16 keys), B of Q and dO (one x4 per 16 queries)
    ld_s = warps * (d // 16) * (2 * kts + 2 * (m // 16))
    # dV and dK: per 16 queries, B of dO and Q by .trans (one x4 per 16 columns)
    ld_kv = warps * (m // 16) * (dh // 16) * 2
    # dQ: every warp loads the A fragment (dS) of its row block per 16 keys; B (K) per 16 keys and
    # 16 columns, the columns split between the warps of a row block
    ld_q = warps * (n // 16) + (m // 16) * (n // 16) * (dh // 16)
    ldsm = ld_s + ld_kv + ld_q
    elems = n * m
    fp32 = elems * 7  # scale, subtract lse, product with dP, subtract delta, product with P, two packs
    atomics = m * dh
    return {"mma": mma, "flops": useful * 2 * 16 * 8 * 16, "ldsm_bytes": ldsm * 512, "cp_bytes": 2 * m * d * 2,
            "ds_bytes": 2 * elems, "exps": elems, "fp32": fp32, "atomics": atomics,
            "instr": (mma + ldsm) * 32 + elems + fp32 + (2 * m * d * 2 + 2 * elems) / 16 + atomics}


def occupancy(c: dict, regs: int, g: gpu_model.Gpu) -> int:
    by_regs = g.regs_per_sm // (((regs + 7) // 8 * 8) * c["threads"])
    by_smem = g.smem_per_sm // (c["smem"] + 1024)
    return max(0, min(by_regs, by_smem, g.max_warps_sm // (c["threads"] // 32), g.max_ctas_sm))


def estimate(c: dict, regs: int, g: gpu_model.Gpu) -> dict:
    """Clocks per SM for one query step of every resident CTA, per resource; the largest bounds
    the step (perfect overlap). Atomics are counted as issued instructions only (their L2
    throughput is not modelled)."""
    k = occupancy(c, regs, g)
    if k == 0:
        return {"ctas": 0}
    w = step_work(c)
    clocks = {
        "tensor": k * w["mma"] * 2048 / g.mma_fma_per_clk_sm,
        "smem": k * (w["ldsm_bytes"] + w["cp_bytes"] + w["ds_bytes"]) / g.smem_bytes_clk,
        "mufu": k * w["exps"] / g.mufu_per_clk_sm,
        "fp32": k * w["fp32"] / g.fp32_per_clk_sm,
        "issue": k * w["instr"] / 32 / g.issue_per_clk_sm,
    }
    bound = max(clocks.values())
    limiter = max(clocks, key=clocks.get)
    if k == 1:
        serial = clocks["tensor"] + clocks["mufu"] + clocks["fp32"]
        if serial > bound:
            bound, limiter = serial, "serial (1 CTA/SM)"
    tflops = k * w["flops"] * g.sms * g.clock_ghz * 1e9 / bound / 1e12
    return {"ctas": k, "clocks": clocks, "limiter": limiter, "tflops": tflops}


def parse(rows: list[dict], kernel: str = "attn_tc_bwd_kernel") -> dict:
    out = {}
    for r in rows:
        m = re.search(kernel + r"<(__half|__nv_bfloat16), (\d+)>", r.get("kernel", ""))
        if m:
            out[(r["arch"], {"__half": "fp16", "__nv_bfloat16": "bf16"}[m.group(1)], int(m.group(2)))] = r
    return out


def render(rows: list[dict], secs: float) -> str:
    by = parse(rows)
    cfg = {c["head_dim"]: c for c in configs()}
    out = [BEGIN, "", "Generated by `python -m pyllm gpu-model --write docs/GPU.md` "
           f"(nvcc -Xptxas -v on `{SOURCE}`, {secs:.0f} s; tile configuration from the C++ templates). "
           "Do not edit by hand.", "",
           "### Backward: registers, spills, occupancy", "",
           "| head dim | keys x queries per step | CTAs per key block | smem / CTA | arch | regs fp16 / bf16 | spill bytes (st+ld) fp16 / bf16 | CTAs/SM |",
           "|---:|---|---:|---:|---|---|---|---:|"]
    sp = lambda r: r["spill_stores"] + r["spill_loads"]  # noqa: E731
    for d, c in sorted(cfg.items()):
        for g in gpu_model.GPUS:
            h, b = by.get((g.arch, "fp16", d)), by.get((g.arch, "bf16", d))
            if not h or not b:
                continue
            out.append(f"| {d} | {c['keys']} x {c['queries']} | {c['split']} | {c['smem'] / 1024:.1f} KiB | {g.arch} | "
                       f"{h['registers']} / {b['registers']} | {sp(h)} / {sp(b)} | "
                       f"{occupancy(c, max(h['registers'], b['registers']), g)} |")
    dq = parse(rows, "attn_tc_dq_kernel")
    out += ["", "### Deterministic mode's dQ pass (attn_tc_dq_kernel): registers, spills", "",
            "A CTA per 64 query rows walks the key tiles (S, dP, dS, dQ += dS K; K and V single-buffered); "
            "no atomics.", "",
            "| head dim | keys per step | smem / CTA | arch | regs fp16 / bf16 | spill bytes (st+ld) fp16 / bf16 |",
            "|---:|---:|---:|---|---|---|"]
    for d, c in sorted(cfg.items()):
        for g in gpu_model.GPUS:
            h, b = dq.get((g.arch, "fp16", d)), dq.get((g.arch, "bf16", d))
            if not h or not b:
                continue
            out.append(f"| {d} | {c['dq_keys']} | {c['dq_smem'] / 1024:.1f} KiB | {g.arch} | "
                       f"{h['registers']} / {b['registers']} | {sp(h)} / {sp(b)} |")
    out += ["", "### Backward: estimated throughput against FlashAttention-2's backward, same model", "",
            "Both columns are this model's estimates (long sequences, no mask); FA2's are its backward tile "
            "shapes put through the same counts with 255 registers. The ratio is the target's measure "
            "(>= 50% of FA2's backward). TFLOP/s count the useful work (5 products of keys x queries x head "
            "dim); at head dim 256 this kernel also recomputes S^T and dP^T in its second column part.", "",
            "| GPU | head dim | CTAs/SM | limiter | clocks/step: tensor / smem / exp2 / fp32 / issue | estimate TFLOP/s | FA2 tiles: estimate (limiter) | estimate / FA2 |",
            "|---|---:|---:|---|---|---:|---|---:|"]
    for g in gpu_model.GPUS:
        for d, c in sorted(cfg.items()):
            h, b = by.get((g.arch, "fp16", d)), by.get((g.arch, "bf16", d))
            if not h or not b:
                continue
            e = estimate(c, max(h["registers"], b["registers"]), g)
            f = estimate(FA2_BWD_TILES[d], 255, g) if d in FA2_BWD_TILES else None
            if not e["ctas"]:
                out.append(f"| {g.name} | {d} | 0 | does not fit | | | | |")
                continue
            cl = e["clocks"]
            fs = f"{f['tflops']:.0f} ({f['limiter']})" if f and f["ctas"] else ""
            ratio = f"{100 * e['tflops'] / f['tflops']:.0f}%" if f and f["ctas"] else ""
            out.append(f"| {g.name} | {d} | {e['ctas']} | {e['limiter']} | {cl['tensor']:.0f} / {cl['smem']:.0f} / "
                       f"{cl['mufu']:.0f} / {cl['fp32']:.0f} / {cl['issue']:.0f} | {e['tflops']:.0f} | {fs} | {ratio} |")
    out += ["", "Left out of the model: spills (listed above; each spilled value costs local-memory traffic), "
            "at head dim 256 the Q / dO loads not overlapping the step's products (single-buffered there for "
            "shared memory; double-buffered up to 128; the model assumes another resident CTA fills the wait), the atomics' L2 throughput, masks and dropout (element-wise work on "
            "partial tiles only), and the separate dQ pass of deterministic mode (not modelled).", "", END]
    return "\n".join(out)


def report(archs) -> str:
    rows, secs = gpu_model.ptxas_report(archs, source=SOURCE)
    return render(rows, secs)
