import json
import os
import re
import shutil
import stat
import zipfile

import numpy as np
import pytest

from moe.lm.bundle import save_load
from moe.lm.bundle.folder import OutputLock, check_output
from moe.lm.bundle.layout import (
    MAX_SEQ_LEN_FILE,
    MODEL_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    TRAINING_FILE,
)
from moe.lm.errors import BundleBusyError, BundleError
from moe.lm.model import architectures
from moe.lm.text.tokenizer import Tokenizer

MAX_SEQ_LEN = 3
# The bundle, and the lock file beside it: no temporary folder.
LEFT_AFTER_SAVE = [".saved_model.lock", "saved_model"]


def make_parts(seed=0, words=("a", "b", "c", "d")):
    tokenizer = Tokenizer(list(words))
    model = architectures.build_model(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=MAX_SEQ_LEN,
        embed_dim=4,
        num_experts=2,
        hidden_dim=4,
        seed=seed,
    )
    return model, tokenizer


def save(directory, seed=0, words=("a", "b", "c", "d")):
    model, tokenizer = make_parts(seed, words)
    save_load.save_bundle(
        directory, model, tokenizer, MAX_SEQ_LEN, {"seed": seed}
    )
    return model


def test_save_load_round_trip(tmp_path):
    target = tmp_path / "saved_model"
    model = save(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [*REQUIRED_FILES, TRAINING_FILE]
    )
    assert (target / MAX_SEQ_LEN_FILE).read_text().strip() == "3"
    loaded = save_load.load_bundle(target)
    x = np.array([[0, 2, 3], [4, 5, 1]], np.int32)
    np.testing.assert_allclose(loaded.model(x), model(x), atol=1e-6)
    assert loaded.tokenizer.vocabulary == ["a", "b", "c", "d"]
    assert loaded.max_seq_len == MAX_SEQ_LEN
    assert loaded.training == {"seed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_failed_save_leaves_old_bundle_intact(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model, tokenizer = make_parts(seed=2)

    class Boom(RuntimeError):
        pass

    def to_json_that_fails():  # fails after model.keras was written
        raise Boom("disk full")

    tokenizer.to_json = to_json_that_fails
    with pytest.raises(Boom):
        save_load.save_bundle(target, model, tokenizer, MAX_SEQ_LEN, {})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_leftovers_of_a_killed_run_do_not_break_the_next(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    leftover = tmp_path / ".saved_model.tmp-killed"
    leftover.mkdir()
    (leftover / "model.keras").write_bytes(b"half a file")
    old = tmp_path / ".saved_model.old-killed"
    (old / "saved_model").mkdir(parents=True)
    save(target, seed=2)
    assert save_load.load_bundle(target).training == {"seed": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="no trained model in .*"):
        save_load.load_bundle(tmp_path / "nothing")
    with pytest.raises(BundleError, match="run `python model.py`"):
        save_load.load_bundle(tmp_path)


def test_partial_bundle(tmp_path):
    save(tmp_path)
    (tmp_path / TOKENIZER_FILE).unlink()
    with pytest.raises(BundleError, match="missing tokenizer.json"):
        save_load.load_bundle(tmp_path)


def test_corrupt_model(tmp_path):
    save(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"not a zip file")
    with pytest.raises(BundleError, match="model.keras: not a complete"):
        save_load.load_bundle(tmp_path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{oops", "not valid JSON"),
        (json.dumps({"format": "moe.lm.tokenizer"}), "version None"),
    ],
)
def test_corrupt_tokenizer(tmp_path, content, match):
    save(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(content)
    with pytest.raises(BundleError, match=f"corrupt .*{match}"):
        save_load.load_bundle(tmp_path)


def test_corrupt_max_seq_len(tmp_path):
    save(tmp_path)
    (tmp_path / MAX_SEQ_LEN_FILE).write_text("three")
    with pytest.raises(BundleError, match="a whole number from 1"):
        save_load.load_bundle(tmp_path)


def test_mismatched_parts(tmp_path):
    save(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(Tokenizer(["a", "b"]).to_json())
    with pytest.raises(BundleError, match="4 ids but .* predicts 6"):
        save_load.load_bundle(tmp_path)
    save(tmp_path)
    (tmp_path / MAX_SEQ_LEN_FILE).write_text("5\n")
    with pytest.raises(BundleError, match="says 5 but .* of 3"):
        save_load.load_bundle(tmp_path)


# --- the output rule, the lock, the swap ------------------------------------


def snapshot(folder):
    """`{relative path: bytes}` of every file below `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: (p.mkdir(), (p / "notes.txt").write_text("mine")),
         "holds files that are not part of a model bundle (notes.txt)"),
        (lambda p: (p.mkdir(), (p / "model.keras").mkdir()), "model.keras"),
        (lambda p: p.write_text("a plain file"), "is a file"),
    ],
)  # fmt: skip
def test_output_rule_refuses_what_a_bundle_would_destroy(tmp_path, make, words):
    target = tmp_path / "out"
    make(target)
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match=re.escape(words)):
        check_output(target)
    with pytest.raises(BundleError, match=re.escape(words)):
        save(target)
    assert snapshot(tmp_path) == before  # nothing written, nothing lost


def test_a_readme_in_the_bundle_folder_survives_every_save(tmp_path):
    target = tmp_path / "saved_model"
    target.mkdir()
    readme = "# saved_model/\n\nMy notes about this folder.\n"
    (target / "README.md").write_text(readme)
    (target / "README.md").chmod(0o640)
    for seed in (1, 2):
        save(target, seed=seed)
        assert (target / "README.md").read_text() == readme
        assert stat.S_IMODE((target / "README.md").stat().st_mode) == 0o640
        assert save_load.load_bundle(target).training == {"seed": seed}
    (target / "notes.txt").write_text("another file")
    with pytest.raises(BundleError, match=r"\(notes.txt\)"):
        save(target, seed=3)
    assert (target / "README.md").read_text() == readme


def test_output_rule_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for target in (".", "..", "/"):
        with pytest.raises(BundleError, match="current folder"):
            check_output(target)


def test_output_rule_refuses_an_unwritable_place(tmp_path):
    for target in ("/proc/self/saved_model", "/proc/saved_model"):
        with pytest.raises(BundleError, match="not a writable"):
            check_output(target)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(BundleError, match="not a writable"):
            check_output(locked / "saved_model")


def test_output_rule_accepts_new_empty_and_bundle_folders(tmp_path):
    assert check_output(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    save(tmp_path / "bundle")
    check_output(tmp_path / "bundle")
    save(tmp_path / "bundle", seed=3)  # replaced
    assert save_load.load_bundle(tmp_path / "bundle").training == {"seed": 3}


def test_a_symlinked_output_is_written_through(tmp_path):
    real = tmp_path / "real"
    save(real, seed=1)
    link = tmp_path / "link"
    link.symlink_to(real)
    save(link, seed=2)
    assert link.is_symlink() and link.resolve() == real
    assert save_load.load_bundle(link).training == {"seed": 2}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundle_permissions_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save(tmp_path / "saved_model")
    finally:
        os.umask(previous)
    target = tmp_path / "saved_model"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    for path in target.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_second_writer_is_refused_and_its_bundle_kept(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    before = snapshot(target)
    with OutputLock(target):  # another run, training
        with pytest.raises(BundleBusyError) as error:
            OutputLock(target).acquire()
        assert f"process {os.getpid()}" in str(error.value)
        with pytest.raises(BundleBusyError, match="this bundle is in"):
            save(target, seed=2)
        assert snapshot(target) == before
    (kept,) = tmp_path.glob("saved_model.unsaved-*")
    assert save_load.load_bundle(kept).training == {"seed": 2}
    save(target, seed=3)  # the lock is free again
    assert save_load.load_bundle(target).training == {"seed": 3}


def save_during_the_load(monkeypatch, target, saves) -> list:
    """Each of the first `saves` model reads of a load first has another
    bundle saved to `target` (after its tokenizer was read): seeds 10, 11,
    ..., words w, x, y, z (same vocabulary size, other words). The models
    saved are listed in what is returned."""
    load_model = save_load._load_model
    count = iter(range(saves))
    saved = []

    def racing(path):
        seed = next(count, None)
        if seed is not None:
            saved.append(
                save(target, seed=10 + seed, words=("w", "x", "y", "z"))
            )
        return load_model(path)

    monkeypatch.setattr(save_load, "_load_model", racing)
    return saved


def test_a_load_racing_a_save_sees_one_bundle_whole(tmp_path, monkeypatch):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    saved = save_during_the_load(monkeypatch, target, saves=1)
    loaded = save_load.load_bundle(target)
    (new_model,) = saved
    # The new bundle whole: its tokenizer with its model, never the old
    # tokenizer with the new model.
    assert loaded.training == {"seed": 10}
    assert loaded.tokenizer.vocabulary[-4:] == ["w", "x", "y", "z"]
    weights = zip(loaded.model.get_weights(), new_model.get_weights())
    for got, want in weights:
        np.testing.assert_array_equal(got, want)


def test_a_load_replaced_at_every_read_is_one_clear_error(
    tmp_path, monkeypatch
):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    save_during_the_load(monkeypatch, target, saves=2)
    with pytest.raises(BundleError, match="replaced by another save"):
        save_load.load_bundle(target)


def kill_between_renames(target):
    """The folder state a run killed between the swap's two renames leaves:
    the old bundle aside, the complete new one in its temporary folder."""
    os.rename(target, target.parent / f".{target.name}.old-1")
    staging = target.parent / f".{target.name}.tmp-killed"
    shutil.copytree(target.parent / f".{target.name}.old-1", staging)


def test_a_kill_between_the_renames_is_undone_by_the_next_load(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    kill_between_renames(target)
    assert not target.exists()
    assert save_load.load_bundle(target).training == {"seed": 1}
    assert target.is_dir()


def test_a_kill_between_the_renames_is_undone_by_the_next_save(tmp_path):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    kill_between_renames(target)
    with OutputLock(target):  # a training starting: restores it
        assert save_load.load_bundle(target).training == {"seed": 1}
    save(target, seed=2)
    assert save_load.load_bundle(target).training == {"seed": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == LEFT_AFTER_SAVE


def test_a_load_names_a_set_aside_bundle_it_cannot_restore(
    tmp_path, monkeypatch
):
    target = tmp_path / "saved_model"
    save(target, seed=1)
    kill_between_renames(target)

    def cannot_write(self):
        raise BundleError("read-only")

    monkeypatch.setattr(OutputLock, "acquire", cannot_write)
    with pytest.raises(BundleError, match=r"\.saved_model\.old-1"):
        save_load.load_bundle(target)


# --- what a load refuses ----------------------------------------------------


def test_weights_that_are_not_finite_are_refused(tmp_path):
    model, tokenizer = make_parts()
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    save_load.save_bundle(tmp_path / "b", model, tokenizer, MAX_SEQ_LEN, {})
    with pytest.raises(BundleError, match="NaN or infinite"):
        save_load.load_bundle(tmp_path / "b")


def test_a_truncated_model_file_is_named(tmp_path):
    save(tmp_path)
    path = tmp_path / MODEL_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match="not a complete .keras"):
        save_load.check_bundle(tmp_path)


def rezip(path, member, padding: int):
    """`path` with `member` grown by `padding` spaces, deflated (small on
    disk, `padding` bytes more once expanded)."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents[member] += b" " * padding
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


@pytest.mark.parametrize(
    "member, padding, words",
    [
        ("config.json", 20 << 20, "its config.json expands to 20.0 MiB"),
        ("model.weights.h5", 30 << 20, "its model.weights.h5 expands from"),
    ],
)
def test_members_that_expand_beyond_a_model_are_refused(
    tmp_path, member, padding, words
):
    save(tmp_path)
    path = tmp_path / MODEL_FILE
    rezip(path, member, padding)
    assert path.stat().st_size < 200_000  # a small file on disk
    with pytest.raises(BundleError, match=re.escape(words)):
        save_load.check_bundle(tmp_path)
    # The size is checked before anything is expanded.
    with pytest.raises(BundleError, match="is not a model.py bundle"):
        save_load.load_bundle(tmp_path)


def test_a_recompressed_model_within_the_limits_still_loads(tmp_path):
    model = save(tmp_path)
    rezip(tmp_path / MODEL_FILE, "config.json", 1000)
    loaded = save_load.load_bundle(tmp_path)
    x = np.array([[1, 2, 3]])
    np.testing.assert_allclose(loaded.model(x), model(x), rtol=1e-6)


def test_a_setting_a_layer_rejects_is_named(tmp_path):
    save(tmp_path)
    path = tmp_path / MODEL_FILE
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members["config.json"] = members["config.json"].replace(
        b'"routing": "top_k"', b'"routing": "bogus"'
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(
        BundleError,
        match="its MoELayer cannot be rebuilt: `routing` must be one of",
    ):
        save_load.load_bundle(tmp_path)


@pytest.mark.parametrize("text", ["²", "0", "-3", "3.0", "99999", "1e3"])
def test_max_seq_len_must_be_a_plain_number_in_range(tmp_path, text):
    save(tmp_path)
    (tmp_path / MAX_SEQ_LEN_FILE).write_text(text)
    with pytest.raises(BundleError, match="max_seq_len.txt: expected"):
        save_load.check_bundle(tmp_path)


def test_deeply_nested_json_files(tmp_path):
    save(tmp_path)
    nested = "[" * 100_000 + "]" * 100_000
    (tmp_path / TRAINING_FILE).write_text(nested)
    assert save_load.load_bundle(tmp_path).training == {}  # optional: ignored
    (tmp_path / TOKENIZER_FILE).write_text(nested)
    with pytest.raises(BundleError, match="nested too deeply"):
        save_load.check_bundle(tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "{oops"])
def test_training_json_that_is_not_an_object_is_ignored(tmp_path, content):
    save(tmp_path)
    (tmp_path / TRAINING_FILE).write_text(content)
    assert save_load.load_bundle(tmp_path).training == {}
