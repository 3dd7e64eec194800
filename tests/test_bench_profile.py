"""Smoke test of the per-step profiler (bench/profile.py): it serves real enrollments through the ASGI application
and accounts for every step; no timing assertions."""

from __future__ import annotations

from bench import profile
from scep.core import message


def test_the_profiler_times_every_step_of_real_enrollments(tmp_path, capsys):
    assert profile.main(["-n", "2", "--warmup", "1", "--cache-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    labels = [label for label, *_ in profile.STEPS if label]
    assert all(label in table for label in labels)
    assert "total per enrollment" in table
    assert message.parse_pki_message.__name__ == "parse_pki_message"  # the wrappers are taken off again
