"""GPU evidence windows: ``python -m experiments.gpu_evidence prepare | run | unpack | status`` (docs/gpu_evidence.md).

``cli`` holds the commands; a window's parts are ``checks``, ``benchmarks`` and ``campaign_runs``, sharing the
:class:`~experiments.gpu_evidence.window.Window` they write into."""
