"""How a policy's action chunks become the actions a robot executes, with or without inference delay.

One implementation serves `Policy.select_action` and the lockstep runner. A policy's plan is a chunk of L actions
for the current step and the L - 1 after it (the executable part of its horizon). The executor decides when to
plan (`due`), and what to execute at each step from the chunks it was given (`action`):

- `receding` (Diffusion Policy's): plan every n_action_steps and execute the newest chunk;
- `temporal_ensemble` (ACT's): plan every step and execute the average of every chunk that covers the step, the
  oldest weighted most, w_i = exp(-m i) (i = 0 for the oldest prediction; m = 0 is the plain mean);
- `bid` (bidirectional decoding, Liu et al. 2025): receding, but each plan draws N candidate chunks and keeps the
  one that minimises backward coherence with the chunk it replaces (sum over the overlapping steps of
  rho^k ||c_k - previous_k||^2) plus forward contrast (mean squared distance to the other N - 1 candidates minus
  that to N samples of a weaker policy: close to the strong policy's mode, away from the weak one's);
- `rtc` (real-time chunking, Black et al. 2025): receding, but each chunk is sampled with soft-masked inpainting
  guidance toward the previous chunk's actions on the steps both plan (samplers.inpainting): fully on the d steps
  that execute while it is computed, decaying over the rest of the overlap. Denoiser methods only; no retraining.

Inference delay `d` (steps): a plan made from the observation of step t arrives at step t + d; until then the
previous chunk keeps running, and the new chunk's first d actions, for steps already gone, are dropped. Receding
then plans d steps before its chunk runs out, so n_action_steps + d must fit in the L actions a chunk has. The
first chunk of an episode is made before the clock starts (a robot waits for it once). With d = 0 `receding` is
exactly the lockstep receding horizon of before.
"""

from __future__ import annotations

import math

import numpy as np

from difflab.errors import ConfigError

STRATEGIES = ("receding", "temporal_ensemble", "bid", "rtc")


class Executor:
    """Per episode of a batch: the chunks planned so far, and the executed actions (for the smoothness figures)."""

    def __init__(self, strategy: str, n_action_steps: int, chunk_length: int, delay: int = 0, m: float = 0.01,
                 samples: int = 8, decay: float = 0.5, weak: bool = False):
        if strategy not in STRATEGIES:
            raise ConfigError(f"execution={strategy!r} is not a strategy: use one of {', '.join(STRATEGIES)}")
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ConfigError(f"inference_delay={delay} is not valid: a whole number of steps >= 0")
        if m < 0:
            raise ConfigError(f"ensemble_m={m} is not valid: m >= 0 (ACT's weights exp(-m i); 0 is the plain mean)")
        if strategy == "bid" and (samples < 2 or not weak):
            raise ConfigError("execution=bid needs N >= 2 candidates (bid_samples) and a weaker policy to contrast them with: "
                              f"pass bid_weak_ckpt=PATH (an early checkpoint of the same run), got bid_samples={samples}"
                              + ("" if weak else " and no bid_weak_ckpt"))
        every = 1 if strategy == "temporal_ensemble" else n_action_steps
        if every + delay > chunk_length:
            raise ConfigError(f"inference_delay={delay} with {every} action(s) executed per plan needs {every + delay} actions "
                              f"of each chunk, but the policy's chunk has {chunk_length} (its horizon minus n_obs_steps - 1): "
                              f"lower inference_delay to at most {chunk_length - every}" +
                              (" or n_action_steps" if strategy != "temporal_ensemble" else ""))
        self.strategy, self.every, self.length, self.delay, self.m = strategy, int(every), int(chunk_length), int(delay), float(m)
        self.samples, self.decay = int(samples), float(decay)
        self.reset(0)

    def reset(self, batch: int) -> None:
        self.batch = batch
        self.chunks: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in range(batch)]  # (planned, arrives, (L, A))
        self.executed: list[list[np.ndarray]] = [[] for _ in range(batch)]
        self.arrivals: list[list[int]] = [[] for _ in range(batch)]  # steps at which a new chunk took over

    def due(self, step: int) -> bool:
        """Whether to plan at this step (from its observation): every step for ensembling; for receding at step 0
        and then d steps before each chunk's n_action_steps run out, so the next one arrives as they do."""
        if self.strategy == "temporal_ensemble" or step == 0:
            return True
        return (step + self.delay) % self.every == 0

    def plan(self, plan, history, episodes: list[int], step: int, weak=None) -> None:
        """Plan for `episodes` (one history row each) at `step`: plan(history) -> (B, L, A) chunks; with bid, N
        candidates per episode from `plan` and N from `weak`, and the selected one is added."""
        if self.strategy == "rtc":
            for j, chunk in enumerate(plan(history, prefixes=[self.tail(i, step) for i in episodes], delay=self.delay)):
                self.add(episodes[j], step, chunk)
            return
        if self.strategy != "bid":
            for j, chunk in enumerate(plan(history)):
                self.add(episodes[j], step, chunk)
            return
        repeat = (lambda h: {k: np.repeat(v, self.samples, axis=0) for k, v in h.items()}) if isinstance(history, dict) \
            else (lambda h: np.repeat(h, self.samples, axis=0))
        strong = plan(repeat(history)).reshape(len(episodes), self.samples, self.length, -1)
        weak_samples = weak(repeat(history)).reshape(len(episodes), self.samples, self.length, -1)
        for j, i in enumerate(episodes):
            self.add(i, step, strong[j, self.bid_pick(i, step, strong[j], weak_samples[j])])

    def tail(self, episode: int, step: int) -> np.ndarray | None:
        """The newest chunk's actions for `step` on (the steps a chunk planned now shares with it), or None."""
        if not self.chunks[episode]:
            return None
        planned, _, prev = self.chunks[episode][-1]
        return prev[step - planned :] if step - planned < self.length else None

    def bid_pick(self, episode: int, step: int, candidates: np.ndarray, weak: np.ndarray) -> int:
        """The candidate (N, L, A) with the least backward coherence + forward contrast loss."""
        c = candidates.astype(np.float64)
        n = len(c)
        loss = np.zeros(n)
        if self.chunks[episode]:  # backward: against the previous decision on the steps both chunks plan
            planned, _, prev = self.chunks[episode][-1]
            overlap = self.length - (step - planned)
            if overlap > 0:
                w = self.decay ** np.arange(overlap)
                diff = c[:, :overlap] - prev[None, step - planned :].astype(np.float64)
                loss += (w[None, :] * (diff**2).sum(-1)).sum(-1)
        pair = ((c[:, None] - c[None, :]) ** 2).sum((-1, -2))  # (N, N), zero on the diagonal
        to_weak = ((c[:, None] - weak.astype(np.float64)[None]) ** 2).sum((-1, -2))
        loss += pair.sum(1) / (n - 1) - to_weak.mean(1)
        return int(np.argmin(loss))

    def add(self, episode: int, step: int, chunk: np.ndarray) -> None:
        """A chunk planned from the observation of `step`: (L, action_dim), its row k for step `step + k`."""
        if chunk.shape[0] != self.length:
            raise ValueError(f"a chunk has {self.length} actions, got {chunk.shape[0]}")
        arrival = step if step == 0 else step + self.delay
        self.chunks[episode].append((step, arrival, np.asarray(chunk)))
        self.arrivals[episode].append(arrival)

    def action(self, episode: int, step: int) -> np.ndarray:
        """The action executed at `step`: from the chunks that have arrived by then and cover it."""
        live = [(planned, c) for planned, arrival, c in self.chunks[episode] if arrival <= step and step - planned < self.length]
        if not live:
            raise RuntimeError(f"no chunk covers step {step}: plan before stepping (the executor's `due`)")
        if self.strategy != "temporal_ensemble":  # receding, bid, rtc: the newest chunk
            planned, chunk = live[-1]
            out = chunk[step - planned]
        else:
            weights = np.array([math.exp(-self.m * i) for i in range(len(live))])  # i = 0: the oldest prediction
            preds = np.stack([c[step - planned] for planned, c in live])
            out = ((weights[:, None] * preds).sum(0) / weights.sum()).astype(preds.dtype)
        self.executed[episode].append(out)
        # Chunks that cannot cover a later step are dropped, so memory stays bounded over long episodes.
        self.chunks[episode] = [(p, a, c) for p, a, c in self.chunks[episode] if step + 1 - p < self.length]
        return out

    def smoothness(self, episode: int) -> dict:
        """Mean squared jerk (third difference per step) of the executed actions, and the mean jump ||a_t - a_{t-1}||
        at the steps where a new chunk took over (receding) or every step (ensembling)."""
        a = np.asarray(self.executed[episode], dtype=np.float64)
        jerk = float(np.mean(np.sum(np.diff(a, n=3, axis=0) ** 2, axis=1))) if len(a) > 3 else 0.0
        steps = [s for s in self.arrivals[episode] if 0 < s < len(a)] if self.strategy != "temporal_ensemble" else list(range(1, len(a)))
        jump = float(np.mean([np.linalg.norm(a[s] - a[s - 1]) for s in steps])) if steps else 0.0
        return {"jerk": jerk, "boundary_jump": jump}
