"""Speed, memory and FLOPs: the side-by-side benchmark, analytic FLOPs, BENCHMARKS.md."""
