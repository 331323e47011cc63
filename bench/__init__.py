"""Benchmarks of pytest-bridge against what a user would use instead (``python -m bench``).

Plain scripts, no benchmark framework: :mod:`bench.runner` orchestrates, :mod:`bench.loadtool`
is the stdlib-only load server/client (it also runs inside a pod), :mod:`bench.report` turns the
figures into the tables of BENCHMARKS.md. Not part of the installed distribution.
"""
