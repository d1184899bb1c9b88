"""Learning-rate factors against hand-computed values, and the optimizer/scheduler built from config."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.config import OptimizerConfig
from medseg.engine.schedules import build_optimizer, build_scheduler, lr_factor


@pytest.mark.parametrize(("epoch", "want"), [(0, 1.0), (5, 0.5 ** 0.9), (9, 0.1 ** 0.9), (10, 0.0), (15, 0.0)])
def test_poly(epoch: int, want: float) -> None:
    assert lr_factor(epoch, 10, "poly") == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("epoch", "want"), [(0, 1.0), (3, 0.5 * (1 + math.cos(0.3 * math.pi))), (5, 0.5),
                                             (10, 0.0), (12, 0.0)])
def test_cosine(epoch: int, want: float) -> None:
    assert lr_factor(epoch, 10, "cosine") == pytest.approx(want, abs=1e-12)
    assert 0.5 * (1 + math.cos(0.3 * math.pi)) == pytest.approx(0.7938926, abs=1e-7)  # the value written out


def test_warmup_is_linear_then_the_schedule_starts_from_one() -> None:
    # 4 warm-up epochs of 10: 1/5 .. 4/5, then poly over the remaining 6 epochs
    got = [lr_factor(e, 10, "poly", warmup_epochs=4) for e in range(11)]
    want = [0.2, 0.4, 0.6, 0.8, 1.0, (5 / 6) ** 0.9, (4 / 6) ** 0.9, 0.5 ** 0.9, (2 / 6) ** 0.9, (1 / 6) ** 0.9, 0.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert lr_factor(5, 10, "cosine", warmup_epochs=4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert lr_factor(4, 4, "poly", warmup_epochs=4) == 1.0  # no epochs left after warm-up: span clamps to 1


def test_none_is_constant_after_warmup() -> None:
    assert [lr_factor(e, 5, "none") for e in range(7)] == [1.0] * 7
    assert [lr_factor(e, 5, "none", warmup_epochs=1) for e in range(3)] == [0.5, 1.0, 1.0]


def test_optimizers_from_config() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(params, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 0.01)
    adam = build_optimizer(params, OptimizerConfig(lr=3e-4, weight_decay=1e-5))
    assert isinstance(adam, torch.optim.AdamW)
    assert (adam.param_groups[0]["lr"], adam.param_groups[0]["weight_decay"]) == (3e-4, 1e-5)


def test_scheduler_steps_per_epoch_and_resumes_exactly() -> None:
    cfg = OptimizerConfig(name="sgd", lr=0.1, scheduler="poly", warmup_epochs=2)

    def fresh():
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
        return opt, build_scheduler(opt, cfg, total_epochs=8)

    opt, sched = fresh()
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [0.1 * f for f in (1 / 3, 2 / 3, 1.0, (5 / 6) ** 0.9, (4 / 6) ** 0.9, 0.5 ** 0.9, (2 / 6) ** 0.9, (1 / 6) ** 0.9)]
    assert lrs == pytest.approx(want, abs=1e-12)

    opt_a, sched_a = fresh()
    for _ in range(3):
        opt_a.step()
        sched_a.step()
    opt_b, sched_b = fresh()  # a resumed run: state dicts from epoch 3
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] == pytest.approx(0.1 * (5 / 6) ** 0.9)
    for _ in range(2):
        for o, s in ((opt_a, sched_a), (opt_b, sched_b)):
            o.step()
            s.step()
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 0.9)


def test_time_budget_span_moves_the_schedule_on_when_time_runs_ahead() -> None:
    # 1000 epochs planned but 60 % of the time budget spent: the poly factor is that of 60 % progress
    assert lr_factor(3, 1000, "poly", time_fraction=0.6) == pytest.approx(0.4**0.9)
    assert lr_factor(900, 1000, "poly", time_fraction=0.1) == pytest.approx(0.1**0.9)  # epochs ahead: they count
    assert lr_factor(0, 10, "poly", warmup_epochs=2, time_fraction=0.9) == pytest.approx(1 / 3)  # warm-up first

    spent = {"f": 0.0}
    cfg = OptimizerConfig(lr=1.0, scheduler="poly", schedule_span="time_budget")
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_scheduler(opt, cfg, total_epochs=1000, time_fraction=lambda: spent["f"])
    lrs = []
    for f in (0.25, 0.5, 0.99):
        spent["f"] = f
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.75**0.9, 0.5**0.9, 0.01**0.9])
    # the epoch span (the default) ignores the clock
    plain = OptimizerConfig(lr=1.0, scheduler="poly")
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(1))], plain)
    sched2 = build_scheduler(opt2, plain, total_epochs=1000, time_fraction=lambda: 0.99)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx((999 / 1000) ** 0.9)


def test_time_budget_span_needs_a_budget() -> None:
    from medseg.config import Config

    with pytest.raises(ValueError, match="needs train.max_minutes"):
        Config.model_validate({"optimizer": {"schedule_span": "time_budget"}})
    Config.model_validate({"optimizer": {"schedule_span": "time_budget"}, "train": {"max_minutes": 1}})
