"""`atomlab ecosystem report`: the figures of one or more snapshots as PNGs, JSON and one HTML page.

Every plot and the page state the snapshot date (or the range of dates); a report in which any
snapshot came from a synthetic server says SYNTHETIC in every plot and at the top and bottom of
the page. The HTML page is self-contained: the plots are inlined as base64 PNGs.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.ecosystem import metrics
from atomlab.ecosystem.metrics import Snapshot
from atomlab.errors import AtomlabError

# ---------------------------------------------------------------- openness labels


_HUB_LINE = re.compile(r"""^\s+huggingface:\s*['"]?([^'"\s]+)""", re.MULTILINE)


def _huggingface_id(url: str) -> str | None:
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/"):
        if url.startswith(prefix):
            parts = url[len(prefix):].strip("/").split("/")
            return "/".join(parts[:2]) if len(parts) >= 2 else None
    return None


def mof_classes(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """Model id -> MOF grade, from MOF YAML files (or folders of them) naming the model's Hub page."""
    from atomlab.release import openness

    files = [f for p in paths for f in (sorted(p.glob("*.y*ml")) if p.is_dir() else [p])]
    graded = {}
    for path in files:
        if not path.is_file():
            raise AtomlabError(f"{path}: no such MOF file")
        # the Hub page is found by a look at the text: parsing every file twice would double the time
        link = _HUB_LINE.search(path.read_text(encoding="utf-8"))
        model = _huggingface_id(link.group(1)) if link else None
        if model is None:
            continue  # a model not on the Hub cannot be matched to a snapshot
        grade = openness.grade(openness.read_mof_yaml(path), str(path), "mof")
        graded[model] = {"class": grade.mof_class, "label": grade.label, "source": str(path)}
    return graded


# ---------------------------------------------------------------- plots


class Figures:
    """Draws the plots, each stamped with the snapshot date and SYNTHETIC where that applies."""

    def __init__(self, out: Path, dates: str, synthetic: bool) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.out, self.dates, self.synthetic = plt, out, dates, synthetic
        self.written: dict[str, str] = {}

    def figure(self, rows: int = 1, width: float = 8, height: float = 4.2) -> tuple[Any, Any]:
        return self.plt.subplots(rows, 1, figsize=(width, height * rows), squeeze=False)

    def save(self, name: str, fig: Any, title: str, left: float = 0.22, bottom: float = 0.16) -> None:
        prefix = "SYNTHETIC DATA - " if self.synthetic else ""
        fig.suptitle(f"{prefix}{title}\n{self.dates}", fontsize=11)
        if self.synthetic:
            fig.text(0.5, 0.5, "SYNTHETIC", fontsize=60, color="red", alpha=0.15, ha="center", va="center",
                     rotation=30)
        fig.subplots_adjust(left=left, right=0.97, top=0.86, bottom=bottom, hspace=0.45)  # tight_layout costs seconds
        path = self.out / f"{name}.png"
        # the stamp goes into the PNG's text chunks too, so a copied plot still says what it shows
        fig.savefig(path, dpi=90, metadata={"Title": title, "Description": f"{prefix}{self.dates}"})
        self.plt.close(fig)
        self.written[name] = title


def _millions(values: Any) -> list[float]:
    return [v / 1e6 for v in values]


def plot_regions(fig: Figures, by_region: dict[str, Any], over_time: dict[str, list[int]], dates: list[str]) -> None:
    canvas, axes = fig.figure(2 if len(dates) > 1 else 1)
    names = list(by_region)
    x = np.arange(len(names))
    axes[0][0].bar(x - 0.2, _millions(g["downloads_all_time"] for g in by_region.values()), 0.4, label="all time")
    axes[0][0].bar(x + 0.2, _millions(g["downloads_30d"] for g in by_region.values()), 0.4, label="last 30 days")
    axes[0][0].set_xticks(x, names)
    axes[0][0].set_ylabel("downloads (millions)")
    axes[0][0].legend()
    if len(dates) > 1:
        for region, series in over_time.items():
            axes[1][0].plot(range(len(dates)), _millions(series), label=region)
        ticks = sorted({0, len(dates) // 2, len(dates) - 1})
        axes[1][0].set_xticks(ticks, [dates[i] for i in ticks])
        axes[1][0].set_ylabel("all-time downloads (millions)")
        axes[1][0].legend(fontsize=8)
    fig.save("adoption_by_region", canvas, "Adoption of first-party models by publisher region")


def plot_families(fig: Figures, by_family: dict[str, Any], shown: int = 12) -> None:
    canvas, axes = fig.figure()
    names = list(by_family)[:shown][::-1]
    axes[0][0].barh(names, _millions(by_family[n]["downloads_all_time"] for n in names))
    axes[0][0].set_xlabel("all-time downloads (millions)")
    fig.save("adoption_by_family", canvas, f"Adoption by model family (top {shown})")


def plot_derivatives(fig: Figures, share: dict[str, Any], shown: int = 6, months: int = 18) -> None:
    canvas, axes = fig.figure()
    recent = share["months"][-months:]
    totals: dict[str, int] = {}
    for month in recent:
        for family, n in share["counts"][month].items():
            totals[family] = totals.get(family, 0) + n
    leaders = sorted(totals, key=lambda f: -totals[f])[:shown]
    bottom = np.zeros(len(recent))
    for family in leaders + ["other"]:
        heights = np.array([
            sum(v for f, v in share["shares"][m].items() if f not in leaders) if family == "other"
            else share["shares"][m].get(family, 0.0) for m in recent])
        axes[0][0].bar(recent, heights * 100, bottom=bottom * 100, label=family)
        bottom += heights
    axes[0][0].set_ylabel("share of new derivatives (%)")
    axes[0][0].tick_params(axis="x", rotation=60, labelsize=7)
    axes[0][0].legend(fontsize=7, ncol=4)
    fig.save("derivative_share", canvas, "New fine-tunes, adapters and merges by base family and month")


def plot_ram(fig: Figures, ram: dict[str, dict[str, Any]], method: str, shown: int = 20) -> None:
    canvas, axes = fig.figure(height=5.5)
    ranked = sorted((m for m in ram if np.isfinite(ram[m]["ram_v1"])), key=lambda m: -ram[m]["ram_v1"])[:shown]
    axes[0][0].barh([m[-50:] for m in ranked][::-1], [ram[m]["ram_v1"] for m in ranked][::-1])
    axes[0][0].axvline(1.0, color="grey", lw=0.8)
    axes[0][0].set_xlabel("RAM v1 (1 = median of the top 10 of the size bucket at the same age)")
    axes[0][0].tick_params(axis="y", labelsize=6)
    label = "APPROXIMATION\n(one snapshot: linear growth since release assumed)" if method == "approximation" \
        else "measured from dated snapshots"
    fig.save("relative_adoption", canvas, f"Relative Adoption Metric, {label}", left=0.4)


def plot_open_share(fig: Figures, share: dict[str, Any]) -> None:
    canvas, axes = fig.figure(height=3.6)
    measures = ["downloads_30d", "downloads_all_time", "derivatives"]
    left = np.zeros(len(measures))
    for label in ("class I", "class II", "class III", "unclassified", "unknown"):
        if label not in share["by_class"]:
            continue
        part = share["by_class"][label]
        whole = [sum(v[m] for v in share["by_class"].values()) or 1 for m in measures]
        widths = np.array([part[m] / w * 100 for m, w in zip(measures, whole, strict=True)])
        axes[0][0].barh(measures, widths, left=left, label=label)
        left += widths
    axes[0][0].set_xlabel("share (%) by MOF class; 'unknown': no MOF file given")
    axes[0][0].legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.save("truly_open_share", canvas, "Where use goes: the truly open share (MOF Class I/II)", bottom=0.32)


def plot_tracked(fig: Figures, org: str, series: list[int], dates: list[str], models: list[dict[str, Any]]) -> None:
    canvas, axes = fig.figure(2 if len(dates) > 1 else 1)
    names = [m["model_id"].split("/", 1)[-1][-40:] for m in models][:15][::-1]
    axes[0][0].barh(names, [m["downloads_30d"] for m in models][:15][::-1])
    axes[0][0].set_xlabel("downloads, last 30 days")
    axes[0][0].tick_params(axis="y", labelsize=7)
    if len(dates) > 1:
        axes[1][0].plot(range(len(dates)), series)
        ticks = sorted({0, len(dates) // 2, len(dates) - 1})
        axes[1][0].set_xticks(ticks, [dates[i] for i in ticks])
        axes[1][0].set_ylabel("all-time downloads")
    fig.save(f"tracked_{org}", canvas, f"Tracked publisher {org}")


# ---------------------------------------------------------------- the report


def compute(snapshots: list[Snapshot], track: list[str], mof: dict[str, dict[str, Any]], top: int
            ) -> dict[str, Any]:
    """Every figure of the report as data (report.json)."""
    latest = snapshots[-1]
    method = "measured" if len(snapshots) >= 2 else "approximation"
    ram = metrics.relative_adoption(snapshots, max_gap=metrics.MEASURED_MAX_GAP_DAYS if method == "measured"
                                    else None)
    classes = {model: grade["class"] for model, grade in mof.items()}
    leaders = metrics.top_models(latest, top)
    for row in leaders:
        grade = mof.get(row["model_id"])
        row["openness"] = grade["label"] if grade else "unknown"
        row.update({k: ram[row["model_id"]][k] for k in ("ram_v1", "ram_v2")})
    derivative_counts: dict[str, int] = {}
    d = latest.derivatives
    for base, relation in zip(d["base_model"], d["relation"], strict=True):
        if relation in metrics.NEW_WORK_RELATIONS:
            derivative_counts[str(base)] = derivative_counts.get(str(base), 0) + 1
    rank = {str(model): i + 1 for i, model in enumerate(latest.models["model_id"][np.argsort(
        -latest.models["downloads_30d"], kind="stable")])}
    tracked = {}
    for org in track:
        mine = [row for row in metrics.top_models(latest, len(latest.models["model_id"])) if row["org"] == org]
        for row in mine:
            row.update({"rank_30d": rank[row["model_id"]], "derivatives": derivative_counts.get(row["model_id"], 0),
                        "openness": mof[row["model_id"]]["label"] if row["model_id"] in mof else "unknown",
                        "ram_v1": ram[row["model_id"]]["ram_v1"], "ram_v2": ram[row["model_id"]]["ram_v2"]})
        tracked[org] = {"models": mine, "downloads_all_time_over_time":
                        metrics.adoption_over_time(snapshots, "org").get(org, [0] * len(snapshots))}
    return {
        "synthetic": any(s.synthetic for s in snapshots),
        "snapshots": [{"folder": str(s.folder), "date": s.date.isoformat(), "synthetic": s.synthetic,
                       "endpoint": s.provenance.get("endpoint"), "client": s.provenance.get("client"),
                       "models": int(len(s.models["model_id"]))} for s in snapshots],
        "adoption_by_region": metrics.adoption_by(latest, "region"),
        "adoption_by_region_over_time": metrics.adoption_over_time(snapshots, "region"),
        "adoption_by_family": metrics.adoption_by(latest, "family"),
        "derivative_share": metrics.derivative_share(latest),
        "relative_adoption": {"method": method, "max_gap_days": metrics.MEASURED_MAX_GAP_DAYS
                              if method == "measured" else None, "models": ram},
        "top_models": leaders,
        "open_share": metrics.open_share(latest, classes),
        "mof_graded_models": len(mof),
        "tracked": tracked,
    }


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if not np.isfinite(value) else f"{value:,.3f}"
        return html.escape(f"{value:,}" if isinstance(value, int) else str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(data: dict[str, Any], figures: Figures, dates: str) -> str:
    banner = ('<p class="synthetic">SYNTHETIC DATA: made by a seeded generator, not downloads of real models.</p>'
              if data["synthetic"] else "")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Open-model ecosystem report, {dates}</title>"
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse;"
             "font-size:85%}td,th{border:1px solid #ccc;padding:2px 6px}.synthetic{background:#fdd;color:#900;"
             "font-weight:bold;padding:.5em;font-size:130%}</style></head><body>", banner,
             f"<h1>Open-model ecosystem report</h1><p>{html.escape(dates)}</p>",
             _table(data["snapshots"], ["date", "folder", "endpoint", "client", "models", "synthetic"])]
    ram = data["relative_adoption"]
    notes = {
        "adoption_by_region": _table([{"region": k, **v} for k, v in data["adoption_by_region"].items()],
                                     ["region", "models", "downloads_all_time", "downloads_30d"]),
        "relative_adoption": "<p>" + ("<b>APPROXIMATION</b>: one snapshot, so every model is assumed to have gained "
                                      "its downloads at a constant rate since release."
                                      if ram["method"] == "approximation" else
                                      f"Measured: interpolated between release and dated snapshots at most "
                                      f"{ram['max_gap_days']} days apart.") + " v1 divides by the median of the "
                             "top 10 of the size bucket at the same age, v2 by the 10th.</p>",
        "truly_open_share": "<p>" + html.escape(", ".join(
            f"{k.replace('_', ' ')}: {v:.1%}" for k, v in data["open_share"].items()
            if k.startswith(("truly", "unknown")) and np.isfinite(v))) + f" ({data['mof_graded_models']} models "
            "with MOF files given; the others are 'unknown' and never count as open)</p>",
    }
    for name, title in figures.written.items():
        encoded = base64.b64encode((figures.out / f"{name}.png").read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(dates)}</p>"
                     f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>{notes.get(name, '')}")
    parts.append(f"<h2>Top {len(data['top_models'])} by downloads in the last 30 days</h2><p>{html.escape(dates)}</p>")
    parts.append(_table(data["top_models"], ["model_id", "region", "size_bucket", "license", "openness",
                                             "downloads_30d", "downloads_all_time", "likes", "ram_v1", "ram_v2"]))
    for org, tracked in data["tracked"].items():
        parts.append(f"<h2>Tracked: {html.escape(org)}</h2><p>{html.escape(dates)}</p>")
        parts.append(_table(tracked["models"], ["model_id", "rank_30d", "downloads_30d", "downloads_all_time",
                                                "likes", "derivatives", "openness", "ram_v1", "ram_v2"]))
    parts.append(banner + "</body></html>")
    return "\n".join(parts)


def build_report(folders: list[Path], out: Path, track: list[str] | None = None, mof: list[Path] | None = None,
                 top: int = 25) -> dict[str, Any]:
    """Write report.html, report.json and the PNGs into `out` (replaced only once the new one is whole)."""
    snapshots = metrics.load_snapshots(folders)
    grades = mof_classes(mof) if mof else {}
    data = compute(snapshots, track or [], grades, top)
    first, last = snapshots[0].date.isoformat(), snapshots[-1].date.isoformat()
    dates = f"snapshot {last}" if first == last else f"snapshots {first} to {last} ({len(snapshots)})"
    data["dates"] = dates
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    figures = Figures(partial, dates, data["synthetic"])
    day_labels = [s["date"] for s in data["snapshots"]]
    plot_regions(figures, data["adoption_by_region"], data["adoption_by_region_over_time"], day_labels)
    plot_families(figures, data["adoption_by_family"])
    if data["derivative_share"]["months"]:
        plot_derivatives(figures, data["derivative_share"])
    plot_ram(figures, data["relative_adoption"]["models"], data["relative_adoption"]["method"])
    plot_open_share(figures, data["open_share"])
    for org, tracked in data["tracked"].items():
        plot_tracked(figures, org, tracked["downloads_all_time_over_time"], day_labels, tracked["models"])
    (partial / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    (partial / "report.html").write_text(render_html(data, figures, dates), encoding="utf-8")
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    return data


def _report(args: argparse.Namespace) -> int:
    data = build_report([Path(p) for p in args.snapshots], Path(args.out), args.track,
                        [Path(p) for p in args.mof] if args.mof else None, args.top)
    label = "SYNTHETIC " if data["synthetic"] else ""
    print(f"{label}report of {data['dates']} -> {Path(args.out) / 'report.html'}")
    return 0


def add_report_command(commands: Any) -> None:
    sub = commands.add_parser("report", help="adoption, derivatives, Relative Adoption Metric and openness")
    sub.add_argument("snapshots", nargs="+", help="snapshot folders (from atomlab ecosystem snapshot)")
    sub.add_argument("--out", required=True, help="folder for report.html, report.json and the PNG plots")
    sub.add_argument("--track", nargs="+", default=[], metavar="ORG", help="publishers (the lab's own) to follow")
    sub.add_argument("--mof", nargs="+", metavar="PATH", help="MOF model files or folders of them (openness labels)")
    sub.add_argument("--top", type=int, default=25, help="models in the top-by-downloads table (default 25)")
    sub.set_defaults(handler=_report)
