"""pyllm's tooling, apart from the library core: the benchmark (``bench``, ``hf_bench``), the
GPU-day check (``gpu_check``, ``sanitize``), the demos (``demo``, ``train_demo``) and their
helpers (``timing``, ``plot``).

Nothing in the library core (``pyllm.functional``, ``pyllm.ops``, ``pyllm.nn``, ``pyllm.hf``,
``pyllm.models``) imports this package; it is reached through ``python -m pyllm
bench|gpu-check|demo|train-demo`` (see ``pyllm/__main__.py``) and may depend on packages the
core does not need (matplotlib, tqdm, transformers).
"""
