"""Seconds per Stable Diffusion image (512×512, 25 steps): unetkit's pipeline vs diffusers'.

    python benchmarks/sd_image.py                      # SD 1.x sizes: minutes per case
    python benchmarks/sd_image.py --quick              # tiny components: seconds
    python benchmarks/sd_image.py --vae                # the VAE decode alone, fp32 vs bf16

The whole ``generate`` workload for one image: the CLIP text encoder on the prompt and the
negative prompt, 25 denoising steps of the U-Net at batch 2 (classifier-free guidance
7.5), the VAE decoder on the 64×64 latents. The components have Stable Diffusion 1.x's
sizes and are drawn at random (seed 0) with the libraries' own classes: the U-Net
(``UNet2DConditionModel``, 859.5 M parameters), the VAE (``AutoencoderKL`` with SD's
config, 83.7 M) and the text encoder (``CLIPTextModel`` with ViT-L/14's text config,
123 M), and a CLIP tokenizer over a small vocabulary written here: nothing is
downloaded. They are saved once as a pipeline folder with SD 1.x's DDIM scheduler (the
same sampler on both sides), and each case loads it in a fresh process:

- ``unetkit``: ``StableDiffusion.from_pretrained(folder)``, as ``unetkit generate`` runs it
  with ``--precision auto``: the U-Net on the frozen bf16 fast path where the CPU computes
  bf16 (weights read straight into bf16; the freeze happens in the first image and is
  timed with it), the VAE under bf16 autocast with it (norms float32), the text encoder
  in float32;
- ``diffusers-bf16``: ``StableDiffusionPipeline.from_pretrained(folder,
  torch_dtype=torch.bfloat16)``, every component in bf16;
- ``diffusers-fp32``: the same with the float32 default.

Before each case every file of the folder is read once, untimed, so that loading is
compared from the page cache (the first case to read a cold folder would pay for the disk).
Each case times one image from a fresh load (``--images`` for more); the table gives
seconds per image, the mean of steps 2..n (from the step callbacks) and the rest (text
encoder, first step, VAE decoder), and peak RSS. ``--rounds 2`` runs the cases twice, in
turn, so load changes on a shared machine hit both libraries.
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd_step import SD15, TINY, cpu_name, peak_rss_mib  # noqa: E402

CASES = ("unetkit", "diffusers-bf16", "diffusers-fp32")
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TINY_VAE = dict(
    SD_VAE,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
)
SD_CLIP = dict(  # OpenAI CLIP ViT-L/14's text tower, SD 1.x's text encoder (123 M)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _tokenizer(folder: Path, length: int):
    """A CLIP tokenizer over letters and a few merges (the real one is a download)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase)
    tokens += [c + "</w>" for c in string.ascii_lowercase]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=length
    )


def make_pipeline(folder: Path, quick: bool) -> None:
    """Random SD-sized components (seed 0) saved as a diffusers pipeline folder."""
    if (folder / "model_index.json").is_file():
        return
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**(TINY if quick else SD15))
    vae = diffusers.AutoencoderKL(**(TINY_VAE if quick else SD_VAE))
    clip_cfg = transformers.CLIPTextConfig(**(TINY_CLIP if quick else SD_CLIP))
    text = transformers.CLIPTextModel(clip_cfg)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=_tokenizer(folder / "_tok", clip_cfg.max_position_embeddings),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _load(case: str, folder: Path):
    """A function ``generate(seed, callback) -> images`` for ``case``."""
    import torch

    if case == "unetkit":
        from unetkit.workflows.sd_pipeline import StableDiffusion

        sd = StableDiffusion.from_pretrained(folder)
        return lambda size, steps, seed, cb: sd.txt2img(
            [PROMPT], negative=NEGATIVE, steps=steps, guidance=7.5, seed=seed,
            height=size, width=size, callback=lambda i, n: cb(),
        )  # fmt: skip
    from diffusers import StableDiffusionPipeline

    dtype = torch.bfloat16 if case == "diffusers-bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)

    def on_step(p, i, t, kw):
        cb()
        return kw

    def generate(size, steps, seed, step_cb):
        nonlocal cb
        cb = step_cb
        return pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
            height=size, width=size, generator=torch.Generator().manual_seed(seed),
            output_type="np", callback_on_step_end=on_step,
        ).images  # fmt: skip

    cb = None
    return generate


def read_files_once(folder: Path) -> None:
    """Read every file of the pipeline folder (untimed), so that no case pays for the disk:
    the first case to load a cold folder would otherwise take seconds more than the next."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_case(case: str, folder: Path, quick: bool, images: int, steps: int) -> dict:
    """Time ``images`` images of ``case`` in this process (loading not timed)."""
    import torch

    size = 32 if quick else 512
    start = time.perf_counter()
    generate = _load(case, folder)
    load = time.perf_counter() - start
    totals, step_means = [], []
    with torch.inference_mode():
        for i in range(images):
            marks: list[float] = []
            start = time.perf_counter()
            out = generate(size, steps, i, lambda m=marks: m.append(time.perf_counter()))
            float(torch.as_tensor(out).float().mean())  # the image is used: nothing skipped
            totals.append(time.perf_counter() - start)
            gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
            step_means.append(statistics.mean(gaps) if gaps else float("nan"))
    return {
        "case": case, "seconds": totals, "step_seconds": step_means, "load_seconds": load,
        "steps": steps, "peak_rss_mib": peak_rss_mib(),
    }  # fmt: skip


def vae_decode_table(quick: bool, repeats: int = 2) -> str:
    """``--vae``: seconds for one VAE decode (SD's VAE config, random weights, one latent of
    a 512×512 image) as unetkit runs it: float32, and under bf16 autocast (``--precision
    auto`` with the fast path); the largest difference of the two images."""
    import diffusers
    import torch

    from unetkit.diffusion.latent import LatentCodec

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**(TINY_VAE if quick else SD_VAE)).eval()
    side = 4 if quick else 64
    z = torch.randn(1, vae.config.latent_channels, side, side)
    rows, images = [], {}
    for name, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        codec = LatentCodec(vae, 0.18215, compute_dtype=dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            images[name] = codec.decode(z)
            times.append(time.perf_counter() - start)
        rows.append(f"| {name} | {min(times):.2f} |")
    diff = (images["bf16 autocast"] - images["float32"]).abs().max().item()
    head = [
        f"VAE decode, {side * 8}×{side * 8} image, best of {repeats}; {cpu_name()}; "
        f"largest |bf16 − float32| on [−1, 1]: {diff:.3f}",
        "",
        "| VAE | s/decode |",
        "|---|---|",
    ]
    return "\n".join(head + rows)


def table(results: list[dict], quick: bool) -> str:
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    med = {c: statistics.median(s for r in rs for s in r["seconds"]) for c, rs in by_case.items()}
    steps = results[0]["steps"]
    lines = [
        f"Stable Diffusion 1.x {'(tiny components)' if quick else 'sizes'}, one "
        f"{'32×32' if quick else '512×512'} image, {steps} DDIM steps, guidance 7.5 "
        f"(batch 2); {cpu_name()}; torch {__import__('torch').__version__}",
        "",
        "| case | s/image | s/step (steps 2..n) | rest: text, step 1, VAE (s) | "
        "vs diffusers bf16 | vs diffusers fp32 | load (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, rs in by_case.items():
        s = med[case]
        step = statistics.median(x for r in rs for x in r["step_seconds"])
        rest = s - step * (steps - 1)
        vs = [f"{med[ref] / s:.2f}×" if ref in med else "-" for ref in CASES[1:]]
        load = statistics.median(r["load_seconds"] for r in rs)
        peak = max(r["peak_rss_mib"] for r in rs)
        all_s = ", ".join(f"{x:.1f}" for r in rs for x in r["seconds"])
        lines.append(
            f"| {case} | {s:.1f} ({all_s}) | {step:.2f} | {rest:.1f} | {vs[0]} | {vs[1]} | "
            f"{load:.1f} | {peak:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny components (a smoke test)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=1, help="run the cases this many times, in turn")
    p.add_argument("--images", type=int, default=1, help="images per case and round")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--pipeline", help="folder for the shared pipeline (default: a temp folder)")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--vae", action="store_true", help="time the VAE decode only (fp32, bf16)")
    p.add_argument("--inline", action="store_true", help="run the cases in this process")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_make", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vae:
        print(vae_decode_table(args.quick))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.pipeline or tmp)
        if args._case:
            print(json.dumps(run_case(args._case, folder, args.quick, args.images, args.steps)))
            return 0
        if args._make or args.inline:
            make_pipeline(folder, args.quick)
            if args._make:
                return 0
        else:  # drawn in a child: this process stays small while the cases run
            cmd = [sys.executable, __file__, "--_make", "--pipeline", str(folder)]
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
        results = []
        for _ in range(args.rounds):
            for case in args.cases.split(","):
                read_files_once(folder)  # every case loads from the page cache, not the disk
                if args.inline:
                    res = run_case(case, folder, args.quick, args.images, args.steps)
                else:
                    cmd = [sys.executable, __file__, "--_case", case, "--pipeline", str(folder)]
                    cmd += ["--images", str(args.images), "--steps", str(args.steps)]
                    cmd += ["--quick"] if args.quick else []
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
                    res = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(res)
                print(f"{case}: {res['seconds']} s/image", file=sys.stderr, flush=True)
                if args.json:  # after every case: a long run keeps what it has
                    Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
