"""Metrics writer: JSONL rows, and progress as plain lines when there is no bar (pipeline, logs, pipes)."""
from jalign.metrics import MetricsWriter, progress_line, read_metrics


def _run(writer, steps, log_every):
    """What the trainer does: write + progress at log steps (their metrics carry tokens_per_s), progress
    alone otherwise."""
    for step in range(1, steps + 1):
        metrics = {"loss": 1.0 / step, "lr": 1e-3, "num_tokens": 64.0}
        if step % log_every == 0 or step == steps:
            metrics["tokens_per_s"] = 1234.5
            writer.write(step, metrics)
        writer.progress(step, metrics)
    writer.close()


def test_without_progress_bar_one_line_per_log_step(tmp_path, capsys):
    _run(MetricsWriter(tmp_path, total_steps=10, tensorboard=False, progress=False), steps=10, log_every=4)
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert "loss 0.25" in lines[0] and "lr 0.001" in lines[0] and "tokens/s 1.2k" in lines[0]
    assert "elapsed 0:00" in lines[0] and "ETA 0:00" in lines[-1]
    assert [r["step"] for r in read_metrics(tmp_path)] == [4, 8, 10]


def test_progress_on_but_not_a_terminal_prints_lines_not_a_bar(tmp_path, capsys):
    # capsys replaces stdout/stderr with non-terminals: what a log file or a pipe sees
    writer = MetricsWriter(tmp_path, total_steps=6, tensorboard=False, progress=True)
    assert writer.bar is None
    _run(writer, steps=6, log_every=3)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    assert [line.split("  ")[0] for line in captured.out.splitlines()] == ["step 3/6", "step 6/6"]


def test_progress_line_fields():
    line = progress_line(40, 500, {"loss": 0.81234, "lr": 0.00199, "tokens_per_s": 21345.0, "kl": 0.5,
                                   "skipped": 0.0}, elapsed=3725.0, eta=None)
    assert line == "step 40/500  loss 0.8123  kl 0.5  lr 0.00199  tokens/s 21k  elapsed 1:02:05  ETA ?"
    assert progress_line(5, 5, {}, elapsed=65.0, eta=0.0) == "step 5/5  elapsed 1:05  ETA 0:00"


def test_eta_is_the_mean_rate_after_the_first_step(tmp_path, monkeypatch):
    import jalign.metrics as metrics_lib

    clock = iter([100.0, 110.0, 150.0])  # writer start, after step 1 (compiles), after step 5
    monkeypatch.setattr(metrics_lib.time, "time", lambda: next(clock))
    writer = MetricsWriter(tmp_path, total_steps=9, tensorboard=False, progress=False)
    writer.progress(1, {})
    assert writer._eta(5, 150.0) == (9 - 5) * (150.0 - 110.0) / (5 - 1)
    writer.close()
