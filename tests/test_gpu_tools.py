"""The GPU tooling that cannot run its real job here: the performance model (python -m pyllm
gpu-model) and the attention throughput benchmark (gpu-check's `attention` stage)."""
from __future__ import annotations

import pytest

from pyllm import _ext
from pyllm.tools import attn_bench, gpu_model

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_fwd_kernelI6__halfLi64EEEvNS1_8TcParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_fwd_kernelI6__halfLi64EEEvNS1_8TcParamsE
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 218 registers, used 1 barriers, 776 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_fwd_kernelI13__nv_bfloat16Li256EEEvNS1_8TcParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_fwd_kernelI13__nv_bfloat16Li256EEEvNS1_8TcParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 776 bytes cmem[0]
"""


def test_parse_ptxas():
    rows = gpu_model.parse_ptxas(PTXAS)
    assert [(r["arch"], r["dtype"], r["head_dim"], r["registers"], r["spill_stores"], r["spill_loads"], r["stack"])
            for r in rows] == [("sm_80", "fp16", 64, 218, 4, 12, 8), ("sm_90", "bf16", 256, 255, 0, 0, 0)]


CFG = {"head_dim": 128, "block_m": 64, "block_n": 64, "threads": 128, "smem": 80 * 1024, "q_in_regs": 0,
       "pitch": 16, "xor": 1}


def test_tile_work_counts_the_inner_loop():
    w = gpu_model.tile_work(CFG)
    # 4 warps x (S: 8 k-steps x 8 n-tiles + PV: 4 k-steps x 16 n-tiles) m16n8k16 products
    assert w["mma"] == 4 * (8 * 8 + 4 * 16)
    assert w["flops"] == 4 * 64 * 64 * 128  # 2 GEMMs of 64 x 64 x 128, 2 FLOP per FMA
    # ldmatrix.x4 (512 bytes): Q 8 + K 32 + V 32 per warp
    assert w["ldsm_bytes"] == 4 * (8 + 32 + 32) * 512
    assert w["cp_bytes"] == 2 * 64 * 128 * 2 and w["exps"] == 64 * 64


def test_occupancy_limits():
    a100, h100 = gpu_model.GPUS
    assert gpu_model.occupancy(CFG, 255, a100) == 2  # 80 KiB smem, 256 regs x 128 threads: 2 each
    assert gpu_model.occupancy(CFG, 128, h100) == 2  # 228 KiB / 81 KiB
    assert gpu_model.occupancy(dict(CFG, smem=200 * 1024), 64, a100) == 0
    e = gpu_model.estimate(CFG, 255, a100)
    assert e["ctas"] == 2 and e["bound"] == max(e["clocks"].values()) and 0 < e["pct_mma_peak"] <= 100


def test_write_section_replaces_only_the_generated_part(tmp_path):
    p = tmp_path / "GPU.md"
    p.write_text(f"# title\n\nhand text\n\n{gpu_model.BEGIN}\nold\n{gpu_model.END}\n\ntail\n")
    gpu_model.write_section(str(p), f"{gpu_model.BEGIN}\nnew\n{gpu_model.END}")
    text = p.read_text()
    assert "hand text" in text and "tail" in text and "new" in text and "old" not in text


@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"reads the tile configs from pyllm._C_emu ({_ext.C_EMU_ERROR})")
def test_configs_come_from_the_kernel_and_fit_the_targets():
    cfgs = {c["head_dim"]: c for c in gpu_model.configs()}
    assert sorted(cfgs) == [32, 64, 96, 128, 160, 192, 256]
    assert cfgs[128]["smem"] <= 99 * 1024, "issue 11's target: <= 99 KiB of shared memory at head dim 128"
    for d, c in cfgs.items():
        assert c["smem"] <= 163 * 1024, f"head dim {d} does not fit an A100 CTA"
        # conflict-free layout: a multiple of 8 chunks with the XOR swizzle, else an odd pitch
        assert (c["xor"] and c["pitch"] % 8 == 0) or (not c["xor"] and c["pitch"] % 2 == 1)
    rendered = gpu_model.render(gpu_model.parse_ptxas(PTXAS), 1.0)
    assert rendered.startswith(gpu_model.BEGIN) and rendered.endswith(gpu_model.END)
    assert f"| 64 | {gpu_model.tile_work(cfgs[64])['mma']} |" in rendered  # the per-tile table, every head dim


@pytest.mark.skipif(not _ext.HAS_C, reason=f"times pyllm's native attention ({_ext.C_ERROR})")
def test_attn_bench_runs_on_cpu():
    rows = attn_bench.run("cpu", quick=True, dtypes=("float32",), reps=1)
    assert {r["kind"] for r in rows} == {"prefill", "decode"}
    assert all(r["ours_tflops"] > 0 and r["sdpa_tflops"] > 0 for r in rows)
    assert all(r["ours_fb_tflops"] > 0 and r["sdpa_fb_tflops"] > 0 for r in rows if r["kind"] == "prefill")
    text = attn_bench.render(rows)
    assert text.count("\n| float32 |") == len(rows)
    assert attn_bench.flops(1, 2, 8, 8, 4, causal=True) == 4 * 2 * 8 * 8 * 4 / 2
    assert attn_bench.peak_for("NVIDIA H200") == 989.0 and attn_bench.peak_for("cpu") is None


# ----------------------------------------------------------------------------- memory-bound norms
def _norm_rows(regs_warp=56, regs_block=32):
    """parse_ptxas-shaped rows for every forward instantiation the norm model reads, both archs."""
    rows = []
    for arch in ("sm_80", "sm_90"):
        for ctype in ("float", "__nv_bfloat16"):
            for w in ("true", "false"):
                regs = regs_warp if w == "true" else regs_block
                for res in ("true", "false"):
                    rows.append({"arch": arch, "registers": regs, "spill_stores": 0, "spill_loads": 0,
                                 "kernel": f"void pyllm::cuda::(anonymous namespace)::layer_norm_fwd_kernel<{ctype}, {w}, {res}>(x)"})
                rows.append({"arch": arch, "registers": regs, "spill_stores": 0, "spill_loads": 0,
                             "kernel": f"void pyllm::cuda::(anonymous namespace)::rms_norm_fwd_kernel<{ctype}, {ctype}, {w}>(x)"})
    return rows


@pytest.mark.skipif(not _ext.HAS_EMU, reason="emulated CUDA module not built")
def test_norm_row_plan_is_the_kernels():
    """The model asks the C++ which path a width takes; the limits are the kernel's (norm.cu)."""
    from pyllm.tools import gpu_model_norms as m

    assert m.row_plan(1024, 4) == (True, 32, True)       # 32 lanes x 32 elements
    assert m.row_plan(1028, 4) == (False, 160, True)     # block mode from 1025: ceil(n / 8) threads, to 32
    assert m.row_plan(1025, 4) == (False, 160, True)     # any width: a scalar head and tail
    assert m.row_plan(8192, 2) == (False, 1024, True)    # 1024 threads x 8 elements
    assert m.row_plan(8199, 2)[2] is True                # 1024 chunks of 8 and a tail of 7
    assert m.row_plan(8200, 2)[2] is False               # 1025 chunks: past 8 x 1024
    assert m.row_plan(16384, 4)[2] is False


@pytest.mark.skipif(not _ext.HAS_EMU, reason="emulated CUDA module not built")
def test_norm_model_bandwidth_estimates():
    from pyllm.tools import gpu_model_norms as m

    a100, h100 = m.HBMS
    e = m.estimate("rms_norm", 4096, 2, 32, a100)
    assert e["regs_path"] and e["threads"] == 512 and e["resident"] == 2048
    assert e["inflight"] == 2048 * 8 * 2 and e["frac"] == pytest.approx(m.DRAM_EFFICIENCY)
    assert e["hbm_bytes"] == 2 * 4096 * 2
    wide = m.estimate("layer_norm", 16384, 2, 32, h100)  # element loops: 2 bytes in flight per thread
    assert not wide["regs_path"] and wide["passes"] == 3
    assert wide["frac"] == pytest.approx(m.DRAM_EFFICIENCY * 2048 * 2 / wide["need"])
    assert m.estimate("add_layer_norm", 4096, 4, 32, a100)["hbm_bytes"] == 4 * 4096 * 4
    # registers limit residency: 255 registers x 128 threads -> 2 blocks of 4 rows
    assert m.estimate("rms_norm", 1024, 4, 255, a100)["resident"] == 256
    text = m.render(_norm_rows(), 1.0)
    assert text.startswith(m.BEGIN) and text.endswith(m.END)
    assert "| layer_norm_fwd_kernel (add_layer_norm) | sm_90 | 56 / 32 | 56 / 32 | 0 |" in text
    assert "| A100 SXM4 80GB | add_rms_norm | bf16 | 8192 | registers | 1024 | 2048 |" in text


# ------------------------------------------------------------------------------ backward model
BWD_PTXAS = """\
ptxas info    : Compiling entry function '_ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_bwd_kernelI6__halfLi64EEEvNS1_11TcBwdParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_bwd_kernelI6__halfLi64EEEvNS1_11TcBwdParamsE
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 228 registers, used 1 barriers, 856 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_bwd_kernelI13__nv_bfloat16Li64EEEvNS1_11TcBwdParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5pyllm4cuda12_GLOBAL__N_118attn_tc_bwd_kernelI13__nv_bfloat16Li64EEEvNS1_11TcBwdParamsE
    32 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 230 registers, used 1 barriers, 856 bytes cmem[0]
"""


def test_bwd_step_work_counts_the_kernel_loops():
    from pyllm.tools import gpu_model_bwd as m

    c = {"head_dim": 64, "keys": 64, "queries": 32, "threads": 128, "smem": 40 * 1024}
    w = m.step_work(c)
    # five products of 64 keys x 32 queries x 64: 5 x (4 x 4 x 4) m16n8k16
    assert w["mma"] == 5 * (64 // 16) * (32 // 8) * (64 // 16)
    assert w["flops"] == 5 * 2 * 64 * 32 * 64
    # per warp: S^T/dP^T 4 k-steps x (K + V + 2 x (Q + dO)); dV/dK 2 x 4 x 2; dQ: 4 key steps x (dS A
    # + 2 K B) per warp (2 row blocks x 2 column halves)
    assert w["ldsm_bytes"] == (4 * 4 * (2 + 2 * 2) + 4 * 2 * 4 * 2 + 4 * 4 * (1 + 2)) * 512
    assert w["atomics"] == 32 * 64 and w["exps"] == 64 * 32 and w["cp_bytes"] == 2 * 32 * 64 * 2


def test_bwd_step_work_counts_the_split_column_parts():
    """Head dim 256 in two column parts: each CTA runs S^T and dP^T over all 256 columns and dV, dK,
    dQ over its 128; only the useful share counts as FLOPs."""
    from pyllm.tools import gpu_model_bwd as m

    c = {"head_dim": 256, "keys": 64, "queries": 16, "threads": 128, "smem": 84 * 1024, "split": 2}
    w = m.step_work(c)
    tiles = (64 // 16) * (16 // 8)  # m16n8 output tiles of keys x queries
    assert w["mma"] == 2 * tiles * (256 // 16) + 3 * tiles * (128 // 16)
    assert w["flops"] == 5 * 2 * 64 * 16 * 256 // 2
    # per warp: S^T/dP^T 16 k-steps x (K + V + Q + dO); dV/dK 1 x 8 x 2; dQ: 4 key steps x 1 dS A per
    # warp + 4 x 8 K B (one row block; the 8 column pairs split over 4 warps)
    assert w["ldsm_bytes"] == (4 * 16 * (2 + 2) + 4 * 8 * 2 + (4 * 4 + 4 * 8)) * 512
    assert w["atomics"] == 16 * 128 and w["exps"] == 64 * 16 and w["cp_bytes"] == 2 * 16 * 256 * 2


@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"reads the tile configs from pyllm._C_emu ({_ext.C_EMU_ERROR})")
def test_bwd_model_renders_from_the_kernel_configs():
    from pyllm.tools import gpu_model_bwd as m

    cfgs = {c["head_dim"]: c for c in m.configs()}
    assert sorted(cfgs) == [64, 128, 256] and all(c["keys"] == 64 and c["threads"] == 128 for c in cfgs.values())
    assert [cfgs[d]["split"] for d in (64, 128, 256)] == [1, 1, 2]
    assert [cfgs[d]["dq_keys"] for d in (64, 128, 256)] == [64, 32, 16]  # deterministic dQ pass: registers
    assert all(c["dq_smem"] <= 80 * 1024 for c in cfgs.values())  # two CTAs per A100 SM
    for d, c in cfgs.items():
        assert c["smem"] <= 99 * 1024, f"head dim {d}: two CTAs per A100 SM need <= ~80 KiB each"
    rows = gpu_model.parse_ptxas(BWD_PTXAS)
    text = m.render(rows, 1.0)
    assert text.startswith(m.BEGIN) and text.endswith(m.END)
    assert "| 64 | 64 x 32 | 1 |" in text and "| 228 / 230 | 0 / 12 |" in text
    e = m.estimate(cfgs[64], 230, gpu_model.GPUS[0])
    f = m.estimate(m.FA2_BWD_TILES[64], 255, gpu_model.GPUS[0])
    assert e["ctas"] >= 1 and f["ctas"] >= 1 and 0 < e["tflops"] < 312 and 0 < f["tflops"] < 312
