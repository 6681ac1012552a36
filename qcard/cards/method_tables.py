"""The tables of a card's method section, for every rendering (md, html, tex).

Each table is a plain dict: {"title", "note", "columns": [(name, "l"|"r")], "rows": [[str, ...]],
"left_out": int (rows not shown; card.json has them all)}. The method's own tables are the card's
`sections` of kind "table" (a method hands them over through Method.card_sections; cards/ never reads
a method's statistics). Two generic tables follow, read from keys every method may write:
  training   method_stats.training.curve (loss, accuracies and learning rate per evaluation point),
             written by the shared training loop
  seeds      method_stats.per_seed (each seed's headline figures, when a point ran several seeds)
The helpers below (table, num, pct) are public so a method formats its tables the same way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

DASH = "—"
MAX_ROWS = 40


def pct(v: Any) -> str:
    if v is None:
        return DASH
    try:
        return f"{100 * float(v):.1f}"
    except (TypeError, ValueError):      # a method of the user's may store anything: show it as it is
        return str(v)


def num(v: Any, digits: int = 3) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:                   # counts (BOPs, bits) that came out fractional: expected values
        return f"{round(v):,}"
    return f"{v:.{digits}g}"


def table(title: str, columns, rows: List[List[str]], note: Optional[str] = None,
           limit: int = MAX_ROWS) -> Dict[str, Any]:
    shown = rows if len(rows) <= limit else rows[:limit]
    return {"kind": "table", "title": title, "note": note, "columns": list(columns), "rows": shown,
            "left_out": len(rows) - len(shown)}


# ------------------------------------------------------------------ training curve

def _curve_table(tr: Dict[str, Any]) -> List[Dict[str, Any]]:
    curve = [p for p in (tr.get("curve") or []) if isinstance(p, dict)]
    steps = [p for p in (tr.get("step_curve") or []) if isinstance(p, dict)]
    title = "Training curve"
    if len(steps) > len(curve):       # short runs: windows of optimizer steps say more than one epoch row
        curve, title = steps, "Training curve (windows of optimizer steps)"
    if not curve:
        return []
    known = ("epoch", "step", "loss", "train_acc", "eval_acc", "lr")
    keys = [k for k in known if any(k in p for p in curve)]
    keys += [k for k in dict.fromkeys(k for p in curve for k in p)      # other series, in their order
             if k not in known and all(isinstance(p.get(k), (int, float, type(None))) for p in curve)
             and not any(isinstance(p.get(k), bool) for p in curve)]
    heads = {"epoch": "epoch", "step": "step", "loss": "loss", "train_acc": "train acc %",
             "eval_acc": "eval acc %", "lr": "learning rate"}
    heads.update({k: k.replace("_", " ") for k in keys if k not in heads})
    if not keys:
        return []
    thinned = ""
    if len(curve) > MAX_ROWS:       # evenly spaced points, the last one always kept
        idx = sorted({round(i * (len(curve) - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)})
        thinned = f"{len(idx)} of {len(curve)} points, evenly spaced (all in card.json)"
        curve = [curve[i] for i in idx]
    rows = [[DASH if p.get(k) is None else (str(p[k]) if k in ("epoch", "step") else num(p[k], 4)) for k in keys]
            for p in curve]
    recipe = tr.get("recipe") if isinstance(tr.get("recipe"), dict) else {}
    bits = [f"{k} {recipe[k]}" for k in ("optimizer", "lr", "batch_size", "epochs", "schedule") if recipe.get(k) is not None]
    note = "; ".join(x for x in (("recipe: " + ", ".join(bits)) if bits else "", thinned) if x)
    return [table(title, [(heads[k], "l" if k == "epoch" else "r") for k in keys], rows, note or None)]


def _per_seed_table(ms: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows_in = [r for r in (ms.get("per_seed") or []) if isinstance(r, dict)]
    if not rows_in:
        return []
    keys = [k for k in dict.fromkeys(k for r in rows_in for k in r) if k != "seed"]
    cols = [("seed", "l")] + [(k, "r") for k in keys]
    rows = [[str(r.get("seed"))] + [num(r.get(k)) if not isinstance(r.get(k), str) else r[k] for k in keys]
            for r in rows_in]
    return [table("Per seed", cols, rows, f"the statistics above are seed {ms.get('stats_seed')}'s")]


def method_tables(card: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The card's own table sections, then the generic tables read from method_stats (training curve,
    per seed). A generic block of an unexpected shape gives a one-line note, never an error."""
    tables = [dict(s) for s in card.get("sections") or [] if isinstance(s, dict) and s.get("kind", "table") == "table"]
    ms = card.get("method_stats") or {}
    if isinstance(ms.get("training"), dict):
        try:
            tables += _curve_table(ms["training"])
        except Exception as exc:             # the card must render whatever the statistics hold
            tables.append(note_table("training statistics", exc))
    try:
        tables += _per_seed_table(ms)
    except Exception:
        pass
    return tables


def note_table(title: str, exc: BaseException) -> Dict[str, Any]:
    """A one-row table saying that statistics could not be tabulated."""
    return table(title, [("note", "l")], [[f"not tabulated ({type(exc).__name__}: {exc}); see card.json"]])
