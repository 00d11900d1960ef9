"""SigLIP's sigmoid loss (loss.siglip_loss, post_train's contrastive_loss="sigmoid"): against the pairs written
out and against open_clip's SigLipLoss on 1 and 2 gloo ranks (loss and every gradient); every Table-10 variant
with it (tests/test_ablations.py's tiny models) with gradient caching and under DDP; the logits' start from an
open_clip checkpoint of a timm tower. post_train runs with it: tests/test_ablations.py."""
import importlib.util
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, free_port

sys.path.insert(0, ROOT)
import data  # noqa: E402
import loss as L  # noqa: E402
import model as M  # noqa: E402
import pipeline  # noqa: E402
import post_train  # noqa: E402
import test_ablations as ta  # noqa: E402  (its tiny variants: build, batch, reference_loss, step, grads)

torch.set_num_threads(1)  # as the other test modules: no OpenMP pool for the forked ranks to inherit
N, D_IN, D = 8, 5, 6  # global batch, input width, feature width


def naive_siglip(img, txt, scale, bias):
    """Every (image, text) pair a binary decision, matching on the diagonal; summed, divided by the batch."""
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    total = 0.0
    for i in range(img.shape[0]):
        for j in range(txt.shape[0]):
            z = scale * (img[i] * txt[j]).sum() + bias
            total = total - F.logsigmoid(z if i == j else -z)
    return total / img.shape[0]


def make_inputs(seed=0):
    """float64 inputs, a shared Linear (so gradients reach weights through both sides), scale and bias."""
    torch.manual_seed(seed)
    x, y = torch.randn(N, D_IN, dtype=torch.float64), torch.randn(N, D_IN, dtype=torch.float64)
    lin = torch.nn.Linear(D_IN, D, dtype=torch.float64)
    scale = torch.tensor(math.log(10), dtype=torch.float64, requires_grad=True)  # SigLIP's init
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)  # near -10 every gradient would be tiny
    return x, y, lin, scale, bias


def loss_and_grads(fn, lin, scale, bias, x, y, unit):
    """fn(image, text, multiplier, bias) on lin's features (L2-normalised first when `unit`) -> (loss, grads)."""
    lin.zero_grad()
    scale.grad = bias.grad = None
    a, b = lin(x), lin(y) * 0.5 + 1
    if unit:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    loss = fn(a, b, scale.exp(), bias)
    loss.backward()
    return loss.detach(), [lin.weight.grad.clone(), lin.bias.grad.clone(), scale.grad.clone(), bias.grad.clone()]


def assert_close(got, want, tol):
    (l1, g1), (l2, g2) = got, want
    assert abs(l1.item() - l2.item()) <= tol, (l1.item(), l2.item())
    for a, b in zip(g1, g2):
        assert (a - b).abs().max().item() <= tol, (a, b)


def test_siglip_loss_equals_the_pairs_written_out():
    x, y, lin, scale, bias = make_inputs()
    ours = loss_and_grads(L.siglip_loss, lin, scale, bias, x, y, unit=False)  # raw features: normalised inside
    assert_close(ours, loss_and_grads(naive_siglip, lin, scale, bias, x, y, unit=False), 1e-10)
    assert all(g.abs().max() > 1e-3 for g in ours[1])  # every gradient is a real one
    # the variants' table: sigmoid terms read the bias from the model's outputs
    out = {"image": lin(x), "llm": lin(y), "logit_scale": scale.exp(), "logit_bias": bias}
    assert L.multi_clip_loss(out, L.LOSS_TERMS["a"], "sigmoid").item() == pytest.approx(
        L.siglip_loss(out["llm"], out["image"], scale.exp(), bias).item(), abs=1e-12)


def open_clip_loss():
    """open_clip's loss.py alone, or None without open_clip: the module needs torch only, while the package's
    __init__ imports torchvision, timm and the hub client (~10 s on the shared 2 cores)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("open_clip_loss", path))
    module.__spec__.loader.exec_module(module)
    return module


def test_siglip_loss_equals_open_clip_one_process():
    oc = open_clip_loss() or pytest.skip("open_clip is not installed")
    x, y, lin, scale, bias = make_inputs()
    theirs = loss_and_grads(oc.SigLipLoss(), lin, scale, bias, x, y, unit=True)  # open_clip takes unit features
    assert_close(loss_and_grads(L.siglip_loss, lin, scale, bias, x, y, unit=False), theirs, 1e-10)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (projection 16) for the variants with CLIP-T, as tests/test_ablations.py builds it."""
    return pipeline.build_tiny_clip(str(tmp_path_factory.mktemp("clip")), texts=[" ".join(data.synthetic_vocabulary())] * 8,
                                    projection_dim=16)


def sigmoid_net(losses, clip_dir):
    """test_ablations' tiny LLM2CLIP of a variant, with SigLIP's learnable bias at its paper's -10."""
    net = ta.build(losses, clip_dir)
    net.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    return net


def sigmoid_reference(net, images, text):
    """Each variant's sum, every pair of sides through the sigmoid loss written out over the whole batch."""
    def pair(a, b, scale):
        a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
        signs = 2 * torch.eye(a.shape[0]) - 1
        return -F.logsigmoid(signs * (scale * a @ b.T + net.logit_bias)).sum() / a.shape[0]
    return ta.reference_loss(net, images, text, pair)


def test_every_variant_with_the_sigmoid_loss_equals_reference_and_gradient_cache(clip_dir):
    """Table 10's sums with every pair through the sigmoid loss: one chunk and gradient caching (chunks of
    3, 3, 2: the loss decomposes over pairs) give the loss and gradients written out over the whole batch."""
    for losses in ta.VARIANTS:
        net = sigmoid_net(losses, clip_dir)
        images, text = ta.batch(net.clip_text)
        assert net(images, text)["logit_bias"] is net.logit_bias
        ref = sigmoid_reference(net, images, text)
        ref.backward()
        ref, g_ref = ref.item(), ta.grads(net)
        net.zero_grad(set_to_none=True)
        one = ta.step(net, net, images, text, contrastive_loss="sigmoid")
        g_one = ta.grads(net)
        net.zero_grad(set_to_none=True)
        cached = ta.step(net, net, images, text, 3, contrastive_loss="sigmoid")  # chunks of 3, 3, 2
        assert one.item() == pytest.approx(ref, abs=1e-4) and cached.item() == pytest.approx(ref, abs=1e-4), losses
        assert abs(g_ref["logit_bias"].item()) > 1e-3, losses  # the bias trains
        ta.assert_same_grads(g_ref, g_one, 1e-5)
        ta.assert_same_grads(g_ref, ta.grads(net), 1e-5)


# --- one start of 2 gloo ranks for every 2-rank check

def _ddp_worker(rank, world, port, clip_dir, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    oc = open_clip_loss()
    x, y, lin, scale, bias = make_inputs()
    b = N // world
    xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    res = {"ours": loss_and_grads(L.siglip_loss, lin, scale, bias, xs, ys, unit=False)}
    if oc is not None:  # open_clip's default: features exchanged between neighbouring ranks
        res["open_clip"] = loss_and_grads(oc.SigLipLoss(rank=rank, world_size=world), lin, scale, bias, xs, ys, unit=True)
    for loss, grads in res.values():  # what DDP does: average gradients (and here the loss) over ranks
        for t in [loss] + grads:
            dist.all_reduce(t)
            t /= world
    for losses in ("a", "c"):  # Table-10 sums under DDP: each rank 4 of the 8 samples, 2 gradient-cache chunks
        net = sigmoid_net(losses, clip_dir)
        images, text = ta.batch(net.clip_text)
        lo, hi = rank * ta.B // world, (rank + 1) * ta.B // world
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        loss = ta.step(ddp, net, images[lo:hi], {k: v[lo:hi] for k, v in text.items()}, 2, contrastive_loss="sigmoid")
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        res[losses] = (loss.item(), ta.grads(net))
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(clip_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("siglip_ddp") / "res.pt")
    # forked, not spawned: the ranks start with this process's imports (a spawned rank re-imports torch: seconds)
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, free_port(), clip_dir, out), nprocs=2, start_method="fork")
    return torch.load(out, weights_only=True)


def test_sigmoid_loss_two_ranks_equals_the_full_batch(two_ranks, clip_dir):
    """Rank-averaged loss and gradients (scale and bias included) of 2 ranks x 4 == one process over all 8:
    the loss alone (float64), and variants a and c (three terms) as a DDP model step with gradient caching."""
    x, y, lin, scale, bias = make_inputs()
    assert_close(two_ranks["ours"], loss_and_grads(L.siglip_loss, lin, scale, bias, x, y, unit=False), 1e-10)
    for losses in ("a", "c"):
        net = sigmoid_net(losses, clip_dir)
        images, text = ta.batch(net.clip_text)
        ref = sigmoid_reference(net, images, text)
        ref.backward()
        assert two_ranks[losses][0] == pytest.approx(ref.item(), abs=1e-4), losses
        ta.assert_same_grads(ta.grads(net), two_ranks[losses][1], 1e-5)


def test_sigmoid_loss_two_ranks_equals_open_clip(two_ranks):
    """open_clip's SigLipLoss on the same 2 ranks, fed unit features: the same loss and gradients."""
    if "open_clip" not in two_ranks:
        pytest.skip("open_clip is not installed")
    assert_close(two_ranks["ours"], two_ranks["open_clip"], 1e-10)


def test_logits_start_from_an_open_clip_checkpoint_of_the_tower(tmp_path):
    """An open_clip checkpoint of a timm tower (SigLIP's hub files: `visual.trunk.*` + logit_scale/logit_bias)
    loads into VisionTower, whose checkpoint_logits post_train starts the sigmoid loss from unless the config
    sets them; without a checkpoint the defaults are SigLIP's (x10, -10) and CLIP's pretrained x100."""
    kw = dict(timm_kwargs=dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    torch.manual_seed(0)
    src = M.VisionTower("vit_tiny_patch16_224", embed_dim=0, **kw)
    sd = {f"visual.trunk.{k}": v for k, v in src.model.state_dict().items()}
    torch.save({**sd, "logit_scale": torch.tensor(math.log(112.0)), "logit_bias": torch.tensor(-16.5)}, tmp_path / "oc.bin")
    vision = M.VisionTower("vit_tiny_patch16_224", embed_dim=0, weights=str(tmp_path / "oc.bin"), **kw)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vision(x), src(x)) and vision.checkpoint_logits == pytest.approx(
        {"logit_scale": math.log(112.0), "logit_bias": -16.5})
    cfg = {k: getattr(post_train, k) for k in post_train.config_keys}
    sig = {**cfg, "contrastive_loss": "sigmoid", "vision_weights": str(tmp_path / "oc.bin")}
    (scale, scale_from), (bias, bias_from) = post_train.logit_init(sig, vision)
    assert scale == math.log(100) and "x112.0 clamped to max_logit_scale" in scale_from  # held at the clamp
    assert bias == pytest.approx(-16.5) and "oc.bin" in bias_from
    (scale, _), (bias, _) = post_train.logit_init({**sig, "logit_scale_init": 1.0, "logit_bias_init": -3.0}, vision)
    assert (scale, bias) == (1.0, -3.0)  # set in the config: the config wins
    plain = M.VisionTower("vit_tiny_patch16_224", embed_dim=0, **kw)  # timm's own weights carry no logits
    assert post_train.logit_init({**cfg, "contrastive_loss": "sigmoid"}, plain) == (
        (math.log(10), "sigmoid default"), (-10.0, "sigmoid default"))
    assert post_train.logit_init(cfg, plain) == ((math.log(100), "softmax default"), (None, None))
    assert post_train.logit_init(cfg, vision)[1] == (None, None)  # softmax: no bias, whatever the checkpoint holds
