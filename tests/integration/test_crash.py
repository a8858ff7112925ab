"""Crash harness, short variant (``bench/crash.py`` runs the long one for ``make crash-test``).

A real ``pforte serve`` process is SIGKILLed five times under load and restarted; the simulator
re-delivers what was not answered 200. Counts only, never timings: every patient message stored
exactly once, every accepted staff message sent or marked for review, nothing sent twice unflagged.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

CRASH_PY = Path(__file__).resolve().parents[2] / "bench" / "crash.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pforte_bench_crash", CRASH_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.dsk("II.2", "I.11")
def test_crash_harness_kill9_under_load(db_kind: str, tmp_path: Path) -> None:
    crash = _harness()
    result = crash.crash_run(
        crash.Options(
            db=db_kind,
            kills=5,
            seconds=8.0,
            max_uptime=1.5,
            rate=30.0,
            staff_rate=6.0,
            patients=8,
            seed=5,
            drain_timeout=60.0,
            workdir=tmp_path / "crash",
        )
    )
    print(json.dumps(result))  # shown with -s; the counts are what the assertions check
    assert "harness_error" not in result, result
    assert result["violations"] == [], result
    assert result["kills"] >= 5
    assert result["patient_sent"] > 0
    assert result["patient_stored"] == result["patient_sent"]
    assert result["patient_duplicates"] == 0
    assert result["staff_accepted"] > 0
    assert result["staff_sent"] + result["staff_in_review"] == result["staff_accepted"]
    assert result["staff_lost"] == result["staff_failed"] == result["staff_sent_twice_unflagged"] == 0
    assert result["webhook_given_up"] == 0
    # every delivery was answered 200 in the end, so each has a delay until acknowledged
    assert result["webhook_ack_delay_s"]["all"]["count"] == result["webhook_deliveries"]
    # the audit chain written by transactions that raced kill -9 verifies, and holds their entries
    assert result["audit_chain"]["ok"] is True
    assert result["audit_chain"]["entries"] > 0
    assert result["ok"] is True
