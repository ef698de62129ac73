"""Rhythm: a tiny game that only an agent which resets its memory at `is_first` can win.

At step t of an episode (t = 0, 1, 2, …) action t mod 2 pays +1 and the other action −1: the
agent must play 0, 1, 0, 1, … starting afresh with every episode. Episodes last 2 to 5 steps at
random and the screen never changes, so nothing but the `is_first` reset of the recurrent state
tells the agent that a new episode began. With the reset the agent earns the episode length (3.5
on average); without it, it cannot tell its phase and earns about 0.5 at best (always playing 0).
Registered as `tests.rhythm:Rhythm-v0`.
"""
import gymnasium as gym
import numpy as np


class Rhythm(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size=16, lengths=(2, 3, 4, 5)):
        self.lengths = lengths
        self.frame = np.full((size, size, 3), 128, np.uint8)
        self.observation_space = gym.spaces.Box(0, 255, self.frame.shape, np.uint8)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.length, self.t = int(self.np_random.choice(self.lengths)), 0
        return self.frame.copy(), {}

    def step(self, action):
        reward = 1.0 if int(action) == self.t % 2 else -1.0
        self.t += 1
        return self.frame.copy(), reward, self.t == self.length, False, {}


gym.register("Rhythm-v0", entry_point=Rhythm, max_episode_steps=100)
