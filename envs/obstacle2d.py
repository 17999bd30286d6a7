"""Obstacle2D: a point robot passes a disc obstacle to reach a goal; the demonstrations are bimodal.

The expert goes straight up from the start, then branches LEFT or RIGHT around
the obstacle at random (50/50, independent of the start) and comes back to the
goal. Both routes are mirror images (x -> -x) of one path, so the mean of the
two is the straight line x = 0 through the obstacle: a policy that regresses
the mean action (behaviour cloning with an MSE loss) drives into it, while a
policy that samples the action distribution (a diffusion policy) takes one
route or the other. Nothing is downloaded; demonstrations come from a seed.

World, in the same units everywhere (no pixels):

    [-1.5, 1.5]^2 box; start ~ U([-0.1, 0.1] x [-1.1, -0.9]); obstacle disc
    (0, 0) r 0.35; goal disc (0, 1) r 0.1. An action is an absolute target
    position (as in Push-T); the robot moves towards it by at most 0.08 per step.

The expert's branch point decides whether regression fails. The expert first
funnels every start onto x = 0, then turns almost sideways at y ~ -0.55, only
~0.2 below the obstacle, and passes it ~0.1 clear. A regressor that keeps
going straight up for a step or two too long is then too close to get round.
With a lower branch, a small asymmetry (for example a lean per start memorised
from the training set) has room to grow into a committed side, and regression
often gets past. Test: an MLP regressor on 2-observation / 16-action chunks,
executing 8 actions. With 1000 demos it collided in 91-100% of episodes over 4
data/training seeds. With 200 demos it escaped in up to about half of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

WORLD_HALF = 1.5
OBSTACLE_CENTER = np.array([0.0, 0.0])
OBSTACLE_RADIUS = 0.35
GOAL_CENTER = np.array([0.0, 1.0])
GOAL_RADIUS = 0.1
START_CENTER = np.array([0.0, -1.0])
START_HALF_SIZE = 0.1
MAX_SPEED = 0.08

# The expert's path is x = side * detour_offset(y): 0 below the obstacle, DETOUR_X
# beside it, 0 again at the goal. The steep rise makes the robot step out almost
# sideways (it follows with a lag, so its own path stays smooth). Over 1000 noisy
# episodes its closest approach to the obstacle is 0.107.
DETOUR_X = 0.6
DETOUR_PROFILE = (-0.45, -0.4, 0.35, 1.0)  # starts rising, fully out, starts returning, back at x = 0
LOOKAHEAD = 0.1  # > MAX_SPEED, so the expert always moves at full speed; the turn starts at y = -0.45 - LOOKAHEAD


def detour_offset(y: np.ndarray | float) -> np.ndarray:
    """|x| of the expert's path at height y (raised-cosine ramps)."""
    y0, y1, y2, y3 = DETOUR_PROFILE
    y = np.asarray(y, dtype=np.float64)
    u = np.minimum(np.clip((y - y0) / (y1 - y0), 0.0, 1.0), np.clip((y3 - y) / (y3 - y2), 0.0, 1.0))
    return DETOUR_X * (1.0 - np.cos(np.pi * u)) / 2.0


def segment_disc_entry(p0: np.ndarray, p1: np.ndarray, center: np.ndarray, radius: float) -> float | None:
    """Fraction t in [0, 1] at which p0 + t (p1 - p0) first touches the disc, or None if it never does."""
    p0, p1, center = (np.asarray(v, dtype=np.float64) for v in (p0, p1, center))
    d, f = p1 - p0, p0 - center
    c = f @ f - radius**2
    if c <= 0.0:
        return 0.0
    a = d @ d
    if a == 0.0:
        return None
    b = 2.0 * (f @ d)
    disc = b * b - 4.0 * a * c
    if disc < 0.0:
        return None
    # c > 0 (p0 outside) makes both roots the same sign, so only the smaller one can be the entry.
    t = (-b - np.sqrt(disc)) / (2.0 * a)
    return float(t) if 0.0 <= t <= 1.0 else None


def advance(pos: np.ndarray, action: np.ndarray, max_speed: float = MAX_SPEED) -> tuple[np.ndarray, bool]:
    """The dynamics: (position after one step as float32, whether it hit the obstacle).

    The target is clipped to the world box (which is convex, so the robot stays
    inside it); a move whose segment enters the obstacle stops at the contact
    point, even if both ends lie outside the disc.
    """
    pos = np.asarray(pos, dtype=np.float64).reshape(2)
    target = np.asarray(action, dtype=np.float64).reshape(2)
    if not np.all(np.isfinite(target)):
        raise ValueError(f"action must be finite, got {target}")
    target = np.clip(target, -WORLD_HALF, WORLD_HALF)
    delta = target - pos
    dist = float(np.hypot(*delta))
    new = target if dist <= max_speed else pos + delta * (max_speed / dist)
    t = segment_disc_entry(pos, new, OBSTACLE_CENTER, OBSTACLE_RADIUS)
    if t is not None:
        new = pos + t * (new - pos)
    # float32 state: the observation is then the whole state, and replaying
    # recorded (float32) actions from recorded observations is exact.
    return new.astype(np.float32), t is not None


class Obstacle2DEnv:
    """Seeded point-robot environment with the observation dict our policies use."""

    obs_dims: dict[str, int] = {"agent_pos": 2}
    action_dim: int = 2
    # The expert needs 30-35 steps; the runner counts steps (as for Push-T), this class does not.
    max_steps: int = 80

    def __init__(self, render_size: int = 96, max_speed: float = MAX_SPEED) -> None:
        self.render_size = render_size
        self.max_speed = max_speed
        self._pos: np.ndarray | None = None
        self._path: list[np.ndarray] = []
        self._last_action: np.ndarray | None = None
        self._route = 0
        self._done = False

    def _obs(self) -> dict[str, np.ndarray]:
        return {"agent_pos": self._pos.copy()}

    def reset(self, seed: int, state: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Start drawn from `seed` (uniform in a box around (0, -1), symmetric about x = 0), or at `state` (2,) if given."""
        if state is None:
            offset = np.random.default_rng(seed).uniform(-START_HALF_SIZE, START_HALF_SIZE, size=2)
            state = START_CENTER + offset
        self._pos = np.asarray(state, dtype=np.float32).reshape(2).copy()
        self._path = [self._pos.copy()]
        self._last_action = None
        self._route = 0
        self._done = False
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        """Absolute target (x, y) -> (obs, reward, done, info); done = goal reached or obstacle hit.

        info: is_success, collision, and route (-1 left, +1 right, 0 not yet): the
        side on which the robot last crossed y = 0 upwards, i.e. passed the obstacle.
        """
        if self._pos is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset()")
        old = self._pos.astype(np.float64)
        new, collision = advance(old, action, self.max_speed)
        if old[1] < 0.0 <= new[1]:
            x_cross = old[0] + (new[0] - old[0]) * (-old[1]) / (new[1] - old[1])
            self._route = 1 if x_cross > 0.0 else -1
        self._pos = new
        self._path.append(new.copy())
        self._last_action = np.asarray(action, dtype=np.float64).reshape(2).copy()
        success = (not collision) and float(np.hypot(*(new - GOAL_CENTER))) <= GOAL_RADIUS
        self._done = collision or success
        info = {"is_success": success, "collision": collision, "route": self._route}
        return self._obs(), 1.0 if success else 0.0, self._done, info

    def render(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8 RGB: obstacle, goal, the path so far, the robot and the last target (cross)."""
        from PIL import Image, ImageDraw

        if self._pos is None:
            raise RuntimeError("call reset() before render()")
        ss = 4  # drawn at 4x and downsampled: antialiasing without a dependency
        size = self.render_size * ss
        scale = size / (2 * WORLD_HALF)

        def px(p) -> tuple[float, float]:
            return (float(p[0]) + WORLD_HALF) * scale, (WORLD_HALF - float(p[1])) * scale

        def disc(draw, center, radius, fill):
            cx, cy = px(center)
            r = radius * scale
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)

        img = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        disc(draw, OBSTACLE_CENTER, OBSTACLE_RADIUS, (200, 60, 60))
        disc(draw, GOAL_CENTER, GOAL_RADIUS, (60, 170, 80))
        width = max(1, round(size / 96))
        if len(self._path) > 1:
            draw.line([px(p) for p in self._path], fill=(70, 110, 220), width=width, joint="curve")
        disc(draw, self._pos, 0.05, (20, 30, 110))
        if self._last_action is not None:
            ax, ay = px(np.clip(self._last_action, -WORLD_HALF, WORLD_HALF))
            arm = 0.04 * scale
            draw.line([ax - arm, ay - arm, ax + arm, ay + arm], fill=(0, 0, 0), width=width)
            draw.line([ax - arm, ay + arm, ax + arm, ay - arm], fill=(0, 0, 0), width=width)
        img = img.resize((self.render_size, self.render_size), Image.LANCZOS)
        return np.asarray(img, dtype=np.uint8).copy()

    def close(self) -> None:
        self._path = []


class ScriptedExpert:
    """Goes around the obstacle on one side, drawn 50/50 at construction unless `side` is given."""

    def __init__(self, rng: np.random.Generator, noise: float = 0.01, side: int | None = None) -> None:
        self.rng = rng
        self.noise = noise
        if side is None:
            side = -1 if rng.random() < 0.5 else 1
        if side not in (-1, 1):
            raise ValueError(f"side must be -1 (left) or +1 (right), got {side}")
        self.side = side

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Target (float32, (2,)): the path point LOOKAHEAD higher than the robot, plus Gaussian noise.

        Stateless (a function of the observation only), so it recovers from any
        perturbation and the demonstrations are consistent with a Markov policy.
        Aiming higher than the robot also means the two routes' mean target is
        always straight up, not a standstill.
        """
        x, y = np.asarray(obs["agent_pos"], dtype=np.float64).reshape(2)
        ty = min(y + LOOKAHEAD, GOAL_CENTER[1])
        target = np.array([self.side * float(detour_offset(ty)), ty])
        if self.noise > 0:
            target = target + self.rng.normal(0.0, self.noise, size=2)
        return target.astype(np.float32)


def generate_demos(num_episodes: int, seed: int, noise: float = 0.01) -> list[dict[str, np.ndarray]]:
    """`num_episodes` successful expert episodes {"agent_pos": (T, 2), "action": (T, 2)}, float32.

    agent_pos[t] is what the expert saw when it chose action[t] (the final
    position, at the goal, is not included). Half the episodes go each way (odd
    counts: one extra, either side), in random order and independent of the
    starts, so that neither route is over-represented by chance: a majority
    would lean a regression policy towards its side.
    """
    rng = np.random.default_rng(seed)
    sides = rng.permutation(np.repeat([-1, 1], (num_episodes + 1) // 2))[:num_episodes]
    env = Obstacle2DEnv()
    episodes: list[dict[str, np.ndarray]] = []
    failures = 0
    for side in sides:
        while True:
            obs = env.reset(seed=int(rng.integers(2**31)))
            expert = ScriptedExpert(rng, noise=noise, side=int(side))
            observations, actions, success = [], [], False
            for _ in range(env.max_steps):
                action = expert.act(obs)
                observations.append(obs["agent_pos"])
                actions.append(action)
                obs, _, done, info = env.step(action)
                if done:
                    success = info["is_success"]
                    break
            if success:
                break
            failures += 1
            if failures > num_episodes + 10:
                raise RuntimeError(f"the expert failed {failures} times for {len(episodes)} successful episodes")
        episodes.append({"agent_pos": np.stack(observations), "action": np.stack(actions)})
    env.close()
    return episodes
