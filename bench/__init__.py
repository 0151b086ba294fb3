"""Throughput and footprint benchmark of the agent (``make bench`` runs :mod:`bench.run`).

Modules:

- :mod:`bench.datagen`: a kubelet-shaped log tree of realistic, seeded CRI lines;
- :mod:`bench.phases`: the measurements (raw I/O loop, tail -> spool, tail -> spool -> file
  store, RSS and idle CPU with 200 quiet files);
- :mod:`bench.machine`: what the numbers were measured on;
- :mod:`bench.report`: the console table and ``docs/benchmarks.md``.
"""
