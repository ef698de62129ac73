"""Scripted envs for the data-convention tests: frame value and reward both encode the step.

Step k of an episode (k = 0 at reset) shows a frame filled with 10·k and, for k ≥ 1, gives
reward k. `Terminate-v0` terminates at k = 3; `Truncate-v0` is cut by a time limit at k = 3.
"""
import gymnasium as gym
import numpy as np


class Scripted(gym.Env):
    def __init__(self, terminate_at=3):
        self.terminate_at = terminate_at
        self.observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return self._frame(), {}

    def step(self, action):
        self.k += 1
        return self._frame(), float(self.k), self.k == self.terminate_at, False, {}

    def _frame(self):
        return np.full((8, 8, 3), 10 * self.k, np.uint8)


gym.register("Terminate-v0", entry_point=Scripted, kwargs=dict(terminate_at=3))
gym.register("Truncate-v0", entry_point=Scripted, kwargs=dict(terminate_at=10**9),
             max_episode_steps=3)
