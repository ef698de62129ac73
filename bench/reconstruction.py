"""What a run's world model draws, and what it leaves out: its reconstructions of fresh frames.

    python bench/reconstruction.py runs/Breakout-cpu --steps 200 --png breakout_recon.png

A uniformly random policy plays `--steps` agent steps of the run's game (a fresh env with the
run's sticky actions; a new episode starts where one ends). The checkpoint's world model reads
the frames and actions (encoder, the RSSM's posterior, decoder), and each reconstruction is
compared with its frame. A pixel is missed when its error, averaged over the three colours,
exceeds `--threshold` of the full range: an object the model does not draw, such as a ball of
one or two pixels, shows as a few missed pixels in every frame it is in, while the mean error
stays small. Prints one JSON line; `--png` writes, for the frames with the most missed pixels,
the frame, its reconstruction and the error, one row each, enlarged four times.
"""
import argparse
import os

import numpy as np
import torch

import common
import train
from env import make_env
from model import reconstruct
from run_state import load_checkpoint, load_weights
from utils import image_grid, write_image


def play(env, steps, seed):
    """`steps` agent steps of a uniformly random policy, a new episode where one ends: a dict of
    arrays (steps, ...) with the frames (uint8), the action taken at each frame, the reward and
    terminal flag that the action led to, and is_first."""
    dtypes = dict(obs=np.uint8, action=np.int64, reward=np.float32, is_terminal=bool, is_first=bool)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    data, done = {key: [] for key in dtypes}, True
    for _ in range(steps):
        action = int(rng.integers(env.action_space.n))
        data["obs"].append(obs)
        data["action"].append(action)
        data["is_first"].append(done)
        obs, reward, terminated, truncated, _ = env.step(action)
        data["reward"].append(reward)
        data["is_terminal"].append(terminated)
        done = terminated or truncated
        if done:
            obs, _ = env.reset()
    return {key: np.array(value, dtypes[key]) for key, value in data.items()}


def pixel_errors(agent, data, threshold):
    """The reconstruction of each frame of `data` (see `play`) by the agent's world model, its
    error per pixel (T, 64, 64; averaged over the colours) and the missed pixels per frame (T,)."""
    agent.eval()
    _, _, recon = reconstruct(agent, *(torch.as_tensor(data[key])[None] for key in ("obs", "action", "is_first")))
    recon = recon[0].numpy()
    error = np.abs(recon - data["obs"].astype(np.float32) / 255.0).mean(-1)
    return recon, error, (error > threshold).sum((1, 2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=200, help="agent steps of the random policy")
    p.add_argument("--threshold", type=float, default=0.25, help="error of a missed pixel (0 to 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--png", default="", help="where the frames, reconstructions and errors go")
    args = p.parse_args(argv)
    if args.steps <= 0 or not 0 < args.threshold < 1:
        p.error("--steps must be positive and --threshold between 0 and 1")
    path = os.path.join(args.run_dir, "checkpoint.pt")
    common.set_threads(args.threads)
    torch.manual_seed(args.seed)  # the posterior's samples
    with common.quiet_stdout():
        try:
            checkpoint = load_checkpoint(path, evaluation=True)
            cfg = common.checkpoint_config(checkpoint, device="cpu", resume=path)
            env = make_env(cfg.env, cfg.sticky_actions)()
            agent, _ = train.build_agent(cfg, int(env.action_space.n), torch.device("cpu"))
            load_weights(cfg, checkpoint, agent)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        data = play(env, args.steps, args.seed)
        env.close()
        recon, error, missed = pixel_errors(agent, data, args.threshold)
        record = dict(run_dir=args.run_dir, env=cfg.env, agent_steps=checkpoint["counters"].get("env_steps", 0),
                      updates=checkpoint["counters"].get("updates", 0), frames=args.steps,
                      mean_abs_error=round(float(error.mean()), 5),
                      frames_with_a_missed_pixel=round(float((missed > 0).mean()), 3),
                      missed_pixels_per_frame=round(float(missed.mean()), 2), threshold=args.threshold)
        if args.png:
            worst = np.sort(np.argsort(-missed, kind="stable")[:8])
            rows = [data["obs"][worst] / 255.0, recon[worst], np.repeat(error[worst, ..., None], 3, -1)]
            record["png"] = write_image(args.png, image_grid(rows).repeat(4, 0).repeat(4, 1))
    common.emit(record)


if __name__ == "__main__":
    main()
