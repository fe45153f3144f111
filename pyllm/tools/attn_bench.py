"""Attention forward, forward + backward (prefill) and decode throughput vs torch SDPA (flash backend) and flash-attn, in TFLOP/s.

Run by ``python -m pyllm gpu-check`` (stage ``attention``) on a GPU machine; ``--device cpu --quick``
runs the same code on tiny shapes (a test keeps it from rotting; CPU numbers mean nothing here).

FLOPs as FlashAttention counts them: forward 4 * B * H * Lq * Lk * D, halved with a causal mask.
% of peak uses the GPU's dense fp16/bf16 tensor-core peak (PEAKS, by device name; none: blank).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

# Dense fp16/bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets; H100/H200 figures are wgmma's).
PEAKS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_for(name: str) -> float | None:
    for k, v in PEAKS.items():
        if k in name:
            return v
    return None


def timeit(fn, device, reps: int) -> float:
    """Median seconds per call (CUDA events on GPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def flops(b, h, lq, lk, d, causal):
    f = 4.0 * b * h * lq * lk * d
    return f / 2 if causal and lq == lk else f


def cases(quick: bool, device) -> list[dict]:
    if quick:
        return [dict(kind="prefill", b=1, h=2, hkv=2, lq=64, lk=64, d=64, causal=c) for c in (False, True)] + [
            dict(kind="decode", b=1, h=4, hkv=1, lq=1, lk=128, d=64, causal=True)]
    out = []
    for d in (64, 128, 256):  # 256: the backward's two-CTAs-per-key-block instantiation
        for seq in (1024, 2048, 4096, 8192, 16384):
            b, h = max(1, 16384 // seq), 2048 // d  # FA2's benchmark: 16k tokens, hidden 2048
            for causal in (False, True):
                out.append(dict(kind="prefill", b=b, h=h, hkv=h, lq=seq, lk=seq, d=d, causal=causal))
    for lk in (1024, 4096, 16384):
        for lq in (1, 16):
            out.append(dict(kind="decode", b=8, h=32, hkv=8, lq=lq, lk=lk, d=128, causal=True))
    return out


def run(device: str = "cuda", quick: bool = False, dtypes=("float16", "bfloat16"), reps: int | None = None) -> list[dict]:
    import pyllm.functional as PF

    dev = torch.device(device)
    reps = reps or (3 if quick else 20)
    try:
        from flash_attn import flash_attn_func  # noqa: F401
        have_fa = True
    except Exception:  # noqa: BLE001 - optional
        have_fa = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_for(name)
    rows = []
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        for c in cases(quick, dev):
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randn(c["b"], c["h"], c["lq"], c["d"], generator=g).to(dev, dt)
            k = torch.randn(c["b"], c["hkv"], c["lk"], c["d"], generator=g).to(dev, dt)
            v = torch.randn(c["b"], c["hkv"], c["lk"], c["d"], generator=g).to(dev, dt)
            align = "bottom_right" if c["kind"] == "decode" else "top_left"
            gqa = c["h"] != c["hkv"]
            fl = flops(c["b"], c["h"], c["lq"], c["lk"], c["d"], c["causal"])

            def ours():
                return PF.scaled_dot_product_attention(q, k, v, is_causal=c["causal"], causal_alignment=align,
                                                       enable_gqa=gqa)

            def sdpa():
                if dev.type == "cuda" and c["lq"] == c["lk"]:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=c["causal"], enable_gqa=gqa)
                # decode (Lq < Lk, bottom-right causal = every key visible for q_len 1): no mask needed
                # at q_len 1; at q_len > 1 torch's is_causal is top-left, so pass the mask explicitly.
                m = None
                if c["causal"] and c["lq"] > 1:
                    m = torch.ones(c["lq"], c["lk"], dtype=torch.bool, device=dev).tril(c["lk"] - c["lq"])
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)

            row = dict(c, dtype=dt_name, device=name)
            t_ours = timeit(ours, dev, reps)
            t_sdpa = timeit(sdpa, dev, reps)
            row.update(ours_ms=t_ours * 1e3, sdpa_ms=t_sdpa * 1e3, ours_tflops=fl / t_ours / 1e12,
                       sdpa_tflops=fl / t_sdpa / 1e12, speedup_vs_sdpa=t_sdpa / t_ours)
            if have_fa and dev.type == "cuda":
                from flash_attn import flash_attn_func
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
                t_fa = timeit(lambda: flash_attn_func(qt, kt, vt, causal=c["causal"]), dev, reps)
                row.update(fa_ms=t_fa * 1e3, fa_tflops=fl / t_fa / 1e12)
            if c["kind"] == "prefill":  # training step: forward + backward (FA2's count: 3.5 x the forward's FLOPs)
                go = torch.randn(q.shape, generator=g).to(dev, dt)
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]

                def train(fn):
                    def step():
                        for t in leaves:
                            t.grad = None
                        fn(*leaves).backward(go)
                    return step

                t_ob = timeit(train(lambda q_, k_, v_: PF.scaled_dot_product_attention(
                    q_, k_, v_, is_causal=c["causal"], causal_alignment=align, enable_gqa=gqa)), dev, reps)
                t_sb = timeit(train(lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
                    q_, k_, v_, is_causal=c["causal"], enable_gqa=gqa)), dev, reps)
                row.update(ours_fb_ms=t_ob * 1e3, ours_fb_tflops=3.5 * fl / t_ob / 1e12,
                           sdpa_fb_tflops=3.5 * fl / t_sb / 1e12, fb_speedup_vs_sdpa=t_sb / t_ob)
            if peak:
                row["ours_pct_peak"] = 100 * row["ours_tflops"] / peak
            rows.append(row)
            del q, k, v
    return rows


def render(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    peak = peak_for(rows[0]["device"])
    out = [f"Device: {rows[0]['device']} (dense fp16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown'}).", "",
           "| dtype | kind | B x H (kv) | Lq x Lk | D | causal | pyllm ms | pyllm TFLOP/s | % peak | SDPA TFLOP/s "
           "| pyllm / SDPA speed | flash-attn TFLOP/s | fwd+bwd: pyllm TFLOP/s | SDPA TFLOP/s | pyllm / SDPA speed |",
           "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pct = f"{r['ours_pct_peak']:.0f}%" if "ours_pct_peak" in r else "-"
        fa = f"{r['fa_tflops']:.1f}" if "fa_tflops" in r else "-"
        fb = (f"{r['ours_fb_tflops']:.2f} | {r['sdpa_fb_tflops']:.2f} | {r['fb_speedup_vs_sdpa']:.2f}x"
              if "ours_fb_tflops" in r else "- | - | -")
        out.append(f"| {r['dtype']} | {r['kind']} | {r['b']} x {r['h']} ({r['hkv']}) | {r['lq']} x {r['lk']} | "
                   f"{r['d']} | {r['causal']} | {r['ours_ms']:.3f} | {r['ours_tflops']:.2f} | {pct} | "
                   f"{r['sdpa_tflops']:.2f} | {r['speedup_vs_sdpa']:.2f}x | {fa} | {fb} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyllm.tools.attn_bench", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--output", default=None, help="also write the markdown table here")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    text = render(run(a.device, a.quick))
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
