"""NVIDIA DALI pipelines for image data sets (imported lazily: DALI is optional).

Training pipeline: file bytes come from an `external_source` fed by fastdg's own samplers (so
domain streams, seed categories, sharding and checkpointed positions are all decided in
torch), then DALI decodes ("mixed" = nvJPEG on the GPU when the target device is CUDA, CPU
otherwise) and augments as DomainBed does (METHODS.md section 9):

    RandomResizedCrop(224, scale 0.7-1, ratio 3/4-4/3) -> horizontal flip p=0.5
    -> ColorJitter(0.3, 0.3, 0.3, 0.3) -> RandomGrayscale(0.1) -> ImageNet normalisation

Differences from torchvision, all deliberate and small: the jitter is one `color_twist` (fixed
order, not a random permutation); DALI's contrast pivots on mid-grey instead of the image mean;
hue is in degrees (torchvision's hue 0.3 of a turn = +-108 degrees); grayscale is saturation 0
in YIQ space, i.e. the same luma weights (0.299, 0.587, 0.114) torchvision uses.

Evaluation pipeline: `readers.file` over the explicit file list with sharding, resize to
224 x 224, normalise; padded last batches are trimmed by the caller so each sample is seen
exactly once. Both return float32 NHWC batches; the loaders view them as channels_last NCHW.
"""
from __future__ import annotations

import functools

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def dali_status() -> tuple[bool, str]:
    """(True, version) when nvidia.dali imports, else (False, why not)."""
    try:
        import nvidia.dali as dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return False, f"nvidia.dali is not usable: {type(e).__name__}: {e}"
    return True, getattr(dali, "__version__", "?")


def _normalise(images, mirror):
    from nvidia.dali import fn, types
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255.0 * m for m in MEAN], std=[255.0 * s for s in STD])


def _augment(images, train: bool, size: int):
    from nvidia.dali import fn
    if not train:
        return _normalise(fn.resize(images, resize_x=size, resize_y=size), 0)
    images = fn.random_resized_crop(images, size=[size, size], random_area=[0.7, 1.0],
                                    random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0])
    keep_colour = fn.random.coin_flip(probability=0.9)  # 0 -> grayscale (RandomGrayscale p=0.1)
    images = fn.color_twist(images,
                            brightness=fn.random.uniform(range=[0.7, 1.3]),
                            contrast=fn.random.uniform(range=[0.7, 1.3]),
                            saturation=fn.random.uniform(range=[0.7, 1.3]) * keep_colour,
                            hue=fn.random.uniform(range=[-108.0, 108.0]))
    return _normalise(images, fn.random.coin_flip(probability=0.5))


def train_pipeline(source, max_batch_size: int, num_threads: int, device_id, seed: int,
                   train: bool = True, size: int = 224):
    """A built pipeline whose only input is `source()` -> list of uint8 numpy arrays (encoded
    files, at most max_batch_size); output 0: float32 (n, size, size, 3). device_id=None runs
    everything on the CPU; an int decodes with "mixed" and augments on that GPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed % (2 ** 31), prefetch_queue_depth=2)
    def pipe():
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, name="files")
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return _augment(images, train, size)

    p = pipe()
    p.build()
    return p


def eval_pipeline(paths: list, batch_size: int, num_threads: int, device_id, shard_id: int = 0,
                  num_shards: int = 1, size: int = 224):
    """A built reader pipeline over `paths` (this shard: positions floor(n*s/k) .. floor(n*(s+1)/k)-1,
    in order). Outputs: float32 (b, size, size, 3), int32 (b, 1) positions in `paths`. Each pass
    over the shard is ceil(shard size / batch_size) batches; the last is padded with its final
    sample (pad_last_batch) and must be trimmed by the caller."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)
    def pipe():
        encoded, pos = fn.readers.file(files=list(paths), labels=list(range(len(paths))), name="Reader",
                                       shard_id=shard_id, num_shards=num_shards, pad_last_batch=True,
                                       stick_to_shard=True, random_shuffle=False)
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        return _augment(images, False, size), pos

    p = pipe()
    p.build()
    return p


def to_torch(tensor_list, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """Copy a DALI TensorList (uniform shape) into a new torch tensor on `device`. The copy is
    needed: DALI reuses its output buffers on the next run."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    t = tensor_list.as_tensor()
    shape = list(t.shape())
    on_gpu = type(tensor_list).__name__.endswith("GPU")
    if on_gpu:
        out = torch.empty(shape, dtype=dtype, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    out = torch.empty(shape, dtype=dtype)
    feed_ndarray(t, out)
    return out if device.type == "cpu" else out.to(device, non_blocking=False)


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The contiguous positions DALI's readers give shard `shard_id` of `num_shards`."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards
