"""The benchmark harness behind `efficient-transformers bench`.

    from efficient_transformers.bench import BenchConfig, run_bench
    results = run_bench(BenchConfig(models=["transformer", "performer"], lengths=(256, 1024)))

config.py    what a run measures, defaults, the table of options tied to N
reference.py reference kernels (dense_sdpa, dense_sdpa_causal, flex_window,
             linear_chunked_causal)
peers.py     the public PyPI packages (imported lazily, only for --peers)
measure.py   one case in one process: timing and peak memory
worker.py    worker processes (fresh per case on CPU), per-case timeouts
runner.py    cases -> records
analysis.py  exponent fits, crossovers, ratios, the issue's targets
report.py    bench.json / bench.csv / bench.md / terminal table;  plots.py  PNG plots
"""

from .analysis import fit_exponent
from .config import BenchConfig
from .runner import run_bench

__all__ = ["BenchConfig", "fit_exponent", "run_bench"]
