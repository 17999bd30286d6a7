"""Push-T (Diffusion Policy, Chi et al. 2023) on top of gym-pusht, with the paper's observations.

gym-pusht is imported lazily so that `keypoints_from_state` (needed to build training data) works
without the simulator installed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from difflab.errors import ConfigError

# The paper's 9 keypoints of the T, fixed in the block's body frame (pixels, origin = the body
# origin that the state's block x, y refer to). gym-pusht's own keypoints are the T's 8 corners, so
# these were fitted once from pusht_cchi_v7_replay.zarr: kp_local = R(-theta) (keypoint - block_xy)
# for all 25650 frames, median over frames (float64). Rebuilt from the recorded pose they match the
# recorded keypoints to 1.1e-5 px median, 0.027 px at the 99th percentile.
PUSHT_KEYPOINTS_BODY: np.ndarray = np.array(
    [
        [9.269787, 90.040974],
        [-60.983472, -1.186730],
        [60.912755, -1.393363],
        [-0.270504, 25.543625],
        [-14.064927, 122.815854],
        [39.002738, 32.857404],
        [-39.966414, 32.729655],
        [-16.824344, 62.863179],
        [23.541461, -1.700288],
    ],
    dtype=np.float64,
)

# gym-pusht's T has its centre of gravity at (0, 45) in the body frame (mean of its two bars'
# centroids), and pymunk turns a body about its centre of gravity when the angle is set.
_BLOCK_COG = np.array([0.0, 45.0])


def _rotate(xy: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotate points (..., 2) counter-clockwise by theta (broadcast against xy[..., 0])."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], axis=-1)


def keypoints_from_state(state: np.ndarray) -> np.ndarray:
    """(..., 5) states (agent xy, block xy, block angle) -> (..., 18) flattened 9x2 world keypoints."""
    state = np.asarray(state, dtype=np.float64)
    kp = _rotate(PUSHT_KEYPOINTS_BODY, state[..., None, 4]) + state[..., None, 2:4]
    return kp.reshape(*state.shape[:-1], 18)


def _reset_block_xy(state: np.ndarray) -> np.ndarray:
    """Block position to hand gym-pusht's reset so that the block ends at state[2:4].

    gym-pusht (for legacy compatibility) sets the position at angle 0 and then the angle, which turns
    the T about its centre of gravity c and moves its origin from p' to p' + c - R(theta) c; solving
    for p' = p gives p' = p - c + R(theta) c.
    """
    return state[2:4] - _BLOCK_COG + _rotate(_BLOCK_COG, state[4])


class PushTEnv:
    """Headless, seeded gym-pusht with the observation dict our policies use; with cameras=True it also has
    `image`, uint8 (3, 96, 96): gym-pusht's own observation frame (what obs_type="pixels_agent_pos" returns as
    `pixels`, no action marker drawn), the picture the zarr's `img` recorded."""

    obs_dims: dict[str, int] = {"state": 5, "keypoint": 18, "agent_pos": 2}
    action_dim: int = 2
    max_steps: int = 300  # the paper's episode limit; the runner counts steps, this class does not

    def __init__(self, render_size: int = 96, cameras: bool = False, perturb: float = 0.0, perturb_speed: float = 200.0) -> None:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # pygame prints a banner on import
        try:
            from gym_pusht.envs.pusht import PushTEnv as _GymPushT
        except ImportError as e:
            raise ImportError(
                'Push-T needs gym-pusht: pip install gym-pusht (or pip install -e ".[pusht]")'
            ) from e
        if not 0.0 <= perturb <= 1.0 or perturb_speed < 0:
            raise ConfigError(f"perturb={perturb} is the chance per step of a push on the block, in [0, 1]; "
                              f"perturb_speed={perturb_speed} (px/s) must be >= 0")
        self.render_size = render_size
        self.cameras = bool(cameras)
        # The disturbed Push-T (BID's dynamic setting): at each step, with probability `perturb`, the block gets a kick
        # of speed `perturb_speed` in a random direction, drawn from the episode's seed so a run repeats.
        self.perturb, self.perturb_speed = float(perturb), float(perturb_speed)
        self._rng = np.random.default_rng(0)
        self.image_shapes: dict[str, tuple[int, int, int]] = {"image": (3, 96, 96)} if self.cameras else {}
        # Built directly rather than through gym.make, whose TimeLimit/checker wrappers we do not want.
        self._env = _GymPushT(
            obs_type="state",
            render_mode="rgb_array",
            visualization_width=render_size,
            visualization_height=render_size,
        )

    def _obs(self, state: np.ndarray) -> dict[str, np.ndarray]:
        state = np.asarray(state, dtype=np.float64)
        obs = {
            "state": state.astype(np.float32),
            "keypoint": keypoints_from_state(state).astype(np.float32),
            "agent_pos": state[:2].astype(np.float32),
        }
        if self.cameras:
            obs["image"] = self.observation_frame()
        return obs

    def observation_frame(self) -> np.ndarray:
        """uint8 (3, 96, 96): gym-pusht's pixel observation of the current state (its `_render()`, which the
        pixels obs types return), channels first as the encoder reads it."""
        frame = np.asarray(self._env._render(visualize=False))
        return np.ascontiguousarray(np.rint(frame).clip(0, 255).astype(np.uint8).transpose(2, 0, 1))

    def reset(self, seed: int, state: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Random start drawn from `seed`, or the recorded 5-vector `state` if given."""
        options = None
        if state is not None:
            s = np.asarray(state, dtype=np.float64).copy()
            s[2:4] = _reset_block_xy(s)
            options = {"reset_to_state": s}
        obs, _ = self._env.reset(seed=seed, options=options)
        self._rng = np.random.default_rng([int(seed), 0x50757368])
        return self._obs(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        """Absolute agent target (x, y) in pixels -> (obs, reward, done, info); done = success."""
        action = np.asarray(action, dtype=np.float64).reshape(2)
        pushed = bool(self.perturb) and self._rng.random() < self.perturb
        if pushed:
            angle = self._rng.uniform(0.0, 2 * np.pi)
            block = self._env.block
            block.velocity = (block.velocity[0] + self.perturb_speed * np.cos(angle),
                              block.velocity[1] + self.perturb_speed * np.sin(angle))
        obs, reward, terminated, _, info = self._env.step(action)
        info = {"is_success": bool(info["is_success"]), "coverage": float(info["coverage"]), "pushed": pushed}
        return self._obs(obs), float(reward), bool(terminated), info

    def render(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8 RGB frame, with the last action drawn as a cross."""
        return np.ascontiguousarray(self._env.render(), dtype=np.uint8)

    def close(self) -> None:
        self._env.close()
