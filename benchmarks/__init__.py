"""Speed benchmarks. Each prints ratios measured within one run (the machine is shared
and noisy), never absolute targets baked into tests."""
