"""Evaluation: full episodes of a policy on fresh seeded envs, their summary, and the
human-normalised score (HNS) of Atari games.

    python train.py --resume runs/Pong-.../checkpoint.pt --eval_episodes 100

HNS = (score − random) / (human − random), with the random and human scores of the 57-game Atari
benchmark in scores/atari57_random_human.csv: 0 is random play, 1 is the human tester.
"""
import csv
import functools
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from env import Collector, is_atari, make_vector_env
from model import AgentPolicy
from utils import warn, write_video

SCORES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scores")
RANDOM_HUMAN_CSV = os.path.join(SCORES_DIR, "atari57_random_human.csv")
ATARI100K_CSV = os.path.join(SCORES_DIR, "atari100k_scores.csv")
VIDEO_BYTES = 1 << 30  # frames kept for the best episode's video, over all envs together


# ---------------------------------------------------------------------------------------------
# Human-normalised score


@functools.lru_cache(maxsize=None)
def read_scores(path=RANDOM_HUMAN_CSV):
    """{game: row} of a scores CSV (a `game` column, the others numbers), e.g. for
    atari57_random_human.csv {"Pong": {"random": -20.7, "human": 14.6}, ...}."""
    with open(path, newline="") as f:
        return {row.pop("game"): {k: float(v) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)}


def game_name(env_id):
    """The CSV name of an Atari env id (ALE/MontezumaRevenge-v5 → MontezumaRevenge); None for
    other envs."""
    if not is_atari(env_id):
        return None
    return env_id.split(":")[-1].split("/", 1)[1].rsplit("-v", 1)[0]


def atari_id(game):
    """The env id of a CSV game name (Pong → ALE/Pong-v5)."""
    return f"ALE/{game}-v5"


def human_normalized(score, game):
    """(score − random) / (human − random) for a game of the CSV; None for other games."""
    row = read_scores().get(game)
    if row is None:
        return None
    return (score - row["random"]) / (row["human"] - row["random"])


# ---------------------------------------------------------------------------------------------
# Episodes


class EvalResult:
    """Returns and lengths of finished evaluation episodes, and the frames of the best one."""

    def __init__(self):
        self.returns, self.lengths, self.best_frames = [], [], None

    @property
    def mean(self):
        return float(np.mean(self.returns))


@torch.no_grad()
def evaluate(agent, env_id, episodes, num_envs=4, seed=0, sticky=0.25, greedy=False,
             policy=None, video=False, progress=False):
    """`episodes` full episodes of the agent's policy (sampled as in training, or argmax with
    `greedy`), or of `policy(obs, is_first) -> actions` when given (e.g. random actions).

    Every env plays a fixed share of the episodes: stopping at the first N episodes to end, in
    whichever env, would favour short episodes. With `video`, the frames of the best episode
    are kept (up to VIDEO_BYTES of frames per episode in progress).
    """
    num_envs = max(1, min(num_envs, episodes))
    share = [episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)]
    done = [0] * num_envs
    result = EvalResult()
    envs = make_vector_env(env_id, num_envs, sticky)
    try:
        if policy is None:
            policy = AgentPolicy(agent, num_envs, next(agent.parameters()).device, greedy)
        collector = Collector(envs, seed=seed)
        max_frames = max(1, VIDEO_BYTES // (num_envs * collector.obs[0].nbytes))
        frames = [[collector.obs[i].copy()] for i in range(num_envs)]
        bar = tqdm(total=episodes, unit="episode", desc="eval", dynamic_ncols=True,
                   disable=not progress)
        while sum(done) < episodes:
            finished = collector.step(policy)
            for i in range(num_envs) if video else ():
                if collector.episodes.is_first[i]:
                    frames[i] = []
                if len(frames[i]) < max_frames and done[i] < share[i]:
                    frames[i].append(collector.obs[i].copy())
            for i, ret, length in finished:
                if done[i] >= share[i]:
                    continue  # this env has played its share; later episodes do not count
                done[i] += 1
                bar.update(1)
                if video and (not result.returns or ret > max(result.returns)):
                    result.best_frames = frames[i]
                result.returns.append(ret)
                result.lengths.append(length)
        bar.close()
    finally:
        envs.close()
    return result


def summary(result, env_id, step, greedy, seed):
    """The JSON record of an evaluation; `hns` only for Atari games with reference scores."""
    returns = np.asarray(result.returns, np.float64)
    record = dict(env=env_id, game=game_name(env_id) or env_id, step=int(step), greedy=bool(greedy),
                  seed=int(seed), episodes=len(returns), mean=float(returns.mean()),
                  median=float(np.median(returns)), std=float(returns.std()),
                  returns=[float(r) for r in returns], lengths=[int(n) for n in result.lengths])
    game = game_name(env_id)
    if game is not None:
        hns = human_normalized(record["mean"], game)
        if hns is None:
            warn(f"{game} has no random and human scores in {os.path.basename(RANDOM_HUMAN_CSV)}; "
                 f"no human-normalised score")
        else:
            record["hns"] = hns
    return record


def write_report(result, run_dir, env_id, step, greedy, seed):
    """Write <run_dir>/eval_<step>.json (and eval_<step>.mp4 of the best episode when its frames
    were kept); returns the record."""
    record = summary(result, env_id, step, greedy, seed)
    os.makedirs(run_dir, exist_ok=True)
    if result.best_frames:
        path = os.path.join(run_dir, f"eval_{step}.mp4")
        try:
            record["video"] = write_video(path, result.best_frames)
        except Exception as e:  # a codec or disk failure loses the video, not the scores
            warn(f"could not write {path} ({type(e).__name__}: {e})")
    path = os.path.join(run_dir, f"eval_{step}.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(f"{path}.tmp", path)
    record["path"] = path
    return record


def describe(record):
    """One console line: episodes, mean (median, std) and the HNS where there is one."""
    line = (f"eval: {record['episodes']} episodes of {record['env']} at step {record['step']}: "
            f"mean return {record['mean']:.2f} (median {record['median']:.2f}, std {record['std']:.2f})")
    if "hns" in record:
        line += f", human-normalised {record['hns']:.3f}"
    return line
