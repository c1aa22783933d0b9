"""Writes an :class:`privacy.audit.AuditReport`: ``report.md`` (for people), ``report.json`` (every
number in it), ``epsilon.png`` (epsilon per round per client: the ledger's and the recomputed) and,
when a policy's ``max_epsilon`` is known, ``budget.png`` (budget remaining per round per client);
with the empirical audit, ``canaries.png`` (membership scores of included and excluded canaries)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from privacy.audit import INFO, TOLERANCE, WARNING, AuditReport, ClientAudit


def _finite(obj: Any) -> Any:
    """``obj`` with infinite / NaN floats as strings (``"inf"``), so that report.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _num(x: float | None, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else format(x, spec)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _verdict(report: AuditReport) -> str:
    problems = report.problems
    if problems:
        kinds = sorted({f.kind for f in problems})
        return (f"**Verdict: FAILED.** {len(problems)} problem{'s' if len(problems) > 1 else ''} "
                f"({', '.join(kinds)}); see *Problems*.")
    n = len(report.clients)
    if not n:
        return ("**Verdict: NO DIFFERENTIAL PRIVACY CLAIMED.** The run has no privacy ledgers; only the empirical "
                "leakage test ran (see *Empirical audit*).")
    unsigned = sorted({f.client for f in report.findings if f.kind == "unsigned"})
    if unsigned:
        # nothing contradicts the ledgers, but unsigned lines cannot prove they were not edited
        return (f"**Verdict: PASSED WITH WARNINGS.** No problem found in {n} client ledger{'s' if n != 1 else ''} "
                f"and every epsilon recomputed within {TOLERANCE:.0%}, no policy limit crossed; but "
                f"{len(unsigned)} ledger{'s are' if len(unsigned) != 1 else ' is'} (partly) unsigned, so their "
                f"integrity is not verified: {', '.join(unsigned)}.")
    return (f"**Verdict: PASSED.** {n} client ledger{'s' if n != 1 else ''} verified; every epsilon recomputed "
            f"within {TOLERANCE:.0%}; no policy limit crossed.")


def to_markdown(report: AuditReport) -> str:
    out = [f"# Privacy audit: {report.run_dir}", "", _verdict(report), "",
           f"Audited {report.created} ({report.layout}); epsilons recomputed with {report.accountant}.", ""]
    if report.problems:
        out += ["## Problems", "", "| client | round | line | what | details |", "|---|---|---|---|---|"]
        for f in report.problems:
            out.append(f"| {_cell(f.client)} | {f.round if f.round is not None else '-'} | "
                       f"{f.line if f.line is not None else '-'} | {f.kind} | {_cell(f.message)} |")
        out.append("")
    fed = report.federation
    out += ["## Federation", "", fed["statement"], ""]
    out += ["## Clients", ""] + ([] if report.clients else ["No privacy ledgers in this run.", ""])
    for c in report.clients:
        out += _client_section(c, report)
    if report.server_view:
        out += ["## What the server could see", "",
                "| round | secure aggregation | sampled | in the aggregate | declined | dropped | receipts "
                "| the server saw |",
                "|---|---|---|---|---|---|---|---|"]
        for r in report.server_view:
            dropped = "; ".join(f"{stage}: {', '.join(names)}" for stage, names in (r.get("dropped") or {}).items())
            in_sum = len(r["in_sum"]) if r.get("secure_aggregation") else r.get("clients_ok")
            out.append(f"| {r['round']} | {'on' if r['secure_aggregation'] else 'off'} | {r.get('clients_sampled')} | "
                       f"{in_sum} | {r.get('clients_declined', 0)} | {_cell(dropped or '-')} | "
                       f"{r.get('receipts', '-')} | {_cell(r['server_saw'])} |")
        out.append("")
    if report.empirical is not None:
        out += _empirical_section(report.empirical)
    notes = [f for f in report.findings if f.severity in (WARNING, INFO)]
    if notes:
        out += ["## Warnings and notes", ""]
        out += [f"- {f.severity}: {f.where()}: {f.kind}: {f.message}" for f in notes]
        out.append("")
    out += ["## What this audit checked", ""] + [f"- {c}" for c in report.checked] + [""]
    out += ["## What it could not check", ""] + [f"- {c}" for c in report.not_checked] + [""]
    out += ["## How to read this report", "",
            "- *edited*: a line's content no longer matches its signature or the server's receipt (the changed "
            "fields are named when a receipt exists); *deleted*: a position in the chain or a receipted entry is "
            "missing; *inserted*: a line that is not signed by the client's key and not in the chain; "
            "*reordered*: lines out of their signed order; *bad-signature*: the content is intact but the "
            "signature is not the client's; *epsilon-mismatch*: the ledger's epsilon does not follow from its "
            "recorded events.",
            f"- *epsilon (PLD)* is recomputed independently from each line's events (steps of the "
            f"Poisson-subsampled Gaussian mechanism) with Google's dp_accounting; it must agree within "
            f"{TOLERANCE:.0%} (a PRV ledger may be up to 0.01 higher: Opacus reports an upper bound).",
            "- Plots: `epsilon.png` (ledger: markers, recomputed: lines); `budget.png` (policy budget left); "
            "`canaries.png` (membership scores of the canaries, with `--empirical`).", ""]
    return "\n".join(out)


def _empirical_section(e: dict[str, Any]) -> list[str]:
    claimed = "none (no DP)" if e["claimed_epsilon"] is None else f"{e['claimed_epsilon']:.4g}"
    out = ["## Empirical audit (canaries)", "",
           f"**Empirical lower bound: epsilon >= {e['epsilon_lower_bound']:.3g}** at delta {e['delta']:.3g}, "
           f"confidence {1 - e['significance']:.0%}; claimed epsilon: {claimed}. {e['verdict'][0].upper()}"
           f"{e['verdict'][1:]}.", "",
           f"- method: {e['method']}",
           f"- unit: {e['unit']}",
           f"- canaries: {e['canaries']} ({e['members']} included), {e['canary_length']} random items each, spread "
           f"over {e['clients_with_canaries']} clients; model after round {e['rounds']}",
           f"- membership AUC {e['auc']:.3f} (0.5: no signal); mean score members {e['mean_score_members']:.4f}, "
           f"non-members {e['mean_score_nonmembers']:.4f}",
           "- a lower bound is a test, not an estimate: a DP run must stay below its claim; a small bound does not "
           "prove privacy (one-run black-box canaries are weak attacks)", "",
           "| k (in / out guesses) | guesses | correct | epsilon lower bound |", "|---|---|---|---|"]
    for g in e["grid"]:
        out.append(f"| {g['k']} | {g['guesses']} | {g['correct']} | {g['epsilon_lower_bound']:.3g} |")
    return out + ["", f"Each row is tested at significance {e['significance']:g} / {len(e['grid'])} (Bonferroni); "
                      "plot: `canaries.png`.", ""]


def _client_section(c: ClientAudit, report: AuditReport) -> list[str]:
    out = [f"### {c.client}", ""]
    if not c.ledger:
        return out + ["No ledger found for this client (see *Problems*).", ""]
    s = c.summary
    key = f"`{c.public_key[:16]}...` (from {c.public_key_source})" if c.public_key else "none (not checked)"
    unsigned = any(f.kind == "unsigned" and f.client == c.client for f in report.findings)
    verdict = "NO" if not c.verified else "no problem found, but unsigned lines: integrity not verified" if unsigned else "yes"
    out += [f"- verified: **{verdict}**; ledger `{c.ledger}`, {len(c.entries)} entries; "
            f"public key {key}; {c.receipts} receipts",
            f"- unit of privacy: {s['unit_of_privacy']}",
            f"- mechanism: {'; '.join(s['mechanisms']) or '-'}",
            f"- accountant (ledger): {', '.join(s['accountants']) or '-'}; delta: "
            f"{', '.join(f'{d:.3g}' for d in s['deltas']) or '-'}"]
    for p in s["parameters"]:
        out.append(f"- noise multiplier {p['noise_multiplier']:g}, sample rate {p['sample_rate']:.4g}, "
                   f"{p['steps_per_round']} steps per round, clipping norm {p['max_grad_norm']:g}: "
                   f"rounds {p['rounds']}")
    out.append(f"- rounds spent: {len(s['rounds_spent'])} ({s['steps']} DP-SGD steps); refusals: "
               + ("; ".join(f"round {r['round']}: {r['reason']}" for r in s["refusals"]) or "none"))
    out.append(f"- epsilon after the last entry: ledger {_num(s['epsilon'])}, recomputed "
               f"{_num(s['epsilon_recomputed'])} at delta {s['delta']:.3g}" if s["delta"] is not None
               else "- no entries")
    if report.policy is not None and "policy_epsilon" in s:
        out.append(f"- policy: max_epsilon {report.policy['max_epsilon']:g}; spent {_num(s['policy_epsilon'])} at the "
                   f"policy's delta; remaining {_num(s['policy_budget_remaining'])}")
    out += ["", "| line | seq | round | kind | noise | q | steps | delta | epsilon (ledger) | epsilon (PLD) | diff "
                "| signature | receipt | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in c.entries:
        diff = f"{e.relative_difference:+.2%}" if e.relative_difference is not None else "-"
        out.append(f"| {e.line} | {e.seq if e.seq is not None else '-'} | {e.round} | {e.kind} | "
                   f"{e.noise_multiplier:g} | {e.sample_rate:.4g} | {e.steps} | {e.delta:.3g} | {_num(e.epsilon)} | "
                   f"{_num(e.epsilon_recomputed)} | {diff} | {e.signature} | {e.receipt} | "
                   f"{'**' + e.status + '**' if e.status != 'ok' else 'ok'} |")
    return out + [""]


def _x(client: ClientAudit, by_round: bool) -> list[int]:
    return [e.round for e in client.entries] if by_round else list(range(1, len(client.entries) + 1))


def plot(report: AuditReport, out_dir: Path) -> list[Path]:
    """``epsilon.png`` and, with a policy, ``budget.png``; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [c for c in report.clients if c.entries]
    by_round = all([e.round for e in c.entries] == sorted(set(e.round for e in c.entries)) for c in clients)
    xlabel = "round" if by_round else "ledger entry"
    paths: list[Path] = []
    if report.clients:  # no ledgers (a run without DP, audited empirically): no epsilon to plot
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, c in enumerate(clients):
            color = f"C{k % 10}"
            x = _x(c, by_round)
            ax.plot(x, [e.epsilon_recomputed for e in c.entries], color=color, label=f"{c.client} (PLD)")
            ax.plot(x, [e.epsilon for e in c.entries], "o", color=color, fillstyle="none", label=f"{c.client} (ledger)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cumulative epsilon (user level)")
        ax.set_title("epsilon per client: ledger (markers) and recomputed (lines)")
        ax.grid(alpha=0.3)
        if clients:
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out_dir / "epsilon.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if report.empirical is not None:
        e = report.empirical
        fig, ax = plt.subplots(figsize=(7, 4))
        both = e["scores"]["members"] + e["scores"]["non_members"]
        bins = 40 if both else 1
        ax.hist(e["scores"]["non_members"], bins=bins, range=(min(both), max(both)) if both else None, alpha=0.6,
                label=f"not trained on ({e['canaries'] - e['members']})")
        ax.hist(e["scores"]["members"], bins=bins, range=(min(both), max(both)) if both else None, alpha=0.6,
                label=f"trained on ({e['members']})")
        ax.set_xlabel("membership score (mean log-likelihood of the canary's next items)")
        ax.set_ylabel("canaries")
        ax.set_title(f"canaries: AUC {e['auc']:.3f}, epsilon >= {e['epsilon_lower_bound']:.3g} "
                     f"(delta {e['delta']:.3g})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "canaries.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if report.policy is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, c in enumerate(clients):
            ax.plot(_x(c, by_round), [report.policy["max_epsilon"] - (e.epsilon_at_policy_delta or 0.0)
                                      for e in c.entries], marker="o", color=f"C{k % 10}", label=c.client)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("budget remaining (max_epsilon - epsilon)")
        ax.set_title(f"policy max_epsilon {report.policy['max_epsilon']:g} (recomputed at the policy's delta)")
        ax.grid(alpha=0.3)
        if clients:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / "budget.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(report: AuditReport, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.json and the plots into ``out_dir`` (created); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "report.md"
    md.write_text(to_markdown(report) + "\n", encoding="utf-8")
    js = out_dir / "report.json"
    js.write_text(json.dumps(_finite(report.to_dict()), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return [md, js, *plot(report, out_dir)]

