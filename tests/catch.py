"""Catch: a tiny pixel game for the end-to-end learning test.

A ball falls one row per step from a random column of the top row; a paddle on the bottom row
moves left / stays / moves right. When the ball reaches the bottom row the episode ends with
+1 if the paddle is under it and −1 otherwise. Frames are RGB (rows·8 × cols·8) and go through
train.py's resize to 64×64 like any non-Atari env. Registered as `tests.catch:Catch-v0`. It has
`get_state` / `set_state` (see env.SavesState), so a resumed run continues its episodes.
"""
import gymnasium as gym
import numpy as np


class Catch(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, rows=6, cols=5, cell=8):
        self.rows, self.cols, self.cell = rows, cols, cell
        self.observation_space = gym.spaces.Box(0, 255, (rows * cell, cols * cell, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.ball_row, self.ball_col = 0, int(self.np_random.integers(self.cols))
        self.paddle = self.cols // 2
        return self._frame(), {}

    def step(self, action):
        self.paddle = int(np.clip(self.paddle + int(action) - 1, 0, self.cols - 1))
        self.ball_row += 1
        done = self.ball_row == self.rows - 1
        reward = (1.0 if self.paddle == self.ball_col else -1.0) if done else 0.0
        return self._frame(), reward, done, False, {}

    def get_state(self):  # the env state protocol of env.SavesState
        return dict(ball=(self.ball_row, self.ball_col), paddle=self.paddle,
                    rng=self.np_random.bit_generator.state)

    def set_state(self, state):
        (self.ball_row, self.ball_col), self.paddle = state["ball"], state["paddle"]
        self.np_random.bit_generator.state = state["rng"]

    def _frame(self):
        grid = np.zeros((self.rows, self.cols, 3), np.uint8)
        grid[self.ball_row, self.ball_col] = (255, 64, 64)
        grid[self.rows - 1, self.paddle] = (64, 255, 64) if self.ball_row < self.rows - 1 or \
            self.paddle != self.ball_col else (255, 255, 64)
        return grid.repeat(self.cell, 0).repeat(self.cell, 1)


gym.register("Catch-v0", entry_point=Catch, max_episode_steps=100)
