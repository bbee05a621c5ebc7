"""Report generator: MLflow runs -> the paper's tables and figures (`python -m camex.report`).

Reads MLflow only (never torch or the training code), so it runs on a laptop against a remote
tracking server. Modules: `collect` (runs from MLflow), `aggregate` (over seeds), `layout` (rows
and columns of the paper's tables), `reference` (published values), `significance` (paired
tests by seed, Welch where unpairable, Holm; verdicts), `tables` (cells, comparison and
efficiency tables; Markdown, LaTeX, CSV), `verdicts` (one per published cell), `findings` (one
sentence per comparison), `figures` (PNG, SVG), `html` (one self-contained page), `build` (all of it).
"""
