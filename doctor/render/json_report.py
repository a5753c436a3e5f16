"""The JSON report (schema version 1), documented in report.schema.json."""
from __future__ import annotations

from .. import __version__
from ..env import Env
from ..finding import Report, Severity

SCHEMA_VERSION = 1


def to_json(report: Report, env: Env, threshold: Severity = Severity.ERROR) -> dict:
    counts = report.counts()
    return {
        "schema": SCHEMA_VERSION,
        "tool": {
            "name": "adapter-doctor",
            "version": __version__,
            "target_peft": {"version": env.peft, "source": env.peft_source},
            "target_transformers": {"version": env.transformers, "source": env.transformers_source},
        },
        "targets": [
            {"path": t.path, "kind": t.kind, "error": t.error, "findings": [f.to_dict() for f in t.findings]}
            for t in report.targets
        ],
        "summary": {
            "targets": len(report.targets),
            "errors": counts["error"],
            "warnings": counts["warning"],
            "infos": counts["info"],
            "unreadable": sum(1 for t in report.targets if t.error),
            "exit_code": report.exit_code(threshold),
        },
    }
