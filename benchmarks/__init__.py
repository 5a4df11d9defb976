"""Throughput and memory benchmarks of the meta-learning engines (``make bench``).

* :mod:`benchmarks.workloads`: the registry of workloads (what to build, which engines);
* :mod:`benchmarks.baselines`: hand-written reference implementations (the plain loop);
* :mod:`benchmarks.harness`: builds one workload x engine and times its meta-steps;
* :mod:`benchmarks.run`: the command line; runs every workload x engine in its own
  subprocess and writes ``benchmarks/results/*.json``.
"""
