"""Benchmarks behind ``nexus-sidecar bench``: each writes JSON, a markdown table and a PNG plot."""
