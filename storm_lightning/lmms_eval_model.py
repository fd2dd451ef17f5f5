"""An lmms-eval model for STORM: ``lmms-eval --model storm --model_args checkpoint=PATH,frames=32 --tasks ...``.

Installed with ``pip install -e ".[eval]"``. lmms-eval (>= 0.7) finds it through the ``lmms_eval.models``
entry-point group (``pyproject.toml``), whose payload is a ``ModelManifest``: ``manifest()`` below.

model_args (all but ``checkpoint`` optional):

    checkpoint        a storm-fit ``.ckpt`` (its run's ``config.yaml`` beside it) or a storm-export directory
    config            the run's config.yaml, when it is not found beside the checkpoint
    frames            frames sampled uniformly from each video (default 32)
    fps, max_frames   instead: one frame every 1/fps seconds, at most max_frames (default: frames)
    folder_fps        frame rate of a frame-folder video or of a list of frames (default 1)
    temporal_pool, spatial_pool, temporal_sample
                      replace the checkpoint's compressors, as storm-chat's flags do
    device            cpu, cuda, cuda:1 (default: this rank's GPU if there is one, else cpu)
    dtype             float32, bfloat16 or float16 (default: the checkpoint's)
    max_new_tokens    when a task's generation_kwargs name none (default 64)

A request's visual is a video file, a frame folder, an image file, a list of PIL images (the frames of
one video) or one PIL image (an image). ``generate_until`` answers with storm-chat's generation
(``inference.generate``: ``CausalLM.generate`` with the KV cache, greedy unless the task samples), with
the task's ``until`` strings, ``max_new_tokens`` and ``temperature``/``do_sample``.
``loglikelihood`` scores a continuation by teacher forcing: its tokens as the start of the assistant's
reply, the LM head at those positions only (as ``StormModel.forward`` computes the loss). It returns what
lmms-eval's own models return and its multiple-choice scoring expects (``np.argmin``: lower is better): the
continuation's mean negative log-likelihood per token, not lm-eval's summed log-probability.

Under ``accelerate launch`` / ``torchrun`` each rank loads the model on its own device; lmms-eval gives
each rank its shard of the documents, and this model answers the requests it is given.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from tqdm import tqdm

from storm_lightning.errors import ConfigError, MissingPathError, UserError

MODEL_ID = "storm"


def manifest():
    """The entry point's payload (lmms-eval ``ModelRegistryV2.load_entrypoint_manifests``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.Storm")


def _optional(value, kind, name: str):
    """A model_arg as ``kind``; lmms-eval passes strings, ints and floats ("none" or "" for unset)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--model_args {name}={value!r}: expected {kind.__name__}") from None


def _at_least_one(value, name: str):
    if value is not None and value < 1:
        raise ConfigError(f"--model_args {name} must be >= 1, got {value}")
    return value


def _generation_settings(gen_kwargs: dict, task, default_max_new: int) -> tuple[tuple[str, ...], int, float]:
    """A task's ``generation_kwargs`` -> (stop strings, max new tokens, temperature); a value that would
    fail at every request is a ConfigError naming the task and the key."""
    def bad(key: str, expected: str):
        return ConfigError(f"task {task}: generation_kwargs.{key}={gen_kwargs.get(key)!r}: expected {expected}")

    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) and u for u in until):
        raise bad("until", "a string or a list of non-empty strings")
    max_new = gen_kwargs.get("max_new_tokens") or default_max_new
    if isinstance(max_new, str) and max_new.strip().isdigit():
        max_new = int(max_new)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= 65536:
        raise bad("max_new_tokens", "a whole number in [1, 65536]")
    try:
        temperature = float(gen_kwargs.get("temperature") or 0.0)
    except (TypeError, ValueError):
        raise bad("temperature", "a number >= 0") from None
    if not 0 <= temperature < math.inf:
        raise bad("temperature", "a number >= 0")
    if gen_kwargs.get("do_sample") in (False, "false", "False", 0):  # as transformers: no sampling at all
        temperature = 0.0
    return tuple(until), max_new, temperature


def _distributed() -> tuple[int, int, int, object | None]:
    """(rank, local rank, world size, the Accelerator or None): from ``accelerate launch`` / ``torchrun``'s
    environment; one process without them."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 0, 1, None
    try:
        from accelerate import Accelerator
    except ImportError:  # torch.distributed's own variables
        env = os.environ
        return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]), None
    accelerator = Accelerator()
    return accelerator.process_index, accelerator.local_process_index, accelerator.num_processes, accelerator


class LogLikelihood(tuple, GenerationResult):
    """``(loss, is_greedy)``, what ``lmms.loglikelihood`` returns, that also gets through lmms-eval 0.7.3's
    evaluator: it passes every result through ``unwrap_generation_output``, which keeps a ``str`` or a
    ``GenerationResult``'s ``text`` and turns anything else, a plain tuple included, into its ``str()``, so
    that multiple-choice scoring (``zip(*results)``) fails. As a GenerationResult whose text is the plain
    tuple, the tuple reaches the task."""

    def __new__(cls, loss: float, is_greedy: bool):
        return super().__new__(cls, (float(loss), bool(is_greedy)))

    def __init__(self, loss: float, is_greedy: bool) -> None:  # not GenerationResult's
        self.text, self.token_counts = tuple(self), None

    def __repr__(self) -> str:
        return repr(tuple(self))


class Storm(lmms):
    """STORM in lmms-eval (see the module's docstring for ``model_args``)."""

    is_simple = True

    def __init__(self, checkpoint: str | None = None, config: str | None = None, frames: int = 32,
                 fps: float | None = None, max_frames: int | None = None, folder_fps: float = 1.0,
                 temporal_pool: int | None = None, spatial_pool: int | None = None,
                 temporal_sample: int | None = None, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 64, batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 **unknown) -> None:
        super().__init__()
        from storm_lightning.compressors import SpatialAveragePool, TemporalAveragePool, TemporalSample
        from storm_lightning.data.video import FrameSampling, ReadLimits
        from storm_lightning.inference import load_model, usable_device

        if unknown:
            raise ConfigError(f"--model_args: unknown for storm: {', '.join(sorted(unknown))} (known: checkpoint, "
                              "config, frames, fps, max_frames, folder_fps, temporal_pool, spatial_pool, "
                              "temporal_sample, device, dtype, max_new_tokens)")
        checkpoint = _optional(checkpoint, str, "checkpoint")
        if checkpoint is None:
            raise ConfigError("--model_args checkpoint=PATH is required (a storm-fit .ckpt or a storm-export directory)")
        if not Path(checkpoint).exists():
            raise MissingPathError(f"--model_args checkpoint: no such file or directory '{checkpoint}'")
        if batch_size not in (None, 1, "1", "auto"):
            raise ConfigError(f"--batch_size {batch_size}: storm answers one request at a time, use 1")
        ints = {name: _at_least_one(_optional(value, int, name), name) for name, value in (
            ("frames", frames), ("max_frames", max_frames), ("temporal_pool", temporal_pool),
            ("spatial_pool", spatial_pool), ("temporal_sample", temporal_sample), ("max_new_tokens", max_new_tokens))}
        fps, folder_fps = _optional(fps, float, "fps"), _optional(folder_fps, float, "folder_fps")
        folder_fps = 1.0 if folder_fps is None else folder_fps
        try:
            self.sampling = FrameSampling(frames=ints["frames"] or 32, fps=fps, max_frames=ints["max_frames"])
        except ValueError as exn:
            raise ConfigError(f"--model_args: {exn}") from None
        most, limit = self.sampling.max_frames or self.sampling.frames, ReadLimits().max_frames
        if most > limit:  # refused here, not at every request
            raise ConfigError(f"--model_args: {most} frames a video, over the reader's limit of {limit}")
        if not 1e-3 <= folder_fps <= 1e4:
            raise ConfigError(f"--model_args folder_fps must be in [0.001, 10000], got {folder_fps}")
        self.folder_fps = folder_fps
        self.max_new_tokens = ints["max_new_tokens"] or 64

        self._rank, local_rank, self._world_size, accelerator = _distributed()
        if accelerator is not None:
            self.accelerator = accelerator  # the evaluator gathers request counts through it
        device = _optional(device, str, "device")
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self._world_size > 1:
            device = f"cuda:{local_rank}"
        self._device = usable_device(device, "--model_args device")

        chain = []
        if ints["temporal_pool"]:
            chain.append(TemporalAveragePool(ints["temporal_pool"]))
        if ints["spatial_pool"]:
            chain.append(SpatialAveragePool(ints["spatial_pool"]))
        if ints["temporal_sample"]:
            chain.append(TemporalSample(ints["temporal_sample"]))
        model, _ = load_model(checkpoint, _optional(config, str, "config"), chain or None)  # None: its own chain
        dtype = _optional(dtype, str, "dtype")
        if dtype is not None:
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"--model_args dtype={dtype!r}: expected float32, bfloat16 or float16")
            model = model.to(getattr(torch, dtype))
        self.model = model.to(self._device).eval()
        self.tokenizer = model.tokenizer
        self._pixels_of: tuple | None = None  # (doc key, frames): a document's options share its video

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    # ---- media ------------------------------------------------------------------------------------

    def _visual(self, doc_to_visual, doc_id, task, split) -> torch.Tensor | None:
        """(T, 3, S, S) uint8 frames of a request's visual (one video or image), or None; the last
        document's frames are kept, so the options of a multiple-choice question read its video once."""
        if doc_to_visual is None or task is None:
            return None
        key = (task, split, doc_id)
        if self._pixels_of is not None and self._pixels_of[0] == key:
            return self._pixels_of[1]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        pixels = self.media(visuals, where=f"{task}/{split}/{doc_id}")
        self._pixels_of = (key, pixels)
        return pixels

    def media(self, visuals, where: str = "request") -> torch.Tensor | None:
        """One video (a path, a frame folder, a list of PIL images) or one image -> (T, 3, S, S) uint8."""
        from PIL import Image

        from storm_lightning.data.media import IMAGE_EXTS, decode_image
        from storm_lightning.data.video import VideoReadError, read_path

        size = self.model.vision.image_size
        if visuals is None:
            return None
        items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        items = [v for v in items if v is not None]
        if not items:
            return None
        if all(isinstance(v, Image.Image) for v in items):
            try:
                return self._image_frames(items)
            except (VideoReadError, ValueError) as exn:  # over a read limit, unreadable
                raise UserError(f"{where}: cannot read its {len(items)} PIL image(s): "
                                f"{' '.join(str(exn).split())}") from None
        if len(items) != 1 or not isinstance(items[0], (str, os.PathLike)):
            kinds = ", ".join(sorted({type(v).__name__ for v in items}))
            raise UserError(f"{where}: storm takes one video, frame folder or image per question (or a list of "
                            f"PIL images as the frames of one video), got {len(items)} visuals ({kinds})")
        path = str(items[0])
        if not os.path.exists(path):
            raise MissingPathError(f"{where}: no such video or image '{path}' (lmms-eval's own tasks download "
                                   "their media: offline, point the task at local copies)")
        try:
            if os.path.isfile(path) and path.rpartition(".")[2].lower() in IMAGE_EXTS:
                return decode_image(path, size)
            return read_path(path, self.sampling, size, folder_fps=self.folder_fps).frames
        except (VideoReadError, OSError, ValueError) as exn:  # the user's file: one line
            raise UserError(f"{where}: cannot read '{path}': {' '.join(str(exn).split())}") from None

    def _image_frames(self, images: list) -> torch.Tensor:
        """One PIL image: an image (as an image file is read); several: the frames of one video at
        ``folder_fps``, sampled, checked and resized as a frame folder's are (``video.read_frame_folder``)."""
        from storm_lightning.data.media import resize_frames, to_rgb
        from storm_lightning.data.video import ReadLimits, VideoTooLarge, read_frame_folder

        size, limit = self.model.vision.image_size, ReadLimits().max_frame_pixels
        if len(images) > 1:
            return read_frame_folder(images, self.sampling, size, fps=self.folder_fps).frames
        if images[0].width * images[0].height > limit:
            raise VideoTooLarge(f"{images[0].width}x{images[0].height} image, over the limit of {limit} pixels")
        return resize_frames(to_rgb(images[0])[None], size)

    @staticmethod
    def _prompt(context) -> str:
        """The task's text as the user turn (``media_batch`` places the medium's placeholder)."""
        return context[0] if isinstance(context, list) else context

    # ---- the lmms interface -----------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from storm_lightning.inference import generate

        answers = []
        for request in tqdm(requests, disable=self.rank != 0, desc="storm generate_until"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until, max_new, temperature = _generation_settings(gen_kwargs, task, self.max_new_tokens)
            pixels = self._visual(doc_to_visual, doc_id, task, split)
            text = generate(self.model, self._prompt(context), pixels, max_new_tokens=max_new,
                            temperature=temperature, until=until)  # storm-chat's generation
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers

    def loglikelihood(self, requests) -> list[LogLikelihood]:
        from storm_lightning.data.batching import Batch
        from storm_lightning.inference import media_batch
        from storm_lightning.tokenizer import IGNORE_INDEX

        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="storm loglikelihood"):
            args = tuple(request.args) + (None,) * (6 - len(request.args))  # ("", choice): no document
            context, continuation, doc_to_visual, doc_id, task, split = args
            if not isinstance(continuation, str):  # loglikelihood tasks pass doc_to_target
                continuation = str(continuation(self.task_dict[task][split][doc_id]))
            # the continuation starts the assistant's reply: lmms-eval's target_delimiter (" ") is not part of it
            continuation = continuation.lstrip()
            pixels = self._visual(doc_to_visual, doc_id, task, split)
            prompt = media_batch(self.model, self._prompt(context), pixels)
            target = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not target:
                results.append(LogLikelihood(0.0, True))
                continue
            ids = torch.cat([prompt.input_ids, torch.tensor([target])], dim=1)
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[0, -len(target):] = torch.tensor(target)
            batch = Batch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                          frames_per_sample=prompt.frames_per_sample, pixel_values=pixels).to(self._device)
            with torch.no_grad():
                x = self.model.expand_inputs(batch)
                targets = x["labels"][:, 1:]
                keep = targets != IGNORE_INDEX  # the LM head runs on the continuation's positions only
                _, logits = self.model.llm(x["input_ids"], x["attention_mask"], x["visual_mask"], x["visual"],
                                           x["zero"], head_mask=F.pad(keep, (0, 1)))
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                wanted = targets[keep]
                loss = -float(logprobs.gather(1, wanted[:, None]).mean())  # lmms-eval's models: the mean NLL
                greedy = bool((logprobs.argmax(-1) == wanted).all())
            results.append(LogLikelihood(loss, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (loss, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("storm does not answer multi-round tasks (generate_until_multi_round): "
                                  "use generate_until or multiple-choice tasks")
