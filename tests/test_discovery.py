"""Channel groups discovered from the traced computation (prunespec.discovery).

The groups of the zoo's models are the expected ones; and for every group of every model, zeroing a
random subset of its channels gives the same outputs as physically removing them (slicing every member,
parameters and buffers, in a copy): the groups are complete and right. Structures whose channels cannot
be removed are in no group and say why; untraceable models and the time bound raise DiscoveryError; the
model is left as it was.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
import zoo
from conftest import ModelState
from torch import nn

from prunespec.discovery import DiscoveryError, analyze, discover
from prunespec.groups import Group, kept_indices, member_mask


def shuffle(x: torch.Tensor) -> torch.Tensor:
    """A function discovery cannot look into (wrapped for fx below): it interleaves channel halves."""
    n, c, h, w = x.shape
    return x.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


torch.fx.wrap("shuffle")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: a second thread only contends for the cores (hundreds of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet() -> nn.Module:
    return zoo.resnet50_shaped(num_classes=5, width=4, layers=(2, 1, 1, 1))


def _depthwise() -> nn.Module:
    return zoo.depthwise_separable(num_classes=5, widths=(8, 16, 24), strides=(1, 2))


def _vit() -> nn.Module:
    return zoo.vit_shaped(image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2, num_classes=5)


class Mixed(nn.Module):
    """A squeeze-excitation product, a channel concat, a module called twice, a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.squeeze = nn.Conv2d(6, 3, 1)
        self.excite = nn.Conv2d(3, 6, 1)
        self.branch = nn.Conv2d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 8, 1)
        self.same = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        a = a * torch.sigmoid(self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(a, 1)))))
        b = F.relu(self.branch(a))
        y = F.relu(self.mix(self.bn(torch.cat([a, b], dim=1))))
        y = F.max_pool2d(self.same(F.relu(self.same(y))), 2)
        return self.fc(y.flatten(1))


class Opaque(nn.Module):
    """A view that mixes channel pairs, and a function discovery cannot look into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        n, c, h, w = y.shape
        y = y.view(n, c // 2, 2, h, w).mean(2)
        y = shuffle(self.conv3(F.relu(self.conv2(y))))
        return self.head(F.relu(self.conv4(y)).mean((2, 3)))


class Block(nn.Module):
    """``body(x)`` after ``stem``, combined with the rest by ``how`` (the structure under test)."""

    def __init__(self, how: Callable[[Block, torch.Tensor, torch.Tensor], torch.Tensor], body: nn.Module) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = body
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.how(self, x, self.stem(x))
        return self.head(y.mean((2, 3)))


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
MODELS: dict[str, tuple[Callable[[], nn.Module], torch.Tensor]] = {
    "resnet": (_resnet, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))),
    "depthwise": (_depthwise, IMAGES),
    "vit": (_vit, IMAGES),
    "mixed": (Mixed, IMAGES[:, :, :8, :8]),
    "opaque": (Opaque, IMAGES[:, :, :8, :8]),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, images = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    with torch.no_grad():  # BatchNorm statistics away from 0 and 1, so that slicing them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, images


def _tensor(model: nn.Module, module: str, param: str) -> torch.Tensor:
    t = getattr(model.get_submodule(module), param)
    assert isinstance(t, torch.Tensor)
    return t


def _masked(model: nn.Module, group: Group, keep: torch.Tensor) -> nn.Module:
    """A copy with the units not in ``keep`` zeroed in every scored and masked member."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in group.members:
            if m.role != "sliced":
                t = _tensor(out, m.module, m.param)
                t.mul_(member_mask(group, m, keep, t))
    return out


def _sliced(model: nn.Module, chosen: list[tuple[Group, torch.Tensor]]) -> nn.Module:
    """A copy with the units not kept removed from every member, and the module attributes fixed."""
    out = copy.deepcopy(model)
    depthwise = {id(m) for m in out.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    kept: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for group, keep in chosen:  # every group at once: the entries kept along each dim of each tensor
        for m in group.members:
            length = _tensor(out, m.module, m.param).shape[m.dim]
            mask = kept.setdefault((m.module, m.param), {}).setdefault(m.dim, torch.ones(length, dtype=torch.bool))
            ours = torch.zeros(length, dtype=torch.bool)
            ours[kept_indices(group, [m], keep.tolist(), length)] = True
            mask &= ours
    for (module, param), dims in kept.items():
        owner, t = out.get_submodule(module), _tensor(out, module, param)
        new = t.detach()
        for dim, mask in dims.items():
            new = new.index_select(dim, mask.nonzero().reshape(-1))
        setattr(owner, param, nn.Parameter(new.clone()) if isinstance(t, nn.Parameter) else new.clone())
    for m in out.modules():
        if isinstance(m, nn.Conv2d):
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
            if id(m) in depthwise:
                m.in_channels = m.groups = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features = m.weight.shape[0]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


def _keep(size: int, generator: torch.Generator) -> torch.Tensor:
    keep = torch.rand(size, generator=generator) < 0.5
    keep[0], keep[-1] = True, False  # both kinds, always
    return keep[torch.randperm(size, generator=generator)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scored(group: Group) -> set[tuple[str, int]]:
    return {(m.tensor, m.dim) for m in group.scored}


# --- the groups found ------------------------------------------------------------------------------


def test_resnet_groups() -> None:
    model, images = _build("resnet")
    found = analyze(model, images)
    groups = {g.name: g for g in found.groups}
    stages = ["layer1.0", "layer1.1", "layer2.0", "layer3.0", "layer4.0"]
    inner = {f"{b}.conv{i}" for b in stages for i in (1, 2)}
    streams = {f"layer{s}.0.conv3" for s in range(1, 5)}
    assert set(groups) == {"conv1"} | inner | streams
    assert all(g.kind == "channels" and g.structure == "traced" for g in found.groups)
    assert _scored(groups["conv1"]) == {
        ("conv1.weight", 0),
        ("layer1.0.conv1.weight", 1),
        ("layer1.0.downsample.0.weight", 1),
    }
    for block in stages:  # each bottleneck's two inner widths: the conv, its BatchNorm, the next conv's input
        for i in (1, 2):
            g = groups[f"{block}.conv{i}"]
            assert _scored(g) == {(f"{block}.conv{i}.weight", 0), (f"{block}.conv{i + 1}.weight", 1)}
            assert {m.tensor for m in g.members if m.role == "masked"} == {
                f"{block}.bn{i}.weight",
                f"{block}.bn{i}.bias",
            }
            assert {m.tensor for m in g.members if m.role == "sliced"} == {
                f"{block}.bn{i}.running_mean",
                f"{block}.bn{i}.running_var",
            }
            assert g.size == model.get_submodule(f"{block}.conv{i}").out_channels
    # a stage's residual stream: every conv writing into it, the downsample, and every reader
    assert _scored(groups["layer1.0.conv3"]) == {
        ("layer1.0.conv3.weight", 0),
        ("layer1.0.downsample.0.weight", 0),
        ("layer1.1.conv3.weight", 0),
        ("layer1.1.conv1.weight", 1),
        ("layer2.0.conv1.weight", 1),
        ("layer2.0.downsample.0.weight", 1),
    }
    masked = {m.tensor for m in groups["layer1.0.conv3"].members if m.role == "masked"}
    assert masked == {
        f"{bn}.{p}" for bn in ("layer1.0.bn3", "layer1.0.downsample.1", "layer1.1.bn3") for p in ("weight", "bias")
    }
    last = groups["layer4.0.conv3"]  # through avgpool and flatten into the fc: one column per channel
    assert _scored(last) == {("layer4.0.conv3.weight", 0), ("layer4.0.downsample.0.weight", 0), ("fc.weight", 1)}
    assert [(m.width, m.offset) for m in last.members if m.module == "fc"] == [(1, 0)]
    assert last.size == 128
    assert list(found.unsupported) == ["fc"]  # the logits
    assert "output" in found.unsupported["fc"] and "fc.weight dim 0" in found.unsupported["fc"]


def test_depthwise_groups() -> None:
    model, images = _build("depthwise")
    groups = {g.name: g for g in discover(model, images)}
    assert list(groups) == ["0.0", "1.pointwise.0", "2.pointwise.0"]
    # a depthwise conv keeps its input's channels: its filters (dim 0) and BatchNorm join that group
    assert _scored(groups["0.0"]) == {("0.0.weight", 0), ("1.depthwise.0.weight", 0), ("1.pointwise.0.weight", 1)}
    assert _scored(groups["1.pointwise.0"]) == {
        ("1.pointwise.0.weight", 0),
        ("2.depthwise.0.weight", 0),
        ("2.pointwise.0.weight", 1),
    }
    assert _scored(groups["2.pointwise.0"]) == {("2.pointwise.0.weight", 0), ("5.weight", 1)}
    assert {m.module for m in groups["1.pointwise.0"].members if m.role == "sliced"} == {
        "1.pointwise.1",
        "2.depthwise.1",
    }
    assert [g.size for g in groups.values()] == [8, 16, 24]


def test_vit_groups_are_the_mlps_only() -> None:
    model, images = _build("vit")
    found = analyze(model, images)
    assert [(g.name, g.size) for g in found.groups] == [("blocks.0.mlp.fc1", 32), ("blocks.1.mlp.fc1", 32)]
    for i, g in enumerate(found.groups):
        mlp = f"blocks.{i}.mlp"
        assert [(m.tensor, m.dim, m.role) for m in g.members] == [
            (f"{mlp}.fc1.weight", 0, "scored"),
            (f"{mlp}.fc1.bias", 0, "masked"),
            (f"{mlp}.fc2.weight", 1, "scored"),
        ]
    why = found.unsupported
    for i in range(2):
        for proj in ("q", "k", "v"):  # split into heads: a later piece's job
            assert "reshape" in why[f"blocks.{i}.attn.{proj}"] and "mixing" in why[f"blocks.{i}.attn.{proj}"]
        for writer in (f"blocks.{i}.attn.out", f"blocks.{i}.mlp.fc2"):  # the residual stream
            assert "LayerNorm" in why[writer]
        assert "LayerNorm" in why[f"blocks.{i}.norm1"]
    assert "LayerNorm" in why["patch_embed"]
    assert "output" in why["head"]


def test_mixed_groups() -> None:
    model, images = _build("mixed")
    groups = {g.name: g for g in discover(model, images)}
    assert list(groups) == ["stem", "squeeze", "branch", "mix"]
    # the excitation multiplies the stem's channels: its conv writes into them
    assert _scored(groups["stem"]) == {
        ("stem.weight", 0),
        ("excite.weight", 0),
        ("squeeze.weight", 1),
        ("branch.weight", 1),
        ("mix.weight", 1),
    }
    assert _scored(groups["squeeze"]) == {("squeeze.weight", 0), ("excite.weight", 1)}
    # torch.cat places the stem's 6 channels then the branch's 4 along the BatchNorm and mix's columns
    offsets = {(g, m.tensor): m.offset for g in ("stem", "branch") for m in groups[g].members}
    assert offsets[("stem", "bn.weight")] == offsets[("stem", "mix.weight")] == 0
    assert offsets[("branch", "bn.running_var")] == offsets[("branch", "mix.weight")] == 6
    # a module called twice reads its own output: rows and columns of one group; flatten: 16 columns each
    assert _scored(groups["mix"]) == {("mix.weight", 0), ("same.weight", 0), ("same.weight", 1), ("fc.weight", 1)}
    assert [m.width for m in groups["mix"].members if m.module == "fc"] == [16]


class Tied(nn.Module):
    """Two Linears sharing one weight: their outputs are the same channels, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x).relu() + self.b(x))


def test_a_tied_weight_makes_one_group_with_both_biases() -> None:
    (group,) = discover(Tied(), torch.randn(2, 4))
    assert [(m.tensor, m.dim) for m in group.members] == [
        ("a.weight", 0),
        ("a.bias", 0),
        ("b.weight", 0),
        ("b.bias", 0),
        ("c.weight", 1),
    ]


# --- complete and right: zeroing a group's channels is removing them ---------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_masking_a_group_equals_removing_it(name: str) -> None:
    model, images = _build(name)
    groups = discover(model, images)
    assert groups
    generator = torch.Generator().manual_seed(0)
    chosen = [(g, _keep(g.size, generator)) for g in groups]
    with torch.no_grad():
        for group, keep in chosen:
            masked, sliced = _masked(model, group, keep), _sliced(model, [(group, keep)])
            assert _params(sliced) < _params(model)
            assert _close(sliced(images), masked(images)), group.name
            assert not torch.equal(masked(images), model(images)), f"{group.name}: masking changed nothing"
        everything = _sliced(model, chosen)  # all groups at once: the members do not overlap wrongly
        masked = model
        for group, keep in chosen:
            masked = _masked(masked, group, keep)
        assert _close(everything(images), masked(images))


# --- what is not a group, and why -------------------------------------------------------------------


def test_opaque_ops_block_their_channels_and_say_why() -> None:
    model, images = _build("opaque")
    found = analyze(model, images)
    assert [g.name for g in found.groups] == ["conv2", "conv4"]
    assert _scored(found.groups[0]) == {("conv2.weight", 0), ("conv3.weight", 1)}
    in_groups = {(m.module, m.dim) for g in found.groups for m in g.members}
    assert not {("conv1", 0), ("conv3", 0)} & in_groups  # their output channels: in no group
    assert "Tensor.view" in found.unsupported["conv1"] and "mixing" in found.unsupported["conv1"]
    assert "`shuffle`" in found.unsupported["conv3"] and "not understood" in found.unsupported["conv3"]
    assert "not understood" in found.unsupported[""]  # where the function was called: the model itself
    assert "output" in found.unsupported["head"]


def _plus_input(self: Block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y + x.mean(1, keepdim=True).expand(-1, 4, -1, -1)  # the input's entries, not channels


STRUCTURES: dict[str, tuple[Callable[[Block, torch.Tensor, torch.Tensor], torch.Tensor], nn.Module, str]] = {
    "residual with the input": (_plus_input, nn.Identity(), "not these channels"),
    "grouped conv": (lambda s, x, y: s.body(y), nn.Conv2d(4, 4, 3, padding=1, groups=2), "grouped (groups=2)"),
    "group norm": (lambda s, x, y: s.body(y), nn.GroupNorm(2, 4), "GroupNorm body normalizes across"),
    "softmax over channels": (lambda s, x, y: y.softmax(1), nn.Identity(), "softmax"),
    "some channels picked": (lambda s, x, y: torch.cat([y[:, :2], y[:, 2:]], 1), nn.Identity(), "picks"),
    "channels last, flattened": (
        lambda s, x, y: y.permute(0, 2, 3, 1).flatten(1).reshape(2, 4, 16, 16),
        nn.Identity(),
        "mixing these channels",
    ),
    "unknown module": (lambda s, x, y: s.body(y), nn.PixelShuffle(1), "PixelShuffle body is not understood"),
    "a sum over channels": (lambda s, x, y: y - y.sum(1, keepdim=True), nn.Identity(), "reduction"),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_structures_whose_channels_cannot_be_removed(name: str) -> None:
    how, body, reason = STRUCTURES[name]
    torch.manual_seed(0)
    model = Block(how, body)
    found = analyze(model, IMAGES)
    assert found.groups == ()  # the stem's channels are the only ones, and they are blocked
    assert reason in found.unsupported["stem"], found.unsupported
    assert "stem.weight dim 0" in found.unsupported["stem"]


def test_a_single_channel_broadcast_over_many_is_not_a_group() -> None:
    torch.manual_seed(0)
    found = analyze(Block(lambda s, x, y: y + s.body(y), nn.Conv2d(4, 1, 1)), IMAGES)
    assert [g.name for g in found.groups] == ["stem"]
    assert "a single channel is broadcast" in found.unsupported["body"]


def test_a_reshape_that_keeps_channels_whole_keeps_the_group() -> None:
    """The control for the channels-last case above: a flatten and unflatten of the spatial dims only."""
    torch.manual_seed(0)
    model = Block(lambda s, x, y: y.flatten(2).relu().unflatten(2, (16, 16)), nn.Identity())
    (group,) = discover(model, IMAGES)
    assert _scored(group) == {("stem.weight", 0), ("head.weight", 1)}


# --- untraceable, bounded in time, and the model left as it was --------------------------------------


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class Long(nn.Module):
    """A forward of many thousands of ops: tracing it takes far longer than the bound under test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(200_000):
            x = x + 1
        return x


def test_untraceable_model_raises_naming_op_and_module() -> None:
    model = Gated()
    state = ModelState(model)
    with pytest.raises(DiscoveryError) as info:
        discover(model, IMAGES)
    assert info.value.module == "gate"
    assert "control flow" in info.value.op
    assert "gate" in str(info.value) and "cannot be traced" in info.value.message
    state.assert_unchanged(model)


def test_a_tiny_timeout_raises_instead_of_running() -> None:
    model, images = _build("resnet")
    with pytest.raises(DiscoveryError, match="could not resolve the model in 1e-09 s"):
        discover(model, images, timeout_s=1e-9)


def test_the_deadline_stops_a_long_trace() -> None:
    start = time.monotonic()
    with pytest.raises(DiscoveryError) as info:
        discover(Long(), torch.zeros(1), timeout_s=0.2)
    assert info.value.op == "tracing"
    assert time.monotonic() - start < 5  # unbounded, tracing 200,000 ops takes minutes


@pytest.mark.parametrize("name", ["resnet", "vit", "mixed"])
def test_the_model_is_left_as_it_was(name: str) -> None:
    model, images = _build(name)
    model.train()  # a forward in train mode would update BatchNorm's running statistics
    next(model.children()).eval()  # and modes that differ: each is restored, not reset
    modes = {n: m.training for n, m in model.named_modules()}
    state = ModelState(model)
    analyze(model, images)
    state.assert_unchanged(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_inputs_by_keyword_and_wrong_names() -> None:
    model, images = _build("mixed")
    assert discover(model, {"x": images}) == discover(model, (images,))
    with pytest.raises(DiscoveryError, match="no argument"):
        discover(model, {"images": images})
    with pytest.raises(DiscoveryError, match="do not run"):
        discover(model, torch.zeros(2, 5, 8, 8))
