"""One set-up path (training/inputs.py): train, lr-find, show-batch and evaluate read the same files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_cfg
from PIL import Image

from spinal_transfer.config import TrainConfig
from spinal_transfer.evaluation.evaluate import evaluate
from spinal_transfer.training import lr_find
from spinal_transfer.training.preview import show_batch, training_pipeline
from spinal_transfer.training.train import run


def test_lr_find_show_batch_and_evaluate_see_the_runs_files_under_the_paper_protocol(three_digits, tmp_path,
                                                                                      monkeypatch):
    # the paper protocol with an index rule: val = the train/ + val/ images whose file index % 5 == 0, which
    # is neither the folder's val/ nor what the honest protocol carves
    cfg = tiny_cfg(three_digits, tmp_path / "run", protocol="paper", paper_select_on="val",
                   paper_val_index_mod=[5, 0], epochs=1, limit_train_batches=1, batch_size=16)
    run(cfg)
    recorded = json.loads((tmp_path / "run" / "splits.json").read_text())["splits"]
    files = {k: [str(three_digits / e[0]) for e in recorded[k]] for k in ("train", "val")}
    pool = sorted(str(p) for s in ("train", "val") for p in (three_digits / s).rglob("*.png"))
    assert sorted(files["val"]) == [p for p in pool if int(Path(p).stem) % 5 == 0]
    assert sorted(files["train"]) == [p for p in pool if int(Path(p).stem) % 5 != 0]

    # show-batch: the same training list, and the very grid the run drew of its first batch
    samples, *_ = training_pipeline(cfg)
    assert [p for p, _ in samples] == files["train"]
    preview = show_batch(cfg, tmp_path / "batch.png")
    assert np.array_equal(np.asarray(Image.open(preview.path)),
                          np.asarray(Image.open(tmp_path / "run" / "plots" / "batch.png")))

    # lr-find: the batches it sweeps come from the same training list
    seen = []

    def spy(cfg, model, batches, *args, **kw):
        seen.extend(p for p, _ in batches.batches.dataset.samples)      # the loader the run's SkipLog watches
        raise StopIteration     # the files are all this test needs; no sweep
    monkeypatch.setattr(lr_find, "find_lr_as_run", spy)
    try:
        lr_find.lr_find_for_config(cfg)
    except StopIteration:
        pass
    assert seen == files["train"]

    # evaluate of the checkpoint away from its run folder (no splits.json beside it): the run's val again
    away = tmp_path / "away" / "checkpoints"
    away.mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "best.pt", away / "best.pt")
    ev = evaluate(away / "best.pt", split="val", device="cpu", workers=0)
    assert [p for p, _ in ev.samples] == files["val"] and "made again" in ev.source
    honest = TrainConfig.from_dict({**cfg.to_dict(), "protocol": "honest"})
    assert [p for p, _ in training_pipeline(honest)[0]] != files["train"]       # the protocol matters here


def test_evaluate_away_from_the_run_refuses_a_split_the_changed_folder_makes_again(three_digits, tmp_path):
    """The checkpoint carries its splits' fingerprints: once images are added to a flat folder, the split carved
    again is another one (it may hold training images), and evaluate says so instead of scoring it."""
    from spinal_transfer.errors import DataError

    flat = tmp_path / "flat"
    for d in sorted((three_digits / "train").iterdir()):
        (flat / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:20]:
            shutil.copy(f, flat / d.name)
    run(tiny_cfg(flat, tmp_path / "run", epochs=1, limit_train_batches=1, batch_size=16))
    away = tmp_path / "away" / "checkpoints"
    away.mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "best.pt", away / "best.pt")
    recorded = json.loads((tmp_path / "run" / "splits.json").read_text())["splits"]["test"]
    ev = evaluate(away / "best.pt", device="cpu", workers=0)
    assert sorted(p for p, _ in ev.samples) == sorted(str(flat / e[0]) for e in recorded)    # unchanged: the same
    for d in sorted((three_digits / "train").iterdir()):
        for f in sorted(d.iterdir())[20:26]:
            shutil.copy(f, flat / d.name)
    with pytest.raises(DataError, match=r"^the train/val/test split\(s\) of .* made again from the run's settings "
                                        r"are not those the run used"):
        evaluate(away / "best.pt", device="cpu", workers=0)
    assert len(evaluate(tmp_path / "run", device="cpu", workers=0).samples) == len(recorded)   # its splits.json


def _flat_run(three_digits: Path, tmp_path: Path, name: str = "run", **kw) -> tuple[Path, Path]:
    """A flat folder (20 train images a class, its val and test carved out of it) and a tiny run on it."""
    flat = tmp_path / "flat"
    if not flat.is_dir():
        for d in sorted((three_digits / "train").iterdir()):
            (flat / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:20]:
                shutil.copy2(f, flat / d.name)
    run(tiny_cfg(flat, tmp_path / name, epochs=1, limit_train_batches=1, batch_size=16, **kw))
    return flat, tmp_path / name


def test_evaluate_and_int8_data_of_a_moved_or_copied_run_folder_read_its_recorded_splits(three_digits, tmp_path):
    """--data pointing at the run's data folder at its new place (or at a copy of it) scores the run's recorded
    split there, never all of the folder's images (its training images among them); another folder is read as
    it is."""
    from spinal_transfer.deploy.export import _split_loader
    from spinal_transfer.runs.rundir import load_run_checkpoint

    flat, out = _flat_run(three_digits, tmp_path)
    recorded = json.loads((out / "splits.json").read_text())["splits"]
    copy = tmp_path / "copy"
    shutil.copytree(flat, copy)
    moved = tmp_path / "moved"
    for folder in (copy, flat.rename(moved)):          # a copy while the run's folder is there; then it moved
        ev = evaluate(out, data=folder, device="cpu", workers=0)
        assert [p for p, _ in ev.samples] == [str(folder / e[0]) for e in recorded["test"]]
        assert ev.source.startswith("the run's recorded test split") and f"read under {folder}" in ev.source
    _, n_train, _ = _split_loader(out, load_run_checkpoint(out), "train", 16, 0, data=moved)  # int8 calibration
    assert n_train == len(recorded["train"])
    other = tmp_path / "other"                          # images the run never saw, under other names
    for d in sorted((three_digits / "test").iterdir()):
        shutil.copytree(d, other / d.name)
    ev = evaluate(out, data=other, device="cpu", workers=0)
    assert len(ev.samples) == sum(1 for _ in other.rglob("*.png")) and "(it has no split folders)" in ev.source


def test_evaluate_refuses_a_checkpoint_copied_into_another_runs_folder(three_digits, tmp_path):
    """A checkpoint of one run put in another run's checkpoints/ is not scored on that run's splits.json: its
    test split holds images the checkpoint's run trained on (the split fingerprints differ)."""
    from spinal_transfer.errors import DataError

    _, r2 = _flat_run(three_digits, tmp_path, "r2")
    _, r5 = _flat_run(three_digits, tmp_path, "r5", split_seed=5)
    stray = r2 / "checkpoints" / "r5_best.pt"
    shutil.copy(r5 / "checkpoints" / "best.pt", stray)
    with pytest.raises(DataError, match=r"^the train/val/test split\(s\) recorded in .*r2/splits.json are not those "
                                        r".*r5_best.pt was trained on .* evaluate the checkpoint in its own run"):
        evaluate(stray, device="cpu", workers=0)
    assert len(evaluate(r5, device="cpu", workers=0).samples) == len(evaluate(r2, device="cpu", workers=0).samples)


def test_evaluate_data_lists_every_file_it_did_not_score_and_names_a_class_none_of_whose_images_decode(
        finished_run, three_digits, tmp_path, cli_run, caplog):
    """Another folder's broken files: those its scan skips (empty, not an image) and those that only fail to
    decode (a truncated PNG passes the header check) are all listed in metrics_test.json, the line saying which
    images were evaluated counts those actually scored, and a class left with no decodable image is named."""
    folder = tmp_path / "other"
    good = sorted((three_digits / "test" / "digit_0").glob("*.png"))[:6]
    (folder / "digit_0").mkdir(parents=True)
    (folder / "digit_1").mkdir()
    for f in good:
        shutil.copy(f, folder / "digit_0")
    (folder / "digit_0" / "empty.png").write_bytes(b"")                            # the scan skips it
    (folder / "digit_0" / "notes.png").write_text("not an image")                  # the scan skips it
    whole = sorted((three_digits / "test" / "digit_1").glob("*.png"))[0].read_bytes()
    for k in range(3):                                                             # pass the header, fail to decode
        (folder / "digit_1" / f"cut{k}.png").write_bytes(whole[:len(whole) // 2])
    r = cli_run("evaluate", finished_run, "--data", folder, "--out", tmp_path / "ev", "--workers", "0")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    skipped = {Path(p).name for p, _ in metrics["skipped_files"]}
    assert skipped == {"empty.png", "notes.png", "cut0.png", "cut1.png", "cut2.png"}
    assert metrics["num_skipped_files"] == 5 and metrics["num_samples"] == len(good)
    assert f"all 9 images of {folder} (it has no split folders); 6 of them scored, 3 could not be decoded" in r.stderr
    assert "no image of 1 class(es) could be decoded, so the metrics say nothing of them: digit_1" in caplog.text
