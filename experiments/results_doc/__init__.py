"""``docs/results.md`` and the GPU table of ``docs/benchmarks.md``, generated from the committed ``results/``.

``python -m experiments.results_doc`` writes both; ``--check`` says whether the committed docs are what the committed
results give (a test runs it), so no number reaches the docs without a log behind it.

``results/`` layout (written by ``python -m experiments.gpu_evidence unpack``):

* ``runs/<name>/`` — one campaign run: ``run.json`` (command, commit, device, versions, timings, resolved config),
  ``config.yaml``, compact logs ``{metrics,forces,weibull}.jsonl.xz``, ``analysis.json``;
* ``checks/<device>-<hash>/`` — the CUDA checks for one kernel source hash: ``checks.json``, ``provenance.json``;
* ``bench/<name>/<device>-<hash>/`` — one benchmark: ``result.json`` (the script's ``--json``), ``provenance.json``;
* ``windows/<window>.json`` — each GPU window's manifest (what ran, what was skipped and why, measurements);
* ``dry_run/`` — the last CPU dry run of the pipeline, same layout: never evidence, shown as such;
* ``notes/<section>.md`` — hand-written commentary on a section (why we disagree with a paper, say), included
  under that section's generated text.

The document is a sequence of sections (:data:`SECTIONS`); each is a function of the loaded results that returns
Markdown, and says what is pending, and which command produces it, where the results are not there yet. A study
with its own results (a CPU study in ``results/cpu_study/``, a Muon study) adds its section function to the tuple:
it receives the :class:`Results` and reads its own folder from ``results.root``.
"""

from experiments.results_doc.gpu_sections import section_checks
from experiments.results_doc.loading import BENCH_BEGIN, BENCH_END, Results, RunResult, load_results
from experiments.results_doc.render import SECTIONS, generate, render_benchmarks, render_results, replace_block

__all__ = [
    "BENCH_BEGIN",
    "BENCH_END",
    "SECTIONS",
    "Results",
    "RunResult",
    "generate",
    "load_results",
    "render_benchmarks",
    "render_results",
    "replace_block",
    "section_checks",
]
