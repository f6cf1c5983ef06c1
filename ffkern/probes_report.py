"""The report folder of ``ffkern probe``: ``report.md``, ``probes.json`` and PNG plots.

Layout of the result dictionary that :func:`ffkern.probes.run_probes` returns (and
``probes.json`` holds, unchanged):

- ``config``, ``settings``, ``dataset``, ``chance_acc``, ``input_probe_acc`` (the probe on the
  first layer's normalized input), ``probe_rows`` and ``timing`` (seconds of training, of
  probing, and their ratio, over all runs);
- ``runs[name]`` for ``name`` in ``"unfrozen"``, ``"freeze 1"``, ...: ``freeze``, ``final``
  (the trainer's accuracies), ``history`` (one trainer record per epoch), ``layers_init`` and
  ``layers_final`` (one dictionary of length/direction measures per layer, see
  :func:`ffkern.probes.analyse_layers`), ``persistence`` (per layer, see
  :func:`ffkern.probes.persistence_summary`, with the per-unit lists), ``track`` (after every
  epoch, epoch 0 being the random initial network: ``probe_acc``, ``persistence_mean``,
  ``persistence_median``, ``persistence_min``, ``survivor_share``, one value per layer) and
  ``timing``.

Every file is written to a temporary name in the folder and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ffkern.checkpoint import atomic_write_bytes

PLOTS = ("frozen_layers.png", "length_direction.png", "persistence.png", "probes_over_training.png")


def check_out_dir(out: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse a non-empty report folder unless ``overwrite``; refuse a file in its place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"report folder {out} is not empty; choose another --out or pass --overwrite"
        )


def write_report(
    result: dict[str, Any], out: str | os.PathLike[str], overwrite: bool = False
) -> list[Path]:
    """Write ``probes.json``, the PNG plots and ``report.md`` into ``out``; returns the paths."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    text = json.dumps(_finite(result), indent=1, sort_keys=True)
    paths.append(_write_text(out / "probes.json", text + "\n"))
    for name, figure in _figures(result).items():
        paths.append(_write_figure(out / name, figure))
    paths.append(_write_text(out / "report.md", render_markdown(result)))
    return paths


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
    return path


def _write_figure(path: Path, figure: Any) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path


def _finite(value: Any) -> Any:
    """NaN and infinities become None: JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    return {
        "frozen_layers.png": plot_frozen(result),
        "length_direction.png": plot_length_direction(result),
        "persistence.png": plot_persistence(result),
        "probes_over_training.png": plot_probes_over_training(result),
    }


def _pct(values: Sequence[float | None]) -> list[float]:
    return [100.0 * v if v is not None else math.nan for v in values]


def _run_names(result: dict[str, Any]) -> list[str]:
    """Run names, the configured run first."""
    return list(result.get("run_order") or result["runs"])


def _main_run(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    name = _run_names(result)[0]
    return name, result["runs"][name]


def plot_frozen(result: dict[str, Any]) -> Any:
    """Left: test accuracy of both predictors per run. Right: per-layer accuracies per run."""
    import matplotlib.pyplot as plt

    runs = result["runs"]
    chance = 100.0 * result["chance_acc"]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 6.0))
    names = _run_names(result)
    xs = range(len(names))
    good = _pct([runs[n]["final"].get("test_acc") for n in names])
    soft = _pct([runs[n]["final"].get("test_acc_softmax") for n in names])
    ax0.bar([x - 0.2 for x in xs], good, width=0.4, label="goodness predictor")
    ax0.bar([x + 0.2 for x in xs], soft, width=0.4, label="softmax predictor")
    for x, g, s in zip(xs, good, soft, strict=True):
        for dx, v in ((-0.2, g), (0.2, s)):
            if math.isfinite(v):
                ax0.text(x + dx, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax0.axhline(chance, color="gray", linestyle=":", label="chance")
    ax0.set_xticks(list(xs), names)
    ax0.set_ylim(0, 118)
    ax0.set_xlabel("run (layers kept at their random initialization)")
    ax0.set_ylabel("test accuracy (%)")
    ax0.set_title("Whole-network predictors")
    ax0.legend(loc="upper center", ncol=3, fontsize=8)

    for k, name in enumerate(names):
        layers = runs[name]["layers_final"]
        idx = [d["layer"] for d in layers]
        color = f"C{k}"
        ax1.plot(
            idx,
            _pct([d["direction_probe_acc"] for d in layers]),
            "o-",
            color=color,
            label=f"{name}: linear probe on output",
        )
        ax1.plot(
            idx,
            _pct([d["goodness_acc"] for d in layers]),
            "s--",
            color=color,
            label=f"{name}: this layer's goodness",
        )
        for d in layers:
            if d["frozen"]:
                ax1.plot(d["layer"], 100 * d["direction_probe_acc"], "x", color="black", ms=10)
    ax1.plot([], [], "x", color="black", label="frozen layer")
    ax1.axhline(chance, color="gray", linestyle=":")
    ax1.set_xticks(sorted({d["layer"] for n in names for d in runs[n]["layers_final"]}))
    ax1.set_ylim(0, 105)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Per layer, after training")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=7)
    fig.suptitle(f"Frozen random layers ({result['dataset']})")
    fig.tight_layout()
    return fig


def plot_length_direction(result: dict[str, Any]) -> Any:
    """Label accuracy from the direction vs from the length, collapse measures, dead units."""
    import matplotlib.pyplot as plt

    name, run = _main_run(result)
    init, final = run["layers_init"], run["layers_final"]
    idx = [d["layer"] for d in final]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0, 0]
    series = (
        ("direction_probe_acc", "probe on direction (normalized output)", "o"),
        ("length_probe_acc", "probe on length (neutral-pass goodness)", "s"),
        ("label_goodness_probe_acc", "probe on the C per-label goodnesses", "^"),
        ("goodness_acc", "argmax over labels of goodness", "D"),
    )
    for k, (key, label, marker) in enumerate(series):
        ax.plot(idx, _pct([d[key] for d in final]), marker + "-", color=f"C{k}", label=label)
        ax.plot(idx, _pct([d[key] for d in init]), marker + ":", color=f"C{k}", alpha=0.6)
    ax.plot([], [], "k:", label="dotted: random initial network")
    ax.axhline(100 * result["chance_acc"], color="gray", linestyle="--", lw=0.8, label="chance")
    ax.set_ylim(0, 105)
    ax.set_xlabel("layer")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Where is the label: direction or length?")
    # The band between the length probes (near chance) and the rest is where nothing is drawn.
    ax.legend(fontsize=7, loc="center", bbox_to_anchor=(0.5, 0.43))

    panels = (
        (
            axes[0, 1],
            "class_mean_cosine",
            "mean cos(μ_a, μ_b), a ≠ b",
            "Between-class cosine of class-mean directions (1 = collapsed)",
            (0, 1.05),
        ),
        (
            axes[1, 0],
            "effective_rank",
            "participation ratio (dimensions)",
            "Effective rank of normalized outputs (centred covariance)",
            None,
        ),
        (
            axes[1, 1],
            "dead_fraction",
            "share of units (%)",
            "Dead units (never active on the test images)",
            None,
        ),
    )
    for ax, key, ylabel, title, ylim in panels:
        scale = 100.0 if key == "dead_fraction" else 1.0
        ax.plot(idx, [scale * d[key] for d in init], "o:", color="C7", label="random initial")
        ax.plot(idx, [scale * d[key] for d in final], "o-", color="C3", label="trained")
        if ylim is not None:
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xticks(idx)
    fig.suptitle(f"Length against direction, run '{name}' ({result['dataset']})")
    fig.tight_layout()
    return fig


def plot_persistence(result: dict[str, Any]) -> Any:
    """Cosine to the initial weights over training, its final spread, and selectivity."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name, run = _main_run(result)
    thr = result["settings"]["persist_threshold"]
    track, persist = run["track"], run["persistence"]
    epochs = track["epochs"]
    n_layers = len(persist)
    labels = [f"layer {p['layer']}" + (" (frozen)" if p["frozen"] else "") for p in persist]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for i in range(n_layers):
        axes[0, 0].plot(
            epochs, [t[i] for t in track["persistence_mean"]], "o-", ms=3, label=labels[i]
        )
        axes[0, 1].plot(
            epochs,
            _pct([t[i] for t in track["survivor_share"]]),
            "o-",
            ms=3,
            label=labels[i],
        )
    # Axes follow the data: after a short run every cosine can sit within a few hundredths of
    # 1, where a fixed [-1, 1] scale would show flat lines. The threshold is drawn if in range.
    low = min(min(p["persistence"]) for p in persist)
    low = max(-1.0, min(low, min(min(t) for t in track["persistence_mean"])))
    pad = max(0.005, 0.05 * (1.0 - low))
    y_range = (low - pad, 1.0 + pad)
    shown = y_range[0] <= thr <= y_range[1]
    axes[0, 0].set_ylim(*y_range)
    axes[0, 0].set_ylabel("mean over units of cos(w, w at init)")
    axes[0, 0].set_title("Distance travelled from the initial weights")
    axes[0, 1].set_ylim(-3, 103)
    axes[0, 1].set_ylabel(f"units with cos ≥ {thr:g} (%)")
    axes[0, 1].set_title("Surviving initial features")
    for ax in axes[0]:
        ax.set_xlabel("epoch (0 = initialization)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)

    ax = axes[1, 0]
    for i, p in enumerate(persist):
        ax.hist(
            p["persistence"],
            bins=40,
            range=y_range,
            histtype="step",
            lw=1.5,
            label=labels[i],
        )
    if shown:
        ax.axvline(thr, color="black", linestyle="--", label=f"threshold {thr:g}")
    ax.set_xlim(*y_range)
    note = "" if shown else f"\n(survival threshold {thr:g} is below every unit)"
    ax.set_xlabel("cos(final weights, initial weights) per unit" + note)
    ax.set_ylabel("units")
    ax.set_title("Persistence after training")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for i, p in enumerate(persist):
        ax.scatter(p["selectivity_init"], p["persistence"], s=5, alpha=0.5, label=labels[i])
    if shown:
        ax.axhline(thr, color="black", linestyle="--", lw=0.8)
    ax.set_ylim(*y_range)
    ax.set_xlabel("class selectivity at initialization (0 = none, 1 = one class)")
    ax.set_ylabel("cos(final, initial weights)")
    ax.set_title("Did the selective initial units survive?")
    ax.legend(fontsize=8, markerscale=3)
    fig.suptitle(f"Feature persistence, run '{name}' ({result['dataset']})")
    fig.tight_layout()
    return fig


def plot_probes_over_training(result: dict[str, Any]) -> Any:
    """One panel per run: each layer's probe accuracy by epoch, init as a dashed control."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {name: result["runs"][name] for name in _run_names(result)}
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
        track = run["track"]
        epochs = track["epochs"]
        for i in range(len(track["probe_acc"][0])):
            color = f"C{i}"
            ax.plot(
                epochs,
                _pct([t[i] for t in track["probe_acc"]]),
                "o-",
                ms=3,
                color=color,
                label=f"layer {i + 1}",
            )
            ax.axhline(100 * track["probe_acc"][0][i], color=color, linestyle="--", lw=0.8)
        ax.axhline(
            100 * result["input_probe_acc"],
            color="black",
            linestyle=":",
            label="probe on the input pixels",
        )
        ax.plot([], [], "k--", lw=0.8, label="dashed: random initial network")
        ax.set_xlabel("epoch (0 = initialization)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("linear-probe test accuracy (%)")
        ax.set_title(f"run '{name}'")
        ax.legend(fontsize=7, loc="lower right")
    lows = [100 * v for run in runs.values() for t in run["track"]["probe_acc"] for v in t]
    for ax in axes[0]:
        ax.set_ylim(max(0.0, min(lows + [100 * result["input_probe_acc"]]) - 5), 100.5)
    fig.suptitle(f"Per-layer linear probes over training ({result['dataset']})")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _p(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _stderr(acc: float, n: int) -> float:
    return math.sqrt(acc * (1.0 - acc) / max(n, 1))


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def render_markdown(result: dict[str, Any]) -> str:
    """The text of ``report.md``: settings, one section per question, timings."""
    cfg, st = result["config"], result["settings"]
    runs = {name: result["runs"][name] for name in _run_names(result)}
    main_name, main = _main_run(result)
    lines = [
        f"# Forward-Forward probes: {result['dataset']}",
        "",
        f"Network {'x'.join(map(str, cfg['layers']))}, {cfg['epochs']} epochs "
        f"({cfg['training']}), optimizer {cfg['optimizer']} lr {cfg['lr']:g}, goodness "
        f"{cfg['goodness']}, norm {cfg['norm']}, negatives {cfg['negatives']}, seed {cfg['seed']}. "
        f"Probes: softmax regression on standardized features, {st['steps']} Nesterov steps, "
        f"L2 {st['l2']:g}, fitted on {result['probe_rows']['train']} training images and scored "
        f"on {result['probe_rows']['test']} test images. Chance is {_p(result['chance_acc'])}; "
        f"the same probe on the input pixels (neutral label) scores "
        f"{_p(result['input_probe_acc'])}. One test image is "
        f"{100 / result['probe_rows']['test']:.2f}% and the binomial standard error of an "
        f"accuracy near 95% is {_p(_stderr(0.95, result['probe_rows']['test']))}: smaller "
        "differences are noise. Every number is in `probes.json`.",
        "",
        "## 1. Frozen random layers",
        "",
        "Runs share the configuration, the seed and hence the initial weights; a frozen layer "
        "keeps its random weights and only runs forward.",
        "",
        "![frozen layers](frozen_layers.png)",
        "",
    ]
    rows = []
    for name, run in runs.items():
        rows.append(
            [name, _p(run["final"].get("test_acc")), _p(run["final"].get("test_acc_softmax"))]
        )
    lines += _table(["run", "goodness predictor", "softmax predictor"], rows)
    n_layers = len(main["layers_final"])
    header = ["run"] + [f"layer {i + 1} probe / goodness" for i in range(n_layers)]
    rows = []
    for name, run in runs.items():
        cells = [name]
        for d in run["layers_final"]:
            mark = " (frozen)" if d["frozen"] else ""
            cells.append(f"{_p(d['direction_probe_acc'])} / {_p(d['goodness_acc'])}{mark}")
        rows.append(cells)
    lines += [
        "Per layer after training: linear probe on the layer's normalized output / the "
        "goodness predictor restricted to that single layer (test accuracy).",
        "",
        *_table(header, rows),
    ]
    for name, run in runs.items():
        unchanged = [p["layer"] for p in run["persistence"] if p["frozen"]]
        if unchanged:
            ok = all(p["weights_unchanged"] for p in run["persistence"] if p["frozen"])
            lines.append(
                f"- {name}: frozen layer(s) {unchanged} "
                f"{'bitwise unchanged' if ok else 'CHANGED (unexpected)'} after training."
            )
    lines += [
        "",
        "## 2. Length against direction",
        "",
        "The next layer receives only the direction (normalized output); the length is the "
        "goodness. *Direction probe*: linear probe on the neutral-pass normalized output. "
        "*Length probe*: the same probe on the neutral-pass goodness alone (one number per "
        "image: what the length says when the label is not given). *Per-label goodness "
        "probe*: the probe on the layer's goodness for each of the C candidate labels. "
        "*Goodness argmax*: the label whose embedding gives the layer the most goodness, no "
        "fitting. Cosine: mean over class pairs of cos(μ_a, μ_b) of class-mean directions; "
        "ReLU outputs are non-negative, so compare with the random network, not with 0. "
        "Effective rank: participation ratio (Σλ)²/Σλ² of the centred covariance "
        "(uncentred in brackets). Dead: units silent on every pass of every test image.",
        "",
        "![length against direction](length_direction.png)",
        "",
    ]
    for name, run in runs.items():
        rows = []
        for d0, d in zip(run["layers_init"], run["layers_final"], strict=True):
            rows.append(
                [
                    f"{d['layer']}{' (frozen)' if d['frozen'] else ''}",
                    f"{_p(d0['direction_probe_acc'])} → {_p(d['direction_probe_acc'])}",
                    f"{_p(d0['length_probe_acc'])} → {_p(d['length_probe_acc'])}",
                    f"{_p(d0['label_goodness_probe_acc'])} → {_p(d['label_goodness_probe_acc'])}",
                    f"{_p(d0['goodness_acc'])} → {_p(d['goodness_acc'])}",
                    f"{_f(d0['class_mean_cosine'])} → {_f(d['class_mean_cosine'])}",
                    f"{_f(d0['effective_rank'], 1)} ({_f(d0['effective_rank_uncentred'], 1)}) → "
                    f"{_f(d['effective_rank'], 1)} ({_f(d['effective_rank_uncentred'], 1)}) "
                    f"of {d['width']}",
                    f"{_p(d0['dead_fraction'])} → {_p(d['dead_fraction'])}",
                ]
            )
        lines += [
            f"Run '{name}', random initial network → trained:",
            "",
            *_table(
                [
                    "layer",
                    "direction probe",
                    "length probe",
                    "per-label goodness probe",
                    "goodness argmax",
                    "class-mean cosine",
                    "effective rank",
                    "dead",
                ],
                rows,
            ),
        ]
    thr = st["persist_threshold"]
    lines += [
        "## 3. Feature persistence",
        "",
        f"Persistence of a unit: cos(w, w⁰) between its weight vector now and at "
        f"initialization; it *survives* when that is at least {thr:g}. Selectivity of a unit: "
        "(μ_max − μ_rest)/(μ_max + μ_rest) of its mean neutral-pass activity over classes. "
        "Survivor probe: the direction probe restricted to the surviving units, against the "
        "same number of randomly chosen other units.",
        "",
        "![persistence](persistence.png)",
        "",
    ]
    rows = []
    for name, run in runs.items():
        for p in run["persistence"]:
            if p["frozen"]:
                continue
            rows.append(
                [
                    name,
                    str(p["layer"]),
                    _f(p["mean_persistence"]),
                    f"{p['survivors']} ({_p(p['survivor_share'])})",
                    f"{_f(p['selectivity_init_survivors'])} / {_f(p['selectivity_init_others'])}",
                    f"{_f(p['selectivity_final_survivors'])} / {_f(p['selectivity_final_others'])}",
                    _f(p["spearman_selectivity_init_vs_persistence"]),
                    f"{_p(p['survivor_probe_acc'])} / {_p(p['other_probe_acc'])}",
                ]
            )
    lines += _table(
        [
            "run",
            "layer",
            "mean cos",
            "survivors",
            "selectivity at init: surv. / others",
            "final selectivity: surv. / others",
            "Spearman(init selectivity, persistence)",
            "probe: survivors / others",
        ],
        rows,
    )
    rows = []
    for name, run in runs.items():
        for p in run["persistence"]:
            m = p.get("median_split")
            if p["frozen"] or not m:
                continue
            rows.append(
                [
                    name,
                    str(p["layer"]),
                    _f(m["persistence_cut"]),
                    f"{_f(m['selectivity_init_top'])} / {_f(m['selectivity_init_bottom'])}",
                    f"{_f(m['selectivity_final_top'])} / {_f(m['selectivity_final_bottom'])}",
                    f"{_p(m['probe_acc_top'])} / {_p(m['probe_acc_bottom'])}",
                ]
            )
    lines += [
        "Split at the median persistence (more persistent half / less persistent half), "
        "which stays informative when the threshold keeps every unit or none:",
        "",
        *_table(
            [
                "run",
                "layer",
                "median cos",
                "selectivity at init: top / bottom",
                "final selectivity: top / bottom",
                "probe on the half: top / bottom",
            ],
            rows,
        ),
    ]
    lines += [
        "## 4. Per-layer probes over training",
        "",
        "Linear-probe accuracy of each layer's normalized output after every epoch; epoch 0 "
        "is the random initial network, the control.",
        "",
        "![probes over training](probes_over_training.png)",
        "",
    ]
    track = main["track"]
    header = ["epoch"] + [f"layer {i + 1}" for i in range(n_layers)]
    rows = [
        [str(e)] + [_p(v) for v in accs]
        for e, accs in zip(track["epochs"], track["probe_acc"], strict=True)
    ]
    lines += [f"Run '{main_name}':", "", *_table(header, rows)]
    timing = result["timing"]
    rows = [
        [
            name,
            _f(r["timing"]["train_s"], 1),
            _f(r["timing"]["trainer_eval_s"], 1),
            _f(r["timing"]["probe_s"], 1),
            _f(r["timing"]["probe_over_train"], 2),
        ]
        for name, r in runs.items()
    ]
    rows.append(
        [
            "all",
            _f(timing["train_s"], 1),
            "",
            _f(timing["probe_s"], 1),
            _f(timing["probe_over_train"], 2),
        ]
    )
    lines += [
        "## Timing",
        "",
        f"Wall time {timing['total_s']:.1f} s in all.",
        "",
        *_table(
            [
                "run",
                "training steps (s)",
                "trainer evaluation (s)",
                "probes (s)",
                "probes / training",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)
