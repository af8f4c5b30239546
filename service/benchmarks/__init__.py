"""Measuring genserve from outside, as its clients see it: the load tester, a local server for whole workloads
through gRPC, and the side-by-side comparison with llama.cpp's server. Serving never imports this package."""
