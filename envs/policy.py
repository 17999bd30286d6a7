"""Any trained method as a policy: observation history in, a chunk of actions out (receding horizon).

The wrapper owns what is policy-specific (normalizers, observation keys,
horizons); the method only sees `sample(n, cond=normalized history)`, so every
method is a policy through this one path.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from difflab.errors import CheckpointError, ConfigError
from difflab.normalizer import MinMaxNormalizer
from envs.execution import Executor


class Policy:
    def __init__(
        self,
        module,
        obs_normalizer,  # difflab.normalizer.MinMaxNormalizer (anything with normalize / unnormalize)
        action_normalizer,
        obs_keys: list[str],
        obs_dims: dict[str, int],
        n_obs_steps: int,
        horizon: int,
        n_action_steps: int,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        sample_kwargs: dict | None = None,
        task: str = "",
        image_shapes: dict | None = None,
        feature_keys: dict | None = None,
        execution: str = "receding",
        inference_delay: int = 0,
        ensemble_m: float = 0.01,
        bid_samples: int = 8,
        bid_weak: "Policy | None" = None,
        rtc_max_guidance: float = 5.0,
    ):
        self.module = module.eval()
        self.task = task
        self.obs_normalizer, self.action_normalizer = obs_normalizer, action_normalizer
        self.obs_keys = list(obs_keys)
        # camera keys (C, H, W): their frames go to the model as uint8, through its observation encoder
        self.image_shapes = {k: tuple(int(d) for d in v) for k, v in (image_shapes or {}).items()}
        self.low_keys = [k for k in self.obs_keys if k not in self.image_shapes]
        self.obs_dims = {k: int(obs_dims[k]) for k in self.low_keys}
        # our key -> a dataset's feature name (LeRobot's observation.state, ...): select_action takes either
        self.feature_keys = {k: str(v) for k, v in (feature_keys or {}).items() if k in self.obs_keys}
        self.n_obs_steps, self.horizon, self.n_action_steps = n_obs_steps, horizon, n_action_steps
        self.sampler, self.steps = sampler, steps
        self.sample_kwargs = dict(sample_kwargs or {})  # e.g. eps_scale, time_shift_window for the DDPM family
        self.seed = seed
        self.generator = torch.Generator(device=module.device).manual_seed(seed)
        # envs.execution: how chunks become executed actions (receding horizon, temporal ensembling), with delay
        self.execution, self.inference_delay, self.ensemble_m = execution, inference_delay, ensemble_m
        self.bid_samples, self.bid_weak = bid_samples, bid_weak  # bid: candidates per plan, the weaker policy
        self.rtc_max_guidance = rtc_max_guidance
        self.env_options: dict = {}  # settings of the environment make_env builds (Push-T's perturb=)
        self.executor()  # refuses bad settings now, in one line
        self.reset()

    @property
    def chunk_length(self) -> int:
        """Actions a chunk has for the current step and after it: the horizon minus the n_obs_steps - 1 it spends
        on the past."""
        return self.horizon - self.n_obs_steps + 1

    def executor(self) -> Executor:
        if self.bid_weak is not None and (self.bid_weak.chunk_length, self.bid_weak.obs_dims) != (self.chunk_length, self.obs_dims):
            raise ConfigError(f"bid_weak_ckpt plans chunks of {self.bid_weak.chunk_length} actions from {self.bid_weak.obs_dims}, "
                              f"this policy {self.chunk_length} from {self.obs_dims}: the weak policy must be of the same task and horizons")
        if self.execution == "rtc" and getattr(self.module, "provides", "denoiser") != "denoiser":
            raise ConfigError(f"execution=rtc inpaints through a denoiser's Jacobian; a {type(self.module).__name__} has none: "
                              "use it with ddpm, edm, flow_matching, ncsn or a score SDE policy (or execution=bid / "
                              "temporal_ensemble, which take any policy)")
        return Executor(self.execution, self.n_action_steps, self.chunk_length, self.inference_delay, self.ensemble_m,
                        self.bid_samples, weak=self.bid_weak is not None)

    @property
    def weak_plan(self):
        return None if self.bid_weak is None else self.bid_weak.plan

    @classmethod
    def from_spec(cls, module, spec: dict, n_action_steps: int | None = None, **kwargs) -> "Policy":
        """From a checkpoint's `policy` entry (`TrajectoryDataModule.policy_spec()`): normalizers, observation keys
        and sizes, horizons and the task's name; the policy keeps them as its own state."""
        return cls(
            module, MinMaxNormalizer.from_state_dict(spec["obs_normalizer"]), MinMaxNormalizer.from_state_dict(spec["action_normalizer"]),
            spec["obs_keys"], spec["obs_dims"], int(spec["n_obs_steps"]), int(spec["horizon"]),
            n_action_steps or int(spec["n_action_steps"]), task=spec["task"], image_shapes=spec.get("image_shapes"),
            feature_keys=spec.get("feature_keys"), **kwargs,
        )

    @classmethod
    def from_datamodule(cls, module, datamodule, n_action_steps: int | None = None, **kwargs) -> "Policy":
        """A policy of the datamodule's task with a copy of its fitted normalizers (fit on first use)."""
        return cls.from_spec(module, datamodule.policy_spec(), n_action_steps, **kwargs)

    def spec(self) -> dict:
        """The inverse of `from_spec` (n_action_steps as executed)."""
        return {"obs_normalizer": self.obs_normalizer.state_dict(), "action_normalizer": self.action_normalizer.state_dict(),
                "obs_keys": list(self.obs_keys), "obs_dims": dict(self.obs_dims), "n_obs_steps": self.n_obs_steps,
                "horizon": self.horizon, "n_action_steps": self.n_action_steps, "task": self.task,
                "image_shapes": {k: list(v) for k, v in self.image_shapes.items()}, "feature_keys": dict(self.feature_keys)}

    def make_env(self, render_size: int = 96):
        """A fresh environment of the task this policy was trained on."""
        from envs import make_env

        if not self.task:
            raise ValueError("this policy names no task, so it cannot build its environment: pass make_env to the runner")
        return make_env(self.task, render_size, cameras=bool(self.image_shapes), **self.env_options)

    @property
    def nfe(self) -> int | None:
        """NFE per chunk (None for an adaptive solver, whose count varies)."""
        return self.module.nfe(self.sampler, self.steps, **self.sample_kwargs)

    def check_env(self, env) -> None:
        """Refuse an environment whose observations are not the ones this policy was trained on."""
        have = getattr(env, "obs_dims", {})
        wrong = {k: d for k, d in self.obs_dims.items() if have.get(k) != d}
        cameras = {k: tuple(v) for k, v in getattr(env, "image_shapes", {}).items()}
        blind = {k: s for k, s in self.image_shapes.items() if cameras.get(k) != s}
        if blind:
            raise ValueError(f"the policy sees the cameras {self.image_shapes} but {type(env).__name__} gives {cameras or 'none'}: "
                             "build the environment with cameras=True (policy.make_env() does)")
        if wrong:
            raise ValueError(
                f"the policy observes {self.obs_dims} but {type(env).__name__} gives {have}: "
                "this checkpoint was trained on another task or with other data.obs_keys"
            )

    def stack(self, history: list[dict]):
        """(n_obs_steps, obs_dim) from the last n_obs_steps observation dicts, keys in training order; with cameras a
        dict of that array under 'low_dim' and each camera's uint8 frames (n_obs_steps, C, H, W)."""
        if len(history) < self.n_obs_steps:
            raise ValueError(f"need the last {self.n_obs_steps} observations, got {len(history)} (repeat the first one at an episode start)")
        recent = [self.canonical(o) for o in history[-self.n_obs_steps :]]
        if any(batched for _, batched in recent):
            raise ValueError("act() takes a history of single observations; for a batch use stack_batch, or select_action")
        low = np.stack([o["__low"][0] for o, _ in recent])
        if not self.image_shapes:
            return low
        return {"low_dim": low, **{k: np.stack([o[k][0] for o, _ in recent]) for k in self.image_shapes}}

    def stack_batch(self, histories: list[list[dict]]):
        """stack() for several episodes: (B, n_obs_steps, obs_dim), or a dict of batched arrays with cameras."""
        stacked = [self.stack(list(h)) for h in histories]
        if not self.image_shapes:
            return np.stack(stacked)
        return {k: np.stack([s[k] for s in stacked]) for k in stacked[0]}

    # --- LeRobot's stateful interface: one observation in, one action out ---------------------------------------
    def reset(self) -> None:
        """Start an episode: forget the observation history and the queue of planned actions."""
        self._history: deque = deque(maxlen=self.n_obs_steps)
        self._executor, self._step = self.executor(), 0

    def select_action(self, obs: dict) -> np.ndarray:
        """The action to execute now from the current observation only: (action_dim,), or (B, action_dim) for a batch
        of B observations (a leading batch dimension on every entry, as LeRobot passes them). The policy keeps the
        last n_obs_steps observations (the first one repeated at an episode start, as training pads) and the
        n_action_steps actions of its last chunk; a new chunk is sampled when they run out, so stepping with
        select_action is `act` on the history every n_action_steps steps. Call reset() between episodes.

        Keys are this project's names or the dataset's feature names the policy was trained from
        (`observation.state`, ...); values are arrays or tensors; camera frames are (C, H, W) or (H, W, C), uint8
        in 0..255 or float in [0, 1] (LeRobot's convention)."""
        obs, batched = self.canonical(obs)
        if self._history and self._history[-1]["__batch"] != obs["__batch"]:
            raise ValueError(f"select_action got a batch of {obs['__batch']} after {self._history[-1]['__batch']} in one episode: "
                             "call reset() before changing the batch size")
        if not self._history:
            self._history.extend([obs] * self.n_obs_steps)
            self._executor.reset(obs["__batch"])
        else:
            self._history.append(obs)
        if self._executor.due(self._step):
            recent = list(self._history)
            low = np.stack([o["__low"] for o in recent], axis=1)  # (B, n_obs_steps, obs_dim)
            history = {"low_dim": low, **{k: np.stack([o[k] for o in recent], axis=1) for k in self.image_shapes}} if self.image_shapes else low
            self._executor.plan(self.plan, history, list(range(self._executor.batch)), self._step, self.weak_plan)
        action = np.stack([self._executor.action(b, self._step) for b in range(self._executor.batch)])
        self._step += 1
        return action if batched else action[0]

    def canonical(self, obs: dict) -> tuple[dict, bool]:
        """An observation dict as (our keys, batched arrays, whether it came batched): the state part concatenated
        in training order under '__low' (B, obs_dim), each camera as uint8 (B, C, H, W)."""
        named = {}
        aliases = {v: k for k, v in self.feature_keys.items()}
        for key, value in obs.items():
            ours = aliases.get(key, key)
            if ours in self.obs_keys:
                named[ours] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        missing = [k for k in self.obs_keys if k not in named]
        if missing:
            named_as = "".join(f" ({k} may also be named {self.feature_keys[k]})" for k in missing if k in self.feature_keys)
            raise KeyError(f"observation lacks {missing}{named_as}; the policy observes {self.obs_keys}, the observation has {sorted(obs)}")
        first = self.low_keys[0]
        batched = named[first].ndim == 2
        rows = named[first].shape[0] if batched else 1
        low = []
        for k in self.low_keys:
            value = named[k].astype(np.float32).reshape(rows, -1) if batched else named[k].astype(np.float32).reshape(1, -1)
            if value.shape[1] != self.obs_dims[k] or (batched and named[k].shape[0] != rows):
                raise ValueError(f"observation {k} has shape {named[k].shape}; the policy expects ({self.obs_dims[k]},) or "
                                 f"(B, {self.obs_dims[k]}) with one B for every key")
            low.append(value)
        out = {"__low": np.concatenate(low, axis=1), "__batch": rows}
        for k, shape in self.image_shapes.items():
            out[k] = self._frames(k, named[k], shape, rows if batched else None)
        return out, batched

    @staticmethod
    def _frames(key: str, value: np.ndarray, shape: tuple, rows: int | None) -> np.ndarray:
        """A camera's frames as uint8 (B, C, H, W) from (C, H, W) / (H, W, C) (with a leading B when batched),
        uint8 0..255 or float in [0, 1]."""
        frames = value if rows is not None else value[None]
        c, h, w = shape
        if frames.ndim == 4 and frames.shape[1:] == (h, w, c) and frames.shape[1:] != (c, h, w):
            frames = frames.transpose(0, 3, 1, 2)
        if frames.ndim != 4 or frames.shape[1:] != (c, h, w) or (rows is not None and frames.shape[0] != rows):
            raise ValueError(f"camera {key} has shape {value.shape}; the policy expects ({c}, {h}, {w}) or ({h}, {w}, {c})"
                             f"{', with the batch first' if rows is not None else ''}")
        if frames.dtype == np.uint8:
            return frames
        if np.issubdtype(frames.dtype, np.floating):
            low, high = float(frames.min()), float(frames.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(f"camera {key} is {frames.dtype} in [{low:g}, {high:g}]; float frames must be in [0, 1] "
                                 "(LeRobot's convention), or pass uint8 0..255")
            return np.rint(frames * 255.0).astype(np.uint8)
        raise ValueError(f"camera {key} is {frames.dtype}; pass uint8 0..255 or float in [0, 1]")

    def act(self, obs_history) -> np.ndarray:
        """Actions to execute now: (n_action_steps, action_dim), or (B, n_action_steps, action_dim) for a batch.

        obs_history: a list of observation dicts (oldest first), an array
        (n_obs_steps, obs_dim), or a batch (B, n_obs_steps, obs_dim), raw units.
        """
        return self.plan(obs_history)[..., : self.n_action_steps, :]

    @torch.no_grad()
    def plan(self, obs_history, prefixes: list | None = None, delay: int = 0) -> np.ndarray:
        """The whole executable chunk, (chunk_length, action_dim) or batched: the action for the current step and
        those after it (what an execution strategy chooses from); `act` keeps its first n_action_steps. `prefixes`
        (execution=rtc): per row, the previous chunk's actions from the current step on (or None), which the new
        chunk is inpainted toward."""
        if isinstance(obs_history, (list, tuple)) and obs_history and isinstance(obs_history[0], dict):
            obs_history = self.stack(list(obs_history))
        frames = {}
        if isinstance(obs_history, dict):
            frames = {k: np.asarray(v) for k, v in obs_history.items() if k != "low_dim"}
            obs_history = obs_history["low_dim"]
        if sorted(frames) != sorted(self.image_shapes):
            raise ValueError(f"the policy sees the cameras {sorted(self.image_shapes)}, the observation gives {sorted(frames)}")
        obs = np.asarray(obs_history, dtype=np.float32)
        single = obs.ndim == 2
        obs = obs[None] if single else obs
        if obs.shape[1:] != (self.n_obs_steps, sum(self.obs_dims.values())):
            raise ValueError(f"observation history must be (B, {self.n_obs_steps}, {sum(self.obs_dims.values())}), got {obs.shape}")
        device = self.module.device
        cond = self.obs_normalizer.normalize(torch.from_numpy(obs)).to(device)
        if frames:
            cond = {"low_dim": cond, **{k: torch.as_tensor(v[None] if single else v, dtype=torch.uint8).to(device) for k, v in frames.items()}}
        else:
            cond = cond.reshape(obs.shape[0], -1)
        extra = {} if not prefixes or all(p is None for p in prefixes) else self.inpaint_options(prefixes, delay, device)
        chunk = self.module.sample(obs.shape[0], cond=cond, sampler=self.sampler, steps=self.steps, generator=self.generator,
                                   **self.sample_kwargs, **extra)
        actions = self.action_normalizer.unnormalize(chunk.float().cpu()).numpy()
        # The chunk is aligned with the history: index n_obs_steps - 1 is the action for the current step.
        actions = actions[:, self.n_obs_steps - 1 :]
        return actions[0] if single else actions


    def inpaint_options(self, prefixes: list, delay: int, device) -> dict:
        """Real-time chunking's target and soft mask in the model's chunk coordinates (normalized actions; index
        n_obs_steps - 1 is the current step)."""
        from samplers.inpainting import rtc_weights

        rows, start = len(prefixes), self.n_obs_steps - 1
        action_dim = next(p for p in prefixes if p is not None).shape[-1]
        target = torch.zeros(rows, self.horizon, action_dim)
        weights = torch.zeros(rows, self.horizon, 1)
        for b, prefix in enumerate(prefixes):
            if prefix is None:
                continue
            overlap = len(prefix)
            target[b, start : start + overlap] = self.action_normalizer.normalize(torch.as_tensor(np.asarray(prefix), dtype=torch.float32))
            weights[b, start:, 0] = rtc_weights(self.horizon - start, delay, overlap).float()
        return {"inpaint": (target.to(device), weights.to(device)), "rtc_max_guidance": self.rtc_max_guidance}


def load_policy(path, sampler: str | None = None, steps: int | None = None, n_action_steps: int | None = None,
                device: str = "cpu", seed: int = 0, execution: dict | None = None, **sample_kwargs) -> tuple[Policy, object]:
    """A checkpoint alone acts: (policy, datamodule); `policy.make_env()` builds its environment, and the
    datamodule (not set up, no data read) is returned for its `unnormalize`/`render` (None when it cannot be built
    without its data, e.g. a LeRobot folder that is not on this machine: the policy does not need it).
    sample_kwargs go to every `module.sample` call (e.g. eps_scale=1.01 for a DDPM-family policy); `execution`
    ({execution, inference_delay, ensemble_m, bid_samples, bid_weak_ckpt}) picks how chunks are executed
    (envs.execution)."""
    from hydra.utils import get_class

    from difflab.errors import MissingFileError
    from lightning_modules.checkpoint import instantiate_datamodule, load_module

    module, ckpt = load_module(path, map_location=device)
    data_class = get_class(module.run_config["data"]["_target_"])
    if getattr(data_class, "data_kind", None) != "trajectory":
        raise CheckpointError(f"{path} was trained on {data_class.__name__}, not on demonstrations: it is not a policy "
                              "(sample it with sample.py, score it with evaluate.py's default metric)")
    try:
        datamodule = instantiate_datamodule(module.run_config)
    except Exception as err:  # Hydra wraps what the constructor raised
        if not isinstance(err, MissingFileError) and not isinstance(err.__cause__, MissingFileError):
            raise
        datamodule = None
    spec = ckpt.get("policy")
    if spec is None and datamodule is not None:  # checkpoints before the policy entry: Lightning's datamodule state, under its class name
        legacy = ckpt.get(type(datamodule).__qualname__)
        if legacy is None:
            raise CheckpointError(f"{path} has no policy entry (normalizers): it was not saved by train.py on trajectory data")
        datamodule.load_state_dict(legacy)
        spec = datamodule.policy_spec()
    if spec is None:
        raise CheckpointError(f"{path} has no policy entry and its data are not here to rebuild the normalizers from")
    module.check_sampling(sampler, steps=steps, **sample_kwargs)
    execution = dict(execution or {})
    weak_path = execution.pop("bid_weak_ckpt", None)
    if weak_path:  # bidirectional decoding's weaker policy: its own sampler defaults, another noise stream
        execution["bid_weak"], _ = load_policy(weak_path, None, None, n_action_steps, device, seed + 1)
    policy = Policy.from_spec(module, spec, n_action_steps=n_action_steps, sampler=sampler, steps=steps, seed=seed,
                              sample_kwargs=sample_kwargs, **(execution or {}))
    if datamodule is not None:
        datamodule.load_state_dict({k: spec[k] for k in ("obs_normalizer", "action_normalizer", "obs_keys", "n_obs_steps",
                                                         "horizon", "n_action_steps")})
    policy.global_step = int(ckpt.get("global_step", -1))
    return policy, datamodule
