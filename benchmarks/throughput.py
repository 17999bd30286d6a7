"""Training and sampling throughput of our DDPM UNet against diffusers' UNet2DModel, in one process.

    python benchmarks/throughput.py --net small --batch-size 128 --precision fp32 --device cpu --write
    python benchmarks/throughput.py --net cifar10 --batch-size 128 --precision bf16 --device cuda --write

Measured, for the same shapes and precision, in interleaved rounds (order rotated each
round, medians reported, so machine noise hits every implementation alike):

* ours            -- DDPM.loss + backward + clip_grad_norm_(1.0) + AdamW step + zero_grad,
                     i.e. what Lightning runs per step, without Lightning;
* ours+Lightning  -- the same module trained by a real lightning.pytorch.Trainer over a
                     synthetic datamodule (pre-built random batches);
* diffusers       -- UNet2DModel configured like Ho et al.'s UNet (derived from the same
                     configs/net/*.yaml), DDPMScheduler.add_noise, MSE to the noise, same
                     clip and AdamW.

Also: DDIM sampling samples/s at --sample-steps NFE (ours: DDPM.sample; peer: DDIMScheduler
loop), FLOPs of one forward+backward (torch.utils.flop_counter), MFU against a peak measured
in the same run by a large matmul, and peak memory of a training step (CUDA: allocator peak;
CPU: polled RSS peak), plus the static weights + AdamW state. diffusers is an optional
benchmark dependency (pip install -e ".[bench]" or pip install "diffusers>=0.30").
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import logging
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NET_CONFIGS = {"cifar10": ("unet_cifar10.yaml", (3, 32, 32)), "small": ("unet_small.yaml", (1, 8, 8))}
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TABLE_HEADER = (
    "| config | impl | params | batch | precision | train samples/s | ratio ours/peer | MFU | peak mem | "
    "sample samples/s @NFE | ratio |\n"
    "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=sorted(NET_CONFIGS), default="small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per round and implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed window (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (= NFE) for the sampling measurement")
    p.add_argument("--sample-batch", type=int, default=None, help="samples per sampling call (default: --batch-size)")
    p.add_argument("--compile", action="store_true", help="torch.compile both nets (nn.Module.compile)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune")
    p.add_argument("--no-compile-peer", action="store_true", help="with --compile: compile ours only, time diffusers eager")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument(
        "--peer-eager",
        action="store_true",
        help="also time diffusers as a plain training step (eager, contiguous) beside the peer with the same options",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-lightning", action="store_true", help="skip the ours+Lightning measurement")
    p.add_argument("--no-sample", action="store_true", help="skip the sampling measurement")
    p.add_argument("--profile", type=int, default=0, help="profile N eager training steps of ours and print the top CUDA/CPU kernels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help=f"append the rows to {RESULTS.relative_to(ROOT)}")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step builds optimizer state and, with --compile, compiles)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.sample_batch = args.sample_batch or args.batch_size
    return args


def require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        sys.exit(
            "benchmarks/throughput.py compares against diffusers' UNet2DModel, which is not installed.\n"
            'Install the benchmark extra:  pip install -e ".[bench]"   (or: pip install "diffusers>=0.30")'
        )
    import diffusers

    return diffusers


def our_net_kwargs(net: str) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "net" / NET_CONFIGS[net][0]))
    cfg.pop("_target_", None)
    return cfg


def build_ours(args, net_kwargs, data_shape):
    from lightning_modules.ddpm import DDPM
    from lightning_modules.nets.unet import UNet

    net = UNet(data_shape, **net_kwargs)
    opt = functools.partial(torch.optim.AdamW, lr=2e-4, fused=(args.device == "cuda"))
    return DDPM(net, opt, data_shape=data_shape, num_timesteps=1000)


def peer_config(net_kwargs, data_shape) -> dict:
    """UNet2DModel arguments equivalent to our UNet config (Ho et al.'s layout, single-head attention)."""
    in_ch, height, _ = data_shape
    ch, mult = net_kwargs["ch"], list(net_kwargs["ch_mult"])
    attn = set(net_kwargs.get("attn_resolutions", ()))
    attn_levels = [height // 2**i in attn for i in range(len(mult))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels))
    # Our GroupNorm32 clamps the group count to a divisor with >= 2 channels per group; diffusers takes one
    # count for every norm, so use the one ours uses at the narrowest level (cifar10: 32, small: 16).
    groups = math.gcd(min(net_kwargs.get("num_groups", 32), max(ch // 2, 1)), ch)
    return dict(
        sample_size=height,
        in_channels=in_ch,
        out_channels=in_ch,
        block_out_channels=tuple(ch * m for m in mult),
        layers_per_block=net_kwargs["num_res_blocks"],
        down_block_types=down,
        up_block_types=up,
        dropout=net_kwargs.get("dropout", 0.0),
        norm_num_groups=groups,
        attention_head_dim=None,  # one head over all channels, as in Ho et al. and ours
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=1,  # symmetric padding like ours (google/ddpm-cifar10-32 uses 0 + an explicit pad)
        norm_eps=1e-6,
    )


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def static_bytes(module, optimizer) -> int:
    """Weights + optimizer state (grads are allocated during the step, so they show in the transient peak)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


# --------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------
def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemProbe:
    """Peak memory of a window above its start: CUDA allocator peak, or polled RSS on CPU.

    ru_maxrss is a process-wide high-water mark, so its delta is only meaningful for whichever
    implementation first exceeds it; it is kept (maxrss_delta) for the log, but the figure
    reported is the polled RSS peak above the RSS at the window's start (after malloc_trim).
    """

    def __init__(self, device, interval=0.002):
        self.device, self.interval = device, interval

    def start(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss0
        return self.peak - self.base


def measure_peak_flops(device, dtype, size, seconds=1.0) -> dict:
    """Best FLOP/s of a size^3 GEMM: torch.matmul, and on CPU also the same GEMM through oneDNN.

    On CPU torch.matmul goes to MKL/BLAS, while convolutions go to oneDNN; on AMD CPUs MKL runs
    its AVX2 path (measured here on an AVX-512 EPYC: 242 vs 422 GFLOP/s fp32), so the nets'
    convolutions would exceed a matmul-only "peak". The 1x1 convolution of a (1, size, 32, size/32)
    input with a (size, size, 1, 1) weight is the same size^3 GEMM done by oneDNN.
    """

    def best_rate(fn, flops):
        for _ in range(3):
            fn()
        sync(device)
        best, t_end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            sync(device)
            best = max(best, 5 * flops / (time.perf_counter() - t0))
        return best

    flops = 2 * size**3
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with torch.no_grad():
        rates = {"matmul": best_rate(lambda: a @ b, flops)}
        if device.type == "cpu":
            x = torch.randn(1, size, 32, size // 32, dtype=dtype)
            w = torch.randn(size, size, 1, 1, dtype=dtype)
            rates["oneDNN 1x1 conv"] = best_rate(lambda: F.conv2d(x, w), flops)
            # A 3x3 conv shaped like the UNet's (8 x 256ch x 16x16): oneDNN's direct kernel reaches about
            # twice the GEMM rate above on an AVX-512 Zen CPU, i.e. the FMA peak the GEMMs fall short of.
            xc, wc = torch.randn(8, 256, 16, 16, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
            rates["oneDNN 3x3 conv"] = best_rate(lambda: F.conv2d(xc, wc, padding=1), 2 * 8 * 256 * 256 * 9 * 16 * 16)
    return rates


def _as4(shape):
    return (1,) * (4 - len(shape)) + tuple(shape)


def _cpu_sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(_as4(q), _as4(k), _as4(v))


def _cpu_sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(_as4(grad_out), _as4(q), _as4(k), _as4(v))


def profile_steps(args, impl) -> None:
    """Where one eager training step's time goes: the profiler's top kernels by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    impl.run_steps(2)
    sync(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        impl.run_steps(args.profile)
        sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(f"profile of {args.profile} steps of {impl.name} (eager):")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def count_flops(step_fn) -> int:
    """FLOPs of one forward+backward (the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    # torch's table has no entry for the CPU flash-attention kernels: add them, or attention counts 0 on CPU.
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_bwd,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        step_fn(count_only=True)
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------------
# the implementations
# --------------------------------------------------------------------------------------------
class Impl:
    """One training step and one sampling call of an implementation."""

    name = ""

    def __init__(self, args, module, x, autocast):
        self.args, self.module, self.x, self.autocast = args, module, x, autocast
        self.optimizer = None
        self.train_rates, self.sample_rates, self.peak_mem, self.static_mem, self.flops = [], [], 0, 0, 0

    def run_steps(self, n):
        for _ in range(n):
            self.step()

    def timed(self, n) -> float:
        sync(self.args.device)
        t0 = time.perf_counter()
        self.run_steps(n)
        sync(self.args.device)
        return time.perf_counter() - t0


class OursPlain(Impl):
    name = "ours"

    def __init__(self, args, module, x, autocast):
        super().__init__(args, module, x, autocast)
        self.optimizer = module.optimizer_factory(params=module.parameters())
        self.params = [p for p in module.parameters() if p.requires_grad]

    def step(self, count_only=False):
        with self.autocast():
            loss = self.module.loss({"x": self.x})
        loss.backward()
        if count_only:
            self.module.zero_grad(set_to_none=True)
            return
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self, n, steps):
        self.module.eval()
        with self.autocast():
            out = self.module.sample(n, sampler="ddim", steps=steps)
        self.module.train()
        return out


class Peer(Impl):
    name = "diffusers"

    def __init__(self, args, model, x, autocast):
        from diffusers import DDIMScheduler, DDPMScheduler

        super().__init__(args, model, x, autocast)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=(args.device == "cuda"))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.noise_sched = DDPMScheduler(num_train_timesteps=1000)
        # Same DDIM as ours: eta 0, no clipping (DDPM(clip_denoised=False)), trailing spacing, final alpha 1.
        self.ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)

    def step(self, count_only=False):
        x = self.x
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        x_t = self.noise_sched.add_noise(x, noise, t)
        with self.autocast():
            loss = F.mse_loss(self.module(x_t, t).sample, noise)
        loss.backward()
        if count_only:
            self.module.zero_grad(set_to_none=True)
            return
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self, n, steps):
        self.module.eval()
        x = torch.randn((n, *self.x.shape[1:]), device=self.x.device)
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.ddim.set_timesteps(steps, device=x.device)
        with self.autocast():
            for t in self.ddim.timesteps:
                eps = self.module(x, t).sample
                x = self.ddim.step(eps, t, x).prev_sample
        self.module.train()
        return x


class OursLightning(Impl):
    """The same DDPM module trained by a real Trainer; one fit per round, timed by a callback."""

    name = "ours+Lightning"

    def __init__(self, args, module, x, autocast):
        super().__init__(args, module, x, autocast)
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")

    def _fit(self, n, probe: MemProbe | None = None) -> float:
        import lightning.pytorch as pl

        args, warmup = self.args, self.args.warmup
        batch = self.x.detach().to("cpu")  # Lightning moves each batch to the device, as in real training

        class Batches(torch.utils.data.Dataset):
            def __len__(self):
                return warmup + n

            def __getitem__(self, i):
                return {"x": batch}

        class DataModule(pl.LightningDataModule):
            def train_dataloader(self):
                # batch_size=None: the dataset yields whole batches, so no per-sample collation is timed
                return torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False, num_workers=0)

        impl = self

        class Timer(pl.Callback):
            t0 = t1 = None

            def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
                if batch_idx == warmup - 1:
                    if probe is not None:
                        probe.start()
                    sync(args.device)
                    self.t0 = time.perf_counter()
                elif batch_idx == warmup + n - 1:
                    sync(args.device)
                    self.t1 = time.perf_counter()
                    if probe is not None:
                        impl.peak_mem = max(impl.peak_mem, probe.stop())
                        impl.static_mem = static_bytes(pl_module, trainer.optimizers[0])

        timer = Timer()
        trainer = pl.Trainer(
            accelerator=args.device,
            devices=1,
            precision="bf16-mixed" if args.precision == "bf16" else "32-true",
            max_steps=warmup + n,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=1.0,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            log_every_n_steps=50,
            callbacks=[timer],
        )
        trainer.fit(self.module, datamodule=DataModule())
        self.module.to(args.device)  # the strategy's teardown moves the module back to the CPU
        return timer.t1 - timer.t0

    def timed(self, n) -> float:
        return self._fit(n)


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def device_line(args) -> str:
    if args.device == "cuda":
        dev = torch.cuda.get_device_name()
    else:
        model = platform.processor() or "unknown CPU"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        dev = f"{model}, {torch.get_num_threads()} threads (of {os.cpu_count()} cores)"
    return dev


def fmt_bytes(n) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def fmt_params(n) -> str:
    return f"{n / 1e6:.2f}M"


def main(argv=None):
    args = parse_args(argv)
    diffusers = require_diffusers()
    from diffusers import UNet2DModel

    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    else:
        torch.set_float32_matmul_precision("high")  # train.py's default (speed.matmul_precision), for both
        torch.backends.cudnn.benchmark = True  # trainer=gpu sets benchmark: true
    torch.manual_seed(args.seed)
    load_before = os.getloadavg()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast():
        return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    net_kwargs = our_net_kwargs(args.net)
    data_shape = NET_CONFIGS[args.net][1]
    module = build_ours(args, net_kwargs, data_shape).to(dev)
    peer_model = UNet2DModel(**peer_config(net_kwargs, data_shape)).to(dev)
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    module.to(memory_format=mf)
    peer_model.to(memory_format=mf)
    module.train()
    peer_model.train()
    x = (torch.rand((args.batch_size, *data_shape), device=dev) * 2 - 1).contiguous(memory_format=mf)

    p_ours, p_peer = n_params(module), n_params(peer_model)
    print(f"device: {device_line(args)} | torch {torch.__version__} | diffusers {diffusers.__version__}")
    print(f"load average at start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(f"params: ours {p_ours:,} | diffusers {p_peer:,} | difference {100 * (p_ours - p_peer) / p_peer:+.2f}%")

    ours = OursPlain(args, module, x, autocast)
    peer = Peer(args, peer_model, x, autocast)
    peer_eager = None
    if args.peer_eager:
        eager_model = UNet2DModel(**peer_config(net_kwargs, data_shape)).to(dev)
        eager_model.load_state_dict(peer_model.state_dict())
        eager_args = argparse.Namespace(**{**vars(args), "channels_last": False})
        peer_eager = Peer(eager_args, eager_model.train(), x.contiguous(), autocast)
        peer_eager.name = "diffusers eager"
    # FLOPs first (eager, before compile): one forward+backward each.
    ours.flops = count_flops(ours.step)
    peer.flops = count_flops(peer.step)
    print(f"FLOPs per fwd+bwd step: ours {ours.flops / 1e9:.2f} G | diffusers {peer.flops / 1e9:.2f} G")
    if args.profile:
        profile_steps(args, ours)
    if args.compile:
        module.net.compile(mode=args.compile_mode)
        if args.no_compile_peer:
            peer.name = "diffusers (not compiled)"
        else:
            peer_model.compile(mode=args.compile_mode)

    impls = [ours, peer] + ([peer_eager] if peer_eager else [])
    if peer_eager:
        peer_eager.flops = peer.flops
    lightning = None
    if not args.no_lightning:
        lightning = OursLightning(args, module, x, autocast)
        lightning.flops = ours.flops

    peak_size = 8192 if args.device == "cuda" else 1024
    peak_rates = measure_peak_flops(dev, dtype, peak_size)

    # Warm-up (also builds the optimizer state and, with --compile, compiles), then one memory round, then the
    # timed rounds. The sampler is warmed at the timed batch size so a compiled net sees no new shape later.
    for impl in impls:
        sync(args.device)
        t0 = time.perf_counter()
        impl.run_steps(args.warmup)
        sync(args.device)
        impl.warmup_s = time.perf_counter() - t0
        if not args.no_sample:
            impl.sample(args.sample_batch if args.device == "cuda" else min(args.sample_batch, 2), 1)
        print(f"  warm-up {impl.name}: {args.warmup} steps in {impl.warmup_s:.1f} s", flush=True)
    probe = MemProbe(args.device)
    mem_steps = min(args.steps, 2)
    for impl in impls:
        probe.start()
        impl.run_steps(mem_steps)
        impl.peak_mem = probe.stop()
        impl.static_mem = static_bytes(impl.module, impl.optimizer)
        if args.device == "cpu":
            print(f"  [mem] {impl.name}: polled RSS peak +{fmt_bytes(impl.peak_mem)}, ru_maxrss delta +{fmt_bytes(probe.maxrss_delta)}")
    if lightning is not None:
        lightning._fit(mem_steps, probe=probe)

    all_impls = impls + ([lightning] if lightning else [])
    for r in range(args.rounds):
        order = all_impls[r % len(all_impls):] + all_impls[: r % len(all_impls)]
        for impl in order:
            dt = impl.timed(args.steps)
            impl.train_rates.append(args.steps / dt)
        if not args.no_sample:
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                sync(args.device)
                t0 = time.perf_counter()
                impl.sample(args.sample_batch, args.sample_steps)
                sync(args.device)
                impl.sample_rates.append(args.sample_batch / (time.perf_counter() - t0))
        print(
            f"  round {r + 1}/{args.rounds}: steps/s "
            + ", ".join(f"{i.name} {i.train_rates[-1]:.3f}" for i in all_impls)
            + ("" if args.no_sample else " | sample samples/s " + ", ".join(f"{i.name} {i.sample_rates[-1]:.2f}" for i in impls))
        )
    for k, v in measure_peak_flops(dev, dtype, peak_size).items():
        peak_rates[k] = max(peak_rates[k], v)
    peak_flops = max(peak_rates.values())
    load_after = os.getloadavg()

    med = {i.name: statistics.median(i.train_rates) for i in all_impls}
    smed = {i.name: statistics.median(i.sample_rates) for i in impls} if not args.no_sample else {}
    config = (
        f"{args.net} {args.device}"
        + (f" compile{'-' + args.compile_mode if args.compile_mode else ''}" if args.compile else "")
        + (" channels-last" if args.channels_last else "")
        + f" ({args.steps} steps x {args.rounds} rounds)"
    )
    nfe = args.sample_steps
    rows = []
    for impl in all_impls:
        steps_s = med[impl.name]
        mfu = impl.flops * steps_s / peak_flops
        s_rate = smed.get(impl.name)
        sample_cell = f"{s_rate:.2f} @{nfe}" if s_rate is not None else "—"
        s_ratio = f"{s_rate / smed[peer.name]:.2f}" if s_rate is not None else "—"
        params = p_peer if impl in (peer, peer_eager) else p_ours
        rows.append(
            f"| {config} | {impl.name} | {fmt_params(params)} | {args.batch_size} | {args.precision} | "
            f"{steps_s * args.batch_size:.1f} ({steps_s:.3f} steps/s) | {steps_s / med[peer.name]:.2f} | "
            f"{100 * mfu:.1f}% | {fmt_bytes(impl.static_mem + impl.peak_mem)} | {sample_cell} | {s_ratio} |"
        )

    notes = [
        f"params: ours {p_ours:,}, diffusers {p_peer:,} ({100 * (p_ours - p_peer) / p_peer:+.2f}%); "
        f"FLOPs per fwd+bwd: ours {ours.flops / 1e9:.2f} G, diffusers {peer.flops / 1e9:.2f} G",
        f"measured peak ({peak_size}^3 {args.precision} GEMM{', and a 3x3 conv' if args.device == 'cpu' else ''}, "
        "best of two runs; MFU uses the max): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak_rates.items()),
    ]
    if peer_eager is not None:
        notes.append(
            "ours / diffusers as a plain eager step (contiguous, no compile): "
            f"train {med['ours'] / med['diffusers eager']:.2f}"
            + ("" if args.no_sample else f", sample {smed['ours'] / smed['diffusers eager']:.2f}")
        )
    if lightning is not None:
        notes.append(f"Lightning overhead: ours / ours+Lightning step rate = {med['ours'] / med['ours+Lightning']:.3f}")
    notes.append(
        "peak mem = weights + AdamW state + peak above the between-steps level "
        + ("(CUDA allocator)" if args.device == "cuda" else "(polled RSS, after malloc_trim)")
    )
    notes.append(
        f"load average: start {load_before[0]:.2f}, end {load_after[0]:.2f} (1-min); "
        f"per-round steps/s: " + "; ".join(f"{i.name} " + ", ".join(f"{v:.3f}" for v in i.train_rates) for i in all_impls)
    )
    notes.append(
        "per-round ratio ours/diffusers (train): "
        + ", ".join(f"{a / b:.2f}" for a, b in zip(ours.train_rates, peer.train_rates))
        + ("" if args.no_sample else "; (sample): " + ", ".join(f"{a / b:.2f}" for a, b in zip(ours.sample_rates, peer.sample_rates)))
    )
    if not args.no_sample:
        notes.append("per-round sample samples/s: " + "; ".join(f"{i.name} " + ", ".join(f"{v:.2f}" for v in i.sample_rates) for i in impls))
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)

    print()
    print(TABLE_HEADER)
    print("\n".join(rows))
    print()
    for n in notes:
        print(f"- {n}")

    if args.write:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        block = [
            f"### {stamp} — {device_line(args)}",
            "",
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, lightning "
            f"{__import__('lightning').__version__}; `{cmd}`",
            "",
            TABLE_HEADER,
            *rows,
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
        if not RESULTS.exists():
            RESULTS.write_text("# Throughput results\n\n")
        with RESULTS.open("a") as f:
            f.write("\n".join(block) + "\n")
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
