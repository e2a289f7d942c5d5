"""Fast-path experiments for issue #6: measure before adopting (results quoted in docs/benchmarks.md).

    .venv/bin/python benchmarks/fastpaths.py                      # every CPU experiment, LiteMedSAM + tiny ViT
    .venv/bin/python benchmarks/fastpaths.py --only batch threads --json benchmarks/results/fastpaths.json
    .venv/bin/python benchmarks/fastpaths.py --only sdpa --vit-b   # also time SDPA on a random ViT-B (slow on CPU)

Experiments (each prints one block and adds one entry to the JSON):
  stages    where one slice's time goes in the engine: normalise, preprocess, encode, decode, postprocess, copy
  batch     engine embedding ms/slice at batch sizes 1, 2, 4, 8 (Engine.batch_size)
  threads   encoder and decoder at 1 and N torch threads
  channels  channels-last memory format for the encoder (TinyViT's first stages are convolutions)
  bf16      bfloat16 autocast on CPU: speed and agreement (embedding error, mask Dice against fp32)
  sdpa      segment-anything's ViT attention against the engine's SDPA path (relative-position terms folded into the
            dot product): agreement, time and peak device memory on a tiny ViT and, with --vit-b, a random ViT-B
  compile   torch.compile of the encoder (inductor; needs a C++ compiler on CPU): compile time, speed, agreement
  prefetch  embedding neighbouring slices in a background thread while the user prompts: the prompt latency
            while it runs, and the latency of the next slice's first prompt with and without it
  pinned    pinned-memory, non-blocking host->device copies (CUDA only; reported as not measured elsewhere)
  malloc    glibc allocator tuning (no mmap for large blocks, no trimming; segmote_core.devices.tune_cpu_allocator,
            on by default in CPU engines): page faults, kernel time, wall time per slice and peak RSS, each mode in a
            fresh subprocess

Timings are medians of a few runs after a warm-up; the machine's load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py, next to this file)
from segmote_core.engine import Engine  # noqa: E402
from segmote_core.normalize import normalize  # noqa: E402

EXPERIMENTS = ("stages", "batch", "threads", "channels", "bf16", "sdpa", "compile", "prefetch", "pinned", "malloc")


def median_time(fn, repeats: int = 3, warmup: int = 1, device=torch.device("cpu")) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        bench._sync(device)
        start = time.perf_counter()
        fn()
        bench._sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class Setup:
    """One LiteMedSAM engine, a small synthetic CT and its prepared stack, shared by the experiments."""

    def __init__(self, device: str, shape=(8, 256, 256)):
        self.engine = Engine("lite_medsam", device=device)
        self.device = self.engine.device
        self.volume = bench.synthetic_ct(shape)
        self.prepared = self.engine.prepare(self.volume, window=(40.0, 400.0))
        self.stack = self.prepared.stack.to_stack(self.volume.array)
        self.boxes = bench.random_boxes(self.prepared.slice_shape, 10)
        self.backbone = self.engine.backbone

    def input(self, batch: int = 1) -> torch.Tensor:
        images = torch.from_numpy(np.stack([normalize(self.stack[i % len(self.stack)], self.prepared.normalization)
                                            for i in range(batch)]))
        with torch.inference_mode():
            return self.backbone.preprocess(images.to(self.device))

    def decode_mask(self, embedding, box) -> np.ndarray:
        shape = self.prepared.slice_shape
        with torch.inference_mode():
            corners = torch.as_tensor(box, dtype=torch.float32, device=self.device).view(1, 2, 2)
            logits, _ = self.backbone.decode(embedding, boxes=self.backbone.slice_to_model_xy(corners, shape).view(1, 4))
            return (self.backbone.postprocess(logits.float(), shape)[0, 0] > 0).cpu().numpy()


def exp_stages(s: Setup, args) -> dict:
    b, shape, dev = s.backbone, s.prepared.slice_shape, s.device
    raw = s.stack[0]
    images01 = torch.from_numpy(normalize(raw, s.prepared.normalization))[None]
    with torch.inference_mode():
        x = b.preprocess(images01.to(dev))
        embedding, _ = b.encode(x)
        corners = torch.as_tensor(s.boxes[0], dtype=torch.float32, device=dev).view(1, 2, 2)
        box = b.slice_to_model_xy(corners, shape).view(1, 4)
        logits, _ = b.decode(embedding, boxes=box)
        full = b.postprocess(logits, shape)
        parts = {
            "normalise (numpy)": median_time(lambda: normalize(raw, s.prepared.normalization), 5),
            "host->device + preprocess": median_time(lambda: b.preprocess(images01.to(dev)), 5, device=dev),
            "encode": median_time(lambda: b.encode(x), args.repeats, device=dev),
            "prompt encoder + mask decoder": median_time(lambda: b.decode(embedding, boxes=box), 5, device=dev),
            "postprocess (upsample)": median_time(lambda: b.postprocess(logits, shape), 5, device=dev),
            "threshold + device->host": median_time(lambda: (full[0, 0] > 0).cpu().numpy(), 5, device=dev),
        }
    return {name: round(seconds * 1000, 2) for name, seconds in parts.items()} | {"unit": "ms", "slice": list(shape)}


def exp_batch(s: Setup, args) -> dict:
    engine, result = s.engine, {}
    slices = list(range(min(args.slices, s.prepared.num_slices)))
    original = engine.batch_size
    for size in (1, 2, 4, 8):
        engine.batch_size = size

        def run():
            engine.cache.clear()
            engine.embeddings(s.prepared, slices)

        result[f"batch {size}"] = round(median_time(run, args.repeats, warmup=0, device=s.device) * 1000 / len(slices), 1)
    engine.batch_size = original
    return result | {"unit": "ms per slice", "slices": len(slices)}


def exp_threads(s: Setup, args) -> dict:
    original = torch.get_num_threads()
    x, result = s.input(), {}
    with torch.inference_mode():
        embedding, _ = s.backbone.encode(x)
        for threads in sorted({1, original}):
            torch.set_num_threads(threads)
            result[f"{threads} thread(s)"] = {
                "encode_ms": round(median_time(lambda: s.backbone.encode(x), args.repeats) * 1000, 1),
                "decode_ms": round(median_time(lambda: s.decode_mask(embedding, s.boxes[0]), 5) * 1000, 1)}
    torch.set_num_threads(original)
    return result


def exp_channels(s: Setup, args) -> dict:
    encoder = s.backbone.image_encoder
    x = s.input(2)
    with torch.inference_mode():
        reference = s.backbone.encode(x)[0]
        plain = median_time(lambda: s.backbone.encode(x), args.repeats)
        encoder.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        fast = s.backbone.encode(xc)[0]
        channels_last = median_time(lambda: s.backbone.encode(xc), args.repeats)
        encoder.to(memory_format=torch.contiguous_format)
    return {"contiguous_ms_per_slice": round(plain * 500, 1), "channels_last_ms_per_slice": round(channels_last * 500, 1),
            "max_rel_diff": float((fast - reference).abs().max() / reference.abs().max())}


def _bf16_flags() -> list[str] | None:
    """avx512_bf16 / amx_bf16 in /proc/cpuinfo (without them bf16 matmuls are emulated on CPU)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return None
    return [f for f in flags if "bf16" in f]


def exp_bf16(s: Setup, args) -> dict:
    x = s.input(2)
    device_type = s.device.type
    with torch.inference_mode():
        reference = s.backbone.encode(x)[0]
        fp32 = median_time(lambda: s.backbone.encode(x), args.repeats, device=s.device)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            low = s.backbone.encode(x)[0].float()
            bf16 = median_time(lambda: s.backbone.encode(x), args.repeats, device=s.device)
        dices = [bench.dice(s.decode_mask(reference[:1], box), s.decode_mask(low[:1], box)) for box in s.boxes[:5]]
    return {"fp32_ms_per_slice": round(fp32 * 500, 1), "bf16_autocast_ms_per_slice": round(bf16 * 500, 1),
            "embedding_max_rel_err": float((low - reference).abs().max() / reference.abs().max()),
            "mask_dice_vs_fp32_mean": round(float(np.mean(dices)), 4),
            "cpu_native_bf16_flags": _bf16_flags(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()}


def _sdpa_check(backbone, x, device, repeats) -> dict:
    """SAM's own attention against the engine's SDPA path on one encoder: agreement, time, peak device memory."""
    from segmote_core.models.backbones import use_sdpa

    result = {}
    outputs = {}
    for label, enabled in (("original", False), ("sdpa", True)):
        use_sdpa(backbone.image_encoder, enabled)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            outputs[label] = backbone.encode(x)[0].float()
            seconds = median_time(lambda: backbone.encode(x), repeats, device=device)
        result[f"{label}_ms_per_slice"] = round(seconds * 1000 / len(x), 2)
        if device.type == "cuda":
            result[f"{label}_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    use_sdpa(backbone.image_encoder, True)  # the engine's default
    diff = (outputs["sdpa"] - outputs["original"]).abs()
    result["max_rel_diff"] = float(diff.max() / outputs["original"].abs().max())
    return result


def exp_sdpa(s: Setup, args) -> dict:
    """segment-anything's attention vs the engine's SDPA path (segmote_core.models.backbones.SDPAAttention), with
    random relative-position tables so that the folded terms matter. LiteMedSAM's TinyViT is not a SAM ViT and
    keeps its own attention (49/196-token windows: nothing measurable to gain, docs/benchmarks.md)."""
    from segmote_core.models.backbones import BACKBONES, build_tiny_sam_vit

    def randomise_rel_pos(backbone):
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                if "rel_pos" in name:  # zero at init
                    param.normal_(0, 0.5)
        return backbone

    torch.manual_seed(0)
    result = {"tiny_vit_fp32": _sdpa_check(randomise_rel_pos(build_tiny_sam_vit().eval()),
                                           torch.randn(2, 3, 256, 256), torch.device("cpu"), args.repeats)}
    if args.vit_b:
        torch.manual_seed(0)
        vit = randomise_rel_pos(BACKBONES["sam_vit_b"].build().eval().to(s.device))
        on_gpu = s.device.type == "cuda"
        batches = (1, 8) if on_gpu else (1,)
        for label, dtype in [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if on_gpu else []):
            for batch in batches:
                xb = torch.randn(batch, 3, 1024, 1024, device=s.device)
                with torch.autocast(s.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    result[f"vit_b_{label}_batch{batch}"] = _sdpa_check(vit, xb, s.device, 5 if on_gpu else 1)
        del vit
    return result


def exp_compile(s: Setup, args) -> dict:
    import torch._dynamo

    x = s.input(2)
    encoder = s.backbone.image_encoder
    with torch.inference_mode():
        reference = s.backbone.encode(x)[0]
        plain = median_time(lambda: s.backbone.encode(x), args.repeats)
    compiled = torch.compile(encoder.forward_with_early, dynamic=False)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = compiled(x)[0]
    except Exception as error:  # noqa: BLE001 - report why compile is unusable here
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    compile_s = time.perf_counter() - start
    with torch.inference_mode():
        fast = median_time(lambda: compiled(x), args.repeats)
    torch._dynamo.reset()
    return {"eager_ms_per_slice": round(plain * 500, 1), "compiled_ms_per_slice": round(fast * 500, 1),
            "compile_s": round(compile_s, 1), "max_rel_diff": float((out - reference).abs().max() / reference.abs().max())}


def exp_prefetch(s: Setup, args) -> dict:
    """A user prompts slice c while Engine.prefetch embeds c+1, c+2, ... in the background."""
    engine, prepared = s.engine, s.prepared
    centre = 0
    engine.cache.clear()
    engine.embeddings(prepared, [centre])
    idle = [bench._timed(s.device, lambda: engine.predict_slice(prepared, centre, box=b)) for b in s.boxes]
    engine.prefetch(prepared, centre, radius=args.slices)
    busy = []
    while engine.prefetching and len(busy) < 40:
        busy.append(bench._timed(s.device, lambda: engine.predict_slice(prepared, centre, box=s.boxes[len(busy) % 10])))
    engine.wait_prefetch()
    next_slice = centre + 1
    warm = bench._timed(s.device, lambda: engine.predict_slice(prepared, next_slice, box=s.boxes[0]))
    engine.cache.clear()
    cold = bench._timed(s.device, lambda: engine.predict_slice(prepared, next_slice, box=s.boxes[0]))
    return {"prompt_p50_ms_idle": round(float(np.median(idle)) * 1000, 1),
            "prompt_p50_ms_while_prefetching": round(float(np.median(busy)) * 1000, 1) if busy else None,
            "prompts_during_prefetch": len(busy),
            "next_slice_first_prompt_ms_prefetched": round(warm * 1000, 1),
            "next_slice_first_prompt_ms_cold": round(cold * 1000, 1)}


def exp_pinned(s: Setup, args) -> dict:
    if s.device.type != "cuda":
        return {"not_measured": "needs CUDA"}
    batch = torch.from_numpy(np.stack([normalize(s.stack[i], s.prepared.normalization) for i in range(4)]))
    pinned = batch.pin_memory()
    plain = median_time(lambda: batch.to(s.device), 10, device=s.device)
    fast = median_time(lambda: pinned.to(s.device, non_blocking=True), 10, device=s.device)
    return {"pageable_copy_ms": round(plain * 1000, 3), "pinned_non_blocking_copy_ms": round(fast * 1000, 3)}


def _malloc_child(mode: str, repeats: int) -> dict:
    """Runs in a fresh process: LiteMedSAM encoder at batch 1 and 4 with the default or the tuned allocator."""
    import resource

    from segmote_core.devices import tune_cpu_allocator

    tuned = tune_cpu_allocator()  # the parent set SEGMOTE_MALLOC_TUNING for this child
    from segmote_core.models.backbones import build_lite_medsam

    backbone = build_lite_medsam().eval()
    result = {"tuned": tuned}
    for batch in (1, 4):
        x = torch.rand(batch, 3, 256, 256)
        with torch.inference_mode():
            backbone.encode(x)
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(repeats):
                backbone.encode(x)
            after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        n = repeats * batch
        result[f"batch {batch}"] = {"ms_per_slice": round(wall / n * 1000, 1),
                                    "minor_faults_per_slice": round((after.ru_minflt - before.ru_minflt) / n),
                                    "kernel_ms_per_slice": round((after.ru_stime - before.ru_stime) / n * 1000, 1),
                                    "user_ms_per_slice": round((after.ru_utime - before.ru_utime) / n * 1000, 1)}
    result["peak_rss_mb"] = round(bench.peak_rss_mb(), 1)
    return result


def exp_malloc(s: Setup, args) -> dict:
    import subprocess

    result = {}
    for mode in ("default", "tuned"):
        command = [sys.executable, __file__, "--malloc-child", mode, "--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        environment = dict(os.environ, SEGMOTE_MALLOC_TUNING="1" if mode == "tuned" else "0")
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
        result[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run only these experiments")
    parser.add_argument("--skip", nargs="+", choices=EXPERIMENTS, default=[], help="skip these experiments")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--slices", type=int, default=8, help="slices for the batch and prefetch experiments")
    parser.add_argument("--vit-b", action="store_true", help="sdpa: also time a random ViT-B encoder (slow on CPU)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--malloc-child", choices=("default", "tuned"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_child:
        print(json.dumps(_malloc_child(args.malloc_child, args.repeats)))
        return 0
    chosen = [e for e in (args.only or EXPERIMENTS) if e not in args.skip]
    setup = Setup(args.device)
    report = {"machine": bench.machine_info(setup.device), "experiments": {}}
    for name in chosen:
        start = time.perf_counter()
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result = globals()[f"exp_{name}"](setup, args)
        result["_wall_s"] = round(time.perf_counter() - start, 1)
        result["_load_average_1min"] = [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
        report["experiments"][name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
    if args.json:
        bench.write_json(args.json, report)
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
