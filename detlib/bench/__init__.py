"""Benchmarks and recorded results: ``python -m detlib.bench SUBCOMMAND ...``.

Each subcommand is a module of this package that defines ``DESCRIPTION``, ``add_arguments(parser)``
and ``main(args)``.  Results recorded with ``--record`` land in ``data/`` next to the environment
they were measured in, so a learner without a GPU can read real GPU numbers.
"""
