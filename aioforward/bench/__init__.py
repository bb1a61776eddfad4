"""aioforward's benchmark suite: every pool against the alternatives, in one run.

    python -m aioforward bench [--quick | --smoke] [--only SCENARIO ...] [--out DIR]

Needs the bench extra (``pip install 'aioforward[bench]'``). Writes DIR/results.json (every
raw figure), DIR/report.md (the table of targets) and DIR/report.png (overheads, speed-ups,
loop lag). Each figure is a median over repeats after a warm-up; each target is a ratio
against a baseline measured in the same run, since absolute times drift on shared machines.

Layout: ``_cli`` (options, the run), ``_scenarios`` (what is measured), ``_measure`` (how:
timing loops and the run's figures), ``_alternatives`` (what the alternatives run in their
worker processes, importable by name), ``_report`` (targets, files, plot).
"""

from ._cli import main as main

__all__ = ("main",)
