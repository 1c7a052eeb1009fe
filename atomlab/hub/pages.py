"""The hub's web pages, rendered on the server: institutions, models (card, files, openness, lineage,
reproduction claims, evaluations), leaderboards with a plot, and search. Plain HTML and one inline
stylesheet; no script is needed to read any page."""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from atomlab.hub.db import Claim, Evaluation, Institution, Job, Model, ModelVersion
from atomlab.hub.server import derived_models, lineage_links

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f7f8fa}
header{background:#1d2330;color:#fff;padding:.8rem 1.5rem;display:flex;gap:1.5rem;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
main{max-width:70rem;margin:1.5rem auto;padding:0 1.5rem}
table{border-collapse:collapse;width:100%;background:#fff;margin:.5rem 0 1.5rem}
th,td{border-bottom:1px solid #e3e6ec;padding:.45rem .6rem;text-align:left;font-size:.92rem;vertical-align:top}
th{background:#eef1f5}
code{font-size:.85rem}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.8rem;background:#e3e6ec;font-size:.8rem}
.ok{background:#d5f2dc}.warn{background:#fbe7c6}.bad{background:#f8d3d3}
.card{background:#fff;padding:1rem 1.5rem;border:1px solid #e3e6ec}
form input{padding:.35rem;width:18rem}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)} - atomlab hub</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{STYLE}</style></head>"
        "<body><header><a href='/'>atomlab hub</a><a href='/leaderboards'>Leaderboards</a>"
        "<form action='/' method=get><input name=q placeholder='Search models' aria-label=search></form></header>"
        f"<main><h1>{_e(title)}</h1>{body}</main></body></html>"
    )


def table(headers: list[str], rows: list[list[str]], empty: str = "none yet") -> str:
    if not rows:
        return f"<p><em>{_e(empty)}</em></p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{f'<thead><tr>{head}</tr></thead>' if any(headers) else ''}<tbody>{body}</tbody></table>"


def grade_badge(openness: dict[str, Any]) -> str:
    label = openness.get("label")
    if not label or openness.get("error"):
        return f"<span class='badge warn' title='{_e(openness.get('error', ''))}'>not graded</span>"
    return f"<span class='badge {'ok' if openness.get('class') else 'warn'}'>{_e(label)}</span>"


def reproduced_badge(claims: list[Claim]) -> str:
    exact = {c.institution_id for c in claims if c.verdict == "bitwise"}
    bitwise = exact | {c.institution_id for c in claims if c.verdict == "timings-aside"}
    if bitwise:
        aside = "" if exact == bitwise else " (speed figures aside)"
        plural = "s" * (len(bitwise) > 1)
        return f"<span class='badge ok'>reproduced bitwise by {len(bitwise)} institution{plural}{aside}</span>"
    if claims:
        return f"<span class='badge warn'>{len(claims)} reproduction claim(s), none bitwise</span>"
    return "<span class='badge'>not reproduced yet</span>"


def render_card(text: str) -> str:
    if text.startswith("---\n"):  # Hugging Face metadata: shown in the table above, not as prose
        end = text.find("\n---", 4)
        text = text[end + 4 :] if end > 0 else text
    try:
        import markdown

        return markdown.markdown(html.escape(text, quote=False), extensions=["tables"])
    except ImportError:
        return f"<pre>{_e(text)}</pre>"


def bar_chart(rows: list[dict[str, Any]], label: str) -> str:
    """An inline SVG bar chart of a leaderboard (best result per family)."""
    if not rows:
        return ""
    top = max(abs(r["value"]) for r in rows) or 1.0
    height = 28 * len(rows) + 30
    bars = []
    for i, row in enumerate(rows):
        width = 420 * abs(row["value"]) / top
        y = 10 + 28 * i
        bars.append(
            f"<text x=0 y={y + 15} font-size=12>{_e(row['family'][:34])}</text>"
            f"<rect x=230 y={y} width={width:.1f} height=20 fill='#4a78c2'></rect>"
            f"<text x={236 + width:.1f} y={y + 15} font-size=12>{row['value']:.4g}</text>"
        )
    return (
        f"<svg role=img aria-label='{_e(label)}' width=720 height={height} xmlns='http://www.w3.org/2000/svg'>"
        + "".join(bars)
        + "</svg>"
    )


def ref_link(ref: str) -> str:
    """A link to NAME@VERSION's page."""
    name, _, number = ref.partition("@")
    return f"<a href='/{_e(name)}?version={_e(number or 'main')}'>{_e(ref)}</a>"


def links_html(links: list[str]) -> str:
    return ", ".join(ref_link(ref) for ref in links) or "-"


def object_rows(kind: str, models: list[Model], link: Any) -> list[list[str]]:
    """The index's table rows of one kind of object (their newest versions)."""
    rows = []
    for model in models:
        latest, details = model.versions[-1], model.versions[-1].details or {}
        common = [link(model), str(latest.number), _e(latest.signer or "unsigned")]
        if kind == "dataset":
            summary = details.get("summary") or {}
            documents = sum((summary.get("documents") or {}).values()) or "-"
            rows.append(common + [_e(details.get("step", "-")), _e(documents), f"<code>{_e(latest.step_hash)}</code>"])
        elif kind == "environment":
            rows.append(
                common
                + [
                    _e(", ".join(details.get("environments") or [])),
                    _e(details.get("package_version", "-")),
                    f"<code>{_e(str(details.get('content_sha256', ''))[:16])}</code>",
                ]
            )
        else:  # run
            rows.append(common + [_e(", ".join(details.get("steps") or {}))])
    return rows


OBJECT_TABLES = {
    "dataset": ("Datasets", ["step", "documents", "step hash"]),
    "environment": ("Training environments", ["environments", "package version", "content sha256"]),
    "run": ("Runs", ["steps"]),
}


def add_pages(app: FastAPI, hub: Any) -> None:
    def model_link(model: Model) -> str:
        return f"<a href='/{_e(model.full_name)}'>{_e(model.full_name)}</a>"

    @app.get("/", response_class=HTMLResponse)
    def index(q: str = "") -> HTMLResponse:
        with hub.sessions() as session:
            found = [m for m in session.scalars(select(Model)) if m.versions and q.lower() in m.full_name]
            found.sort(key=lambda m: m.full_name)
            models = [m for m in found if m.kind == "model"]
            others = {
                kind: object_rows(kind, [m for m in found if m.kind == kind], model_link) for kind in OBJECT_TABLES
            }
            rows = []
            for model in models:
                latest = model.versions[-1]
                rows.append(
                    [
                        model_link(model),
                        str(latest.number),
                        grade_badge(latest.openness),
                        reproduced_badge(latest.claims),
                        _e(latest.signer or "unsigned"),
                        _e(latest.base_model or "-"),
                    ]
                )
            institutions = [
                [f"<a href='/{_e(i.name)}'>{_e(i.name)}</a>", _e(i.display_name), str(len(i.keys))]
                for i in session.scalars(select(Institution).order_by(Institution.name))
            ]
        body = "<h2>Models</h2>" + table(
            ["model", "version", "openness", "reproduced", "signed by", "base model"], rows, "no models match"
        )
        for kind, (title, headers) in OBJECT_TABLES.items():
            body += f"<h2>{title}</h2>" + table(["name", "version", "signed by", *headers], others[kind])
        body += "<h2>Institutions</h2>" + table(["name", "display name", "signing keys"], institutions)
        return page("Search results" if q else "Models", body)

    @app.get("/leaderboards", response_class=HTMLResponse)
    def boards() -> HTMLResponse:
        with hub.sessions() as session:
            keys = sorted({(e.task, e.task_version, e.metric) for e in session.scalars(select(Evaluation))})
        rows = [
            [f"<a href='/leaderboards/{_e(t)}/{_e(m)}?task_version={_e(v)}'>{_e(t)}</a>", _e(v or "-"), _e(m)]
            for t, v, m in keys
        ]
        return page("Leaderboards", table(["task", "version", "metric"], rows, "no evaluations posted yet"))

    @app.get("/leaderboards/{task}/{metric}", response_class=HTMLResponse)
    def board(task: str, metric: str, task_version: str = "") -> HTMLResponse:
        with hub.sessions() as session:
            rows = hub.leaderboard(session, task, metric, task_version)
        cells = [
            [
                str(rank),
                _e(r["family"]),
                f"<a href='/{_e(r['model'].split('@')[0])}'>{_e(r['model'])}</a>",
                f"{r['value']:.4g}",
                _e(r["submitted_by"]) + (" <span class='badge ok'>computed by the hub</span>" * r["computed_by_hub"]),
                "-" if r["best_computed_by_hub"] is None else f"{r['best_computed_by_hub']:.4g}",
                f"{r['variants']} variant(s), {r['submissions']} submitted, {r['computed_by_hub_results']} by the hub",
            ]
            for rank, r in enumerate(rows, 1)
        ]
        body = (
            "<p>Best result per model family; every submission stays on record, so a family that tried many "
            "variants shows how many.</p>"
            + bar_chart(rows, f"{task} {metric}")
            + table(["#", "family", "best model", metric, "by", "computed by the hub", "tried"], cells)
        )
        return page(f"{task} {task_version} - {metric}".replace("  ", " "), body)

    @app.get("/{institution}", response_class=HTMLResponse)
    def institution_page(institution: str) -> HTMLResponse:
        with hub.sessions() as session:
            owner = hub.institution(session, institution)
            models = session.scalars(select(Model).where(Model.institution_id == owner.id).order_by(Model.name))
            rows = [[model_link(m) + f" <span class=badge>{_e(m.kind)}</span>", str(len(m.versions))] for m in models]
            keys = [[_e(k.name), f"<code>{_e(k.fingerprint[:16])}</code>"] for k in owner.keys]
            claims = session.scalars(select(Claim).where(Claim.institution_id == owner.id).order_by(Claim.id))
            made = [[_e(f"{c.version.model.full_name}@{c.version.number}"), _e(c.verdict)] for c in claims]
        body = "<h2>Published</h2>" + table(["name", "versions"], rows)
        body += "<h2>Signing keys</h2>" + table(["name", "sha256"], keys)
        body += "<h2>Reproductions it made</h2>" + table(["model", "verdict"], made)
        return page(owner.display_name or owner.name, body)

    @app.get("/{institution}/{name}", response_class=HTMLResponse)
    def model_page(institution: str, name: str, version: str = "main") -> HTMLResponse:
        with hub.sessions() as session:
            model = hub.model(session, institution, name)
            current: ModelVersion = hub.version(session, institution, name, version)
            card_name = "DATA_CARD.md" if model.kind == "dataset" else "MODEL_CARD.md"
            card = next((f for f in current.files if f.path in (card_name, "README.md")), None)
            card_text = ""
            if card is not None and card.size < 2 << 20:
                with hub.store.open(card.sha256) as handle:
                    card_text = handle.read().decode("utf-8", errors="replace")
            derived = derived_models(session, model)
            openness = current.openness
            missing = [m for m in openness.get("missing") or [] if m.get("required")]
            links = lineage_links(session, current)
            details = current.details or {}
            facts = [
                ["kind", _e(model.kind)],
                ["version", f"{current.number} of {len(model.versions)}"],
                ["manifest sha256", f"<code>{_e(current.manifest_sha256)}</code>"],
                ["signed by", _e(current.signer or "unsigned")],
            ]
            if model.kind == "model":
                facts += [
                    ["openness", grade_badge(openness)],
                    ["reproduced", reproduced_badge(current.claims)],
                    ["base model", _e(current.base_model or "- (trained from scratch)")],
                    ["derived models", ", ".join(model_link(m) for m in derived) or "-"],
                    ["made by run", links_html(links["runs"])],
                ]
            if model.kind in ("model", "dataset") and current.step_hash:
                facts.append(["step hash", f"<code>{_e(current.step_hash)}</code>"])
            if model.kind == "environment":
                facts += [
                    ["package", _e(f"{details.get('package')} {details.get('package_version')}")],
                    ["environments", _e(", ".join(details.get("environments") or []))],
                    ["content sha256", f"<code>{_e(details.get('content_sha256'))}</code>"],
                ]
            if model.kind == "run":
                facts.append(["models it made", links_html(links["models"])])
            if model.kind != "dataset":
                facts.append(["datasets", links_html(links["datasets"])])
            if model.kind in ("model", "run"):
                facts.append(["environments used", links_html(links["environments"])])
            if model.kind in ("dataset", "environment"):
                facts.append(["used by", links_html(links["used_by"])])
            steps = [
                [_e(step), f"<code>{_e(entry.get('hash'))}</code>", _e(", ".join(entry.get("inputs") or {}))]
                for step, entry in (details.get("steps") or {}).items()
            ]
            jobs = [
                [str(j.id), _e(j.request.get("environment")), _e(j.state), _e(j.institution.name)]
                for j in session.scalars(select(Job).where(Job.version_id == current.id).order_by(Job.id))
            ]
            claims = [
                [
                    _e(c.institution.name),
                    _e(c.verdict),
                    _e(c.report.get("machine", {}).get("cpu", "-")),
                    _e(c.created_at),
                ]
                for c in current.claims
            ]
            evaluations = [
                [
                    _e(e.task),
                    _e(e.metric),
                    f"{e.value:.4g}",
                    _e(e.institution.name),
                    "<span class='badge ok'>computed by the hub</span>" if e.computed_by_hub else "submitted",
                ]
                for e in session.scalars(select(Evaluation).where(Evaluation.version_id == current.id))
            ]
            files = [
                [
                    f"<a href='/{_e(model.full_name)}/resolve/{current.commit}/{_e(f.path)}'>{_e(f.path)}</a>",
                    f"{f.size:,}",
                    f"<code>{_e(f.sha256[:16])}</code>",
                ]
                for f in current.files
            ]
        body = table(["", ""], facts)
        if missing:
            body += (
                "<h2>Missing for a higher openness class</h2><ul>"
                + "".join(f"<li>Class {_e(m['class'])}: {_e(m['component'])}: {_e(m['fix'])}</li>" for m in missing)
                + "</ul>"
            )
        if steps:
            body += "<h2>Steps</h2>" + table(["step", "hash", "inputs"], steps)
        if model.kind == "model":
            body += "<h2>Reproduction claims</h2>" + table(["institution", "verdict", "machine", "when"], claims)
            body += "<h2>Evaluations</h2>" + table(["task", "metric", "value", "by", "source"], evaluations)
            if jobs:
                body += "<h2>Evaluation jobs of the hub</h2>" + table(["job", "environment", "state", "asked by"], jobs)
        if card_text:
            title = {"dataset": "Data card", "model": "Model card"}.get(model.kind, "README")
            body += f"<h2>{title}</h2><div class=card>{render_card(card_text)}</div>"
        body += "<h2>Files</h2>" + table(["path", "bytes", "sha256"], files)
        return page(model.full_name, body)
