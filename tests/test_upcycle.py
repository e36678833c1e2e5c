"""Upcycling is exact at initialisation, splits parameters as the paper does, and rejects bad N."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from helpers import unet_inputs

from mtu_export.config import DEFAULT_TASK_CHANNELS, MoEConfig, TaskSpec
from mtu_export.errors import ConfigError, InputError
from mtu_export.fold import fold_task, verify_fold
from mtu_export.moe import MoEFeedForward
from mtu_export.shapes.tiny import CROSS_DIM, tiny_unet
from mtu_export.upcycle import load_unet, split_feed_forward, upcycle_unet

INIT_ATOL_FP32 = 1e-5
INIT_ATOL_FP64 = 1e-10
TASKS = MoEConfig()  # t2i 4, edit 8, sr 7, inpaint 9; N=4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, INIT_ATOL_FP32), (torch.float64, INIT_ATOL_FP64)])
def test_upcycled_unet_reproduces_base_for_every_task(unet, dtype, atol):
    base = unet.to(dtype)
    mtu = upcycle_unet(base, TASKS)
    for spec in TASKS.tasks:
        inputs = unet_inputs(spec.in_channels, dtype=dtype)
        with torch.no_grad():
            got = mtu(**inputs, task=spec.name).sample
            # Extra conditioning channels start at zero weight: the base sees only the latent.
            want = base(inputs["sample"][:, :4], inputs["timestep"], inputs["encoder_hidden_states"]).sample
        assert _max_diff(got, want) <= atol, spec.name


@pytest.mark.parametrize("activation", ["geglu", "gelu", "gelu-approximate", "geglu-approximate", "swiglu"])
@pytest.mark.parametrize("num_experts", [1, 2, 4, 8])
def test_split_feed_forward_sums_to_original_for_each_activation(activation, num_experts):
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 4, 16, cross_attention_dim=CROSS_DIM, activation_fn=activation).double()
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    experts = split_feed_forward(block.ff, num_experts, where="block.ff")
    assert all(e.net[2].in_features == 256 // num_experts for e in experts)
    with torch.no_grad():
        assert _max_diff(sum(e(x) for e in experts), block.ff(x)) <= INIT_ATOL_FP64


def test_experts_that_do_not_divide_the_hidden_width_are_rejected(unet):
    with pytest.raises(ConfigError, match=r"--experts 3 does not divide the FFN hidden width 128 .* choose one of"):
        upcycle_unet(unet, MoEConfig(num_experts=3))


def test_fewer_channels_than_the_base_is_rejected(unet):
    with pytest.raises(ConfigError, match="fewer than the base UNet's 4"):
        upcycle_unet(unet, MoEConfig(tasks=(TaskSpec("t2i", 4), TaskSpec("odd", 3))))


def test_upcycling_leaves_the_base_unet_untouched(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    upcycle_unet(unet, TASKS)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_split_is_the_papers(unet):
    mtu = upcycle_unet(unet, TASKS)
    trainable = {name for name, p in mtu.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in mtu.trainable_parameters()}
    kinds = {"experts", "router", "norms", "convs", "task_embedding"}
    for name in trainable:
        assert any(f".{k}." in f".{name}" for k in kinds), name
    for name, _ in mtu.named_parameters():
        if name not in trainable:  # attention, resnets, time embedding, output conv stay frozen
            assert not any(f".{k}." in f".{name}" for k in kinds), name
    assert any("attn2.to_k" in n for n, p in mtu.named_parameters() if not p.requires_grad)


def test_parameter_count_matches_the_design_and_ratio_is_reported(unet):
    """4 tasks, N=4: extra parameters are routers, task LNs, task conv_in channels, split biases, embeddings."""
    mtu = upcycle_unet(unet, TASKS)
    base_count = sum(p.numel() for p in unet.parameters())
    cfg, n_tasks = TASKS, len(TASKS.tasks)
    router = cfg.task_embed_dim * cfg.router_hidden_dim + cfg.router_hidden_dim
    router += cfg.router_hidden_dim * cfg.num_experts + cfg.num_experts
    extra = n_tasks * cfg.task_embed_dim
    for _, block in (x for x in mtu.unet.named_modules() if isinstance(x[1], BasicTransformerBlock)):
        width = block.ff.experts[0].net[2].out_features
        extra += router + (n_tasks - 1) * 2 * width + (cfg.num_experts - 1) * width
    k = unet.conv_in.kernel_size[0] * unet.conv_in.kernel_size[1]
    out = unet.conv_in.out_channels
    extra += sum(out * t.in_channels * k + out for t in cfg.tasks) - (out * 4 * k + out)
    mtu_count = sum(p.numel() for p in mtu.parameters())
    assert mtu_count == base_count + extra
    print(f"tiny UNet: base {base_count:,}, MTU 4 tasks N=4 {mtu_count:,}, ratio {mtu_count / base_count:.4f}")


def test_routed_modules_refuse_to_run_without_a_task(unet):
    mtu = upcycle_unet(unet, TASKS)
    with pytest.raises(RuntimeError, match="outside MTUUNet.route"):
        mtu.unet(**unet_inputs())


def test_wrong_channel_count_for_a_task_is_named(unet):
    mtu = upcycle_unet(unet, TASKS)
    with pytest.raises(ConfigError, match="task 'edit' takes 8 input channels, got a sample with 4"):
        mtu(**unet_inputs(4), task="edit")


def test_unknown_task_suggests_the_closest(unet):
    mtu = upcycle_unet(unet, TASKS)
    with pytest.raises(ConfigError, match="unknown task 'inpait'.*did you mean 'inpaint'"):
        mtu(**unet_inputs(9), task="inpait")


def test_moe_layer_count_and_default_channels():
    mtu = upcycle_unet(tiny_unet(layers_per_block=2), TASKS)
    # 2 down blocks x 2 layers + 2 up blocks x 3 layers + 1 mid block = 11 transformer blocks
    assert len(mtu.moe_layers()) == 11
    assert all(isinstance(m, MoEFeedForward) for _, m in mtu.moe_layers())
    assert {n: c.in_channels for n, c in mtu.unet.conv_in.convs.items()} == DEFAULT_TASK_CHANNELS
    assert all(m._routing is mtu._routing for _, m in mtu.moe_layers())  # one shared task switch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_their_dtype(tmp_path, dtype):
    tiny_unet().to(dtype).save_pretrained(tmp_path / "unet", safe_serialization=True)
    unet = load_unet(tmp_path / "unet")
    assert unet.dtype == dtype
    assert upcycle_unet(unet, TASKS).unet.conv_in.convs["t2i"].weight.dtype == dtype


def test_variant_only_folder_loads(tmp_path):
    tiny_unet().to(torch.float16).save_pretrained(tmp_path / "unet", safe_serialization=True, variant="fp16")
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    assert load_unet(tmp_path / "unet").dtype == torch.float16


def test_class_embedding_types_are_refused_up_front():
    with pytest.raises(InputError, match="class_embed_type='timestep'.*text"):
        upcycle_unet(tiny_unet(class_embed_type="timestep"), TASKS)
    with pytest.raises(InputError, match="addition_embed_type='text'"):
        upcycle_unet(tiny_unet(addition_embed_type="text", encoder_hid_dim=CROSS_DIM), TASKS)


@pytest.mark.parametrize(
    "overrides", [{"num_class_embeds": 10}, {"sample_size": None}, {"sample_size": (16, 16)}], ids=str
)
def test_fold_checks_itself_on_less_common_configs(overrides):
    mtu = upcycle_unet(tiny_unet(**overrides), TASKS)
    for task in TASKS.task_names:
        assert verify_fold(mtu, fold_task(mtu, task), task) <= INIT_ATOL_FP32


def test_linears_without_bias_upcycle_exactly():
    unet = tiny_unet(seed=3)
    for _, block in ((n, m) for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)):
        for linear in (block.ff.net[0].proj, block.ff.net[2]):
            linear.bias = None
    mtu = upcycle_unet(unet, TASKS)
    inputs = unet_inputs(4)
    with torch.no_grad():
        assert _max_diff(unet(**inputs).sample, mtu(**inputs, task="t2i").sample) <= INIT_ATOL_FP32
