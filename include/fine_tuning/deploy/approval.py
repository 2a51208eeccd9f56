"""What a person reads before approving a rollout's last step: the A/B test's lift and CI, its
guardrails and sample ratio check, the held stage's rollback triggers, and the MLflow links.

Rendered as Markdown for the body of the approval (Airflow's Required Actions page shows it).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fine_tuning.config import PipelineConfig
from fine_tuning.deploy import rollout
from fine_tuning.evaluate import ab
from fine_tuning.track import registry

log = logging.getLogger(__name__)


class NotAwaitingApproval(ValueError):
    """The deployment named by the approval's ``deployment_id`` does not wait for an answer."""


def _pct(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}%}"


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def mlflow_links(config: PipelineConfig, test: dict[str, Any]) -> dict[str, str]:
    """The MLflow run (with the evaluation's plot), the plot itself and the registered version;
    what MLflow could not answer is a ``note`` instead (the request is still made)."""
    base = config.mlflow.tracking_uri.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return {"note": f"MLflow is not served over HTTP here ({base}): no links"}
    links: dict[str, str] = {}
    if test.get("candidate_version"):
        name = quote(config.mlflow.registered_model_name)
        links["version"] = f"{base}/#/models/{name}/versions/{test['candidate_version']}"
    if test.get("dag_id") and test.get("run_id"):
        try:
            run = registry.find_run(config, test["dag_id"], test["run_id"])
        except Exception as exc:  # noqa: BLE001 - a link is not worth refusing the request for
            links["note"] = f"MLflow did not answer: {exc}"
        else:
            if run is not None:
                run_url = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                links["run"] = run_url
                links["plot"] = f"{run_url}/artifacts/ab_tests/{quote(test['id'])}/evaluation.png"
    return links


def approval_request(config: PipelineConfig, deployment_id: str) -> tuple[str, str, float]:
    """The approval's subject, its Markdown body (the evidence) and its timeout in hours.

    :raises NotAwaitingApproval: the deployment is not ``awaiting_approval`` (rolled back or
        completed meanwhile, or never asked).
    """
    record = rollout.get_deployment(config, deployment_id)
    if record["status"] != "awaiting_approval":
        raise NotAwaitingApproval(
            f"deployment_id {deployment_id!r}: the deployment is {record['status']!r}, not awaiting approval"
            + (f" ({record['rollback_reason']})" if record["rollback_reason"] else "")
        )
    ramp = record["rollout_config"]
    timeout_hours = float(ramp.get("approval_timeout_hours") or config.deployment.approval_timeout_hours)
    test = ab.get_ab_test(config, record["ab_test_id"]) if record["ab_test_id"] else {}
    analysis = test.get("last_analysis") or {}
    asked = next((e for e in reversed(record["events"]) if e["kind"] == "awaiting_approval"), None)
    share = f"{ramp['max_traffic']:.0%} of {record['model_type']} traffic"
    share = f"{ramp['max_traffic']:.0%} of {record['model_type']} traffic"
    subject = f"Roll out {record['candidate_model']} to {share}?"
    lines = [
        (
            f"**Deployment** `{deployment_id}`: candidate `{record['candidate_model']}`"
            f" (MLflow version {record['candidate_version'] or 'n/a'}) against `{record['previous_model']}`."
        ),
        (
            f"It serves **{record['current_traffic']:.0%}** now and waits for this answer before the step"
            f" to {ramp['max_traffic']:.0%}; meanwhile the hourly health checks keep running and roll it back"
            " if a trigger fires."
        ),
        (
            f"**Approve**: the candidate serves everything and becomes MLflow's `champion`. **Reject**, or no"
            f" answer within {timeout_hours:g} h: it is rolled back to `{record['previous_model']}`."
        ),
        "",
        f"### A/B test `{record['ab_test_id']}`: {test.get('status', 'n/a')}",
        (
            f"- relative lift of engagement: **{_pct(analysis.get('relative_lift'))}**,"
            f" {_pct(analysis.get('confidence_level'), 0)} CI [{_pct(analysis.get('ci_lower'))},"
            f" {_pct(analysis.get('ci_upper'))}], p = {_num(analysis.get('p_value'))}"
            f" ({analysis.get('method', 'n/a')}, {test.get('looks', 0)} looks)"
        ),
        (
            f"- sample ratio (SRM): {'ok' if analysis.get('srm_ok') else 'MISMATCH'},"
            f" p = {_num(analysis.get('srm_p_value'))}"
        ),
    ]
    guardrails = analysis.get("guardrails") or []
    if guardrails:
        lines += [
            "",
            "| guardrail | baseline | candidate | margin | status |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {g.get('name')} | {_num(g.get('baseline'))} | {_num(g.get('candidate'))} |"
            f" {_num(g.get('margin'))} | {g.get('status')} |"
            for g in guardrails
        ]
    gates = (asked or {}).get("detail", {}).get("gates") or []
    if gates:
        lines += [
            "",
            f"### Rollback triggers at {record['current_traffic']:.0%}, when the approval was asked",
            "| trigger | value | threshold | verdict |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {g['gate']} | {_num(g['value'])} | {_num(g['threshold'])} | {g['verdict']} |" for g in gates
        ]
    links = mlflow_links(config, test)
    shown = [
        f"[{label}]({links[key]})"
        for key, label in (
            ("run", "MLflow run"),
            ("plot", "evaluation plot"),
            ("version", "registered version"),
        )
        if key in links
    ]
    lines += ["", "### Links", " · ".join(shown) or "no MLflow links"]
    if "note" in links:
        lines.append(f"({links['note']})")
    return subject, "\n".join(lines), timeout_hours
