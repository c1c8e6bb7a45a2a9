"""Base layer: optional dependencies (``extras``), durable file I/O (``durable_io``), the bounded network probe
(``netcheck``). Imports nothing else of the package."""
