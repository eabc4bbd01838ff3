"""Train the embedded text-to-image DiT on procedural shapes (``python -m cachedit.embedded.train``).

Rectified flow, as Flux and SD3: ``x_t = (1 - s) * image + s * noise`` with ``s`` drawn
logit-normally, the transformer predicts ``noise - image`` and is called with ``timestep = s``
(the pipeline divides the scheduler's ``t`` by 1000 the same way). Captions are dropped to the
empty prompt with probability ``caption_dropout`` so classifier-free guidance works. The text
encoder trains jointly. An EMA of both models is what gets exported.

Seeded and reproducible: one ``torch.Generator`` drives data, noise, times and dropout, and a
checkpoint stores its state, so an interrupted run resumed with ``--resume`` continues the same
stream. Checkpoints go to ``--work-dir`` every ``--checkpoint-every`` steps; the final (or
``--export-only``) step writes the pipeline with ``save_pretrained`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tqdm.auto import tqdm

from cachedit.embedded import data
from cachedit.embedded.pipeline import EmbeddedDiTPipeline, image_ids, pack_patches
from cachedit.embedded.text_encoder import WordTextEncoder

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "weights")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    patch_size: int = 4  # 32x32 RGB -> 8x8 = 64 image tokens of 48 values
    hidden_size: int = 128
    num_heads: int = 4
    num_double_blocks: int = 2
    num_single_blocks: int = 6
    text_hidden_size: int = 64
    text_layers: int = 2
    text_max_length: int = 12


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 12000  # 53 min at 2 threads on an idle 2-core CPU (~265 ms a step; BENCHMARKS.md)
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 200
    # The cosine horizon is fixed, not tied to ``steps``: the run to step N is then the same whatever
    # ``steps`` says, so a run stopped early (shared CPU) is reproduced exactly by ``--steps N``.
    decay_steps: int = 12000
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2  # the target is a 2-core CPU; use 1 where other jobs share the cores (2 threads then stall)
    checkpoint_every: int = 250
    model: ModelConfig = ModelConfig()


TINY_MODEL = ModelConfig(
    hidden_size=32, num_heads=2, num_double_blocks=1, num_single_blocks=1, text_hidden_size=16, text_layers=1
)


def build_models(cfg: ModelConfig) -> tuple[FluxTransformer2DModel, WordTextEncoder]:
    head_dim = cfg.hidden_size // cfg.num_heads
    axis = 2 * ((head_dim * 3 // 8) // 2)  # rope dims per spatial axis, even; the rest on axis 0
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=3 * cfg.patch_size**2,
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_hidden_size,
        pooled_projection_dim=cfg.text_hidden_size,
        guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * axis, axis, axis),
    )
    text_encoder = WordTextEncoder(
        vocab=list(data.VOCAB),
        max_length=cfg.text_max_length,
        hidden_size=cfg.text_hidden_size,
        num_layers=cfg.text_layers,
    )
    return transformer, text_encoder


def make_pipeline(transformer, text_encoder) -> EmbeddedDiTPipeline:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return EmbeddedDiTPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def flow_matching_loss(transformer, text_encoder, images, captions, generator, cfg: TrainConfig) -> torch.Tensor:
    b = images.shape[0]
    drop = torch.rand(b, generator=generator) < cfg.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    embeds, pooled = text_encoder(text_encoder.tokenize(captions))  # [B, T, D], [B, D]
    x0 = pack_patches(images, cfg.model.patch_size)  # [B, S, 3*p*p]
    noise = torch.randn(x0.shape, generator=generator)
    s = torch.sigmoid(torch.randn(b, generator=generator))  # logit-normal(0, 1) in (0, 1)
    xt = (1 - s.view(b, 1, 1)) * x0 + s.view(b, 1, 1) * noise
    side = images.shape[-1]
    pred = transformer(
        hidden_states=xt,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=s,
        img_ids=image_ids(side, side, cfg.model.patch_size),
        txt_ids=torch.zeros(embeds.shape[1], 3),
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred, noise - x0)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def export(ema_transformer, ema_text_encoder, out: str) -> None:
    make_pipeline(ema_transformer, ema_text_encoder).save_pretrained(out, safe_serialization=True)


def train(cfg: TrainConfig, work_dir: str, out: str | None, resume: bool = False, log_every: int = 25) -> dict:
    """Run (or resume) training; returns ``{"step", "loss", "seconds"}``. Writes ``work_dir/loss.jsonl``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(work_dir, exist_ok=True)
    transformer, text_encoder = build_models(cfg.model)
    ema_transformer, ema_text_encoder = copy.deepcopy(transformer), copy.deepcopy(text_encoder)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, ema_loss = 0, 0.0, None
    ckpt_path = os.path.join(work_dir, "checkpoint.pt")
    if resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False)
        transformer.load_state_dict(ckpt["transformer"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        ema_transformer.load_state_dict(ckpt["ema_transformer"])
        ema_text_encoder.load_state_dict(ckpt["ema_text_encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        step, elapsed, ema_loss = ckpt["step"], ckpt["elapsed"], ckpt["ema_loss"]

    def save_checkpoint():
        torch.save(
            {
                "transformer": transformer.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_transformer": ema_transformer.state_dict(),
                "ema_text_encoder": ema_text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "elapsed": elapsed,
                "ema_loss": ema_loss,
                "config": dataclasses.asdict(cfg),
            },
            ckpt_path + ".tmp",
        )
        os.replace(ckpt_path + ".tmp", ckpt_path)

    log = open(os.path.join(work_dir, "loss.jsonl"), "a")
    transformer.train()
    text_encoder.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", mininterval=2.0)
    while step < cfg.steps:
        start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, captions = data.sample_batch(cfg.batch_size, generator)
        loss = flow_matching_loss(transformer, text_encoder, images, captions, generator, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_transformer, transformer, decay)
        _ema_update(ema_text_encoder, text_encoder, decay)
        step += 1
        elapsed += time.perf_counter() - start
        value = loss.item()
        ema_loss = value if ema_loss is None else 0.98 * ema_loss + 0.02 * value
        bar.update()
        bar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{lr:.2e}")
        if step % log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": value, "loss_ema": ema_loss, "lr": lr, "seconds": elapsed}
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
    bar.close()
    log.close()
    if out:
        export(ema_transformer, ema_text_encoder, out)
    return {"step": step, "loss": ema_loss, "seconds": elapsed}


def export_checkpoint(work_dir: str, out: str) -> int:
    """Export the EMA weights of ``work_dir``'s checkpoint to ``out``; returns its step."""
    ckpt = torch.load(os.path.join(work_dir, "checkpoint.pt"), weights_only=False)
    model_cfg = ModelConfig(**ckpt["config"]["model"])
    transformer, text_encoder = build_models(model_cfg)
    transformer.load_state_dict(ckpt["ema_transformer"])
    text_encoder.load_state_dict(ckpt["ema_text_encoder"])
    export(transformer, text_encoder, out)
    return ckpt["step"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--decay-steps", type=int, default=TrainConfig.decay_steps, help="cosine LR horizon")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--work-dir", default="runs/embedded", help="checkpoints and loss.jsonl")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the trained pipeline is saved")
    parser.add_argument("--resume", action="store_true", help="continue from --work-dir/checkpoint.pt")
    parser.add_argument("--export-only", action="store_true", help="export the checkpoint's EMA weights and exit")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for smoke tests")
    args = parser.parse_args(argv)
    if args.export_only:
        step = export_checkpoint(args.work_dir, args.out)
        print(f"exported step {step} to {args.out}")
        return
    model = TINY_MODEL if args.tiny else ModelConfig()
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        decay_steps=args.decay_steps,
        seed=args.seed,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
        model=model,
    )
    result = train(cfg, args.work_dir, args.out, resume=args.resume)
    print(f"trained {result['step']} steps in {result['seconds'] / 60:.1f} min, final loss (EMA) {result['loss']:.4f}")


if __name__ == "__main__":
    main()
