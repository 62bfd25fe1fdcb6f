"""``audit.html``: the audit as one self-contained page in the frame of eval's ``report.html`` (same CSS and
HTML helpers, :mod:`foodvision.pages`): headline counts, class balance, duplicate groups and likely label
errors as thumbnails side by side, and the file statistics. Thumbnails are embedded (base64 JPEG), so the
page can be opened anywhere or mailed."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foodvision.data.images import load_rgb
from foodvision.pages import data_uri, esc, html_page, jpeg_bytes

log = logging.getLogger(__name__)

EXTRA_CSS = """<style>
.groups {display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start}
.group {background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px}
.group .row {display: flex; flex-wrap: wrap; gap: 8px}
.group figure {margin: 0; width: 170px; font-size: 0.78em; color: #57606a; overflow-wrap: anywhere}
.group img, .cam img.thumb {border-radius: 4px; display: block; max-width: 100%}
.tag {display: inline-block; border-radius: 3px; padding: 0 5px; margin-right: 4px; font-size: 0.8em;
  background: #eef0f2}
.tag.warn {background: #fee2e2; color: #b91c1c} .tag.split {background: #e0f2fe}
</style>"""


def thumbnail(path: str, side: int) -> str:
    """A data URI of the photo scaled to fit ``side`` px, or "" when it cannot be read."""

    try:
        image = load_rgb(path, draft_size=(side, side))
        image.thumbnail((side, side))
        return data_uri(jpeg_bytes(image), "image/jpeg")
    except Exception as error:  # noqa: BLE001 - a file gone since the audit: an empty cell, not a crash
        log.info("no thumbnail of %s (%s)", path, error)
        return ""


def _img(path: str, side: int) -> str:
    uri = thumbnail(path, side)
    if not uri:
        return '<p class="note">unreadable</p>'
    return f'<img class="thumb" alt="{esc(Path(path).name)}" src="{uri}">'


def _card(value: Any, label: str, key: str) -> str:
    return (
        f'<div class="card"><div class="value" data-key="{esc(key)}" data-value="{esc(value)}">{esc(value)}</div>'
        f'<div class="name">{esc(label)}</div></div>'
    )


def _groups_section(groups: Sequence[Mapping[str, Any]], kind: str, limit: int, side: int) -> str:
    if not groups:
        return f'<p class="note">No {kind} duplicates.</p>'
    # Across classes first (a label is wrong), then across splits (leakage), then the rest.
    ordered = sorted(groups, key=lambda g: (not g["cross_class"], not g["cross_split"]))
    parts = []
    for group in ordered[:limit]:
        tags = []
        if group["cross_class"]:
            tags.append('<span class="tag warn">across classes</span>')
        if group["cross_split"]:
            tags.append('<span class="tag warn">across splits</span>')
        evidence = ""
        pairs = group.get("pairs") or []
        if pairs:
            shown = [
                ", ".join(
                    f"{k.replace('_', ' ')} {v}" for k, v in p.items() if k in ("phash_distance", "cosine")
                )
                for p in pairs[:3]
            ]
            evidence = f'<span class="sub">{esc("; ".join(shown))}</span>'
        figures = "".join(
            f"<figure>{_img(f['path'], side)}<span class='tag split'>{esc(f['split'])}</span>"
            f"<b>{esc(f['class'])}</b><br>{esc(Path(f['path']).name)}</figure>"
            for f in group["files"][:8]
        )
        more = (
            f'<p class="sub">... and {len(group["files"]) - 8} more files</p>'
            if len(group["files"]) > 8
            else ""
        )
        parts.append(
            f'<div class="group" data-kind="{kind}">{"".join(tags)}{evidence}<div class="row">{figures}</div>{more}</div>'
        )
    more = (
        f'<p class="note">{len(groups) - limit} more groups in audit.json.</p>' if len(groups) > limit else ""
    )
    return f'<div class="groups" id="{kind}-groups">' + "\n".join(parts) + "</div>" + more


def _issues_section(labels: Mapping[str, Any], limit: int, side: int) -> str:
    if "skipped" in labels:
        return f'<p class="note">Not searched: {esc(labels["skipped"])}.</p>'
    issues = labels.get("issues") or []
    intro = (
        f"<p>{esc(labels.get('method', ''))}. The out-of-fold head agrees with "
        f"{100 * float(labels.get('head_accuracy', 0)):.1f} % of the given labels; the most likely errors first. "
        "<code>python train.py data.exclude_label_issues=&lt;this audit.json&gt;</code> leaves the flagged train "
        "photos out.</p>"
    )
    if labels.get("note"):
        intro += f'<p class="note">Note: {esc(labels["note"])}.</p>'
    if not issues:
        return intro + '<p class="note">No likely label errors flagged.</p>'
    cells = "".join(
        f'<figure class="cam" style="width:{side + 16}px" data-rank="{i["rank"]}">{_img(i["path"], side)}'
        f"<figcaption>#{i['rank']} <span class='tag split'>{esc(i['split'])}</span><br>given "
        f"<b class='wrong'>{esc(i['given'])}</b><br>suggested <b>{esc(i['suggested'])}</b> "
        f"({float(i['suggested_probability']):.2f})<br>score {float(i['score']):.3f}<br>"
        f"{esc(Path(i['path']).name)}</figcaption></figure>"
        for i in issues[:limit]
    )
    more = f'<p class="note">{len(issues) - limit} more in audit.json.</p>' if len(issues) > limit else ""
    return intro + f'<div class="grid" id="label-issues">{cells}</div>' + more


def _balance_table(stats: Mapping[str, Any]) -> str:
    counts = stats["class_counts"]
    splits = list(counts)
    classes = list(next(iter(counts.values())).keys()) if counts else []
    largest = max((counts[s][c] for s in splits for c in classes), default=1) or 1
    rows = [
        "<table id='balance'><tr><th>class</th>" + "".join(f"<th>{esc(s)}</th>" for s in splits) + "</tr>"
    ]
    for name in classes:
        cells = "".join(
            f'<td class="num bar"><span class="fill" style="width:{100 * counts[s][name] / largest:.1f}%"></span>'
            f'<span class="v">{counts[s][name]}</span></td>'
            for s in splits
        )
        rows.append(f"<tr><td>{esc(name)}</td>{cells}</tr>")
    ratios = "".join(f"<td class='num'>{esc(stats['balance'][s]['imbalance_ratio'])}</td>" for s in splits)
    rows.append(f"<tr><th>largest / smallest</th>{ratios}</tr></table>")
    return "".join(rows)


def _facts_table(stats: Mapping[str, Any]) -> str:
    def spread(values: Mapping[str, Any]) -> str:
        return f"{values['min']} / {values['median']} / {values['max']}" if values else "-"

    rows = [
        ("formats", ", ".join(f"{k or '?'} {v}" for k, v in stats["formats"].items())),
        ("modes", ", ".join(f"{k or '?'} {v}" for k, v in stats["modes"].items())),
        ("width px (min / median / max)", spread(stats["width"])),
        ("height px (min / median / max)", spread(stats["height"])),
        ("file bytes (min / median / max)", spread(stats["file_bytes"])),
        (f"tiny (shorter side < {stats['tiny']['shorter_side_below']} px)", stats["tiny"]["count"]),
        (f"extreme aspect (> {stats['extreme_aspect']['ratio_above']}:1)", stats["extreme_aspect"]["count"]),
        ("unreadable", stats["unreadable"]["count"]),
        ("extension does not match the format", stats["extension_mismatch"]["count"]),
    ]
    return (
        "<table id='files'>"
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _file_list(title: str, entry: Mapping[str, Any], limit: int, side: int, detail: str) -> str:
    files = entry.get("files") or []
    if not files:
        return ""
    cells = "".join(
        f'<figure class="cam" style="width:{side + 16}px">{_img(f["path"], side)}<figcaption>'
        f"{esc(detail.format(**f))}<br>{esc(f['class'])} ({esc(f['split'])})<br>{esc(Path(f['path']).name)}"
        "</figcaption></figure>"
        for f in files[:limit]
    )
    more = f'<p class="note">{len(files) - limit} more in audit.json.</p>' if len(files) > limit else ""
    return f"<h3>{esc(title)} ({len(files)})</h3><div class='grid'>{cells}</div>{more}"


def audit_page(audit: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    side = int(options.get("thumb", 160))
    summary, data, stats = audit["summary"], audit["data"], audit["stats"]
    exact, near = summary["exact_duplicates"], summary["near_duplicates"]
    cards = "".join(
        [
            _card(f"{summary['images']:,}", "photos", "images"),
            _card(summary["classes"], "classes", "classes"),
            _card(exact["groups"], f"exact duplicate groups ({exact['cross_split']} across splits)", "exact"),
            _card(near["groups"], f"near duplicate groups ({near['cross_split']} across splits)", "near"),
            _card(exact["cross_class"] + near["cross_class"], "groups across classes", "cross_class"),
            _card(summary["label_issues"], "likely label errors", "label_issues"),
            _card(summary["tiny"] + summary["extreme_aspect"], "tiny or extreme-aspect photos", "odd"),
            _card(summary["unreadable"], "unreadable", "unreadable"),
        ]
    )
    features = audit.get("features") or {}
    feature_note = (
        f"features: {features.get('model')} ({features.get('weights')}), {features.get('image_size')} px, "
        f"{features.get('engine')}"
        if features
        else "no features (features.enabled=false)"
    )
    settings = audit.get("settings", {}).get("duplicates", {})
    body = [
        EXTRA_CSS,
        f"<h1>Data audit: {esc(Path(data['root']).name or data['root'])}</h1>",
        f'<p class="sub">{esc(data["origin"])}</p>',
        f'<p class="sub">{esc(feature_note)}; near duplicates: pHash within {esc(settings.get("phash_distance"))} '
        f"bits or feature cosine &ge; {esc(settings.get('cosine'))}</p>",
        f'<div class="cards" id="headline">{cards}</div>',
        f"<h2>Exact duplicates ({exact['groups']} groups, {exact['files']} files)</h2>",
        "<p>Byte-identical files. Across splits: the val/test metrics are partly measured on training photos; "
        "across classes: one of the labels is wrong.</p>",
        _groups_section(audit["duplicates"]["exact"], "exact", int(options.get("max_groups", 60)), side),
        f"<h2>Near duplicates ({near['groups']} groups, {near['files']} files)</h2>",
        "<p>Resized, re-encoded or cropped copies and bursts of the same shot (groups joined transitively).</p>",
        _groups_section(audit["duplicates"]["near"], "near", int(options.get("max_groups", 60)), side),
        f"<h2>Likely label errors ({summary['label_issues']})</h2>",
        _issues_section(audit["label_issues"], int(options.get("max_issues", 60)), side),
        "<h2>Class balance</h2>",
        _balance_table(stats),
        "<h2>Files</h2>",
        _facts_table(stats),
        _file_list("Tiny", stats["tiny"], int(options.get("max_files", 40)), side, "{width}x{height} px"),
        _file_list(
            "Extreme aspect ratio",
            stats["extreme_aspect"],
            int(options.get("max_files", 40)),
            side,
            "{width}x{height} px ({aspect_ratio}:1)",
        ),
        _file_list("Unreadable", stats["unreadable"], int(options.get("max_files", 40)), side, "{error}"),
        '<p class="sub" style="margin-top:32px">Written by foodvision audit.py; everything is in audit.json '
        "beside this page.</p>",
    ]
    return html_page(f"foodvision audit: {data['root']}", "\n".join(body))
