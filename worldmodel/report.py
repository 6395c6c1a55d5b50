"""Results tables and plots from the eval.json files of `worldmodel.evaluate`: the README's tables are this output.

`python -m worldmodel.report runs/none runs/intro_additive runs/intro_pose --out results`

Each argument is a run folder (its `eval/*/eval.json`), an eval folder (holding `eval.json`) or an eval.json file.
Writes `DIR/results.md` (one markdown table, also printed), `DIR/lag.png` (open-loop error and memory score against
the steps since the place was last seen, and error against the visit count, per model), `DIR/kl_per_step.png` and
`DIR/memory_score.png` (bars with 95% intervals).

eval.json (format `gtmm-eval`, version `EVAL_VERSION`; NaN is written as null):
    format, version, config (the evaluate flags), seq_len, context, env, data {path, name, env_id, env_kwargs,
    episodes, episodes_long_enough, windows_asked, windows, note}, bootstrap {unit, resamples, level, seed,
    estimator}, groups {name: meaning}, semantic {applies, ...}, train_steps {label: step}, ratios {name: value},
    models {label: MODEL}, references {copy_last: REF, mean_frame: REF}
MODEL:
    role (model | baseline), checkpoint, run, memory, address, train_steps, trained_seq_len,
    teacher_forcing {nll_revisit, nll_first_visit, kl_revisit, kl_first_visit, kl_per_step, nll_per_step, kl {...}},
    open_loop / reconstruction {GROUP: {mse, bce, psnr, ssim: STAT}, flat means mse_revisit, mse_first_visit,
    mse_revisit_context, bce_*, (open loop) mse_per_step}, oracle {revisit_context: {metric: STAT}},
    memory_score (STAT + against, against_memory, metric, oracle; null without --baseline),
    lag {lag | visits: {bins, revisit_context {mse [STAT per bin], score [...]}, revisit_new {mse [...]}}} (null
    without poses), retrieval {steps, revisit_context_steps, held_fraction, held_from_context_fraction, heads,
    chance_mass STAT, precision_at_1 / correct_mass / gate {mean_over_heads STAT, per_head [STAT]}} (on revisits
    of context places whose earlier visit memory holds; null for memory none or without poses),
    semantic {revisit_context, revisit_new, first_visit: STAT of digit agreement on digit-centred steps,
    prob_of_true {the same three: STAT of the probability of the true label}} (MNIST map only), counts {...}
REF: label, memory_score_oracle_of (the model whose oracle its score divides by), open_loop, memory_score, lag,
    semantic (as MODEL)
STAT: {mean, ci [low, high], n (steps), windows}
GROUP: revisit_context | revisit_new | first_visit | revisit
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import tyro

from gtmm import cli
from gtmm.cli import UserError
from gtmm.fs import FolderLock, write_bytes_atomic

EVAL_FORMAT = "gtmm-eval"
EVAL_VERSION = 2  # 1 = evaluate's first eval.json (no "format"/"version" fields, no intervals)


# -- reading eval.json -------------------------------------------------------------------------------------------------

def finite_json(value: Any) -> Any:
    """`value` with every NaN / inf float replaced by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def find_eval_files(path: str) -> list[Path]:
    """The eval.json files an argument names: a file, a folder holding eval.json, or a run folder (eval/*/eval.json)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise UserError(f"{path}: no such file or folder (expected a run folder, an eval folder or an eval.json)")
    if (p / "eval.json").is_file():
        return [p / "eval.json"]
    found = sorted(p.glob("eval/*/eval.json"))
    if not found:
        raise UserError(f"{path}: no eval.json in it or in {p / 'eval'}/*/ (evaluate it first: python -m "
                        f"worldmodel.evaluate --checkpoint {path} --data <held-out rollouts>)")
    return found


def load_eval(path: Path) -> dict[str, Any]:
    """An eval.json, checked for its format and version (a UserError names the file otherwise)."""
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(result, dict) or "models" not in result:
        raise UserError(f"{path}: not an eval.json of python -m worldmodel.evaluate (no 'models')")
    if result.get("format") != EVAL_FORMAT or result.get("version") != EVAL_VERSION:
        got = result.get("version", "1 (no version field)")
        raise UserError(f"{path}: eval.json version {got}, this report reads version {EVAL_VERSION} "
                        "(re-run python -m worldmodel.evaluate to rewrite it)")
    result["_path"] = str(path)
    return result


# -- rows --------------------------------------------------------------------------------------------------------------

def _setting(result: dict[str, Any]) -> str:
    return f"{result['data']['name']} (K {result['context']}, T {result['seq_len']})"


def entries_of(result: dict[str, Any], references: bool = False) -> list[dict[str, Any]]:
    """The rows of one eval.json: each model (and with `references` the reference predictors) as
    {label, kind, setting, entry, baseline_mse, baseline_memory, result}."""
    base = next((m for m in result["models"].values() if m["role"] == "baseline"), None)
    base_mse = _mean(base["open_loop"]["revisit_context"]["mse"]) if base else None
    rows = []
    for m in result["models"].values():
        label = f"{m['run']} ({m['memory']}/{m['address']})"
        if result["seq_len"] > m["trained_seq_len"]:
            label += f" [T {result['seq_len']} > trained {m['trained_seq_len']}]"
        rows.append({"label": label, "kind": m["role"], "setting": _setting(result), "entry": m,
                     "baseline_mse": base_mse, "baseline_memory": base["memory"] if base else None, "result": result})
    if references:
        for ref in result["references"].values():
            rows.append({"label": ref["label"], "kind": "reference", "setting": _setting(result), "entry": ref,
                         "baseline_mse": base_mse, "baseline_memory": base["memory"] if base else None,
                         "result": result})
    return rows


def collect_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of many eval.json files, each model once per data setting (a `none` baseline evaluated beside several
    models appears once; its entry as an evaluated model wins over its entry as a baseline), then the reference
    predictors once per setting."""
    rows: dict[tuple, dict[str, Any]] = {}
    refs: dict[tuple, dict[str, Any]] = {}
    for result in results:
        for row in entries_of(result, references=True):
            e = row["entry"]
            if row["kind"] == "reference":
                refs.setdefault((row["setting"], row["label"]), row)
                continue
            key = (str(Path(e["checkpoint"]).resolve()), e["train_steps"], row["setting"])
            if key not in rows or (rows[key]["kind"] == "baseline" and row["kind"] == "model"):
                rows[key] = row
    return list(rows.values()) + list(refs.values())


# -- the table ---------------------------------------------------------------------------------------------------------

def _mean(stat: Optional[dict[str, Any]]) -> Optional[float]:
    return None if stat is None else stat.get("mean")


def _fmt(stat: Optional[dict[str, Any]], digits: int, ci: bool = True) -> str:
    mean = _mean(stat)
    if mean is None:
        return "–"
    text = f"{mean:.{digits}f}"
    low, high = stat.get("ci", [None, None])
    if ci and low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def table_row(row: dict[str, Any]) -> list[str]:
    """The cells of one row of `results_table`."""
    e = row["entry"]
    ol = e["open_loop"]
    ctx_mse = ol["revisit_context"]["mse"]
    ratio = "–"
    if row["baseline_mse"] and _mean(ctx_mse) is not None:
        ratio = f"{_mean(ctx_mse) / row['baseline_mse']:.3f}"
        if row["baseline_memory"] != "none":
            ratio += f" (vs {row['baseline_memory']})"
    retrieval = e.get("retrieval")
    p_at_1 = "–"
    if retrieval and _mean(retrieval["precision_at_1"]["mean_over_heads"]) is not None:
        p_at_1 = (f"{_fmt(retrieval['precision_at_1']['mean_over_heads'], 2, ci=False)} "
                  f"({_fmt(retrieval['chance_mass'], 2, ci=False)})")
        if len(retrieval["precision_at_1"].get("per_head") or []) > 1:
            # a head the gate keeps shut lowers the mean without costing the prediction anything
            def per_head(key: str) -> str:
                return " / ".join(_fmt(h, 2, ci=False) for h in retrieval[key]["per_head"])

            p_at_1 += f"; heads {per_head('precision_at_1')} at gate {per_head('gate')}"
    semantic = e.get("semantic")
    sem = "–"
    if semantic:
        sem = f"{_fmt(semantic['revisit_context'], 2, ci=False)} / {_fmt(semantic['first_visit'], 2, ci=False)}"
    recon = e.get("reconstruction")
    steps = e.get("train_steps")
    return [row["label"], row["setting"], f"{steps:,}" if isinstance(steps, int) else "–", _fmt(ctx_mse, 4), ratio,
            _fmt(e.get("memory_score") if row["kind"] != "reference" else None, 2),
            _fmt(ol["revisit_context"]["psnr"], 1, ci=False),
            _fmt(ol["revisit_context"]["ssim"], 3, ci=False), p_at_1, sem,
            _fmt(ol["first_visit"]["mse"], 4, ci=False),
            _fmt(recon["revisit_context"]["mse"], 4, ci=False) if recon else "–"]


TABLE_HEAD = ["model", "data", "train steps", "open-loop MSE, context revisits [95% CI]", "x none",
              "memory score [95% CI]", "PSNR", "SSIM", "retrieval P@1 (chance); per head",
              "digit agreement ctx-rev / first", "first-visit MSE", "own recon MSE"]


def results_table(results: list[dict[str, Any]]) -> str:
    """One markdown table of every model of the given eval.json dicts (and the reference predictors), with the
    notes that say what the columns are and how many windows were used."""
    rows = collect_rows(results)
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    notes = sorted({f"{_setting(r)}: {r['data']['note']}, {r['bootstrap']['resamples']} bootstrap resamples over "
                    f"windows" for r in results})
    lines.append("")
    from worldmodel.metrics import PSNR_CAP_DB

    lines.append("Open-loop figures on revisits of places seen in the K context frames (PSNR in dB, per frame, capped "
                 f"at {PSNR_CAP_DB:.1f} dB = half an 8-bit grey level; SSIM; digit "
                 "agreement on windows centred on a digit); x none = MSE / the baseline's; memory score = (E_none - "
                 "E) / (E_none - E_oracle), 1 = the model's own reconstruction of the earlier view; retrieval P@1 = "
                 "share of steps whose top read slot holds an earlier visit of the place (chance = uniform read), "
                 "the mean over read heads, then each head's beside its mean read gate (a head the gate keeps shut "
                 "reads nothing). "
                 "The reference rows use no model; their memory score (in eval.json) divides by the evaluated "
                 "model's oracle, so it is left out here.")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def teacher_forcing_lines(result: dict[str, Any]) -> str:
    """KL and NLL per step (teacher forcing) of each model, one line each."""
    out = []
    for label, m in result["models"].items():
        tf = m["teacher_forcing"]
        f = lambda x, d: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        out.append(f"{label}: KL/step revisit {f(tf['kl_revisit'], 2)} / first visit {f(tf['kl_first_visit'], 2)}, "
                   f"NLL/step revisit {f(tf['nll_revisit'], 1)} / first visit {f(tf['nll_first_visit'], 1)} (nats)")
    return "\n".join(out)


# -- plots -------------------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, stats: list[dict[str, Any]], label: str, offset: float = 0.0) -> None:
    xs, ys, lows, highs = [], [], [], []
    for i, s in enumerate(stats):
        if _mean(s) is None:
            continue
        low, high = s["ci"]
        xs.append(i + offset), ys.append(s["mean"])
        lows.append(s["mean"] - (low if low is not None else s["mean"]))
        highs.append((high if high is not None else s["mean"]) - s["mean"])
    if xs:
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=label)


def plot_lag(rows: list[dict[str, Any]], out: Union[str, Path, BinaryIO]) -> None:
    """lag.png: open-loop MSE and memory score on revisits of context places against the lag since the place was
    last seen, and MSE against its visit count, one line per row (95% intervals as error bars)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    rows = [r for r in rows if r["entry"].get("lag")]
    for k, row in enumerate(rows):
        lag = row["entry"]["lag"]
        offset = (k - (len(rows) - 1) / 2) * 0.06
        _errorbar(axes[0], lag["lag"]["revisit_context"]["mse"], row["label"], offset)
        if "score" in lag["lag"]["revisit_context"]:
            _errorbar(axes[1], lag["lag"]["revisit_context"]["score"], row["label"], offset)
        _errorbar(axes[2], lag["visits"]["revisit_context"]["mse"], row["label"], offset)
    if rows:
        lag = rows[0]["entry"]["lag"]
        for ax, key in ((axes[0], "lag"), (axes[1], "lag"), (axes[2], "visits")):
            ax.set_xticks(range(len(lag[key]["bins"])), lag[key]["bins"])
    axes[0].set(title="open-loop MSE, revisits of context places", xlabel="steps since the place was last seen",
                ylabel="MSE per pixel")
    axes[1].set(title="memory score (0 = none, 1 = oracle copy)", xlabel="steps since the place was last seen")
    axes[1].axhline(0, color="grey", lw=0.8), axes[1].axhline(1, color="grey", lw=0.8, ls="--")
    axes[2].set(title="open-loop MSE by visit count", xlabel="earlier visits of the place", ylabel="MSE per pixel")
    _legend_below(fig, axes)
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)


def _legend_below(fig, axes) -> None:
    """One legend for all panels, under them (in a panel it hides the curves)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    rows = max(1, math.ceil(len(seen) / 3))
    fig.tight_layout(rect=(0, min(0.5, 0.07 * rows + 0.02), 1, 1))
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(3, len(seen)), fontsize=8,
                   frameon=False)


def plot_kl(rows: list[dict[str, Any]], out: Union[str, Path, BinaryIO]) -> None:
    """kl_per_step.png: the teacher-forced KL per step (nats), one line per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        tf = row["entry"].get("teacher_forcing")
        if tf:
            ax.plot([v if v is not None else float("nan") for v in tf["kl_per_step"]], label=row["label"])
    ax.set(title="KL(q || p) per step, teacher forcing", xlabel="step", ylabel="nats")
    _legend_below(fig, [ax])
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)


def plot_scores(rows: list[dict[str, Any]], out: Union[str, Path, BinaryIO]) -> None:
    """memory_score.png: the memory score of each row with its 95% interval."""
    plt = _plt()
    # the references' scores divide by one model's oracle (see their eval.json entry): not comparable across rows
    rows = [r for r in rows if r["kind"] != "reference" and _mean(r["entry"].get("memory_score")) is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4.5))
    for i, row in enumerate(rows):
        s = row["entry"]["memory_score"]
        low, high = s["ci"]
        err = [[s["mean"] - (low if low is not None else s["mean"])],
               [(high if high is not None else s["mean"]) - s["mean"]]]
        ax.bar(i, s["mean"], yerr=err, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.8), ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set(title="memory score on revisits of context places (95% CI)", ylabel="(E_none - E) / (E_none - E_oracle)")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)


def _png(plot, rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    plot(rows, buffer)
    return buffer.getvalue()


# -- the command -------------------------------------------------------------------------------------------------------

@dataclass
class ReportConfig:
    """Tabulate and plot eval.json files of python -m worldmodel.evaluate: one markdown table, lag/KL/score plots."""

    paths: tyro.conf.Positional[tuple[str, ...]]
    """run folders (their eval/*/eval.json), eval folders or eval.json files"""
    out: str
    """output folder for results.md, lag.png, kl_per_step.png, memory_score.png"""


def report(cfg: ReportConfig) -> str:
    """Write the table and plots of the eval.json files `cfg.paths` name into `cfg.out`; returns the table."""
    if not cfg.paths:
        raise UserError("no eval.json given: expected one or more run folders, eval folders or eval.json files")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder")
    files = [f for p in cfg.paths for f in find_eval_files(p)]
    files = list(dict.fromkeys(f.resolve() for f in files))  # one file named twice counts once
    results = [load_eval(f) for f in files]
    table = results_table(results)
    rows = collect_rows(results)
    model_rows = [r for r in rows if r["kind"] != "reference"]
    with FolderLock(out, "report"):
        sources = "\n".join(f"- {f}" for f in files)
        write_bytes_atomic(out / "results.md", f"{table}\n\nFrom:\n{sources}\n".encode())
        write_bytes_atomic(out / "lag.png", _png(plot_lag, rows))
        write_bytes_atomic(out / "kl_per_step.png", _png(plot_kl, model_rows))
        write_bytes_atomic(out / "memory_score.png", _png(plot_scores, rows))
    print(table)
    print(f"wrote {out / 'results.md'}, lag.png, kl_per_step.png, memory_score.png from {len(files)} eval.json",
          file=sys.stderr)
    return table


def main(argv: list[str] | None = None) -> None:
    """``python -m worldmodel.report``: parse the flags and write the report."""
    report(cli.parse(ReportConfig, argv, prog="worldmodel.report"))


if __name__ == "__main__":
    cli.run(main)
