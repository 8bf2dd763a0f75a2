"""``python -m jin_orchestrate.generate``: cross-modal generation from a checkpoint; its training.

Sampling (writes a real PNG, WAV or UTF-8 text file)::

    python -m jin_orchestrate.generate --checkpoint CKPT --to image --from-text "the number 42" \\
        --out 42.png [--steps 50 --guidance 3 --seed 0]
    python -m jin_orchestrate.generate --checkpoint CKPT --to audio --from-image 42.png --out 42.wav
    python -m jin_orchestrate.generate --checkpoint CKPT --to text --from-audio 42.wav --out 42.txt
    (--device cuda generates on a GPU; the default is the CPU)

Training (a generation fine-tune of a pretrained checkpoint: one stage with the generation
objective, run on Ray Train and tracked in MLflow exactly as pretraining's stages are)::

    python -m jin_orchestrate.generate train --checkpoint runs:/RUN_ID/final_checkpoint \\
        [--steps 1000 --lr 2e-3 --image-size 32 --set model.generation.cond_dropout=0.2]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "build_generation_config",
    "main",
    "read_audio",
    "read_image",
    "write_png",
    "write_wav",
]


class InputError(ValueError):
    """A command-line input that cannot be used; the message names the flag and the file."""


def build_generation_config(
    base: dict[str, Any],
    *,
    steps: int,
    lr: float,
    image_size: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Any:
    """The `JinConfig` of a generation fine-tune from the ``config.json`` of a checkpoint.

    The model gains generation heads (defaults of `GenerationConfig`, or the checkpoint's own if
    it has them), the data reads the text, image and audio columns (and each runtime modality's
    column, `jin_orchestrate.extend`'s record, which the generation checkpoint keeps for evaluate,
    embed and Serve), and the curriculum is one ``generation`` stage. ``overrides`` (``--set``)
    apply last.
    """
    from jin_orchestrate.config import JinConfig, resolve_config

    cfg = JinConfig.model_validate(base)
    data = cfg.model_dump(mode="json")
    generation = data["model"].get("generation") or {}
    if image_size is not None:
        generation["image_size"] = image_size
    data["model"]["generation"] = generation
    columns = {m: c for m, c in cfg.data.columns.items() if m in cfg.model.extra_modalities}
    data["data"]["modalities"] = ["text", "image", "audio", *columns]
    data["data"]["columns"] = columns
    data["stages"] = [
        {
            "name": "generation",
            "steps": steps,
            "alpha": 0.0,
            "generation": 1.0,
            "lr": lr,
        }
    ]
    data["train"]["warmup_steps"] = min(data["train"]["warmup_steps"], max(1, steps // 10))
    return resolve_config(data, overrides=overrides)


# -- files in and out ----------------------------------------------------------------------


def read_image(path: str | Path, channels: int, flag: str = "--from-image") -> torch.Tensor:
    """An image file as uint8 ``(1, channels, H, W)`` (grayscale or RGB as the model wants)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{flag} {path}: not a readable image ({exc})") from exc
    tensor = torch.from_numpy(pixels.copy())
    return (tensor[None] if channels == 1 else tensor.permute(2, 0, 1))[None]


def read_audio(path: str | Path, flag: str = "--from-audio") -> tuple[torch.Tensor, int]:
    """An audio file as a mono float32 waveform ``(1, S)`` and its sample rate."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise InputError(f"{flag} {path}: not a readable audio file ({exc})") from exc
    if samples.shape[0] == 0:
        raise InputError(f"{flag} {path}: the file holds no samples")
    return torch.from_numpy(samples.mean(axis=1))[None], int(rate)


def _atomic_write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | Path, image_CHW: torch.Tensor) -> Path:
    """Write a uint8 ``(C, H, W)`` image (C = 1 or 3) as a PNG, atomically."""
    from PIL import Image

    array = image_CHW.cpu().numpy()
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def write_wav(path: str | Path, waveform_S: torch.Tensor, sample_rate: int) -> Path:
    """Write a float waveform in [-1, 1] as 16-bit PCM mono WAV, atomically."""
    pcm = (waveform_S.detach().cpu().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    _atomic_write(Path(path), buffer.getvalue())
    return Path(path)


# -- the two commands ----------------------------------------------------------------------


def _sample_parser() -> argparse.ArgumentParser:
    from jin_orchestrate.evaluate import add_device_argument, add_weights_argument

    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.generate",
        description="Generate an image, audio or a caption from another modality "
        "('python -m jin_orchestrate.generate train --help' for training).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory or runs:/RUN_ID/final_checkpoint"
    )
    p.add_argument("--to", required=True, choices=["image", "audio", "text"], dest="target")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-text", help="a caption to condition on")
    source.add_argument("--from-image", help="an image file (PNG, JPEG, ...) to condition on")
    source.add_argument("--from-audio", help="an audio file (WAV, FLAC, ...) to condition on")
    p.add_argument("--out", required=True, type=Path, help="output file (.png, .wav or .txt)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="captions: 0 = greedy")
    p.add_argument("--top-k", type=int, help="captions: sample among the k likeliest bytes")
    add_weights_argument(p)
    add_device_argument(p, "where the model generates; the file is written from the CPU")
    return p


def _train_parser() -> argparse.ArgumentParser:
    from jin_orchestrate.pretrain import add_job_arguments

    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.generate train",
        description="Fine-tune a checkpoint for cross-modal generation (one Ray Train stage).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint directory or runs:/RUN_ID/final_checkpoint"
    )
    p.add_argument("--data", help="fsspec URL of jin-data shards (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--image-size", type=int, help="side of generated images (default 32)")
    add_job_arguments(p, experiment="jin-generate")
    return p


def _check_output(args: argparse.Namespace) -> None:
    suffix = {"image": ".png", "audio": ".wav", "text": ".txt"}[args.target]
    if args.out.suffix.lower() != suffix:
        raise InputError(f"--out {args.out}: --to {args.target} writes a {suffix} file")
    if args.out.is_dir():
        raise InputError(f"--out {args.out}: is a directory")
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: expected at least 1")


def _condition(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    if args.from_text is not None:
        if not args.from_text.strip():
            raise InputError("--from-text: the caption is empty")
        return {"text": [args.from_text]}
    if args.from_image is not None:
        channels = model.space.encoders["image"].in_channels
        return {"image": read_image(args.from_image, channels)}
    waveform, rate = read_audio(args.from_audio)
    return {
        "audio": waveform,
        "audio_lengths": torch.tensor([waveform.shape[1]]),
        "audio_sample_rate": rate,
    }


def sample(argv: list[str]) -> int:
    """``--to ... --from-... --out ...``: one sample written to ``--out``."""
    from jin_orchestrate.evaluate import device_choice, load_model, weights_choice
    from jin_orchestrate.tracking import local_checkpoint

    args = _sample_parser().parse_args(argv)
    try:
        _check_output(args)
        device = device_choice(args)
        model = load_model(
            local_checkpoint(args.checkpoint), ema=weights_choice(args), device=device
        )
        condition = _condition(args, model)
        result = model.generate(
            args.target,
            condition,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.target == "image":
            write_png(args.out, result[0])
        elif args.target == "audio":
            write_wav(args.out, result[0], model.space.encoders["audio"].config.sample_rate)
        else:
            _atomic_write(args.out, (result[0] + "\n").encode("utf-8"))
    except OSError as exc:
        print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.target == "text":
        print(result[0])
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def train(argv: list[str]) -> int:
    """``train --checkpoint ...``: the generation fine-tune as a Ray Train job with MLflow."""
    from jin_orchestrate.pretrain import checkpoint_source, job_overrides, run_job_from_checkpoint

    args = _train_parser().parse_args(argv)
    try:
        source, base, url = checkpoint_source(args)
        cfg = build_generation_config(
            base,
            steps=args.steps,
            lr=args.lr,
            image_size=args.image_size,
            overrides=job_overrides(args),
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_job_from_checkpoint(cfg, args, url, source, ())


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``train`` to the fine-tuning job, anything else to sampling."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        return train(argv[1:])
    return sample(argv)


if __name__ == "__main__":
    sys.exit(main())
