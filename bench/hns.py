"""The Atari table: per-game scores and human-normalised scores (HNS) of a set of runs, with the
mean, median and IQM over games and seeds, next to the published DreamerV3 Atari100k figures.

    python bench/hns.py runs/atari100k/                 # a folder of run directories
    python bench/hns.py runs/Pong-s0 runs/Pong-s1 ...   # or the run directories themselves

A run's score is the mean return of its last evaluation (eval_<step>.json, e.g. the final
evaluation of bench/atari100k.sh); a run without one, or every run with `--source train`, scores
the mean return of its last `--last` training episodes (metrics.jsonl). Runs of one game are its
seeds. HNS = (score − random) / (human − random). Mean and median are over games (each game's
HNS is the mean over its seeds); the IQM (interquartile mean: the mean of the middle 50%, as in
rliable) is over all runs. The published figures are scored the same way over the same games.

Writes <out>/atari100k_table.md and <out>/atari100k_hns.png (out: the first FOLDER by default)
and prints one JSON line.
"""
import argparse
import os

import numpy as np
from matplotlib.figure import Figure

import common
from evaluate import ATARI100K_CSV, game_name, human_normalized, read_scores

PUBLISHED = {"dreamerv3_2023_paper": "DreamerV3 (2023 paper)",
             "dreamerv3_2024_scorefile": "DreamerV3 (2024 code)"}


def iqm(values):
    """Interquartile mean: drop the lowest and highest quarter (int(n/4) values each), average
    the rest (scipy.stats.trim_mean(values, 0.25))."""
    values = np.sort(np.asarray(values, np.float64))
    cut = int(0.25 * len(values))
    return float(values[cut:len(values) - cut].mean())


def aggregate(per_game, per_run):
    """mean and median over games, IQM over runs."""
    return dict(mean_hns=float(np.mean(per_game)), median_hns=float(np.median(per_game)),
                iqm_hns=iqm(per_run))


def run_dirs(folders):
    """Each folder is a run directory, or holds run directories."""
    def is_run(d):
        return os.path.isfile(os.path.join(d, "metrics.jsonl")) or bool(common.eval_records(d))

    runs = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise SystemExit(f"error: {folder} is not a directory")
        if is_run(folder):
            runs.append(folder)
        else:
            subs = sorted(os.path.join(folder, d) for d in os.listdir(folder))
            runs += [d for d in subs if os.path.isdir(d) and is_run(d)]
    return runs


def run_score(run_dir, source, last):
    """(score, where it came from) of one run, or (None, reason)."""
    records = common.eval_records(run_dir)
    if source == "eval" and records:
        return records[-1]["mean"], f"eval_{records[-1]['step']}.json"
    returns = [ret for _, ret in common.episode_returns(run_dir)][-last:]
    if not returns:
        return None, "no evaluation and no finished training episode"
    return float(np.mean(returns)), f"last {len(returns)} training episodes"


def collect(folders, source, last):
    """{game: [score per run]} of the Atari runs with reference scores."""
    games = {}
    for run_dir in run_dirs(folders):
        game = game_name(common.run_config(run_dir).get("env", ""))
        if game is None or game not in read_scores():
            common.warn(f"{run_dir}: not an Atari game with random and human scores; skipped")
            continue
        score, origin = run_score(run_dir, source, last)
        if score is None:
            common.warn(f"{run_dir}: {origin}; skipped")
            continue
        games.setdefault(game, []).append(score)
    return games


def table(games):
    """The per-game rows and the aggregates, ours and published."""
    published = read_scores(ATARI100K_CSV)
    rows = {}
    for game, scores in sorted(games.items()):
        row = dict(seeds=len(scores), score=float(np.mean(scores)),
                   hns=float(np.mean([human_normalized(s, game) for s in scores])))
        for key in PUBLISHED:
            if key in published.get(game, {}):
                row[key] = published[game][key]
        rows[game] = row
    per_run = [human_normalized(s, g) for g, scores in games.items() for s in scores]
    result = dict(runs=len(per_run), games=len(rows),
                  **aggregate([r["hns"] for r in rows.values()], per_run), per_game=rows)
    result["published"] = {}
    for key in PUBLISHED:
        same = [g for g in rows if key in rows[g]]  # the published runs on our games
        every = [g for g in published if key in published[g]]  # on the whole benchmark
        result["published"][key] = {}
        for name, subset in (("same_games", same), ("all_games", every)):
            hns = [human_normalized(published[g][key], g) for g in subset]
            if hns:
                result["published"][key][name] = dict(games=len(hns), **aggregate(hns, hns))
    return result


def markdown(result):
    cols = list(PUBLISHED)
    lines = ["| Game | Seeds | Score | HNS | " + " | ".join(f"{PUBLISHED[c]} score (HNS)" for c in cols) + " |",
             "|---|---|---|---|" + "---|" * len(cols)]
    for game, row in result["per_game"].items():
        cells = [f"{row[c]:g} ({human_normalized(row[c], game):.3f})" if c in row else "" for c in cols]
        lines.append(f"| {game} | {row['seeds']} | {row['score']:.1f} | {row['hns']:.3f} | " + " | ".join(cells) + " |")
    for stat, label in (("mean_hns", "Mean"), ("median_hns", "Median"), ("iqm_hns", "IQM")):
        cells = [f"{result['published'][c]['same_games'][stat]:.3f}"
                 if "same_games" in result["published"][c] else "" for c in cols]
        lines.append(f"| **{label} HNS** | | | **{result[stat]:.3f}** | " + " | ".join(cells) + " |")
    every = [f"{PUBLISHED[c]}: mean {v['mean_hns']:.3f}, median {v['median_hns']:.3f}, IQM {v['iqm_hns']:.3f} "
             f"over its {v['games']} games" for c in cols if (v := result["published"][c].get("all_games"))]
    notes = ["", "Score: mean return per run, averaged over the seeds. HNS = (score − random) / "
             "(human − random). Mean and median over games, IQM over runs (games × seeds); the "
             "published columns are aggregated over the same games."]
    return "\n".join(lines + notes + ["Whole benchmark: " + "; ".join(every) + "." if every else ""]) + "\n"


def bar_chart(result, path):
    games = list(result["per_game"])
    series = [("this code", [result["per_game"][g]["hns"] for g in games])]
    for key, label in PUBLISHED.items():
        series.append((label, [human_normalized(result["per_game"][g][key], g) if key in result["per_game"][g]
                               else np.nan for g in games]))
    fig = Figure(figsize=(max(6.0, 0.6 * len(games) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(games))
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="human")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, games, rotation=60, ha="right")
    ax.set_ylabel("human-normalised score")
    ax.set_title(f"Atari: mean HNS {result['mean_hns']:.3f}, median {result['median_hns']:.3f}, "
                 f"IQM {result['iqm_hns']:.3f}")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    p.add_argument("--source", default="eval", choices=["eval", "train"],
                   help="eval: the last evaluation of each run (training episodes when it has none); "
                        "train: the last training episodes")
    p.add_argument("--last", type=int, default=10, help="training episodes averaged for a training score")
    p.add_argument("--out", default="", help="folder for the table and the chart (default: the first FOLDER)")
    args = p.parse_args(argv)
    with common.quiet_stdout():
        games = collect(args.folders, args.source, args.last)
        if not games:
            raise SystemExit("error: no Atari run with a score found in " + " ".join(args.folders))
        result = table(games)
        out = args.out or args.folders[0]
        os.makedirs(out, exist_ok=True)
        result["markdown"] = os.path.join(out, "atari100k_table.md")
        with open(result["markdown"], "w") as f:
            f.write(markdown(result))
        result["png"] = bar_chart(result, os.path.join(out, "atari100k_hns.png"))
    common.emit(result)


if __name__ == "__main__":
    main()
