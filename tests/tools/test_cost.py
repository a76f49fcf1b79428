"""`densenet-fused cost`: launches and bytes of a training step on the CUDA code path, counted
on fake CUDA tensors (no GPU).  The pinned numbers are the current cost: a change that adds
launches or traffic fails here and must say why (lower numbers: update the pins)."""
import os
import re

import pytest
import torch

from densenet_fused.ops.launch import observer_active
from densenet_fused.tools import cost
from densenet_fused.tools.cli import main as cli_main

# case: (launches per layer forward + backward, bytes / floor)
PINNED = {
    "densenet121_block3": (10.5, 1.31),
    "densenet121_block1": (12.0, 1.5),
    "densenet_bc100_k12": (10.8, 1.35),
}
# launches per layer of a channels-last model's step, bytes ratio: DenseNet-121 block 3 at most 11 launches
# per layer (the host path: docs/design.md section 8), every case at most 12.5
BUDGET = {"densenet121_block3": (11, 1.5), "densenet121_block1": (12.5, 1.5), "densenet_bc100_k12": (12.5, 1.5)}


@pytest.fixture(scope="module")
def recordings():
    return {name: cost.record_step(case) for name, case in cost.CASES.items()}


@pytest.mark.parametrize("name", list(PINNED))
def test_launches_and_bytes_are_pinned(recordings, name):
    s = cost.summarize(cost.CASES[name], recordings[name])
    launches, ratio = PINNED[name]
    assert round(s.total, 1) == launches, s.line()
    assert round(s.ratio, 2) == ratio, s.line()


@pytest.mark.parametrize("name", list(PINNED))
def test_every_case_is_within_the_budget(recordings, name):
    s = cost.summarize(cost.CASES[name], recordings[name])
    assert s.total <= BUDGET[name][0] and s.ratio <= BUDGET[name][1], s.line()


def test_cases_are_blocks_of_the_model_configurations():
    """The cases' shapes come from models.CONFIGS / densenet_bc_config (written once, in modules/models.py)."""
    from densenet_fused.modules.models import CONFIGS, densenet_bc_config
    growth, blocks, c0 = CONFIGS["densenet121"]
    b1, b3 = cost.CASES["densenet121_block1"], cost.CASES["densenet121_block3"]
    assert (b1.layers, b1.c0, b1.growth, b1.hw, b1.batch) == (blocks[0], c0, growth, 56, 128)
    assert (b3.layers, b3.c0, b3.growth, b3.hw, b3.batch) == (blocks[2], 256, growth, 14, 128)  # two transitions
    bc, config = cost.CASES["densenet_bc100_k12"], densenet_bc_config(100, 12)
    assert (bc.layers, bc.c0, bc.growth, bc.hw, bc.batch) == (config.block_config[0], config.num_init_features,
                                                               config.growth_rate, 32, 64)


def test_grids_are_sized_for_the_architectures_gpu(recordings):
    """A step recorded for sm_80 takes the A100's 108 SMs: the 1x1 backward splits its rows over two waves
    of them (fewer splits than for the H100's 132, what the sm_90 recordings take)."""
    case = cost.CASES["densenet121_block3"]

    def splits(rec):  # per layer, the last one first (the backward's order)
        return [args[list(fn.arg_names).index("SPLITS")] for fn, args, _ in rec.triton_calls
                if cost._triton_name(fn) == "bnrelu_conv1x1._bwd_kernel"]
    h100, a100 = splits(recordings[case.name]), splits(cost.record_step(case, arch=80))
    blocks = case.c0 // 64  # layer 0: cdiv(2 * SMs, C / 64) splits, fewer than its 196 row tiles of 128
    assert len(h100) == len(a100) == case.layers and (h100[-1], a100[-1]) == (-(-264 // blocks), -(-216 // blocks))
    assert all(a <= h for a, h in zip(a100, h100)) and a100 != h100


def test_the_1x1_backward_forms_db_from_g2(recordings):
    """No separate pass writes dB: the 1x1 backward reads g2 (fp32) and the bottleneck B instead, and
    bn_grad_finish runs once per step (dx), not per layer."""
    case = cost.CASES["densenet121_block1"]
    rec = recordings[case.name]
    m, cb = case.rows, case.bn_size * case.growth
    for l in range(case.layers):
        kernels = [x.kernel for x in rec.launches if x.phase == "backward" and x.layer == l]
        assert "bn_grad_finish.finish_kernel" not in kernels, (l, kernels)
        bwd = [x for x in rec.launches if x.phase == "backward" and x.layer == l
               and x.kernel == "bnrelu_conv1x1._bwd_kernel"]
        assert len(bwd) == 1 and bwd[0].read >= m * cb * (4 + 2), (l, bwd)
    assert sum(x.kernel == "bn_grad_finish.finish_kernel" for x in rec.launches) == 1


def test_every_layer_launches_the_same_kernels(recordings):
    case = cost.CASES["densenet121_block3"]
    rec = recordings[case.name]
    for phase in ("forward", "backward"):
        per_layer = [[l.kernel for l in rec.launches if l.phase == phase and l.layer == i]
                     for i in range(1, case.layers)]  # layer 0 folds its BN1 itself (no previous layer)
        assert all(k == per_layer[0] for k in per_layer), phase
        assert per_layer[0], phase


def test_bytes_of_the_fused_1x1_forward_are_its_operands(recordings):
    """The 1x1 forward of layer l reads its buffer slice (M x C_l) and weights, writes B (M x cb)."""
    case = cost.CASES["densenet121_block3"]
    m, l = case.rows, 3
    c_l, cb = case.c0 + l * case.growth, case.bn_size * case.growth
    fwd = [x for x in recordings[case.name].launches
           if x.phase == "forward" and x.layer == l and x.kernel == "bnrelu_conv1x1._fwd_kernel"]
    assert len(fwd) == 1
    assert fwd[0].read >= m * c_l * 2 + cb * c_l * 2
    partials = 2 * -(-m // 64) * cb * 4  # per-tile (mean, M2) of B, tiles of >= 64 rows
    assert m * cb * 2 <= fwd[0].written <= m * cb * 2 + partials


def test_dropout_draws_its_seeds_on_the_device(recordings):
    """drop_rate > 0: the step records on fake CUDA tensors (a host synchronization such as .item()
    raises there) and costs one launch more per step (every layer's seed in one draw on the device),
    the same bytes: the conv3x3 kernels apply the masks from those seeds."""
    import densenet_fused.modules.dense as mods
    from flags import patched
    case = cost.CASES["densenet121_block3"]
    orig = mods.FusedDenseBlock
    with patched(mods, FusedDenseBlock=lambda *a, **k: orig(*a, drop_rate=0.2, **k)):
        rec = cost.record_step(case)
    plain = recordings[case.name]
    assert sum(x.launches for x in rec.launches) == sum(x.launches for x in plain.launches) + 1
    assert [x.kernel for x in rec.launches if x.layer >= 0] == [x.kernel for x in plain.launches if x.layer >= 0]
    block_level = [x.kernel for x in rec.launches if x.layer < 0]  # the seeds, drawn before the sweep
    assert sorted(block_level) == sorted([x.kernel for x in plain.launches if x.layer < 0] + ["aten.randint"])
    got, want = cost.summarize(case, rec), cost.summarize(case, plain)
    assert abs(got.bytes - want.bytes) < 1e6, (got.line(), want.line())


def test_floor_matches_design_section_8():
    """docs/design.md section 8: about 6.2 GB for DenseNet-121 block 3 (N=128, bf16) in its per-layer
    terms; the block-level terms (x in, grad_out in, dx out) add M*(3*C_0 + C_total)*2 bytes."""
    case = cost.CASES["densenet121_block3"]
    m = case.rows
    block_terms = m * (3 * case.c0 + case.c0 + case.layers * case.growth) * 2
    assert 6.1e9 <= cost.floor_bytes(case) - block_terms <= 6.3e9


def test_cli_prints_the_summary_line_last(capsys):
    assert cli_main(["cost", "--case", "densenet_bc100_k12"]) == 0
    assert observer_active() is None  # the recording ended with the run
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"launches per layer: [\d.]+ forward \+ [\d.]+ backward = [\d.]+; "
                        r"bytes per step: [\d.]+ GB, floor [\d.]+ GB, ratio [\d.]+", last), last


def test_unknown_case_is_an_error():
    with pytest.raises(SystemExit, match="unknown case 'nope'"):
        cost.main("nope")


def test_a_triton_kernel_without_a_declared_cost_is_an_error():
    rec = cost.Recording()

    class Fn:
        arg_names = ["X"]
        fn = None

    Fn.fn = lambda: None  # a kernel named "test_cost.<lambda>"
    with pytest.raises(RuntimeError, match="no entry in its op file's TRITON_WRITES"):
        cost._record_triton(rec, Fn(), (torch.empty(1),), {})


_COMPILE_SMALL = """
import json
from densenet_fused.tools import cost
rec = cost.record_step(cost.CASES["densenet_bc100_k12"])
variants = cost.kernel_variants(rec)
launched = sorted({cost._triton_name(fn) for fn, _, _ in rec.triton_calls})
small = ("bnrelu_conv1x1._bwd_finish_kernel", "bnrelu_conv3x3._bwd_finish_kernel", "_triton_common.stats_merge_kernel")
done = {}
for key, (fn, sig, constexprs, attrs, options) in variants.items():
    if key[0] in small and key[0] not in done:
        done[key[0]] = cost.compile_kernel(fn, sig, constexprs, attrs, options)
fwd = [dict(k[2]) for k in variants if k[0] == "bnrelu_conv1x1._fwd_kernel"]
from densenet_fused.ops import bnrelu_conv1x1 as op1
tuned = {n: dict(keys=t.keys, cache=t.cache_results, args=t.arg_names)
         for n, t in (("fwd", op1._fwd_tuned), ("bwd", op1._bwd_tuned))}
print(json.dumps(dict(launched=launched, variants=sorted({k[0] for k in variants}), compiled=done, fwd=fwd,
                      tuned=tuned)))
"""


def test_kernel_variants_cover_every_launch_and_compile_for_sm90():
    """`cost --kernels`: every Triton launch of the step becomes a compilable variant (every autotuner
    config).  Compiled (not interpreted) kernels need a process without TRITON_INTERPRET; the small
    reduction kernels are compiled here for sm_90a (no GPU needed), every GEMM config by
    `densenet-fused cost --kernels` (minutes)."""
    import json
    import os
    import subprocess
    import sys

    from densenet_fused.ops import bnrelu_conv1x1 as op1

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SMALL], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["launched"] == got["variants"]
    # the 1x1 forward's configs as its autotuner prunes them: none wider than the 48 output channels
    assert len(got["fwd"]) >= 2 and all(int(c[str(op1._fwd_kernel.arg_names.index("BLOCK_N"))]) == 64
                                        for c in got["fwd"])
    # autotuning: keyed by the tile height and the product precision (Triton adds the tensors' dtypes;
    # it skips key names that are not arguments, so they are checked here), cached across processes
    for name, want in (("fwd", {"C_BUCKET", "COUT", "STATS", "BLOCK_M", "PRECISION"}),
                       ("bwd", {"C_BUCKET", "COUT", "PRECISION", "FINISH"})):
        t = got["tuned"][name]
        assert set(t["keys"]) == want and want <= set(t["args"]) and t["cache"] is True, (name, t)
    assert len(got["compiled"]) == 3
    for name, r in got["compiled"].items():
        assert r["regs"] > 0 and r["spills"] == 0 and r["shared"] <= 227 * 1024, (name, r)


def _fwd_args(dtype, block_m, cout=128, ldw=256):
    x = torch.empty(0, dtype=dtype)
    return dict(X=x, BLOCK_M=block_m, COUT=cout, ldw=ldw)


def test_autotuner_configs_are_pruned_by_the_hardware():
    """The 1x1 autotuners' early_config_prune (what `cost --kernels` compiles): float32 tiles of 128 rows
    that exceed a GPU's shared memory, spilling register loads and tiles wider than the output never
    run; every launch keeps at least one config."""
    from densenet_fused.ops import bnrelu_conv1x1 as op1
    from densenet_fused.ops import tiles
    from densenet_fused.ops._triton_common import SMEM_PER_BLOCK, cost_target
    fits = op1._fwd_tuned.early_config_prune.fits
    assert fits is tiles.CONV1X1_FWD.fits and op1._fwd_tuned.configs == list(tiles.CONV1X1_FWD.candidates)

    def kept(args, arch):
        return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in tiles.CONV1X1_FWD.candidates if fits(c, args, cost_target(arch))]

    bf16_64 = kept(_fwd_args(torch.bfloat16, 64), 90)
    assert (256, 64, 8, 3) not in bf16_64 and (128, 128, 8, 3) in bf16_64  # 256 columns for 128 outputs
    assert (128, 128, 8, 3) not in kept(_fwd_args(torch.float32, 128), 90)  # 288 KB of shared memory
    assert (128, 128, 8, 3) in kept(_fwd_args(torch.bfloat16, 128), 90)
    assert (128, 128, 8, 3) not in kept(_fwd_args(torch.bfloat16, 128), 80)  # 224 KB > 163 KB
    assert (64, 128, 4, 3) not in kept(_fwd_args(torch.bfloat16, 128), 90)  # 256 registers' worth per thread
    assert (64, 128, 4, 3) in kept(_fwd_args(torch.bfloat16, 64), 90)
    assert (64, 128, 4, 3) not in kept(_fwd_args(torch.bfloat16, 64), 80)  # mma.sync: A tile in registers
    assert (128, 32, 4, 4) in kept(_fwd_args(torch.bfloat16, 64), 90)
    assert (128, 32, 4, 4) not in kept(_fwd_args(torch.bfloat16, 64), 80)
    assert kept(_fwd_args(torch.bfloat16, 128, cout=48, ldw=24), 90) == [(64, 64, 8, 3), (64, 32, 4, 4)]
    for arch in (90, 80):  # a bottleneck narrower than every tile (bn_size*k = 16) keeps the narrowest ones
        assert kept(_fwd_args(torch.bfloat16, 64, cout=16, ldw=16), arch), arch
    for dtype in (torch.float32, torch.bfloat16):
        for bm in (64, 128):
            for arch in SMEM_PER_BLOCK:
                for cout, ldw in ((48, 24), (128, 256), (256, 1000)):
                    assert kept(_fwd_args(dtype, bm, cout, ldw), arch), (dtype, bm, arch, cout)
    bwd = op1._bwd_tuned.early_config_prune.fits
    assert bwd is tiles.CONV1X1_BWD.fits and op1._bwd_tuned.configs == list(tiles.CONV1X1_BWD.candidates)
    for finish in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for arch in SMEM_PER_BLOCK:
                args = dict(X=torch.empty(0, dtype=dtype), COUT_PAD=128, FINISH=finish, ldw=256)
                bwd_kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.num_warps, c.num_stages)
                            for c in tiles.CONV1X1_BWD.candidates if bwd(c, args, cost_target(arch))]
                assert bwd_kept, (dtype, arch, finish)
                if arch < 90 and not finish:  # mma.sync: wider or taller tiles spill
                    assert bwd_kept == [(64, 32, 4, 3)]
                if finish:  # the fp32 g2 tile: 4-warp 64-row tiles and 128-row tiles spill
                    assert (64, 32, 4, 3) not in bwd_kept and (128, 32, 8, 2) not in bwd_kept
                    if dtype == torch.float32:  # TF32: 16 x-tile values per thread spill; sm_80: 32 of dB
                        assert (64, 64, 8, 2) not in bwd_kept and (32, 128, 8, 2) not in bwd_kept
                        assert ((64, 32, 8, 2) in bwd_kept) == (arch >= 90) and (32, 32, 8, 2) in bwd_kept
                    else:
                        assert (64, 32, 8, 2) in bwd_kept
                else:
                    assert not set(bwd_kept) & tiles.BWD_FINISH_ONLY


def test_kernels_report_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("checks the refusal under TRITON_INTERPRET=1")
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        cost.main("densenet_bc100_k12", kernels=True)


_COMPILE_EDGES = """
import json, sys
from densenet_fused.tools import cost
from densenet_fused.ops import tiles
from flags import patched
rows = {arch: cost.compile_rows(cost.precision_recordings(cost.record_edges), arch) for arch in (90, 80)}
# a control: the transition's dW tile of 64 rows in full fp32 spills on sm_90a: the count sees spills
with patched(tiles, TRANSITION_TILES=dict(tiles.TRANSITION_TILES, dw={"ieee": (64, 64, 32, 4)}), _chosen={}), \
        cost._allow_tf32(False):
    rec = cost.record_edges(__import__("torch").float32)
rec.triton_calls = [c for c in rec.triton_calls if cost._triton_name(c[0]) == "bnrelu_avgpool_conv1x1._dw_kernel"][:1]
control = cost.compile_rows([("fp32/ieee", rec)], 90)
print(json.dumps(dict(rows=rows, control=control)))
"""


def test_transition_head_and_stem_kernels_compile_without_spills():
    """`cost --kernels --case transition_head_stem`: the fixed tiles of the transition, head and stem
    Triton kernels compile for sm_90a and sm_80 in every dtype / dot precision their CUDA paths launch
    (bf16, fp16, fp32 with and without TF32; fp64 for the stem's max pool, which runs Triton in float64)
    with no spills and within shared memory; a tile known to spill is seen spilling."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # flags.py
    env["PYTHONPATH"] = os.pathsep.join([tests] + env.get("PYTHONPATH", "").split(os.pathsep))
    res = subprocess.run([sys.executable, "-c", _COMPILE_EDGES], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    kernels = {f"bnrelu_avgpool_conv1x1.{k}" for k in ("_fwd_kernel", "_dw_kernel", "_dx_kernel", "_dropped_kernel")}
    kernels |= {"bnrelu_global_avgpool._fwd_kernel", "bnrelu_global_avgpool._bwd_kernel"}
    kernels |= {f"bnrelu_maxpool.{k}" for k in ("_fwd_kernel", "_bwd_sums_kernel", "_bwd_finish_kernel",
                                                "_bwd_dy_kernel")}
    for arch, rows in got["rows"].items():
        assert {r["kernel"] for r in rows} == kernels, arch
        for k in kernels:
            dot = k.split(".")[1] in ("_fwd_kernel", "_dw_kernel", "_dx_kernel") and k.startswith("bnrelu_avgpool")
            want = {"bf16", "fp16"} | ({"fp32/tf32", "fp32/ieee"} if dot else {"fp32"}) | \
                ({"fp64"} if k.startswith("bnrelu_maxpool") else set())
            got_k = {r["dtype"] for r in rows if r["kernel"] == k}
            if k == "bnrelu_maxpool._bwd_finish_kernel":  # fp32 partials in every 16/32-bit dtype: one compile
                want = {"bf16", "fp64"}
            assert got_k == want, (arch, k, got_k)
        assert not [r for r in rows if "error" in r], arch
        # every kernel and dtype spill-free (the transition's full-fp32 GEMMs on their own "ieee" tiles)
        bad = [r for r in rows if r["spills"] != 0]
        assert not bad, (arch, bad)
        assert all(0 < r["regs"] <= 255 for r in rows), arch
    (control,) = got["control"]
    assert control["kernel"] == "bnrelu_avgpool_conv1x1._dw_kernel" and "BLOCK_M=64" in control["config"]
    assert control["spills"] > 0, control
