"""`spinal-transfer audit`: exact duplicates and leaks against hashes computed here, near duplicates at the default
thresholds on a backbone whose features mean something (pre-trained on other digits), flipped labels ranked first,
the page in Chromium, the command's refusals."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import chromium_or_skip, truncated_jpeg
from PIL import Image

from spinal_transfer.config import TrainConfig
from spinal_transfer.evaluation.browser import render
from spinal_transfer.experiments.audit import audit, class_counts_line

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_audit import save_variant  # noqa: E402

TINY = ("--backbone", "timm/test_resnet", "--weights", "none", "--img-size", "32", "--workers", "0",
        "--batch-size", "64")
EXACT_ONLY = ("--threshold", "1", "--hash-bits", "0")     # random-init features: near duplicates mean nothing


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pixels(path: Path) -> bytes:
    im = np.asarray(Image.open(path).convert("RGB"))
    return repr(im.shape).encode() + im.tobytes()


@pytest.fixture(scope="module")
def leaky(three_digits, tmp_path_factory) -> dict:
    """A copy of the three-digit folder with known exact duplicates (one under another class) and an undecodable
    file, audited via the CLI."""
    root = tmp_path_factory.mktemp("leaky") / "digits"
    shutil.copytree(three_digits, root)
    tests = sorted((root / "test").rglob("*.png"))
    for p in tests[:3]:                                     # byte copies into train
        shutil.copyfile(p, root / "train" / p.parent.name / f"copy_{p.name}")
    p = tests[4]                                            # a byte copy into train under another class
    other = next(c for c in sorted(d.name for d in (root / "train").iterdir()) if c != p.parent.name)
    shutil.copyfile(p, root / "train" / other / f"mislabelled_{p.name}")
    p = tests[3]                                            # same pixels, other bytes, into val
    Image.open(p).save(root / "val" / p.parent.name / f"resaved_{p.name}", compress_level=0)
    p = sorted((root / "train").rglob("*.png"))[0]          # a duplicate within train
    shutil.copyfile(p, p.with_name(f"twin_{p.name}"))
    truncated_jpeg(root / "train" / p.parent.name / "broken.jpg")
    return {"root": root, "out": tmp_path_factory.mktemp("leaky_audit") / "audit"}


@pytest.fixture(scope="module")
def leaky_run(leaky):
    from spinal_transfer.cli import main

    code = main(["audit", "--data", str(leaky["root"]), "--out", str(leaky["out"]), *TINY, *EXACT_ONLY])
    assert code == 0
    return leaky


def test_exact_duplicates_across_splits_are_found_and_counted(leaky_run, capsys):
    root, out = leaky_run["root"], leaky_run["out"]
    # the expected groups, computed here: same sha256 of the bytes, or same PIL-decoded pixels
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".png")
    by_bytes, by_pixels = {}, {}
    for p in files:
        by_bytes.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(str(p))
        by_pixels.setdefault(hashlib.sha256(_pixels(p)).hexdigest(), []).append(str(p))
    want = {frozenset(g) for g in list(by_bytes.values()) + list(by_pixels.values()) if len(g) > 1}
    rows = csv_rows(out / "audit.csv")
    assert not [r for r in rows if r["kind"] == "small_image"]         # a folder of small images is not flagged
    exact = [r for r in rows if r["kind"] == "exact_duplicate"]
    assert {frozenset((r["path"], r["other_path"])) for r in exact} == want
    assert len(want) == 6
    split = lambda p: Path(p).relative_to(root).parts[0]                   # noqa: E731
    order = {"train": 0, "val": 1, "test": 2}
    for r in exact:
        assert (r["split"], r["other_split"]) == (split(r["path"]), split(r["other_path"]))
        assert r["leak"] == str(int(r["split"] != r["other_split"]))
        assert order[r["other_split"]] <= order[r["split"]]                # the earlier split is the "other"
        two_classes = Path(r["path"]).parent.name != Path(r["other_path"]).parent.name
        assert ("CONFLICTING LABELS" in r["detail"]) == two_classes
    leaked_test = {r["path"] for r in exact if r["leak"] == "1" and r["split"] == "test"}
    assert len(leaked_test) == 5 and all(split(p) == "test" for p in leaked_test)
    assert sum("CONFLICTING LABELS" in r["detail"] for r in exact) == 1
    summary = json.loads((out / "audit.json").read_text())
    assert summary["findings"]["exact_duplicate"] == 6
    assert summary["leaked"]["test"] == len({r["path"] for r in rows if r["leak"] == "1" and r["split"] == "test"})
    assert summary["images"] == {s: sum(1 for p in files if split(p) == s) for s in
                                 ("train", "val", "test")}                 # the broken JPEG is not an image
    broken_in = [d.name for d in (root / "train").iterdir() if (d / "broken.jpg").exists()]
    assert summary["class_counts"]["train"] == {d.name: len(list(d.iterdir())) - (d.name in broken_in)
                                                for d in (root / "train").iterdir()}
    bad = [r for r in rows if r["kind"] == "undecodable"]
    assert [Path(r["path"]).name for r in bad] == ["broken.jpg"] and bad[0]["split"] == "train"


def test_summary_and_a_second_run_reuse_the_caches(leaky_run, cli_run, monkeypatch):
    """A second audit reads the features and the hashes back (it decodes no image for hashing) and finds the same."""
    import spinal_transfer.experiments.audit as A

    root, out = leaky_run["root"], leaky_run["out"]
    cache = out.parent / "feature-cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(before) == 3                                                   # train, val, test
    first = (out / "audit.csv").read_text()
    decoded, real = [], A.load_image
    monkeypatch.setattr(A, "load_image", lambda p, *a: decoded.append(p) or real(p, *a))
    r = cli_run("audit", "--data", root, "--out", out, *TINY, *EXACT_ONLY)
    assert r.returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == before
    assert [Path(p).name for p in decoded] == ["broken.jpg"]                 # undecodable files are tried again
    assert (out / "audit.csv").read_text() == first
    n_test = len(list((root / "test").rglob("*.png")))
    leaked = {x["path"] for x in csv_rows(out / "audit.csv") if x["leak"] == "1" and x["split"] == "test"}
    assert f"LEAKAGE: {len(leaked)} of {n_test} test images" in r.stdout
    assert "exact duplicates: 6 pairs, 5 across splits, 1 under different classes" in r.stdout
    assert "undecodable files: 1" in r.stdout and "; 1 undecodable file(s) not counted" in r.stdout
    counts = {c: sum(v[c] for v in json.loads((out / "audit.json").read_text())["class_counts"].values())
              for c in ("digit_0", "digit_1", "digit_2")}
    lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
    assert counts[lo] < counts[hi] and f"class counts: {counts[lo]} ({lo}) to {counts[hi]} ({hi})" in r.stdout
    assert len(r.stdout.splitlines()) <= 25                                   # one screen


@pytest.fixture(scope="module")
def damaged(digits_transfer, tmp_path_factory) -> dict:
    """Digits 5-9 (16 px) with JPEG re-encodes and 90% resizes of test images in train and flipped training labels,
    audited at the default thresholds with a backbone pre-trained on digits 0-4."""
    data, weights = digits_transfer
    root = tmp_path_factory.mktemp("damaged") / "digits"
    shutil.copytree(data, root)
    rng = np.random.default_rng(0)
    tests = sorted((root / "test").rglob("*.png"))
    copies = []
    for i, how in zip(rng.choice(len(tests), 8, replace=False), ["jpeg"] * 4 + ["resize"] * 4):
        p = tests[i]
        copies.append((str(p), str(save_variant(p, root / "train" / p.parent.name / f"{how}_{p.name}", how))))
    train = sorted(p for p in (root / "train").rglob("*.png") if not p.name.startswith(("jpeg_", "resize_")))
    classes = sorted(d.name for d in (root / "train").iterdir())
    flipped = []
    for i in rng.choice(len(train), 10, replace=False):
        p = train[i]
        dst = root / "train" / rng.choice([c for c in classes if c != p.parent.name]) / f"f_{p.parent.name}_{p.name}"
        p.rename(dst)
        flipped.append(str(dst))
    cfg = TrainConfig(data=str(root), backbone="timm/test_resnet", weights=str(weights), img_size=16,
                      batch_size=64, workers=0, device="cpu")
    result = audit(cfg, tmp_path_factory.mktemp("damaged_audit") / "audit")
    return {"result": result, "copies": copies, "flipped": flipped, "root": root}


def test_class_counts_line_names_the_ends_and_says_each_when_all_are_equal():
    assert class_counts_line({"a": 14, "b": 14, "c": 14}) == "class counts: 14 each"
    assert class_counts_line({"a": 10, "b": 25, "c": 14}) == "class counts: 10 (a) to 25 (b), imbalance 2.50"
    assert class_counts_line({"a": 10, "b": 0, "c": 14, "d": 0}) == ("class counts: 0 to 14 (c); 2 class(es) have no "
                                                                     "image: b, d, no imbalance ratio")


def test_reencodes_and_resizes_are_near_duplicates_a_different_image_is_not(damaged):
    result, root = damaged["result"], damaged["root"]
    pairs = {frozenset((f.path, f.other_path)): f for f in result.of_kind("near_duplicate")}
    for test_img, copy in damaged["copies"]:
        f = pairs.get(frozenset((test_img, copy)))
        assert f is not None, f"{copy} is not found as a near duplicate of {test_img}"
        assert f.leak and f.path == test_img and f.split == "test" and f.other_split == "train"
    assert result.leaked("test") >= {t for t, _ in damaged["copies"]}
    # a different training image of the same class (one per copied image, drawn at random) is not a near duplicate
    rng = np.random.default_rng(1)
    for test_img, _ in damaged["copies"]:
        same = sorted(p for p in (root / "train" / Path(test_img).parent.name).glob("*.png")
                      if not p.name.startswith(("jpeg_", "resize_", "f_")))
        other = str(same[rng.integers(len(same))])
        assert frozenset((test_img, other)) not in pairs


def test_flipped_labels_rank_first(damaged):
    issues = damaged["result"].of_kind("label_issue")
    flipped = set(damaged["flipped"])
    top = [f.path for f in issues[:2 * len(flipped)]]         # of ~900 images, some genuinely ambiguous at 16 px
    assert len(flipped & set(top)) >= 8, (top, sorted(flipped))
    came_from = [f.suggested_label == Path(f.path).name.split("_")[1] + "_" + Path(f.path).name.split("_")[2]
                 for f in issues if f.path in flipped]          # the suggested label: the class it was moved from
    assert sum(came_from) >= 6
    scores = [f.score for f in issues]
    assert scores == sorted(scores, reverse=True)                  # self-confidence ranking: least confident first


_FIGURES_JS = ("Array.from(document.querySelectorAll('figure.finding')).map(f => [f.dataset.kind, f.dataset.path,"
               " f.dataset.other, f.querySelectorAll('img').length, f.getBoundingClientRect().width])")


def test_audit_html_renders_in_chromium_with_its_thumbnails(leaky_run):
    exe = chromium_or_skip()
    page = leaky_run["out"] / "audit.html"
    r = render(page, chromium=exe, evaluate={"figures": _FIGURES_JS})
    assert r.failed == [] and r.errors == [] and r.external_requests == []
    rows = [x for x in csv_rows(leaky_run["out"] / "audit.csv") if x["kind"] != "undecodable"]
    figures = r.values["figures"]
    assert sorted((k, p, o) for k, p, o, _, _ in figures) == sorted((x["kind"], x["path"], x["other_path"])
                                                                    for x in rows)
    assert all(n == (2 if o else 1) and width > 100 for _, _, o, n, width in figures)   # both images of a pair
    assert len(r.images) == sum(n for *_, n, _ in figures) + 1                           # + the size histograms
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in r.images), r.images
    shot = np.asarray(Image.open(io.BytesIO(r.screenshot)).convert("L"), dtype=np.float64)
    assert shot.std() > 20


def test_missing_folder_is_one_line_and_an_exit_code(cli_run, tmp_path):
    r = cli_run("audit", "--data", tmp_path / "nope", "--out", tmp_path / "a", *TINY)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such data folder" in r.stderr and "Traceback" not in r.stderr
    r = cli_run("audit", "--run", tmp_path, "--out", tmp_path / "a")
    assert r.returncode == 2 and "not a run folder" in r.stderr and r.stderr.strip().count("\n") == 0
    r = cli_run("audit", "--data", tmp_path, "--threshold", "1.5", "--out", tmp_path / "a")
    assert r.returncode == 2 and "--threshold" in r.stderr
    r = cli_run("audit", "--data", tmp_path, "--out", tmp_path / "audit")
    assert r.returncode == 2 and "inside the data folder" in r.stderr and not (tmp_path / "audit").exists()


@pytest.mark.slow      # a cached-feature training run first: ~25 s
def test_audit_of_a_run_reads_its_files_and_its_cached_features(tmp_path, cli_run):
    """--run: the run's splits.json files (not a new scan), its backbone and weights, and the features that its
    `train --cache-features` stored (beside the run folder): nothing is computed again."""
    from conftest import tiny_cfg, write_digits_folder

    from spinal_transfer.training.train import run

    data = write_digits_folder(tmp_path / "digits", digits=(0, 1), size=16)
    rd = tmp_path / "runs" / "cached"
    run(tiny_cfg(data, rd, epochs=1, img_size=16, freeze_backbone=True, cache_features=True, limit_train_batches=1))
    cache = tmp_path / "runs" / "feature-cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(before) == 3
    out = tmp_path / "audit"
    r = cli_run("audit", "--run", rd, "--out", out, *EXACT_ONLY)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == before and "computing" not in r.stderr
    recorded = json.loads((rd / "splits.json").read_text())
    summary = json.loads((out / "audit.json").read_text())
    assert summary["images"] == {s: len(recorded["splits"][s]) for s in ("train", "val", "test")}
    assert summary["settings"]["backbone"] == "timm/test_resnet" and summary["settings"]["run"] == str(rd)
    assert summary["settings"]["feature_cache"] == str(cache)
    assert summary["classes"] == json.loads((rd / "classes.json").read_text())


def test_folds_as_run_and_a_one_image_class_said_once_in_words(tmp_path, cli_run, recwarn):
    """A class of one image does not cap the out-of-fold regression's folds: audit.json records the folds that ran
    (and those asked), the log says why and which class cannot be checked, and sklearn's and cleanlab's raw
    warnings stay out of the console."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c, n in ((0, 12), (1, 12), (2, 1)):
        (tmp_path / "data" / f"digit_{c}").mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == c][:n]):
            Image.fromarray((img * 15).astype(np.uint8)).resize((32, 32)).save(tmp_path / "data" / f"digit_{c}" /
                                                                           f"{i}.png")
    r = cli_run("audit", "--data", tmp_path / "data", "--out", tmp_path / "a", *TINY, *EXACT_ONLY, "--folds", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    settings = json.loads((tmp_path / "a" / "audit.json").read_text())["settings"]
    assert (settings["folds"], settings["folds_asked"]) == (5, 5)      # the one-image class lowers no one's folds
    assert "folds, not 5" not in r.stderr
    assert "class(es) with one image (digit_2)" in r.stderr and "(out-of-fold logistic regression, 5 folds" in r.stdout
    assert not [w for w in recwarn if issubclass(w.category, (UserWarning, RuntimeWarning))
                and ("least populated" in str(w.message) or "label issues" in str(w.message)
                     or "Number of classes" in str(w.message))]


def test_fold_count_follows_the_largest_class_not_the_smallest(caplog):
    """A small class (say one only in test/) spreads over fewer folds; it does not lower every class's folds."""
    from spinal_transfer.experiments.audit import fold_count, out_of_fold_probs

    y = np.array([0] * 4 + [2] * 3)                 # class 1 has no decodable image: it is in no fold
    with caplog.at_level("WARNING", logger="spinal_transfer"):
        assert fold_count(y, 5, ["a", "b", "c"]) == 4
        assert fold_count(np.array([0] * 9 + [1]), 5, ["a", "b"]) == 5
        assert fold_count(np.array([0] * 40 + [1] * 3), 5, ["a", "b"]) == 5
    assert [r.getMessage() for r in caplog.records] == [
        "label errors: 4 folds, not 5: the largest class has 4 image(s)",
        "label errors: class(es) with one image (b): no fold trains on the class while its image is held out, so its "
        "label cannot be checked"]
    rng = np.random.default_rng(0)                  # 5 folds run with a 3-image class: one probability row each
    y = np.array([0] * 40 + [1] * 3)
    x = rng.normal(size=(len(y), 4)) + 3 * y[:, None]
    probs = out_of_fold_probs(x, y, 5)
    assert probs.shape == (43, 2) and np.allclose(probs.sum(1), 1) and (probs.argmax(1) == y).mean() > 0.9


def test_folder_problems_train_refuses_are_findings_not_a_refusal(three_digits, tmp_path, capsys):
    """A class folder without a usable image and classes that differ between splits stop `train`; `audit` reports
    each as a finding (csv, json, page, summary) and audits the rest, the extra class's images under their own
    label."""
    from spinal_transfer.cli import main
    from spinal_transfer.data.splits import scan
    from spinal_transfer.errors import DataError

    root = tmp_path / "digits"
    shutil.copytree(three_digits, root)
    (root / "train" / "digit_9").mkdir()
    (root / "train" / "digit_9" / "notes.txt").write_text("not an image")      # train/digit_9: no usable image
    shutil.rmtree(root / "val" / "digit_2")                                     # val lacks digit_2 (and digit_9)
    (root / "test" / "digit_7").mkdir()                                         # test has a class train lacks
    moved = sorted((root / "test" / "digit_2").glob("*.png"))[:4]
    for f in moved:
        f.rename(root / "test" / "digit_7" / f.name)
    with pytest.raises(DataError, match="without a usable image: train/digit_9"):      # the empty folder first
        scan(root)
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(root), "--out", str(out), *TINY, *EXACT_ONLY]) == 0
    rows = [(r["kind"], r["path"], r["split"], r["label"]) for r in csv_rows(out / "audit.csv")
            if r["kind"] in ("empty_class", "missing_class", "extra_class")]
    assert sorted(rows) == sorted([
        ("empty_class", str(root / "train" / "digit_9"), "train", "digit_9"),
        ("missing_class", str(root / "val"), "val", "digit_2"),
        ("missing_class", str(root / "val"), "val", "digit_9"),
        ("missing_class", str(root / "test"), "test", "digit_9"),
        ("extra_class", str(root / "test" / "digit_7"), "test", "digit_7")])
    summary = json.loads((out / "audit.json").read_text())
    assert summary["classes"] == ["digit_0", "digit_1", "digit_2", "digit_9", "digit_7"]
    assert summary["class_counts"]["test"]["digit_7"] == len(moved)
    assert summary["class_counts"]["train"]["digit_9"] == 0
    assert [summary["findings"][k] for k in ("empty_class", "missing_class", "extra_class")] == [1, 3, 1]
    assert summary["imbalance"]["all"] is None
    printed = capsys.readouterr().out
    assert ("CLASS FOLDERS train refuses (the rest is audited):\n"
            "  1 class(es) without a usable image in a split: digit_9 (train)\n"
            "  2 class(es) in train, missing from a split: digit_2 (val), digit_9 (val, test)\n"
            "  1 class(es) not in train, only in a split: digit_7 (test)\n") in printed
    assert "2 class(es) have no image" not in printed and "1 class(es) have no image: digit_9" in printed
    page = (out / "audit.html").read_text()
    section = page[page.index('<section id="class-folders">'):]
    assert section[:section.index("</section>")].count('<tr><td class="path">') == 5


def test_small_images_are_found_relative_to_the_folder(three_digits, tmp_path, capsys):
    """A 1x1 pixel and an 8x8 thumbnail among 32-px digits are small images (a shorter side at most a quarter of
    the median), smallest first, scored median / side; a 9x9 one is not, nor is a folder of small images alone."""
    from spinal_transfer.cli import main

    root = tmp_path / "digits"
    shutil.copytree(three_digits, root)
    median = float(np.median([min(Image.open(p).size) for p in root.rglob("*.png")]))
    assert median == 32
    cls = root / "train" / "digit_1"
    for name, size in (("pixel.png", (1, 1)), ("thumb.png", (8, 12)), ("nine.png", (9, 9))):
        Image.new("RGB", size, (200, 30, 30)).save(cls / name)
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(root), "--out", str(out), *TINY, *EXACT_ONLY]) == 0
    small = [(Path(r["path"]).name, float(r["score"]), r["label"], r["detail"]) for r in csv_rows(out / "audit.csv")
             if r["kind"] == "small_image"]
    assert small == [("pixel.png", 32.0, "digit_1", "1x1: shorter side 1 px, the folder's median 32 px"),
                     ("thumb.png", 4.0, "digit_1", "8x12: shorter side 8 px, the folder's median 32 px")]
    assert json.loads((out / "audit.json").read_text())["findings"]["small_image"] == 2
    printed = capsys.readouterr().out
    assert "SMALL IMAGES: 2 with a shorter side at most 1/4 of the folder's median" in printed
    assert f"  {cls / 'pixel.png'} (1x1)\n  {cls / 'thumb.png'} (8x12)\n" in printed
    page = (out / "audit.html").read_text()
    section = page[page.index('<section id="small-images">'):]
    assert section[:section.index("</section>")].count('data-kind="small_image"') == 2


def test_label_issues_map_the_columns_of_the_classes_present(tmp_path):
    """A class without a decodable image is in no fold, so sklearn's probabilities have a column per class present:
    the given label's probability and the suggested class are read through that order, not the class index."""
    from spinal_transfer.experiments.audit import Item, label_issues

    classes = ["a", "b", "c"]                        # b has no image
    labels = [0] * 6 + [2] * 6
    probs = np.array([[0.95, 0.05]] * 5 + [[0.1, 0.9]] + [[0.05, 0.95]] * 5 + [[0.85, 0.15]])
    items = [Item(str(tmp_path / f"{i}.png"), "train", y) for i, y in enumerate(labels)]
    found = {f.path: f for f in label_issues(items, probs, classes)}
    assert set(found) == {items[5].path, items[11].path}
    assert (found[items[5].path].label, found[items[5].path].suggested_label) == ("a", "c")
    assert (found[items[11].path].label, found[items[11].path].suggested_label) == ("c", "a")
    assert found[items[5].path].score == pytest.approx(0.9) and found[items[11].path].score == pytest.approx(0.85)


def test_a_skipped_file_keeps_its_split_and_class_and_a_near_duplicate_under_two_classes_says_so(three_digits,
                                                                                                   tmp_path):
    """A file the scan skips (not an image) was listed with empty split and label columns although its path says
    val/digit_1; a near duplicate under two classes was counted as such in the summary but its row did not say
    'CONFLICTING LABELS', as an exact one's does (QA 27)."""
    from spinal_transfer.cli import main

    root = tmp_path / "digits"
    shutil.copytree(three_digits, root)
    (root / "val" / "digit_1" / "notes.png").write_text("not an image")
    src = sorted((root / "train" / "digit_0").glob("*.png"))[0]
    im = np.asarray(Image.open(src).convert("L")).astype(np.int16)
    im[0, 0] = 255 - im[0, 0]                        # other pixels, the same perceptual hash
    Image.fromarray(im.astype(np.uint8)).save(root / "val" / "digit_2" / "near_copy.png")
    out = tmp_path / "audit"
    assert main(["audit", "--data", str(root), "--out", str(out), *TINY, "--threshold", "1", "--hash-bits", "0"]) == 0
    rows = csv_rows(out / "audit.csv")
    bad = [(Path(r["path"]).name, r["split"], r["label"]) for r in rows if r["kind"] == "undecodable"]
    assert bad == [("notes.png", "val", "digit_1")]
    near = [r for r in rows if r["kind"] == "near_duplicate" and Path(r["path"]).name == "near_copy.png"]
    assert len(near) == 1 and near[0]["detail"].endswith("; CONFLICTING LABELS digit_0 and digit_2")


def test_audit_run_with_another_size_or_backbone_says_so_and_resolves_its_preprocessing_anew(caplog):
    """`audit --run RUN --img-size 48` would crop 48 px out of the run's own resize (resolved for its 32 px): the
    resize is resolved anew for the given size, and another backbone's mean/std/interpolation too; a flag that
    changes the features is said, one equal to the run's is not; --cache-dir, which audit reads, draws no "has no
    effect" warning."""
    from spinal_transfer.cli.audit import run_flags
    from spinal_transfer.config import TrainConfig, resolve_config

    ran = TrainConfig(backbone="timm/test_resnet", img_size=32, resize_size=34, mean=[0.4] * 3, std=[0.2] * 3,
                      interpolation="bilinear")
    caplog.set_level("WARNING", logger="spinal_transfer")
    cfg = resolve_config(ran, run_flags(ran, {"img_size": 48}))
    assert (cfg.img_size, cfg.resize_size, cfg.mean, cfg.interpolation) == (48, None, [0.4] * 3, "bilinear")
    assert "--img-size 48 (the run has 32)" in caplog.text
    other = run_flags(ran, {"backbone": "timm/test_vit"})
    assert other == {"backbone": "timm/test_vit", "resize_size": None, "mean": None, "std": None,
                     "interpolation": None}
    assert run_flags(ran, {"img_size": 48, "resize_size": 56}) == {"img_size": 48, "resize_size": 56}  # given: kept
    caplog.clear()
    assert run_flags(ran, {"img_size": 32}) == {"img_size": 32} and not caplog.text                  # the run's own
    resolve_config(TrainConfig(), {"cache_dir": "cache"}, used=("cache_dir",))
    assert "has no effect" not in caplog.text
    resolve_config(TrainConfig(), {"cache_dir": "cache"})
    assert "--cache-dir has no effect here" in caplog.text
