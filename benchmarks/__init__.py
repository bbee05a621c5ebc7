"""Speed and memory measurements of the CAMEx layers and models (run as `python -m benchmarks.NAME`)."""
