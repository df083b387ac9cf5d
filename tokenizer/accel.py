"""How a device is driven: the GPU path's switches in one place, each of which also runs on CPU.

On CUDA: channels_last convolutions, bf16 autocast for the encoder and decoder (fp16 with a
gradient scaler on GPUs without bf16; the quantizer's distances and losses stay fp32 either
way), batches in pinned memory copied without blocking, and loading one or two batches ahead
in a background thread so the GPU does not wait for the next batch. On CPU the defaults keep
everything off (fp32, plain layout, inline loading); tests and benchmarks switch each one on
explicitly to run the GPU path's code on CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .heap import keep_freed_memory

#: Batch sizes tried by ``fit_batch_size`` never exceed this.
MAX_AUTO_BATCH = 8192
CPU_WORKER_NICE = 10  # see Accel.worker_nice


@dataclass(frozen=True)
class Accel:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype for encoder/decoder; None = fp32
    channels_last: bool = False
    pin_memory: bool = False
    prefetch: int = 0  # batches loaded ahead by a background thread
    #: How far below this process DataLoader workers run. On CPU they share the cores with
    #: the model's threads: at equal priority a decoding worker preempts one of them and the
    #: others wait for it, while a niced one decodes in the gaps (encoding MNIST PNG tar
    #: shards with 2 workers on 2 cores: 0.86-0.89x of a bare loop at nice 0, 0.87-1.07x at
    #: 10, side by side). On CUDA the workers feed an idle CPU and keep full priority.
    worker_nice: int = 0

    @classmethod
    def for_device(cls, device: torch.device | str, amp: bool = True) -> Accel:
        """The defaults: everything on for CUDA, everything off elsewhere."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device, worker_nice=CPU_WORKER_NICE)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cls(device, dtype if amp else None, channels_last=True, pin_memory=True,
                   prefetch=2)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (and to channels_last when asked), in place; from
        here on the process keeps freed host memory for the next step (``heap``)."""
        keep_freed_memory()
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch on the device in the model's layout; non-blocking from pinned memory."""
        non_blocking = self.pin_memory and self.device.type == "cuda"
        return images.to(self.device, non_blocking=non_blocking,
                         memory_format=self.memory_format)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, needed for fp16 only (bf16 has fp32's range); disabled otherwise."""
        return torch.amp.GradScaler(self.device.type,
                                    enabled=self.amp_dtype == torch.float16)


def fit_batch_size(per_image_bytes: int, free_bytes: int, fraction: float = 0.5,
                   cap: int = MAX_AUTO_BATCH) -> int:
    """Largest power of two whose working memory fits in ``fraction`` of the free memory."""
    if per_image_bytes <= 0:
        return cap
    fits = int(free_bytes * fraction // per_image_bytes)
    batch = 1
    while batch * 2 <= min(fits, cap):
        batch *= 2
    return batch


@torch.no_grad()
def encode_batch_size(model: nn.Module, image_shape: tuple[int, int, int], accel: Accel,
                      default: int) -> int:
    """A batch size for ``model.encode`` that fits this GPU: measured on a probe batch.

    Off CUDA there is no memory to fit and ``default`` is returned.
    """
    if accel.device.type != "cuda":
        return default
    probe = 16
    torch.cuda.synchronize(accel.device)
    torch.cuda.reset_peak_memory_stats(accel.device)
    base = torch.cuda.memory_allocated(accel.device)
    x = accel.to_device(torch.zeros(probe, *image_shape))
    with accel.autocast():
        model.encode(x)  # type: ignore[operator]
    torch.cuda.synchronize(accel.device)
    per_image = (torch.cuda.max_memory_allocated(accel.device) - base) // probe
    free, _ = torch.cuda.mem_get_info(accel.device)
    return fit_batch_size(int(per_image), int(free))
