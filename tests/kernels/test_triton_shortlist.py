"""The Triton autotune shortlist (triton_launch.shortlist), checked on the CPU: RETRO_TRITON_AUTOTUNE
picks the mode, the launchers hand the autotuner the shortlist (or launch its first directly for
RETRO_TRITON_AUTOTUNE=0), and every shortlisted configuration is one the full autotune space admits
at the same block sizes, so tests/kernels/test_triton_compile.py's sm_90 compiles cover it."""
import pytest
import torch

pytest.importorskip("triton")
from retro_kernels.ops.block_attention import triton_launch  # noqa: E402
from tests.kernels.test_triton_compile import Q_ROWS  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def described(configs) -> list[tuple[int, int, int]]:
    return [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.parametrize("knob, mode", [(None, "shortlist"), ("", "shortlist"), ("1", "shortlist"),
                                        ("shortlist", "shortlist"), ("0", "default"), ("full", "autotune")])
def test_the_knob_picks_the_mode(monkeypatch, knob, mode):
    monkeypatch.setattr(triton_launch, "_INTERPRET", False)
    if knob is None:
        monkeypatch.delenv("RETRO_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("RETRO_TRITON_AUTOTUNE", knob)
    assert triton_launch._mode() == mode


def test_a_bad_knob_is_named(monkeypatch):
    monkeypatch.setattr(triton_launch, "_INTERPRET", False)
    monkeypatch.setenv("RETRO_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="RETRO_TRITON_AUTOTUNE is 'yes', expected one of"):
        triton_launch._mode()


def test_shortlists_are_short_and_inside_the_full_space():
    """For every dtype, head_dim 1..256 and q_rows: the shortlist mode keeps 2-3 configurations (2
    for float32, ptxas being slow there), at the block sizes of the full space and among its fitting
    configurations; RETRO_TRITON_AUTOTUNE=0 runs the shortlist's first."""
    for dtype in DTYPES:
        for backward in (False, True):
            for head_dim in range(1, 257):
                for q_rows in Q_ROWS:
                    full, short, one = (triton_launch.candidate_configs(dtype, head_dim, q_rows, backward, mode)
                                        for mode in ("autotune", "shortlist", "default"))
                    where = (dtype, head_dim, q_rows, "backward" if backward else "forward")
                    assert (short.block_m, short.block_d, short.float32_partials) == \
                        (full.block_m, full.block_d, full.float32_partials), where
                    assert set(short.configs) <= set(full.configs), where
                    assert 2 <= len(short.configs) <= (2 if dtype == torch.float32 else 3) or \
                        len(full.configs) < 2, where
                    assert one.configs == short.configs[:1] and one.block_m == short.block_m, where


def test_paper_shapes_shortlist():
    """What the 16-bit CCA of the paper's shapes (chunks of 64, head_dim 64 and 128) times."""
    pick = triton_launch.candidate_configs
    assert described(pick(torch.bfloat16, 64, 64, False, "shortlist").configs) == [(128, 8, 3), (64, 4, 3),
                                                                                    (128, 8, 4)]
    assert described(pick(torch.bfloat16, 128, 64, False, "shortlist").configs) == [(64, 4, 3), (128, 8, 3),
                                                                                     (64, 8, 2)]
    assert described(pick(torch.bfloat16, 64, 64, True, "shortlist").configs) == [(64, 4, 2), (32, 4, 1),
                                                                                   (64, 8, 2)]


class Recorder:
    """Stands in for a kernel (kernel[grid](...)) or the autotuner: records each launch's keywords."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append(kw)


@pytest.mark.parametrize("mode", ["shortlist", "default"])
def test_the_launchers_use_the_shortlist(monkeypatch, mode):
    """A bfloat16 forward and backward (head_dim 64, chunks of 64 rows): in the shortlist mode the
    autotuner is launched and its pruning hands it the shortlist; with RETRO_TRITON_AUTOTUNE=0 the
    kernel is launched directly with the shortlist's first configuration."""
    monkeypatch.setattr(triton_launch, "_MODE", mode)
    kernels = {name: Recorder() for name in ("_fwd", "_bwd", "block_attention_fwd_kernel",
                                              "block_attention_bwd_kernel")}
    for name, recorder in kernels.items():
        monkeypatch.setattr(triton_launch, name, recorder)
    B, T, H, D, G, keys = 1, 128, 2, 64, 2, 32
    q = torch.randn(B, T, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, G, keys, H, D, dtype=torch.bfloat16) for _ in range(2))
    out, lse = triton_launch.forward(q, k, v, None, 64, G, 0, 0.125)
    triton_launch.backward(torch.randn_like(q), q, k, v, None, out, lse, 64, G, 0, 0.125)
    for backward, (tuned, direct) in enumerate((("_fwd", "block_attention_fwd_kernel"),
                                                ("_bwd", "block_attention_bwd_kernel"))):
        expected = triton_launch.candidate_configs(torch.bfloat16, D, 64, bool(backward), mode)
        assert expected.configs == tuple(triton_launch.shortlist(torch.bfloat16, 64, 64, bool(backward))[
            :1 if mode == "default" else 3])
        if mode == "shortlist":
            assert len(kernels[tuned].launches) == 1 and not kernels[direct].launches
            assert kernels[tuned].launches[0]["BLOCK_M"] == expected.block_m == 64
            pruned = triton_launch._prune(bool(backward))(triton_launch.CONFIGS["autotune"][backward],
                                                          {"Q": q, "head_dim": D, "q_rows": 64})
            assert pruned == list(expected.configs)
        else:
            assert len(kernels[direct].launches) == 1 and not kernels[tuned].launches
            config = expected.configs[0]
            launch = kernels[direct].launches[0]
            assert (launch["BLOCK_N"], launch["num_warps"], launch["num_stages"]) == \
                (config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def test_the_autotuners_prune_with_the_launchers_choice():
    """The real autotuners' early pruning is candidate_configs of the process's mode."""
    for backward, tuner in enumerate((triton_launch._fwd, triton_launch._bwd)):
        q = torch.empty(1, 8, 1, 64, dtype=torch.float16)
        got = tuner.early_config_prune(tuner.configs, {"Q": q, "head_dim": 64, "q_rows": 8})
        assert got == list(triton_launch.candidate_configs(torch.float16, 64, 8, bool(backward)).configs)
