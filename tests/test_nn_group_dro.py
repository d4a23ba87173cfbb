"""fastdg.nn.GroupDROLoss: the q state over steps, checkpoints, eval mode, the Sagawa adjustment,
bad input, and two-process data parallelism on the gloo backend."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastdg.nn import GroupDROLoss
from fastdg.reference.group_loss import group_loss_ref


def batch(seed, n=24, k=5, g=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen, dtype=dtype) * 2
    y = torch.randint(0, k, (n,), generator=gen)
    grp = torch.randint(0, g, (n,), generator=gen)
    return z, y, grp


def test_q_follows_the_reference_over_steps():
    lf = GroupDROLoss(3, eta=0.5)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    for step in range(5):
        z, y, g = batch(step)
        z.requires_grad_()
        loss = lf(z, y, g)
        ref = group_loss_ref(z, y, g, q, eta=0.5)
        q = ref.q
        torch.testing.assert_close(loss, ref.loss)
        torch.testing.assert_close(lf.q, q.float())
        torch.testing.assert_close(lf.group_loss, ref.group_loss.float())
        torch.testing.assert_close(lf.group_count, ref.group_count.float())
        (g_fused,) = torch.autograd.grad(loss, z)
        (g_ref,) = torch.autograd.grad(ref.loss, z)
        torch.testing.assert_close(g_fused, g_ref)
    assert not torch.allclose(lf.q, torch.full((3,), 1 / 3))


def test_per_sample_losses_and_adjustment():
    sizes = torch.tensor([100.0, 25.0, 4.0])
    lf = GroupDROLoss(3, eta=0.1, generalization_adjustment=2.0, group_sizes=sizes)
    losses = torch.rand(12, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0, 1, 2] * 4)
    loss = lf(losses, group=g)
    ref = group_loss_ref(losses, None, g, torch.full((3,), 1 / 3), eta=0.1, adjustment=2.0 / sizes.sqrt())
    torch.testing.assert_close(lf.q, ref.q)
    torch.testing.assert_close(loss, ref.loss)  # the adjustment moves q, never the loss itself
    with pytest.raises(ValueError, match="group_sizes"):
        GroupDROLoss(3, generalization_adjustment=1.0)


def test_state_dict_eval_mode_and_reset():
    lf = GroupDROLoss(4, eta=1.0)
    z, y, g = batch(0, g=4)
    lf(z, y, g)
    q_trained = lf.q.clone()
    other = GroupDROLoss(4)
    other.load_state_dict(lf.state_dict())
    assert torch.equal(other.q, q_trained)
    assert set(lf.state_dict()) == {"q"}
    lf.eval()
    lf(*batch(1, g=4))
    assert torch.equal(lf.q, q_trained)  # eval-mode calls do not move q
    lf.reset()
    assert torch.equal(lf.q, torch.full((4,), 0.25))
    lf.reset(num_groups=6)
    assert lf.q.shape == (6,) and lf.group_loss.shape == (6,)
    lf.train()
    lf(*batch(2, g=6))


def test_bad_input():
    lf = GroupDROLoss(3)
    z, y, g = batch(0)
    with pytest.raises(TypeError, match="group"):
        lf(z, y)
    with pytest.raises(ValueError, match="group"):
        lf(z, y, g + 3)
    with pytest.raises(ValueError, match="NaN"):
        lf(torch.full_like(z, float("nan")), y, g)
    with pytest.raises(ValueError, match="num_groups"):
        GroupDROLoss(0)
    for eta in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eta must be a finite number"):
            GroupDROLoss(3, eta=eta)
    with pytest.raises(RuntimeError, match="distributed"):
        GroupDROLoss(3, all_reduce=True)(z, y, g)


def _worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        lf = GroupDROLoss(3, eta=0.7)
        for step in range(3):
            z, y, g = batch(100 + step, n=30)
            rows = slice(rank * 15, (rank + 1) * 15)
            zr = z[rows].clone().requires_grad_()
            loss = lf(zr, y[rows], g[rows])
            loss.backward()
            torch.save({"q": lf.q.clone(), "loss": loss.detach(), "grad": zr.grad, "counts": lf.group_count.clone()},
                       os.path.join(out_dir, f"r{rank}s{step}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_share_q_and_the_global_gradient(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    q = torch.full((3,), 1 / 3)
    for step in range(3):
        z, y, g = batch(100 + step, n=30)
        z.requires_grad_()
        ref = group_loss_ref(z, y, g, q, eta=0.7)
        q = ref.q.float()
        (grad_ref,) = torch.autograd.grad(ref.loss, z)
        outs = [torch.load(tmp_path / f"r{r}s{step}.pt") for r in range(world)]
        for r, o in enumerate(outs):
            torch.testing.assert_close(o["q"], q)          # every rank holds the single-process q
            torch.testing.assert_close(o["loss"], ref.loss)
            torch.testing.assert_close(o["counts"], ref.group_count.float())
            # x world size: DDP's mean over ranks then gives the exact global gradient
            torch.testing.assert_close(o["grad"], world * grad_ref[r * 15:(r + 1) * 15])
        assert torch.equal(outs[0]["q"], outs[1]["q"])


@pytest.mark.gpu
def test_cuda_module_step_has_no_host_sync():
    lf = GroupDROLoss(16).cuda()
    z = torch.randn(1024, 65, device="cuda", requires_grad=True)
    y = torch.randint(0, 65, (1024,), device="cuda")
    g = torch.randint(0, 16, (1024,), device="cuda")
    lf(z, y, g)  # warm-up: compiles kernels, loads the extension
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = lf(z, y, g)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    q = torch.full((16,), 1 / 16, device="cuda", dtype=torch.float64)
    for _ in range(2):  # the warm-up call moved q too
        ref = group_loss_ref(z.detach().double(), y, g, q)
        q = ref.q
    torch.testing.assert_close(lf.q.double(), q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
