"""Report generator: MLflow runs -> the paper's tables and figures (`python -m camex.report`).

Reads MLflow only (never torch or the training code), so it runs on a laptop against a remote
tracking server. Modules: `collect` (runs from MLflow), `aggregate` (over seeds), `layout` (rows
and columns of the paper's tables), `reference` (published values), `significance` (Welch's
t-test of each curvature-aware row against its Euclidean twin), `tables` (Markdown, LaTeX,
CSV), `figures` (PNG, SVG), `html` (one self-contained page), `build` (all of it).
"""
