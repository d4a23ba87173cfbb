"""Image data sets and loaders: folder scanning and its errors, DALI (CPU mode) and the torch
DataLoader fallback (torchvision and plain-PIL transforms), on synthetic folders written to
tmp and on a few hundred PACS images from the shared data dir."""
import os

import numpy as np
import pytest
import torch

import fastdg.data.loaders as loaders
from fastdg.data import (DatasetNotFoundError, DomainStreams, EvalLoader, ImageFolderDataset, dali_status,
                         default_data_dir, get_dataset)
from fastdg.data.dali import MEAN, STD

HAS_DALI = dali_status()[0]
BACKENDS = [pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason=f"{dali_status()[1]}")), "torch"]


def _pacs_dir():
    d = default_data_dir()
    return d if d and os.path.isdir(os.path.join(d, "PACS")) else None


needs_pacs = pytest.mark.skipif(_pacs_dir() is None, reason="PACS not found (set FASTDG_DATA or place the data in "
                                                            "<repo>/../shared/data)")


def _write_image(path, rng, size):
    from PIL import Image
    a = (rng.random((size[1], size[0], 3)) * 200 + 30).astype(np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture
def folder(tmp_path):
    """2 domains x 3 classes x 4 images (JPEG and PNG, odd sizes)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "toy"
    for d in ["dom_b", "dom_a"]:
        for ci, c in enumerate(["cat", "ant", "bee"]):
            os.makedirs(root / d / c)
            for k in range(4):
                ext = "png" if k == 3 else "jpg"
                _write_image(root / d / c / f"{k}.{ext}", rng, (37 + 5 * k, 41 + ci))
    return root


# ------------------------------------------------------------------ scanning

def test_scan_folder(folder):
    ds = get_dataset("ImageFolder", data_dir=str(folder))
    assert ds.is_image and ds.environments == ["dom_a", "dom_b"] and ds.classes == ["ant", "bee", "cat"]
    assert ds.num_classes == 3 and ds.input_shape == (3, 224, 224) and len(ds) == 2 and ds.skipped == []
    env = ds[1]
    assert len(env) == 12 and env.y.dtype == torch.int64
    assert [ds.classes[y] for y in env.y.tolist()] == [os.path.basename(os.path.dirname(p)) for p in env.paths]


def test_folder_errors(folder, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataset(None, root=str(tmp_path / "absent"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no domain sub-folders"):
        ImageFolderDataset(None, root=str(tmp_path / "empty"))
    for c in ["ant", "bee", "cat"]:
        os.makedirs(folder / "dom_c" / c)
        if c != "ant":
            for f in os.listdir(folder / "dom_a" / c):
                os.symlink(folder / "dom_a" / c / f, folder / "dom_c" / c / f)
    with pytest.raises(ValueError, match=r"class folder .*dom_c.*ant.* holds no readable image"):
        ImageFolderDataset(None, root=str(folder))
    os.rmdir(folder / "dom_c" / "ant")
    with pytest.raises(ValueError, match=r"domain 'dom_c' .* lacks the class folder\(s\) \['ant'\]"):
        ImageFolderDataset(None, root=str(folder))
    with pytest.raises(DatasetNotFoundError, match="PACS not found"):
        get_dataset("PACS", data_dir=str(tmp_path))


def test_registered_set_requires_its_domains(folder):
    cls = type("Toy", (ImageFolderDataset,), {"NAME": "Toy", "DIRS": ("toy",), "ENV_FOLDERS": ["dom_a", "dom_x"]})
    with pytest.raises(DatasetNotFoundError, match=r"lacks the domain folder\(s\) \['dom_x'\]"):
        cls(str(folder.parent))


def test_bad_files_are_counted_and_skipped(folder):
    (folder / "dom_a" / "ant" / "garbage.jpg").write_bytes(b"this is not an image at all")
    (folder / "dom_a" / "bee" / "empty.png").write_bytes(b"")
    (folder / "dom_b" / "cat" / "notes.txt").write_text("hello")
    with pytest.warns(RuntimeWarning, match="left out 3 file"):
        ds = ImageFolderDataset(None, root=str(folder))
    assert len(ds.skipped) == 3 and len(ds[0]) == 12 and len(ds[1]) == 12
    reasons = dict((os.path.basename(p), r) for p, r in ds.skipped)
    assert "magic" in reasons["garbage.jpg"] and reasons["empty.png"] == "empty file"


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_image_raises_naming_the_file(folder, backend):
    good = folder / "dom_a" / "ant" / "0.jpg"
    bad = folder / "dom_a" / "ant" / "9_trunc.jpg"
    bad.write_bytes(good.read_bytes()[:300])  # valid JPEG header, truncated body
    ds = ImageFolderDataset(None, root=str(folder))
    k = ds[0].paths.index(str(bad))
    sub = torch.tensor([k, k + 1])
    st = DomainStreams(ds, [0], 2, "cpu", subsets=[sub], backend=backend, num_workers=0)
    with pytest.raises(RuntimeError, match="9_trunc.jpg"):
        next(st)
    with pytest.raises(RuntimeError, match="9_trunc.jpg"):
        list(EvalLoader(ds, 0, 4, "cpu", subset=sub, backend=backend, num_workers=0))


# ------------------------------------------------------------------ loaders, both backends

@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_images(folder, backend):
    ds = ImageFolderDataset(None, root=str(folder))
    st = DomainStreams(ds, [0, 1], 3, "cpu", seed=1, backend=backend, num_workers=1, return_index=True)
    assert st.backend == backend
    for _ in range(2):
        for k, (x, y, idx) in enumerate(next(st)):
            assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
            assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
            assert torch.equal(y, ds[k].y[idx])
            # normalised pixels of a [0, 1] image lie in [-mean/std, (1-mean)/std]
            assert x.min() >= min(-m / s for m, s in zip(MEAN, STD)) - 1e-4
            assert x.max() <= max((1 - m) / s for m, s in zip(MEAN, STD)) + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_categories_and_resume(folder, backend):
    ds = ImageFolderDataset(None, root=str(folder))
    st = DomainStreams(ds, [0, 1], 2, "cpu", seed=3, backend=backend, num_workers=1, per_category=2,
                       return_index=True)
    ids = torch.arange(24) % 4
    st.set_categories(ids)
    for _ in range(2):
        batches = next(st)
        assert len(batches) == 4
        for c, (x, y, idx) in enumerate(batches):
            assert x.shape == (2, 3, 224, 224) and torch.all(ids[idx] == c)
            assert torch.equal(y, torch.cat([ds[0].y, ds[1].y])[idx])
    st.set_categories(torch.arange(24) // 8)  # 3 categories from the very next batch on
    assert [torch.all(idx // 8 == c).item() for c, (_, _, idx) in enumerate(next(st))] == [True] * 3
    state = st.state_dict()
    ref = [torch.cat([b[2] for b in next(st)]) for _ in range(3)]
    st2 = DomainStreams(ds, [0, 1], 2, "cpu", seed=0, backend=backend, num_workers=0, per_category=2,
                        return_index=True)
    st2.load_state_dict(state)
    assert all(torch.equal(r, torch.cat([b[2] for b in next(st2)])) for r in ref)
    st.load_state_dict(state)  # rewinding a running stream drops what it had prefetched
    assert all(torch.equal(r, torch.cat([b[2] for b in next(st)])) for r in ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_every_sample_once(folder, backend):
    ds = ImageFolderDataset(None, root=str(folder))
    sub = torch.tensor([11, 0, 3, 5, 7, 2, 9])
    for shards in (1, 2):
        parts = []
        for r in range(shards):
            ev = EvalLoader(ds, 1, 3, "cpu", subset=sub, backend=backend, num_workers=1, return_index=True,
                            shard_id=r, num_shards=shards)
            for _ in range(2):  # a second pass starts again at the beginning
                got = [(x, y, i) for x, y, i in ev]
                assert len(got) == len(ev)
                idx = torch.cat([i for _, _, i in got])
                assert torch.equal(torch.cat([y for _, y, _ in got]), ds[1].y[sub][idx])
                assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _, _ in got)
            parts.append(idx)
        assert torch.equal(torch.cat(parts), torch.arange(sub.numel()))
    ev = EvalLoader(ds, 1, 3, "cpu", backend=backend, num_workers=0, return_index=True)
    next(iter(ev))  # an abandoned pass must not shift the next one
    assert torch.equal(torch.cat([i for _, _, i in ev]), torch.arange(12))


def test_eval_outputs_agree_across_backends(folder):
    ds = ImageFolderDataset(None, root=str(folder))
    outs = {}
    for name, kw in [("torchvision", dict(backend="torch", transforms="torchvision")),
                     ("pil", dict(backend="torch", transforms="pil"))] + \
                    ([("dali", dict(backend="dali"))] if HAS_DALI else []):
        if name == "torchvision":
            pytest.importorskip("torchvision")
        outs[name] = torch.cat([x for x, _ in EvalLoader(ds, 0, 5, "cpu", num_workers=0, **kw)])
    ref = outs.pop("pil")
    for name, x in outs.items():
        # resizers differ in their filters (antialiasing); on noise images the mean difference stays small
        assert (x - ref).abs().mean() < 0.15, name


def test_pil_train_transform_without_torchvision(folder):
    ds = ImageFolderDataset(None, root=str(folder))
    st = DomainStreams(ds, [0], 4, "cpu", backend="torch", transforms="pil", num_workers=0)
    x, y = next(st)[0]
    assert st.transform_impl == "pil" and x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()


def test_falls_back_to_torch_without_dali(folder, monkeypatch):
    monkeypatch.setattr(loaders, "dali_status", lambda: (False, "nvidia.dali is not usable: test"))
    monkeypatch.delenv("FASTDG_DATA_BACKEND", raising=False)
    ds = ImageFolderDataset(None, root=str(folder))
    with pytest.warns(RuntimeWarning, match="DataLoader"):
        st = DomainStreams(ds, [0], 2, "cpu", num_workers=0)
    assert st.backend == "torch" and next(st)[0][0].shape == (2, 3, 224, 224)
    with pytest.raises(RuntimeError, match="backend='dali' requested"):
        DomainStreams(ds, [0], 2, "cpu", backend="dali")
    with pytest.raises(ValueError, match="backend must be one of"):
        DomainStreams(ds, [0], 2, "cpu", backend="opencv")


# ------------------------------------------------------------------ PACS

@pytest.fixture(scope="module")
def pacs():
    if _pacs_dir() is None:
        pytest.skip("PACS not found")
    return get_dataset("PACS", data_dir=_pacs_dir())


@needs_pacs
def test_pacs_layout(pacs):
    assert pacs.environments == ["art_painting", "cartoon", "photo", "sketch"]
    assert [len(e) for e in pacs.datasets] == [2048, 2344, 1670, 3929] and pacs.num_classes == 7
    assert pacs.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    for env in pacs.datasets:
        assert env.y.bincount().numel() == 7
        assert all(pacs.classes[y] == p.split(os.sep)[-2] for p, y in zip(env.paths[::97], env.y[::97].tolist()))


@needs_pacs
@pytest.mark.parametrize("backend", BACKENDS)
def test_pacs_streams_and_eval(pacs, backend):
    g = torch.Generator().manual_seed(0)
    subs = [torch.randperm(len(pacs[e]), generator=g)[:40] for e in (0, 1, 3)]
    st = DomainStreams(pacs, [0, 1, 3], 4, "cpu", subsets=subs, backend=backend, num_workers=2, return_index=True)
    for _ in range(2):
        for k, (x, y, idx) in enumerate(next(st)):
            assert x.shape == (4, 3, 224, 224) and torch.isfinite(x).all()
            assert torch.equal(y, pacs[(0, 1, 3)[k]].y[subs[k][idx]])
            assert x.std() > 0.1  # real image content, not a blank
    sub = torch.randperm(len(pacs[2]), generator=g)[:60]
    ev = EvalLoader(pacs, 2, 16, "cpu", subset=sub, backend=backend, num_workers=2, return_index=True)
    seen = torch.cat([i for _, _, i in ev])
    assert torch.equal(seen, torch.arange(60))


@pytest.mark.gpu
def test_pacs_dali_gpu(pacs):
    if not torch.cuda.is_available() or not HAS_DALI:
        pytest.skip("needs a CUDA device and DALI")
    st = DomainStreams(pacs, [0, 1], 8, "cuda", subsets=[torch.arange(64)] * 2, backend="dali")
    x, y = next(st)[0]
    assert x.is_cuda and y.is_cuda and x.shape == (8, 3, 224, 224)
    xs = torch.cat([x for x, _ in EvalLoader(pacs, 2, 16, "cuda", subset=torch.arange(40), backend="dali")])
    ref = torch.cat([x for x, _ in EvalLoader(pacs, 2, 16, "cpu", subset=torch.arange(40), backend="dali")])
    assert (xs.cpu() - ref).abs().mean() < 0.05  # nvJPEG vs libjpeg-turbo: rounding-level differences


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_images_match_their_indices(folder, backend):
    """With train=False the transform is deterministic, so each streamed image must equal the
    evaluation image of the index reported with it (also across a category swap, which drops
    prefetched batches): guards the pairing of prefetched data with its sampled indices."""
    ds = ImageFolderDataset(None, root=str(folder))
    ref = torch.cat([torch.cat([x for x, _ in EvalLoader(ds, e, 5, "cpu", backend=backend, num_workers=0)])
                     for e in (0, 1)])
    st = DomainStreams(ds, [0, 1], 3, "cpu", train=False, backend=backend, num_workers=2, per_category=3,
                       return_index=True)
    for step in range(6):
        if step == 2:
            st.set_categories(torch.arange(24) % 3)
        for x, _, idx in next(st):
            assert torch.allclose(x, ref[idx], atol=1e-5), (step, idx)


# ------------------------------------------------------------------ training augmentation, statistically

AUG_SIZE, AUG_CELL = 128, 8


@pytest.fixture
def structured(tmp_path):
    """One domain, two single-image classes: 'board', a grey checkerboard of 8-px cells (colour
    jitter cannot move its edges: brightness and contrast are monotone on grey, saturation and
    hue leave grey alone), and 'colour', bright red on the left half, dark grey on the right."""
    from PIL import Image
    root = tmp_path / "aug"
    os.makedirs(root / "d" / "board")
    os.makedirs(root / "d" / "colour")
    yy, xx = np.mgrid[:AUG_SIZE, :AUG_SIZE]
    board = (((yy // AUG_CELL) + (xx // AUG_CELL)) % 2 * 200 + 28).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(root / "d" / "board" / "b.png")
    col = np.full((AUG_SIZE, AUG_SIZE, 3), 25, np.uint8)
    col[:, :AUG_SIZE // 2] = (235, 50, 40)
    Image.fromarray(col).save(root / "d" / "colour" / "c.png")
    return ImageFolderDataset(None, root=str(root))


def _draw(ds, backend, transforms, cls, n, B=32):
    st = DomainStreams(ds, [0], B, "cpu", subsets=[torch.tensor([cls])], seed=1, backend=backend,
                       num_workers=1 if backend == "dali" else 0, image_size=64, transforms=transforms)
    return torch.cat([next(st)[0][0] for _ in range(n // B)])


def _unnormalise(x):
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _crop_sides(x):
    """Crop width and height as fractions of the image, from the checkerboard: edges counted
    along the 8 middle rows and columns (median), one edge per cell, so +-1/16 each."""
    lum = _unnormalise(x).mean(1)
    h, w = lum.shape[1:]

    def cells(lines):
        c = lines - lines.mean(-1, keepdim=True)
        return ((c[..., 1:] > 0) != (c[..., :-1] > 0)).sum(-1).float().median(-1).values + 1

    rows, cols = lum[:, h // 2 - 4:h // 2 + 4], lum[:, :, w // 2 - 4:w // 2 + 4].transpose(1, 2)
    return cells(rows) * AUG_CELL / AUG_SIZE, cells(cols) * AUG_CELL / AUG_SIZE


@pytest.mark.parametrize("backend,transforms", [pytest.param("dali", "auto", marks=BACKENDS[0].marks),
                                                ("torch", "torchvision"), ("torch", "pil")])
def test_train_augmentation_statistics(structured, backend, transforms):
    """DomainBed's training augmentation, measured on its outputs: grayscale in ~10% of the
    samples and horizontal flips in ~50% (binomial, +-4 sd), crops of 0.7-1 of the area (the
    checkerboard's cell count, with its +-1 cell of resolution), normalised channels_last."""
    if transforms == "torchvision":
        pytest.importorskip("torchvision")
    torch.manual_seed(0)
    n = 320
    x = _draw(structured, backend, transforms, 1, n)
    assert x.shape == (n, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    img = _unnormalise(x)
    assert img.min() >= -1e-4 and img.max() <= 1 + 1e-4  # ImageNet-normalised [0, 1] pixels
    spread = (img.max(1).values - img.min(1).values).flatten(1).max(1).values
    gray = spread < 0.03
    assert bool((spread[~gray] > 0.2).all())  # coloured and grey outputs are far apart
    lum = img.mean(1)
    flipped = lum[..., :32].mean((1, 2)) < lum[..., 32:].mean((1, 2))
    for got, p in ((int(gray.sum()), 0.1), (int(flipped.sum()), 0.5)):
        sd = (n * p * (1 - p)) ** 0.5
        assert abs(got - n * p) <= 4 * sd, (got, p)
    wf, hf = _crop_sides(_draw(structured, backend, transforms, 0, 160))
    area = wf * hf
    assert bool((area >= 0.7 - 0.13).all()) and bool((area <= 1.0).all())
    assert 0.8 <= float(area.mean()) <= 0.95 and float(area.std()) > 0.03  # random, 0.7-1, not fixed
    assert float(torch.minimum(wf, hf).min()) >= (0.7 * 0.75) ** 0.5 - 1 / 16  # aspect ratio 3/4-4/3


# ------------------------------------------------------------------ GIF, unreadable files

def _write_gif(path, seed=0):
    from PIL import Image
    a = (np.random.default_rng(seed).random((30, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(a).save(path)


@pytest.mark.skipif(not HAS_DALI, reason=f"{dali_status()[1]}")
def test_dali_cannot_decode_gif(tmp_path):
    """Why the loaders keep GIF away from DALI (if a DALI release learns GIF, this fails and the
    restriction in choose_backend can go)."""
    from nvidia.dali import fn, pipeline_def, types
    p = tmp_path / "t.gif"
    _write_gif(p)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(source=lambda: [np.fromfile(p, dtype=np.uint8)], batch=True, dtype=types.UINT8,
                                 ndim=1)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    pp = pipe()
    pp.build()
    with pytest.raises(RuntimeError):
        pp.run()


def test_gif_files_load_without_dali(folder, monkeypatch):
    """GIF files are kept and listed; "auto" loads them with the torch backend (warning, naming
    them), backend="dali" refuses them with the names, a subset without GIF still uses DALI."""
    gif = folder / "dom_a" / "bee" / "anim.gif"
    _write_gif(gif, 1)
    monkeypatch.delenv("FASTDG_DATA_BACKEND", raising=False)
    ds = ImageFolderDataset(None, root=str(folder))
    assert ds[0].gif == [str(gif)] and ds[1].gif == [] and str(gif) in ds[0].paths
    k = ds[0].paths.index(str(gif))
    sub = torch.tensor([k, 0])
    if HAS_DALI:
        with pytest.warns(RuntimeWarning, match=r"GIF .*anim\.gif"):
            st = DomainStreams(ds, [0], 2, "cpu", subsets=[sub], num_workers=0)
        with pytest.warns(RuntimeWarning, match=r"GIF .*anim\.gif"):
            ev = EvalLoader(ds, 0, 4, "cpu", subset=sub, num_workers=0)
        with pytest.raises(ValueError, match=r"backend='dali'.*GIF.*anim\.gif"):
            DomainStreams(ds, [0], 2, "cpu", subsets=[sub], backend="dali")
        with pytest.raises(ValueError, match=r"backend='dali'.*GIF.*anim\.gif"):
            EvalLoader(ds, 0, 4, "cpu", subset=sub, backend="dali")
        assert DomainStreams(ds, [0], 2, "cpu", subsets=[torch.tensor([0, 1])], num_workers=0).backend == "dali"
        assert EvalLoader(ds, 1, 4, "cpu", num_workers=0).backend == "dali"
    else:
        st = DomainStreams(ds, [0], 2, "cpu", subsets=[sub], backend="torch", num_workers=0)
        ev = EvalLoader(ds, 0, 4, "cpu", subset=sub, backend="torch", num_workers=0)
    assert st.backend == "torch" and ev.backend == "torch"
    x, y = next(st)[0]
    assert x.shape == (2, 3, 224, 224) and torch.isfinite(x).all()
    (xe, ye), = list(ev)
    assert xe.shape == (2, 3, 224, 224) and torch.equal(ye, ds[0].y[sub])


def test_unreadable_files_are_skipped(folder, monkeypatch):
    """Files that cannot be read at scan time (a dangling symlink; a read refused with an OSError,
    faked here since tests run as root and permission bits do not stop root) are left out,
    counted and reported; folders named like images are passed over."""
    import fastdg.data.images as images
    os.symlink(folder / "nowhere.jpg", folder / "dom_a" / "ant" / "gone.jpg")
    os.makedirs(folder / "dom_a" / "cat" / "folder.png")
    locked = str(folder / "dom_b" / "bee" / "1.jpg")
    real_open = open

    def guarded_open(path, *a, **kw):
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(images, "open", guarded_open, raising=False)
    with pytest.warns(RuntimeWarning, match="left out 2 file"):
        ds = ImageFolderDataset(None, root=str(folder))
    reasons = {os.path.basename(p): r for p, r in ds.skipped}
    assert reasons == {"gone.jpg": "unreadable (No such file or directory)", "1.jpg": "unreadable (Permission denied)"}
    assert len(ds[0]) == 12 and len(ds[1]) == 11 and locked not in ds[1].paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_gone_after_scan_raises_naming_it(folder, backend):
    """A file that becomes unreadable after the scan makes the loaders raise, naming the file."""
    ds = ImageFolderDataset(None, root=str(folder))
    victim = ds[0].paths[5]
    os.remove(victim)
    sub = torch.tensor([5, 6])
    st = DomainStreams(ds, [0], 2, "cpu", subsets=[sub], backend=backend, num_workers=0)
    with pytest.raises(RuntimeError, match=os.path.basename(victim)):
        next(st)
    with pytest.raises(RuntimeError, match=os.path.basename(victim)):
        list(EvalLoader(ds, 0, 4, "cpu", subset=sub, backend=backend, num_workers=0))
