"""The shared trainer on a tiny synthetic regression (a 2-layer MLP, a seeded dataset).

Run as a script (``python tests/test_trainer.py RUN_DIR STEPS [KILL_AT]``) it trains the same toy
in a fresh process, SIGKILLing itself when asked to fetch micro-batch KILL_AT: the resume test uses it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

import minivln.paths as paths_mod
from minivln.config import ConfigError, load_config
from minivln.training import checkpoint as ckpt_mod
from minivln.training.checkpoint import find_checkpoint, load_checkpoint, read_meta
from minivln.training.distributed import GlobalBatchSampler, seed_everything
from minivln.training.logging import read_jsonl
from minivln.training.trainer import (
    LossTerm,
    OptimConfig,
    TaskOutput,
    TrainConfig,
    Trainer,
    WarmupDecay,
    make_optimizer,
    param_groups,
)

# ----------------------------------------------------------------------------------------- the toy


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, d_hidden: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.drop(torch.tanh(self.norm(self.fc1(x))))
        return self.fc2(h).squeeze(-1), h


class RegressionTask:
    """y = sin(x . w) on 64 seeded points; batches from a resumable, rank-sharded sampler."""

    def __init__(self, global_batch: int = 8, seed: int = 0, kill_at: int | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(64, 4, generator=g)
        self.y = torch.sin(self.x @ torch.randn(4, generator=g))
        self.sampler = GlobalBatchSampler(64, global_batch, seed, rank=rank, world_size=world_size)
        self.kill_at = kill_at
        self.teacher_saw_grad = False

    def next_batch(self, index: int) -> dict[str, torch.Tensor]:
        if index == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        idx = self.sampler.next()
        return {"x": self.x[idx], "y": self.y[idx]}

    def compute(self, model: nn.Module, batch: dict, teacher: nn.Module | None = None) -> TaskOutput:
        pred, h = model(batch["x"])
        loss = F.mse_loss(pred, batch["y"])
        teacher_outputs = None
        if teacher is not None:
            # called with an input that requires grad: the trainer must still keep the teacher grad-free
            _, th = teacher(batch["x"].clone().requires_grad_(True))
            self.teacher_saw_grad |= th.requires_grad
            teacher_outputs = {"hidden": th}
        return TaskOutput(loss=loss, metrics={"mse": loss.detach()}, outputs={"hidden": h},
                          teacher_outputs=teacher_outputs)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class HiddenMatch(LossTerm):
    """Match the student's hidden state to the teacher's through a learnable projection W_h."""

    def __init__(self, d_student: int = 16, d_teacher: int = 8, weight: float = 0.5) -> None:
        super().__init__("hidden", weight)
        self.proj = nn.Linear(d_student, d_teacher, bias=False)

    def forward(self, outputs, teacher_outputs, batch) -> torch.Tensor:
        return F.mse_loss(self.proj(outputs["hidden"]), teacher_outputs["hidden"])


def make_cfg(run_dir: Path, **kw) -> TrainConfig:
    optim = OptimConfig(lr=kw.pop("lr", 1e-2), warmup_steps=2, schedule=kw.pop("schedule", "cosine"))
    base = dict(run_dir=str(run_dir), max_steps=20, log_every=2, ckpt_every=0, progress=False, device="cpu",
                seed=0, optim=optim)
    base.update(kw)
    return TrainConfig(**base)


def build(run_dir: Path, *, teacher: bool = False, kill_at: int | None = None, dropout: float = 0.1, **kw):
    """Model, task and (optionally) teacher + loss term, built reproducibly; returns a Trainer."""
    seed_everything(0)
    model = MLP(dropout=dropout)
    teacher_model = MLP(d_hidden=8, dropout=0.0) if teacher else None
    terms = [HiddenMatch()] if teacher else []
    validate = kw.pop("validate", None)
    task = RegressionTask(kill_at=kill_at)
    return Trainer(model, task, make_cfg(run_dir, **kw), teacher=teacher_model, loss_terms=terms, validate=validate)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "log.jsonl") if r["kind"] == "train"]


# ----------------------------------------------------------------------------------------- tests


def test_loss_decreases_and_logs_and_config(tmp_path):
    run = tmp_path / "run"
    trainer = build(run, max_steps=40)
    last = trainer.fit()
    trainer.close()
    recs = train_records(run)
    assert [r["step"] for r in recs] == list(range(2, 41, 2))
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]
    assert last["step"] == 40
    for key in ("loss", "mse", "lr", "grad_norm", "it_s", "time"):
        assert key in recs[0]
    assert load_config(TrainConfig, run / "config.yaml") == trainer.cfg
    assert find_checkpoint(run / "latest") is not None and read_meta(run / "latest")["step"] == 40
    # a fresh run must not silently overwrite the old one
    with pytest.raises(FileExistsError, match="resume"):
        build(run, max_steps=40)


def test_schedule_and_weight_decay_groups():
    f = WarmupDecay(warmup_steps=4, total_steps=14, schedule="linear", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    c = WarmupDecay(0, 10, "cosine")
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0)
    assert WarmupDecay(2, 10, "constant")(7) == 1.0
    decay, no_decay = param_groups(MLP(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(p.shape for p in decay["params"]) == [torch.Size([1, 16]), torch.Size([16, 4])]
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_optimizer_implementations_agree_and_resume_across():
    """'auto' is fused on CPU; fused, foreach and per-tensor AdamW make the same updates (up to
    rounding), and a per-tensor optimizer's state goes on in a fused one (a run resumed on new code)."""
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in MLP().parameters()] for _ in range(4)]

    def run(impl: str, steps: range, state: dict | None = None, start: MLP | None = None):
        torch.manual_seed(1)
        model = start if start is not None else MLP()
        opt = make_optimizer(param_groups(model, 0.05), OptimConfig(lr=0.1, implementation=impl))
        if state is not None:
            opt.load_state_dict(state)
        for i in steps:
            for p, g in zip(model.parameters(), grads[i]):
                p.grad = g.clone()
            opt.step()
        return model, opt

    assert run("auto", range(0))[1].defaults["fused"] is True
    single, foreach = run("single", range(0))[1].defaults, run("foreach", range(0))[1].defaults
    assert single["foreach"] is False and not single["fused"] and foreach["foreach"] is True
    ref, _ = run("single", range(4))
    for impl in ("fused", "foreach", "auto"):
        other, _ = run(impl, range(4))
        for a, b in zip(ref.parameters(), other.parameters()):
            torch.testing.assert_close(b, a, msg=impl)
    half, opt = run("single", range(2))
    resumed, _ = run("fused", range(2, 4), state=opt.state_dict(), start=half)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a)
    cfg = TrainConfig(run_dir="x")
    cfg.optim.implementation = "adam"
    with pytest.raises(ConfigError, match="optim.implementation"):
        cfg.check()


def _train(run_dir: Path, steps: int, kill_at: int | None = None) -> None:
    """Teacher, loss term, dropout, accumulation, warm-up + cosine: everything resume must restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = build(run_dir, teacher=True, kill_at=kill_at, max_steps=steps, ckpt_every=3,
                        grad_accum_steps=2, resume=(run_dir / "latest").exists(), ema_decay=0.8, ema_start=4)
        trainer.fit()
        trainer.close()
    finally:
        torch.set_num_threads(threads)


def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL a run in step 8 of 10 (checkpoints every 3), resume it: same bits as an unbroken run."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    kill_at = 7 * 2 + 1  # micro-batch index: the second micro-batch of the 8th step
    proc = subprocess.Popen([sys.executable, __file__, str(broken), "10", str(kill_at)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _train(straight, 10)  # meanwhile, the unbroken run, in this process
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out
    assert read_meta(broken / "latest")["step"] == 6
    with pytest.warns(UserWarning, match="taking over the lock"):  # the killed writer's lock is stale
        _train(broken, 10)  # resume

    a, b = load_checkpoint(straight / "latest"), load_checkpoint(broken / "latest")
    assert a.step == b.step == 10
    ea, eb = load_checkpoint(straight / "ema", with_trainer=False), load_checkpoint(broken / "ema", with_trainer=False)
    assert ea.meta["ema_updates"] == eb.meta["ema_updates"] == 6  # steps 5..10
    for k in ea.model:  # the weight average resumes exactly too
        assert torch.equal(ea.model[k], eb.model[k]), f"ema {k} differs after resume"
    for name in ("model", "loss_terms"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"
    # the log reads as one run: every step once, and the same losses
    ra, rb = train_records(straight), train_records(broken)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [2, 4, 6, 8, 10]
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]


def test_weight_average_is_the_exponential_average_of_the_steps(tmp_path):
    """ema_decay d from ema_start s: after step s the average is the weights, then
    avg = d * avg + (1 - d) * w after every step; RUN/ema holds it; off (0) writes no ema/."""
    seen = []

    class Recording(RegressionTask):
        def next_batch(self, index):
            seen.append({k: v.clone() for k, v in trainer.model.state_dict().items()})  # weights before the step
            return super().next_batch(index)

    seed_everything(0)
    trainer = Trainer(MLP(dropout=0.0), Recording(), make_cfg(tmp_path / "run", max_steps=6, ema_decay=0.5, ema_start=2))
    trainer.fit()
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    after = seen[1:] + [final]  # weights after steps 1..6
    expected = {k: v.float().clone() for k, v in after[2].items()}  # restart after step 3 (2 steps before it)
    for w in after[3:]:
        for k in expected:
            expected[k] = 0.5 * expected[k] + 0.5 * w[k]
    ema = load_checkpoint(tmp_path / "run" / "ema", with_trainer=False)
    assert ema.meta["ema_updates"] == 4 and ema.step == 6
    for k, v in expected.items():
        assert torch.allclose(ema.model[k], v, atol=1e-6), k
    assert not torch.allclose(ema.model["fc1.weight"], final["fc1.weight"])
    trainer = build(tmp_path / "plain", max_steps=2)
    trainer.fit()
    trainer.close()
    assert not (tmp_path / "plain" / "ema").exists()
    with pytest.raises(ConfigError, match="ema_decay"):
        make_cfg(tmp_path / "x", ema_decay=1.0).check()


def test_resume_with_another_architecture_is_one_error_line(tmp_path):
    """--resume with a model of other shapes than the checkpoint's: one CheckpointError naming the run
    and what differs, not a state-dict traceback."""
    from minivln.model.checkpoint import CheckpointError

    trainer = build(tmp_path / "run", max_steps=2, ckpt_every=1)
    trainer.fit()
    trainer.close()
    seed_everything(0)
    with pytest.raises(CheckpointError, match=r"cannot resume .*run.*fc1\.weight") as err:
        Trainer(MLP(d_hidden=8), RegressionTask(), make_cfg(tmp_path / "run", max_steps=2, resume=True))
    assert "16 vs 8" in str(err.value)


def test_teacher_frozen_and_loss_term_trained_saved_restored(tmp_path):
    run = tmp_path / "run"
    trainer = build(run, teacher=True, max_steps=6)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    proj_before = trainer.loss_terms[0].proj.weight.detach().clone()
    trainer.fit()
    trainer.close()
    teacher = trainer.teacher
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not trainer.task.teacher_saw_grad
    proj = trainer.loss_terms[0].proj.weight.detach()
    assert not torch.equal(proj, proj_before)  # W_h is optimised
    assert any(p is trainer.loss_terms[0].proj.weight for g in trainer.optimizer.param_groups for p in g["params"])
    saved = load_file(run / "latest" / "loss_terms.safetensors")
    assert torch.equal(saved["hidden.proj.weight"], proj)
    rec = train_records(run)[-1]
    assert {"loss", "loss/task", "loss/hidden"} <= rec.keys()
    # a resumed trainer gets W_h back
    again = build(run, teacher=True, max_steps=6, resume=True)
    assert again.step == 6 and torch.equal(again.loss_terms[0].proj.weight.detach(), proj)


def test_resume_with_a_longer_schedule(tmp_path):
    run = tmp_path / "run"
    first = build(run, max_steps=4, log_every=1, schedule="linear")
    first.fit()
    first.close()
    with pytest.warns(UserWarning, match="max_steps differ"):
        longer = build(run, max_steps=8, log_every=1, schedule="linear", resume=True)
    longer.fit()
    longer.close()
    lrs = [r["lr"] for r in train_records(run)]
    # warm-up over 2 steps, then linear decay towards 0 at step 4 (first run), at step 8 once resumed
    assert lrs == pytest.approx([1e-2 * f for f in (1 / 2, 1, 1, 1 / 2, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])


def test_crash_while_writing_leaves_latest_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = build(run, max_steps=4, ckpt_every=2)
    real_save = ckpt_mod.save_file
    calls = {"n": 0}

    def failing_save(tensors, path):  # the second checkpoint dies half-written
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    trainer.close()
    assert read_meta(run / "latest")["step"] == 2
    assert load_checkpoint(run / "latest").trainer["step"] == 2
    assert not (run / ".latest.tmp").exists()
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)

    # a crash between the two renames of the swap: the old checkpoint is parked and found again
    real_rename = paths_mod._rename

    def rename_once(src, dst):
        if Path(src).name == ".latest.tmp":
            raise KeyboardInterrupt  # killed right after parking the old one
        real_rename(src, dst)

    monkeypatch.setattr(paths_mod, "_rename", rename_once)
    resumed = build(run, max_steps=4, ckpt_every=2, resume=True)
    assert resumed.step == 2
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()
    resumed.close()
    assert not (run / "latest").exists() and (run / ".latest.old").exists()
    monkeypatch.setattr(paths_mod, "_rename", real_rename)
    again = build(run, max_steps=4, ckpt_every=2, resume=True)
    assert again.step == 2 and (run / "latest" / "meta.json").is_file()
    again.fit()
    again.close()
    assert read_meta(run / "latest")["step"] == 4


@pytest.mark.parametrize("mode, best_step", [("max", 4), ("min", 2)])
def test_best_checkpoint_rule_and_plot(tmp_path, mode, best_step):
    values = iter([0.1, 0.5, 0.3, 0.4])

    def validate(model):
        assert not model.training and not torch.is_grad_enabled()
        v = next(values)
        return {"val_unseen": {"sr": v + 0.1, "spl": v}, "val_seen": {"spl": 0.9}, "note": "x"}

    run = tmp_path / "run"
    trainer = build(run, max_steps=8, val_every=2, best_metric="val_unseen.spl", best_mode=mode, validate=validate)
    trainer.fit()
    trainer.close()
    meta = read_meta(run / "best")
    assert meta["step"] == best_step and meta["best"]["metric"] == "val_unseen.spl"
    assert trainer.best == {"metric": "val_unseen.spl", "value": {"max": 0.5, "min": 0.1}[mode], "step": best_step}
    assert not (run / "best" / "trainer.pt").exists()  # weights only
    vals = [r for r in read_jsonl(run / "log.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [2, 4, 6, 8]
    assert vals[0]["val_unseen.spl"] == 0.1 and "note" not in vals[0]
    if mode == "max":
        from minivln.cli import main

        assert main(["plot", str(run)]) == 0
        png = (run / "curves.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_unknown_best_metric_is_an_error(tmp_path):
    trainer = build(tmp_path / "run", max_steps=2, best_metric="val_unseen.spl",
                    validate=lambda m: {"val_seen": {"spl": 1.0}})
    with pytest.raises(KeyError, match="val_seen.spl"):
        trainer.fit()
    trainer.close()


def test_sampler_resumes_and_shards():
    s = GlobalBatchSampler(10, 4, seed=3)
    first = [s.next_global() for _ in range(3)]  # 2 batches per epoch: the 3rd starts epoch 1
    assert all(len(b) == 4 for b in first) and len(set(first[0] + first[1])) == 8
    state = s.state_dict()
    after = [s.next_global() for _ in range(3)]
    t = GlobalBatchSampler(10, 4, seed=3)
    t.load_state_dict(state)
    assert [t.next_global() for _ in range(3)] == after
    halves = [GlobalBatchSampler(10, 4, seed=3, rank=r, world_size=2).next() for r in (0, 1)]
    assert halves[0] + halves[1] == first[0]


if __name__ == "__main__":
    _train(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)


def test_log_window_averages_each_key_over_its_own_steps():
    from minivln.training.trainer import _Window

    w = _Window()
    w.add({"loss": torch.tensor(1.0), "loss/mlm": torch.tensor(4.0)})
    w.add({"loss": torch.tensor(3.0)})
    w.add({"loss": torch.tensor(5.0), "loss/mlm": torch.tensor(2.0)})
    assert w.means() == {"loss": 3.0, "loss/mlm": 3.0}
    assert w.means() == {}


def test_wall_time_budget_stops_validates_and_saves(tmp_path, monkeypatch):
    import minivln.training.trainer as T

    clock = iter(range(0, 10_000, 30))  # every perf_counter() call advances 30 s
    monkeypatch.setattr(T.time, "perf_counter", lambda: float(next(clock)))
    seen = []
    run = tmp_path / "run"
    trainer = build(run, max_steps=100, max_minutes=2.0, val_every=0,
                    validate=lambda m: seen.append(1) or {"val_unseen": {"spl": 0.5}})
    trainer.fit()
    trainer.close()
    step = read_meta(run / "latest")["step"]
    assert 1 < step < 100 and trainer.step == step
    recs = read_jsonl(run / "log.jsonl")
    assert [r for r in recs if r["kind"] == "stop"] == [
        {"kind": "stop", "step": step, "reason": "max_minutes", "max_minutes": 2.0}]
    assert seen == [1] and [r["step"] for r in recs if r["kind"] == "val"] == [step]
    assert recs[-1]["kind"] in ("val", "train")


def test_plot_draws_one_panel_per_logged_metric_even_with_one_validation(tmp_path):
    from minivln.training.logging import read_jsonl
    from minivln.training.plot import plot_run, validation_metrics

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"kind": "train", "step": s, "loss": 3.0 / s, "loss/task": 2.0 / s} for s in range(1, 6)]
    recs.append({"kind": "val", "step": 5, "val_unseen.sr": 0.25, "val_unseen.spl": 0.2,
                 "val_seen.sr": 0.3, "val_unseen.nav_error": 7.5})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    val = [r for r in read_jsonl(run / "log.jsonl") if r["kind"] == "val"]
    assert validation_metrics(val) == ["sr", "spl", "nav_error"]
    assert validation_metrics([{"step": 1, "val_seen.sap_fused_acc": 0.5, "val_seen.mlm_acc": 0.1}]) == [
        "sap_fused_acc", "mlm_acc"]
    out = plot_run(run)
    assert out == run / "curves.png" and out.read_bytes()[:4] == b"\x89PNG"
