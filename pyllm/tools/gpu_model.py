"""``python -m pyllm gpu-model``: the tensor-core attention forward's performance model, on paper.

No GPU is needed. Two inputs, both produced by the code rather than typed in:

* ``nvcc -Xptxas -v`` on csrc/cuda/attention_tc.cu for sm_80 and sm_90: registers, spills and
  stack per instantiation (what ptxas decides; the only GPU-performance facts a machine without a
  GPU can measure);
* the kernel's own tile configuration (``pyllm._C_emu.attention_tc_configs()``, read from the C++
  templates): query rows and keys per tile, threads, dynamic shared memory.

From them and each GPU's published limits it derives CTAs per SM, the per-tile work of the inner
loop (tensor-core FLOPs, ldmatrix/cp.async bytes, exponentials, FP32 instructions) and an
estimate of the steady-state forward throughput at long sequences, printed next to
FlashAttention-2's published figures. ``--write docs/GPU.md`` replaces the generated section of
that file. Everything the model leaves out is listed in the section it writes.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = "csrc/cuda/attention_tc.cu"
BEGIN, END = "<!-- gpu-model:begin -->", "<!-- gpu-model:end -->"


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: str            # sm_XX
    sms: int
    clock_ghz: float     # the clock the vendor's peak figure uses
    mma_fma_per_clk_sm: int  # dense fp16/bf16 FMA per clock per SM reachable with mma.sync
    smem_per_sm: int     # bytes usable by CTAs
    smem_per_cta: int    # opt-in maximum per CTA
    regs_per_sm: int = 65536
    max_warps_sm: int = 64
    max_ctas_sm: int = 32
    smem_bytes_clk: int = 128   # shared-memory bandwidth per SM
    mufu_per_clk_sm: int = 16   # ex2 lanes per SM per clock
    fp32_per_clk_sm: int = 64   # FP32 lanes per SM per clock
    issue_per_clk_sm: int = 4   # warp instructions issued per SM per clock (one per sub-partition)
    fa2_tflops: str = ""
    note: str = ""

    @property
    def mma_peak_tflops(self) -> float:
        return 2 * self.mma_fma_per_clk_sm * self.sms * self.clock_ghz / 1e3


# Published limits (NVIDIA A100 / H100 whitepapers, CUDA C Programming Guide "Compute
# capabilities"). H100's 989 TFLOP/s dense fp16 peak needs wgmma; this kernel issues mma.sync,
# which the model assumes runs at half that rate (an assumption, to be replaced by gpu-check).
GPUS = [
    Gpu("A100 SXM4", "sm_80", 108, 1.41, 1024, 164 * 1024, 163 * 1024,
        fa2_tflops="~190 (d=64) to ~230 (d=128)",
        note="312 TFLOP/s dense fp16 peak"),
    Gpu("H100 SXM5", "sm_90", 132, 1.83, 1024, 228 * 1024, 227 * 1024,
        fa2_tflops="~335 (d=128)",
        note="989 TFLOP/s dense fp16 peak with wgmma; mma.sync assumed at half that (495)"),
]


# ------------------------------------------------------------------------------ ptxas
def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def ptxas_report(archs=("80", "90"), source=SOURCE) -> tuple[list[dict], float]:
    """Compiles `source` with -Xptxas -v for each arch; returns (rows, seconds)."""
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    from torch.utils import cpp_extension

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    incs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    incs += cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
    cmd = [nvcc, "-c", os.path.join(ROOT, source), "-o", os.devnull, "-O3", "--use_fast_math",
           "--expt-relaxed-constexpr", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-D__CUDA_NO_HALF_OPERATORS__",
           "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "--compiler-options", "-fPIC", "-Xptxas", "-v"] + [f"-I{i}" for i in incs]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    secs = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed ({p.returncode}):\n{p.stdout[-4000:]}")
    return parse_ptxas(p.stdout), secs


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    try:
        p = subprocess.run(["c++filt"], input="\n".join(names), stdout=subprocess.PIPE, text=True, check=True)
        out = p.stdout.splitlines()
        return out if len(out) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v output -> [{kernel, arch, registers, stack, spill_stores, spill_loads}]."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    for r, name in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = name
        m = re.search(r"attn_tc_fwd_kernel<(__half|__nv_bfloat16), (\d+)>", name)
        r["dtype"] = {"__half": "fp16", "__nv_bfloat16": "bf16"}.get(m.group(1)) if m else None
        r["head_dim"] = int(m.group(2)) if m else None
    return rows


# ------------------------------------------------------------------------------ model
def configs() -> list[dict]:
    import pyllm._C_emu as emu

    keys = ["head_dim", "block_m", "block_n", "threads", "smem", "q_in_regs", "pitch", "xor"]
    return [dict(zip(keys, row)) for row in emu.attention_tc_configs()]


def tile_work(c: dict) -> dict:
    """Work of one CTA for one key tile in the steady state (no masking, no dropout)."""
    d, n, warps = c["head_dim"], c["block_n"], c["threads"] // 32
    rows_per_warp = c["block_m"] // warps
    mt = rows_per_warp // 16                      # m16 tiles per warp
    mma = warps * mt * 2 * (d // 16) * (n // 8)   # QK^T and PV, m16n8k16 each
    ldsm_x4 = warps * ((0 if c["q_in_regs"] else mt * d // 16) + (d // 16) * (n // 16) + (n // 16) * (d // 16))
    cp_bytes = 2 * n * d * 2                      # K and V tiles, fp16/bf16
    scan_bytes = n * d * 2 if c.get("v_check", 1) else 0  # pyllm's non-finite check of V (16-byte loads)
    elems = c["block_m"] * n                      # scores
    exps = elems
    # FP32 instructions per score: scale (FMUL), max (FMNMX), subtract (FADD), row sum (FADD),
    # half of a pack-convert (F2F.PACK); plus the O rescale (one FMUL per accumulator).
    fp32 = elems * 4.5 + c["block_m"] * d
    return {"mma": mma, "flops": mma * 2 * 16 * 8 * 16, "ldsm_bytes": ldsm_x4 * 512, "cp_bytes": cp_bytes,
            "scan_bytes": scan_bytes, "exps": exps, "fp32": fp32,
            "instr": (mma + ldsm_x4) * 32 + exps + fp32 + (cp_bytes + scan_bytes) / 16}


# FlashAttention-2's own tile shapes for the A100 forward (flash_fwd_launch_template.h, non-causal, no
# dropout): head dim 64: 128 x 128 keys, 4 warps; 128: 128 x 64, 4 warps; K and V single-buffered,
# Q from shared memory. Put through the same model, they calibrate its optimism against FA2's
# published throughput.
FA2_TILES = {64: dict(head_dim=64, block_m=128, block_n=128, threads=128, q_in_regs=0, v_check=0),
             128: dict(head_dim=128, block_m=128, block_n=64, threads=128, q_in_regs=0, v_check=0)}
for _c in FA2_TILES.values():
    _c["smem"] = 2 * _c["head_dim"] * (_c["block_m"] + 2 * _c["block_n"])
FA2_PUBLISHED = {("sm_80", 64): 190.0, ("sm_80", 128): 230.0, ("sm_90", 128): 335.0}


def occupancy(c: dict, regs: int, g: Gpu) -> int:
    warps = c["threads"] // 32
    by_regs = g.regs_per_sm // (((regs + 7) // 8 * 8) * c["threads"])  # registers allocate in units of 8 per thread
    by_smem = g.smem_per_sm // (c["smem"] + 1024)                       # 1 KiB reserved per CTA
    by_warps = g.max_warps_sm // warps
    return max(0, min(by_regs, by_smem, by_warps, g.max_ctas_sm))


def estimate(c: dict, regs: int, g: Gpu) -> dict:
    """Steady-state clocks per SM to run one key tile in every resident CTA, per resource; the
    estimate is the largest of them (perfect overlap between resident warps), plus, when a
    single CTA is resident, the part of one warp's chain that nothing else can hide."""
    ctas = occupancy(c, regs, g)
    w = tile_work(c)
    if ctas == 0:
        return {"ctas": 0}
    k = ctas
    clocks = {
        "tensor": k * w["mma"] * 2048 / g.mma_fma_per_clk_sm,
        "smem": k * (w["ldsm_bytes"] + w["cp_bytes"] + w["scan_bytes"]) / g.smem_bytes_clk,
        "mufu": k * w["exps"] / g.mufu_per_clk_sm,
        "fp32": k * w["fp32"] / g.fp32_per_clk_sm,
        "issue": k * w["instr"] / 32 / g.issue_per_clk_sm * 32 / 32,
    }
    bound = max(clocks.values())
    limiter = max(clocks, key=clocks.get)
    if ctas == 1:  # no second CTA to fill one warp's softmax with another's mma
        serial = clocks["tensor"] + clocks["mufu"] + clocks["fp32"]
        bound = max(bound, serial)
        limiter = "serial (1 CTA/SM)" if serial >= bound else limiter
    tflops = k * w["flops"] * g.sms * g.clock_ghz * 1e9 / bound / 1e12
    return {"ctas": ctas, "clocks": clocks, "bound": bound, "limiter": limiter, "tflops": tflops,
            "pct_mma_peak": 100 * tflops / g.mma_peak_tflops}


# ------------------------------------------------------------------------------ report
def render(rows: list[dict], secs: float) -> str:
    cfg = {c["head_dim"]: c for c in configs()}
    by = {(r["arch"], r["dtype"], r["head_dim"]): r for r in rows if r.get("head_dim")}
    out = [BEGIN, "", "Generated by `python -m pyllm gpu-model --write docs/GPU.md` "
           f"(nvcc -Xptxas -v on `{SOURCE}`, {secs:.0f} s; tile configuration from the C++ templates). "
           "Do not edit by hand.", ""]
    out += ["### Registers, spills, shared memory, occupancy", "",
            "| head dim | rows x keys per tile | smem / CTA | Q in regs | arch | regs fp16 / bf16 | spill bytes (st+ld) fp16 / bf16 | CTAs/SM |",
            "|---:|---|---:|---|---|---|---|---:|"]
    for d, c in sorted(cfg.items()):
        for g in GPUS:
            a = g.arch
            h, b = by.get((a, "fp16", d)), by.get((a, "bf16", d))
            if not h or not b:
                continue
            regs = max(h["registers"], b["registers"])
            sp = lambda r: r["spill_stores"] + r["spill_loads"]  # noqa: E731
            out.append(f"| {d} | {c['block_m']} x {c['block_n']} | {c['smem'] / 1024:.1f} KiB | "
                       f"{'yes' if c['q_in_regs'] else 'no'} | {a} | {h['registers']} / {b['registers']} | "
                       f"{sp(h)} / {sp(b)} | {occupancy(c, regs, g)} |")
    out += ["", "### Per key tile, per CTA (steady state, no mask)", "",
            "| head dim | m16n8k16 mma | tensor FLOP | ldmatrix bytes | cp.async bytes | V check bytes | exp2 | FP32 instr |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d, c in sorted(cfg.items()):
        w = tile_work(c)
        out.append(f"| {d} | {w['mma']} | {w['flops'] / 1e6:.2f} M | {w['ldsm_bytes'] / 1024:.0f} KiB | "
                   f"{w['cp_bytes'] / 1024:.0f} KiB | {w['scan_bytes'] / 1024:.0f} KiB | {w['exps']} | {w['fp32']:.0f} |")
    out += ["", "### Estimated forward throughput, long sequences (2k-16k), no mask", "",
            "A model, not a measurement. FA2 columns: published figures (FlashAttention-2 paper), fp16, "
            "non-causal, same GPU.", "",
            "| GPU | head dim | CTAs/SM | limiter | clocks/tile: tensor / smem / exp2 / fp32 / issue | estimate TFLOP/s | % of mma peak | FA2 published | estimate / FA2 |",
            "|---|---:|---:|---|---|---:|---:|---|---:|"]
    fa2 = FA2_PUBLISHED
    calibrated = []
    for g in GPUS:
        for d, c in sorted(cfg.items()):
            h, b = by.get((g.arch, "fp16", d)), by.get((g.arch, "bf16", d))
            if not h or not b:
                continue
            e = estimate(c, max(h["registers"], b["registers"]), g)
            if not e["ctas"]:
                out.append(f"| {g.name} | {d} | 0 | does not fit | | | | | |")
                continue
            cl = e["clocks"]
            ref = fa2.get((g.arch, d))
            ref_s = f"{ref:.0f}" if ref else ""
            if ref and d in FA2_TILES:
                f = estimate(FA2_TILES[d], 255, g)
                calibrated.append((g, d, e, f, ref))
            ratio = f"{100 * e['tflops'] / ref:.0f}%" if ref else ""
            out.append(f"| {g.name} | {d} | {e['ctas']} | {e['limiter']} | "
                       f"{cl['tensor']:.0f} / {cl['smem']:.0f} / {cl['mufu']:.0f} / {cl['fp32']:.0f} / {cl['issue']:.0f} | "
                       f"{e['tflops']:.0f} | {e['pct_mma_peak']:.0f}% | {ref_s} | {ratio} |")
    out += ["", "### Calibrated against FlashAttention-2", "",
            "The same model applied to FA2's own tile shapes (A100 launch configuration: 128 query rows x "
            "128 keys at head dim 64, 128 x 64 at 128; 4 warps, so 32 rows per warp) gives the model's "
            "optimism for a kernel of this family; the prediction scales FA2's published figure by "
            "(this kernel's estimate / FA2's estimate).", "",
            "| GPU | head dim | this kernel, model | FA2 tiles, model (limiter) | FA2 published | predicted TFLOP/s | predicted / FA2 |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for g, d, e, f, ref in calibrated:
        pred = ref * e["tflops"] / f["tflops"]
        out.append(f"| {g.name} | {d} | {e['tflops']:.0f} | {f['tflops']:.0f} ({f['limiter']}) | {ref:.0f} | "
                   f"{pred:.0f} | {100 * pred / ref:.0f}% |")
    out += ["", "GPU limits used: " + "; ".join(
        f"{g.name} ({g.arch}): {g.sms} SMs at {g.clock_ghz} GHz, {g.mma_fma_per_clk_sm} mma FMA/clk/SM "
        f"(= {g.mma_peak_tflops:.0f} TFLOP/s; {g.note}), {g.smem_per_sm // 1024} KiB smem/SM, "
        f"{g.smem_bytes_clk} B/clk smem, {g.mufu_per_clk_sm} ex2/clk, {g.fp32_per_clk_sm} FP32/clk" for g in GPUS), "",
        END]
    return "\n".join(out)


def write_section(path: str, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the text between the markers `begin` and `end` (appends the section if absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(args) -> int:
    try:
        rows, secs = ptxas_report(tuple(a.strip() for a in args.archs.split(",")))
    except RuntimeError as e:
        print(f"gpu-model: {e}", file=sys.stderr)
        return 1
    section = render(rows, secs)
    print(section)
    from . import gpu_model_bwd, gpu_model_norms

    archs = tuple(a.strip() for a in args.archs.split(","))
    try:
        bwd = gpu_model_bwd.report(archs)
        norms = gpu_model_norms.report(archs)
    except RuntimeError as e:
        print(f"gpu-model: {e}", file=sys.stderr)
        return 1
    print(bwd)
    print(norms)
    if args.write:
        write_section(args.write, section)
        write_section(args.write, bwd, gpu_model_bwd.BEGIN, gpu_model_bwd.END)
        write_section(args.write, norms, gpu_model_norms.BEGIN, gpu_model_norms.END)
        print(f"[gpu-model] wrote the generated sections of {args.write}")
    return 0
