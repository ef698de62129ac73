"""Catch whose env crashes on rank 1 of a torchrun job (`tests.crash:CrashOnRank1-v0`): a rank
that fails in the middle of training. On every other rank, and outside torchrun, it is Catch."""
import os

import gymnasium as gym

from tests.catch import Catch


class CrashOnRank1(Catch):
    def __init__(self, after=24):
        super().__init__()
        self.steps_left = after

    def step(self, action):
        self.steps_left -= 1
        if os.environ.get("RANK") == "1" and self.steps_left < 0:  # torchrun sets RANK
            raise RuntimeError("the env of rank 1 crashed")
        return super().step(action)


gym.register("CrashOnRank1-v0", entry_point=CrashOnRank1, max_episode_steps=100)
