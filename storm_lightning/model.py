"""``StormModel``: vision -> downsampler -> projector -> compressors -> LLM, and how it is trained.

Shapes at each boundary (F = all frames in the batch, B_T = clips of T frames)::

    pixel_values (F, 3, S, S) uint8 --normalise--> vision --> (F, N_hat, D_vision)
      --downsampler--> (F, N, D_in)                               N = N_hat / r^2, grid (h, w)
      --split into clips, grouped by T--> (B_T, T, N, D_in)
      --projector--> (B_T, T, N, D_llm) --compressors--> (B_T, T', N', D_llm)
      --flatten--> T' * N' visual tokens replacing the sample's <image>/<video> token in the LLM input.

The loss is next-token cross-entropy on assistant tokens only; the LM head runs only on those positions.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storm_lightning.checkpoint import TOKENIZER_FINGERPRINT, check_tokenizer, load_checkpoint_file
from storm_lightning.errors import ConfigError
from storm_lightning.compressors import Compressor, TemporalAveragePool, VisualTokenCount, chain_output_shape
from storm_lightning.data.batching import Batch
from storm_lightning.data.datamodule import StormDataModule
from storm_lightning.downsamplers import Downsampler
from storm_lightning.llm import CausalLM
from storm_lightning.lora import LoraSettings, add_lora, load_compatible
from storm_lightning.projectors import Projector
from storm_lightning.evaluation import MultipleChoiceMetrics, choice_scores, option_token_ids
from storm_lightning.tokenizer import (IGNORE_INDEX, check_chat_format, check_system_prompt, load_tokenizer,
                                      media_token_ids, tokenizer_fingerprint)
from storm_lightning.vision import VisionBackbone

log = logging.getLogger(__name__)
# model.loss_weighting -> p: a sample with n target tokens weighs each of them n^-p
LOSS_WEIGHT_POWER = {"token": 0.0, "square": 0.5, "sample": 1.0}


def pack(x: dict, head_mask: Tensor) -> dict:
    """The padded rows of ``expand_inputs`` as one sequence (1, T) of their real tokens, T = the sum of
    the rows' lengths, with positions restarting at each sample and ``cu_seqlens`` (B + 1,) bounding
    them, so that the LLM attends within each sample only and computes nothing for padding. The
    visual slots and head positions keep their row-major order, so ``visual`` and the logits are the
    same tensors as unpacked."""
    real = x["attention_mask"].bool()
    lengths = real.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths)
    positions = torch.arange(int(cu_seqlens[-1]), device=real.device) - starts
    return {"input_ids": x["input_ids"][real][None], "attention_mask": torch.ones_like(positions)[None],
            "visual_mask": x["visual_mask"][real][None], "visual": x["visual"], "zero": x["zero"],
            "head_mask": head_mask[real][None], "position_ids": positions[None], "cu_seqlens": cu_seqlens}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class StormModel(L.LightningModule):
    """A STORM video-LLM and its training step.

    Args:
        vision, downsampler, projector, llm: the components (``class_path`` + ``init_args`` in YAML).
        compressors: applied in order after the projector; ``[]`` for none.
        tokenizer_path: the tokenizer directory (linked from ``data.tokenizer_path`` by ``storm-fit``).
        system_prompt: opens every conversation without a system turn (linked from ``data.system_prompt``;
            kept here so that generation prompts the model as it was trained).
        freeze_*: keep that component's weights fixed (``projector`` includes the downsampler).
        lr_*: peak learning rate of each component; warmup for ``warmup_steps``, then cosine decay to
            ``min_lr_ratio * lr`` at the last step.
        init_from: a checkpoint of a previous stage (``.ckpt``) whose weights start this stage.
        max_nonfinite_steps: a step whose loss is NaN/inf is skipped (no update) and counted; this many
            in a row stop the run.
        fsdp_bf16: under FSDP2 on CUDA, compute in bf16 with fp32 gradient reduction.
        schedule_steps: length of the warmup + cosine schedule (default: ``trainer.max_steps``); set it
            when a run will be stopped and resumed with a different ``max_steps``.
        pack_sequences: the LLM gets the samples of a batch as one sequence of their real tokens
            (``pack``), each attending within itself, instead of rows padded to the longest: an image
            next to 32-frame clips no longer costs a clip's length. The loss and the option scores are
            those of the padded batch (tested to 1e-5).
        lora_llm, lora_vision: LoRA adapters (``storm_lightning.lora``) on the LLM / the vision tower: its
            weights stay fixed and its adapters train, at ``lr_llm`` / ``lr_vision``.
        loss_weighting: how the assistant tokens of a batch are averaged. ``token``: every token alike,
            so long answers dominate and a one-letter multiple-choice answer barely counts; ``sample``:
            every sample alike (token weight 1/n for a sample with n target tokens); ``square``: weight
            1/sqrt(n), between the two (InternVL 2.5's "square averaging").
    """

    def __init__(
        self,
        vision: VisionBackbone,
        downsampler: Downsampler,
        projector: Projector,
        llm: CausalLM,
        compressors: list[Compressor] | None = None,
        tokenizer_path: str = "data_shards/tokenizer",
        system_prompt: str | None = None,
        freeze_vision: bool = False,
        freeze_projector: bool = False,
        freeze_llm: bool = False,
        lr_vision: float = 2e-5,
        lr_projector: float = 1e-3,
        lr_llm: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        init_from: str | None = None,
        init_from_strict: bool = True,
        max_nonfinite_steps: int = 20,
        fsdp_bf16: bool = True,
        schedule_steps: int | None = None,
        pack_sequences: bool = True,
        loss_weighting: Literal["token", "sample", "square"] = "token",
        lora_llm: LoraSettings | None = None,
        lora_vision: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vision", "downsampler", "projector", "llm", "compressors"])
        self.vision, self.downsampler, self.projector, self.llm = vision, downsampler, projector, llm
        self.compressors = nn.ModuleList(compressors or [])
        _require(loss_weighting in LOSS_WEIGHT_POWER,
                 f"model.loss_weighting: expected token, sample or square, got {loss_weighting!r}")
        for key, value in (("lr_vision", lr_vision), ("lr_projector", lr_projector), ("lr_llm", lr_llm),
                           ("weight_decay", weight_decay)):  # a negative rate trains by gradient ascent
            _require(math.isfinite(value) and value >= 0, f"model.{key} must be a finite number >= 0, got {value}")
        _require(0 <= min_lr_ratio <= 1, f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
                 f"model.betas must be two numbers in [0, 1), got {list(betas)}")
        _require(warmup_steps >= 0, f"model.warmup_steps must be >= 0, got {warmup_steps}")
        self._check_sizes()

        key = "data.tokenizer_path (linked to model.tokenizer_path)"
        self.tokenizer = load_tokenizer(tokenizer_path, key=key)
        check_chat_format(self.tokenizer, key)  # a template that cannot render (or tries to escape its sandbox)
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)  # saved in every checkpoint
        check_system_prompt(system_prompt, "data.system_prompt (linked to model.system_prompt)")
        if llm.vocab_size < len(self.tokenizer):
            llm.resize_vocab(len(self.tokenizer))
        self.media_token_ids = media_token_ids(self.tokenizer)
        self.option_token_ids = option_token_ids(self.tokenizer)  # multiple choice: scored by these logits
        self.choices = MultipleChoiceMetrics()
        self.register_buffer("pixel_mean", torch.tensor(vision.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(vision.image_std).view(1, 3, 1, 1), persistent=False)

        for module, frozen in ((vision, freeze_vision), (downsampler, freeze_projector),
                               (projector, freeze_projector), (llm, freeze_llm)):
            module.requires_grad_(not frozen)
        if llm.weights_pending is not None and (lora_llm is not None or init_from is not None):
            # peft wraps, and init_from overwrites, real weights: read them now, whole (no sharded_load)
            log.info("model.llm.init_args.sharded_load: the LLM is read whole at build, as model.lora_llm or "
                     "model.init_from needs its weights")
            llm.load_pending_weights()
        for component, settings, frozen, key in ((llm, lora_llm, freeze_llm, "llm"),
                                                 (vision, lora_vision, freeze_vision, "vision")):
            if settings is not None:  # its own weights fixed, its adapters trained
                _require(not frozen, f"model.lora_{key} adapts model.{key}, which model.freeze_{key}=true keeps "
                                     "fixed: drop one of the two")
                component.model = add_lora(component.model, settings, f"model.lora_{key}")
        if init_from is not None:
            self._load_init(init_from, init_from_strict)
        self._last_batch_end: float | None = None
        self.evaluated_sources: set[str] = set()
        self._skipped: Counter = Counter()
        self._nonfinite_total = self._nonfinite_streak = 0

    # ---- build-time checks --------------------------------------------------------------------------

    def _check_sizes(self) -> None:
        v, d, p = self.vision, self.downsampler, self.projector
        _require(d.input_dim == v.hidden_size,
                 f"model.downsampler.init_args.input_dim={d.input_dim} must equal the vision width "
                 f"{v.hidden_size} (model.vision)")
        _require(p.input_dim == d.output_dim,
                 f"model.projector.init_args.input_dim={p.input_dim} must equal "
                 f"model.downsampler.init_args.output_dim={d.output_dim}")
        _require(p.output_dim == self.llm.hidden_size,
                 f"model.projector.init_args.output_dim={p.output_dim} must equal the LLM hidden size "
                 f"{self.llm.hidden_size} (model.llm)")
        self.token_grid = d.output_grid(v.grid)
        for training in (True, False):
            frames, grid = 1, self.token_grid
            for i, c in enumerate(self.compressors):
                try:
                    frames, grid = c.output_shape(frames, grid, training)
                except ValueError as exn:
                    raise ConfigError(f"model.compressors[{i}] ({type(c).__name__}): {exn}") from None

    @property
    def visual_token_count(self) -> VisualTokenCount:
        """frames -> visual tokens after compression in training; ``storm-fit`` links it to
        ``data.visual_tokens`` (batching by token budget)."""
        return VisualTokenCount(self.token_grid, tuple(self.compressors))

    def visual_tokens(self, frames: int, training: bool | None = None) -> tuple[int, int]:
        """Visual tokens of a ``frames``-frame clip before and after compression."""
        training = self.training if training is None else training
        t, (h, w) = chain_output_shape(self.compressors, frames, self.token_grid, training)
        return frames * self.token_grid[0] * self.token_grid[1], t * h * w

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        if not isinstance(dm, StormDataModule):
            return
        _require(dm.image_size == self.vision.image_size,
                 f"data.image_size={dm.image_size} must equal the vision backbone's image size {self.vision.image_size} "
                 f"(model.vision.init_args.image_size)")
        pool = math.prod(c.kernel_size for c in self.compressors if isinstance(c, TemporalAveragePool))
        for key, frames in dm.video_frames().items():
            _require(frames >= pool, f"{key}={frames} is fewer frames than the temporal pooling of "
                                     f"{pool} set in model.compressors: use at least {pool}")

    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy`` (``conf/fsdp.yaml``): every vision block, projector layer
        and LLM decoder layer is its own shard unit, then each component's remaining parameters. On CUDA
        the parameters compute in bf16 and gradients are reduced in fp32. Then an LLM built with
        ``sharded_load`` reads its weights, each rank only its own shard (one device: all of them)."""
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            self._shard(mesh)
        strategy = getattr(self._trainer, "strategy", None)
        self.llm.load_pending_weights(strategy.root_device if strategy is not None else self.device)

    def _shard(self, mesh) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(self.llm, FSDPModule):  # configure_model runs once per trainer.fit/test/...
            return

        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.hparams.fsdp_bf16 and self.device.type == "cuda" else MixedPrecisionPolicy())
        for component in (self.vision, self.downsampler, self.projector, self.llm):
            for unit in getattr(component, "shard_units", list)():
                fully_shard(unit, mesh=dp_mesh, mp_policy=policy)
            fully_shard(component, mesh=dp_mesh, mp_policy=policy)

    def _load_init(self, path: str, strict: bool) -> None:
        checkpoint = load_checkpoint_file(path, "model.init_from")
        check_tokenizer(checkpoint, self.tokenizer_fingerprint, self.hparams.tokenizer_path, f"model.init_from='{path}'")
        state = checkpoint.get("state_dict", checkpoint)
        missing, unexpected = load_compatible(self, state)  # with or without LoRA adapters on either side
        if strict and (missing or unexpected):
            raise ConfigError(
                f"model.init_from='{path}' does not fit this model: missing {missing[:5]} "
                f"unexpected {unexpected[:5]} (set model.init_from_strict=false to load what fits)"
            )
        log.info("initialised from %s (%d tensors)", path, len(state))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TOKENIZER_FINGERPRINT] = self.tokenizer_fingerprint

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``--ckpt_path`` of another model or trained with another tokenizer: one line naming what
        differs, before Lightning's load raises (or, for the tokenizer, trains on wrong ids)."""
        check_tokenizer(checkpoint, self.tokenizer_fingerprint, self.hparams.tokenizer_path, "--ckpt_path")
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict) or getattr(self, "device_mesh", None) is not None:
            return  # sharded checkpoints are matched by torch.distributed.checkpoint itself
        own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}
        missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
        shapes = [f"{k} {theirs[k]} vs {own[k]}" for k in sorted(own.keys() & theirs.keys()) if own[k] != theirs[k]]
        if missing or unexpected or shapes:
            raise ConfigError(f"--ckpt_path is a checkpoint of another model than this config's: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shapes {shapes[:3]}")

    # ---- forward ------------------------------------------------------------------------------------

    def encode_media(self, pixel_values: Tensor | None, frames_per_sample: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """uint8 frames (F, 3, S, S) -> one (T' * N', D_llm) tensor per sample with media, in order,
        and a zero-valued scalar that ties any dummy work to the loss (None when there was none).

        Every rank makes the same module calls, so FSDP/DDP collectives match: the projector runs once
        per clip length present on *any* rank (a dummy clip where this rank has none of that length),
        and the vision tower runs on a dummy frame when this rank's batch has no media at all.
        """
        counts = [int(t) for t in frames_per_sample if t > 0]
        lengths = self._clip_lengths_on_all_ranks(counts)
        if not lengths:
            return [], None
        if pixel_values is None:  # another rank has media: run the vision path on one blank frame
            size = self.vision.image_size
            pixel_values = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=frames_per_sample.device)
        x = (pixel_values.to(self.pixel_mean.dtype) / 255.0 - self.pixel_mean) / self.pixel_std
        x = x.to(next(self.vision.parameters()).dtype)
        tokens = self.downsampler(self.vision(x), self.vision.grid)  # (F, N, D_in)
        clips = tokens.split(counts) if counts else ()
        out: list[Tensor | None] = [None] * len(clips)
        zero = None
        for frames in lengths:  # one projector call per clip length
            index = [i for i, t in enumerate(counts) if t == frames]
            batch = (torch.stack([clips[i] for i in index]) if index
                     else tokens[:1].unsqueeze(0).expand(1, frames, *tokens.shape[1:]))  # dummy clip
            x = self.projector(batch)  # (B_T, T, N, D_llm)
            grid = self.token_grid
            for compressor in self.compressors:
                x, grid = compressor(x, grid)
            if not index:
                zero = x.sum() * 0 if zero is None else zero + x.sum() * 0
            for row, i in enumerate(index):
                out[i] = x[row].flatten(0, 1)
        return out, zero

    @staticmethod
    def _clip_lengths_on_all_ranks(counts: list[int]) -> list[int]:
        lengths = set(counts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, sorted(lengths))
                lengths = set().union(*map(set, gathered))
        return sorted(lengths)

    def expand_inputs(self, batch: Batch) -> dict:
        """Each media placeholder widened to as many slots as that sample has visual tokens.

        Returns (right-padded, length L'): ``input_ids`` (pad id in visual slots), ``visual_mask``,
        ``attention_mask``, ``labels`` (-100 on visual slots), ``visual`` (V, D_llm) in row-major slot
        order, and ``zero`` (see ``encode_media``).
        """
        input_ids, labels, mask = batch.input_ids, batch.labels, batch.attention_mask.bool()
        visual, zero = self.encode_media(batch.pixel_values, batch.frames_per_sample)
        lengths = iter([len(v) for v in visual])
        is_media = torch.isin(input_ids, torch.tensor(self.media_token_ids, device=input_ids.device))
        pad = self.tokenizer.pad_token_id
        rows = []
        for i in range(input_ids.shape[0]):
            ids, lab = input_ids[i][mask[i]], labels[i][mask[i]]
            slots = torch.zeros_like(ids, dtype=torch.bool)
            where = is_media[i][mask[i]].nonzero().flatten()
            if int(batch.frames_per_sample[i]) > 0:
                assert len(where) == 1, f"sample {i}: {len(where)} media placeholders for one medium"
                p, n = int(where[0]), next(lengths)
                ids = torch.cat([ids[:p], ids.new_full((n,), pad), ids[p + 1:]])
                lab = torch.cat([lab[:p], lab.new_full((n,), IGNORE_INDEX), lab[p + 1:]])
                slots = torch.cat([slots[:p], slots.new_ones(n), slots[p + 1:]])
            else:
                assert len(where) == 0, f"sample {i}: media placeholder without media"
            rows.append((ids, lab, slots))
        length = max(len(r[0]) for r in rows)
        out = {
            "input_ids": input_ids.new_full((len(rows), length), pad),
            "labels": labels.new_full((len(rows), length), IGNORE_INDEX),
            "visual_mask": torch.zeros(len(rows), length, dtype=torch.bool, device=input_ids.device),
            "attention_mask": torch.zeros(len(rows), length, dtype=torch.long, device=input_ids.device),
        }
        for i, (ids, lab, slots) in enumerate(rows):
            n = len(ids)
            out["input_ids"][i, :n], out["labels"][i, :n], out["visual_mask"][i, :n] = ids, lab, slots
            out["attention_mask"][i, :n] = 1
        out["visual"] = torch.cat(visual) if visual else None
        out["zero"] = zero
        return out

    def build_inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """inputs_embeds (B, L', D), attention_mask (B, L'), labels (B, L'): for generation and profiling."""
        x = self.expand_inputs(batch)
        embeds = self.llm.embed_with_visual(x["input_ids"], x["visual_mask"], x["visual"], x["zero"])
        return embeds, x["attention_mask"], x["labels"]

    def forward(self, batch: Batch) -> dict:
        """loss (over assistant tokens, weighted as ``loss_weighting`` says), sample_loss (B,) (mean per
        sample), token counts, and ``choice_scores`` (B, OPTIONS): option-letter logits (rows without an
        answer: zeros)."""
        x = self.expand_inputs(batch)
        targets = x["labels"][:, 1:]
        keep = targets != IGNORE_INDEX  # the LM head runs only where there is something to predict
        head_mask = F.pad(keep, (0, 1))
        # one call into the LLM module: under FSDP2 its root parameters are gathered for exactly this call
        if self.hparams.pack_sequences and len(keep) > 1:
            _, logits = self.llm(**pack(x, head_mask))
        else:
            _, logits = self.llm(x["input_ids"], x["attention_mask"], x["visual_mask"], x["visual"], x["zero"],
                                 head_mask=head_mask)
        token_loss = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        counts = keep.sum(1).clamp_min(1)
        sample_loss = token_loss.new_zeros(len(keep)).index_add_(0, rows, token_loss.detach()) / counts
        weight = counts[rows].float().pow(-LOSS_WEIGHT_POWER[self.hparams.loss_weighting])
        return {"loss": (token_loss * weight).sum() / weight.sum(), "sample_loss": sample_loss,
                "llm_tokens": int(x["attention_mask"].sum()), "label_tokens": int(keep.sum()),
                "choice_scores": choice_scores(logits, keep, self.option_token_ids)}

    # ---- training -----------------------------------------------------------------------------------

    def _log_visual_tokens(self, batch: Batch, prefix: str) -> None:
        frames = [int(t) for t in batch.frames_per_sample if t > 0]
        if frames:
            counts = [self.visual_tokens(t) for t in frames]
            n = len(counts)
            self.log(f"{prefix}/visual_tokens_before", sum(c[0] for c in counts) / n, batch_size=n)
            self.log(f"{prefix}/visual_tokens_after", sum(c[1] for c in counts) / n, batch_size=n)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        out = self(batch)
        size = len(batch)
        if not self._loss_is_finite(out["loss"]):
            return None  # Lightning skips backward and the update
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        self._log_visual_tokens(batch, "train")
        self._skipped.update(batch.skipped)
        self.log("data/skipped_samples", float(sum(self._skipped.values())), batch_size=size)
        for name, count in self._skipped.items():
            self.log(f"data/skipped_samples/{name}", float(count), batch_size=size)
        self._batch_stats = (size, out["llm_tokens"])
        return out["loss"]

    def _loss_is_finite(self, loss: Tensor) -> bool:
        """Counts non-finite losses; every rank decides alike, so they skip the same steps."""
        finite = torch.isfinite(loss.detach()).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.all_gather(finite).min()
        if bool(finite):
            self._nonfinite_streak = 0
            return True
        self._nonfinite_total += 1
        self._nonfinite_streak += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.global_step, self._nonfinite_streak)
        self.log("train/nonfinite_steps", float(self._nonfinite_total))
        if self._nonfinite_streak >= self.hparams.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss was NaN/inf for {self._nonfinite_streak} steps in a row, the last at step "
                f"{self.global_step} (model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}): stopping. "
                "Lower the learning rates or check the data; resume from the last checkpoint."
            )
        return False

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:  # wall time per step, data loading included
            elapsed = now - self._last_batch_end
            samples, tokens = self._batch_stats
            self.log("perf/samples_per_s", samples / elapsed)
            self.log("perf/tokens_per_s", tokens / elapsed)
        self._last_batch_end = now

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))
        for group in optimizer.param_groups:
            if not group["name"].endswith("_no_decay"):  # same lr as its decayed twin
                self.log(f"lr/{group['name']}", group["lr"])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        self.evaluated_sources.update(batch.sources)
        out = self(batch)
        self.log(f"{stage}/loss", out["loss"], prog_bar=True, batch_size=len(batch))
        self._log_visual_tokens(batch, stage)
        self.choices.update(batch, out["choice_scores"], stage)

    def _log_accuracies(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        for name, value in self.choices.compute(stage, world, self.device).items():
            self.log(name, value, rank_zero_only=True)

    def on_validation_epoch_start(self) -> None:
        self.evaluated_sources: set[str] = set()  # (storm-fit validate/test check each source gave samples)

    def on_test_epoch_start(self) -> None:
        self.evaluated_sources = set()

    def on_validation_epoch_end(self) -> None:
        self._log_accuracies("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracies("test")
        suffix = f"_rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        path = Path(self.trainer.log_dir or self.trainer.default_root_dir) / f"predictions{suffix}.json"
        if count := self.choices.write_predictions(path):
            log.info("wrote %d multiple-choice predictions to %s", count, path)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict]:
        """Per sample: key, source and the mean loss of its assistant tokens."""
        out = self(batch)
        return [{"key": k, "source": s, "loss": float(v)}
                for k, s, v in zip(batch.keys, batch.sources, out["sample_loss"])]

    def configure_optimizers(self):
        hp = self.hparams
        groups = []
        for name, modules, lr in (("vision", [self.vision], hp.lr_vision),
                                  ("projector", [self.downsampler, self.projector], hp.lr_projector),
                                  ("llm", [self.llm], hp.lr_llm)):
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]  # no weight decay on biases, norms, A_log, D
            no_decay = [p for p in params if p.ndim < 2]
            groups += [g for g in ({"name": name, "params": decay, "lr": lr, "weight_decay": hp.weight_decay},
                                   {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
                       if g["params"]]
        if not groups:
            raise ConfigError("every component is frozen (model.freeze_*): nothing to train")
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas))
        total = max(1, int(hp.schedule_steps or self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
