"""Command line: ``python -m pyllm {info,selftest,env,demo,bench,gpu-check,gpu-model,train-demo,soak,fuzz}``.

Everything but ``info`` is tooling in :mod:`pyllm.tools`, imported only when its command runs."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyllm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print build information and available backends")
    sub.add_parser("selftest", help="does this installation work: every op's kernel vs torch in fp64 (torch only)")
    e = sub.add_parser("env", help="what a bug report needs: versions, CPU features, CUDA archs, kernels, backends")
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    d = sub.add_parser("demo", help="the main demo: a real Hugging Face model on pyllm kernels")
    d.add_argument("--model", default=None, help="path of a local HF model (default: the bundled MiniLM)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    b = sub.add_parser("bench", help="benchmarks vs the strongest torch baselines")
    b.add_argument("--ops", nargs="*", default=None,
                   help="ops to benchmark, by op registry name (pyllm.ops.specs(), e.g. layer_norm masked_softmax; "
                        "'attention' = scaled_dot_product_attention); default: every registered op")
    b.add_argument("--models", action="store_true", help="model-level benchmarks (Hugging Face)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (CI smoke run)")
    b.add_argument("--output", default="docs/benchmarks.md", help="markdown file to write ('' = none)")
    b.add_argument("--csv", default=None, metavar="PATH", help="write this run's rows (one per measurement) as CSV")
    b.add_argument("--json", default=None, metavar="PATH", help="write machine, limits, rows and size sweep as JSON")
    b.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots here (default: img/ next to --output on full runs, none on --quick; '' = none)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is not a TTY)")
    g = sub.add_parser("gpu-check", help="on a GPU machine: tests, sanitizer, benchmarks -> one report")
    g.add_argument("--report", default="gpu_report.md")
    gm = sub.add_parser("gpu-model", help="no GPU needed: ptxas registers/spills + the tensor-core attention's "
                                          "performance model on paper (docs/GPU.md)")
    gm.add_argument("--archs", default="80,90", help="compute capabilities to compile for (default 80,90)")
    gm.add_argument("--write", default=None, metavar="PATH",
                    help="replace the generated section of this markdown file (e.g. docs/GPU.md)")
    t = sub.add_parser("train-demo", help="train a tiny decoder-only LM and a classifier")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--out", default="train_demo_out")
    s = sub.add_parser("soak", help="every op forward+backward for N seconds, reporting RSS (leak check)")
    s.add_argument("--seconds", type=float, default=60.0)
    s.add_argument("--hf-cycles", type=int, default=200, help="pyllm.hf.optimize + revert cycles (0 = skip)")
    s.add_argument("--max-growth-mib", type=float, default=8.0, help="fail above this RSS growth after warm-up")
    f = sub.add_parser("fuzz", help="hypothesis campaign: every op vs the fp64 torch oracle (native, emulated CUDA)")
    f.add_argument("--seed", type=int, default=0, help="campaign seed (each round's hypothesis seed derives from it)")
    f.add_argument("--seconds", type=float, default=None,
                   help="time budget for the whole campaign, split over the (op, backend) pairs "
                        "(default 60 unless --max-examples is given)")
    f.add_argument("--ops", default=None, help="comma-separated op registry names (default: every registered op)")
    f.add_argument("--backend", default="all", help="native, cuda-emulated or all (default)")
    f.add_argument("--max-examples", type=int, default=None, help="at most this many examples per op and backend")
    f.add_argument("--keep-going", action="store_true",
                   help="after a failure, go on with new rounds and report every distinct failure")
    args = p.parse_args(argv)

    if args.cmd == "info":
        import pyllm

        info = pyllm.build_info()
        info["backends"] = pyllm.available_backends()
        info["current_backend"] = pyllm.current_backend()
        print(json.dumps(info, indent=2))
        return 0
    if args.cmd == "selftest":
        from .tools.selftest import main as selftest_main

        return selftest_main(args)
    if args.cmd == "env":
        from .tools.env import main as env_main

        return env_main(args)
    if args.cmd == "demo":
        from .tools.demo import main as demo_main

        return demo_main(args)
    if args.cmd == "bench":
        from .tools.bench import main as bench_main

        return bench_main(args)
    if args.cmd == "gpu-check":
        from .tools.gpu_check import main as gpu_main

        return gpu_main(args)
    if args.cmd == "gpu-model":
        from .tools.gpu_model import main as model_main

        return model_main(args)
    if args.cmd == "soak":
        from .tools.soak import main as soak_main

        return soak_main(args)
    if args.cmd == "fuzz":
        from .tools.fuzz import main as fuzz_main

        return fuzz_main(args)
    if args.cmd == "train-demo":
        from .tools.train_demo import main as train_main

        return train_main(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
