"""SARIF 2.1.0 output, for code-scanning dashboards."""
from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from ..checks import Check, all_checks
from ..finding import Report

_LEVEL = {"error": "error", "warning": "warning", "info": "note"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _uri(path: str) -> str:
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path.cwd().resolve()) if p.is_absolute() else p
    except ValueError:
        return p.resolve().as_uri()
    return str(rel).replace(os.sep, "/")


def _rule(check: Check) -> dict:
    return {
        "id": check.id,
        "name": check.title,
        "shortDescription": {"text": check.title},
        "fullDescription": {"text": check.explain},
        "defaultConfiguration": {"level": _LEVEL[check.severity.value]},
        "properties": {"category": check.category, "fixer": check.fixer},
    }


def to_sarif(report: Report) -> dict:
    checks = all_checks()
    index = {c.id: i for i, c in enumerate(checks)}
    results = []
    for target in report.targets:
        for f in target.findings:
            file, _, pointer = f.path.partition("#")
            location: dict = {"physicalLocation": {"artifactLocation": {"uri": _uri(file)}}}
            if pointer:
                location["logicalLocations"] = [{"fullyQualifiedName": pointer}]
            result = {
                "ruleId": f.id,
                "ruleIndex": index[f.id],
                "level": _LEVEL[f.severity.value],
                "message": {"text": f"{f.title}: {f.message}"},
                "locations": [location],
            }
            if f.fix is not None:
                result["properties"] = {"fix": f.fix.description, "fixer": f.fix.fixer}
            results.append(result)
    notifications = [
        {"level": "error", "message": {"text": t.error}, "locations": [{"physicalLocation": {"artifactLocation": {"uri": _uri(t.path)}}}]}
        for t in report.targets if t.error
    ]
    invocation = {"executionSuccessful": not notifications, "toolExecutionNotifications": notifications}
    driver = {"name": "adapter-doctor", "version": __version__, "informationUri": "https://pypi.org/project/adapter-doctor/",
              "rules": [_rule(c) for c in checks]}
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0",
            "runs": [{"tool": {"driver": driver}, "invocations": [invocation], "results": results}]}
